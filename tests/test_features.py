"""Cached backbone features (`--feature-views N`): the head trained on them is the head trained on the photos."""

import json

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import assert_scores_match, pil_eval_transform, reference_run_scores, small_config

from tfdogs import models
from tfdogs.evaluation import metrics
from tfdogs.runs import folder as run_folder
from tfdogs.training import devices, features, loop as training_loop, phases

SIZE = 32


def frozen_resnet(dropout=0.0):
    keras.utils.set_random_seed(3)
    model = models.build("resnet18", 4, input_shape=(SIZE, SIZE, 3), dropout=dropout)
    factors = phases.configure_phase(model, phases.Phase("head", 0, 2, frozen_stages=phases.STAGES[:-1]), False)
    return model, factors


def fit_two_epochs(model, factors, inputs, labels, seed):
    from tfdogs.training.callbacks import EpochKeyedSeeds
    from tfdogs.training.optimizer import compile_model

    config = small_config(optimizer="adam", label_smoothing=0.0)
    compile_model(model, config, 1e-2, factors, jit_compile=False)
    dataset = tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(8)
    model.fit(dataset, epochs=2, shuffle=False, verbose=0, callbacks=[EpochKeyedSeeds(seed)])
    return model.get_layer("fc").get_weights()


def assert_dog_gate_is_numpy_on_the_model(run_dir, atol):
    """not_a_dog.npz against NumPy on model.keras's pooled features of the Pillow reference crops.

    The breed means are each breed's mean training feature made unit length; the threshold is the
    lowest validation cosine to the nearest mean (under 100 photos, keeping 99 % keeps them all).
    """
    run = run_folder.load_run(run_dir)
    records, train_indices, val_indices = run.split()
    model = keras.saving.load_model(run_dir / "model.keras")
    backbone = keras.Model(model.inputs, model.get_layer("avgpool").output)
    record = json.loads((run_dir / "preprocessing.json").read_text())

    def pooled(indices):
        pixels = np.stack([pil_eval_transform(records.paths[i], record, "tensorflow") for i in indices])
        return np.asarray(backbone(pixels.astype(np.float32), training=False), np.float64)

    train, labels = pooled(train_indices), records.labels[train_indices]
    means = np.stack([train[labels == breed].mean(axis=0) for breed in range(len(records.class_names))])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    val = pooled(val_indices)
    threshold = ((val / np.linalg.norm(val, axis=1, keepdims=True)) @ means.T).max(axis=1).min()
    with np.load(run_dir / "not_a_dog.npz") as gate:
        np.testing.assert_allclose(gate["breed_means"], means, atol=atol)
        assert float(gate["threshold"]) == pytest.approx(threshold, abs=atol)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_head_on_cached_features_equals_the_head_trained_on_the_photos(dropout):
    """N = 1, float32, one fixed order: the same fc weights to 1e-5, dropout masks included."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((32, SIZE, SIZE, 3)).astype(np.float32)
    labels = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 32)]

    model, factors = frozen_resnet(dropout)
    fc_before = [weight.copy() for weight in model.get_layer("fc").get_weights()]
    expected = fit_two_epochs(model, factors, images, labels, seed=7)

    model, factors = frozen_resnet(dropout)
    backbone, head = features.split_at_features(model)
    cached, _ = features.features_of(backbone, tf.data.Dataset.from_tensor_slices((images, labels)).batch(8))
    assert cached.shape == (32, 512)
    got = fit_two_epochs(head, {v.path: 1.0 for v in head.trainable_weights}, cached, labels, seed=7)

    assert np.abs(expected[0] - fc_before[0]).max() > 1e-3  # the head did train
    for want, have in zip(expected, got):
        np.testing.assert_allclose(have, want, atol=1e-5)
    # the head trains the model's own layers: the full model holds the trained fc
    for want, have in zip(got, model.get_layer("fc").get_weights()):
        np.testing.assert_array_equal(have, want)


def test_the_feature_pass_is_traced_once_for_every_batch_size():
    backbone, _ = features.split_at_features(models.build("resnet18", 3, input_shape=(32, 32, 3)))
    forward = features.compiled(backbone)
    batches = [np.zeros((count, 32, 32, 3), np.float32) for count in (4, 3, 1)]  # full, then smaller last batches
    pooled, _ = features.features_of(forward, [(batch, np.zeros((len(batch), 3))) for batch in batches])
    assert pooled.shape == (8, 512)
    assert forward.experimental_get_tracing_count() == 1


def test_each_pipeline_of_the_feature_pass_starts_while_the_one_before_runs():
    backbone, _ = features.split_at_features(models.build("resnet18", 3, input_shape=(32, 32, 3)))
    forward = features.compiled(backbone)
    events = []

    class Split:
        """Batches of one split that record when their pipeline starts and when each batch is taken."""

        def __init__(self, name, batches):
            self.name, self.batches = name, batches

        def __iter__(self):  # like iter() of a tf.data pipeline, which starts loading at once
            events.append(f"{self.name} starts")
            return self.taken()

        def taken(self):
            for index, batch in enumerate(self.batches):
                events.append(f"{self.name} batch {index}")
                yield batch, np.zeros((len(batch), 3))

    rng = np.random.default_rng(0)
    splits = {name: [rng.standard_normal((count, 32, 32, 3)).astype(np.float32) for count in counts]
              for name, counts in (("train", (4, 2)), ("val", (3,)), ("more", (1,)))}
    results = features.features_of_each(forward, [Split(name, batches) for name, batches in splits.items()])
    assert events == ["train starts", "val starts", "train batch 0", "train batch 1", "more starts",
                      "val batch 0", "more batch 0"]
    for (pooled, labels), batches in zip(results, splits.values()):
        np.testing.assert_allclose(pooled, forward(np.concatenate(batches)).numpy(), atol=1e-5)
        assert labels.shape == (len(pooled), 3)


def test_cache_epochs_are_keyed_by_seed_and_epoch_and_cycle_the_views():
    views = [(np.full((10, 3), view, np.float32), np.eye(2, dtype=np.float32)[np.arange(10) % 2]) for view in range(3)]
    cache = features.FeatureCache(views, (np.zeros((4, 3), np.float32), np.zeros((4, 2), np.float32)), seed=5)
    epochs = [[batch[0].numpy() for batch in cache.train_epochs(epoch, 1, 4, 2)] for epoch in range(4)]
    assert [int(epoch[0][0, 0]) for epoch in epochs] == [0, 1, 2, 0]  # view e mod 3
    assert all(len(epoch) == 2 and epoch[0].shape == (4, 3) for epoch in epochs)
    resumed = [batch[0].numpy() for batch in cache.train_epochs(2, 2, 4, 2)]
    np.testing.assert_array_equal(np.concatenate(resumed), np.concatenate(epochs[2] + epochs[3]))
    labels = [np.concatenate([b[1].numpy() for b in cache.train_epochs(e, 1, 4, 2)]) for e in (0, 3)]
    assert not np.array_equal(labels[0], labels[1])  # each epoch its own order (same view 0)


@pytest.mark.parametrize("views, precision", [(1, "float32"), (2, "mixed_bfloat16")])
def test_a_feature_extract_run_on_cached_features_trains_and_serves_its_head(tmp_path, capsys, views, precision):
    """The final scores are the best epoch's validation pass on the cached features: in float32, model.keras's."""
    checkpoint = tmp_path / "resnet18-random.weights.h5"
    models.build("resnet18", 1000, input_shape=(32, 32, 3)).save_weights(checkpoint)
    config = small_config(model="resnet18", weights=str(checkpoint), strategy="feature-extract", epochs=3,
                          image_size=32, feature_views=views, precision=precision, output=str(tmp_path / "run"),
                          export_dir=str(tmp_path / "export"))
    run_dir = training_loop.train(config)
    out = capsys.readouterr().out
    assert f"Cached backbone features: {views} view" in out and "augmentation" in out
    summary = json.loads((run_dir / "metrics.json").read_text())
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2] and summary["epochs_run"] == 3
    columns = ["loss", "accuracy", "top5_accuracy", "log_loss", "val_loss", "val_accuracy", "val_top5_accuracy",
               "val_log_loss", "learning_rate"]
    assert set(columns) <= set(history.columns), sorted(history.columns)
    assert np.isfinite(history[columns].to_numpy(np.float64)).all(), history
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    # no label smoothing: the training loss is the log loss (mean cross-entropy), and so is val_loss
    np.testing.assert_allclose(history["loss"], history["log_loss"], rtol=1e-5)
    np.testing.assert_allclose(history["val_loss"], history["val_log_loss"], rtol=1e-5)
    best = summary["best_epoch"] - 1  # by the monitored score (log loss on this Kaggle layout)
    assert best == int(history["val_log_loss"].idxmin())
    assert summary["val_scored_by"] == f"the best epoch's validation pass ({summary['precision']})"
    # The head's validation pass on cached features (history and metrics.json) against the saved full model
    # fed the photos through the Pillow/NumPy reference: in float32 measured at most 1.2e-7 in log loss; to
    # bfloat16's rounding after a mixed-precision run.
    reference = reference_run_scores(run_dir)
    tolerance = 1e-6 if summary["precision"] == "float32" else 2e-2
    assert_scores_match(summary["val"], reference["val"], tolerance, f"metrics.json val ({summary['precision']})")
    assert history["val_log_loss"].iloc[best] == pytest.approx(reference["val"]["log_loss"], abs=tolerance)
    assert history["val_accuracy"].iloc[best] == pytest.approx(reference["val"]["accuracy"], abs=1e-9)
    assert summary["parameters"]["trainable"] == 512 * 4 + 4  # only the head trained
    assert set(summary["seconds"]) >= {"start_up", "data", "features", "phases", "final_evaluation", "export",
                                       "total"}
    assert summary["seconds"]["features"] > 0
    assert not (run_dir / features.CACHE_FOLDER).exists()  # removed with the finished phase
    # and the calibrated scores are what model.keras (with its temperature) serves on the photos
    run = run_folder.load_run(run_dir)
    records, _, val_indices = run.split()
    probabilities = run_folder.predict_paths(run.load_model(), [records.paths[i] for i in val_indices],
                                             run.preprocessing)
    served = metrics.scores(probabilities, records.labels[val_indices])
    assert summary["val_calibrated"]["log_loss"] == pytest.approx(served["log_loss"], abs=tolerance)
    assert_scores_match(served, reference["val_calibrated"], tolerance, "model.keras on the photos")
    # the "not a dog" gate, from the cached crops where they are the evaluation crops: model.keras's own,
    # computed in the run's precision (bfloat16 rounds the features and so the means and the threshold)
    assert json.loads((run_dir / "not_a_dog.json").read_text())["precision"] == summary["precision"] == precision
    assert_dog_gate_is_numpy_on_the_model(run_dir, 1e-5 if precision == "float32" else 1e-2)


def test_where_the_cpu_computes_bfloat16_a_float32_run_s_frozen_backbone_runs_in_bfloat16(tmp_path, monkeypatch):
    """EfficientNet-Lite trains in float32 under `--precision auto`; on a CPU with native bfloat16 its frozen
    backbone still runs in bfloat16 (`frozen_precision`), so the head's validation scores are model.keras's
    on the photos to bfloat16's rounding, not to float32's."""
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: True)
    checkpoint = tmp_path / "lite0-random.weights.h5"
    keras.utils.set_random_seed(5)
    models.build("efficientnet_lite0", 1000, input_shape=(SIZE, SIZE, 3)).save_weights(checkpoint)
    config = small_config(model="efficientnet_lite0", weights=str(checkpoint), strategy="feature-extract", epochs=2,
                          image_size=SIZE, precision="auto", output=str(tmp_path / "run"),
                          export_dir=str(tmp_path / "export"))
    folded = []  # the frozen backbone is folded once: its epochs and then the "not a dog" check run it
    fold = features.fold_batch_norms
    monkeypatch.setattr(features, "fold_batch_norms", lambda *args: folded.append(args) or fold(*args))
    run_dir = training_loop.train(config)
    assert len(folded) == 1
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert (summary["precision"], summary["frozen_precision"]) == ("float32", "mixed_bfloat16")
    assert summary["val_scored_by"] == "the best epoch's validation pass (mixed_bfloat16)"
    assert json.loads((run_dir / "not_a_dog.json").read_text())["precision"] == "mixed_bfloat16"
    reported, reference = summary["val"]["log_loss"], reference_run_scores(run_dir)["val"]["log_loss"]
    assert 1e-6 < abs(reported - reference) < 2e-2, (reported, reference)  # bfloat16 features, not float32's
    assert_dog_gate_is_numpy_on_the_model(run_dir, 1e-2)


@pytest.mark.parametrize("strategy", ["feature-extract", pytest.param("fine-tune", marks=pytest.mark.slow)])
def test_the_frozen_backbone_run_as_inference_trains_the_head_the_whole_model_trains(tmp_path, strategy):
    """float32, the default augmentation: the head of each frozen epoch (and all that follows) to 1e-5.

    `--no-frozen-inference` is the whole model in every training step, with its backbone frozen; the
    default runs the backbone (BatchNorm folded) apart on each batch's crops and trains the head on its
    pooled features. The same crops, order and dropout masks: the same training.
    """
    checkpoint = tmp_path / "resnet18-random.weights.h5"
    keras.utils.set_random_seed(11)
    models.build("resnet18", 1000, input_shape=(32, 32, 3)).save_weights(checkpoint)
    runs = {}
    for inference in (True, False):
        name = "inference" if inference else "whole"
        config = small_config(model="resnet18", weights=str(checkpoint), strategy=strategy, epochs=3,
                              head_epochs=2, image_size=32, dropout=0.3, rotation=0.1, zoom=0.1,
                              precision="float32", frozen_inference=inference, output=str(tmp_path / name),
                              export_dir=str(tmp_path / f"export-{name}"))
        runs[name] = training_loop.train(config)
    histories = {name: pd.read_csv(run_dir / "history.csv") for name, run_dir in runs.items()}
    assert histories["whole"]["loss"].iloc[1] < histories["whole"]["loss"].iloc[0]  # the head did train
    for column in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(histories["inference"][column], histories["whole"][column], atol=1e-5,
                                   err_msg=column)
    head = {name: keras.saving.load_model(run_dir / "model.keras").get_layer("fc").get_weights()
            for name, run_dir in runs.items()}
    for have, want in zip(head["inference"], head["whole"]):
        np.testing.assert_allclose(have, want, atol=1e-5)
    # the zero-shot baseline came from the frozen pass's validation features, and equals a network run of its own
    summaries = {name: json.loads((run_dir / "metrics.json").read_text()) for name, run_dir in runs.items()}
    zero_shot = [summary["baselines"]["imagenet_zero_shot"] for summary in summaries.values()]
    assert zero_shot[0]["num_images"] == zero_shot[1]["num_images"] > 0
    for key in ("accuracy", "top5_accuracy", "log_loss"):
        assert zero_shot[0][key] == pytest.approx(zero_shot[1][key], abs=1e-5), key
    for run_dir in runs.values():  # the gate, from the frozen pass's validation features where at hand
        assert_dog_gate_is_numpy_on_the_model(run_dir, 1e-5)


@pytest.mark.parametrize("views", [0, 1])
def test_every_dataset_a_frozen_phase_fits_on_runs_without_the_autotuner(tmp_path, monkeypatch, views):
    """The head's training and validation features, per batch or cached, as every pipeline of a run:
    tf.data's autotuner off. With it the per-batch pass (from a Python generator) waited about 4 s an
    epoch on 2 cores and ran the backbone on one core: ResNet-18 feature extraction on dogs10, 10
    epochs, took 100.9 s with it and 69.0 s without, to the same scores."""
    fitted = []
    fit = keras.Model.fit

    def recording_fit(model, x=None, *args, validation_data=None, **kwargs):
        fitted.append((x, validation_data))
        return fit(model, x, *args, validation_data=validation_data, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", recording_fit)
    checkpoint = tmp_path / "resnet18-random.weights.h5"
    keras.utils.set_random_seed(11)
    models.build("resnet18", 1000, input_shape=(32, 32, 3)).save_weights(checkpoint)
    config = small_config(model="resnet18", weights=str(checkpoint), strategy="feature-extract", epochs=2,
                          image_size=32, precision="float32", feature_views=views, output=str(tmp_path / "run"),
                          export_dir=str(tmp_path / "export"))
    training_loop.train(config)
    assert len(fitted) == 1
    for dataset in fitted[0]:
        assert isinstance(dataset, tf.data.Dataset)
        assert dataset.options().autotune.enabled is False, dataset.element_spec
