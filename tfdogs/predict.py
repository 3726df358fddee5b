"""`python -m tfdogs.predict`: the five most likely breeds of dog photos.

MODEL is any of:

- a run folder (`python -m tfdogs.train`): its best model, `model.keras`;
- an ensemble folder (`python -m tfdogs.ensemble`): its members' models;
- a SavedModel: a version folder (`saved_models/<name>/1`) or the base
  folder holding numbered versions (the newest is used).

Run and ensemble folders are rebuilt in process with the serving code of the
export, so their answers are the SavedModel's (the tests check this).

Examples:
    python -m tfdogs.predict runs/resnet18-20240101-120000 dog.jpg other_dog.png
    python -m tfdogs.predict saved_models/resnet18-20240101-120000 dog.jpg --json
"""

import argparse
import json
import pathlib
import sys

import numpy as np
import tensorflow as tf

from tfdogs import data, ensemble, evaluate, export


class PredictError(ValueError):
    """A model folder or image that cannot be used; the message names it."""


class Predictor:
    """Answers batches of encoded images with the outputs of the serving signature.

    Attributes:
        class_names: breed names in the order of the `probabilities` columns.
        description: what was loaded, for messages.
    """

    def __init__(self, function, class_names, description):
        self._function = function
        self.class_names = list(class_names)
        self.description = description

    def __call__(self, image_bytes):
        """Outputs for a list of encoded images: `probabilities`, `top5_breeds` (str), `top5_probabilities`."""
        outputs = self._function(image_bytes=tf.constant(list(image_bytes), tf.string))
        return {
            "probabilities": outputs["probabilities"].numpy(),
            "top5_breeds": [[name.decode() for name in row] for row in outputs["top5_breeds"].numpy()],
            "top5_probabilities": outputs["top5_probabilities"].numpy(),
        }


def _in_process(runs, member_weights, description):
    models = [run.load_model() for run in runs]
    module = export.serving_module(models, runs[0].class_names, [run.preprocessing for run in runs],
                                   model_weights=member_weights)
    function = tf.function(module.from_bytes, input_signature=[tf.TensorSpec([None], tf.string)])
    return Predictor(function, runs[0].class_names, description)


def load_predictor(model):
    """Loads a run folder, an ensemble folder or a SavedModel (version or base folder).

    Raises:
        PredictError: the folder is none of these, naming what is missing.
    """
    path = pathlib.Path(model)
    if not path.is_dir():
        raise PredictError(f"Model folder {path} does not exist.")
    try:
        if (path / ensemble.ENSEMBLE_FILE).is_file():
            runs, member_weights = ensemble.load_ensemble(path)
            return _in_process(runs, member_weights, f"ensemble {path}")
        if (path / "config.yaml").is_file():
            return _in_process([evaluate.load_run(path)], None, f"run {path}")
    except evaluate.RunFolderError as error:
        raise PredictError(str(error)) from None
    try:
        version_dir = export.latest_version(path)
        class_names = export.read_metadata(version_dir)["class_names"]
    except FileNotFoundError as error:
        raise PredictError(
            f"{path} is not a run folder (config.yaml), an ensemble folder ({ensemble.ENSEMBLE_FILE}) "
            f"or a tfdogs SavedModel: {error}") from None
    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    return Predictor(signature, class_names, f"SavedModel {version_dir}")


def predict_files(predictor, paths, *, batch_size=32):
    """Runs a predictor over image files, in batches.

    Returns:
        Dict of `probabilities` [N, C], `top5_breeds` (N lists of names) and
        `top5_probabilities` [N, k], in the order of `paths`.

    Raises:
        PredictError: a file is missing or is not an image, naming it.
    """
    paths = [str(path) for path in paths]
    missing = [path for path in paths if not pathlib.Path(path).is_file()]
    if missing:
        raise PredictError(f"Image file(s) not found: {', '.join(missing[:10])}")
    parts = []
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        blobs = [pathlib.Path(path).read_bytes() for path in batch]
        try:
            parts.append(predictor(blobs))
        except tf.errors.InvalidArgumentError:
            for path, blob in zip(batch, blobs):  # say which file broke the batch
                try:
                    data.decode_image(blob)
                except tf.errors.InvalidArgumentError:
                    raise PredictError(f"{path} is not an image TensorFlow can decode "
                                       "(JPEG, PNG, GIF, BMP or WebP).") from None
            raise
    return {
        "probabilities": np.concatenate([part["probabilities"] for part in parts]),
        "top5_breeds": [row for part in parts for row in part["top5_breeds"]],
        "top5_probabilities": np.concatenate([part["top5_probabilities"] for part in parts]),
    }


def top5(paths, outputs):
    """Per image: {"image": path, "top5": [{"breed", "probability"}, ...]}, most likely first."""
    return [{"image": str(path),
             "top5": [{"breed": breed, "probability": float(probability)}
                      for breed, probability in zip(breeds, probabilities)]}
            for path, breeds, probabilities in zip(paths, outputs["top5_breeds"], outputs["top5_probabilities"])]


def format_table(results):
    """The top-5 answers as a plain-text table: image, rank, breed, probability."""
    width = max([len("breed")] + [len(entry["breed"]) for result in results for entry in result["top5"]])
    lines = []
    for result in results:
        lines.append(result["image"])
        for rank, entry in enumerate(result["top5"], start=1):
            lines.append(f"  {rank}. {entry['breed']:<{width}}  {100 * entry['probability']:6.2f} %")
    return "\n".join(lines)


def main(argv=None):
    """Command-line entry point: prints the top-5 breeds of each image."""
    parser = argparse.ArgumentParser(prog="python -m tfdogs.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="run folder, ensemble folder or SavedModel folder")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    args = parser.parse_args(argv)
    try:
        predictor = load_predictor(args.model)
        results = top5(args.images, predict_files(predictor, args.images, batch_size=args.batch_size))
    except PredictError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
