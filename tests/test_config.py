"""The learning-rate schedules of `config.learning_rate`."""

import keras
import numpy as np
import pytest

from sparta_tf.config import LR_SCHEDULES, TrainConfig, learning_rate


def _values(schedule, steps):
    return np.array([float(keras.ops.convert_to_numpy(schedule(s))) for s in steps])


def test_onecycle_rises_in_a_line_then_falls_to_zero_along_a_cosine():
    assert "onecycle" in LR_SCHEDULES
    config = TrainConfig(lr=0.4, lr_schedule="onecycle", epochs=10)
    schedule = learning_rate(config, steps_per_epoch=10)  # 100 steps, 30 rising
    up = _values(schedule, [0, 15, 30])
    np.testing.assert_allclose(up, [0.0, 0.2, 0.4], atol=1e-6)
    down = _values(schedule, [30, 65, 100, 120])  # halfway down at 65; 0 from the end on
    np.testing.assert_allclose(down, [0.4, 0.2, 0.0, 0.0], atol=1e-6)
    middle = _values(schedule, range(30, 101))
    assert np.all(np.diff(middle) <= 1e-7)


@pytest.mark.parametrize("steps_per_epoch", [1, 3])
def test_onecycle_on_a_run_of_one_or_few_steps(steps_per_epoch):
    schedule = learning_rate(TrainConfig(lr=0.1, lr_schedule="onecycle", epochs=1),
                             steps_per_epoch)
    values = _values(schedule, range(steps_per_epoch + 1))
    assert np.all(np.isfinite(values)) and values.max() <= 0.1 + 1e-7


def test_an_unknown_schedule_is_refused_by_name():
    with pytest.raises(ValueError, match="'linear'"):
        learning_rate(TrainConfig(lr_schedule="linear"), 10)
