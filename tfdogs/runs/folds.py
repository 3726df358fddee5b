"""K-fold cross-validation: K runs on a stratified partition, their out-of-fold predictions, one ensemble export.

`python -m tfdogs.train ... --folds K` calls `run_folds`, which writes into OUTPUT:

    fold-1/ ... fold-K/   normal run folders; fold k's validation split is fold k, its training split the rest
    oof.csv               every labelled photo once: its fold, label and the probabilities of the one fold
                          model that did not train on it (float32 model.keras, evaluation crop, uncalibrated)
    folds.json            per-fold and cross-validated scores (mean, std, min, max), the temperature fitted
                          on the out-of-fold logits and the scores it gives
    fold_exports/         each fold run's own SavedModel

and one SavedModel of the K models, equal weights, each with the out-of-fold temperature, under `--export-dir`
(default `tfdogs.serving.export_folder.default_export_dir(OUTPUT)`).

Photos no model trained on are what Kaggle's strong solutions fit calibration on; a single run fits its
temperature on the very validation photos it then reports. Byte-identical copies always share a fold.

Running the same command again skips the finished folds (`metrics.json` written) and resumes the next one
as any run resumes.
"""

import dataclasses
import pathlib

import numpy as np
import pandas as pd

from tfdogs import config as config_lib, data, files, lock
from tfdogs.data.validation import check_data
from tfdogs.evaluation import metrics
from tfdogs.evaluation.predictions import predict_logits, uncalibrated, with_temperature
from tfdogs.runs.folder import load_run
from tfdogs.serving.export_folder import ExportFolderError, check_owner, default_export_dir
from tfdogs.serving.saved_model import export_saved_model
from tfdogs.training.loop import train
from tfdogs.training.prepare import evaluation_dataset

OOF_FILE = "oof.csv"
FOLDS_FILE = "folds.json"
SCORES = ("accuracy", "top5_accuracy", "log_loss", "ece")


@dataclasses.dataclass(frozen=True)
class FoldPredictions:
    """One fold's validation photos: their split.csv paths and record indices, labels and the fold model's logits."""

    fold: int
    paths: list
    indices: np.ndarray
    labels: np.ndarray
    logits: np.ndarray


def fold_dir(output, fold):
    """The run folder of 1-based `fold`."""
    return pathlib.Path(output) / f"fold-{fold}"


def run_folds(config):
    """Trains the K folds of a config with `folds` >= 2 (skipping finished ones), then scores and exports them.

    Args:
        config: a validated config (`tfdogs.config.validate`); `output` names the folder of the folds.

    Returns:
        The output folder.
    """
    config = config_lib.validate(config)
    if config["folds"] < 2:
        raise config_lib.ConfigError(f"Config key 'folds': run_folds needs 2 or more; got {config['folds']}.")
    if config["distribute"] == "multi-worker":
        raise config_lib.ConfigError("Config key 'folds': K-fold runs train on one machine; not with multi-worker.")
    output = pathlib.Path(config["output"])
    try:
        check_owner(ensemble_export_base(config, output), output, explicit=config["export_dir"] is not None)
    except ExportFolderError as error:
        raise config_lib.ConfigError(f"Config key 'export_dir': {error}") from None
    with lock.hold(output / lock.RUN_LOCK, f"K-fold folder {output}"):
        fold_config = photos_config(config, output)
        write_fold_splits(fold_config, output)
        train_folds(fold_config, output)
        predictions = out_of_fold(fold_config, output)
        write_oof(output / OOF_FILE, predictions, load_run(fold_dir(output, 1)).class_names)
        summary = summarise(predictions, config)
        summary["export"] = str(export_ensemble(config, output, summary["oof_temperature"]["temperature"]))
        files.write_json(summary, output / FOLDS_FILE)
    return output


def photos_config(config, output):
    """The config with its photos named by `data_dir`, as every fold reads them.

    Synthetic photos are generated once into OUTPUT/synthetic_data, so every fold trains on the same files.
    """
    fold_config = dict(config)
    if config["data"] == "synthetic":
        data_dir = output / "synthetic_data"
        if not (data_dir / "labels.csv").is_file():
            data.make_synthetic(data_dir, num_classes=config["synthetic_classes"],
                                images_per_class=config["synthetic_images_per_class"],
                                image_size=max(64, config["image_size"]), seed=config["seed"])
        fold_config.update(data=None, data_dir=str(data_dir))
    elif config["data"] == "stanford_dogs":
        fold_config.update(data=None, data_dir=str(data.load_stanford_dogs()))
    return fold_config


def write_fold_splits(config, output):
    """Writes each fold's `split.csv` (validation: that fold) where the fold has none yet.

    The partition is `data.stratified_folds` over every usable photo, byte-identical copies grouped. A fold
    that already has its split keeps it; its run refuses photos changed since (`check_same_photos`).
    """
    if all((fold_dir(output, fold) / "split.csv").is_file() for fold in range(1, config["folds"] + 1)):
        return
    report = check_data(config["data_dir"], converted_dir=None, verbose=config["verbose"] != 0)
    fold_of = data.stratified_folds(report.records.labels, config["folds"], config["seed"], groups=report.groups)
    for fold in range(1, config["folds"] + 1):
        split_path = fold_dir(output, fold) / "split.csv"
        if not split_path.is_file():
            data.write_split(split_path, report.records, np.flatnonzero(fold_of != fold - 1),
                             np.flatnonzero(fold_of == fold - 1), report.digests)


def train_folds(config, output):
    """Trains every fold without `metrics.json` (the last file a run writes), in order; finished ones are skipped.

    Each is a normal run (`folds` 1) whose `split.csv` is already there, so it validates on its fold.
    """
    for fold in range(1, config["folds"] + 1):
        run_dir = fold_dir(output, fold)
        if (run_dir / "metrics.json").is_file():
            print(f"Fold {fold} of {config['folds']}: finished in {run_dir}; not trained again.")
            continue
        print(f"Fold {fold} of {config['folds']}: training {run_dir}.")
        train({**config, "folds": 1, "output": str(run_dir), "export_dir": str(output / "fold_exports" / f"fold-{fold}")})


def out_of_fold(config, output):
    """Each fold model's logits (float32 model.keras, without its temperature) on its own validation photos."""
    predictions = []
    for fold in range(1, config["folds"] + 1):
        run = load_run(fold_dir(output, fold))
        records, _, val_indices = run.split()
        relative = pd.read_csv(run.run_dir / "split.csv", dtype=str, keep_default_na=False)["path"].tolist()
        dataset = evaluation_dataset({"batch_size": config["batch_size"]}, records, val_indices, run.preprocessing)
        predictions.append(FoldPredictions(fold, [relative[i] for i in val_indices], val_indices,
                                           records.labels[val_indices],
                                           predict_logits(uncalibrated(run.load_model()), dataset)))
    return predictions


def write_oof(path, predictions, class_names):
    """`oof.csv`: path, fold, label, breed and one probability column per breed, in split.csv's photo order."""
    rows = []
    for fold in predictions:
        for index, name, label, probabilities in zip(fold.indices, fold.paths, fold.labels,
                                                     metrics.softmax(fold.logits)):
            rows.append((int(index), [name, fold.fold, int(label), class_names[label],
                                      *(repr(float(value)) for value in probabilities)]))
    files.write_csv(path, ["path", "fold", "label", "breed", *class_names], [row for _, row in sorted(rows)])


def fold_scores(logits, labels, temperature=1.0):
    """Accuracy, top-5 accuracy, log loss and expected calibration error of softmax(logits / temperature)."""
    probabilities = metrics.softmax(logits, temperature)
    return {**metrics.scores(probabilities, labels), "ece": metrics.reliability(probabilities, labels)[1]}


def spread(values):
    """Mean, standard deviation (population: over the K folds themselves), lowest and highest of `values`."""
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max())}


def summarise(predictions, config):
    """`folds.json`: per-fold scores, their spread, the pooled out-of-fold scores, and the OOF temperature.

    The temperature is fitted on all out-of-fold logits (no photo was seen in training by the model that
    scored it). `calibrated` scores it on those same photos; `calibrated_cross_fitted` scores each fold with
    the temperature fitted on the other folds' out-of-fold logits, so no score there saw its photos at all.
    """
    logits = np.concatenate([fold.logits for fold in predictions])
    labels = np.concatenate([fold.labels for fold in predictions])
    per_fold = [{"fold": fold.fold, "num_val": int(len(fold.labels)), **fold_scores(fold.logits, fold.labels)}
                for fold in predictions]
    temperature = metrics.fit_temperature(logits, labels)
    cross_fitted = []
    for fold in predictions:
        others = [other for other in predictions if other is not fold]
        held_out_temperature = metrics.fit_temperature(np.concatenate([other.logits for other in others]),
                                                       np.concatenate([other.labels for other in others]))
        cross_fitted.append({"fold": fold.fold, "temperature": held_out_temperature,
                             **fold_scores(fold.logits, fold.labels, held_out_temperature)})
    return {
        "folds": config["folds"], "seed": config["seed"], "model": config["model"], "weights": config["weights"],
        "strategy": config["strategy"], "epochs": config["epochs"], "num_photos": int(len(labels)),
        "scored_by": "each fold's model.keras (float32, its temperature layer removed) on the evaluation crops "
                     "of its own validation photos, which it did not train on",
        "per_fold": per_fold,
        "cross_validated": {key: spread([fold[key] for fold in per_fold]) for key in SCORES},
        "out_of_fold": fold_scores(logits, labels),
        "oof_temperature": {
            "temperature": temperature,
            "fitted_on": f"the out-of-fold logits of all {len(labels)} photos: each photo scored by the fold "
                         "model that did not train on it, so no model trained on the photos it is fitted on",
            "calibrated": {**fold_scores(logits, labels, temperature),
                           "measured_on": "the same out-of-fold photos the temperature is fitted on"},
            "calibrated_cross_fitted": {
                "per_fold": cross_fitted,
                **{key: spread([fold[key] for fold in cross_fitted]) for key in SCORES},
                "measured_on": "each fold with the temperature fitted on the other folds' out-of-fold logits"},
        },
        "config": config,
    }


def ensemble_export_base(config, output):
    """Where the ensemble of the folds is exported: `export_dir`, else the default of the output folder."""
    return pathlib.Path(config["export_dir"] or default_export_dir(output))


def export_ensemble(config, output, temperature):
    """One SavedModel of the K fold models, equal weights, each dividing its logits by the OOF temperature."""
    runs = [load_run(fold_dir(output, fold)) for fold in range(1, config["folds"] + 1)]
    return export_saved_model(
        [with_temperature(uncalibrated(run.load_model()), temperature) for run in runs], runs[0].class_names,
        ensemble_export_base(config, output), preprocessing=[run.preprocessing for run in runs],
        gates=[run.dog_gate() for run in runs], gates_facts=[run.dog_facts() for run in runs],
        metadata={"run": str(output.resolve()), "folds": [str(run.run_dir.resolve()) for run in runs],
                  "temperature": {"value": temperature, "fitted_on": "the folds' out-of-fold logits"}})


def summary_line(summary):
    """One line: cross-validated accuracy and log loss with their spread, the OOF temperature and its effect."""
    accuracy, loss = summary["cross_validated"]["accuracy"], summary["cross_validated"]["log_loss"]
    calibration = summary["oof_temperature"]
    return (f"{summary['folds']}-fold cross-validation: accuracy {accuracy['mean']:.4f} ± {accuracy['std']:.4f} "
            f"(min {accuracy['min']:.4f}, max {accuracy['max']:.4f}), log loss {loss['mean']:.4f} ± "
            f"{loss['std']:.4f} (min {loss['min']:.4f}, max {loss['max']:.4f}); out-of-fold temperature "
            f"{calibration['temperature']:.3f}: OOF log loss {summary['out_of_fold']['log_loss']:.4f} -> "
            f"{calibration['calibrated']['log_loss']:.4f}, ECE {summary['out_of_fold']['ece']:.4f} -> "
            f"{calibration['calibrated']['ece']:.4f}")
