"""Interruption: kill -9 mid-run resumes where it stopped, and a kill mid-save never corrupts a good file."""

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from tfdogs import files, models
from tfdogs.data.preprocessing import Preprocessing
from tfdogs.serving import saved_model
from tfdogs.training import callbacks as training_callbacks, resume as training_resume

# `python -m tfdogs.train`, with each epoch printed as it begins and followed by a pause, so the
# test can kill it between epochs and tell where the next process starts.
TRAIN_WITH_PAUSES = """
import sys, time, keras
from tfdogs import train

class PauseAfterEachEpoch(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        print(f"epoch-begins {epoch}", flush=True)

    def on_epoch_end(self, epoch, logs=None):
        time.sleep(float(sys.argv[1]))

run = train.train  # the command's own reference to tfdogs.training.loop.train
train.train = lambda config, extra_callbacks=(): run(config, [*extra_callbacks, PauseAfterEachEpoch()])
sys.exit(train.main(sys.argv[2:]))
"""


def wait_for(condition, timeout, process):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"training exited early with {process.returncode}"
        assert time.monotonic() < deadline, "training did not finish an epoch in time"
        time.sleep(0.05)


def finished_epochs(run_dir):
    """Epochs both logged and backed up: the state a kill leaves behind."""
    metadata = run_dir / "backup" / "all" / "training_metadata.json"
    history = run_dir / "history.csv"
    if not metadata.is_file() or not history.is_file() or history.stat().st_size == 0:
        return None
    return json.loads(metadata.read_text())["epoch"]


def test_kill_9_then_the_same_command_resumes_from_the_last_finished_epoch(tmp_path):
    run_dir, export_dir = tmp_path / "run", tmp_path / "export"
    command = [sys.executable, "-c", TRAIN_WITH_PAUSES, "1",
               "--model", "lenet5", "--weights", "none", "--strategy", "scratch", "--data", "synthetic",
               "--synthetic-classes", "4", "--synthetic-images-per-class", "20", "--image-size", "32",
               "--batch-size", "16", "--epochs", "3", "--early-stopping-patience", "0", "--verbose", "0",
               "--output", str(run_dir), "--export-dir", str(export_dir)]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        try:
            wait_for(lambda: finished_epochs(run_dir), timeout=180, process=first)
        finally:
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode == -signal.SIGKILL
    resume_epoch = finished_epochs(run_dir)
    assert 1 <= resume_epoch < 3
    assert not (run_dir / "metrics.json").exists()

    second = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    begun = [int(line.split()[1]) for line in second.stdout.splitlines() if line.startswith("epoch-begins")]
    assert begun == list(range(resume_epoch, 3)), second.stdout  # not from zero
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2]  # complete, each epoch once

    summary = json.loads((run_dir / "metrics.json").read_text())
    serve = tf.saved_model.load(summary["export"]).signatures["serving_default"]
    photo = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 40, 60)).save(photo, format="JPEG")
    probabilities = serve(image_bytes=tf.constant([photo.getvalue()]))["probabilities"].numpy()
    assert probabilities.shape == (1, 4) and np.isclose(probabilities.sum(), 1, atol=1e-5)


# ----------------------------------------------------------------------------- kills mid-save


class KilledMidWrite(Exception):
    """Stands for a kill: the writer stops after putting half a file on disk."""


def half_writer(path, *args, **kwargs):
    path = str(path)
    if path.endswith(".keras") or path.endswith(".h5"):
        with open(path, "wb") as file:
            file.write(b"\x89HDF\r\n\x1a\n half a file")
    else:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "saved_model.pb"), "wb") as file:
            file.write(b"half a protobuf")
    raise KilledMidWrite(path)


def tiny_model():
    return models.build("lenet5", 4, input_shape=(32, 32, 3))


def same_weights(first, second):
    return all(np.array_equal(a, b) for a, b in zip(first, second))


def loads(path):
    try:
        tiny_model().load_weights(path)
        return True
    except (OSError, ValueError):
        return False


def keras_checkpoint(path):
    return keras.callbacks.ModelCheckpoint(path, monitor="val_accuracy", mode="max", save_best_only=True,
                                           save_weights_only=True)


def tfdogs_checkpoint(path):
    return training_callbacks.BestCheckpoint(path, path.with_name("phase.weights.h5"), "val_accuracy",
                                             pd.DataFrame(), 0)


@pytest.mark.parametrize("callback, survives", [
    (keras_checkpoint, False),  # Keras writes in place: the kill corrupts the best weights
    (tfdogs_checkpoint, True),
])
def test_kill_while_saving_the_best_checkpoint(tmp_path, monkeypatch, callback, survives):
    path = tmp_path / "best.weights.h5"
    model = tiny_model()
    checkpoint = callback(path)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_accuracy": 0.5})
    good = model.get_weights()

    model.set_weights([np.zeros_like(w) for w in good])
    monkeypatch.setattr(model, "save_weights", half_writer)
    with pytest.raises(KilledMidWrite):
        checkpoint.on_epoch_end(1, {"val_accuracy": 0.9})
    assert loads(path) == survives
    if survives:
        kept = tiny_model()
        kept.load_weights(path)
        assert same_weights(kept.get_weights(), good)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best.weights.h5"]  # no half file left over


def compiled_tiny_model():
    model = tiny_model()
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    return model


def half_savez(file, **arrays):
    file.write(b"PK half a zip")
    raise KilledMidWrite(file.name)


def optimizer_values(model):
    return [np.array(v.numpy()) for v in model.optimizer.variables]  # copies: an update may reuse the memory


def weight_values(model):
    return [np.array(weights) for weights in model.get_weights()]


def test_kill_while_saving_the_resume_backup_keeps_the_previous_one(tmp_path, monkeypatch):
    model = compiled_tiny_model()
    model.train_on_batch(np.ones((2, 32, 32, 3), np.float32), np.eye(4, dtype=np.float32)[:2])
    backup = training_callbacks.ResumeBackup(tmp_path / "backup")
    backup.set_model(model)
    backup.on_epoch_end(0)
    good, good_optimizer = model.get_weights(), optimizer_values(model)

    model.set_weights([np.zeros_like(w) for w in good])
    monkeypatch.setattr(np, "savez", half_savez)
    backup.on_epoch_end(1)  # written beside training: the error comes when the write is waited for
    with pytest.raises(KilledMidWrite):
        backup.on_train_end()
    assert training_resume.backed_up_epoch(tmp_path / "backup") == 1
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == ["latest.state.npz", "training_metadata.json"]
    monkeypatch.undo()
    # a new run restores the epoch-0 state (weights and optimizer: Adam's moments, its step) and resumes at epoch 1
    restored = compiled_tiny_model()
    resume = training_callbacks.ResumeBackup(tmp_path / "backup")
    resume.set_model(restored)
    resume.on_train_begin()
    assert same_weights(restored.get_weights(), good)
    assert same_weights(optimizer_values(restored), good_optimizer)
    assert int(restored.optimizer.iterations.numpy()) == 1


def train_on(model):
    """Changes every weight and optimizer variable, as training on does."""
    for variable in [*model.weights, *model.optimizer.variables]:
        variable.assign(variable + 1)


def test_the_backup_holds_the_epoch_s_end_while_the_next_epoch_trains(tmp_path, monkeypatch):
    """The write runs beside training: it must hold the state of the epoch's end, not what training made since."""
    model = compiled_tiny_model()
    model.train_on_batch(np.ones((2, 32, 32, 3), np.float32), np.eye(4, dtype=np.float32)[:2])
    at_epoch_end, optimizer_at_epoch_end = weight_values(model), optimizer_values(model)
    release = threading.Event()
    savez = np.savez

    def slow_savez(file, **arrays):
        assert release.wait(timeout=60)
        savez(file, **arrays)

    monkeypatch.setattr(np, "savez", slow_savez)
    backup = training_callbacks.ResumeBackup(tmp_path / "backup")
    backup.set_model(model)
    backup.on_epoch_end(0)
    train_on(model)  # the next epoch trains while the backup is being written
    assert training_resume.backed_up_epoch(tmp_path / "backup") == 0
    release.set()
    backup.on_test_begin()  # its validation waits for the backup: it is in place before its history row
    assert training_resume.backed_up_epoch(tmp_path / "backup") == 1
    restored = compiled_tiny_model()
    training_resume.restore_backup(restored, tmp_path / "backup")
    assert same_weights(restored.get_weights(), at_epoch_end)
    assert same_weights(optimizer_values(restored), optimizer_at_epoch_end)
    # the next epoch's state is copied into the same arrays, and that epoch's values are written
    backup.on_epoch_end(1)
    at_second_end, optimizer_at_second_end = weight_values(model), optimizer_values(model)
    train_on(model)
    backup.on_train_end()
    training_resume.restore_backup(restored, tmp_path / "backup")
    assert training_resume.backed_up_epoch(tmp_path / "backup") == 2
    assert same_weights(restored.get_weights(), at_second_end)
    assert same_weights(optimizer_values(restored), optimizer_at_second_end)


def test_a_backup_of_earlier_tfdogs_in_keras_weights_format_is_restored(tmp_path):
    model = compiled_tiny_model()
    model.train_on_batch(np.ones((2, 32, 32, 3), np.float32), np.eye(4, dtype=np.float32)[:2])
    (tmp_path / "backup").mkdir()
    model.save_weights(tmp_path / "backup" / training_resume.EARLIER_BACKUP_WEIGHTS)  # weights and optimizer
    restored = compiled_tiny_model()
    training_resume.restore_backup(restored, tmp_path / "backup")
    assert same_weights(restored.get_weights(), model.get_weights())
    assert same_weights(optimizer_values(restored), optimizer_values(model))


def test_a_backup_of_another_model_is_refused_naming_the_file(tmp_path):
    model = compiled_tiny_model()
    training_resume.write_backup(tmp_path, training_resume.training_state(model), 1)
    other = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(4)])
    other.compile(optimizer="adam", loss="categorical_crossentropy")
    with pytest.raises(ValueError, match=f"{tmp_path / 'latest.state.npz'} holds"):
        training_resume.restore_backup(other, tmp_path)


def test_kill_while_saving_model_keras_keeps_the_previous_model(tmp_path, monkeypatch):
    path = tmp_path / "model.keras"
    model = tiny_model()
    files.save_model(model, path)
    good = model.get_weights()
    monkeypatch.setattr(model, "save", half_writer)
    with pytest.raises(KilledMidWrite):
        files.save_model(model, path)
    assert same_weights(keras.saving.load_model(path).get_weights(), good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]


def test_checkpoints_backups_and_loads_list_keras_skipped_attributes_once(tmp_path, monkeypatch):
    from keras.src.backend.common import global_state

    model = tiny_model()
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    files.save_weights(model, tmp_path / "first.weights.h5")
    listed = []  # Keras stores each list it works out, whatever name it then looks it up under
    store = global_state.set_global_attribute

    def recording_store(name, value):
        if name.startswith("saving_attr_"):
            listed.append(name)
        store(name, value)

    monkeypatch.setattr(global_state, "set_global_attribute", recording_store)
    files.save_weights(model, tmp_path / "best.weights.h5")
    files.save_model(model, tmp_path / "model.keras")
    copy = tiny_model()
    copy.load_weights(tmp_path / "best.weights.h5")
    assert listed == []
    assert same_weights(copy.get_weights(), model.get_weights())
    assert same_weights(keras.saving.load_model(tmp_path / "model.keras").get_weights(), model.get_weights())


def test_history_rewrite_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "history.csv"
    pd.DataFrame({"epoch": [0, 1], "loss": [2.0, 1.0]}).to_csv(path, index=False)

    def half_csv(self, target, **kwargs):
        with open(target, "w") as file:
            file.write("epoch,lo")
        raise KilledMidWrite(target)

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_csv)
    with pytest.raises(KilledMidWrite):
        files.replace_into(path, lambda temporary: pd.DataFrame({"epoch": [0]}).to_csv(temporary))
    monkeypatch.undo()
    assert list(training_resume.read_history(path)["epoch"]) == [0, 1]


def test_kill_during_export_keeps_the_previous_version_servable(tmp_path, monkeypatch):
    model = tiny_model()
    options = dict(preprocessing=Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                               crop_fraction=0.875))
    first = saved_model.export_saved_model(model, ["a", "b", "c", "d"], tmp_path, **options)
    monkeypatch.setattr(tf.saved_model, "save", lambda root, path, **kwargs: half_writer(path))
    with pytest.raises(KilledMidWrite):
        saved_model.export_saved_model(model, ["a", "b", "c", "d"], tmp_path, **options)
    monkeypatch.undo()
    # TF Serving loads numbered folders only: the half-written one is hidden, version 1 still serves
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["1"]
    assert saved_model.latest_version(tmp_path) == first
    serve = tf.saved_model.load(str(first)).signatures["serving_images"]
    out = serve(images=tf.zeros([1, 40, 40, 3]))
    assert out["probabilities"].shape == (1, 4)



def run_folder(base):
    folders = list((base / "runs").glob("lenet5-*"))
    return folders[0] if len(folders) == 1 else None


def kept_epochs(run_dir):
    """Epochs logged and backed up (0 before the first), which a resumed run keeps."""
    return (run_dir and finished_epochs(run_dir)) or 0


def empty_folders(base):
    return [directory for directory, subdirectories, files in os.walk(base) if not subdirectories and not files]


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGTERM)])
def test_ctrl_c_and_sigterm_stop_with_one_line_and_the_command_it_prints_resumes(tmp_path, first, second):
    """A real `python -m tfdogs.train` (default run folder), stopped twice between epochs, then resumed."""
    command = [sys.executable, "-m", "tfdogs.train", "--model", "lenet5", "--weights", "none", "--strategy",
               "scratch", "--data", "synthetic", "--synthetic-classes", "4", "--synthetic-images-per-class", "20",
               "--image-size", "32", "--batch-size", "16", "--epochs", "12", "--early-stopping-patience", "0",
               "--verbose", "0"]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    epochs_before = 0
    for stop in (first, second):
        # Ctrl-C as in a terminal: a test session started in the background inherits SIGINT ignored
        process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=environment, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            wait_for(lambda: kept_epochs(run_folder(tmp_path)) > epochs_before, timeout=180, process=process)
        finally:
            process.send_signal(stop)
            out, err = process.communicate(timeout=120)
        assert process.returncode == 128 + stop, out[-2000:] + err[-2000:]
        assert "Traceback" not in err, err[-3000:]
        [line] = [line for line in err.splitlines() if "Resume with: " in line]
        run_dir = run_folder(tmp_path)
        epochs_before = kept_epochs(run_dir)
        name = "Ctrl-C" if stop == signal.SIGINT else "SIGTERM"
        assert line.startswith(f"Stopped by {name} after {epochs_before} of 12 epochs in runs/{run_dir.name}; "
                               "nothing saved was lost"), line
        resume = shlex.split(line.split("Resume with: ")[1])
        named = [] if "--output" in command else ["--output", f"runs/{run_dir.name}"]  # the default run folder
        assert resume == ["python", "-m", "tfdogs.train", *command[3:], *named]
        assert empty_folders(tmp_path) == [] and not (tmp_path / "saved_models").exists()
        assert 1 <= epochs_before < 12
        command = [sys.executable, *resume[1:]]

    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=environment, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert f"Resuming the run in runs/{run_dir.name} at epoch {epochs_before + 1} of 12" in finished.stdout
    history = pd.read_csv(run_dir / "history.csv")
    assert sorted(history["epoch"]) == list(range(12))  # each epoch once
    assert (tmp_path / "saved_models" / run_dir.name / "1" / "saved_model.pb").is_file()


def test_stopping_ignores_a_second_signal_while_it_tidies_and_gives_the_handlers_back(tmp_path, capsys, monkeypatch):
    """A process that goes on after a stopped run (a notebook, a test session) stops on the next Ctrl-C again."""
    from tfdogs.training import interruption

    seen = {}

    def during_tidy(folder):
        seen["during"] = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))

    def own_handler(signum, frame):
        raise KeyboardInterrupt

    before = {number: signal.signal(number, own_handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        monkeypatch.setattr(interruption, "_remove_empty_folders", during_tidy)  # called while tidying
        status = interruption.stopped(KeyboardInterrupt(), ["python", "-m", "tfdogs.train"], run_dir=tmp_path)
        assert status == 130 and "Stopped by Ctrl-C" in capsys.readouterr().err
        assert seen["during"] == (signal.SIG_IGN, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGINT) is own_handler and signal.getsignal(signal.SIGTERM) is own_handler
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
