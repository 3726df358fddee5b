"""Every flag of the README's "### Flags" table changes what the table says it changes.

Each test checks an outcome: the training batches a run's pipeline gives, the
split it writes, the step its optimizer takes, the rate each step trains at,
the epochs it runs, what it prints. Pipelines are built as a run builds them
(`prepare.load_data`, `prepare.build_datasets`); the schedule, early stopping,
`--steps-per-epoch`, `--verbose`, `--output` and `--export-dir` are read off
three real runs of a few seconds each, shared by the tests below.

Flags whose effect is shown in other files:
    --config                  test_config.py::test_flags_override_yaml, ::test_resolved_config_round_trips
    --model                   test_train.py::test_each_model_learns_the_synthetic_breeds
    --data                    test_train.py::test_each_model_learns_the_synthetic_breeds (synthetic),
                              test_data.py::test_load_stanford_dogs_fails_fast_offline,
                              ::test_stanford_export_to_class_folders_then_no_network (stanford_dogs)
    --data-dir                test_train.py::test_real_photos_in_the_kaggle_layout_train_end_to_end,
                              test_resume.py::test_scratch_run_killed_after_an_epoch_resumes_... (both layouts)
    --strict                  test_check.py::test_strict_training_stops_before_any_work_and_names_the_problems
    --weights                 test_strategies.py (a checkpoint file), test_zeroshot.py (imagenet),
                              test_config.py::test_defaults_pick_weights_and_strategy_per_model (auto)
    --weights-preprocessing   test_preprocessing.py::test_a_checkpoint_file_is_recognised_by_its_hash_or_declared
    --strategy                test_strategies.py, test_train.py::test_plan_phases
    --epochs                  test_train.py::test_run_folder_holds_every_output_with_consistent_content,
                              test_resume.py::test_more_epochs_continue_a_finished_run
    --head-epochs             test_strategies.py::test_fine_tune_trains_the_head_first_then_everything
    --weight-decay            test_strategies.py::test_weight_decay_follows_each_variables_rate_and_spares_biases,
                              ::test_weight_decay_leaves_a_frozen_backbone_untouched
    --backbone-lr-factor      test_strategies.py::test_discriminative_rates_scale_each_variables_update,
                              ::test_discriminative_run_moves_the_stem_less_than_the_head,
                              test_train.py::test_plan_phases
    --freeze-bn               test_strategies.py::test_fine_tune_trains_the_head_first_then_everything,
                              ::test_without_freeze_bn_the_statistics_follow_the_dog_photos
    --label-smoothing         test_train.py::test_label_smoothing_reaches_the_training_loss,
                              ::test_label_smoothing_changes_the_logged_training_loss_of_a_run
    --randaugment, --augmix, --random-erasing, --mixup, --cutmix
                              test_augment.py::test_each_recipe_augmentation_changes_the_batches_and_keeps_...,
                              ::test_cutmix_mixes_labels_by_the_pasted_area
    --ema                     test_calibration.py::test_the_best_checkpoint_and_model_keras_hold_the_averaged_weights
    --monitor                 test_calibration.py::test_the_monitor_follows_the_layout_by_default,
                              ::test_the_best_checkpoint_follows_the_monitored_log_loss
    --calibrate               test_calibration.py::test_model_keras_and_the_export_serve_softmax_of_logits_...,
                              ::test_no_calibrate_serves_the_raw_probabilities
    --finetune-image-size, --finetune-epochs
                              test_train.py::test_the_last_epochs_train_at_the_finetune_size_and_the_export_takes_it
    --jit-compile             test_xla.py
    --precision               test_xla.py::test_gpu_defaults_are_xla_and_mixed_float16,
                              ::test_cpu_defaults_are_no_xla_and_bfloat16_only_where_it_pays
    --distribute              test_distribute.py
    --feature-views           test_features.py::test_head_on_cached_features_equals_the_head_trained_on_the_photos,
                              ::test_a_feature_extract_run_on_cached_features_trains_and_serves_its_head
Every other flag of the table is shown here.
"""

import contextlib
import dataclasses
import io
import json
import math
import pathlib
import shutil
import types

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import small_config

from tfdogs import weights
from tfdogs.training import loop as training_loop, optimizer as training_optimizer, prepare

# 4 breeds x 8 photos: 2 per breed held out, 24 training photos = 6 batches of 4.
PIPELINE = dict(synthetic_images_per_class=8, batch_size=4, flip=False)


# ----------------------------------------------------------------------------- the data pipeline


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Photos and split of a run (`prepare.load_data`), and the preprocessing record the run resolves."""
    run_dir = tmp_path_factory.mktemp("split")
    records, train_indices, val_indices = prepare.load_data(small_config(**PIPELINE), run_dir)
    preprocessing = weights.resolve_preprocessing(None, "lenet5", 32)
    return types.SimpleNamespace(records=records, train_indices=train_indices, val_indices=val_indices,
                                 preprocessing=preprocessing, data_dir=run_dir / "synthetic_data")


def batches(split, epochs=1, records=None, **overrides):
    """(training batches of `epochs` epochs, validation batches) of a run with these settings, as numpy."""
    config = small_config(**{**PIPELINE, **overrides})
    train_epochs, val_dataset = prepare.build_datasets(config, records or split.records, split.train_indices,
                                                     split.val_indices, split.preprocessing)

    def as_numpy(dataset):  # one-hot labels (as a run's pipelines give them) read back as class indices
        return [(images.numpy(), labels.numpy().argmax(-1)) for images, labels in dataset]

    return as_numpy(train_epochs(0, epochs)), as_numpy(val_dataset)


@pytest.fixture(scope="module")
def plain(split):
    """Batches with no augmentation at all (small_config turns off all but the crop)."""
    return batches(split)


def same_batches(first, second):
    return len(first) == len(second) and all(
        np.array_equal(a, b) and np.array_equal(la, lb) for (a, la), (b, lb) in zip(first, second))


def images_of(batch_list):
    return np.concatenate([images for images, _ in batch_list])


def match(image, photos):
    """(index of the photo `image` is, whether mirrored), or None: exact up to float32 normalisation."""
    for index, photo in enumerate(photos):
        if np.abs(image - photo).max() < 1e-5:
            return index, False
        if np.abs(image - photo[:, ::-1]).max() < 1e-5:
            return index, True
    return None


def test_batch_size_and_image_size_shape_every_batch(split):
    for batch_size, image_size in ((4, 32), (6, 48)):
        training, validation = batches(split, batch_size=batch_size, image_size=image_size)
        assert len(training) == len(split.train_indices) // batch_size
        assert {images.shape for images, _ in training} == {(batch_size, image_size, image_size, 3)}
        assert validation[0][0].shape == (batch_size, image_size, image_size, 3)
        assert sum(len(labels) for _, labels in validation) == len(split.val_indices)  # no photo dropped


def test_flip_mirrors_some_training_images_and_keeps_the_others(split, plain):
    flipped, validation = batches(split, flip=True)
    mirrored = []
    for (images, labels), (plain_images, plain_labels) in zip(flipped, plain[0], strict=True):
        np.testing.assert_array_equal(labels, plain_labels)  # same photos, same crops: only the flip differs
        for image, plain_image in zip(images, plain_images):
            found = match(image, [plain_image])
            assert found is not None, "an image is neither its unflipped self nor its mirror"
            mirrored.append(found[1])
    assert 0.25 < np.mean(mirrored) < 0.75
    assert same_batches(validation, plain[1])  # the training set only


@pytest.mark.parametrize("flag, small, large", [("rotation", 0.02, 0.2), ("zoom", 0.05, 0.5),
                                                ("translation", 0.02, 0.3)])
def test_geometric_augmentation_moves_pixels_more_as_its_amount_grows(split, plain, flag, small, large):
    distance = {}
    for amount in (small, large):
        training, validation = batches(split, **{flag: amount})
        assert [labels.tolist() for _, labels in training] == [labels.tolist() for _, labels in plain[0]]
        distance[amount] = np.abs(images_of(training) - images_of(plain[0])).mean()
        assert same_batches(validation, plain[1])  # the training set only
    assert 0 < distance[small] < distance[large] / 2


def test_contrast_scales_each_images_spread_around_its_mean(split, plain):
    amount = 0.3
    training, validation = batches(split, contrast=amount)
    mean, std = np.array(split.preprocessing.mean), np.array(split.preprocessing.std)
    to_pixels = lambda images: (images * std + mean) * 255  # noqa: E731
    factors = []
    for image, original in zip(to_pixels(images_of(training)), to_pixels(images_of(plain[0]))):
        centre = original.mean(axis=(0, 1))
        spread = original - centre
        inside = (image > 0.5) & (image < 254.5) & (np.abs(spread) > 2)  # not clipped, not at the mean
        factor = (spread[inside] * (image - centre)[inside]).sum() / (spread[inside] ** 2).sum()
        # one factor per image, all three channels; clipped to [0, 255] as RandomContrast does
        np.testing.assert_allclose(image, np.clip(spread * factor + centre, 0, 255), atol=0.05)
        factors.append(factor)
    assert 1 - amount <= min(factors) and max(factors) <= 1 + amount
    assert np.std(factors) > amount / 10
    assert same_batches(validation, plain[1])


def test_crop_scale_min_one_takes_the_whole_photo_every_epoch_and_small_takes_varying_crops(split):
    steps = len(split.train_indices) // PIPELINE["batch_size"]
    whole, _ = batches(split, epochs=2, crop_scale_min=1.0)
    first_epoch, second_epoch = images_of(whole[:steps]), images_of(whole[steps:])
    # every photo comes back identical in the next epoch, in another order
    assert sorted(match(image, first_epoch)[0] for image in second_epoch) == list(range(len(first_epoch)))
    assert not np.array_equal(first_epoch, second_epoch)
    varying, _ = batches(split, epochs=2, crop_scale_min=0.1)
    first_epoch, second_epoch = images_of(varying[:steps]), images_of(varying[steps:])
    assert all(match(image, first_epoch) is None for image in second_epoch)


def test_seed_fixes_the_order_the_crops_and_the_augmentation(split, plain):
    assert same_batches(batches(split)[0], plain[0])
    other, validation = batches(split, seed=1)
    assert [labels.tolist() for _, labels in other] != [labels.tolist() for _, labels in plain[0]]
    assert not np.allclose(images_of(other), images_of(plain[0]))
    assert same_batches(validation, plain[1])  # validation is neither shuffled nor augmented
    # With whole-photo crops the photos are the same for any seed; which ones are mirrored follows the seed.
    photos = images_of(batches(split, crop_scale_min=1.0)[0])

    def mirrored(seed):
        found = [match(image, photos) for image in images_of(batches(split, crop_scale_min=1.0, flip=True,
                                                                     seed=seed)[0])]
        assert sorted(index for index, _ in found) == list(range(len(photos)))
        return {index for index, is_mirrored in found if is_mirrored}

    assert mirrored(0) != mirrored(1)  # (the same seed repeating everything is shown above)


def test_cache_serves_the_decoded_photos_once_the_files_are_gone(split, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(split.data_dir, photos)
    records = dataclasses.replace(split.records, paths=[
        str(photos / pathlib.Path(path).relative_to(split.data_dir)) for path in split.records.paths])
    prefix = str(tmp_path / "cache" / "train")
    on_file, _ = batches(split, epochs=2, records=records, cache=prefix)
    in_memory, _ = batches(split, epochs=2, records=records, cache="memory")
    assert same_batches(in_memory, on_file)
    # Cached, every epoch still holds every training photo once (the order and crops differ from the
    # uncached pipeline: a shuffle buffer after the cache, crops of the shrunk cached image).
    uncached, _ = batches(split, epochs=2, records=records)
    steps = len(split.train_indices) // PIPELINE["batch_size"]
    for epoch in (slice(0, steps), slice(steps, None)):
        assert sorted(np.concatenate([labels for _, labels in on_file[epoch]])) == sorted(
            np.concatenate([labels for _, labels in uncached[epoch]]))
    shutil.rmtree(photos)
    assert same_batches(batches(split, epochs=2, records=records, cache=prefix)[0], on_file)
    with pytest.raises(tf.errors.NotFoundError):  # without the cache the photos are read again
        batches(split, records=records)


# ----------------------------------------------------------------------------- the split and the data


def written_split(tmp_path, name, **overrides):
    run_dir = tmp_path / name
    run_dir.mkdir()
    prepare.load_data(small_config(**overrides), run_dir)
    return pd.read_csv(run_dir / "split.csv")


@pytest.mark.parametrize("fraction, held_out", [(0.05, 1), (0.2, 4), (0.5, 10)])
def test_val_fraction_sets_each_breeds_share_of_split_csv(tmp_path, fraction, held_out):
    written = written_split(tmp_path, "run", val_fraction=fraction)  # small_config: 4 breeds of 20 photos
    counts = written[written["subset"] == "val"].groupby("breed").size()
    assert len(counts) == 4 and (counts == held_out).all()
    assert (written.groupby("breed").size() == 20).all()


def test_seed_fixes_the_split(split, tmp_path):
    same_photos = dict(data=None, data_dir=str(split.data_dir))  # --data synthetic draws its photos by seed too
    first, again, other = (written_split(tmp_path, name, seed=seed, **same_photos)
                           for name, seed in (("first", 0), ("again", 0), ("other", 1)))
    pd.testing.assert_frame_equal(first, again)
    assert set(first["path"]) == set(other["path"])
    assert set(first.loc[first["subset"] == "val", "path"]) != set(other.loc[other["subset"] == "val", "path"])
    per_breed = lambda table: table[table["subset"] == "val"].groupby("breed").size()  # noqa: E731
    pd.testing.assert_series_equal(per_breed(first), per_breed(other))


def test_synthetic_classes_and_images_per_class_size_the_generated_data(tmp_path):
    written = written_split(tmp_path, "run", synthetic_classes=3, synthetic_images_per_class=7)
    assert len(written) == 21 and (written.groupby("breed").size() == 7).all()
    labels = pd.read_csv(tmp_path / "run" / "synthetic_data" / "labels.csv")
    assert len(labels) == 21 and labels["breed"].nunique() == 3


# ----------------------------------------------------------------------------- the model and its optimizer


def test_l1_and_l2_add_their_penalty_on_the_classifier_kernel_to_the_training_loss():
    images = np.asarray(keras.random.normal((8, 32, 32, 3), seed=1))
    labels = np.eye(4)[np.arange(8) % 4]  # one-hot, as the run's pipelines give them
    keras.utils.set_random_seed(0)
    plain = training_loop.build_model(small_config(), 4, None)
    assert not plain.losses
    losses = {}
    for l1, l2 in ((0.0, 0.0), (0.01, 0.0), (0.0, 0.03), (0.01, 0.03)):
        config = small_config(l1=l1, l2=l2)
        model = training_loop.build_model(config, 4, None)
        model.set_weights(plain.get_weights())
        kernel = np.asarray(model.get_layer("fc").kernel)
        penalty = l1 * np.abs(kernel).sum() + l2 * np.square(kernel).sum()
        assert float(sum(model.losses, 0.0)) == pytest.approx(penalty, rel=1e-5)
        training_optimizer.compile_model(model, config, 1e-3, {}, jit_compile=False)
        losses[l1, l2] = model.evaluate(images, labels, verbose=0, return_dict=True)["loss"] - penalty
    assert losses[0.01, 0.03] != pytest.approx(losses[0.0, 0.0] + 1.0)  # guard: the penalty is not tiny
    for key, loss in losses.items():  # the objective trained is the data loss plus the penalty
        assert loss == pytest.approx(losses[0.0, 0.0], rel=1e-5), key


def test_dropout_zeroes_its_share_of_head_features_in_training_only():
    images = np.asarray(keras.random.normal((64, 32, 32, 3), seed=2))
    keras.utils.set_random_seed(0)
    without = training_loop.build_model(small_config(dropout=0.0), 4, None)
    with_dropout = training_loop.build_model(small_config(dropout=0.5), 4, None)
    with_dropout.set_weights(without.get_weights())
    np.testing.assert_allclose(with_dropout(images, training=False), without(images, training=False), atol=1e-6)
    np.testing.assert_allclose(without(images, training=True), without(images, training=False), atol=1e-6)
    assert not np.allclose(with_dropout(images, training=True), with_dropout(images, training=False), atol=1e-3)
    layer = with_dropout.get_layer("dropout")
    features = keras.Model(with_dropout.inputs[0], layer.input)(images)
    dropped = np.asarray(layer(features, training=True))
    kept = dropped != 0
    assert 0.45 < 1 - kept.mean() < 0.55
    np.testing.assert_allclose(dropped[kept], 2 * np.asarray(features)[kept], rtol=1e-5)  # survivors scaled up


def first_step(optimizer, learning_rate, steps=1, **overrides):
    """Kernel before and after `steps` training steps of a linear classifier, and each step's gradient."""
    keras.utils.set_random_seed(0)
    inputs = np.asarray(keras.random.normal((16, 5), seed=3))
    labels = np.arange(16) % 3
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, use_bias=False)])
    config = small_config(optimizer=optimizer, learning_rate=learning_rate, **overrides)
    training_optimizer.compile_model(model, config, config["learning_rate"], {}, jit_compile=False)
    kernels, gradients = [np.asarray(model.layers[0].kernel)], []
    for _ in range(steps):
        probabilities = np.asarray(keras.ops.softmax(inputs @ kernels[-1]))
        gradients.append(inputs.T @ (probabilities - np.eye(3)[labels]) / len(labels))  # of the mean cross-entropy
        model.train_on_batch(inputs, np.eye(3)[labels])
        kernels.append(np.asarray(model.layers[0].kernel))
    return kernels, gradients


@pytest.mark.parametrize("learning_rate", [0.01, 0.1])
def test_optimizer_and_learning_rate_set_the_step(learning_rate):
    (before, after), (gradient,) = first_step("sgd", learning_rate, momentum=0.0, weight_decay=0.0)
    expected = -learning_rate * gradient
    np.testing.assert_allclose(after - before, expected, atol=1e-4 * np.abs(expected).max())  # float32 sums
    # Adam's first step is the rate times the gradient's sign, whatever its size ...
    (before, after), (gradient,) = first_step("adam", learning_rate)
    np.testing.assert_allclose(after - before, -learning_rate * np.sign(gradient), rtol=1e-3)
    # ... and AdamW's adds decoupled weight decay, 0.01 by default
    (before, after), (gradient,) = first_step("adamw", learning_rate)
    np.testing.assert_allclose(after - before, -learning_rate * (np.sign(gradient) + 0.01 * before), rtol=1e-3)


def test_momentum_adds_its_share_of_the_previous_step():
    plain, _ = first_step("sgd", 0.1, steps=2, momentum=0.0, weight_decay=0.0)
    heavy, _ = first_step("sgd", 0.1, steps=2, momentum=0.9, weight_decay=0.0)
    np.testing.assert_allclose(heavy[1], plain[1])  # the first step has nothing to carry
    np.testing.assert_allclose(heavy[2] - plain[2], 0.9 * (heavy[1] - heavy[0]), rtol=1e-4, atol=1e-8)


# ----------------------------------------------------------------------------- real runs

# A rate so small that the weights stay at their initialisation: validation accuracy cannot improve.
FROZEN_RATE = 1e-9


class StepRecorder(keras.callbacks.Callback):
    """The learning rate each training step uses, and the steps of each epoch."""

    def __init__(self):
        super().__init__()
        self.rates, self.steps = [], {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.steps[epoch] = epoch, 0

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
        self.steps[self.epoch] += 1


def run(base, name, **overrides):
    """A real LeNet-5 run on 4 x 20 synthetic photos (64 training photos: 4 full batches of 16)."""
    recorder, printed = StepRecorder(), io.StringIO()
    config = small_config(learning_rate=FROZEN_RATE, output=str(base / name / "run"),
                          export_dir=str(base / name / "export"), **overrides)
    with contextlib.redirect_stdout(printed):
        run_dir = training_loop.train(config, extra_callbacks=[recorder])
    return types.SimpleNamespace(run_dir=run_dir, export_dir=base / name / "export", rates=recorder.rates,
                                 steps=recorder.steps, printed=printed.getvalue(),
                                 history=pd.read_csv(run_dir / "history.csv"),
                                 summary=json.loads((run_dir / "metrics.json").read_text()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return types.SimpleNamespace(
        # early stopping off: all 3 epochs although validation never improves
        steady=run(base, "steady", epochs=3, schedule="constant", warmup_epochs=1, steps_per_epoch=2, verbose=2),
        stalled=run(base, "stalled", epochs=4, early_stopping_patience=1, monitor="val_accuracy"),  # cosine, verbose 0
        other_seed=run(base, "other_seed", epochs=1, seed=1, verbose="auto"),
    )


def test_early_stopping_patience_stops_a_run_that_stopped_improving(runs):
    assert runs.stalled.history["val_accuracy"].nunique() == 1  # the rate keeps the weights where they start
    assert len(runs.stalled.history) == 2 and runs.stalled.summary["epochs_run"] == 2  # of 4
    assert len(runs.steady.history) == 3  # patience 0 never stops


def test_steps_per_epoch_caps_the_batches_of_each_epoch(runs):
    assert runs.steady.steps == {0: 2, 1: 2, 2: 2}
    assert runs.stalled.steps == {0: 4, 1: 4}  # uncapped: every full batch


def test_warmup_epochs_ramp_the_rate_then_constant_holds_it(runs):
    peak = FROZEN_RATE
    np.testing.assert_allclose(runs.steady.rates, [peak / 2, peak, peak, peak, peak, peak], rtol=1e-6)
    # history.csv logs each epoch's first rate: the warm-up shows there too
    np.testing.assert_allclose(runs.steady.history["learning_rate"], [peak / 2, peak, peak], rtol=1e-6)


def test_cosine_schedule_decays_over_the_whole_planned_run(runs):
    total_steps = 4 * 4  # --epochs 4 of 4 steps, although early stopping ends it after 2
    expected = [FROZEN_RATE * 0.5 * (1 + math.cos(math.pi * step / total_steps)) for step in range(8)]
    np.testing.assert_allclose(runs.stalled.rates, expected, rtol=1e-5)


def test_history_logs_the_rate_each_epoch_trained_at(runs):
    first_steps = runs.steady.rates[::2]  # 2 steps per epoch
    np.testing.assert_allclose(runs.steady.history["learning_rate"], first_steps, rtol=1e-6)


def test_seed_fixes_the_initial_weights(runs):
    def weights_of(result):
        return keras.saving.load_model(result.run_dir / "model.keras").get_weights()

    steady, stalled, other = (weights_of(result) for result in (runs.steady, runs.stalled, runs.other_seed))
    for a, b in zip(steady, stalled, strict=True):  # seed 0 twice: same start, and the tiny rate keeps it
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(steady[0], other[0], atol=1e-3)


def test_verbose_sets_the_progress_output(runs):
    assert "Epoch" not in runs.stalled.printed and "/step" not in runs.stalled.printed  # 0: no progress
    lines = runs.steady.printed.splitlines()  # 2: one line per epoch, no progress bar
    assert [line for line in lines if line.startswith("Epoch ")] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
    assert sum(line.startswith("2/2 - ") for line in lines) == 3 and "━" not in runs.steady.printed
    assert "━" in runs.other_seed.printed  # auto: Keras' progress bar


def test_output_and_export_dir_receive_the_run_and_the_saved_model(runs):
    result = runs.steady
    assert result.run_dir == result.export_dir.parent / "run"
    for name in ("config.yaml", "split.csv", "history.csv", "metrics.json", "model.keras"):
        assert (result.run_dir / name).is_file(), name
    version = pathlib.Path(result.summary["export"])
    assert (version / "saved_model.pb").is_file() and version.parent == result.export_dir


def test_output_and_export_dir_default_to_runs_and_saved_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir, export_dir, created = prepare.prepare_output(small_config())
    assert run_dir.parent.name == "runs" and run_dir.name.startswith("lenet5-")
    assert export_dir.parent.name == "saved_models" and export_dir.name == run_dir.name
    assert all(folder.is_dir() for folder in created) and len(created) == 2
