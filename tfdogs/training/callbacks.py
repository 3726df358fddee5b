"""Keras callbacks of a run: checkpoints written atomically, resumable early stopping, epoch-keyed seeds."""

import contextlib
import json
import os
import pathlib

import keras
import numpy as np
import tensorflow as tf

from tfdogs import files
from tfdogs.training.cluster import broadcast_from_chief
from tfdogs.training.resume import MONITOR_MODES, best_so_far


class WeightAverage(keras.callbacks.SwapEMAWeights):
    """Validation and the best checkpoint see the moving average of the weights (`--ema`).

    Keras swaps the average in for each validation pass; `swapped()` does the
    same around a save. Training and the resume backup keep the raw weights,
    and the optimizer state saved with the backup holds the average, so a
    resumed run averages on exactly as before. At the end of each phase Keras
    puts the average into the model for good (`finalize_variable_values`):
    the phase weights, and the start of the next phase, are the average.
    """

    def __init__(self):
        super().__init__(swap_on_epoch=False)

    @contextlib.contextmanager
    def swapped(self):
        self._swap_variables()  # Keras' own swap, the one it runs around validation
        try:
            yield
        finally:
            self._swap_variables()



def resolve_monitor(config, layout):
    """What the best checkpoint and early stopping follow: the config's choice, or by the data's layout.

    The Kaggle competition scores log loss, so its layout is monitored by
    validation log loss; other data by validation accuracy.
    """
    if config["monitor"] != "auto":
        return config["monitor"]
    return "val_log_loss" if layout == "kaggle" else "val_accuracy"


class EpochKeyedSeeds(keras.callbacks.Callback):
    """Sets the model's random state (dropout masks) from (seed, epoch) at the start of every epoch.

    Keras keeps each Dropout layer's seed in a variable that advances with
    every step and is not part of the saved weights; a resumed run would
    start it afresh. Keyed by the epoch, the masks of epoch e are the same
    whether or not the run was interrupted before it.
    """

    def __init__(self, seed):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch, logs=None):
        generators = [generator for layer in self.model._flatten_layers()  # Keras' own walk over sub-layers
                      for generator in layer._seed_generators]
        epoch_key = tf.random.experimental.stateless_fold_in(tf.constant([self.seed, 0], tf.int64), epoch)
        for index, generator in enumerate(generators):
            key = tf.random.experimental.stateless_fold_in(epoch_key, index)
            generator.state.assign(tf.cast(tf.stack([key[0], 0]), generator.state.dtype))


class LearningRateLogger(keras.callbacks.Callback):
    """Adds to each epoch's logs the learning rate of its first step.

    Read when the epoch begins: at its end the step counter has moved on, and
    the optimizer would report the next epoch's first rate.
    """

    rate = None

    def on_epoch_begin(self, epoch, logs=None):
        self.rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = self.rate


class StopOnNonFinite(keras.callbacks.TerminateOnNaN):
    """Stops on a non-finite loss and remembers where, so the run can say so."""

    stopped_at = None

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self.stopped_at = (self.epoch, batch)
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint that writes a temporary file and renames it over the previous best.

    Keras writes the file in place, so a kill mid-save would leave a corrupt
    best.weights.h5 where a good one was.
    """

    weight_average = None  # a WeightAverage: save the averaged weights
    saved_model = None  # the model to save when fit trains a part of it (the head on cached features)

    def _save_model(self, epoch, batch, logs):  # Keras 3 ModelCheckpoint's single point of writing
        filepath = self._get_file_path(epoch, batch, logs)
        if self._should_save_model(epoch, batch, logs, filepath):
            average = self.weight_average.swapped() if self.weight_average else contextlib.nullcontext()
            with average:
                target = self.saved_model or self.model
                if self.save_weights_only:
                    files.save_weights(target, filepath)
                else:
                    files.save_model(target, filepath)


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore whose weights and epoch counter are each replaced by a rename.

    Keras writes both in place: a kill mid-save leaves a backup that cannot be
    loaded, and the run cannot resume. Weights go first, so a kill between the
    two renames redoes one epoch from later weights rather than losing it.
    """

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        files.save_weights(self.model, self._weights_path, optimizer_state=True)
        state = json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen})
        files.replace_into(self._training_metadata_path, lambda temporary: pathlib.Path(temporary).write_text(state))


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that, in a resumed phase, starts from the count it had reached before the interruption.

    Keras starts every `fit` with no best value and no waiting; replaying the
    phase's rows of history.csv gives the state an uninterrupted run has at
    that epoch, so both stop at the same epoch.
    """

    def __init__(self, earlier_values, **kwargs):
        super().__init__(**kwargs)
        self.earlier_values = list(earlier_values)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        better = (lambda value, best: value > best) if self.mode == "max" else (lambda value, best: value < best)
        for value in self.earlier_values:  # as on_epoch_end counts, with min_delta 0
            self.wait += 1
            if self.best is None or better(value, self.best):
                self.best, self.wait = value, 0


class SyncFromChief(keras.callbacks.Callback):
    """Multi-worker: every worker takes the chief's weights and optimizer state as a fit begins.

    Only the chief keeps the run folder, so only it restores a backup or a
    finished phase's weights; placed after BackupAndRestore, this hands the
    restored state to the others (the same values on every worker otherwise).
    """

    def __init__(self, strategy):
        super().__init__()
        self.strategy = strategy

    def on_train_begin(self, logs=None):
        broadcast_from_chief(self.strategy, [*self.model.weights, *self.model.optimizer.variables])


class BestValidationLogits(keras.callbacks.Callback):
    """The logits of the best epoch's validation pass, so that the final evaluation need not run again.

    The model's `compute_metrics` (Keras' hook, replaced on this model only)
    hands each validation batch's logits to Python as the pass computes them;
    nothing is computed twice. An epoch whose `monitor` value beats every
    earlier one (the best checkpoint's rule: strictly better, `best` carried
    over from a resumed run's history) keeps its pass: `epoch` (0-based) and
    `logits` (float32, in the validation dataset's order), else None. One
    replica only: under a distribution strategy the batches' order across
    replicas is not the dataset's. The hooks are the model's own again once
    `fit` ends, so the recorder of a later phase is the only one fed.

    Args:
        model: the model `fit` trains and validates.
        monitor: the metric the best checkpoint follows.
        best: the best value of earlier epochs (a resumed run), or None.
    """

    def __init__(self, model, monitor, best=None):
        super().__init__()
        self.monitor, self.mode = monitor, MONITOR_MODES[monitor]
        self.best, self.epoch, self.logits = best, None, None
        self._batches, self._in_test_step = [], False
        self._hooked = model
        self._replaced = {name: vars(model).get(name) for name in ("test_step", "compute_metrics")}
        test_step, compute_metrics = model.test_step, model.compute_metrics

        def recording_test_step(data):
            self._in_test_step = True  # while Keras traces the validation step
            try:
                return test_step(data)
            finally:
                self._in_test_step = False

        def recording_compute_metrics(x, y, y_pred, sample_weight=None):
            if self._in_test_step:
                tf.py_function(lambda logits: self._batches.append(np.asarray(logits, np.float32)), [y_pred], [])
            return compute_metrics(x, y, y_pred, sample_weight=sample_weight)

        model.test_step, model.compute_metrics = recording_test_step, recording_compute_metrics

    def on_test_begin(self, logs=None):
        self._batches = []

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not self._batches:
            return
        better = np.greater if self.mode == "max" else np.less
        if self.best is None or better(value, self.best):
            self.best, self.epoch, self.logits = value, epoch, np.concatenate(self._batches)

    def on_train_end(self, logs=None):
        for name, own in self._replaced.items():
            if own is None:
                vars(self._hooked).pop(name, None)  # the class's method again
            else:
                setattr(self._hooked, name, own)
        self._hooked.test_function = None  # the traced validation step that records; rebuilt when next needed


def fit_under_multi_worker(model):
    """Works around two Keras 3.15 bugs that stop `fit` under MultiWorkerMirroredStrategy.

    1. Before training Keras draws one batch and averages the (images,
       labels) tuple with `strategy.reduce`, which the strategy refuses for
       a tuple ("Attempt to convert a value (PerReplica ...) to a Tensor", the
       crash first reported): only the batch's shapes matter there, and this
       worker's first replica has them.
    2. It averages each step's scalar logs with `strategy.reduce(axis=0)`,
       which fails on a scalar ("Invalid reduction dimension 0"): the steps
       here give them as [1] tensors, which that reduction averages to the
       same scalar.

    Both are Keras' own hooks, replaced on this model only.
    """
    strategy = model.distribute_strategy

    def local(value):
        return strategy.experimental_local_results(value)[0] if isinstance(
            value, tf.distribute.DistributedValues) else value

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(local, next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    def vector_logs(step):
        def step_with_vector_logs(data):
            return tf.nest.map_structure(lambda value: tf.reshape(value, [1]) if value.shape.rank == 0 else value,
                                         step(data))
        return step_with_vector_logs

    model._maybe_symbolic_build = maybe_symbolic_build
    model.train_step = vector_logs(model.train_step)
    model.test_step = vector_logs(model.test_step)


def make_callbacks(config, run_dir, phase, history, monitor):
    """The callbacks of one phase's fit, their state carried over from `history` when it resumes."""
    best_value, best_epoch = best_so_far(history, monitor)
    checkpoint = AtomicModelCheckpoint(
        run_dir / "best.weights.h5", monitor=monitor, mode=MONITOR_MODES[monitor],
        save_best_only=True, save_weights_only=True)
    if best_value is not None:
        checkpoint.best = best_value  # a resumed run keeps the best of its earlier epochs
    non_finite = StopOnNonFinite()
    averaging = []
    if config["ema"]:
        checkpoint.weight_average = WeightAverage()
        averaging.append(checkpoint.weight_average)
    callbacks = [
        *averaging,  # first: validation sees the averaged weights
        EpochKeyedSeeds(config["seed"]),
        LearningRateLogger(),
        non_finite,
        checkpoint,
        keras.callbacks.TensorBoard(run_dir / "tensorboard", write_graph=False),
        # The history row goes before the backup: a kill between them redoes the epoch and
        # `read_history` keeps its last row, where the other order would lose the row.
        keras.callbacks.CSVLogger(run_dir / "history.csv", append=True),
        # Kept after the phase (train removes it once a later phase follows), so --epochs can grow.
        AtomicBackupAndRestore(run_dir / "backup" / phase.name, delete_checkpoint=False),
    ]
    if config["early_stopping_patience"]:
        this_phase = history[history["epoch"] >= phase.start_epoch] if not history.empty else history
        callbacks.append(ResumableEarlyStopping(
            this_phase[monitor] if monitor in this_phase else [],
            monitor=monitor, mode=MONITOR_MODES[monitor], patience=config["early_stopping_patience"],
            restore_best_weights=True))
    return callbacks, non_finite
