"""Resuming a run: what its folder says is finished, and whether the settings allow going on."""

import hashlib
import json
import pathlib
import shutil
import tempfile

import numpy as np
import pandas as pd

from tfdogs import config as config_lib
from tfdogs import files

PHASES_FILE = "phases.json"
# A phase's resume backup (`RUN/backup/<phase>/`): weights with the optimizer's state, and the epochs done.
BACKUP_STATE, BACKUP_METADATA = "latest.state.npz", "training_metadata.json"
# The Keras weights file (with the optimizer's variables) tfdogs backed up to before BACKUP_STATE; still restored.
EARLIER_BACKUP_WEIGHTS = "latest.weights.h5"

# What each monitored score wants: the best checkpoint and early stopping follow it.
MONITOR_MODES = {"val_accuracy": "max", "val_log_loss": "min"}


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
    """The epoch a phase's backup resumes at (0 without a backup): where its `fit` starts."""
    path = pathlib.Path(backup_dir) / BACKUP_METADATA
    return int(json.loads(path.read_text())["epoch"]) if path.is_file() else 0


def training_state(model, into=None):
    """Copies of what a resumed phase needs: the model's weights, then its optimizer's variables, in order.

    The optimizer's variables are its step counter, its moments and the
    weight average (`--ema`), as Keras' own `save_weights` lists them, by
    position. Copied, so that training may go on while they are written.

    Args:
        model: a compiled model whose optimizer is built.
        into: an earlier state of the same model, overwritten in place: a
            first write to new memory costs a page fault per 4 KiB, 0.4-1.2 s
            for ResNet-18 with AdamW's 134 MB on a 2-core Xeon, against
            0.05 s to copy into memory written before.

    Returns:
        {"names": each variable's path, "0000": its value, ...}, for `write_backup`.
    """
    variables = [*model.weights, *model.optimizer.variables]
    if into is None:
        state = {f"{index:04d}": np.array(variable.numpy()) for index, variable in enumerate(variables)}
        return {"names": np.array([variable.path for variable in variables]), **state}
    for index, variable in enumerate(variables):
        np.copyto(into[f"{index:04d}"], variable.numpy())
    return into


def write_backup(backup_dir, state, epochs_done):
    """A phase's backup: `training_state`'s arrays, then the epochs done, each file written whole.

    The state goes first, so a kill between the two files redoes one epoch
    from later weights rather than losing it.
    """
    backup_dir = pathlib.Path(backup_dir)

    def write_state(temporary):
        with open(temporary, "wb") as file:
            np.savez(file, **state)

    files.replace_into(backup_dir / BACKUP_STATE, write_state)
    files.write_json({"epoch": epochs_done}, backup_dir / BACKUP_METADATA)


def restore_backup(model, backup_dir):
    """Puts a phase's backed-up weights and optimizer state back into `model` (compiled); nothing without a backup.

    Raises:
        ValueError: naming the backup file, when it holds other variables than the model and optimizer have.
    """
    backup_dir = pathlib.Path(backup_dir)
    path = backup_dir / BACKUP_STATE
    if not path.is_file():
        if (backup_dir / EARLIER_BACKUP_WEIGHTS).is_file():
            model.load_weights(backup_dir / EARLIER_BACKUP_WEIGHTS)
        return
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    variables = [*model.weights, *model.optimizer.variables]
    with np.load(path) as saved:
        names = list(saved["names"])
        if len(names) != len(variables):
            raise ValueError(f"{path} holds {len(names)} variables; this model and its optimizer have "
                             f"{len(variables)}. It is another run's backup: give a new --output.")
        values = [saved[f"{index:04d}"] for index in range(len(variables))]
    for name, value, variable in zip(names, values, variables):
        if value.shape != tuple(variable.shape):
            raise ValueError(f"{path}: {name} has shape {value.shape}, where this model's {variable.path} has "
                             f"{tuple(variable.shape)}. It is another run's backup: give a new --output.")
    for value, variable in zip(values, variables):
        variable.assign(value)


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


def already_finished(config, run_dir):
    """Whether a run folder holds this exact run, finished: same settings (`check_resumable`), same epochs.

    `metrics.json` is the last file a run writes, after its export; with
    `--epochs` grown the run goes on instead.
    """
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "metrics.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    return config_lib.load_yaml(run_dir / "config.yaml").get("epochs") == config["epochs"]


def check_backups_kept(run_dir):
    """Refuses to go on with a run whose finished epochs have no backup to resume them from.

    history.csv may hold one epoch more than the backups (a kill between the
    history row and the backup redoes that epoch); more means backup/ was
    removed, and going on would train again from the first epoch under the
    old history.

    Raises:
        ConfigError: naming the folder and the epochs.
    """
    run_dir = pathlib.Path(run_dir)
    recorded = len(read_history(run_dir / "history.csv"))
    kept = resume_epoch(run_dir)
    if recorded > kept + 1:
        raise config_lib.ConfigError(
            f"{run_dir / 'history.csv'} records {recorded} finished epochs, but {run_dir / 'backup'} can resume "
            f"only {kept}: its backups were removed. Going on would train again from epoch {kept + 1} beside the "
            f"old history; put backup/ back, or start a new run (another --output).")


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
             *run_dir.glob(f"backup/*/{BACKUP_METADATA}")]
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
