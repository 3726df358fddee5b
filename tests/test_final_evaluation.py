"""What a run does after its last epoch and before its first: no pass computed twice, no step traced twice."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_scores_match, reference_run_scores, small_config

from tfdogs.evaluation import metrics
from tfdogs.runs import folder as run_folder
from tfdogs.training import loop as training_loop, resume
from tfdogs.training.callbacks import BestValidationLogits
from tfdogs.training.optimizer import compile_model


def separable(count, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, count)
    inputs = rng.standard_normal((count, 6)).astype(np.float32) * 0.3
    inputs[np.arange(count), labels] += 2.0
    return inputs, np.eye(3, dtype=np.float32)[labels]


def small_classifier():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])


def test_the_recorded_logits_are_the_best_checkpoints_own_validation_pass(tmp_path):
    """In dataset order across batches, of the best epoch (not the last), and a resumed run's best carries over."""
    train, val = separable(96, 0), separable(40, 1)
    model = small_classifier()
    compile_model(model, small_config(optimizer="adam", label_smoothing=0.0), 0.05, {}, jit_compile=False)
    recorder = BestValidationLogits(model, "val_accuracy")
    checkpoint = keras.callbacks.ModelCheckpoint(tmp_path / "best.weights.h5", monitor="val_accuracy", mode="max",
                                                 save_best_only=True, save_weights_only=True)
    history = model.fit(*train, batch_size=16, epochs=8, validation_data=tf.data.Dataset.from_tensor_slices(
        val).batch(16), callbacks=[recorder, checkpoint], verbose=0, shuffle=False).history
    best_epoch = int(np.argmax(history["val_accuracy"]))  # the first of equal bests, as the checkpoint keeps
    assert recorder.epoch == best_epoch < 7  # separable: the accuracy tops out early, later epochs only tie
    assert recorder.logits.shape == (40, 3)
    last = model.predict(val[0], verbose=0)
    model.load_weights(tmp_path / "best.weights.h5")
    best = model.predict(val[0], verbose=0)
    np.testing.assert_allclose(recorder.logits, best, atol=1e-5)
    assert np.abs(last - best).max() > 1e-2  # the last epoch's logits would have been caught
    assert metrics.scores(metrics.softmax(recorder.logits), val[1].argmax(1))["accuracy"] == pytest.approx(
        history["val_accuracy"][best_epoch])

    model = small_classifier()
    compile_model(model, small_config(optimizer="adam", label_smoothing=0.0), 0.05, {}, jit_compile=False)
    carried = BestValidationLogits(model, "val_accuracy", best=1.0)  # an earlier epoch was already perfect
    model.fit(*train, batch_size=16, epochs=2, validation_data=val, callbacks=[carried], verbose=0)
    assert carried.epoch is None and carried.logits is None

    # a later phase (compiled again, its own recorder) feeds only its own recorder
    fed = len(carried._batches)
    compile_model(model, small_config(optimizer="adam", label_smoothing=0.0), 0.05, {}, jit_compile=False)
    later = BestValidationLogits(model, "val_accuracy")
    model.fit(*train, batch_size=16, epochs=2, validation_data=val, callbacks=[later], verbose=0)
    assert len(carried._batches) == fed  # the first recorder's hooks went with its fit
    assert later.epoch == 0 and later.logits.shape == (40, 3)


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_a_run_scores_its_best_epoch_from_that_epochs_validation_pass(tmp_path, precision):
    """metrics.json's scores are model.keras's on the validation photos, recomputed by the Pillow/NumPy reference."""
    config = small_config(epochs=4, precision=precision, monitor="val_log_loss", output=str(tmp_path / "run"),
                          export_dir=str(tmp_path / "export"))
    run_dir = training_loop.train(config)
    summary = json.loads((run_dir / "metrics.json").read_text())
    history = resume.read_history(run_dir / "history.csv")
    best = summary["best_epoch"] - 1
    assert summary["val_scored_by"] == f"the best epoch's validation pass ({precision})"
    assert best == int(history["val_log_loss"].idxmin())
    # the reference runs model.keras in float32: measured 6.8e-9 from the float32 run's log loss, 4.2e-4 from
    # the bfloat16 validation pass of the mixed_bfloat16 run
    reference = reference_run_scores(run_dir)
    tolerance = 1e-6 if precision == "float32" else 2e-3
    assert_scores_match(summary["val"], reference["val"], tolerance, f"metrics.json val ({precision})")
    assert history["val_log_loss"].iloc[best] == pytest.approx(reference["val"]["log_loss"], abs=tolerance)
    run = run_folder.load_run(run_dir)
    records, _, val_indices = run.split()
    served = metrics.scores(run_folder.predict_paths(run.load_model(), [records.paths[i] for i in val_indices],
                                                     run.preprocessing), records.labels[val_indices])
    # model.keras serves float32 with the fitted temperature: as the recorded pass in float32, to bfloat16's
    # rounding after a mixed-precision run
    tolerance = 1e-5 if precision == "float32" else 2e-2
    assert served["log_loss"] == pytest.approx(summary["val_calibrated"]["log_loss"], abs=tolerance)


def test_the_training_step_is_traced_once():
    """The optimizer's variables exist before the first step, so TensorFlow traces that step once, not twice."""
    model = small_classifier()
    compile_model(model, small_config(optimizer="adamw", label_smoothing=0.0), 1e-3, {}, jit_compile=False)
    traces = []
    step = model.train_step

    def counted(data):
        traces.append(1)
        return step(data)

    model.train_step = counted
    model.fit(*separable(32, 0), batch_size=16, epochs=2, verbose=0)
    assert len(traces) == 1


def test_the_command_ends_with_its_status_its_whole_output_and_its_atexit_work(tmp_path):
    """`python -m tfdogs.train` leaves by `os._exit` (no interpreter teardown), having done what an exit does."""
    script = ("import atexit, runpy, sys; atexit.register(lambda: print('atexit ran')); "
              "sys.argv[0] = 'tfdogs.train'; runpy.run_module('tfdogs.train', run_name='__main__', alter_sys=True); "
              "print('not reached')")
    flags = ["--model", "lenet5", "--weights", "none", "--strategy", "scratch", "--data", "synthetic",
             "--synthetic-classes", "4", "--synthetic-images-per-class", "12", "--image-size", "32", "--batch-size",
             "16", "--epochs", "1", "--verbose", "0", "--output", str(tmp_path / "run"), "--export-dir",
             str(tmp_path / "export")]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", script, *flags], capture_output=True, text=True, timeout=300,
                          env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-2].startswith("Time: start up ") and lines[-1] == "atexit ran"  # buffered output not lost
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "export" / "1" / "saved_model.pb").is_file()
    failed = subprocess.run([sys.executable, "-c", script, "--model", "lenet5", "--data-dir", str(tmp_path / "nowhere"),
                             "--output", str(tmp_path / "run2")], capture_output=True, text=True, timeout=300,
                            env=environment)
    assert failed.returncode == 2 and "nowhere" in failed.stderr and failed.stdout.endswith("atexit ran\n")


def test_a_python_caller_of_the_command_function_goes_on_after_it(tmp_path):
    """`tfdogs.train.run_command` returns the exit status; only `python -m` ends the process at once."""
    script = ("import sys; from tfdogs.train import run_command; "
              "status = run_command(sys.argv[1:]); print('the caller goes on with', status)")
    done = subprocess.run([sys.executable, "-c", script, "--model", "lenet5", "--data-dir", str(tmp_path / "nowhere"),
                           "--output", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "the caller goes on with 2", done.stderr[-2000:]
