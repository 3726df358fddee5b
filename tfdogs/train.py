"""`python -m tfdogs.train`: the study's experiment end to end.

Loads labelled dog photos, splits them (stratified, seeded), trains LeNet-5 or
ResNet-18/34 with a transfer strategy, and writes a run folder:

    config.yaml    the resolved settings (re-run with --config RUN/config.yaml)
    problems.csv   every bad file or labels.csv row, and whether it was skipped,
                   converted (the copy is in converted/) or kept (see tfdogs.check)
    split.csv      which photo went to training and which to validation
    history.csv    per-epoch loss, accuracy, top-5, log loss, learning rate
    metrics.json   validation scores of the best epoch, the trivial baselines
                   (and the untrained ImageNet classifier's, also in zeroshot.json)
    curves.png     loss and accuracy, training against validation
    model.keras    the best model (plain Keras layers: loads without tfdogs)
    best.weights.h5, tensorboard/, backup/ (resume state while training)

and a SavedModel for TF Serving under `saved_models/<run name>/<version>/`.

Examples:
    python -m tfdogs.train --model resnet18 --data-dir path/to/dog-breed-identification
    python -m tfdogs.train --config configs/lenet5.yaml --epochs 3 --output runs/lenet
    python -m tfdogs.train --model lenet5 --data synthetic --epochs 5 --image-size 64

Running the same command (same --output) after an interruption, even kill -9,
resumes from the last finished epoch; checkpoints, the model and the export
are written under temporary names and renamed, so a kill never leaves a
corrupt file where a good one was.
"""

import argparse
import atexit
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
import types

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from tfdogs import (augment, check, config as config_lib, data, distribute, export, interruption, metrics, models,
                    plots, weights, zeroshot)
from tfdogs.preprocessing import FILE_NAME as PREPROCESSING_FILE, Preprocessing

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "head")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what was kept."""


@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of epochs with one set of frozen stages and per-stage rate factors."""

    name: str
    start_epoch: int
    end_epoch: int
    frozen_stages: tuple = ()
    stage_factors: dict = dataclasses.field(default_factory=dict)
    image_size: int | None = None  # None: the config's image_size


def plan_phases(config):
    """Turns the transfer strategy into training phases.

    scratch and discriminative train everything in one phase (discriminative
    with learning rates growing geometrically from `backbone_lr_factor` at the
    stem to 1 at the head); feature-extract trains only the head; fine-tune
    trains the head for `head_epochs`, then the whole network at
    `backbone_lr_factor` times the rate. With `finetune_image_size`, the last
    `finetune_epochs` epochs become a phase of their own at that size, with
    the settings of the phase they end (Touvron et al. 2019, "Fixing the
    train-test resolution discrepancy": a network trained on random crops
    sees objects larger than at evaluation, and a few epochs at a larger size
    close the gap).
    """
    phases = _strategy_phases(config)
    if not config.get("finetune_image_size"):
        return phases
    *earlier, last = phases
    start = config["epochs"] - config["finetune_epochs"]
    return [*earlier, dataclasses.replace(last, end_epoch=start),
            dataclasses.replace(last, name="large", start_epoch=start, image_size=config["finetune_image_size"])]


def _strategy_phases(config):
    epochs, factor = config["epochs"], config["backbone_lr_factor"]
    backbone = STAGES[:-1]
    strategy = config["strategy"]
    if strategy == "feature-extract":
        return [Phase("head", 0, epochs, frozen_stages=backbone)]
    if strategy == "fine-tune":
        head_epochs = config["head_epochs"]
        whole = Phase("all", head_epochs, epochs, stage_factors={stage: factor for stage in STAGES})
        return ([Phase("head", 0, head_epochs, frozen_stages=backbone)] if head_epochs else []) + [whole]
    if strategy == "discriminative":
        last = len(STAGES) - 1
        return [Phase("all", 0, epochs, stage_factors={
            stage: factor ** ((last - index) / last) for index, stage in enumerate(STAGES)})]
    return [Phase("all", 0, epochs)]


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up then cosine decay to zero over the whole run.

    `offset_steps` places a later phase's fresh optimizer (whose step counter
    starts at 0) at its position in the run-wide schedule.
    """

    def __init__(self, peak, total_steps, warmup_steps=0, offset_steps=0, decay=True):
        self.peak, self.total_steps = float(peak), int(total_steps)
        self.warmup_steps, self.offset_steps, self.decay = int(warmup_steps), int(offset_steps), decay

    def __call__(self, step):
        step = tf.cast(step, tf.float32) + self.offset_steps
        warmup = tf.minimum(1.0, (step + 1.0) / max(self.warmup_steps, 1))
        if not self.decay:
            return self.peak * warmup
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * tf.clip_by_value(progress, 0.0, 1.0)))
        return self.peak * tf.where(step < self.warmup_steps, warmup, cosine)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "offset_steps": self.offset_steps, "decay": self.decay}


# AdamW is Adam with decoupled weight decay, which `make_optimizer` applies itself for every optimizer.
OPTIMIZERS = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}


def make_optimizer(name, learning_rate, momentum, variable_factors, weight_decay=0.0, ema=0.0):
    """An optimizer whose learning rate and weight decay are scaled per variable.

    Keras 3 has no MultiOptimizer; scaling the rate handed to `update_step`
    gives each variable its own rate with one optimizer, one step counter and
    one schedule. Weight decay is decoupled (w -= rate * factor *
    weight_decay * w before each update, as AdamW), so a variable trained at
    a tenth of the rate also decays at a tenth; Keras' own decay would use
    the global rate for every variable. Variables of rank 0 or 1 (biases,
    BatchNorm's gamma and beta) never decay.

    Args:
        name: "adam", "adamw" or "sgd".
        learning_rate: a float or a schedule.
        momentum: SGD momentum.
        variable_factors: maps `variable.path` to its rate factor (missing: 1).
        weight_decay: decoupled decay per unit of learning rate.
        ema: decay of the exponential moving average of the weights that
            the optimizer keeps (Keras' `use_ema`); 0 keeps none.
    """
    base = OPTIMIZERS[name]

    class PerVariableRate(base):
        def build(self, variables):
            super().build(variables)
            self._rate_factors = [variable_factors.get(variable.path, 1.0) for variable in variables]

        def update_step(self, gradient, variable, learning_rate):
            rate = learning_rate * self._rate_factors[self._get_variable_index(variable)]
            if weight_decay and len(variable.shape) > 1:
                variable.assign_sub(variable * tf.cast(rate * weight_decay, variable.dtype))
            return super().update_step(gradient, variable, rate)

    kwargs = {"momentum": momentum} if name == "sgd" else {}
    if ema:
        kwargs.update(use_ema=True, ema_momentum=ema)
    return PerVariableRate(learning_rate=learning_rate, **kwargs)


def _normalise_with_moving_statistics(layer, inputs, training=None, mask=None):
    return keras.layers.BatchNormalization.call(layer, inputs, training=False, mask=mask)


def freeze_statistics(layer, frozen):
    """Makes a BatchNormalization layer normalise with its moving statistics (or undoes it).

    What PyTorch's `bn.eval()` does during fine-tuning: the statistics stay
    as they are, gamma and beta still train. Keras' `trainable = False` would
    freeze gamma and beta too. The layer keeps its class, so its weights save
    and load under the same names.
    """
    if frozen:
        layer.call = types.MethodType(_normalise_with_moving_statistics, layer)
    else:
        vars(layer).pop("call", None)


def configure_phase(model, phase, freeze_bn):
    """Freezes the phase's stages (and BatchNorm statistics if asked); returns per-variable rate factors."""
    factors = {}
    for layer in model.layers:
        stage = models.stage_of(layer.name)
        layer.trainable = stage not in phase.frozen_stages
        if isinstance(layer, keras.layers.BatchNormalization):
            freeze_statistics(layer, freeze_bn)
        for variable in layer.trainable_weights:
            factors[variable.path] = phase.stage_factors.get(stage, 1.0)
    return factors


def compile_model(model, config, learning_rate, factors, jit_compile):
    """Compiles a run's network: its optimizer, the loss and the metrics.

    The run's pipelines give one-hot labels (soft ones where MixUp or CutMix
    mix them), so the loss is categorical cross-entropy, with
    `label_smoothing` applied on top of any mixing; `log_loss` is the same
    cross-entropy without smoothing, the Kaggle score.
    """
    model.compile(
        optimizer=make_optimizer(config["optimizer"], learning_rate, config["momentum"], factors,
                                 config["weight_decay"], config["ema"]),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config["label_smoothing"]),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                 keras.metrics.TopKCategoricalAccuracy(k=5, name="top5_accuracy"),
                 keras.metrics.CategoricalCrossentropy(from_logits=True, name="log_loss")],
        jit_compile=jit_compile,
    )


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


MONITOR_MODES = {"val_accuracy": "max", "val_log_loss": "min"}


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

    def _save_model(self, epoch, batch, logs):  # Keras 3 ModelCheckpoint's single point of writing
        filepath = self._get_file_path(epoch, batch, logs)
        if self._should_save_model(epoch, batch, logs, filepath):
            average = self.weight_average.swapped() if self.weight_average else contextlib.nullcontext()
            with average:
                _replace_into(filepath, self.model.save_weights if self.save_weights_only else self.model.save)


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore whose weights and epoch counter are each replaced by a rename.

    Keras writes both in place: a kill mid-save leaves a backup that cannot be
    loaded, and the run cannot resume. Weights go first, so a kill between the
    two renames redoes one epoch from later weights rather than losing it.
    """

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        _replace_into(self._weights_path, self.model.save_weights)
        state = json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen})
        _replace_into(self._training_metadata_path, lambda temporary: pathlib.Path(temporary).write_text(state))


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
        distribute.broadcast_from_chief(self.strategy, [*self.model.weights, *self.model.optimizer.variables])


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


PHASES_FILE = "phases.json"


def read_finished_phases(run_dir):
    """`RUN/phases.json`: per finished phase, its planned last epoch and the epochs it ran."""
    path = pathlib.Path(run_dir) / PHASES_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def phase_is_finished(record, phase):
    """Whether a phase recorded in phases.json needs no more training.

    It does if it ran to its planned end or stopped early; a phase planned
    longer than it was (`--epochs` grew) continues from its backup.
    """
    if record is None:
        return False
    return record["epochs_run"] >= phase.end_epoch or record["epochs_run"] < record["end_epoch"]


def backed_up_epoch(backup_dir):
    """The epoch a phase's backup resumes at (0 without a backup): what BackupAndRestore will restore."""
    path = pathlib.Path(backup_dir) / "training_metadata.json"
    return int(json.loads(path.read_text())["epoch"]) if path.is_file() else 0


def resume_epoch(run_dir):
    """How many epochs of a run a resumed run keeps: its furthest phase backup or finished phase."""
    run_dir = pathlib.Path(run_dir)
    backups = [backed_up_epoch(folder) for folder in (run_dir / "backup").glob("*")]
    finished = [record["epochs_run"] for record in read_finished_phases(run_dir).values()]
    return max(backups + finished, default=0)


RESUMABLE_CHANGES = ("epochs", "verbose", "output")


def check_resumable(config, run_dir):
    """Refuses to resume a run folder whose recorded settings differ from `config`.

    An existing `RUN/config.yaml` means the same command resumes that run, so
    the settings must be those it was started with: only `epochs` may grow
    (training continues) and `verbose` may change. Anything else would train
    a different experiment in the same folder and make config.yaml lie.

    Raises:
        ConfigError: naming each differing key with both values.
    """
    path = pathlib.Path(run_dir) / "config.yaml"
    if not path.is_file():
        return
    recorded = config_lib.load_yaml(path)
    if recorded.get("data") == "synthetic":  # data_dir records where the run generated its photos
        recorded["data_dir"] = None
    recorded = config_lib.validate(recorded)
    differing = [key for key in config_lib.DEFAULTS
                 if key not in RESUMABLE_CHANGES and recorded[key] != config[key]]
    if config["epochs"] < recorded["epochs"]:
        differing.insert(0, "epochs")
    if differing:
        changes = "; ".join(f"{key}: {recorded[key]!r} in the run, {config[key]!r} now" for key in differing)
        raise config_lib.ConfigError(
            f"{run_dir} holds a run with other settings ({changes}). The same command resumes a run, and only "
            f"--epochs may grow; to train with these settings, give a new --output.")


def worker_scratch(task, config):
    """A worker's temporary run folder, named by its task and run: a restarted worker (after kill -9,
    which skips all clean-up) replaces the one its predecessor left."""
    key = json.dumps([task.task_type, task.index, task.cluster, str(config["output"])])
    scratch = pathlib.Path(tempfile.gettempdir()) / (
        f"tfdogs-{task.task_type}{task.index}-{hashlib.sha1(key.encode()).hexdigest()[:12]}")
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "run").mkdir(parents=True)
    return scratch


def publish_run_state(cluster, run_dir):
    """Chief: gives the other workers its split and resume state (history, finished phases, backed-up epochs)."""
    run_dir = pathlib.Path(run_dir)
    paths = [run_dir / "split.csv", run_dir / "history.csv", run_dir / PHASES_FILE,
             *run_dir.glob("backup/*/training_metadata.json")]
    cluster.publish("run_state", {
        "files": {path.relative_to(run_dir).as_posix(): path.read_text() for path in paths if path.is_file()},
        "weights": sorted(path.name for path in run_dir.glob("phase-*.weights.h5"))})


def receive_run_state(cluster, run_dir):
    """Other workers: write the chief's state into their own run folder, where the resume code finds it.

    The data check then reads the chief's split (no worker computes its own,
    and no shared file is read while it is written).

    Returns:
        The names of the chief's finished-phase weights files (the weights
        themselves arrive through `SyncFromChief`).
    """
    state = cluster.receive("run_state")
    for name, text in state["files"].items():
        path = pathlib.Path(run_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return set(state["weights"])


def read_history(path):
    """Reads `history.csv`, keeping the last row of any epoch written twice by a resumed run."""
    if not pathlib.Path(path).is_file() or pathlib.Path(path).stat().st_size == 0:
        return pd.DataFrame()
    history = pd.read_csv(path)
    return history.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)


def best_so_far(history, monitor="val_accuracy"):
    """Best monitored value and its epoch in a history (the highest accuracy, the lowest log loss)."""
    if history.empty or monitor not in history:
        return None, None
    row = history[monitor].idxmax() if MONITOR_MODES[monitor] == "max" else history[monitor].idxmin()
    return float(history.loc[row, monitor]), int(history.loc[row, "epoch"])


def resolve_runtime(config):
    """Chooses XLA and precision for the device.

    GPU: XLA and mixed float16. CPU: no XLA (slower there); mixed bfloat16 for
    the ResNets where the CPU computes bfloat16 natively (about 1.5x faster
    steps at float32's validation accuracy, README "Performance"), else
    float32 (LeNet-5 is too small to gain).
    """
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    jit = {"auto": has_gpu, "on": True, "off": False}[config["jit_compile"]]
    precision = config["precision"]
    if precision == "auto":
        cpu_bfloat16 = config["model"] != "lenet5" and distribute.cpu_has_native_bfloat16()
        precision = "mixed_float16" if has_gpu else "mixed_bfloat16" if cpu_bfloat16 else "float32"
    return {"device": "GPU" if has_gpu else "CPU", "jit_compile": jit, "precision": precision}


def output_folders(config):
    """The run folder and the SavedModel base folder of a config.

    Returns:
        (`output`, default runs/<model>-<timestamp>; `export_dir`, default saved_models/<run folder name>).
    """
    name = f"{models.file_name(config['model'])}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    run_dir = pathlib.Path(config["output"] or pathlib.Path("runs") / name)
    return run_dir, pathlib.Path(config["export_dir"] or pathlib.Path("saved_models") / run_dir.name)


def prepare_output(config):
    """Creates the run and export folders (checking they are writable) before any work.

    Returns:
        The run folder, the export folder, and those of them this call created.
    """
    run_dir, export_dir = output_folders(config)
    created = []
    for key, folder in (("output", run_dir), ("export_dir", export_dir)):
        try:
            if not folder.exists():
                folder.mkdir(parents=True)
                created.append(folder)
            probe = folder / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise config_lib.ConfigError(f"Config key '{key}': cannot write to {folder} ({error.strerror}).") from None
    return run_dir, export_dir, created


def load_data(config, run_dir):
    """Checks the photos, then finds the split (re-using the run's `split.csv` when resuming).

    The check (`tfdogs.check`) lists every problem in `problems.csv`, skips
    unusable files and converts the ones TensorFlow cannot decode into
    `converted/`; with config `strict` anything skipped is an error.

    Returns:
        (records, train_indices, val_indices); the records' paths are the files
        the pipeline reads, and `split.csv` names the original files.
    """
    if config["data"] == "synthetic":
        data_dir = run_dir / "synthetic_data"
        if not (data_dir / "labels.csv").is_file():
            data.make_synthetic(data_dir, num_classes=config["synthetic_classes"],
                                images_per_class=config["synthetic_images_per_class"],
                                image_size=max(64, config["image_size"]), seed=config["seed"])
    elif config["data_dir"]:
        data_dir = config["data_dir"]
    else:
        data_dir = data.load_stanford_dogs()
    report = check.check_data(data_dir, converted_dir=run_dir / "converted", verbose=config["verbose"] != 0)
    report.write_csv(run_dir / "problems.csv")
    if report.problems:
        print(f"Data check: {report.summary()}. Every problem is listed in {run_dir / 'problems.csv'}.")
    if config["strict"]:
        report.require_clean()
    report.require_trainable(config["val_fraction"])
    split_path = run_dir / "split.csv"
    if split_path.is_file():
        records, train_indices, val_indices = data.read_split(split_path, report.records.root)
    else:
        records = report.records
        # Byte-identical copies (groups) go to one side: a photo is never validated on after training on it.
        train_indices, val_indices = data.stratified_split(records.labels, config["val_fraction"], config["seed"],
                                                           groups=report.groups)
        data.write_split(split_path, records, train_indices, val_indices)
    # The pipeline reads converted copies where TensorFlow cannot decode the original correctly.
    source_of = dict(zip(report.records.paths, report.sources))
    rejected = [path for path in records.paths if path not in source_of]
    if rejected:
        raise data.DataError(
            f"{split_path} lists {len(rejected)} files that the data check now rejects "
            f"({', '.join(rejected[:3])}); see {run_dir / 'problems.csv'}, or start a new run (--output).")
    return dataclasses.replace(records, paths=[source_of[path] for path in records.paths]), train_indices, val_indices


def build_datasets(config, records, train_indices, val_indices, preprocessing, steps_per_epoch=None):
    """The training and validation `tf.data` pipelines of a run, with one-hot labels.

    Returns:
        (train_epochs, val_dataset): `train_epochs(first_epoch, num_epochs)`
        gives the training batches of those epochs, each epoch's randomness
        keyed by (seed, epoch) (see `data.make_dataset`).
    """
    paths = np.asarray(records.paths)
    common = dict(image_size=config["image_size"], batch_size=config["batch_size"],
                  mean=preprocessing.mean, std=preprocessing.std, crop_fraction=preprocessing.crop_fraction,
                  interpolation=preprocessing.interpolation, resize_rounding=preprocessing.resize_rounding,
                  seed=config["seed"], cache=config["cache"], num_classes=len(records.class_names))
    augmentation = augment.build_augmentation(
        flip=config["flip"], rotation=config["rotation"], zoom=config["zoom"],
        translation=config["translation"], contrast=config["contrast"], seed=config["seed"],
        randaugment=config_lib.parse_randaugment(config["randaugment"]), augmix=config["augmix"],
        random_erasing=config["random_erasing"], mixup=config["mixup"], cutmix=config["cutmix"])

    def train_epochs(first_epoch, num_epochs, part=None):
        return data.make_dataset(
            list(paths[train_indices]), records.labels[train_indices], training=True,
            augmentation=augmentation, scale=(config["crop_scale_min"], 1.0), first_epoch=first_epoch,
            num_epochs=num_epochs, steps_per_epoch=steps_per_epoch, part=part, **common)

    val_dataset = data.make_dataset(
        list(paths[val_indices]), records.labels[val_indices], training=False, **common)
    return train_epochs, val_dataset


def predict_logits(model, dataset, callbacks=()):
    """Logits (float32 numpy) of a classifier over a dataset of (images, labels); `callbacks` see each batch."""
    return np.asarray(model.predict(dataset.map(lambda images, labels: images), verbose=0,
                                    callbacks=list(callbacks)), np.float32)


def predict_probabilities(model, dataset, callbacks=()):
    """Softmax probabilities (float32 numpy) of a classifier over a dataset of (images, labels)."""
    return tf.nn.softmax(predict_logits(model, dataset, callbacks), axis=-1).numpy()


def with_temperature(model, temperature):
    """The model with its logits divided by a fitted temperature, as a final plain Keras layer.

    model.keras and the export hold it, so every later tool (evaluate,
    ensemble, predict, submit, TF Serving) gives calibrated probabilities.
    """
    scaled = keras.layers.Rescaling(1.0 / temperature, name="temperature")(model.output)
    return keras.Model(model.input, scaled, name=model.name)


def _callbacks(config, run_dir, phase, history, monitor):
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


def build_model(config, num_classes, weights):
    """The run's network at its input size and head regularisation."""
    return models.build(config["model"], num_classes, weights=weights,
                        input_shape=(config["image_size"], config["image_size"], 3),
                        dropout=config["dropout"], l1=config["l1"], l2=config["l2"])


def train(config, extra_callbacks=()):
    """Runs one experiment from a validated config (see `tfdogs.config`).

    Args:
        config: mapping from `tfdogs.config.resolve` or `validate`.
        extra_callbacks: Keras callbacks added to every phase's `fit`.

    With `distribute` multi-worker and a TF_CONFIG cluster, every worker
    calls this with the same config: the chief writes the run, the others
    train from temporary folders and return None.

    Returns:
        The run folder (None on a worker other than the chief).
    """
    config = requested = config_lib.validate(config)
    task = distribute.read_task() if distribute.resolve_name(config["distribute"]) == "multi-worker" else None
    if task is None or task.is_chief:
        run_dir, export_dir, created = prepare_output(config)
    else:  # only the chief writes the run: this worker keeps what the strategy needs until it ends
        scratch = worker_scratch(task, config)
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        run_dir, export_dir, created = scratch / "run", scratch / "export", [scratch]
    config = {**config, "output": str(run_dir), "export_dir": str(export_dir)}
    runtime = resolve_runtime(config)
    cluster = None
    try:
        # First: multi-worker precedes other TF work. A worker that gives up waiting for its peers
        # removes the folders this run created.
        strategy = distribute.make_strategy(config["distribute"], cleanup=created)
        if task is not None:
            cluster = distribute.Cluster(task, distribute.peer_timeout())
            # Only the chief's output and export folders are used; verbose changes nothing trained.
            cluster.check_same_settings(requested, ignore=("verbose", "output", "export_dir"))
        check_resumable(config, run_dir)
        runtime.update(distribute.replica_facts(strategy, config["batch_size"], config["learning_rate"],
                                                config["optimizer"]))
        chief_weights = receive_run_state(cluster, run_dir) if task and not task.is_chief else set()
        records, train_indices, val_indices = load_data(config, run_dir)
        if task and task.is_chief:
            publish_run_state(cluster, run_dir)
        if len(train_indices) < runtime["global_batch_size"]:
            raise config_lib.ConfigError(
                f"Config key 'batch_size' is {config['batch_size']} per replica ({runtime['replicas']} "
                f"replicas), larger than the {len(train_indices)} training images; lower it.")
        keras.utils.set_random_seed(config["seed"])
        keras.mixed_precision.set_dtype_policy(runtime["precision"])
        try:
            with strategy.scope():
                model = build_model(config, len(records.class_names), config["weights"])
            if task is not None:
                fit_under_multi_worker(model)
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
    except Exception as error:
        for folder in created:  # a run that never started leaves no empty folders behind
            shutil.rmtree(folder, ignore_errors=True)
        if cluster is not None:
            cluster.report(error)
        raise
    if config["data"] == "synthetic":  # where the generated photos are: evaluate, ensemble and predict read them
        config["data_dir"] = str(run_dir / "synthetic_data")
    config_lib.write(config, run_dir / "config.yaml")
    num_classes = len(records.class_names)
    final_size = config["finetune_image_size"] or config["image_size"]  # what the export takes

    def preprocessing_at(size):
        return weights.resolve_preprocessing(config["weights"], config["model"], size, config["weights_preprocessing"])

    preprocessing = preprocessing_at(final_size)
    preprocessing.save(run_dir / PREPROCESSING_FILE)  # evaluation, ensembles and predict read it back
    steps = len(train_indices) // runtime["global_batch_size"]
    if config["steps_per_epoch"]:
        steps = min(steps, config["steps_per_epoch"])
    pipelines = {}  # image size -> (train_epochs, val_dataset)

    def pipelines_at(size):
        if size not in pipelines:
            global_config = {**config, "batch_size": runtime["global_batch_size"], "image_size": size}
            train_epochs, val_dataset = build_datasets(global_config, records, train_indices, val_indices,
                                                       preprocessing_at(size), steps_per_epoch=steps)
            pipelines[size] = train_epochs, distribute.shard_by_data(val_dataset)
        return pipelines[size]

    def model_at(size, current):
        """The network at another input size, with the current weights (a ResNet's do not depend on it)."""
        if current.input_shape[1] == size:
            return current
        keras.mixed_precision.set_dtype_policy(runtime["precision"])
        try:
            with strategy.scope():
                resized = build_model({**config, "image_size": size}, len(records.class_names), weights=None)
            if task is not None:
                fit_under_multi_worker(resized)
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        resized.set_weights(current.get_weights())
        return resized
    monitor = resolve_monitor(config, records.layout)
    print(f"The best checkpoint and early stopping follow {monitor}"
          + (f" ({records.layout} layout)." if config["monitor"] == "auto" else "."))

    started = time.time()
    finished = read_finished_phases(run_dir)
    resumed = False
    for phase in plan_phases(config):
        done = run_dir / f"phase-{phase.name}.weights.h5"
        if phase_is_finished(finished.get(phase.name), phase) and (done.is_file() or done.name in chief_weights):
            if done.is_file():  # finished before an interruption (other workers: the chief's, in the next fit)
                model.load_weights(done)
            resumed = True
            continue
        backup_dir = run_dir / "backup" / phase.name
        first_epoch = max(phase.start_epoch, backed_up_epoch(backup_dir))
        if resumed or first_epoch > phase.start_epoch:
            print(f"Resuming the run in {run_dir} at epoch {first_epoch + 1} of {config['epochs']} "
                  f"(phase '{phase.name}', state from {backup_dir if first_epoch > phase.start_epoch else done}).")
            resumed = False  # said once
        model = model_at(phase.image_size or config["image_size"], model)
        train_epochs, val_dataset = pipelines_at(phase.image_size or config["image_size"])
        factors = configure_phase(model, phase, config["freeze_bn"] and config["strategy"] != "scratch")
        schedule = WarmupCosine(runtime["learning_rate"], config["epochs"] * steps,
                                config["warmup_epochs"] * steps, phase.start_epoch * steps,
                                decay=config["schedule"] == "cosine")
        with strategy.scope():  # metrics and optimizer variables are mirrored too
            compile_model(model, config, schedule, factors, runtime["jit_compile"])
        history = read_history(run_dir / "history.csv")
        callbacks, non_finite = _callbacks(config, run_dir, phase, history, monitor)
        if task is None:
            train_dataset = distribute.shard_by_data(train_epochs(first_epoch, phase.end_epoch - first_epoch))
        else:  # each worker reads its own slice of every global batch
            train_dataset = distribute.per_worker_dataset(
                strategy, lambda part: train_epochs(first_epoch, phase.end_epoch - first_epoch, part))
            callbacks.append(SyncFromChief(strategy))  # after the backup's restore, which only the chief has
        # BackupAndRestore sets the epoch to resume at on the model, and Keras prefers it to `initial_epoch`
        # in every later fit: a phase resumed from its backup would make the next phase start there too.
        model._initial_epoch = None
        try:
            fit = model.fit(train_dataset, validation_data=val_dataset, epochs=phase.end_epoch,
                            initial_epoch=phase.start_epoch, steps_per_epoch=steps, shuffle=False,
                            callbacks=callbacks + list(extra_callbacks),
                            verbose=1 if config["verbose"] == "auto" else config["verbose"])
        except distribute.PEER_ERRORS as error:
            if task is None:
                raise
            raise distribute.PeerLost(f"{task.name} lost a peer while training phase '{phase.name}' "
                                      f"({distribute.first_line(error)}).") from None
        if non_finite.stopped_at is not None:
            epoch, batch = non_finite.stopped_at
            kept = run_dir / "best.weights.h5"
            raise TrainingError(
                f"Training loss became non-finite at epoch {epoch + 1}, batch {batch}; stopped. "
                f"The best weights so far are kept in {kept if kept.is_file() else '(none yet)'}. "
                "Lower --learning-rate or check the data.")
        save_weights_atomically(model, done)
        last_epoch = max(fit.epoch, default=first_epoch - 1) + 1
        finished[phase.name] = {"end_epoch": phase.end_epoch, "epochs_run": last_epoch}
        write_json_atomically(finished, run_dir / PHASES_FILE)
        if phase.end_epoch < config["epochs"]:  # a later phase follows: this one cannot be extended
            shutil.rmtree(backup_dir, ignore_errors=True)
    train_seconds = time.time() - started
    if task is not None and not task.is_chief:
        return None  # the chief writes the run folder and the export

    history = read_history(run_dir / "history.csv")
    _replace_into(run_dir / "history.csv", lambda temporary: history.to_csv(temporary, index=False))
    best_weights = run_dir / "best.weights.h5"
    if best_weights.is_file():
        model.load_weights(best_weights)
    # float32, all trainable, no optimizer, at the size it is exported at
    final_model = build_model({**config, "image_size": final_size}, num_classes, weights=None)
    final_model.set_weights(model.get_weights())
    val_dataset = pipelines_at(final_size)[1]

    val_labels = records.labels[val_indices]
    logits = predict_logits(final_model, val_dataset)
    raw_table, raw_ece = metrics.reliability(metrics.softmax(logits), val_labels)
    _, best_epoch = best_so_far(history, monitor)
    summary = {
        "model": config["model"], "weights": config["weights"], "strategy": config["strategy"],
        "num_classes": num_classes, "num_train": int(len(train_indices)), "num_val": int(len(val_indices)),
        "epochs_run": int(len(history)), "monitor": monitor,
        "best_epoch": None if best_epoch is None else best_epoch + 1,
        "val": {**metrics.scores(metrics.softmax(logits), val_labels), "ece": raw_ece},
        "peak_val_accuracy": float(history["val_accuracy"].max()),
        "final_val_accuracy": float(history["val_accuracy"].iloc[-1]),
        "baselines": metrics.baselines(records.labels[train_indices], val_labels, num_classes, records.class_names),
        "train_seconds": round(train_seconds, 1),
        "parameters": {"total": int(final_model.count_params()),
                       "trainable": int(sum(np.prod(w.shape) for w in final_model.trainable_weights))},
        **runtime,
    }
    if config["calibrate"]:
        temperature = metrics.fit_temperature(logits, val_labels)
        summary["val_calibrated"] = {**metrics.calibrated_scores(logits, val_labels, temperature),
                                     "fitted_on": "the validation split these scores are measured on"}
        calibrated_table, calibrated_ece = metrics.reliability(metrics.softmax(logits, temperature), val_labels)
        plots.plot_reliability({"raw": (raw_table, raw_ece), f"temperature {temperature:.3f}": (
            calibrated_table, calibrated_ece)}, run_dir / "calibration.png", title=f"{run_dir.name}: validation")
        final_model = with_temperature(final_model, temperature)
    save_model_atomically(final_model, run_dir / "model.keras")
    plots.plot_curves(history, run_dir / "curves.png", title=run_dir.name)
    version_dir = export.export_saved_model(final_model, records.class_names, export_dir, preprocessing=preprocessing,
                                            metadata={"run": str(run_dir.resolve()), "config": config})
    summary["export"] = str(version_dir)
    zero_shot = zero_shot_baseline(config, records, val_indices)
    if zero_shot is not None:
        summary["baselines"]["imagenet_zero_shot"] = zero_shot
        write_json_atomically(zero_shot, run_dir / "zeroshot.json")
    if config["weights"] is not None:
        summary["imagenet_overlap"] = IMAGENET_OVERLAP
    write_json_atomically(summary, run_dir / "metrics.json")
    return run_dir


# Written into metrics.json beside the scores of every run that starts from pretrained weights.
IMAGENET_OVERLAP = (
    "The Kaggle dog-breed-identification and Stanford Dogs photos are ImageNet images, and ImageNet-pretrained "
    "weights like this run's may have been trained on some of its validation photos: its validation scores and "
    "the ImageNet zero-shot baseline may be higher than on dog photos from elsewhere.")


def zero_shot_baseline(config, records, val_indices):
    """The untrained ImageNet classifier's scores on the run's validation split.

    Computed for runs starting from any checkpoint with a 1000-class ImageNet
    head (registry weights or a file) when every breed of the data set is an
    ImageNet class, with the run's own preprocessing record; None otherwise.
    """
    if not weights.imagenet_head(config["weights"], config["model"]):
        return None
    try:
        zeroshot.breed_columns(records.class_names)
    except ValueError:
        return None
    preprocessing = Preprocessing.load(pathlib.Path(config["output"]) / PREPROCESSING_FILE)
    return zeroshot.evaluate_zero_shot(config["model"], records, val_indices, weights_source=config["weights"],
                                       preprocessing=preprocessing, batch_size=config["batch_size"],
                                       verbose=config["verbose"] != 0)


def _replace_into(path, write):
    """Writes through `write(temporary_path)` then renames over `path`, so a kill never leaves half a file."""
    path = pathlib.Path(path)
    temporary = path.with_name(f".partial-{os.getpid()}-{path.name}")
    try:
        write(temporary)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def save_weights_atomically(model, path):
    _replace_into(path, model.save_weights)


def save_model_atomically(model, path):
    _replace_into(path, model.save)


def write_json_atomically(value, path):
    _replace_into(path, lambda temporary: temporary.write_text(json.dumps(value, indent=2)))


def main(argv=None):
    """Command-line entry point: parses flags, trains, prints where everything went."""
    parser = argparse.ArgumentParser(prog="python -m tfdogs.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config_lib.add_arguments(parser)
    args = parser.parse_args(argv)
    command = ["python", "-m", "tfdogs.train", *(sys.argv[1:] if argv is None else argv)]
    config = run_dir = export_dir = None
    try:
        with interruption.signals_interrupt():
            config = config_lib.resolve(args)
            run_dir, export_dir = output_folders(config)
            if not config["output"]:  # the timestamped default: resuming must name it
                command += ["--output", str(run_dir)]
            run_dir = train({**config, "output": str(run_dir), "export_dir": str(export_dir)})
    except distribute.PeerLost as error:  # every surviving worker starts again and waits for the lost one
        print(f"error: {error} Running the same command again to wait for it and resume from the last backed-up "
              f"epoch (up to {distribute.PEER_TIMEOUT_VARIABLE} seconds).", file=sys.stderr)
        atexit._run_exitfuncs()  # exec skips them: this worker's temporary folders go now
        distribute.rejoin()
    except (config_lib.ConfigError, data.DataError, weights.WeightsError, models.PresetError, TrainingError,
            distribute.ClusterError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: one line, not a traceback
        kept = resume_epoch(run_dir) if run_dir else 0
        return interruption.stopped(stop, command, run_dir, export_dir, config and config["epochs"], kept)
    if run_dir is None:
        print(f"\nThis worker's part is done; the chief writes the run folder ({config['output']}) and the export.")
        return 0
    summary = json.loads((run_dir / "metrics.json").read_text())
    val = summary["val"]
    print(f"\nRun folder: {run_dir}\nSavedModel: {summary['export']}\n"
          f"Validation (best epoch {summary['best_epoch']}): accuracy {val['accuracy']:.4f}, "
          f"top-5 {val['top5_accuracy']:.4f}, log loss {val['log_loss']:.4f} "
          f"(random guess {summary['baselines']['random_guess']['accuracy']:.4f}, most frequent breed "
          f"{summary['baselines']['most_frequent']['accuracy']:.4f})")
    calibrated = summary.get("val_calibrated")
    if calibrated:
        print(f"Calibrated (temperature {calibrated['temperature']:.3f}, fitted on the same validation split; "
              f"model.keras and the SavedModel serve it): log loss {calibrated['log_loss']:.4f}, "
              f"expected calibration error {val['ece']:.4f} -> {calibrated['ece']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
