"""Install sparta-tf: `pip install -e .[test]` (add `and-cuda` for GPUs)."""

from setuptools import find_packages, setup

setup(
    name="sparta-tf",
    version="0.1.0",
    description="Sparta (spatially attentive and adversarially robust activation) "
                "and adversarial training for Keras/TensorFlow",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sparta_tf", "sparta_tf.*", "trainers", "flags"]),
    package_data={"sparta_tf": ["bundled/*.tar.gz"]},
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.3",
        "tensorboard",
        "tensorflow-datasets",
        "importlib_resources",  # tfds 4.9.10 imports it without declaring it
        "cleverhans",
        "absl-py",
        "numpy",
        "adversarial-robustness-toolbox",
        "matplotlib",
        "tqdm",
        "pillow",  # reads image folders where TensorFlow is not installed (JAX)
    ],
    extras_require={
        # jax (its CPU build) for the backend tests: Sparta and PGD AT on JAX.
        "test": ["pytest", "pytest-xdist", "jax>=0.4.30"],
        "jax": ["jax>=0.4.30"],
        "and-cuda": ["tensorflow[and-cuda]>=2.16"],
    },
    entry_points={"console_scripts": [
        "sparta-train = trainers.train:run",
        "sparta-evaluate = trainers.evaluate:run",
        "sparta-compare = trainers.compare:run",
        "sparta-transfer = trainers.transfer:run",
        "sparta-export = trainers.export:run",
    ]},
)
