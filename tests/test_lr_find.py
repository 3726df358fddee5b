"""The learning-rate finder: its rates, smoothing, stopping rule and suggestion against NumPy references; the same
curve twice for a seed; and a model, an optimizer and the process left as they were found.
"""

import random

import h5py
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import small_config

from tfdogs import lr_find, models
from tfdogs.training import loop as training_loop, lr_find_run, lr_finder, phases as training_phases
from tfdogs.training.optimizer import make_optimizer


def test_the_rates_grow_exponentially_from_start_to_end():
    sweep = lr_finder.Sweep(1e-6, 1.0, 25)
    expected = np.geomspace(1e-6, 1.0, 25)
    np.testing.assert_allclose(sweep.rates(), expected, rtol=1e-12)
    schedule = lr_finder.ExponentialRate(1e-6, 1.0, 25)
    np.testing.assert_allclose([float(schedule(step)) for step in range(25)], expected, rtol=2e-6)
    with pytest.raises(ValueError, match="start rate < end rate"):
        lr_finder.Sweep(1.0, 1e-3, 10)


def test_smoothing_is_fastais_debiased_average():
    losses = np.random.default_rng(0).uniform(1, 3, 50)
    beta, steps = 0.98, np.arange(50)
    # closed form: sum_j (1 - beta) beta^(i - j) loss_j / (1 - beta^(i + 1))
    weights = np.where(steps[None, :] <= steps[:, None], (1 - beta) * beta ** (steps[:, None] - steps[None, :]), 0)
    np.testing.assert_allclose(lr_finder.smooth(losses), weights @ losses / (1 - beta ** (steps + 1)), rtol=1e-12)


def test_the_suggestion_is_the_steepest_descent_and_the_minimum():
    """A made-up curve in log(rate): flat, a tanh drop centred at 1e-3, a minimum at 1e-1, then a rise."""
    rates = np.geomspace(1e-6, 10, 120)
    x = np.log10(rates)
    curve = 2 - np.tanh(2 * (x + 3)) + 0.5 * np.maximum(x + 1, 0) ** 2
    suggestion = lr_finder.suggest(rates, curve)
    step = rates[1] / rates[0]
    assert 1e-3 / step <= suggestion.steepest <= 1e-3 * step
    assert 1e-1 / step ** 2 <= suggestion.minimum <= 1e-1 * step ** 2
    assert (suggestion.first_step, suggestion.last_step) == (12, 114)  # fastai's window: [n // 10, n - 5)


def tiny_lenet(seed=0, dropout=0.3):
    random.seed(seed)
    return models.build("lenet5", 4, input_shape=(32, 32, 3), dropout=dropout)


def batches(count, seed=0):
    generator = np.random.default_rng(seed)
    return [(generator.normal(size=(8, 32, 32, 3)).astype(np.float32),
             np.eye(4, dtype=np.float32)[generator.integers(0, 4, 8)]) for _ in range(count)]


def test_the_sweep_stops_where_the_smoothed_loss_first_exceeds_four_times_its_lowest():
    model = tiny_lenet()
    sweep = lr_finder.Sweep(1e-4, 100.0, 60)
    optimizer = make_optimizer("adam", lr_finder.ExponentialRate(1e-4, 100.0, 60), 0.9, {})
    result = lr_finder.sweep_rates(model, batches(60), optimizer, keras.losses.CategoricalCrossentropy(True), sweep)
    run = len(result.losses)
    assert run < 60 and result.stopped.startswith(f"stopped at step {run} of 60: the smoothed loss")
    assert np.isfinite(result.losses).all()  # stopped by the 4x rule, not by a non-finite loss
    np.testing.assert_allclose(result.rates, np.geomspace(1e-4, 100.0, 60)[:run], rtol=1e-12)
    smoothed = lr_finder.smooth(result.losses)
    over = [not np.isfinite(result.losses[i]) or smoothed[i] > 4 * smoothed[:i + 1].min() for i in range(run)]
    assert over[-1] and not any(over[:-1])


def sweep_config(tmp_path, name, **overrides):
    return small_config(output=str(tmp_path / name), **overrides)


def test_two_sweeps_with_one_seed_give_the_same_curve(tmp_path):
    """Whatever the process' random state before each: and each leaves that state as it found it."""
    sweep = lr_finder.Sweep(1e-5, 10.0, 30)
    keras.utils.set_random_seed(5)
    expected_draws = random_draws()
    keras.utils.set_random_seed(5)
    first = lr_find_run.find_learning_rate(sweep_config(tmp_path, "first", dropout=0.3), sweep, tmp_path / "first")
    assert random_draws() == expected_draws
    keras.utils.set_random_seed(1234)
    second = lr_find_run.find_learning_rate(sweep_config(tmp_path, "second", dropout=0.3), sweep, tmp_path / "second")
    text = (first.output / "lr_find.csv").read_text()
    assert text == (second.output / "lr_find.csv").read_text()
    table = pd.read_csv(first.output / "lr_find.csv")
    assert list(table.columns) == ["step", "rate", "loss", "smoothed_loss"] and len(table) == len(first.result.rates)
    np.testing.assert_allclose(table["smoothed_loss"], lr_finder.smooth(table["loss"]), rtol=1e-12)
    assert table["loss"].nunique() > 10  # a real curve, not a constant
    assert (first.output / "lr_find.png").stat().st_size > 10_000
    other_seed = lr_find_run.find_learning_rate(sweep_config(tmp_path, "seed1", dropout=0.3, seed=1), sweep,
                                                tmp_path / "seed1")
    assert (other_seed.output / "lr_find.csv").read_text() != text


def model_state(model):
    return ([variable.numpy().copy() for variable in model.variables],
            [(layer.trainable, vars(layer).get("call")) for layer in lr_finder.all_layers(model)])


def random_draws():
    return (random.random(), float(np.random.rand()), keras.random.uniform((2,)).numpy().tolist(),
            tf.random.uniform((2,)).numpy().tolist())


def test_a_sweep_leaves_the_model_its_optimizer_and_the_random_state_as_it_found_them():
    """ResNet-18 (BatchNorm, dropout) mid-training: after a head-phase sweep with frozen BatchNorm statistics,
    every variable, optimizer slot, layer setting and the next random draws are what they were."""
    keras.utils.set_random_seed(3)
    model = models.build("resnet18", 4, input_shape=(32, 32, 3), dropout=0.3)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.CategoricalCrossentropy(True))
    data = batches(3, seed=1)
    model.fit(data[0][0], data[0][1], epochs=1, verbose=0)
    training_phases.freeze_statistics(model.get_layer("layer1.0.bn1"), False)  # a per-instance call to keep
    before, optimizer_before = model_state(model), [v.numpy().copy() for v in model.optimizer.variables]
    keras.utils.set_random_seed(5)
    expected_draws = random_draws()
    keras.utils.set_random_seed(5)
    phase = training_phases.plan_phases(small_config(strategy="fine-tune", weights="x.h5", model="resnet18",
                                                     epochs=3, head_epochs=1))[0]
    config = small_config(model="resnet18", weights="x.h5", strategy="fine-tune", freeze_bn=True)
    result = lr_find_run.sweep_model(model, config, phase, batches(3, seed=2), lr_finder.Sweep(1e-3, 1.0, 3))
    assert len(result.losses) == 3 and len(set(result.losses)) == 3  # it trained
    after = model_state(model)
    for value, kept in zip(after[0], before[0]):
        np.testing.assert_array_equal(value, kept)
    assert after[1] == before[1]
    for value, kept in zip(model.optimizer.variables, optimizer_before):
        np.testing.assert_array_equal(value.numpy(), kept)
    assert random_draws() == expected_draws
    assert keras.mixed_precision.global_policy().name == "float32"


def train_results(run_dir):
    with h5py.File(run_dir / "best.weights.h5") as file:
        arrays = {}
        file.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset)
                        else None)
    return pd.read_csv(run_dir / "history.csv"), arrays


def test_training_after_a_sweep_in_the_same_process_equals_training_without_it(tmp_path):
    def config(name):
        return small_config(output=str(tmp_path / name), export_dir=str(tmp_path / f"{name}-export"), epochs=2,
                            dropout=0.3, precision="float32")

    history, weights = train_results(training_loop.train(config("alone")))
    lr_find_run.find_learning_rate(config("sweep"), lr_finder.Sweep(1e-5, 10.0, 20), tmp_path / "sweep")
    after_history, after_weights = train_results(training_loop.train(config("after")))
    pd.testing.assert_frame_equal(after_history, history, check_exact=True)
    assert after_weights.keys() == weights.keys()
    for name in weights:
        np.testing.assert_array_equal(after_weights[name], weights[name], err_msg=name)


def test_each_strategy_offers_its_own_phases():
    fine_tune = small_config(model="resnet18", weights="x.h5", strategy="fine-tune")
    assert lr_find_run.choose_phase(fine_tune)[1].name == "head"
    whole = lr_find_run.choose_phase(fine_tune, "whole")[1]
    assert whole.name == "all" and not whole.frozen_stages and set(whole.stage_factors.values()) == {0.1}
    assert lr_find_run.choose_phase(small_config())[0] == "whole"  # scratch
    with pytest.raises(lr_find_run.config_lib.ConfigError, match="feature-extract trains the head phase only"):
        lr_find_run.choose_phase({**fine_tune, "strategy": "feature-extract"}, "whole")
    with pytest.raises(lr_find_run.config_lib.ConfigError, match="head_epochs is 0"):
        lr_find_run.choose_phase({**fine_tune, "head_epochs": 0}, "head")


def test_the_command_prints_the_suggestion_and_writes_the_curve(tmp_path, capsys):
    status = lr_find.main(["--model", "lenet5", "--data", "synthetic", "--synthetic-classes", "4",
                           "--synthetic-images-per-class", "10", "--image-size", "32", "--batch-size", "8",
                           "--steps", "12", "--start-lr", "1e-4", "--end-lr", "1", "--output", str(tmp_path / "f")])
    printed = capsys.readouterr().out
    assert status == 0
    table = pd.read_csv(tmp_path / "f" / "lr_find.csv")
    suggestion = lr_finder.suggest(table["rate"], table["smoothed_loss"])
    assert f"Suggested learning rate {suggestion.steepest:.3g}: the steepest descent" in printed
    assert f"a tenth of the minimum's rate: {suggestion.minimum / 10:.3g}" in printed


@pytest.mark.slow
def test_the_whole_phase_starts_from_the_runs_head_weights(tmp_path, monkeypatch):
    """A fine-tune run's head phase, then `--from-run RUN --phase whole`: the sweep starts from
    phase-head.weights.h5 with every stage trained at the backbone factor, on the run's split."""
    checkpoint = tmp_path / "imagenet-like.weights.h5"
    keras.utils.set_random_seed(1)
    models.build("resnet18", 1000, input_shape=(32, 32, 3)).save_weights(checkpoint)
    run_dir = training_loop.train(small_config(
        model="resnet18", weights=str(checkpoint), strategy="fine-tune", epochs=2, head_epochs=1,
        output=str(tmp_path / "run"), export_dir=str(tmp_path / "export"), precision="float32"))
    seen = {}
    sweep_model = lr_find_run.sweep_model

    def recording(model, config, phase, *rest, **keywords):
        seen["weights"] = {variable.path: variable.numpy().copy() for variable in model.weights}
        seen["phase"] = phase
        return sweep_model(model, config, phase, *rest, **keywords)

    monkeypatch.setattr(lr_find_run, "sweep_model", recording)
    assert lr_find.main(["--from-run", str(run_dir), "--phase", "whole", "--steps", "6"]) == 0
    assert (run_dir / "lr_find-whole" / "split.csv").read_bytes() == (run_dir / "split.csv").read_bytes()
    reference = models.build("resnet18", 4, input_shape=(32, 32, 3))
    reference.load_weights(run_dir / "phase-head.weights.h5")
    for variable in reference.weights:
        np.testing.assert_array_equal(seen["weights"][variable.path], variable.numpy(), err_msg=variable.path)
    assert seen["phase"].name == "all" and set(seen["phase"].stage_factors.values()) == {0.1}
