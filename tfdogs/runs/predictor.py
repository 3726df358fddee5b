"""Answers for photos from a run folder, an ensemble folder or a SavedModel, photo by photo."""

import pathlib
import re

import numpy as np
import tensorflow as tf

from tfdogs import data, progress
from tfdogs.data.inspection import converted_bytes, inspect_files
from tfdogs.runs.folder import ENSEMBLE_FILE, RunFolderError, load_ensemble, load_run, tta_views
from tfdogs.serving.saved_model import latest_version, not_a_dog_facts, read_metadata, serving_module


class PredictError(ValueError):
    """A model folder or image that cannot be used; the message names it."""


class Predictor:
    """Answers batches of encoded images with the outputs of the serving signature.

    Attributes:
        class_names: breed names in the order of the `probabilities` columns.
        description: what was loaded, for messages.
        views: test-time augmentation views averaged per image (1: none).
        dog_check: the export's `not_a_dog` facts: ``can_reject`` and the ``threshold``, or ``why`` not.
    """

    def __init__(self, function, class_names, description, views=1, dog_check=None):
        self._function = function
        self.class_names = list(class_names)
        self.description = description
        self.views = views
        self.dog_check = dog_check or {"can_reject": False, "why": OLD_EXPORT}

    def __call__(self, image_bytes):
        """Outputs for a list of encoded images: `probabilities`, `top5_breeds` (str), `top5_probabilities`,
        and `dog_score` and `not_a_dog` when the model has a "not a dog" check."""
        outputs = self._function(image_bytes=tf.constant(list(image_bytes), tf.string))
        answers = {
            "probabilities": outputs["probabilities"].numpy(),
            "top5_breeds": [[name.decode() for name in row] for row in outputs["top5_breeds"].numpy()],
            "top5_probabilities": outputs["top5_probabilities"].numpy(),
        }
        if "dog_score" in outputs:
            answers.update(dog_score=outputs["dog_score"].numpy(), not_a_dog=outputs["not_a_dog"].numpy())
        return answers

    def cannot_reject_note(self):
        """One line saying that this model cannot say "not a dog", and why; None when it can."""
        if self.dog_check.get("can_reject"):
            return None
        return f"note: {self.description} cannot say 'not a dog' ({self.dog_check['why']}): every photo gets a breed."


OLD_EXPORT = "it was exported before tfdogs kept a 'not a dog' check; export it again"


def _in_process(runs, member_weights, description, views):
    models = [run.load_model() for run in runs]
    module = serving_module(models, runs[0].class_names, [run.preprocessing for run in runs],
                            model_weights=member_weights, views=views, gates=[run.dog_gate() for run in runs])
    function = tf.function(module.from_bytes, input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
    dog_check = not_a_dog_facts(module, [run.dog_facts() for run in runs])
    if len(runs) == 1 and not dog_check["can_reject"]:
        dog_check = runs[0].dog_facts()
    return Predictor(function, runs[0].class_names, description, views, dog_check)


def load_predictor(model, tta=None):
    """Loads a run folder, an ensemble folder or a SavedModel (version or base folder).

    Args:
        model: the folder.
        tta: test-time augmentation views per image, 1, 2 or 10 (`data.eval_views`); None: 1 for a
            run or ensemble folder, the exported views for a SavedModel.

    Raises:
        PredictError: the folder is none of these, naming what is missing, or a SavedModel was
            exported with other views than `tta`.
    """
    path = pathlib.Path(model)
    if not path.is_dir():
        raise PredictError(f"Model folder {path} does not exist.")
    try:
        views = 1 if tta is None else tta_views(tta)
    except ValueError as error:
        raise PredictError(str(error)) from None
    try:
        if (path / ENSEMBLE_FILE).is_file():
            runs, member_weights = load_ensemble(path)
            return _in_process(runs, member_weights, f"ensemble {path}", views)
        if (path / "config.yaml").is_file():
            return _in_process([load_run(path)], None, f"run {path}", views)
    except RunFolderError as error:
        raise PredictError(str(error)) from None
    try:
        version_dir = latest_version(path)
        facts = read_metadata(version_dir)
    except FileNotFoundError as error:
        raise PredictError(
            f"{path} is not a run folder (config.yaml), an ensemble folder ({ENSEMBLE_FILE}) "
            f"or a tfdogs SavedModel: {error}") from None
    exported_views = facts.get("tta_views", 1)  # exports from before test-time augmentation have one view
    if tta is not None and views != exported_views:
        raise PredictError(
            f"The SavedModel {version_dir} answers with {exported_views} view(s) of each image, baked in at export "
            f"(tfdogs.json tta_views), not {views}: leave out --tta, or export it again with "
            f"python -m tfdogs.export RUN --tta {views}.")
    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    return Predictor(signature, facts["class_names"], f"SavedModel {version_dir}", exported_views,
                     facts.get("not_a_dog"))


def image_inputs(arguments):
    """The image files that command-line arguments name, and why the others cannot be read.

    A folder stands for the images in it and its sub-folders (by extension,
    sorted); a URL is not fetched.

    Returns:
        [(path, None) per image file, (argument, reason) per argument that names no image].
    """
    inputs = []
    for argument in map(str, arguments):
        path = pathlib.Path(argument)
        if _URL.match(argument):
            inputs.append((argument, "URLs are not read: download the photo first"))
        elif path.is_dir():
            images = data.images_in(path)
            inputs += [(str(image), None) for image in images] or [
                (argument, f"a folder without images ({', '.join(sorted(data.IMAGE_EXTENSIONS))})")]
        else:
            inputs.append((argument, None))
    return inputs


_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def predict_files(predictor, paths, *, batch_size=32, verbose=1):
    """Runs a predictor over image files, in batches; a file that cannot be read fails alone.

    Each file is first inspected as the data check does (`inspect_files`):
    one the check would convert (palette BMP, CMYK JPEG, TIFF, PNG or WebP
    stored sideways, over 4096 px a side, anything TensorFlow decodes
    otherwise than Pillow) is answered from the check's RGB copy, the pixels
    a run trained and evaluated on, which the SavedModel refuses to decode.

    Args:
        predictor: a `Predictor` (see `load_predictor`).
        paths: image files.
        batch_size: images per forward pass.
        verbose: 0 hides the progress bar shown on a terminal for a few hundred images or more.

    Returns:
        Dict of `probabilities` [N, C] (NaN rows for failed files), `top5_breeds`
        (N lists of names, empty for failed files), `top5_probabilities` [N, k]
        and `errors` (N reasons, None for each file answered), in the order of `paths`;
        with a "not a dog" check also `dog_score` [N] (NaN for failed files) and `not_a_dog`
        (N booleans, None for failed files).
    """
    paths = [str(path) for path in paths]
    blobs, errors = [], []
    for path, inspection in zip(paths, inspect_files(paths)):
        blob, error = _read(path, inspection.action == "converted")
        blobs.append(blob)
        errors.append(error)
    readable = [index for index, error in enumerate(errors) if error is None]
    classes, top_k = len(predictor.class_names), min(5, len(predictor.class_names))
    outputs = {"probabilities": np.full((len(paths), classes), np.nan, np.float32),
               "top5_breeds": [[] for _ in paths],
               "top5_probabilities": np.full((len(paths), top_k), np.nan, np.float32),
               "errors": errors}
    if predictor.dog_check.get("can_reject"):
        outputs.update(dog_score=np.full(len(paths), np.nan, np.float32), not_a_dog=[None] * len(paths))
    bar = progress.photos(len(paths), verbose)
    bar.add(len(paths) - len(readable))
    for start in range(0, len(readable), batch_size):
        batch = readable[start:start + batch_size]
        for indices, answers in _answer(predictor, batch, blobs, errors):
            for index, row in zip(indices, range(len(indices))):
                outputs["probabilities"][index] = answers["probabilities"][row]
                outputs["top5_breeds"][index] = answers["top5_breeds"][row]
                outputs["top5_probabilities"][index] = answers["top5_probabilities"][row]
                if "dog_score" in outputs:
                    outputs["dog_score"][index] = answers["dog_score"][row]
                    outputs["not_a_dog"][index] = bool(answers["not_a_dog"][row])
        bar.add(len(batch))
    return outputs


def _read(path, convert=False):
    """(bytes, None), or (None, why the file cannot be used).

    With `convert`, the bytes are the data check's RGB copy of the file
    (`converted_bytes`), which a run trained and evaluated on; the file's own
    bytes when Pillow cannot decode it either, so that the error is TensorFlow's.
    """
    if convert:
        copy, _, error = converted_bytes(path)
        if error is None:
            return copy, None
    try:
        blob = pathlib.Path(path).read_bytes()
    except FileNotFoundError:
        return None, "not found"
    except IsADirectoryError:
        return None, "a folder, not an image file"
    except OSError as error:
        return None, f"cannot be read ({error.strerror})"
    return (blob, None) if blob else (None, "empty file (0 bytes)")


def _answer(predictor, indices, blobs, errors):
    """Yields (indices, outputs) for a batch; when one image breaks it, each image alone, noting failures."""
    try:
        yield indices, predictor([blobs[index] for index in indices])
        return
    except tf.errors.InvalidArgumentError:
        pass
    for index in indices:
        try:
            yield [index], predictor([blobs[index]])
        except tf.errors.InvalidArgumentError:
            errors[index] = ("not an image TensorFlow can decode (JPEG, PNG, GIF, BMP or WebP), or truncated"
                             + _decode_error(blobs[index]))


def _decode_error(blob):
    """': <TensorFlow's own words>' on decoding the bytes, or ''."""
    try:
        data.decode_image(blob)
    except tf.errors.OpError as error:
        words = error.message.split("}}")[-1].strip().splitlines()
        return f": {words[0]}" if words and words[0] else ""
    return ""


def top5(paths, outputs):
    """Per image: {"image": path, "top5": [{"breed", "probability"}, ...]} most likely first, or {"image", "error"}.

    With a "not a dog" check each answer also holds `not_a_dog` (bool) and `dog_score`.
    """
    errors = outputs.get("errors") or [None] * len(paths)
    results = []
    for index, (path, breeds, probabilities, error) in enumerate(zip(paths, outputs["top5_breeds"],
                                                                      outputs["top5_probabilities"], errors)):
        if error:
            results.append({"image": str(path), "error": error})
            continue
        result = {"image": str(path)}
        if "dog_score" in outputs:
            result.update(not_a_dog=outputs["not_a_dog"][index], dog_score=float(outputs["dog_score"][index]))
        result["top5"] = [{"breed": breed, "probability": float(probability)}
                          for breed, probability in zip(breeds, probabilities)]
        results.append(result)
    return results


def format_table(results, threshold=None):
    """The answers as a plain-text table: image, then rank, breed, probability (or the error).

    An image whose `dog_score` is under `threshold` is marked "not a dog" above its nearest breeds.
    """
    width = max([len("breed")] + [len(entry["breed"]) for result in results for entry in result.get("top5", [])])
    lines = []
    for result in results:
        lines.append(result["image"])
        if "error" in result:
            lines.append(f"  error: {result['error']}")
        if result.get("not_a_dog"):
            lines.append(f"  not a dog: dog score {result['dog_score']:.3f}, under the threshold "
                         f"{threshold:.3f}; the nearest breeds:")
        for rank, entry in enumerate(result.get("top5", []), start=1):
            lines.append(f"  {rank}. {entry['breed']:<{width}}  {100 * entry['probability']:6.2f} %")
    return "\n".join(lines)


# Exit codes of `main`.
ALL_ANSWERED, SOME_FAILED, NOTHING_RUN = 0, 1, 2


def add_model_arguments(parser, images=False):
    """The flags `predict` and `submit` share: the model folder, batch size, TTA views and progress."""
    parser.add_argument("model", help="run folder, ensemble folder or SavedModel folder")
    if images:
        parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders of them")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--tta", type=int, choices=sorted(data.TTA_VIEWS), metavar="N",
                        help="test-time augmentation: the mean softmax of N views of each image: 1 none (default), "
                             "2 the evaluation crop and its mirror, 10 the centre and four corner crops and their "
                             "mirrors; a SavedModel has the views it was exported with")
    parser.add_argument("--verbose", type=int, choices=(0, 1), default=1,
                        help="1: a progress bar on a terminal for a few hundred images or more")
