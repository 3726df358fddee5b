"""The study's comparison table of finished runs, ensembles and baselines, read from their files.

The command line and what it writes: `tfdogs.compare`.
"""

import contextlib
import math
import os
import pathlib

import pandas as pd

from tfdogs import config as config_lib, files
from tfdogs.evaluation import plots
from tfdogs.evaluation.html import html_table, markdown_table, write_index
from tfdogs.runs.folder import ENSEMBLE_FILE, RunFolderError, load_run, read_json
from tfdogs.training.loop import train

COLUMNS = ["name", "kind", "model", "weights", "strategy", "val_accuracy", "val_top5_accuracy", "val_log_loss",
           "peak_val_accuracy", "final_val_accuracy", "peak_epoch", "epochs_run", "train_seconds", "parameters"]
DISPLAY = ["name", "model", "val accuracy", "val top-5", "val log loss", "peak val acc", "final val acc",
           "peak epoch", "epochs", "training time", "parameters"]
NUMERIC = set(DISPLAY[2:])
BASELINE_TITLES = {"random_guess": "random guess", "most_frequent": "most frequent breed",
                   "class_prior": "class prior (training frequencies)"}


def _unique_names(folders):
    """Folder names, lengthened with their parent where two would be the same."""
    names = [folder.name for folder in folders]
    return [f"{folder.parent.name}/{folder.name}" if names.count(folder.name) > 1 else folder.name
            for folder in folders]


def run_row(run_dir, name):
    """The table row of a finished run, read from its `metrics.json` and `config.yaml`."""
    run = load_run(run_dir)
    summary = run.summary
    with _naming_the_file(run.run_dir / "metrics.json"):
        return {
            "name": name, "kind": "run", "model": summary.get("model", run.config["model"]),
            "weights": summary.get("weights") or "none",
            "strategy": summary.get("strategy", run.config.get("strategy")),
            "val_accuracy": summary["val"]["accuracy"], "val_top5_accuracy": summary["val"]["top5_accuracy"],
            "val_log_loss": summary["val"]["log_loss"], "peak_val_accuracy": summary["peak_val_accuracy"],
            "final_val_accuracy": summary["final_val_accuracy"], "peak_epoch": summary["best_epoch"],
            "epochs_run": summary["epochs_run"], "train_seconds": summary["train_seconds"],
            "parameters": summary["parameters"]["total"],
        }


def ensemble_row(folder, name):
    """The table row of an ensemble folder; training time and parameters are the members' sums."""
    summary = read_json(folder / ENSEMBLE_FILE)
    with _naming_the_file(folder / ENSEMBLE_FILE):
        member_metrics = [pathlib.Path(member["run"]) / "metrics.json" for member in summary["members"]]
        member_seconds = [read_json(path).get("train_seconds") if path.is_file() else None
                          for path in member_metrics]
        return {
            "name": name, "kind": "ensemble",
            "model": " + ".join(f"{member['name']} ×{member['weight']:.2g}" for member in summary["members"]),
            "weights": "", "strategy": "", "val_accuracy": summary["val"]["accuracy"],
            "val_top5_accuracy": summary["val"]["top5_accuracy"], "val_log_loss": summary["val"]["log_loss"],
            "train_seconds": sum(member_seconds) if None not in member_seconds else None,
            "parameters": (summary.get("parameters") or {}).get("total"),
        }


def read_zeroshot(path):
    """A zero-shot result file (`tfdogs.zeroshot`): needs accuracy, top5_accuracy and log_loss."""
    result = read_json(path)
    missing = [key for key in ("accuracy", "top5_accuracy", "log_loss") if key not in result]
    if missing:
        raise RunFolderError(f"{path} lacks {', '.join(missing)}; expected a tfdogs.zeroshot result.")
    return result


def baseline_rows(folders, names, zeroshot_files=()):
    """Baseline rows of all runs, each distinct one once (runs sharing a split share their baselines).

    A baseline whose value differs between runs (different splits) gets one
    row per value, named after its run.
    """
    found = []  # (title, run name, row values)
    for folder, name in zip(folders, names):
        metrics_path = folder / "metrics.json"
        if not metrics_path.is_file():
            continue
        baselines = read_json(metrics_path)["baselines"]
        for key, title in BASELINE_TITLES.items():
            values = baselines.get(key)
            if values:
                if key == "most_frequent":
                    title = f"{title} ({values.get('breed')})"
                found.append((title, name, {"val_accuracy": values.get("accuracy"),
                                            "val_log_loss": values.get("log_loss")}))
        zeroshot_path = folder / "zeroshot.json"
        zeroshot = read_zeroshot(zeroshot_path) if zeroshot_path.is_file() else baselines.get("imagenet_zero_shot")
        if zeroshot:
            found.append((_zeroshot_title(zeroshot), name, _zeroshot_values(zeroshot)))
    for path in zeroshot_files:
        zeroshot = read_zeroshot(path)
        found.append((_zeroshot_title(zeroshot), pathlib.Path(path).name, _zeroshot_values(zeroshot)))
    rows, seen = [], []
    for title, name, values in found:
        if (title, values) in seen:
            continue
        seen.append((title, values))
        rows.append((title, name, values))
    repeated = {title for title, _, _ in rows if sum(other == title for other, _, _ in rows) > 1}
    return [{"name": f"{title} — {name}" if title in repeated else title, "kind": "baseline", **values}
            for title, name, values in rows]


def _zeroshot_title(result):
    title = "ImageNet zero-shot"
    if result.get("model"):
        title += f" {result['model']}"
    if result.get("weights"):
        title += f" ({result['weights']})"
    return title


def _zeroshot_values(result):
    return {"val_accuracy": result["accuracy"], "val_top5_accuracy": result["top5_accuracy"],
            "val_log_loss": result["log_loss"]}


@contextlib.contextmanager
def _naming_the_file(path):
    """Turns a KeyError while reading a result file into an error naming the file and the key."""
    try:
        yield
    except KeyError as error:
        raise RunFolderError(f"{path} lacks the key {error}; was it written by tfdogs?") from None


def comparison_table(folders, zeroshot_files=()):
    """The comparison as a DataFrame with `COLUMNS`: runs and ensembles, then baselines."""
    folders = [pathlib.Path(folder) for folder in folders]
    names = _unique_names(folders)
    rows = []
    for folder, name in zip(folders, names):
        if (folder / "ensemble.json").is_file():
            rows.append(ensemble_row(folder, name))
        else:
            rows.append(run_row(folder, name))
    rows += baseline_rows(folders, names, zeroshot_files)
    table = pd.DataFrame(rows, columns=COLUMNS)
    for column in ("peak_epoch", "epochs_run", "parameters"):
        table[column] = table[column].astype("Int64")  # whole numbers, blank where a row has none
    return table


def _percent(value):
    return "" if _missing(value) else f"{100 * value:.2f} %"


def _missing(value):
    return value is None or (isinstance(value, float) and math.isnan(value))


def _duration(seconds):
    if _missing(seconds):
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def display_rows(table):
    """The table's rows as formatted strings in `DISPLAY` order (percent, durations, thousands)."""
    rows = []
    for row in table.to_dict("records"):
        if row["kind"] == "run":
            model = f"{row['model']} ({row['strategy']}, {row['weights']})"
        else:
            model = "" if _missing(row["model"]) else row["model"]
        rows.append([
            row["name"], model, _percent(row["val_accuracy"]), _percent(row["val_top5_accuracy"]),
            "" if _missing(row["val_log_loss"]) else f"{row['val_log_loss']:.4f}",
            _percent(row["peak_val_accuracy"]), _percent(row["final_val_accuracy"]),
            "" if _missing(row["peak_epoch"]) else str(int(row["peak_epoch"])),
            "" if _missing(row["epochs_run"]) else str(int(row["epochs_run"])),
            _duration(row["train_seconds"]),
            "" if _missing(row["parameters"]) else f"{int(row['parameters']):,}",
        ])
    return rows


def _file_name(name):
    return name.replace("/", "__").replace(" ", "_")


def _validation_sets(folders):
    sets = []
    for folder in folders:
        split_path = folder / "split.csv"
        if split_path.is_file():
            split = pd.read_csv(split_path)
            sets.append(frozenset(split.loc[split["subset"] == "val", "path"]))
    return sets


def evaluation_report(folder):
    """The run's evaluation report page: of its validation split if there is one, else any other; or None."""
    pages = sorted(pathlib.Path(folder).glob("evaluation*/report/index.html"))
    own = pathlib.Path(folder) / "evaluation" / "report" / "index.html"
    return own if own in pages else (pages[0] if pages else None)


def compare(folders, output, *, zeroshot_files=(), title=None):
    """Writes the comparison report of finished runs (and ensembles) to `output`.

    Args:
        folders: run folders and/or ensemble folders.
        output: report folder (created).
        zeroshot_files: extra `tfdogs.zeroshot` result files.
        title: page title; default the folder's name.

    Returns:
        The comparison table (`COLUMNS`).
    """
    folders = [pathlib.Path(folder) for folder in folders]
    if not folders:
        raise RunFolderError("Nothing to compare: give run folders or --configs.")
    output = pathlib.Path(output)
    files.refuse_foreign_folder(output, "table.csv")
    table = comparison_table(folders, zeroshot_files)
    with files.whole_folder(output, "table.csv") as written:  # an earlier report stays until this one is whole
        _write_report(table, folders, written, title or output.name)
    return table


def _write_report(table, folders, output, title):
    """The comparison's files in `output` (a sibling of the report's final folder: relative links hold)."""
    (output / "curves").mkdir()
    table.to_csv(output / "table.csv", index=False)
    rows = display_rows(table)
    (output / "table.md").write_text(markdown_table(DISPLAY, rows, NUMERIC))

    histories, figures = {}, []
    for folder, name in zip(folders, table["name"]):
        if (folder / "history.csv").is_file():
            histories[name] = pd.read_csv(folder / "history.csv")
    references = {row["name"]: {"accuracy": None if _missing(row["val_accuracy"]) else row["val_accuracy"],
                                "log_loss": None if _missing(row["val_log_loss"]) else row["val_log_loss"],
                                "color": "black" if row["kind"] == "ensemble" else "grey"}
                  for row in table.to_dict("records") if row["kind"] != "run"}
    plots.plot_validation_overlay(histories, output / "validation_curves.png", reference_lines=references,
                                  title="Validation curves")
    figures.append(("Validation accuracy and log loss per epoch; dashed lines: baselines and ensembles",
                    "validation_curves.png"))
    for name, history in histories.items():
        relative = f"curves/{_file_name(name)}.png"
        plots.plot_curves(history, output / relative, title=name)
        figures.append((f"{name}: training against validation", relative))

    notes = []
    validation_sets = _validation_sets(folders)
    if len(set(validation_sets)) > 1:
        notes.append("These runs were validated on different splits (their split.csv differ); "
                     "their numbers are not measured on the same images.")
    write_index(output / "index.html", title,
                table=html_table(DISPLAY, rows, NUMERIC, list(table["kind"])),
                notes=notes, figures=figures, links=[("table.csv", "table.csv"), ("table.md", "table.md")] + [
                    (f"{name}: evaluation report", pathlib.Path(os.path.relpath(page, output)).as_posix())
                    for folder, name in zip(folders, table["name"])
                    if (page := evaluation_report(folder)) is not None])


def parse_overrides(assignments):
    """`KEY=VALUE` strings to a config mapping; values are read as YAML (3, 0.1, true, null)."""
    overrides = {}
    for assignment in assignments:
        key, separator, value = assignment.partition("=")
        if not separator:
            raise config_lib.ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set epochs=3.")
        key = key.strip().replace("-", "_")
        if key in ("output", "export_dir"):
            raise config_lib.ConfigError(
                f"--set {key}: every config gets its own folder under --runs-dir and --exports-dir; use those.")
        overrides[key] = config_lib.parse_yaml(value)
    return overrides


def train_configs(config_files, overrides, runs_dir, exports_dir=None):
    """Trains config files one after the other, as `python -m tfdogs.train --config FILE` would.

    Args:
        config_files: YAML config files.
        overrides: config values applied on top of every file.
        runs_dir: each run goes to `runs_dir/<config file stem>`.
        exports_dir: each SavedModel goes to `exports_dir/<config file stem>`;
            default `saved_models/<config file stem>`.

    Returns:
        The run folders.
    """
    run_dirs = []
    for path in config_files:
        path = pathlib.Path(path)
        output = pathlib.Path(runs_dir) / path.stem
        export_dir = str(pathlib.Path(exports_dir) / path.stem) if exports_dir else None
        config = config_lib.validate({**config_lib.DEFAULTS, **config_lib.load_yaml(path), **overrides,
                                      "output": str(output), "export_dir": export_dir})
        print(f"Training {path} into {output} ...", flush=True)
        run_dirs.append(train(config))
    return run_dirs
