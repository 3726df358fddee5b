"""Resuming a run: kill -9 after any epoch, run the same command, get the uninterrupted run's results.

Every random draw of an epoch (shuffle, crops, flips, augmentation, dropout)
is keyed by (seed, epoch), and the optimizer, the best checkpoint and early
stopping carry their state over, so the resumed history and best weights
equal those of a run that was never interrupted. CPU, float32: equal to 1e-5
(in practice bit for bit).
"""

import json
import os
import pathlib
import subprocess
import sys

import h5py
import keras
import numpy as np
import pandas as pd
import pytest
from conftest import small_config

from tfdogs import config as config_lib, data
from tfdogs.training import loop as training_loop

# `python -m tfdogs.train` that kills itself (SIGKILL, no clean-up at all) at the end of one epoch
# (argument "N"), after that epoch's history row and backup are written; with "N-in-flight", after its
# history row, while its backup is still being written (held back here, so that it cannot land first).
KILLED_AFTER_EPOCH = """
import os, signal, sys, time, keras
from tfdogs import files, train
from tfdogs.training import callbacks

epoch_to_kill, _, in_flight = sys.argv[1].partition("-")
if in_flight:
    callbacks.write_backup = lambda *args, write=callbacks.write_backup: time.sleep(60) or write(*args)

class KillAfter(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == int(epoch_to_kill):
            if not in_flight:
                files.wait_for_writes()
            os.kill(os.getpid(), signal.SIGKILL)

run = train.train  # the command's own reference to tfdogs.training.loop.train
train.train = lambda config, extra_callbacks=(): run(config, [*extra_callbacks, KillAfter()])
sys.exit(train.main(sys.argv[2:]))
"""
ENVIRONMENT = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
TOLERANCE = 1e-5


def train_command(run_dir, flags, kill_after=None):
    prefix = ["-m", "tfdogs.train"] if kill_after is None else ["-c", KILLED_AFTER_EPOCH, str(kill_after)]
    return [sys.executable, *prefix, *flags, "--output", str(run_dir), "--export-dir", str(run_dir) + "-export"]


def uninterrupted(run_dir, flags):
    result = subprocess.run(train_command(run_dir, flags), capture_output=True, text=True, env=ENVIRONMENT)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def killed_then_resumed(run_dir, flags, kill_after):
    killed = subprocess.run(train_command(run_dir, flags, kill_after), capture_output=True, text=True,
                            env=ENVIRONMENT)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (run_dir / "metrics.json").exists()
    resumed = subprocess.run(train_command(run_dir, flags), capture_output=True, text=True, env=ENVIRONMENT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return resumed.stdout


def best_weights(run_dir):
    with h5py.File(run_dir / "best.weights.h5") as file:
        arrays = {}
        file.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset)
                        else None)
    return arrays


def assert_same_run(resumed_dir, reference_dir):
    resumed, reference = pd.read_csv(resumed_dir / "history.csv"), pd.read_csv(reference_dir / "history.csv")
    assert list(resumed["epoch"]) == list(reference["epoch"])
    pd.testing.assert_frame_equal(resumed, reference, check_exact=False, atol=TOLERANCE, rtol=0)
    resumed_weights, reference_weights = best_weights(resumed_dir), best_weights(reference_dir)
    assert resumed_weights.keys() == reference_weights.keys()
    for name in reference_weights:
        np.testing.assert_allclose(resumed_weights[name], reference_weights[name], atol=TOLERANCE, err_msg=name)


# Every random part of the recipe on: augmentation, the modern recipe's mixing, dropout, the weight average.
SCRATCH = ["--model", "lenet5", "--weights", "none", "--image-size", "32", "--batch-size", "16", "--epochs", "4",
           "--learning-rate", "3e-3", "--dropout", "0.3", "--rotation", "0.05", "--zoom", "0.1",
           "--contrast", "0.1", "--randaugment", "2,5", "--augmix", "--random-erasing", "0.25", "--mixup", "0.2",
           "--cutmix", "1.0", "--ema", "0.9", "--label-smoothing", "0.1", "--early-stopping-patience", "2",
           "--precision", "float32", "--verbose", "0"]


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    """The synthetic photos again, one folder per breed."""
    kaggle = data.make_synthetic(tmp_path_factory.mktemp("kaggle"), num_classes=4, images_per_class=16,
                                 image_size=48)
    records = data.find_records(kaggle)
    folders = tmp_path_factory.mktemp("folders")
    for path, label in zip(records.paths, records.labels):
        breed_dir = folders / records.class_names[label]
        breed_dir.mkdir(exist_ok=True)
        (breed_dir / pathlib.Path(path).name).write_bytes(pathlib.Path(path).read_bytes())
    return folders


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["kaggle", "folders"])
def test_scratch_run_killed_after_an_epoch_resumes_to_the_uninterrupted_result(tmp_path, class_folders, layout):
    source = (["--data", "synthetic", "--synthetic-classes", "4", "--synthetic-images-per-class", "16"]
              if layout == "kaggle" else ["--data-dir", str(class_folders)])
    reference = uninterrupted(tmp_path / "reference", SCRATCH + source)
    printed = killed_then_resumed(tmp_path / "resumed", SCRATCH + source, kill_after=1)
    assert f"Resuming the run in {tmp_path / 'resumed'} at epoch 3 of 4" in printed
    assert_same_run(tmp_path / "resumed", reference)


@pytest.mark.slow
def test_killed_while_its_last_backup_is_written_redoes_that_epoch_to_the_uninterrupted_result(tmp_path):
    """The backup of an epoch is written while the next one trains: a kill before it lands loses only it."""
    source = ["--data", "synthetic", "--synthetic-classes", "4", "--synthetic-images-per-class", "16"]
    reference = uninterrupted(tmp_path / "reference", SCRATCH + source)
    printed = killed_then_resumed(tmp_path / "resumed", SCRATCH + source, kill_after="1-in-flight")
    assert f"Resuming the run in {tmp_path / 'resumed'} at epoch 2 of 4" in printed
    assert_same_run(tmp_path / "resumed", reference)


@pytest.mark.slow
def test_fine_tune_killed_in_either_phase_resumes_to_the_uninterrupted_result(tmp_path):
    import keras

    from tfdogs import models

    checkpoint = tmp_path / "imagenet-like.weights.h5"
    keras.utils.set_random_seed(1)
    models.build("resnet18", 1000, input_shape=(32, 32, 3)).save_weights(checkpoint)
    flags = ["--model", "resnet18", "--weights", str(checkpoint), "--strategy", "fine-tune", "--epochs", "4",
             "--head-epochs", "2", "--image-size", "32", "--batch-size", "16", "--data", "synthetic",
             "--synthetic-classes", "4", "--synthetic-images-per-class", "16",  # early stopping at its default
             "--precision", "float32", "--verbose", "0"]
    reference = uninterrupted(tmp_path / "reference", flags)
    for kill_after, phase in ((0, "head"), (2, "all")):
        run_dir = tmp_path / f"killed-in-{phase}"
        printed = killed_then_resumed(run_dir, flags, kill_after)
        assert f"at epoch {kill_after + 2} of 4 (phase '{phase}'" in printed
        assert_same_run(run_dir, reference)
        for finished in ("phase-head.weights.h5", "phase-all.weights.h5"):  # each phase's final weights
            assert_same_file_arrays(run_dir / finished, reference / finished)


class Killed(Exception):
    """Stands for kill -9 at the end of an epoch: its history row and backup are on disk, nothing more runs."""


class KillAfterEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):  # the last callback: after the history row and the backup
        if epoch == self.epoch:
            raise Killed(epoch)


def h5_arrays(path):
    with h5py.File(path) as file:
        arrays = {}
        file.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset)
                        else None)
    return arrays


def assert_same_file_arrays(path, reference_path):
    arrays, reference = h5_arrays(path), h5_arrays(reference_path)
    assert arrays.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(arrays[name], reference[name], err_msg=f"{path.name}: {name}")


def comparable_summary(run_dir):
    """metrics.json less what differs between any two runs: seconds, and where the export went."""
    summary = json.loads((run_dir / "metrics.json").read_text())
    for key in ("seconds", "train_seconds", "export"):
        summary.pop(key)
    return summary


@pytest.mark.slow  # three runs: about 30 s on two cores
def test_killed_after_its_best_epoch_resumes_to_the_uninterrupted_run_at_the_default_patience(tmp_path):
    """The default early stopping (patience 5) ends the phase with its best epoch, which the kill preceded.

    val_accuracy reaches 1.0 at epoch 2 of 4 and only ties after: the best is epoch 2, the kill
    comes after epoch 3, and the end of the phase restores epoch 2 in both runs.
    """
    settings = dict(epochs=4, monitor="val_accuracy", precision="float32",
                    early_stopping_patience=config_lib.DEFAULTS["early_stopping_patience"])
    assert settings["early_stopping_patience"] > 0

    def config(name):
        return small_config(output=str(tmp_path / name), export_dir=str(tmp_path / f"{name}-export"), **settings)

    reference = training_loop.train(config("reference"))
    history = pd.read_csv(reference / "history.csv")
    best_epoch = int(history["epoch"][history["val_accuracy"].idxmax()])
    assert best_epoch == 1 and len(history) == 4, history  # the test's premise: best before the kill, then ties
    with pytest.raises(Killed):
        training_loop.train(config("resumed"), extra_callbacks=[KillAfterEpoch(2)])
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = training_loop.train(config("resumed"))

    pd.testing.assert_frame_equal(pd.read_csv(resumed / "history.csv"), history, check_exact=True)
    assert_same_file_arrays(resumed / "best.weights.h5", reference / "best.weights.h5")
    assert_same_file_arrays(resumed / "phase-all.weights.h5", reference / "phase-all.weights.h5")  # the final weights
    assert comparable_summary(resumed) == comparable_summary(reference)


# ----------------------------------------------------------------------------- what a resume accepts


def test_an_existing_run_with_other_settings_is_refused_and_its_config_kept(tmp_path):
    config = small_config(output=str(tmp_path / "run"), export_dir=str(tmp_path / "export"), epochs=2)
    run_dir = training_loop.train(config)
    recorded = (run_dir / "config.yaml").read_bytes()
    with pytest.raises(config_lib.ConfigError) as refused:
        training_loop.train({**config, "image_size": 48, "learning_rate": 1e-2})
    assert "image_size: 32 in the run, 48 now" in str(refused.value)
    assert "learning_rate: 0.003 in the run, 0.01 now" in str(refused.value)
    assert "--output" in str(refused.value)
    with pytest.raises(config_lib.ConfigError, match="epochs: 2 in the run, 1 now"):
        training_loop.train({**config, "epochs": 1})
    assert (run_dir / "config.yaml").read_bytes() == recorded
    assert sorted(path.name for path in (tmp_path / "export").iterdir()) == ["1"]  # nothing exported again


def test_more_epochs_continue_a_finished_run(tmp_path, capsys):
    config = small_config(output=str(tmp_path / "run"), export_dir=str(tmp_path / "export"), epochs=2)
    run_dir = training_loop.train(config)
    before = pd.read_csv(run_dir / "history.csv")
    training_loop.train({**config, "epochs": 3})
    after = pd.read_csv(run_dir / "history.csv")
    assert list(after["epoch"]) == [0, 1, 2]
    pd.testing.assert_frame_equal(after.iloc[:2], before)  # the first epochs are kept, not trained again
    assert "at epoch 3 of 3" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "export").iterdir()) == ["1", "2"]
