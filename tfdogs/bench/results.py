"""What the end-to-end benchmark's commands measured: their scores, read back, and the tables of both sides.

`tfdogs.bench.end_to_end` runs the commands; this module reads each finished
command's validation scores (tfdogs' run folder, PyTorch's last JSON line) and
summarises the repeats (seeds) as medians, spreads and markdown tables.
"""

import csv
import json
import pathlib
import statistics

SIDES = ("tfdogs", "torch")
SCORES = ("best_accuracy", "best_log_loss", "final_accuracy", "final_log_loss")
# metrics.json's `seconds`: the parts of a tfdogs run up to the end of its last epoch, and those after it
# (`tfdogs.training.loop`), which the PyTorch script has no counterpart of but its save.
TFDOGS_TRAINING_PARTS = ("start_up", "data", "model", "features", "phases")
TFDOGS_AFTER_TRAINING_PARTS = ("final_evaluation", "not_a_dog", "export", "zero_shot")


def flag_value(argv, flag):
    """The value after `flag` in `argv` (its last occurrence); None without one."""
    positions = [index for index, part in enumerate(argv[:-1]) if part == flag]
    return argv[positions[-1] + 1] if positions else None


def read_scores(side, command, stdout):
    """Validation accuracy and log loss of a finished command, at its best and at its last epoch.

    tfdogs: `best_*` from the run's `metrics.json` (`val`: the best epoch by
    its monitor, `best_epoch`), `final_*` from the last row of its
    `history.csv`; the run folder is the command's `--output`. PyTorch: its
    last stdout line (JSON): `best_*` from the epoch of highest validation
    accuracy, `final_*` from its last epoch.

    Args:
        side: ``"tfdogs"`` or ``"torch"``.
        command: the argv that ran.
        stdout: what it printed.

    Returns:
        A dict of `SCORES` (floats) and `best_epoch` (1-based).
    """
    if side == "torch":
        line = json.loads(stdout.strip().splitlines()[-1])
        return {"best_accuracy": line["best_val_accuracy"], "best_log_loss": line["best_val_log_loss"],
                "final_accuracy": line["val_accuracy"], "final_log_loss": line["val_log_loss"],
                "best_epoch": line["best_epoch"]}
    run_dir = pathlib.Path(flag_value(command, "--output"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with open(run_dir / "history.csv", newline="") as file:
        last = list(csv.DictReader(file))[-1]
    return {"best_accuracy": metrics["val"]["accuracy"], "best_log_loss": metrics["val"]["log_loss"],
            "final_accuracy": float(last["val_accuracy"]), "final_log_loss": float(last["val_log_loss"]),
            "best_epoch": metrics["best_epoch"]}


def read_training_seconds(side, command, stdout):
    """Seconds from a finished command's start to the end of its last epoch, as the command itself counted them.

    What a user waits for beyond that differs between the sides: tfdogs then
    scores the best epoch's model, fits and measures its "not a dog" check,
    exports a SavedModel and scores the zero-shot baseline
    (`TFDOGS_AFTER_TRAINING_PARTS`); the PyTorch script saves its state dict.

    tfdogs: the sum of the run's `metrics.json` `seconds` parts up to its
    last epoch (`TFDOGS_TRAINING_PARTS`, start-up from the process's start).
    PyTorch: its last stdout line's `startup_seconds` (from before its
    imports) plus its `epoch_seconds`.

    Returns:
        The seconds, or None where the command reported none (a run folder
        without metrics.json, a script without that last line).

    Raises:
        ValueError: a tfdogs run's `seconds` hold a part this module does not sort (a new timer lap).
    """
    if side == "torch":
        lines = stdout.strip().splitlines()
        try:
            line = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            return None
        if not isinstance(line, dict) or "epoch_seconds" not in line:
            return None
        return line["startup_seconds"] + sum(line["epoch_seconds"])
    output = flag_value(command, "--output")
    path = None if output is None else pathlib.Path(output, "metrics.json")
    if path is None or not path.is_file():
        return None
    seconds = json.loads(path.read_text()).get("seconds")
    if seconds is None:
        return None
    unknown = set(seconds) - {*TFDOGS_TRAINING_PARTS, *TFDOGS_AFTER_TRAINING_PARTS, "total"}
    if unknown:
        raise ValueError(f"{path}: seconds part(s) {sorted(unknown)} are neither training nor after it; "
                         "add them to tfdogs.bench.results' TFDOGS_TRAINING_PARTS or TFDOGS_AFTER_TRAINING_PARTS")
    return sum(sum(value.values()) if isinstance(value, dict) else value
               for part, value in seconds.items() if part in TFDOGS_TRAINING_PARTS)


def spread(values):
    """Mean, min, max and the values themselves, as a dict."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "runs": list(values)}


def summarise(rows):
    """Per job: median seconds of each side, every repeat's seconds, and torch / tfdogs (> 1: tfdogs faster).

    The same for CPU seconds, where the rows have them (`cpu_seconds`):
    `tfdogs_cpu_seconds`, `torch_cpu_seconds`, `tfdogs_cpu_runs`,
    `torch_cpu_runs` and `cpu_ratio`; and for the seconds to the end of the
    last epoch, where every row has them (`training_seconds`,
    `read_training_seconds`): `tfdogs_training_seconds`, ...,
    `training_ratio`.

    Scored jobs also get, per side, the spread (mean, min, max over the
    repeats, i.e. seeds) of the seconds and of every score in `SCORES`.

    Args:
        rows: the rows `time_commands` returns.

    Returns:
        One dict per job, in the order the jobs first ran: job, tfdogs_seconds,
        torch_seconds (medians), tfdogs_runs, torch_runs (seconds of each repeat)
        and ratio (torch_seconds / tfdogs_seconds); for scored jobs `scores`:
        side -> {"seconds" or a `SCORES` name -> `spread`}.
    """
    jobs = {}
    for row in rows:
        jobs.setdefault(row["job"], {side: [] for side in SIDES})[row["side"]].append(row)
    summary = []
    for job, runs in jobs.items():
        entry = {"job": job}
        for key, prefix in (("seconds", ""), ("cpu_seconds", "cpu_"), ("training_seconds", "training_")):
            if key != "seconds" and not all(key in row for side in SIDES for row in runs[side]):
                continue  # rows from before CPU time was recorded, or commands that report no epochs
            seconds = {side: [row[key] for row in runs[side]] for side in SIDES}
            medians = {side: statistics.median(seconds[side]) if seconds[side] else None for side in SIDES}
            entry.update({f"{side}_{key}": medians[side] for side in SIDES})
            entry.update({f"{side}_{prefix}runs": seconds[side] for side in SIDES})
            entry[f"{prefix}ratio"] = (medians["torch"] / medians["tfdogs"] if medians["torch"] and medians["tfdogs"]
                                       else None)
        if any(SCORES[0] in row for side in SIDES for row in runs[side]):
            entry["scores"] = {side: {name: spread([row[name] for row in runs[side]])
                                      for name in ("seconds", *SCORES)} for side in SIDES if runs[side]}
        summary.append(entry)
    return summary


def format_markdown(summary):
    """The `summarise` rows as a markdown table."""
    def seconds(values):
        return ", ".join(f"{value:.1f}" for value in values)

    def ratio(value):
        return "-" if value is None else f"{value:.2f}"

    def medians(row, prefix):
        return (f" {row[f'tfdogs_{prefix}seconds']:.1f} | {row[f'torch_{prefix}seconds']:.1f} "
                f"| {ratio(row[f'{prefix}ratio'])} |")

    with_cpu = all("cpu_ratio" in row for row in summary)
    with_training = all("training_ratio" in row for row in summary)
    lines = ["| job | tfdogs s (median) | torch s (median) | torch / tfdogs | tfdogs runs s | torch runs s |"
             + (" tfdogs CPU s (median) | torch CPU s (median) | torch / tfdogs, CPU |" if with_cpu else "")
             + (" tfdogs s to the last epoch | torch s to the last epoch | torch / tfdogs, to the last epoch |"
                if with_training else ""),
             "| --- | ---: | ---: | ---: | --- | --- |" + " ---: | ---: | ---: |" * (with_cpu + with_training)]
    for row in summary:
        lines.append(f"| {row['job']} | {row['tfdogs_seconds']:.1f} | {row['torch_seconds']:.1f} | {ratio(row['ratio'])} "
                     f"| {seconds(row['tfdogs_runs'])} | {seconds(row['torch_runs'])} |"
                     + (medians(row, "cpu_") if with_cpu else "") + (medians(row, "training_") if with_training else ""))
    return "\n".join(lines)


def format_scores_markdown(summary):
    """The scored jobs of `summarise` as a markdown table: each side's seconds and scores, mean (min-max).

    "best": tfdogs' best epoch by its monitor (metrics.json `val`), PyTorch's
    epoch of highest validation accuracy; "last": the last epoch of each.
    Empty when no job was scored.
    """
    def cell(values, digits):
        return f"{values['mean']:.{digits}f} ({values['min']:.{digits}f}-{values['max']:.{digits}f})"

    lines = []
    for row in summary:
        for side, scores in row.get("scores", {}).items():
            lines.append(f"| {row['job']} | {side} | {len(scores['seconds']['runs'])} | {cell(scores['seconds'], 1)} "
                         + " ".join(f"| {cell(scores[name], 3)}" for name in SCORES) + " |")
    if not lines:
        return ""
    return "\n".join(["| job | side | seeds | seconds | val accuracy, best epoch | val log loss, best epoch "
                      "| val accuracy, last epoch | val log loss, last epoch |",
                      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |", *lines])
