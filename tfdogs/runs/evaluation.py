"""A finished run scored on its validation split or other labelled photos, breed by breed.

The command line and what it writes: `tfdogs.evaluate`.
"""

import dataclasses
import pathlib

import numpy as np

from tfdogs import data, files
from tfdogs.data.validation import file_digest
from tfdogs.evaluation import metrics, plots
from tfdogs.evaluation.confusion import confusion_matrix, most_confused_pairs, per_breed_accuracy
from tfdogs.evaluation.report import write_report
from tfdogs.runs.ensemble import common_validation_images
from tfdogs.runs.folder import RunFolderError, load_model_folder, predict_paths, relabel, tta_views


def evaluate(run_dir, *, data_dir=None, tta=1, output=None, batch_size=32, top_pairs=10, report=True,
             calibrate=False, verbose=1):
    """Scores a run's best model (or an ensemble) and writes the per-breed tables, the figure and the report.

    Args:
        run_dir: run folder, or ensemble folder (`tfdogs.ensemble`): its members'
            probabilities are averaged with its weights, each member seeing the
            photos through its own preprocessing, as its SavedModel does.
        data_dir: another labelled data set (Kaggle or class-folder layout) to
            score on every image of, but those that a member trained on (by
            content: split.csv's SHA-256), which are left out and counted in
            `excluded_training_photos`; default: the run's own validation split
            (an ensemble's: the photos every member held out).
        tta: test-time augmentation views per image, 1 (none), 2 or 10; see `predict_paths`.
        output: folder for the results; default `FOLDER/evaluation` (with
            `-<data folder name>` and/or `-tta<views>` appended).
        batch_size: images per forward pass.
        top_pairs: how many confused pairs to list and plot.
        report: also write the picture report, `output/report/index.html`.
        calibrate: also fit a temperature on these images (on the logarithms of the
            model's probabilities, which already hold the run's own temperature) and
            report the scores it would give, under `calibrated`: a refit on
            another split than the one training fitted on.
        verbose: 1 shows a progress bar over many photos on a terminal, 0 nothing.

    Returns:
        The `evaluation.json` content, plus `output` (the folder written).
    """
    views = tta_views(tta)
    folder = pathlib.Path(run_dir)
    runs, member_weights = load_model_folder(folder)
    class_names = runs[0].class_names
    excluded = 0
    if data_dir is not None:
        records, excluded = without_trained_photos(data.find_records(data_dir), runs)
        member_paths, labels = [records.paths] * len(runs), relabel(records, class_names)
        source = f"all {len(labels)} labelled images in {records.root}" + (
            f" that {'no member' if len(runs) > 1 else 'the run'} trained on ({excluded} left out)" if excluded else "")
    elif len(runs) == 1:
        records, _, val_indices = runs[0].split()
        member_paths, labels = [[records.paths[i] for i in val_indices]], records.labels[val_indices]
        source = f"validation split of {runs[0].run_dir} ({len(labels)} images)"
    else:
        member_paths, labels, _, note = common_validation_images(runs)
        source = (f"the {len(labels)} validation images every member of the ensemble {folder} held out"
                  + (f" ({note})" if note else ""))
    if output is None:
        suffix = "" if data_dir is None else f"-{pathlib.Path(records.root).name}"
        suffix += f"-tta{views}" if views > 1 else ""
        output = folder / f"evaluation{suffix}"
    output = pathlib.Path(output)
    files.refuse_foreign_folder(output, "evaluation.json")  # before the work, not after it

    models = [run.load_model() for run in runs]
    probabilities = metrics.weighted_mean(
        [predict_paths(model, paths, run.preprocessing, batch_size=batch_size, tta=views, verbose=verbose)
         for model, paths, run in zip(models, member_paths, runs)], member_weights)
    counts = confusion_matrix(probabilities, labels, len(class_names))
    breeds = per_breed_accuracy(counts, class_names)
    pairs = most_confused_pairs(counts, class_names, top=top_pairs)
    result = {
        "run": str(folder), "data": source, "num_images": len(labels), "excluded_training_photos": excluded,
        "tta": views,
        "scores": metrics.scores(probabilities, labels),
        "ece": metrics.reliability(probabilities, labels)[1],
        "random_guess": {"accuracy": 1 / len(class_names), "log_loss": float(np.log(len(class_names)))},
    }
    if len(runs) > 1:
        result["members"] = [{"run": str(run.run_dir), "weight": weight}
                             for run, weight in zip(runs, metrics.normalised_weights(member_weights, len(runs)))]
    if calibrate:
        log_probabilities = np.log(np.clip(probabilities, 1e-30, 1.0))
        temperature = metrics.fit_temperature(log_probabilities, labels)
        result["calibrated"] = {**metrics.calibrated_scores(log_probabilities, labels, temperature),
                                "fitted_on": source}
    with files.whole_folder(output, "evaluation.json") as folder_written:  # the old evaluation stays until the new one is whole
        files.write_json(result, folder_written / "evaluation.json")
        breeds.to_csv(folder_written / "per_breed.csv", index=False)
        pairs.to_csv(folder_written / "confused_pairs.csv", index=False)
        plots.plot_confused_pairs(counts, class_names, pairs, folder_written / "confusions.png",
                                  title=f"{folder.name}: most-confused breeds")
        if report:
            write_report(
                folder_written / "report", title=folder.name, paths=member_paths[0], labels=labels,
                probabilities=probabilities, class_names=class_names, counts=counts, breeds=breeds, pairs=pairs,
                models=models, preprocessings=[run.preprocessing for run in runs], member_weights=member_weights,
                source=source, scores=result["scores"], run_dir=folder,
                links=[(name, f"../{name}") for name in ("evaluation.json", "per_breed.csv", "confused_pairs.csv")])
    return {**result, "output": str(output)}


def without_trained_photos(records, runs):
    """`records` without the photos any of `runs` trained on, matched by content (SHA-256 of the bytes).

    Returns:
        (the records left, how many were left out).

    Raises:
        RunFolderError: every photo was a training photo.
    """
    trained = set().union(*(run.trained_digests() for run in runs))
    keep = [index for index, path in enumerate(records.paths) if file_digest(path) not in trained]
    if not keep:
        raise RunFolderError(f"Every photo in {records.root} is one the run trained on; scores on them would "
                             f"say nothing about new photos. Evaluate without --data-dir for its validation split.")
    kept = dataclasses.replace(records, paths=[records.paths[index] for index in keep],
                               labels=np.asarray(records.labels)[keep])
    return kept, len(records.paths) - len(keep)
