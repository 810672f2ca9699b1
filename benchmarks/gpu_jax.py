"""One prepared GPU run on JAX: the machine, the compiled AT step, and a pilot at the paper's
scale, each part written out as soon as it ends, all within `--budget_s` of wall clock.

    bash benchmarks/gpu_jax.sh OUT_DIR CIFAR10_ARCHIVE    (wheels, the backend, a backstop)
    KERAS_BACKEND=jax python benchmarks/gpu_jax.py --output_dir=OUT --dataset=ARCHIVE

Part 1, the machine: the device (and nvidia-smi's name, driver and memory where there is
one), Python, jax, jaxlib, keras and numpy.

Part 2, the step that sparta-train runs on JAX: `adversarial.build`'s model and its
`train_step` under `jax.jit` (compiled ahead), ResNet-18 at `--width`, batch `--batch_size`,
the same batch every call. For each dtype (bfloat16: Keras's mixed_bfloat16 policy; float32)
the configurations are `at/<activation>` (PGD-K AT) for each activation, for
sparta_autodiff (Sparta's forward differentiated by autodiff, not its custom gradient) and
for sparta_depthwise (DW_k as a depthwise convolution, not JAX's default shifted form:
which form a GPU should run, `sparta_tf.gate`), then `standard/<activation>` (no attack), for the AT efficiency (K + 1) t(standard) /
t(AT). They are compiled in that order, bfloat16 first, while the part's share of the budget
lasts; then the compiled ones take turns, `--steps` steps each, round after round, so that a
slow spell falls on all. Figures are medians over rounds; every ratio is taken within a
round. Memory: XLA's buffer plan of each compiled step (arguments + outputs - donated +
temporaries), and the device's peak bytes in use after its warm-up (`memory_stats`, where
the device reports it; it only grows, so it is the most of this and the steps before).

Part 3, the gate alone (`benchmarks/gate_forms.py`): Sparta's forward and backward in each
form of DW_k against ReLU and SiLU, at ResNet-18's four shapes at `--width` and
`--batch_size`, in each dtype, interleaved, after the forms are held to each other and to
NumPy on the device: which form this device should run.

Part 4, the pilot: PGD-AT (K steps, eps 8/255, one-cycle lr up to `--lr`) of each arm in
turn, ReLU, Sparta, SiLU by default, each one `training.run` on JAX (the run of
`KERAS_BACKEND=jax sparta-train`) in OUT/pilot/<arm>, evaluated clean and under
PGD-`--eval_pgd_steps` on every test image, then under standard AutoAttack
(`sparta_tf.autoattack_keras`: APGD-CE, APGD-T, FAB-T, Square) on `--autoattack_examples`
test images, the same class-balanced sample for every arm; model.keras stays there, its
sha256 in the report. Last, Sparta minus ReLU and Sparta minus SiLU in AutoAttack accuracy,
paired by image, with a 95% bootstrap interval over the images (`experiments.stats.paired`).
The epochs, the same for every arm, are the most (up to `--pilot_max_epochs`) that the time
left allows once every arm's compiles, evaluations and AutoAttack are counted, sized from part
2's step and compile times of the first dtype; if fewer than `--pilot_min_epochs` fit, the
last arm is dropped (down to two). One seed: a pilot, not a result.

Writes gpu_jax.json and GPU_JAX.md into --output_dir after each part and each arm.
"""

import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

import gate_forms  # benchmarks/gate_forms.py: part 3

START = time.monotonic()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # sparta_tf from this checkout: the GPU machine has it uninstalled

flags.DEFINE_string("output_dir", None, "Where the reports and the pilot's model_dirs go.")
flags.DEFINE_string("dataset", None, "The CIFAR-10 .tar.gz (or folder) of the pilot.")
flags.DEFINE_float("budget_s", 450, "Wall-clock seconds for the whole run, from its start.")
flags.DEFINE_string("model", "resnet18", "The network (e.g. resnet18, preact_resnet18).")
flags.DEFINE_float("width", 1.0, "Width multiplier.")
flags.DEFINE_integer("batch_size", 512, "Batch size, of the step and of the pilot.")
flags.DEFINE_integer("pgd_steps", 3, "K, the PGD steps of AT (step 2.5 eps / K).")
flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Dtypes of the step; the first trains "
                  "the pilot.")
flags.DEFINE_list("activations", ["relu", "sparta", "silu"], "Activations of the step; the "
                  "first is the reference of the ratios.")
flags.DEFINE_bool("sparta_depthwise", True, "Also time Sparta with DW_k as a depthwise "
                  "convolution (`sparta_depthwise`) beside its default form on JAX (shifted).")
flags.DEFINE_integer("rounds", 5, "Rounds of the step; each configuration runs `steps` a round.")
flags.DEFINE_integer("steps", 5, "Timed steps per configuration and round.")
flags.DEFINE_float("step_share", 0.35, "The share of the time left that the step may use.")
flags.DEFINE_list("pilot_arms", ["relu", "sparta", "silu"], "Activations of the pilot, in order.")
flags.DEFINE_float("lr", 0.2, "The pilot's peak learning rate (one-cycle).")
flags.DEFINE_integer("pilot_max_epochs", 15, "The pilot's epochs, at most.")
flags.DEFINE_integer("pilot_min_epochs", 10, "Fewer epochs than this: drop the last arm.")
flags.DEFINE_integer("pilot_max_train", 0, "Training images of the pilot (0: all).")
flags.DEFINE_integer("pilot_max_test", 0, "Test images of the pilot (0: all).")
flags.DEFINE_integer("eval_pgd_steps", 20, "PGD steps of the pilot's evaluation.")
flags.DEFINE_integer("autoattack_examples", 1000, "Test images of the pilot's AutoAttack "
                     "(0: none).")
flags.DEFINE_integer("autoattack_iterations", 100, "APGD and FAB iterations (standard: 100).")
flags.DEFINE_integer("autoattack_queries", 5000, "Square queries (standard: 5000).")
FLAGS = flags.FLAGS

POLICY = {"bfloat16": "mixed_bfloat16", "float32": "float32"}
EPS = 8 / 255
SAFETY = 1.25  # the pilot's estimates are multiplied by this (data, host work, saves)
PAIRS = (("sparta", "relu"), ("sparta", "silu"))  # the paired differences of the pilot


def autoattack_passes(iterations, queries):
    """About how many forward-and-backward passes standard AutoAttack makes per image: APGD-CE
    on every image, APGD-T and FAB-T (9 targets each) on the half that robust training leaves
    standing, and Square's forward passes (a third of a pass each) on that half."""
    return iterations * (1 + 0.5 * 9 * 2) + queries * 0.5 / 3


def _left():
    return FLAGS.budget_s - (time.monotonic() - START)


def _spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _error(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


# Part 1 ----------------------------------------------------------------------------------

def machine():
    import jax
    import jaxlib
    import keras
    import numpy as np
    device = jax.devices()[0]
    info = {"platform": device.platform, "device": device.device_kind,
            "device_count": jax.device_count(), "python": platform.python_version(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "keras": keras.__version__,
            "keras_backend": keras.backend.backend(), "numpy": np.__version__,
            "cpu_cores": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=60)
        info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    return info


# Part 2 ----------------------------------------------------------------------------------

def _train_config(activation, objective, dtype, **fields):
    """The TrainConfig of one arm: `activation` may be sparta_autodiff (or sparta_depthwise,
    which `_compile` sets)."""
    from sparta_tf.config import TrainConfig
    return TrainConfig(model=FLAGS.model,
                       activation=activation.replace("_autodiff", "").replace("_depthwise", ""),
                       sparta_custom_gradient=not activation.endswith("_autodiff"),
                       width_multiplier=FLAGS.width, batch_size=FLAGS.batch_size,
                       lr=FLAGS.lr, lr_schedule="onecycle", momentum=0.9, weight_decay=5e-4,
                       objective=objective, eps=EPS, pgd_steps=FLAGS.pgd_steps,
                       mixed_precision=POLICY[dtype], seed=0, **fields)


def _configs():
    """(name, activation, objective, dtype) in the order of priority."""
    out = []
    for dtype in FLAGS.dtypes:
        extra = ["sparta_autodiff"] + (["sparta_depthwise"] if FLAGS.sparta_depthwise else [])
        at = FLAGS.activations + (extra if "sparta" in FLAGS.activations else [])
        out += [(f"at/{a}/{dtype}", a, "pgd", dtype) for a in at]
        out += [(f"standard/{a}/{dtype}", a, "standard", dtype) for a in FLAGS.activations]
    return out


def _device_peak_bytes():
    import jax
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # not every device (or jax version) reports it
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _compile(activation, objective, dtype, batch):
    """(step, state, figures): the compiled train step, its state after a warm-up call."""
    import jax
    import keras
    from sparta_tf import adversarial, layers
    from sparta_tf.backend import jax_trainer
    config = _train_config(activation, objective, dtype, epochs=1)
    keras.utils.set_random_seed(0)
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(config.mixed_precision)  # as training.run holds it
    try:
        model = adversarial.build(config, 10, batch[0].shape[1:], steps_per_epoch=100)
        if activation == "sparta_depthwise":  # the form is read when the step is traced
            for layer in model.model.layers:
                if isinstance(layer, layers.Sparta):
                    layer.gate_form = "depthwise"
        model(batch[0][:1])  # built, as training.run does: stateless_call needs it
        state = jax_trainer.train_state(model)
        start = time.perf_counter()
        step = jax_trainer.compiled_step(model).lower(state, batch).compile()
        figures = {"compile_s": time.perf_counter() - start}
    finally:
        keras.config.set_dtype_policy(policy)
    try:
        memory = step.memory_analysis()
    except Exception:  # not every backend (or jax version) plans its memory this way
        memory = None
    if memory is not None:
        figures["xla_bytes"] = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                   - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    start = time.perf_counter()
    logs, state = step(state, batch)
    jax.block_until_ready(logs)
    figures["first_call_s"] = time.perf_counter() - start
    figures["device_peak_bytes"] = _device_peak_bytes()
    return step, state, figures


def step_part(report, write):
    import jax
    import numpy as np
    rng = np.random.default_rng(0)
    batch = (jax.device_put(rng.uniform(size=(FLAGS.batch_size, 32, 32, 3)).astype("float32")),
             jax.device_put((np.arange(FLAGS.batch_size) % 10).astype("int32")))
    share = FLAGS.step_share * _left()
    deadline = time.monotonic() + share
    part = {"model": FLAGS.model, "width": FLAGS.width, "batch_size": FLAGS.batch_size,
            "pgd_steps": FLAGS.pgd_steps, "steps": FLAGS.steps, "budget_s": share,
            "configs": {}, "ratios": {}}
    report["step"] = part
    live = {}  # name: [step, state]
    for name, activation, objective, dtype in _configs():
        # Compile only while a quarter of the share is still left for the rounds.
        if time.monotonic() > deadline - share / 4:
            part["configs"][name] = {"skipped": "out of time"}
            continue
        try:
            step, state, figures = _compile(activation, objective, dtype, batch)
        except Exception as e:  # e.g. out of memory: the others still run
            part["configs"][name] = {"skipped": _error(e)}
            continue
        live[name] = [step, state]
        part["configs"][name] = figures
        print(f"compiled {name}: {figures}", flush=True)
    rounds = []
    while live and len(rounds) < FLAGS.rounds and (not rounds or time.monotonic() < deadline):
        seconds = {}
        for name, (step, state) in live.items():
            start = time.perf_counter()
            for _ in range(FLAGS.steps):
                logs, state = step(state, batch)
            jax.block_until_ready(logs)
            seconds[name] = (time.perf_counter() - start) / FLAGS.steps
            live[name][1] = state
        rounds.append(seconds)
    part["rounds"] = len(rounds)
    for name in live:
        s = _spread([r[name] for r in rounds])
        part["configs"][name].update(s_per_step=s, img_s=FLAGS.batch_size / s["median"])
    part["ratios"] = _ratios(rounds)
    write()
    return part


def _ratios(rounds):
    """Ratios of step times within each round, as medians [min, max] over the rounds."""
    k, ref = FLAGS.pgd_steps, FLAGS.activations[0]
    wanted = {}
    for d in FLAGS.dtypes:
        for a in FLAGS.activations[1:]:
            wanted[f"{a} / {ref}, AT, {d}"] = (
                lambda r, a=a, d=d: r[f"at/{a}/{d}"] / r[f"at/{ref}/{d}"])
        wanted[f"sparta custom gradient / autodiff, AT, {d}"] = (
            lambda r, d=d: r[f"at/sparta/{d}"] / r[f"at/sparta_autodiff/{d}"])
        wanted[f"sparta shifted (JAX's default) / depthwise, AT, {d}"] = (
            lambda r, d=d: r[f"at/sparta/{d}"] / r[f"at/sparta_depthwise/{d}"])
        for a in FLAGS.activations:
            wanted[f"AT efficiency (K+1) t(standard) / t(AT), {a}, {d}"] = (
                lambda r, a=a, d=d: (k + 1) * r[f"standard/{a}/{d}"] / r[f"at/{a}/{d}"])
    for a in FLAGS.activations + ["sparta_autodiff"]:
        for d in FLAGS.dtypes[1:]:
            wanted[f"{d} / {FLAGS.dtypes[0]}, AT, {a}"] = (
                lambda r, a=a, d=d: r[f"at/{a}/{d}"] / r[f"at/{a}/{FLAGS.dtypes[0]}"])
    ratios = {}
    for label, ratio in wanted.items():
        try:
            ratios[label] = _spread([ratio(r) for r in rounds])
        except (KeyError, ValueError):  # a configuration that did not run, or no round
            pass
    return ratios


# Part 3 ----------------------------------------------------------------------------------

def gate_part(report, write):
    start = time.monotonic()
    part = {"agreement": gate_forms.agreement(gate_forms.shapes(FLAGS.width, FLAGS.batch_size))}
    part["timings"] = gate_forms.measure(FLAGS.width, FLAGS.batch_size, FLAGS.dtypes,
                                         FLAGS.rounds, FLAGS.steps)
    part["seconds"] = time.monotonic() - start
    report["gate"] = part
    write()


# Part 4 ----------------------------------------------------------------------------------

def fit_pilot(arms, per_image, overhead, n_train, left, min_epochs, max_epochs):
    """(arms, epochs): the most epochs, up to `max_epochs`, for which every arm's
    `SAFETY * (overhead + epochs * n_train * per_image)` together fit in `left` seconds;
    while that is under `min_epochs`, the last arm is dropped, down to two arms. The
    epochs may come out below 1: then nothing fits."""
    arms = list(arms)
    while True:
        train_s = sum(n_train * per_image[a] for a in arms)
        epochs = int((left / SAFETY - sum(overhead[a] for a in arms)) // train_s)
        if epochs >= min_epochs or len(arms) <= 2:
            return arms, min(epochs, max_epochs)
        arms.pop()


def _plan(step, data_dir):
    """The pilot's arms and epochs, sized from the step's figures and the time left."""
    from sparta_tf import data
    start = time.monotonic()
    ds = data.load(FLAGS.dataset, data_dir, FLAGS.pilot_max_train or None,
                   FLAGS.pilot_max_test or None)  # also extracts the archive, once
    load_s = time.monotonic() - start
    n_train, n_test = len(ds.y_train), len(ds.y_test)
    n_autoattack = min(FLAGS.autoattack_examples, n_test)
    del ds
    dtype, configs = FLAGS.dtypes[0], step["configs"]
    measured = {a: configs.get(f"at/{a}/{dtype}", {}) for a in FLAGS.pilot_arms}
    known = [c for c in measured.values() if "s_per_step" in c]
    if not known:
        return {"skipped": f"no {dtype} AT step was timed in part 2 to size it"}
    fallback = max(known, key=lambda c: c["s_per_step"]["median"])  # the slowest known
    per_image, overhead = {}, {}
    for arm in FLAGS.pilot_arms:
        c = measured[arm] if "s_per_step" in measured[arm] else fallback
        per_image[arm] = c["s_per_step"]["median"] / FLAGS.batch_size
        passes = (n_test * (FLAGS.eval_pgd_steps + 1) + n_autoattack * autoattack_passes(
            FLAGS.autoattack_iterations, FLAGS.autoattack_queries))
        evaluation = passes / (FLAGS.pgd_steps + 1) * per_image[arm]
        # The train step, the two evaluations and the 4 attacks compile, the data load
        # again, then evaluate.
        overhead[arm] = (3 + 4 * bool(n_autoattack)) * c["compile_s"] + load_s + evaluation
    left = _left()
    arms, epochs = fit_pilot(FLAGS.pilot_arms, per_image, overhead, n_train, left,
                             FLAGS.pilot_min_epochs, FLAGS.pilot_max_epochs)
    plan = {"arms": arms, "epochs": epochs, "dtype": dtype, "train_images": n_train,
            "test_images": n_test, "autoattack_images": n_autoattack, "data_load_s": load_s, "time_left_s": left,
            "estimate_s": {a: SAFETY * (overhead[a] + epochs * n_train * per_image[a])
                           for a in arms}}
    if epochs < 1:
        plan["skipped"] = f"not one epoch of {arms} fits in the {left:.0f} s left"
    return plan


def _autoattack(model_path, x, y):
    """Standard AutoAttack (keras.ops) of the pilot's model on (x, y): its figures, with the
    images it left right packed (`evaluation.pack`)."""
    from sparta_tf import autoattack_keras, evaluation, transfer
    start = time.monotonic()
    out = autoattack_keras.robust_accuracy(
        transfer.load(model_path), x, y, EPS, batch_size=FLAGS.batch_size,
        iterations=FLAGS.autoattack_iterations, queries=FLAGS.autoattack_queries, seed=0)
    return {"accuracy": out["accuracy"], "after": out["after"], "images": len(y),
            "per_image": evaluation.pack(out["robust"]), "seconds": time.monotonic() - start}


def paired(arms):
    """Sparta minus ReLU and minus SiLU in the pilot's AutoAttack accuracy, paired by image
    (the `PAIRS` whose arms both have it)."""
    from sparta_tf.experiments import stats
    cells = [{"objective": "pgd", "activation": arm, "seed": 0,
              "per_image": {"autoattack": a["autoattack"]["per_image"]}}
             for arm, a in arms.items() if "per_image" in a.get("autoattack", {})]
    out = {}
    for arm, other in PAIRS:
        p = stats.paired(cells, "pgd", arm, other, "autoattack")
        if p is not None:
            out[f"{arm} - {other}"] = {k: p[k] for k in ("mean", "low", "high", "images")}
    return out


def pilot_part(report, write):
    from sparta_tf import data, training
    data_dir = tempfile.mkdtemp(prefix="gpu_jax_data-")
    try:
        plan = _plan(report["step"], data_dir)
        part = {"plan": plan, "arms": {}}
        report["pilot"] = part
        write()
        if "skipped" in plan:
            return
        if plan["autoattack_images"]:  # the same images for every arm
            test = data.load(FLAGS.dataset, data_dir, max_test=plan["autoattack_images"],
                             splits=("test",))
        for arm in plan["arms"]:
            if _left() < plan["estimate_s"][arm]:
                part["arms"][arm] = {"skipped": f"{_left():.0f} s left, "
                                                f"{plan['estimate_s'][arm]:.0f} s needed"}
                write()
                continue
            folder = os.path.join(FLAGS.output_dir, "pilot", arm)
            config = _train_config(arm, "pgd", plan["dtype"], model_dir=folder,
                                   dataset=FLAGS.dataset, data_dir=data_dir,
                                   max_train=FLAGS.pilot_max_train or None,
                                   max_test=FLAGS.pilot_max_test or None,
                                   epochs=plan["epochs"], checkpoint_every=0,
                                   eval_pgd_steps=FLAGS.eval_pgd_steps)
            start = time.monotonic()
            try:  # a model_dir left by an earlier run of the same arm resumes
                results = training.run(config, verbose=2)
            except Exception as e:  # a failed arm is reported; the next one still runs
                part["arms"][arm] = {"failed": _error(e), "seconds": time.monotonic() - start}
                write()
                continue
            # The pilot never resumes: model.keras holds what AutoAttack needs.
            shutil.rmtree(os.path.join(folder, "checkpoints"), ignore_errors=True)
            model = os.path.join(folder, "model.keras")
            with open(model, "rb") as f:
                sha256 = hashlib.sha256(f.read()).hexdigest()
            with open(os.path.join(folder, "metrics.jsonl")) as f:
                epochs = [json.loads(line) for line in f if line.strip()]
            part["arms"][arm] = {
                "results": results, "seconds": time.monotonic() - start,
                "estimate_s": plan["estimate_s"][arm], "epochs": epochs,
                "model": os.path.relpath(model, FLAGS.output_dir), "model_sha256": sha256,
                "model_bytes": os.path.getsize(model), "device_peak_bytes": _device_peak_bytes()}
            write()
            if plan["autoattack_images"]:
                try:
                    part["arms"][arm]["autoattack"] = _autoattack(model, test.x_test,
                                                                  test.y_test)
                except Exception as e:  # reported; the next arm still runs
                    part["arms"][arm]["autoattack"] = {"failed": _error(e)}
                part["arms"][arm]["seconds"] = time.monotonic() - start
                part["paired"] = paired(part["arms"])
                write()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


# The report ------------------------------------------------------------------------------

def _gib(n):
    return "n/a" if n is None else f"{n / 2 ** 30:.2f}"


def markdown(report):
    m = report.get("machine", {})
    lines = ["# One GPU run on JAX (`benchmarks/gpu_jax.sh`)", "",
             f"Device: {m.get('device')} ({m.get('platform')}; nvidia-smi: "
             f"{m.get('nvidia_smi', 'none')}). Python {m.get('python')}, jax {m.get('jax')}, "
             f"jaxlib {m.get('jaxlib')}, keras {m.get('keras')} on {m.get('keras_backend')}, "
             f"numpy {m.get('numpy')}. TensorFlow imported: {report.get('tensorflow_imported')}."
             f" Elapsed {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget.", ""]
    step = report.get("step")
    if step:
        lines += ["## The compiled AT step", "",
                  f"{step['model']} at width {step['width']}, batch {step['batch_size']}, "
                  f"PGD-{step['pgd_steps']}; {step['rounds']} interleaved rounds of "
                  f"{step['steps']} steps each.", "",
                  "| configuration | img/s | s/step median [min, max] | compile s | XLA plan GiB "
                  "| device peak GiB |", "|---|---:|---|---:|---:|---:|"]
        for name, c in step["configs"].items():
            if "s_per_step" not in c:
                lines.append(f"| {name} | {c.get('skipped', 'not timed')} | | | | |")
                continue
            s = c["s_per_step"]
            lines.append(f"| {name} | {c['img_s']:.0f} | {s['median']:.4f} [{s['min']:.4f}, "
                         f"{s['max']:.4f}] | {c['compile_s']:.1f} | {_gib(c.get('xla_bytes'))} "
                         f"| {_gib(c.get('device_peak_bytes'))} |")
        lines += ["", "| ratio | median [min, max] |", "|---|---|"]
        for name, r in step["ratios"].items():
            lines.append(f"| {name} | {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}] |")
        lines.append("")
    gate = report.get("gate")
    if gate and "failed" in gate:
        lines += ["## The gate alone, by form of DW_k", "", f"Failed: {gate['failed']}.", ""]
    elif gate:
        lines += ["## The gate alone, by form of DW_k", "",
                  f"Forward and backward at ResNet-18's shapes (width {FLAGS.width}, batch "
                  f"{FLAGS.batch_size}); time ratios within a round, median [min, max]; "
                  f"{gate['seconds']:.0f} s.", ""]
        lines += gate_forms.tables(gate["timings"], gate["agreement"]) + [""]
    pilot = report.get("pilot")
    if pilot:
        plan = pilot["plan"]
        lines += ["## Pilot: PGD-AT at the paper's scale (one seed)", ""]
        if "skipped" in plan:
            lines += [f"Not run: {plan['skipped']}.", ""]
        else:
            lines += [f"{FLAGS.model} at width {FLAGS.width}, {plan['dtype']}, "
                      f"{plan['train_images']} training images, {plan['epochs']} epochs of "
                      f"PGD-{FLAGS.pgd_steps} AT at eps 8/255, batch {FLAGS.batch_size}, "
                      f"one-cycle lr up to {FLAGS.lr}, momentum 0.9, weight decay 5e-4; "
                      f"accuracy on {plan['test_images']} test images, PGD-"
                      f"{FLAGS.eval_pgd_steps} at 8/255; standard AutoAttack (keras.ops, "
                      f"{FLAGS.autoattack_iterations} iterations, {FLAGS.autoattack_queries} "
                      f"Square queries) on {plan['autoattack_images']} of them. Arms planned: "
                      f"{', '.join(plan['arms'])}.", "",
                      "| arm | clean | PGD | AutoAttack | minutes | model sha256 |",
                      "|---|---:|---:|---:|---:|---|"]
            for arm, a in pilot["arms"].items():
                if "results" not in a:
                    lines.append(f"| {arm} | {a.get('skipped') or a.get('failed')} | | | | |")
                    continue
                r, aa = a["results"], a.get("autoattack", {})
                pgd = r.get(f"pgd{FLAGS.eval_pgd_steps}_acc")
                aa = (f"{100 * aa['accuracy']:.2f}" if "accuracy" in aa
                      else aa.get("failed", "not run"))
                lines.append(f"| {arm} | {100 * r['clean_acc']:.2f} | "
                             f"{'n/a' if pgd is None else f'{100 * pgd:.2f}'} | {aa} | "
                             f"{a['seconds'] / 60:.1f} | `{a['model_sha256'][:16]}` |")
            lines.append("")
            if pilot.get("paired"):
                lines += ["AutoAttack accuracy, paired by image (points; 95% bootstrap interval "
                          "over the images, one seed):", "", "| pair | mean [95% interval] |",
                          "|---|---|"]
                for pair, p in pilot["paired"].items():
                    lines.append(f"| {pair} | {100 * p['mean']:+.2f} [{100 * p['low']:+.2f}, "
                                 f"{100 * p['high']:+.2f}] |")
                lines.append("")
    return "\n".join(lines)


def main(argv):
    del argv
    from sparta_tf import model_dir
    if not FLAGS.output_dir or not FLAGS.dataset:
        raise app.UsageError("--output_dir and --dataset are required.")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    report = {"budget_s": FLAGS.budget_s, "argv": sys.argv[1:]}

    def write():
        report["elapsed_s"] = time.monotonic() - START
        report["tensorflow_imported"] = "tensorflow" in sys.modules
        model_dir.write_json(os.path.join(FLAGS.output_dir, "gpu_jax.json"), report)
        model_dir.write_text(os.path.join(FLAGS.output_dir, "GPU_JAX.md"), markdown(report))

    report["machine"] = machine()
    write()
    print(json.dumps(report["machine"]), flush=True)
    step_part(report, write)
    try:  # the pilot runs even if this part fails
        gate_part(report, write)
    except Exception as e:
        report["gate"] = {"failed": _error(e)}
        write()
    pilot_part(report, write)
    write()
    print(markdown(report), flush=True)


if __name__ == "__main__":
    app.run(main)
