"""`python -m tfdogs.evaluate`: a finished run's scores, breed by breed.

Scores the run's best model (`model.keras`) on its own validation split (from
`split.csv`), or on another labelled data set with `--data-dir`, and writes to
`RUN/evaluation/` (or `--output`):

    evaluation.json     accuracy, top-5 accuracy, Kaggle log loss, what was scored
    per_breed.csv       images, correct answers, accuracy and the most frequent wrong answer per breed
    confused_pairs.csv  the breed pairs mistaken for each other most often
    confusions.png      those pairs as bars, beside the confusion counts among their breeds
    report/index.html   a page of pictures: top-loss photos, confused pairs side by side, the whole
                        confusion matrix, per-breed accuracy, calibration, Grad-CAM heat maps and
                        predictions.csv (`tfdogs.evaluation_report`; --no-report leaves it out)

Fine-grained errors are the interesting ones: a model that mixes up Siberian
husky and malamute has learnt something; one that mixes up pug and borzoi has
not. `--tta N` is test-time augmentation: each image's softmax probabilities
are averaged over N views of it (`data.eval_views`): 2, the evaluation crop and
its mirror image; 10, the centre and four corner crops of the resized image,
each with its mirror image (a bare `--tta` means 2).

This module also reads run folders for the other after-training tools
(`load_run`, `predict_paths`).

Examples:
    python -m tfdogs.evaluate runs/resnet18-20240101-120000
    python -m tfdogs.evaluate runs/resnet18-20240101-120000 --tta 10
    python -m tfdogs.evaluate runs/lenet --data-dir path/to/other/labelled/photos --output reports/lenet-other
"""

import argparse
import csv
import dataclasses
import json
import pathlib
import sys

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from tfdogs import check, config as config_lib, data, evaluation_report, metrics, plots, progress, train, weights
from tfdogs.preprocessing import FILE_NAME as PREPROCESSING_FILE, Preprocessing, PreprocessingError


class RunFolderError(ValueError):
    """A run, ensemble or model folder lacks a file or does not fit; the message names the file."""


@dataclasses.dataclass
class Run:
    """A finished training run, read from its folder.

    Attributes:
        run_dir: the run folder.
        name: the folder's name.
        config: the resolved config (`config.yaml`).
        class_names: breed names in class-index order (from `split.csv`).
        preprocessing: the `Preprocessing` training resolved and wrote to `RUN/preprocessing.json`.
    """

    run_dir: pathlib.Path
    name: str
    config: dict
    class_names: list
    preprocessing: Preprocessing

    @property
    def summary(self):
        """`metrics.json`, written when training finished."""
        return read_json(self.run_dir / "metrics.json")

    def load_model(self):
        """The run's best model (plain Keras, returns logits)."""
        path = self.run_dir / "model.keras"
        if not path.is_file():
            raise RunFolderError(f"{path} is missing: the run in {self.run_dir} has not finished training.")
        return keras.saving.load_model(path)

    def data_dir(self):
        """The labelled photos the run was trained on.

        Runs on generated data keep it inside the run folder; a moved run folder
        still finds it there.
        """
        recorded = self.config.get("data_dir")
        if recorded and pathlib.Path(recorded).is_dir():
            return pathlib.Path(recorded)
        if self.config.get("data") == "synthetic" and (self.run_dir / "synthetic_data").is_dir():
            return self.run_dir / "synthetic_data"
        raise RunFolderError(
            f"{self.run_dir / 'config.yaml'}: its data_dir {recorded!r} does not exist; "
            "pass --data-dir to point at the photos.")

    def split(self, data_dir=None):
        """The run's photos and split: (records, train_indices, val_indices), see `data.read_split`.

        Photos the training converted because TensorFlow cannot decode them
        (`RUN/converted/`, see `tfdogs.check`) are read from those copies, so
        evaluation sees what training saw. `records.paths` follow the rows of
        `split.csv`.
        """
        records, train_indices, val_indices = data.read_split(self.run_dir / "split.csv", data_dir or self.data_dir())
        if (self.run_dir / "converted").is_dir():
            records = check.with_converted_copies(records, self.run_dir / "converted")
        return records, train_indices, val_indices


def read_json(path):
    """Reads a JSON file, naming it when it is missing or malformed."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise RunFolderError(f"{path} is missing.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{path} is not valid JSON: {error}") from None


def split_class_names(split_path):
    """Breed names in class-index order, read from a `split.csv` without touching the photos."""
    split_path = pathlib.Path(split_path)
    if not split_path.is_file():
        raise RunFolderError(f"{split_path} is missing.")
    with open(split_path, newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows or not {"label", "breed"} <= set(rows[0]):
        raise RunFolderError(f"{split_path}: expected a header with 'label' and 'breed' and at least one row.")
    breed_of_label = {int(row["label"]): row["breed"] for row in rows}
    return [breed_of_label[label] for label in sorted(breed_of_label)]


def load_run(run_dir):
    """Reads a run folder's config, classes and preprocessing.

    Args:
        run_dir: a folder written by `python -m tfdogs.train`.

    Returns:
        A `Run`.

    Raises:
        RunFolderError: naming the missing or unreadable file.
    """
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"Run folder {run_dir} does not exist.")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunFolderError(f"{config_path} is missing: {run_dir} is not a tfdogs run folder.")
    try:
        config = config_lib.load_yaml(config_path)
    except config_lib.ConfigError as error:
        raise RunFolderError(str(error)) from None
    for key in ("model", "image_size"):
        if key not in config:
            raise RunFolderError(f"{config_path} has no '{key}'.")
    return Run(run_dir, run_dir.name, config, split_class_names(run_dir / "split.csv"),
               read_preprocessing(run_dir, config))


def read_preprocessing(run_dir, config):
    """The run's `Preprocessing`, read from `RUN/preprocessing.json`.

    A run folder from before that file existed, trained from registry weights
    or from scratch, gets the record training resolves for its config now;
    one trained from a checkpoint file cannot be told apart and is refused.

    Raises:
        RunFolderError: naming the missing or malformed file.
    """
    path = pathlib.Path(run_dir) / PREPROCESSING_FILE
    if path.is_file():
        try:
            return Preprocessing.load(path)
        except PreprocessingError as error:
            raise RunFolderError(str(error)) from None
    source = config.get("weights")
    if source not in (None, "imagenet", "timm"):
        raise RunFolderError(
            f"{path} is missing: the run started from the file {source!r}, whose preprocessing only training "
            "resolved; write that file (fields of tfdogs.preprocessing.Preprocessing) or train again.")
    return weights.resolve_preprocessing(source, config["model"], int(config["image_size"]),
                                         config.get("weights_preprocessing", "auto"))


def tta_views(tta):
    """The number of test-time augmentation views `tta` asks for: 1, 2 or 10 (`data.TTA_VIEWS`).

    True and False, the flip-only switch of earlier versions, stand for 2 and 1.
    """
    if isinstance(tta, bool):
        return 2 if tta else 1
    if tta not in data.TTA_VIEWS:
        raise ValueError(f"--tta takes {', '.join(map(str, data.TTA_VIEWS))} views (1: none, 2: the evaluation "
                         f"crop and its mirror, 10: five crops and their mirrors); got {tta!r}.")
    return int(tta)


def predict_paths(model, paths, preprocessing, *, batch_size=32, tta=1, verbose=0):
    """Softmax probabilities of a model for image files, through the validation pipeline.

    With test-time augmentation, each image's views (`data.eval_views`) go
    through the model, and their softmax probabilities are averaged.

    Args:
        model: Keras classifier returning logits.
        paths: image file paths.
        preprocessing: the model's `Preprocessing`.
        batch_size: images per forward pass (each with all its views).
        tta: views per image, 1 (the evaluation crop alone), 2 or 10; see `tta_views`.
        verbose: 1 shows a progress bar over the photos (`tfdogs.progress`: many photos, on a terminal).

    Returns:
        float32 [len(paths), classes].
    """
    views = tta_views(tta)
    # each predicted batch holds batch_size photos (with all their views)
    shown = [progress.PredictCallback(progress.photos(len(paths), verbose), len(paths), batch_size)]
    dataset = data.make_dataset(list(paths), np.zeros(len(paths), np.int64), training=False,
                                batch_size=batch_size, views=views, **preprocessing.as_dict())
    if views == 1:
        return train.predict_probabilities(model, dataset, shown)
    size = preprocessing.image_size
    views_as_images = dataset.map(lambda images, labels: (tf.reshape(images, [-1, size, size, 3]), labels))
    probabilities = train.predict_probabilities(model, views_as_images, shown)
    return probabilities.reshape(len(paths), views, -1).mean(axis=1)


def relabel(records, class_names):
    """Labels of another labelled data set, as indices into a model's `class_names`.

    Raises:
        RunFolderError: the data set has breeds the model does not know (named).
    """
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(records.class_names) - index.keys())
    if unknown:
        raise RunFolderError(
            f"{records.root} has {len(unknown)} breed(s) the model does not know: {', '.join(unknown[:10])}"
            f"{' ...' if len(unknown) > 10 else ''}. The model knows: {', '.join(class_names[:10])}"
            f"{' ...' if len(class_names) > 10 else ''}.")
    return np.array([index[records.class_names[label]] for label in records.labels], np.int64)


def confusion_matrix(probabilities, labels, num_classes):
    """counts[true, predicted] of the most probable class."""
    predicted = np.argmax(probabilities, axis=1)
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (np.asarray(labels), predicted), 1)
    return counts


def per_breed_accuracy(counts, class_names):
    """Accuracy per breed from a confusion matrix, worst first.

    Returns:
        DataFrame: breed, images, correct, accuracy (NaN without images) and
        `most_predicted_instead`, the most frequent wrong answer ('' if none).
    """
    wrong = counts.copy()
    np.fill_diagonal(wrong, 0)
    images = counts.sum(axis=1)
    correct = np.diag(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(images > 0, correct / np.maximum(images, 1), np.nan)
    instead = [class_names[int(np.argmax(row))] if row.any() else "" for row in wrong]
    table = pd.DataFrame({"breed": class_names, "images": images, "correct": correct, "accuracy": accuracy,
                          "most_predicted_instead": instead})
    return table.sort_values(["accuracy", "breed"], na_position="last", kind="stable").reset_index(drop=True)


def most_confused_pairs(counts, class_names, top=10):
    """The breed pairs mistaken for each other most often, in either direction.

    Returns:
        DataFrame: breed_a, breed_b, a_as_b, b_as_a, total (a < b by index),
        most confusions first, pairs never confused left out.
    """
    rows = []
    for a in range(len(class_names)):
        for b in range(a + 1, len(class_names)):
            total = counts[a, b] + counts[b, a]
            if total:
                rows.append((class_names[a], class_names[b], int(counts[a, b]), int(counts[b, a]), int(total)))
    table = pd.DataFrame(rows, columns=["breed_a", "breed_b", "a_as_b", "b_as_a", "total"])
    return table.sort_values(["total", "breed_a", "breed_b"], ascending=[False, True, True],
                             kind="stable").head(top).reset_index(drop=True)


def evaluate(run_dir, *, data_dir=None, tta=1, output=None, batch_size=32, top_pairs=10, report=True,
             calibrate=False, verbose=1):
    """Scores a run's best model and writes the per-breed tables and the confusion figure.

    Args:
        run_dir: run folder.
        data_dir: another labelled data set (Kaggle or class-folder layout) to
            score on every image of; default: the run's own validation split.
        tta: test-time augmentation views per image, 1 (none), 2 or 10; see `predict_paths`.
        output: folder for the results; default `RUN/evaluation` (with
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
    run = load_run(run_dir)
    if data_dir is None:
        records, _, val_indices = run.split()
        paths, labels = [records.paths[i] for i in val_indices], records.labels[val_indices]
        source = f"validation split of {run.run_dir} ({len(paths)} images)"
    else:
        records = data.find_records(data_dir)
        paths, labels = records.paths, relabel(records, run.class_names)
        source = f"all {len(paths)} labelled images in {records.root}"
    if output is None:
        suffix = "" if data_dir is None else f"-{pathlib.Path(records.root).name}"
        suffix += f"-tta{views}" if views > 1 else ""
        output = run.run_dir / f"evaluation{suffix}"
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)

    probabilities = predict_paths(run.load_model(), paths, run.preprocessing, batch_size=batch_size, tta=views,
                                  verbose=verbose)
    counts = confusion_matrix(probabilities, labels, len(run.class_names))
    breeds = per_breed_accuracy(counts, run.class_names)
    pairs = most_confused_pairs(counts, run.class_names, top=top_pairs)
    breeds.to_csv(output / "per_breed.csv", index=False)
    pairs.to_csv(output / "confused_pairs.csv", index=False)
    plots.plot_confused_pairs(counts, run.class_names, pairs, output / "confusions.png",
                              title=f"{run.name}: most-confused breeds")
    result = {
        "run": str(run.run_dir), "data": source, "num_images": len(paths), "tta": views,
        "scores": metrics.scores(probabilities, labels),
        "ece": metrics.reliability(probabilities, labels)[1],
        "random_guess": {"accuracy": 1 / len(run.class_names), "log_loss": float(np.log(len(run.class_names)))},
    }
    if calibrate:
        log_probabilities = np.log(np.clip(probabilities, 1e-30, 1.0))
        temperature = metrics.fit_temperature(log_probabilities, labels)
        result["calibrated"] = {**metrics.calibrated_scores(log_probabilities, labels, temperature),
                                "fitted_on": source}
    (output / "evaluation.json").write_text(json.dumps(result, indent=2))
    if report:
        evaluation_report.write_report(
            output / "report", title=run.name, paths=paths, labels=labels, probabilities=probabilities,
            class_names=run.class_names, counts=counts, breeds=breeds, pairs=pairs, model=run.load_model(),
            preprocessing=run.preprocessing, source=source, scores=result["scores"], run_dir=run.run_dir,
            links=[(name, f"../{name}") for name in ("evaluation.json", "per_breed.csv", "confused_pairs.csv")])
    return {**result, "output": str(output)}


def main(argv=None):
    """Command-line entry point: evaluates one run and prints the scores and worst breeds."""
    parser = argparse.ArgumentParser(prog="python -m tfdogs.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="run folder written by python -m tfdogs.train")
    parser.add_argument("--data-dir",
                        help="another labelled data set to score on (default: the run's validation split)")
    parser.add_argument("--tta", type=int, nargs="?", const=2, default=1, choices=sorted(data.TTA_VIEWS),
                        metavar="N", help="test-time augmentation: average the softmax probabilities of N views "
                        "of each image: 1 none, 2 the evaluation crop and its mirror (a bare --tta), 10 the centre "
                        "and four corner crops and their mirrors")
    parser.add_argument("--output", help="results folder (default RUN/evaluation)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--top-pairs", type=int, default=10, help="how many confused breed pairs to show")
    parser.add_argument("--no-report", action="store_true", help="leave out the picture report (report/index.html)")
    parser.add_argument("--verbose", type=int, choices=(0, 1), default=1,
                        help="1: a progress bar on a terminal for a few hundred photos or more")
    parser.add_argument("--calibrate", action="store_true",
                        help="refit the temperature on these images and report the calibrated scores too")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.run_dir, data_dir=args.data_dir, tta=args.tta, output=args.output,
                          batch_size=args.batch_size, top_pairs=args.top_pairs, report=not args.no_report,
                          calibrate=args.calibrate, verbose=args.verbose)
    except (RunFolderError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    scores, output = result["scores"], pathlib.Path(result["output"])
    views = f" with {result['tta']}-view TTA" if result["tta"] > 1 else ""
    print(f"{result['data']}{views}:\n"
          f"  accuracy {scores['accuracy']:.4f}, top-5 {scores['top5_accuracy']:.4f}, "
          f"log loss {scores['log_loss']:.4f} (random guess {result['random_guess']['accuracy']:.4f})")
    if "calibrated" in result:
        calibrated = result["calibrated"]
        print(f"  refitted temperature {calibrated['temperature']:.3f} on these images: log loss "
              f"{calibrated['log_loss']:.4f}, expected calibration error {result['ece']:.4f} -> {calibrated['ece']:.4f}")
    breeds = pd.read_csv(output / "per_breed.csv", keep_default_na=False)
    print("\nHardest breeds:\n" + breeds.head(5).to_string(index=False))
    pairs = pd.read_csv(output / "confused_pairs.csv")
    if len(pairs):
        print("\nMost-confused pairs:\n" + pairs.head(5).to_string(index=False))
    print(f"\nWritten to {output}/")
    if not args.no_report:
        print(f"Report: {output / 'report' / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
