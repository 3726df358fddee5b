"""`--schedule one-cycle`: fastai's one-cycle policy, against an independent NumPy formula, and its resume.

The reference below transcribes fastai's `fit_one_cycle` (fastai/callback/schedule.py): `combined_cos(pct_start,
lr_max / div, lr_max, lr_max / div_final)` for the rate and `combined_cos(pct_start, 0.95, 0.85, 0.95)` for the
momentum, where `SchedCos(start, end)(pos) = start + (1 + cos(pi * (1 - pos))) * (end - start) / 2`,
`combine_scheds` picks the last part whose cumulative start <= pos (pos 1 is the last part's end), and a batch's
position is its 0-based step over the run's steps.
"""

import math

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import small_config
from test_resume import Killed, KillAfterEpoch, assert_same_file_arrays

from tfdogs.training import loop as training_loop, optimizer as training_optimizer


def fastai_cos(start, end, position):
    return start + (1 + math.cos(math.pi * (1 - position))) * (end - start) / 2


def fastai_combined_cos(share, start, middle, end, position):
    """fastai's combine_scheds([share, 1 - share], [SchedCos(start, middle), SchedCos(middle, end)])(position)."""
    if int(position) == 1:
        return fastai_cos(middle, end, 1.0)
    edges = np.cumsum([0.0, share, 1 - share])
    part = int(np.nonzero(position >= edges)[0].max())
    local = (position - edges[part]) / (edges[part + 1] - edges[part])
    return fastai_cos(*((start, middle), (middle, end))[part], local)


def fastai_one_cycle(peak, total_steps, share, div=25.0, div_final=1e5, moms=(0.95, 0.85, 0.95)):
    """(rates, momenta) of each step of a fastai fit_one_cycle run of `total_steps` batches."""
    positions = [step / total_steps for step in range(total_steps)]
    rates = [fastai_combined_cos(share, peak / div, peak, peak / div_final, position) for position in positions]
    momenta = [fastai_combined_cos(share, *moms, position) for position in positions]
    return np.array(rates), np.array(momenta)


@pytest.mark.parametrize("total_steps, warmup_steps", [(100, 25), (40, 12), (7, 2)])
def test_rates_and_momenta_follow_fastai_one_cycle(total_steps, warmup_steps):
    schedule = training_optimizer.OneCycle(3e-3, total_steps, warmup_steps)
    rates, momenta = fastai_one_cycle(3e-3, total_steps, warmup_steps / total_steps)
    steps = np.arange(total_steps)
    # float32 arithmetic: 1e-5 relative, and 1e-7 of the peak where the rate nears peak / 1e5
    np.testing.assert_allclose([float(schedule(step)) for step in steps], rates, rtol=1e-5, atol=3e-10)
    np.testing.assert_allclose([float(schedule.momentum(step)) for step in steps], momenta, rtol=1e-6)
    later_phase = training_optimizer.OneCycle(3e-3, total_steps, warmup_steps, offset_steps=3)
    np.testing.assert_allclose([float(later_phase(step)) for step in steps[:-3]], rates[3:], rtol=1e-5, atol=3e-10)


def test_the_rise_lasts_warmup_epochs_or_a_quarter_of_the_run():
    config = small_config(schedule="one-cycle", epochs=8)
    quarter = training_optimizer.make_schedule(config, 1.0, steps_per_epoch=5, start_epoch=2)
    assert (quarter.total_steps, quarter.warmup_steps, quarter.offset_steps) == (40, 10, 10)
    given = training_optimizer.make_schedule({**config, "warmup_epochs": 3}, 1.0, steps_per_epoch=5, start_epoch=0)
    assert given.warmup_steps == 15
    assert isinstance(training_optimizer.make_schedule(small_config(), 1.0, 5, 0), training_optimizer.WarmupCosine)


def numpy_adam(gradients, rates, betas_1, beta_2=0.999, epsilon=1e-7):
    """Keras' Adam step (bias corrections with the step's beta_1 to the power of the step) in float64."""
    weights, first, second, path = np.ones(3), np.zeros(3), np.zeros(3), []
    for step, (gradient, rate, beta_1) in enumerate(zip(gradients, rates, betas_1), 1):
        alpha = rate * math.sqrt(1 - beta_2 ** step) / (1 - beta_1 ** step)
        first += (gradient - first) * (1 - beta_1)
        second += (gradient ** 2 - second) * (1 - beta_2)
        weights = weights - first * alpha / (np.sqrt(second) + epsilon)
        path.append(weights.copy())
    return np.array(path)


def numpy_sgd(gradients, rates, momenta):
    weights, velocity, path = np.ones(3), np.zeros(3), []
    for gradient, rate, momentum in zip(gradients, rates, momenta):
        velocity = velocity * momentum - gradient * rate
        weights = weights + velocity
        path.append(weights.copy())
    return np.array(path)


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_the_optimizer_steps_with_the_cycled_momentum(name):
    total, warmup = 8, 3
    gradients = np.random.default_rng(0).normal(size=(total, 3))
    rates, momenta = fastai_one_cycle(0.1, total, warmup / total)
    variable = keras.Variable(np.ones(3, np.float32), name="w")
    optimizer = training_optimizer.make_optimizer(name, training_optimizer.OneCycle(0.1, total, warmup), 0.0,
                                                  {variable.path: 1.0})
    optimizer.build([variable])
    apply = tf.function(lambda gradient: optimizer.apply_gradients([(gradient, variable)]))
    path = []
    for gradient in gradients:
        apply(tf.constant(gradient, tf.float32))
        path.append(variable.numpy())
    reference = numpy_adam(gradients, rates, momenta) if name == "adam" else numpy_sgd(gradients, rates, momenta)
    np.testing.assert_allclose(path, reference, rtol=1e-5, atol=1e-6)
    assert (optimizer.beta_1 if name == "adam" else optimizer.momentum) in (0.9, 0.95)  # the constant is back


def test_a_one_cycle_run_killed_after_an_epoch_resumes_to_the_uninterrupted_run(tmp_path):
    """Scratch LeNet-5 at the default patience, one-cycle over 3 epochs: killed after epoch 2, resumed, equal.

    The history's rates are the reference's at each epoch's first step: the loop runs one-cycle.
    """
    def config(name):
        return small_config(output=str(tmp_path / name), export_dir=str(tmp_path / f"{name}-export"), epochs=3,
                            schedule="one-cycle", early_stopping_patience=5, precision="float32")

    reference = training_loop.train(config("reference"))
    with pytest.raises(Killed):
        training_loop.train(config("resumed"), extra_callbacks=[KillAfterEpoch(1)])
    resumed = training_loop.train(config("resumed"))

    history = pd.read_csv(reference / "history.csv")
    pd.testing.assert_frame_equal(pd.read_csv(resumed / "history.csv"), history, check_exact=True)
    assert_same_file_arrays(resumed / "best.weights.h5", reference / "best.weights.h5")
    assert_same_file_arrays(resumed / "phase-all.weights.h5", reference / "phase-all.weights.h5")
    steps = 64 // 16  # 80 photos, a fifth held out, batches of 16
    rates, _ = fastai_one_cycle(3e-3, 3 * steps, round(0.25 * 3 * steps) / (3 * steps))
    np.testing.assert_allclose(history["learning_rate"], rates[::steps], rtol=1e-5)
