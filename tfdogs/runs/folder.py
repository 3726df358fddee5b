"""A finished run folder read back: its model, breeds, split, preprocessing; predictions over photo paths."""

import csv
import dataclasses
import json
import pathlib

import keras
import numpy as np
import tensorflow as tf

from tfdogs import config as config_lib, data, progress, weights
from tfdogs.data.preprocessing import FILE_NAME as PREPROCESSING_FILE, Preprocessing, PreprocessingError
from tfdogs.data.validation import file_digest, with_converted_copies
from tfdogs.evaluation import not_a_dog
from tfdogs.evaluation.predictions import predict_probabilities


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

    def dog_gate(self):
        """The run's "not a dog" check (`not_a_dog.DogGate`), or None: from random weights, or an older run."""
        return not_a_dog.load(self.run_dir)

    def dog_facts(self):
        """What the run's "not a dog" check measured (`not_a_dog.json`), or why it has none."""
        path = self.run_dir / not_a_dog.FACTS_FILE
        if path.is_file():
            return read_json(path)
        return {"can_reject": False, "why": "the run was trained before tfdogs kept a 'not a dog' check"}

    def data_dir(self):
        """The labelled photos the run was trained on, found from any working directory.

        Tried in order: config.yaml's `data_dir` (as given to train, perhaps
        relative to where it ran), then `data_source.json`'s absolute path and
        its path relative to the run folder (a project moved as a whole), then
        the generated photos inside the run folder (`--data synthetic`).
        """
        recorded = self.config.get("data_dir")
        facts = data.read_data_source(self.run_dir)
        candidates = [recorded, facts.get("absolute"),
                      facts.get("relative_to_run") and self.run_dir / facts["relative_to_run"]]
        if self.config.get("data") == "synthetic":
            candidates.append(self.run_dir / "synthetic_data")
        for candidate in candidates:
            if candidate and pathlib.Path(candidate).is_dir():
                return pathlib.Path(candidate)
        tried = ", ".join(str(candidate) for candidate in candidates if candidate)
        raise RunFolderError(
            f"{self.run_dir}: the photos it trained on are not found (tried {tried}). Move them back; "
            f"evaluate --data-dir scores another set of photos, leaving out any the run trained on.")

    def trained_digests(self):
        """The SHA-256 (hex) of every photo the run trained on: split.csv's, or hashed now for older runs."""
        rows = data.split_digests(self.run_dir / "split.csv")
        if all(digest for _, digest in rows.values()):
            return {digest for subset, digest in rows.values() if subset == "train"}
        records, train_indices, _ = data.read_split(self.run_dir / "split.csv", self.data_dir())
        return {file_digest(records.paths[index]) for index in train_indices}

    def split(self, data_dir=None):
        """The run's photos and split: (records, train_indices, val_indices), see `data.read_split`.

        Photos the training converted because TensorFlow cannot decode them
        (`RUN/converted/`, see `tfdogs.check`) are read from those copies, so
        evaluation sees what training saw. `records.paths` follow the rows of
        `split.csv`.
        """
        records, train_indices, val_indices = data.read_split(self.run_dir / "split.csv", data_dir or self.data_dir())
        if (self.run_dir / "converted").is_dir():
            records = with_converted_copies(records, self.run_dir / "converted")
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
            "resolved; write that file (fields of tfdogs.data.preprocessing.Preprocessing) or train again.")
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
        return predict_probabilities(model, dataset, shown)
    size = preprocessing.image_size
    views_as_images = dataset.map(data.traced_as_written(
        lambda images, labels: (tf.reshape(images, [-1, size, size, 3]), labels)))
    probabilities = predict_probabilities(model, views_as_images, shown)
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


ENSEMBLE_FILE = "ensemble.json"


def load_ensemble(folder):
    """The members of an ensemble folder: (runs, weights), for tools that rebuild it in process."""
    summary = read_json(pathlib.Path(folder) / ENSEMBLE_FILE)
    runs = [load_run(member["run"]) for member in summary["members"]]
    return runs, [member["weight"] for member in summary["members"]]


def load_model_folder(folder):
    """The runs of a run folder or an ensemble folder, with the ensemble's member weights (None for a run)."""
    folder = pathlib.Path(folder)
    if (folder / ENSEMBLE_FILE).is_file():
        return load_ensemble(folder)
    return [load_run(folder)], None
