"""Evaluate the robustness of a trained model and check it for gradient masking.

    sparta-evaluate --model_path=runs/default          # a model_dir of sparta-train
    sparta-evaluate --model_path=model.keras --dataset=cifar10 --eps=8/255 --num_examples=1000

Clean, FGSM, PGD (CE and CW losses, with restarts), Square and AutoAttack accuracy at
--eps, and the sanity checks of Carlini et al. (2019). Writes eval.json and eval.md to
--output_dir and prints the Markdown. For a model_dir, the data flags and --eps not given
on the command line come from its config.json. A model that does not fit the data (other
images, another number of classes, or other class names in the class_names.json beside
it) is refused before anything is evaluated.

On every Keras backend: AutoAttack is written in keras.ops (--autoattack=keras, the
default), so KERAS_BACKEND=jax evaluates a model_dir or a .keras file where TensorFlow is not
installed. What needs TensorFlow, a SavedModel as the model and ART's AutoAttack
(--autoattack=art, the cross-check), is refused in one line on another backend.

What runs: a .keras file (or a model_dir's model.keras) loads under Keras's safe_mode, so
it runs no arbitrary code: a Lambda layer is refused, not run. An exported SavedModel runs
its own graph, TensorFlow ops chosen by whoever wrote it: only evaluate SavedModels you
trust.
"""

import json
import os
import sys

from absl import app, flags


from flags import core
from sparta_tf import data, evaluation, model_dir

FLAGS = core.FLAGS
core.define_evaluation()
flags.mark_flag_as_required("model_path")
# Taken from a model_dir's config.json where not given on the command line.
FROM_CONFIG = ("dataset", "data_dir", "max_test", "seed", "eps")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    path = FLAGS.model_path
    output_dir = FLAGS.output_dir or (
        path if os.path.isfile(os.path.join(path, model_dir.MODEL))
        else os.path.dirname(os.path.abspath(path)))
    try:
        if FLAGS.autoattack == "art":
            evaluation.needs_tensorflow("ART's AutoAttack (--autoattack=art)")
        config = os.path.join(path, model_dir.CONFIG)
        trained = model_dir.read_json(config) if os.path.isfile(config) else {}
        if not isinstance(trained, dict):
            raise ValueError(f"{config} holds no JSON object of settings.")
        given = {name: _setting(name, trained, config) for name in FROM_CONFIG}
        model = evaluation.load_model(path)
        evaluation.check_writable(output_dir)  # before the evaluation, not after it
        ds = data.load(given["dataset"], given["data_dir"], max_test=given["max_test"],
                       seed=given["seed"], splits=("test",),
                       max_extract_gb=FLAGS.max_extract_gb,
                       max_extract_ratio=FLAGS.max_extract_ratio)
        evaluation.check_fits(model, ds.x_test, ds.class_names, path)
    except (FileNotFoundError, ValueError, data.DatasetUnavailableError) as e:
        sys.exit(f"error: {e}")
    report = evaluation.robustness_report(
        model, ds.x_test, ds.y_test, given["eps"], steps=[int(s) for s in FLAGS.eval_steps],
        restarts=FLAGS.pgd_restarts, autoattack=FLAGS.autoattack,
        autoattack_iterations=FLAGS.autoattack_iterations, square_queries=FLAGS.square_queries,
        batch_size=FLAGS.batch_size, seed=given["seed"])
    report.update(model=path, dataset=given["dataset"])
    markdown = evaluation.to_markdown(report)
    print(markdown)  # first: a failed write below loses no result
    try:
        model_dir.write_json(os.path.join(output_dir, "eval.json"), report)
        model_dir.write_text(os.path.join(output_dir, "eval.md"), markdown)
    except OSError as e:
        sys.exit(f"error: could not write eval.json and eval.md to {output_dir}: {e}")
    print(f"Wrote eval.json and eval.md to {output_dir}")


def _setting(name, trained, config):
    """Flag `name` if given, else its value in the model_dir's config.json `trained` (read
    from `config`, and checked as the flag would check it), else the flag's default.

    Raises:
        ValueError: config.json holds a value that the flag would refuse.
    """
    if FLAGS[name].present or name not in trained:
        return FLAGS[name].value
    value = trained[name]
    if value is None and FLAGS[name].default is None:
        return None
    try:
        return FLAGS[name].parser.parse(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config} holds {name}: {json.dumps(value)[:100]}, which --{name} "
                         f"refuses ({e}); give --{name} on the command line.") from None


def run():
    core.run_app(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
