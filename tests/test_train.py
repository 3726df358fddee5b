import json
import pathlib
import struct

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import (assert_scores_match, pil_eval_transform, reference_logits, reference_run_scores,
                      reference_scores, small_config)

from tfdogs import config as config_lib, models
from tfdogs.runs import folder as run_folder
from tfdogs.training import loop as training_loop, optimizer as training_optimizer, phases as training_phases


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize("model_name, overrides, min_accuracy", [
    ("lenet5", dict(epochs=6, image_size=32), 0.6),
    # ResNets: enough steps per epoch for the BatchNorm running statistics to settle
    pytest.param("resnet18", dict(epochs=4, image_size=64, learning_rate=1e-3, synthetic_images_per_class=30), 0.75,
                 marks=pytest.mark.slow),
    pytest.param("resnet34", dict(epochs=5, image_size=64, learning_rate=1e-3, synthetic_images_per_class=30), 0.75,
                 marks=pytest.mark.slow),
])
def test_each_model_learns_the_synthetic_breeds(tmp_path, model_name, overrides, min_accuracy):
    config = small_config(model=model_name, output=str(tmp_path / "run"),
                          export_dir=str(tmp_path / "export"), **overrides)
    run_dir = training_loop.train(config)
    summary = json.loads((run_dir / "metrics.json").read_text())
    chance = summary["baselines"]["random_guess"]["accuracy"]
    assert chance == pytest.approx(0.25)
    # a real learning check: far above chance and above always answering the biggest class
    assert summary["val"]["accuracy"] >= min_accuracy
    assert summary["val"]["accuracy"] > summary["baselines"]["most_frequent"]["accuracy"] + 0.25
    assert summary["val"]["log_loss"] < summary["baselines"]["random_guess"]["log_loss"]


def test_run_folder_holds_every_output_with_consistent_content(lenet_run):
    run_dir = lenet_run
    config = config_lib.load_yaml(run_dir / "config.yaml")
    assert config["epochs"] == 4 and config["output"] == str(run_dir)

    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2, 3]
    for column in ("loss", "accuracy", "top5_accuracy", "log_loss", "val_loss", "val_accuracy",
                   "val_top5_accuracy", "val_log_loss", "learning_rate"):
        assert column in history and history[column].notna().all(), column
    # cosine decay: the logged learning rate falls every epoch
    assert (np.diff(history["learning_rate"]) < 0).all()

    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["epochs_run"] == 4
    assert "imagenet_overlap" not in summary  # trained from scratch: no pretrained weights saw its photos
    assert summary["peak_val_accuracy"] == pytest.approx(history["val_accuracy"].max())
    # the Kaggle layout is scored by log loss, so the best epoch is the one with the lowest
    assert summary["monitor"] == "val_log_loss"
    best = int(history["val_log_loss"].idxmin())
    assert summary["best_epoch"] == best + 1
    # the saved model is the best epoch's: model.keras's raw scores on the validation photos, recomputed by the
    # Pillow/NumPy reference, are metrics.json's and that epoch's history row (measured 6.8e-9 apart in log loss)
    reference = reference_run_scores(run_dir)
    assert_scores_match(summary["val"], reference["val"], 1e-6, "metrics.json val")
    assert_scores_match(summary["val_calibrated"], reference["val_calibrated"], 1e-6, "metrics.json val_calibrated")
    assert history["val_accuracy"][best] == pytest.approx(reference["val"]["accuracy"], abs=1e-6)
    assert history["val_log_loss"][best] == pytest.approx(reference["val"]["log_loss"], abs=1e-6)
    saved = keras.saving.load_model(run_dir / "model.keras")
    assert summary["parameters"]["total"] == saved.count_params()
    assert saved.layers[-1].name == "temperature"  # calibrated by default

    split = pd.read_csv(run_dir / "split.csv")
    assert summary["num_train"] == (split["subset"] == "train").sum()
    assert summary["num_val"] == (split["subset"] == "val").sum()

    width, height = png_size(run_dir / "curves.png")
    assert width >= 600 and height >= 300 and (run_dir / "curves.png").stat().st_size > 10_000
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event files"
    assert (run_dir / "best.weights.h5").is_file()


def test_tensorboard_logs_loss_accuracy_and_learning_rate(lenet_run):
    import tensorflow as tf

    tags = set()
    for path in (lenet_run / "tensorboard").rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(value.tag for value in event.summary.value)
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= tags


def test_metrics_agree_with_the_saved_model(lenet_run):
    """model.keras, fed the validation photos through Pillow and NumPy alone, scores what metrics.json says."""
    records, _, val_indices = run_folder.load_run(lenet_run).split()
    model = keras.saving.load_model(lenet_run / "model.keras")
    summary = json.loads((lenet_run / "metrics.json").read_text())
    record = json.loads((lenet_run / "preprocessing.json").read_text())
    assert record == {"image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                      "crop_fraction": 0.875, "interpolation": "bilinear", "resize_rounding": "round"}
    paths, labels = [records.paths[i] for i in val_indices], records.labels[val_indices]
    # model.keras carries the fitted temperature: it scores as val_calibrated, and its logits times the temperature
    # as val. Decoded by Pillow, whose JPEG decoder differs from TensorFlow's by up to 5 levels: measured 9.6e-4
    # in val's log loss; with TensorFlow's decoded pixels and Pillow's resize, 6.8e-9.
    temperature = 1 / float(model.get_layer("temperature").scale)
    assert temperature == pytest.approx(summary["val_calibrated"]["temperature"], rel=1e-6)
    for decoder, tolerance in (("pillow", 2e-3), ("tensorflow", 1e-6)):
        logits = reference_logits(model, paths, record, decoder)
        assert_scores_match(summary["val_calibrated"], reference_scores(logits, labels), tolerance,
                            f"val_calibrated, {decoder} decoder")
        assert_scores_match(summary["val"], reference_scores(logits * temperature, labels), tolerance,
                            f"val, {decoder} decoder")


class InterruptAfter(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.interrupt_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.interrupt_epoch:
            raise KeyboardInterrupt


class EpochRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


def test_interrupted_run_resumes_from_last_finished_epoch(tmp_path):
    config = small_config(output=str(tmp_path / "run"), export_dir=str(tmp_path / "export"), epochs=4)
    with pytest.raises(KeyboardInterrupt):
        training_loop.train(config, extra_callbacks=[InterruptAfter(1)])
    assert not (tmp_path / "run" / "metrics.json").exists()
    recorder = EpochRecorder()
    run_dir = training_loop.train(config, extra_callbacks=[recorder])
    assert recorder.epochs == [2, 3]
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2, 3]
    # the schedule carried on from where it stopped instead of restarting at the peak
    assert (np.diff(history["learning_rate"]) < 0).all()


class PoisonWeights(keras.callbacks.Callback):
    """Makes the classifier's weights NaN in the second epoch, as a diverging run would."""

    def on_train_batch_begin(self, batch, logs=None):
        if self.epoch == 1 and batch == 1:
            kernel = self.model.get_layer("fc").kernel
            kernel.assign(np.full(kernel.shape, np.nan, "float32"))

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch


def test_non_finite_loss_stops_with_a_message_and_keeps_the_best_weights(tmp_path):
    config = small_config(output=str(tmp_path / "run"), export_dir=str(tmp_path / "export"), epochs=4)
    with pytest.raises(training_phases.TrainingError, match="non-finite at epoch 2, batch 1") as error:
        training_loop.train(config, extra_callbacks=[PoisonWeights()])
    assert "best.weights.h5" in str(error.value)
    kept = tmp_path / "run" / "best.weights.h5"
    fresh = models.build("lenet5", 4, input_shape=(32, 32, 3))
    fresh.load_weights(kept)
    assert all(np.isfinite(weight).all() for weight in fresh.get_weights())


def test_unwritable_output_is_rejected_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = small_config(output=str(blocker / "run"))
    with pytest.raises(config_lib.ConfigError, match="'output'"):
        training_loop.train(config)


@pytest.mark.parametrize("strategy, frozen_stages", [
    ("feature-extract", ("stem", "layer1", "layer2", "layer3", "layer4")),
    ("fine-tune", ()),
    ("discriminative", ()),
])
def test_plan_phases(strategy, frozen_stages):
    config = small_config(model="resnet18", weights="imagenet", strategy=strategy, epochs=5, head_epochs=2,
                          backbone_lr_factor=0.01)
    phases = training_phases.plan_phases(config)
    assert phases[-1].end_epoch == 5 and phases[-1].frozen_stages == frozen_stages
    if strategy == "fine-tune":
        assert phases[0].frozen_stages and phases[0].end_epoch == 2 and phases[1].start_epoch == 2
        assert phases[1].stage_factors["stem"] == pytest.approx(0.01)
    if strategy == "discriminative":
        factors = [phases[0].stage_factors[stage] for stage in training_phases.STAGES]
        assert factors[0] == pytest.approx(0.01) and factors[-1] == 1.0
        assert all(a < b for a, b in zip(factors, factors[1:]))


def test_schedule_warms_up_then_decays():
    schedule = training_optimizer.WarmupCosine(1.0, total_steps=100, warmup_steps=10)
    values = [float(schedule(step)) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:])) and values[-1] < 0.01
    later_phase = training_optimizer.WarmupCosine(1.0, total_steps=100, warmup_steps=10, offset_steps=50)
    assert float(later_phase(0)) == pytest.approx(values[50])


def test_real_photos_in_the_kaggle_layout_train_end_to_end(tmp_path, dogs10_dir):
    """The shared dog photos, laid out as Kaggle's labels.csv + train/<id>.jpg, learnt and served consistently.

    Catches labels paired with the wrong photos (the model could not then classify its own training photos),
    evaluation or serving preprocessing that differs from training's, and scores that are not the model's.
    """
    import shutil

    import tensorflow as tf

    data_dir = tmp_path / "dog-breed-identification"
    (data_dir / "train").mkdir(parents=True)
    rows, breed_of_photo, photos_per_breed = ["id,breed"], {}, {}
    for breed_dir in sorted(path for path in dogs10_dir.iterdir() if path.is_dir()):
        photos = sorted(breed_dir.glob("*.jpg"))
        photos_per_breed[breed_dir.name] = len(photos)
        for photo in photos:
            shutil.copy(photo, data_dir / "train" / photo.name)
            rows.append(f"{photo.stem},{breed_dir.name}")
            breed_of_photo[f"train/{photo.name}"] = breed_dir.name
    (data_dir / "labels.csv").write_text("\n".join(rows) + "\n")

    config = small_config(data=None, data_dir=str(data_dir), epochs=20, image_size=48,
                          output=str(tmp_path / "run"), export_dir=str(tmp_path / "export"))
    run_dir = training_loop.train(config)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["num_classes"] == 10 and summary["num_train"] + summary["num_val"] == len(rows) - 1
    assert summary["num_val"] == sum(round(0.2 * count) for count in photos_per_breed.values())  # 20 % of each
    assert summary["baselines"]["random_guess"]["accuracy"] == pytest.approx(0.1)
    assert len(pd.read_csv(run_dir / "problems.csv")) == 0  # real photos, all readable, no copies
    assert (pathlib.Path(summary["export"]) / "saved_model.pb").is_file()

    # every photo keeps the breed of the folder it came from
    split = pd.read_csv(run_dir / "split.csv")
    assert dict(zip(split["path"], split["breed"])) == breed_of_photo

    # the model, fed through the evaluation preprocessing, knows its own training photos: it learnt each photo's
    # breed through the training pipeline, which only shows if labels follow photos and the two pipelines agree
    run = run_folder.load_run(run_dir)
    paths = [str(data_dir / path) for path in split["path"]]
    # the Pillow/NumPy reference preprocessing on TensorFlow's decoded pixels (the export decodes with TensorFlow)
    images = np.stack([pil_eval_transform(path, run.preprocessing, "tensorflow") for path in paths]).astype(np.float32)
    labels, is_val = split["label"].to_numpy(), (split["subset"] == "val").to_numpy()
    final = keras.saving.load_model(run_dir / "model.keras")
    final.load_weights(run_dir / "phase-all.weights.h5")  # the last epoch's weights, fitted the longest
    final_accuracy = np.mean(final.predict(images[~is_val], verbose=0).argmax(axis=1) == labels[~is_val])
    # measured 0.61-0.71 over seeds 0-3; 0.24-0.32 with RGB swapped or normalisation left out at evaluation only,
    # about 0.14 with labels shuffled in the training pipeline; chance is 0.1
    assert final_accuracy >= 0.45, f"accuracy on its own training photos {final_accuracy:.3f}"
    model = keras.saving.load_model(run_dir / "model.keras")  # the best epoch's
    logits = model.predict(images, batch_size=64, verbose=0)
    probabilities = tf.nn.softmax(logits).numpy()
    assert np.mean(probabilities[~is_val].argmax(axis=1) == labels[~is_val]) >= 0.2
    assert summary["val"]["accuracy"] >= 0.15  # above chance on photos it never saw (measured 0.24-0.34)

    # metrics.json holds this (calibrated) model's scores on the validation photos of split.csv
    calibrated = {key: summary["val_calibrated"][key] for key in ("accuracy", "top5_accuracy", "log_loss")}
    assert_scores_match(calibrated, reference_scores(logits[is_val], labels[is_val]), 1e-5, "val_calibrated")

    # the export answers as the model does, from the photos' bytes
    served = tf.saved_model.load(summary["export"]).signatures["serving_default"](
        image_bytes=tf.constant([open(path, "rb").read() for path in np.array(paths)[is_val]]))
    np.testing.assert_allclose(served["probabilities"].numpy(), probabilities[is_val], atol=1e-5)


def test_label_smoothing_reaches_the_training_loss():
    """On a fixed batch, smoothing 0.4 moves the compiled loss to 0.6 CE + 0.4 mean(-log p), by hand."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(5)])
    images = np.asarray(keras.random.normal((16, 5)))
    labels = np.eye(5, dtype="float32")[np.arange(16) % 5]  # the run's pipelines give one-hot labels
    losses = {}
    for smoothing in (0.0, 0.4):
        config = small_config(label_smoothing=smoothing)
        training_optimizer.compile_model(model, config, 1e-3, {}, jit_compile=False)
        losses[smoothing] = model.evaluate(images, labels, verbose=0, return_dict=True)
    log_probabilities = np.asarray(keras.ops.log_softmax(model.predict(images, verbose=0)))
    cross_entropy = -(labels * log_probabilities).sum(axis=1).mean()
    uniform = -log_probabilities.mean(axis=1).mean()
    assert losses[0.0]["loss"] == pytest.approx(cross_entropy, rel=1e-5)
    assert losses[0.0]["log_loss"] == pytest.approx(cross_entropy, rel=1e-5)
    assert losses[0.4]["loss"] == pytest.approx(0.6 * cross_entropy + 0.4 * uniform, rel=1e-5)
    assert losses[0.4]["log_loss"] == pytest.approx(cross_entropy, rel=1e-5)  # the metric stays unsmoothed


def test_label_smoothing_changes_the_logged_training_loss_of_a_run(tmp_path):
    def run(smoothing):
        config = small_config(label_smoothing=smoothing, epochs=1, output=str(tmp_path / f"run-{smoothing}"),
                              export_dir=str(tmp_path / f"export-{smoothing}"), precision="float32")
        return pd.read_csv(training_loop.train(config) / "history.csv").iloc[0]

    plain, smoothed = run(0.0), run(0.3)
    assert plain["loss"] == pytest.approx(plain["log_loss"], rel=1e-5)  # without smoothing: the log loss itself
    assert smoothed["loss"] > smoothed["log_loss"] + 0.01


@pytest.mark.slow
def test_the_last_epochs_train_at_the_finetune_size_and_the_export_takes_it(tmp_path):
    config = small_config(model="resnet18", image_size=32, finetune_image_size=48, finetune_epochs=1, epochs=3,
                          output=str(tmp_path / "run"), export_dir=str(tmp_path / "export"), precision="float32")
    seen_sizes = []

    class InputSize(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen_sizes.append(self.model.input_shape[1])

    run_dir = training_loop.train(config, extra_callbacks=[InputSize()])
    assert seen_sizes == [32, 32, 48]
    assert json.loads((run_dir / "phases.json").read_text()).keys() == {"all", "large"}
    assert run_folder.load_run(run_dir).preprocessing.image_size == 48
    assert keras.saving.load_model(run_dir / "model.keras").input_shape == (None, 48, 48, 3)
    summary = json.loads((run_dir / "metrics.json").read_text())
    import tensorflow as tf
    served = tf.saved_model.load(summary["export"]).signatures["serving_images"](
        images=tf.random.uniform([2, 60, 80, 3], 0, 255))["probabilities"]
    assert served.shape == (2, 4)
    with pytest.raises(config_lib.ConfigError, match="finetune_image_size"):
        small_config(finetune_image_size=48)  # LeNet-5's classifier has one input size
    with pytest.raises(config_lib.ConfigError, match="finetune_epochs"):
        small_config(model="resnet18", strategy="scratch", finetune_image_size=48, finetune_epochs=3, epochs=3)
