"""Several finished runs averaged into one model: their common validation images, the scores, the export.

The command line and what it writes: `tfdogs.ensemble`.
"""

import datetime
import pathlib

import numpy as np
import pandas as pd

from tfdogs import files
from tfdogs.evaluation import metrics
from tfdogs.runs.folder import ENSEMBLE_FILE, RunFolderError, load_run, predict_paths
from tfdogs.serving.export_folder import check_owner, default_export_dir
from tfdogs.serving.saved_model import export_saved_model


def check_same_classes(runs):
    """Raises `RunFolderError`, naming the runs and breeds, unless every member has the same classes in order."""
    first = runs[0]
    for run in runs[1:]:
        if run.class_names != first.class_names:
            only_first = sorted(set(first.class_names) - set(run.class_names))
            only_other = sorted(set(run.class_names) - set(first.class_names))
            detail = (f"only in {first.name}: {only_first[:10]}; only in {run.name}: {only_other[:10]}"
                      if only_first or only_other else "same breeds in a different label order")
            raise RunFolderError(
                f"Ensemble members must predict the same breeds: {first.run_dir / 'split.csv'} has "
                f"{len(first.class_names)} and {run.run_dir / 'split.csv'} has {len(run.class_names)} ({detail}).")


def common_validation_images(runs):
    """The images every member held out, as each member's own file paths.

    An image that any member trained on is left out, since it would flatter that member.

    Returns:
        (paths per member, labels, train labels of the first member, note):
        `note` is None when all members share one split, else a sentence on
        what differs and how many images remain.

    Raises:
        RunFolderError: no image is held out by every member.
    """
    held_out, trained = [], set()  # per member: {path in split.csv: (the file it reads, label)}
    for position, run in enumerate(runs):
        records, train_indices, val_indices = run.split()
        # split.csv names the original files, row for row with records.paths (which may be converted copies)
        relative = pd.read_csv(run.run_dir / "split.csv", dtype=str, keep_default_na=False)["path"].tolist()
        held_out.append({relative[i]: (records.paths[i], records.labels[i]) for i in val_indices})
        trained |= {relative[i] for i in train_indices}
        if position == 0:
            first_train_labels = records.labels[train_indices]
    common = [name for name in held_out[0] if name not in trained and all(name in other for other in held_out)]
    same_split = all(other.keys() == held_out[0].keys() for other in held_out) and not trained & held_out[0].keys()
    note = None
    if not same_split:
        sizes = ", ".join(f"{run.name}: {len(images)}" for run, images in zip(runs, held_out))
        note = (f"The members were validated on different splits (validation images {sizes}); all scores here "
                f"use the {len(common)} images that every member held out and none trained on.")
    if not common:
        raise RunFolderError(
            "The members share no validation image that none of them trained on ("
            + ", ".join(str(run.run_dir / "split.csv") for run in runs)
            + "); train them with the same data, seed and val_fraction.")
    paths = [[images[name][0] for name in common] for images in held_out]
    labels = np.array([held_out[0][name][1] for name in common], np.int64)
    return paths, labels, first_train_labels, note


def ensemble(run_dirs, output=None, *, member_weights=None, export_dir=None, batch_size=32):
    """Scores and exports an ensemble of finished runs.

    Args:
        run_dirs: run folders of the members (two or more).
        output: ensemble folder; default `runs/ensemble-<timestamp>`.
        member_weights: optional weight per member (normalised to sum to 1).
        export_dir: SavedModel base folder; default `tfdogs.serving.export_folder.default_export_dir(output)`.
        batch_size: images per forward pass.

    Returns:
        The ensemble folder.
    """
    if len(run_dirs) < 2:
        raise RunFolderError(f"An ensemble needs at least two run folders; got {len(run_dirs)}.")
    runs = [load_run(run_dir) for run_dir in run_dirs]
    check_same_classes(runs)
    try:
        member_weights = metrics.normalised_weights(member_weights, len(runs))
    except ValueError as error:
        raise RunFolderError(str(error)) from None
    paths, labels, train_labels, note = common_validation_images(runs)
    output = pathlib.Path(output or pathlib.Path("runs") / f"ensemble-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    export_base = pathlib.Path(export_dir or default_export_dir(output))
    files.refuse_foreign_folder(output, ENSEMBLE_FILE)
    check_owner(export_base, output, explicit=export_dir is not None)

    models = [run.load_model() for run in runs]
    probabilities = [predict_paths(model, member_paths, run.preprocessing, batch_size=batch_size)
                     for model, member_paths, run in zip(models, paths, runs)]
    combined = metrics.weighted_mean([np.asarray(member, np.float64) for member in probabilities], member_weights)
    class_names = runs[0].class_names
    members = [{"run": str(run.run_dir.resolve()), "name": run.name, "model": run.config["model"],
                "weight": weight, "preprocessing": run.preprocessing.as_dict(),
                "val": metrics.scores(member, labels)}
               for run, weight, member in zip(runs, member_weights, probabilities)]
    version_dir = export_saved_model(
        models, class_names, export_base, preprocessing=[run.preprocessing for run in runs],
        model_weights=member_weights, gates=[run.dog_gate() for run in runs],
        gates_facts=[run.dog_facts() for run in runs],
        metadata={"run": str(output.resolve()), "ensemble": str(output.resolve()),
                  "member_runs": [member["run"] for member in members]})
    summary = {
        "members": members, "num_classes": len(class_names), "num_val": int(len(labels)),
        "split_note": note, "val": metrics.scores(combined, labels),
        "baselines": metrics.baselines(train_labels, labels, len(class_names), class_names),
        "parameters": {"total": int(sum(run.summary["parameters"]["total"] for run in runs))},
        "export": str(version_dir),
    }
    table = scores_table(summary, output.name)
    with files.whole_folder(output, ENSEMBLE_FILE) as folder:  # an earlier ensemble's files and evaluation go
        files.write_json(summary, folder / ENSEMBLE_FILE)
        table.to_csv(folder / "scores.csv", index=False)
        (folder / "scores.md").write_text(markdown_scores(table))
    return output


def scores_table(summary, name):
    """One row per member and one for the ensemble, on the same images."""
    rows = [{"name": member["name"], "model": member["model"], "weight": member["weight"], **member["val"]}
            for member in summary["members"]]
    rows.append({"name": name, "model": "ensemble", "weight": 1.0, **summary["val"]})
    return pd.DataFrame(rows, columns=["name", "model", "weight", "accuracy", "top5_accuracy", "log_loss"])


def markdown_scores(table):
    """The scores table in Markdown, accuracies in percent."""
    lines = ["| name | model | weight | accuracy | top-5 | log loss |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in table.itertuples():
        lines.append(f"| {row.name} | {row.model} | {row.weight:.3f} | {100 * row.accuracy:.2f} % | "
                     f"{100 * row.top5_accuracy:.2f} % | {row.log_loss:.4f} |")
    return "\n".join(lines) + "\n"
