"""Keras callbacks of a run: checkpoints written atomically, resumable early stopping, epoch-keyed seeds."""

import contextlib
import pathlib

import keras
import numpy as np
import tensorflow as tf

from tfdogs import files
from tfdogs.training.cluster import broadcast_from_chief
from tfdogs.training.resume import MONITOR_MODES, best_so_far, restore_backup, training_state, write_backup


class WeightAverage(keras.callbacks.SwapEMAWeights):
    """Validation and the best checkpoint see the moving average of the weights (`--ema`).

    Keras swaps the average in for each validation pass; `swapped()` does the
    same around a save. Training and the resume backup keep the raw weights,
    and the optimizer state saved with the backup holds the average, so a
    resumed run averages on exactly as before. At the end of each phase Keras
    puts the average into the model for good (`finalize_variable_values`),
    and with early stopping `BestCheckpoint` then loads the best epoch's
    average: the phase weights, and the start of the next phase, are the
    average.
    """

    def __init__(self):
        super().__init__(swap_on_epoch=False)

    @contextlib.contextmanager
    def swapped(self):
        # Private (docs/keras-internals.md): Keras' swap around validation; no public one leaves the backup raw.
        self._swap_variables()
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
        # Private (docs/keras-internals.md): Keras lists a model's seed generators only through these.
        generators = [generator for layer in self.model._flatten_layers() for generator in layer._seed_generators]
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


class BestCheckpoint(keras.callbacks.Callback):
    """The run's best epoch in `path`; with `restore`, the phase ends with the phase's best epoch.

    An epoch whose `monitor` value beats every earlier epoch of the run
    (strictly, as Keras' ModelCheckpoint and EarlyStopping compare) is saved
    to `path` (`RUN/best.weights.h5`), written whole or not at all. With
    `restore` (early stopping on) the phase ends as Keras' EarlyStopping with
    `restore_best_weights` ends it, with the weights of the phase's best
    epoch, but from the saved file: with `--ema` that is the average (Keras
    would put back the raw weights over the average it just finalized), and a
    resumed phase whose best epoch came before the interruption gets that
    epoch back (Keras would only know the epochs since). The phase's best is
    in `path` unless an earlier phase's epoch beats it; such a phase's best
    goes to `phase_path` (in the phase's backup folder), so each epoch is
    written at most once. After `fit`, `ended_with` names the file that holds
    exactly the weights the phase ended with, where one does: the file it
    restored, or without `restore` the last epoch's own save.

    Args:
        path: the run's best checkpoint.
        phase_path: the phase's best when it is not the run's.
        monitor: the metric followed (`MONITOR_MODES`).
        history: the run's history.csv so far (a resumed run), or empty.
        phase_start: the phase's first epoch (0-based).
        restore: end `fit` with the phase's best epoch.
        weight_average: a WeightAverage: save the averaged weights.
        saved_model: the model saved and restored when `fit` trains a part
            of it (the head on cached features); None: the model fit trains.
        strategy: a multi-worker strategy: after the restore, every worker
            takes the chief's weights (only the chief keeps the run folder).
    """

    def __init__(self, path, phase_path, monitor, history, phase_start, restore=False, weight_average=None,
                 saved_model=None, strategy=None):
        super().__init__()
        self.path, self.phase_path = pathlib.Path(path), pathlib.Path(phase_path)
        self.monitor, self.better = monitor, (np.greater if MONITOR_MODES[monitor] == "max" else np.less)
        self.restore, self.weight_average = restore, weight_average
        self.saved_model, self.strategy = saved_model, strategy
        self.best, run_epoch = best_so_far(history, monitor)
        this_phase = history[history["epoch"] >= phase_start] if not history.empty else history
        self.phase_best, self.phase_epoch = best_so_far(this_phase, monitor)
        self.phase_in_path = self.phase_epoch is not None and self.phase_epoch == run_epoch
        self.saved_this_epoch = self.ended_with = None

    @property
    def target(self):
        return self.saved_model or self.model

    def on_epoch_end(self, epoch, logs=None):
        self.saved_this_epoch = None
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        run_best = self.best is None or self.better(value, self.best)
        if run_best:
            self.best = value
            self._save(self.path)
        if self.phase_best is None or self.better(value, self.phase_best):
            self.phase_best, self.phase_epoch, self.phase_in_path = value, epoch, run_best
            if not run_best:
                self._save(self.phase_path)

    def _save(self, path):
        average = self.weight_average.swapped() if self.weight_average else contextlib.nullcontext()
        with average:
            files.save_weights(self.target, path)
        self.saved_this_epoch = path

    def on_train_end(self, logs=None):
        self.ended_with = None
        if not self.restore or self.phase_epoch is None:
            # the last epoch's own save holds the weights fit ends with, unless Keras then puts the average in
            self.ended_with = None if self.weight_average else self.saved_this_epoch
            return
        path = self.path if self.phase_in_path else self.phase_path
        if path.is_file():
            load_weights_only(self.target, path)
            self.ended_with = path
        elif self.strategy is None:  # another worker than the chief has no run folder: the chief's come below
            raise FileNotFoundError(f"{path} is missing: it holds the best epoch ({self.phase_epoch + 1}) that "
                                    "the phase ends with.")
        if self.strategy is not None:
            broadcast_from_chief(self.strategy, self.target.weights)


def load_weights_only(model, path):
    """`model.load_weights(path)` for a file without optimizer state, leaving a compiled model's optimizer as it is."""
    optimizer = getattr(model, "optimizer", None)
    model.optimizer = None
    try:
        model.load_weights(path)
    finally:
        model.optimizer = optimizer


class ResumeBackup(keras.callbacks.Callback):
    """The state a killed phase resumes from, in its backup folder, and restored as the next `fit` begins.

    After every epoch: the weights with the optimizer's state (moments, step
    counter, weight average) in `latest.state.npz`, then the number of epochs
    done in `training_metadata.json`, each written whole and renamed into
    place (`resume.write_backup`). The state is copied out of the model at
    the epoch's end and written by a thread while the next epoch trains
    (ResNet-18 with AdamW: 134 MB, 0.65-1.24 s on a 2-core Xeon). That
    write is in place before the next epoch's validation begins, so before
    its history row: history.csv never runs more than one epoch ahead of the
    backup (`resume.check_backups_kept`). As `fit` begins, the weights and
    optimizer state come back; `fit` starts at the backed-up epoch
    (`resume.backed_up_epoch`, given as its `initial_epoch`). Keras'
    BackupAndRestore writes both files in place, where a kill mid-save leaves
    a backup that cannot be loaded.
    """

    def __init__(self, folder):
        super().__init__()
        self.folder = pathlib.Path(folder)
        self.state = None  # the arrays each epoch's state is copied into, once the first is written

    def on_train_begin(self, logs=None):
        # other workers than the chief have none: `SyncFromChief` gives them the chief's
        restore_backup(self.model, self.folder)

    def on_test_begin(self, logs=None):
        files.wait_for_writes()

    def on_epoch_end(self, epoch, logs=None):
        files.wait_for_writes()
        self.state = training_state(self.model, into=self.state)
        files.write_in_background(write_backup, self.folder, self.state, epoch + 1)

    def on_train_end(self, logs=None):
        files.wait_for_writes()


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that, in a resumed phase, starts from the count it had reached before the interruption.

    Keras starts every `fit` with no best value and no waiting; replaying the
    phase's rows of history.csv gives the state an uninterrupted run has at
    that epoch, so both stop at the same epoch. It only stops: the phase's
    best weights come back from `BestCheckpoint`, which has them on disk.
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
    finished phase's weights; placed after ResumeBackup, this hands the
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
        path: where each new best pass is also written (`read_best_pass`), so
            that a run resumed after its best epoch scores it as an
            uninterrupted run does; None: kept in memory only.
    """

    def __init__(self, model, monitor, best=None, path=None):
        super().__init__()
        self.monitor, self.mode, self.path = monitor, MONITOR_MODES[monitor], path
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
            if self.path is not None:
                files.replace_into(self.path, lambda temporary: np.savez(temporary, epoch=epoch, logits=self.logits))

    def on_train_end(self, logs=None):
        for name, own in self._replaced.items():
            if own is None:
                vars(self._hooked).pop(name, None)  # the class's method again
            else:
                setattr(self._hooked, name, own)
        self._hooked.test_function = None  # the traced validation step that records; rebuilt when next needed


def read_best_pass(path):
    """{epoch: logits} of the best validation pass `BestValidationLogits` wrote to `path`; {} without one."""
    path = pathlib.Path(path)
    if not path.is_file():
        return {}
    with np.load(path) as saved:
        return {int(saved["epoch"]): saved["logits"]}


def make_callbacks(config, run_dir, phase, history, monitor, saved_model=None, strategy=None):
    """The callbacks of one phase's fit, their state carried over from `history` when it resumes.

    Args:
        config: the run's config.
        run_dir: the run folder.
        phase: the `Phase` this fit trains.
        history: the run's history.csv so far.
        monitor: what the best checkpoint and early stopping follow.
        saved_model: the whole model when `fit` trains a part of it (the head on cached features).
        strategy: a multi-worker strategy (the chief alone keeps the run folder), else None.

    Returns:
        (callbacks, the StopOnNonFinite among them, the BestCheckpoint among them).
    """
    early_stopping = bool(config["early_stopping_patience"])
    checkpoint = BestCheckpoint(
        run_dir / "best.weights.h5", run_dir / "backup" / phase.name / "best.weights.h5", monitor, history,
        phase.start_epoch, restore=early_stopping, saved_model=saved_model, strategy=strategy)
    non_finite = StopOnNonFinite()
    averaging = []
    if config["ema"]:
        checkpoint.weight_average = WeightAverage()
        averaging.append(checkpoint.weight_average)
    callbacks = [
        *averaging,  # first: validation sees the averaged weights, and Keras finalizes them before the restore
        EpochKeyedSeeds(config["seed"]),
        LearningRateLogger(),
        non_finite,
        checkpoint,
        keras.callbacks.TensorBoard(run_dir / "tensorboard", write_graph=False),
        # The history row goes before the backup: a kill between them redoes the epoch and
        # `read_history` keeps its last row, where the other order would lose the row.
        keras.callbacks.CSVLogger(run_dir / "history.csv", append=True),
        # Kept after the phase (train removes it once a later phase follows), so --epochs can grow.
        ResumeBackup(run_dir / "backup" / phase.name),
    ]
    if early_stopping:
        this_phase = history[history["epoch"] >= phase.start_epoch] if not history.empty else history
        # Stops only: the best checkpoint restores the phase's best epoch, averaged with --ema.
        callbacks.append(ResumableEarlyStopping(
            this_phase[monitor] if monitor in this_phase else [],
            monitor=monitor, mode=MONITOR_MODES[monitor], patience=config["early_stopping_patience"]))
    return callbacks, non_finite, checkpoint
