"""Install sparta-tf: `pip install -e .[test]` for everything (both backends, the tests);
`pip install .[tensorflow]` or `pip install .[jax]` for one backend; `and-cuda` adds
TensorFlow's GPU libraries."""

from setuptools import find_packages, setup

TENSORFLOW = [
    "tensorflow>=2.16",
    "tensorboard",
    "tensorflow-datasets",
    "importlib_resources",  # tfds 4.9.10 imports it without declaring it
    "adversarial-robustness-toolbox",
]

setup(
    name="sparta-tf",
    version="0.1.0",
    description="Sparta (spatially attentive and adversarially robust activation) "
                "and adversarial training for Keras 3 (TensorFlow and JAX)",
    license="Apache-2.0",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sparta_tf", "sparta_tf.*", "trainers", "flags"]),
    package_data={"sparta_tf": ["bundled/*.tar.gz"]},
    # What the library and the apps need on any backend; a backend comes from an extra.
    install_requires=[
        "keras>=3.3",
        "absl-py",
        "numpy",
        "matplotlib",
        "tqdm",
        "pillow",  # reads image folders where TensorFlow is not installed (JAX)
    ],
    extras_require={
        # TensorFlow, the default backend, and what only it runs: TFDS datasets, ART's
        # AutoAttack (--autoattack=art); tensorboard for the logs/ of a run.
        "tensorflow": TENSORFLOW,
        # JAX (its CPU build; `jax[cuda12]` or later for GPUs) without TensorFlow.
        "jax": ["jax>=0.4.30", "tensorboard"],
        # Everything: both backends, and what the tests and benchmarks use (cleverhans is
        # the benchmarks' eager reference loop and a cross-check of the tests).
        "test": TENSORFLOW + ["jax>=0.4.30", "pytest", "pytest-xdist", "cleverhans"],
        "and-cuda": ["tensorflow[and-cuda]>=2.16", *TENSORFLOW[1:]],
    },
    entry_points={"console_scripts": [
        "sparta-train = trainers.train:run",
        "sparta-evaluate = trainers.evaluate:run",
        "sparta-compare = trainers.compare:run",
        "sparta-transfer = trainers.transfer:run",
        "sparta-export = trainers.export:run",
    ]},
)
