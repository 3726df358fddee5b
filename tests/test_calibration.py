"""Calibrated probabilities, the weight average and what the best checkpoint follows."""

import json

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import assert_scores_match, reference_logits, reference_run_scores, reference_scores, small_config

from tfdogs import data, models
from tfdogs.evaluation import metrics
from tfdogs.runs import folder as run_folder
from tfdogs.training import callbacks as training_callbacks, loop as training_loop, resume as training_resume


def overconfident(seed=0, count=4000, classes=10, scale=4.0):
    """Logits `scale` times too sharp: labels drawn from softmax(z), the model says softmax(scale * z)."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 1.5, (count, classes))
    probabilities = metrics.softmax(true_logits)
    labels = np.array([rng.choice(classes, p=row) for row in probabilities])
    return scale * true_logits, labels


def test_the_fitted_temperature_undoes_overconfidence_and_keeps_the_answers():
    logits, labels = overconfident(scale=4.0)
    temperature = metrics.fit_temperature(logits, labels)
    assert temperature == pytest.approx(4.0, rel=0.1)
    # the search finds the minimum: no temperature on a fine grid does better
    grid = np.exp(np.linspace(np.log(0.5), np.log(20), 2000))
    best_on_grid = min(metrics.log_loss(metrics.softmax(logits, t), labels) for t in grid)
    calibrated = metrics.calibrated_scores(logits, labels, temperature)
    assert calibrated["log_loss"] <= best_on_grid + 1e-6
    raw = metrics.scores(metrics.softmax(logits), labels)
    assert calibrated["log_loss"] < raw["log_loss"] - 0.3
    assert calibrated["accuracy"] == raw["accuracy"]  # one temperature never changes the top class
    assert calibrated["ece"] < 0.5 * metrics.reliability(metrics.softmax(logits), labels)[1]


def test_reliability_bins_count_confidence_and_accuracy():
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    labels = np.array([0, 1, 0, 0])
    table, ece = metrics.reliability(probabilities, labels, bins=10)
    assert table["share"][9] == 0.5 and table["accuracy"][9] == 0.5 and table["confidence"][9] == 0.95
    assert table["share"][5] == 0.5 and table["accuracy"][5] == 0.5
    assert ece == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)


@pytest.fixture(scope="module")
def averaged_run(tmp_path_factory):
    """LeNet-5 with a weight average, calibrated: one epoch, so the best epoch is the last."""
    base = tmp_path_factory.mktemp("averaged")
    config = small_config(output=str(base / "run"), export_dir=str(base / "export"), epochs=1, ema=0.5,
                          label_smoothing=0.1, precision="float32")
    return training_loop.train(config)


def raw_model(run_dir, weights_file):
    model = models.build("lenet5", 4, input_shape=(32, 32, 3))
    model.load_weights(run_dir / weights_file)
    return model


def backed_up_model(run_dir):
    """The resume backup's weights: its first arrays, in the order of `model.weights` (the optimizer's follow)."""
    model = models.build("lenet5", 4, input_shape=(32, 32, 3))
    with np.load(run_dir / "backup/all/latest.state.npz") as saved:
        model.set_weights([saved[f"{index:04d}"] for index in range(len(model.weights))])
    return model


def test_the_best_checkpoint_and_model_keras_hold_the_averaged_weights(averaged_run):
    history = pd.read_csv(averaged_run / "history.csv")
    summary = json.loads((averaged_run / "metrics.json").read_text())
    averaged = raw_model(averaged_run, "best.weights.h5")
    # the resume backup of the same (last) epoch holds the raw weights
    last_raw = backed_up_model(averaged_run)
    assert summary["best_epoch"] == len(history) == 1
    assert any(not np.allclose(mine, raw) for mine, raw in zip(averaged.get_weights(), last_raw.get_weights()))
    saved = keras.saving.load_model(averaged_run / "model.keras")
    for layer in averaged.layers:
        for mine, theirs in zip(layer.get_weights(), saved.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(mine, theirs)
    # and validation saw the average: the saved (averaged) weights, fed the validation photos through the
    # Pillow/NumPy reference, score what metrics.json and the best epoch's history row report (float32;
    # measured 6.6e-9 apart in log loss); the raw weights would be caught
    reference = reference_run_scores(averaged_run)
    best_row = history.loc[summary["best_epoch"] - 1]
    assert_scores_match(summary["val"], reference["val"], 1e-6, "metrics.json val")
    assert best_row["val_log_loss"] == pytest.approx(reference["val"]["log_loss"], abs=1e-6)
    records, _, val_indices = run_folder.load_run(averaged_run).split()
    record = json.loads((averaged_run / "preprocessing.json").read_text())
    raw = reference_scores(reference_logits(backed_up_model(averaged_run),
                                            [records.paths[i] for i in val_indices], record, "tensorflow"),
                           records.labels[val_indices])
    assert abs(raw["log_loss"] - summary["val"]["log_loss"]) > 1e-3, (raw, summary["val"])


def test_model_keras_and_the_export_serve_softmax_of_logits_over_the_temperature(averaged_run):
    summary = json.loads((averaged_run / "metrics.json").read_text())
    temperature = summary["val_calibrated"]["temperature"]
    assert temperature != pytest.approx(1.0, abs=1e-3)
    assert summary["val_calibrated"]["log_loss"] <= summary["val"]["log_loss"] + 1e-9
    assert summary["val_calibrated"]["accuracy"] == summary["val"]["accuracy"]
    assert (averaged_run / "calibration.png").stat().st_size > 10_000
    run = run_folder.load_run(averaged_run)
    records, _, val_indices = run.split()
    paths = [records.paths[i] for i in val_indices][:6]
    images = np.stack([data.preprocess_eval(data.decode_image(tf.io.read_file(path)),
                                                     **run.preprocessing.as_dict()) for path in paths])
    expected = metrics.softmax(raw_model(averaged_run, "best.weights.h5").predict(images, verbose=0), temperature)
    served = tf.saved_model.load(summary["export"]).signatures["serving_default"](
        image_bytes=tf.constant([open(path, "rb").read() for path in paths]))["probabilities"].numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_no_calibrate_serves_the_raw_probabilities(tmp_path):
    run_dir = training_loop.train(small_config(output=str(tmp_path / "run"), export_dir=str(tmp_path / "export"),
                                       epochs=1, calibrate=False))
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert "val_calibrated" not in summary and not (run_dir / "calibration.png").exists()
    assert "temperature" not in [layer.name for layer in keras.saving.load_model(run_dir / "model.keras").layers]


@pytest.mark.parametrize("layout, monitor", [("kaggle", "val_log_loss"), ("folders", "val_accuracy")])
def test_the_monitor_follows_the_layout_by_default(layout, monitor):
    assert training_callbacks.resolve_monitor({"monitor": "auto"}, layout) == monitor
    assert training_callbacks.resolve_monitor({"monitor": "val_accuracy"}, "kaggle") == "val_accuracy"


def test_the_best_checkpoint_follows_the_monitored_log_loss(lenet_run):
    """The synthetic data is in the Kaggle layout: the best epoch is the lowest validation log loss."""
    history = pd.read_csv(lenet_run / "history.csv")
    summary = json.loads((lenet_run / "metrics.json").read_text())
    assert summary["monitor"] == "val_log_loss"
    assert summary["best_epoch"] == int(history["val_log_loss"].idxmin()) + 1
    best, epoch = training_resume.best_so_far(history, "val_log_loss")
    assert best == history["val_log_loss"].min() and epoch == summary["best_epoch"] - 1
