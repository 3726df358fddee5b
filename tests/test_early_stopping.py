"""Early stopping ends a phase with its best epoch: averaged with --ema, and from disk after a resume.

References: the weight average recomputed in NumPy from the raw weights after
every step (Keras' rule: the first step's weights, then momentum * average +
(1 - momentum) * weights), and the weights a test gave the model at each epoch.
"""

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import small_config

from tfdogs import files, models
from tfdogs.training import callbacks as training_callbacks, loop as training_loop


class RawWeightsAfterEachStep(keras.callbacks.Callback):
    """The trainable weights after every training step (raw: validation swaps the average in only around itself)."""

    def __init__(self):
        super().__init__()
        self.steps = []  # (epoch, [arrays])

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append((self.epoch, [np.array(variable.numpy(), np.float64)
                                        for variable in self.model.trainable_weights]))


def numpy_average_at_end_of(epoch, steps, momentum):
    average = None
    for step_epoch, weights in steps:
        if step_epoch > epoch:
            break
        average = weights if average is None else [momentum * a + (1 - momentum) * w
                                                   for a, w in zip(average, weights)]
    return average


def trainable_arrays(path):
    model = models.build("lenet5", 4, input_shape=(32, 32, 3))
    model.load_weights(path)
    return [variable.numpy() for variable in model.trainable_weights]


def test_with_ema_a_phase_that_stops_early_ends_with_the_average_of_its_best_epoch(tmp_path):
    momentum = 0.9
    recorder = RawWeightsAfterEachStep()
    config = small_config(output=str(tmp_path / "run"), export_dir=str(tmp_path / "export"), epochs=8, ema=momentum,
                          early_stopping_patience=1, monitor="val_accuracy",
                          precision="float32")
    run_dir = training_loop.train(config, extra_callbacks=[recorder])
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) < 8, "early stopping did not stop the run: the test needs it to"
    best_epoch = int(history["epoch"][history["val_accuracy"].idxmax()])
    assert best_epoch < history["epoch"].iloc[-1]
    expected = numpy_average_at_end_of(best_epoch, recorder.steps, momentum)
    raw_at_best = [weights for epoch, weights in recorder.steps if epoch == best_epoch][-1]
    assert max(np.abs(e - r).max() for e, r in zip(expected, raw_at_best)) > 1e-3  # the average is not the raw
    phase_end = trainable_arrays(run_dir / "phase-all.weights.h5")
    for got, want in zip(phase_end, expected):
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


# ----------------------------------------------------------------------------- the phase's best, on disk


def tiny_model():
    model = models.build("lenet5", 4, input_shape=(32, 32, 3))
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    return model


def weights_of_epoch(epoch):
    keras.utils.set_random_seed(100 + epoch)
    return models.build("lenet5", 4, input_shape=(32, 32, 3)).get_weights()


def run_epochs(checkpoint, model, scores, first_epoch, left_after=99):
    """Drives the callback as `fit` would: each epoch's weights set, then its score logged.

    `left_after`: the epoch whose weights the model holds when training ends, never a best
    (99); None: the last epoch's, as `fit` leaves them.
    """
    checkpoint.set_model(model)
    checkpoint.on_train_begin()
    for epoch, score in enumerate(scores, first_epoch):
        model.set_weights(weights_of_epoch(epoch))
        checkpoint.on_epoch_end(epoch, {"val_accuracy": score})
    if left_after is not None:
        model.set_weights(weights_of_epoch(left_after))
    checkpoint.on_train_end()


def assert_weights(model, epoch):
    for got, want in zip(model.get_weights(), weights_of_epoch(epoch)):
        np.testing.assert_array_equal(got, want)


def checkpoint_of_phase(tmp_path, history, phase_start):
    return training_callbacks.BestCheckpoint(tmp_path / "best.weights.h5", tmp_path / "backup/all/best.weights.h5",
                                             "val_accuracy", history, phase_start, restore=True)


def test_a_phase_whose_best_is_below_an_earlier_phase_ends_with_its_own_best(tmp_path):
    # epoch 0 (the head phase) scored 0.9; the phase from epoch 1 on peaks at epoch 2 with 0.7
    files.save_weights(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]), tmp_path / "best.weights.h5")
    history = pd.DataFrame({"epoch": [0], "val_accuracy": [0.9]})
    model = tiny_model()
    run_epochs(checkpoint_of_phase(tmp_path, history, 1), model, [0.5, 0.7, 0.6], first_epoch=1)
    assert_weights(model, 2)
    assert (tmp_path / "backup/all/best.weights.h5").is_file()  # the phase's own file, the run's best untouched


@pytest.mark.parametrize("run_best", [0.9, 0.1])
def test_a_resumed_phase_ends_with_its_best_epoch_from_before_the_interruption(tmp_path, run_best):
    # Epochs 0 (head) and 1-3 ran before the kill; epoch 2 was the phase's best; epochs 4-5 run after.
    history = pd.DataFrame({"epoch": [0, 1, 2, 3], "val_accuracy": [run_best, 0.5, 0.7, 0.6]})
    first = checkpoint_of_phase(tmp_path, history.iloc[:1], 1)
    run_epochs(first, tiny_model(), [0.5, 0.7, 0.6], first_epoch=1)
    resumed = tiny_model()
    run_epochs(checkpoint_of_phase(tmp_path, history, 1), resumed, [0.65, 0.7], first_epoch=4)
    assert_weights(resumed, 2)  # not epoch 4, the first the resumed run saw, nor epoch 5 (equal, not better)


def test_without_early_stopping_the_phase_ends_with_its_last_weights(tmp_path):
    checkpoint = training_callbacks.BestCheckpoint(tmp_path / "best.weights.h5", tmp_path / "phase.weights.h5",
                                                   "val_accuracy", pd.DataFrame(), 0, restore=False)
    model = tiny_model()
    run_epochs(checkpoint, model, [0.5, 0.7, 0.6], first_epoch=0)
    assert_weights(model, 99)
    best = models.build("lenet5", 4, input_shape=(32, 32, 3))
    best.load_weights(tmp_path / "best.weights.h5")
    assert_weights(best, 1)


# ----------------------------------------------------------------------------- the phase's weights file


def phase_weights_saved(tmp_path, scores, restore, earlier_phase_best):
    """The phase's weights file after a phase from epoch 1 on; epoch 0, an earlier phase's, scored `earlier_phase_best`."""
    files.save_weights(tiny_model(), tmp_path / "best.weights.h5")  # epoch 0's, which no test expects back
    history = pd.DataFrame({"epoch": [0], "val_accuracy": [earlier_phase_best]})
    checkpoint = training_callbacks.BestCheckpoint(tmp_path / "best.weights.h5", tmp_path / "phase-best.weights.h5",
                                                   "val_accuracy", history, 1, restore=restore)
    model = tiny_model()
    run_epochs(checkpoint, model, scores, first_epoch=1, left_after=None)  # nothing changes them after
    files.save_weights(model, tmp_path / "phase-all.weights.h5", copy_of=checkpoint.ended_with)
    saved = models.build("lenet5", 4, input_shape=(32, 32, 3))
    saved.load_weights(tmp_path / "phase-all.weights.h5")
    return model, saved


@pytest.mark.parametrize("scores, restore, earlier_phase_best, ends_with", [
    ([0.5, 0.7, 0.6], True, 0.1, 2),   # restored from the run's best checkpoint
    ([0.5, 0.7, 0.6], True, 0.9, 2),   # restored from the phase's own, below the earlier phase's best
    ([0.5, 0.7, 0.9], False, 0.1, 3),  # the last epoch is the best: its checkpoint holds the last weights
    ([0.5, 0.7, 0.9], False, 0.95, 3),  # the same in the phase's own checkpoint
    ([0.5, 0.7, 0.6], False, 0.1, 3),  # the last epoch is not the best: the best checkpoint holds other weights
    ([0.9, 0.7, 0.6], True, 0.1, 1),
])
def test_the_phase_weights_file_holds_the_weights_the_phase_ends_with(tmp_path, scores, restore, earlier_phase_best,
                                                                      ends_with):
    model, saved = phase_weights_saved(tmp_path, scores, restore, earlier_phase_best)
    assert_weights(model, ends_with)
    assert_weights(saved, ends_with)
