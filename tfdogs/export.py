"""SavedModel export for TF Serving.

An export is a numbered version folder under a base folder
(`saved_models/<run>/1/`, `2/`, ...), the layout TF Serving watches. Each holds
two signatures with the same outputs:

- `serving_default`: `image_bytes`, a batch of encoded images (`tf.string`:
  JPEG, PNG, GIF or BMP), decoded, resized and normalised exactly as the
  validation pipeline does.
- `serving_images`: `images`, float32 RGB pixels in [0, 255], shape
  `[batch, height, width, 3]` of any size, preprocessed the same way
  (rounded to whole values first, as the 8-bit images Pillow resizes).

Outputs: `probabilities` `[batch, classes]` (float32, rows sum to 1),
`top5_breeds` `[batch, k]` (strings) and `top5_probabilities` `[batch, k]`,
with k = min(5, classes). `export_saved_model` is the one export: of a
trained run, of `python -m tfdogs.export` and of an ensemble (which averages
its members' probabilities, each member with its own input preprocessing).
BatchNorms are folded into the convolutions, and each member's
`tfdogs.preprocessing.Preprocessing` record is applied inside the graph and
written to `tfdogs.json`. Loading the export needs TensorFlow alone.

With test-time augmentation (`--tta 2` or `--tta 10`) the signatures and
outputs stay the same: each image's views (`data.eval_views`) are taken
inside the graph, and `probabilities` is the mean of the views' softmax
probabilities; `tfdogs.json` records the views (`tta_views`, `tta_view_names`).

`export_tflite` writes a float32 TFLite file instead, for phones: it takes
already resized and centre-cropped pixels (see its docstring for why).

Example:
    loaded = tf.saved_model.load("saved_models/resnet18-demo/1")
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([jpeg]))

Command line (a run folder or an ensemble folder):
    python -m tfdogs.export runs/resnet18-demo                  # saved_models/resnet18-demo/<next version>
    python -m tfdogs.export runs/resnet18-demo --tta 10         # ten views of each image, averaged
    python -m tfdogs.export runs/resnet18-demo --format tflite  # runs/resnet18-demo/tflite/model.tflite
"""

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile

import keras
import tensorflow as tf

from tfdogs import data, inference
from tfdogs.preprocessing import Preprocessing

METADATA_FILE = "tfdogs.json"


def next_version(export_base):
    """Returns the next free numeric version under `export_base` (1 when empty)."""
    export_base = pathlib.Path(export_base)
    versions = [int(path.name) for path in export_base.glob("*") if path.name.isdigit()]
    return max(versions, default=0) + 1


class ServingModule:
    """Builds the serving functions around one or more trained classifiers.

    Each member keeps its own `Preprocessing`: every image is decoded once and
    preprocessed once per distinct record among the members (a LeNet-5 at
    64 px and a ResNet at 224 px can vote on the same request), exactly as
    each member's validation pipeline does, and the members' softmax
    probabilities are averaged with `model_weights`. With `views` > 1
    (test-time augmentation), each member's probabilities are first the mean
    of its softmax over the image's views, `data.eval_views`.
    """

    def __init__(self, models, class_names, preprocessing, model_weights=None, views=1):
        if views not in data.TTA_VIEWS:
            raise ValueError(f"Test-time augmentation takes {', '.join(map(str, data.TTA_VIEWS))} views; "
                             f"got {views!r}.")
        self.views = views
        self.models = list(models)
        self.class_names = tf.constant(list(class_names))
        records = _records(preprocessing, len(self.models))
        self.pipelines = list(dict.fromkeys(records))  # distinct records, first-seen order
        self.pipeline_of_member = [self.pipelines.index(record) for record in records]
        if model_weights is None:
            model_weights = [1.0] * len(self.models)
        if len(model_weights) != len(self.models):
            raise ValueError(f"{len(model_weights)} ensemble weights given for {len(self.models)} models.")
        total = float(sum(model_weights))
        self.model_weights = [float(weight) / total for weight in model_weights]
        self.num_classes = len(class_names)
        self.top_k = min(5, len(class_names))

    def probabilities(self, images_per_pipeline):
        """Weighted mean of the members' softmax probabilities (each the mean over the views), float32.

        Args:
            images_per_pipeline: per distinct `Preprocessing`, [batch, views, size, size, 3].
        """
        probabilities = 0.0
        for model, weight, pipeline in zip(self.models, self.model_weights, self.pipeline_of_member):
            size = self.pipelines[pipeline].image_size
            images = images_per_pipeline[pipeline]
            logits = tf.cast(model(tf.reshape(images, [-1, size, size, 3]), training=False), tf.float32)
            # the class count stays static, so the signatures keep probabilities' shape (-1, classes)
            per_view = tf.reshape(tf.nn.softmax(logits, axis=-1), [-1, self.views, self.num_classes])
            probabilities += weight * tf.reduce_mean(per_view, axis=1)
        return probabilities

    def _outputs(self, images_per_pipeline):
        probabilities = self.probabilities(images_per_pipeline)
        top_probabilities, top_indices = tf.math.top_k(probabilities, k=self.top_k)
        return {
            "probabilities": probabilities,
            "top5_breeds": tf.gather(self.class_names, top_indices),
            "top5_probabilities": top_probabilities,
        }

    def _preprocess_all(self, image):
        return tuple(data.eval_views(image, self.views, **record.as_dict()) for record in self.pipelines)

    def _map(self, function, batch):
        return tf.map_fn(function, batch, fn_output_signature=tuple(
            tf.TensorSpec([self.views, record.image_size, record.image_size, 3], tf.float32)
            for record in self.pipelines))

    def from_bytes(self, image_bytes):
        return self._outputs(self._map(lambda encoded: self._preprocess_all(data.decode_image(encoded)), image_bytes))

    def from_images(self, images):
        return self._outputs(self._map(self._preprocess_all, images))


def _records(preprocessing, count):
    """One `Preprocessing` per member from one record or a list of them."""
    records = [preprocessing] * count if isinstance(preprocessing, Preprocessing) else list(preprocessing)
    if len(records) != count:
        raise ValueError(f"{len(records)} preprocessing records given for {count} models.")
    for record in records:
        if not isinstance(record, Preprocessing):
            raise TypeError(f"preprocessing must be tfdogs.preprocessing.Preprocessing records; got {record!r}.")
    return records


def serving_module(models, class_names, preprocessing, model_weights=None, views=1):
    """The `ServingModule` every export and in-process prediction serves: BatchNorms folded.

    Folding (`tfdogs.inference.fold_batch_norms`) changes float32 outputs by
    about 1e-6 and serves faster; doing it here, in one place, means the
    training export, `python -m tfdogs.export`, ensembles and `tfdogs.predict`
    answer alike.

    Args:
        models: a Keras classifier returning logits, or a list of them (an ensemble).
        class_names: breed names in class-index order.
        preprocessing: one `Preprocessing` for all models, or one per model.
        model_weights: optional ensemble weights (normalised to sum to 1).
        views: test-time augmentation views per image, 1 (none), 2 or 10 (`data.eval_views`).

    Returns:
        A `ServingModule`.
    """
    models = [models] if isinstance(models, keras.Model) else list(models)
    return ServingModule([inference.fold_batch_norms(model) for model in models], class_names, preprocessing,
                         model_weights, views)


def export_saved_model(models, class_names, export_base, *, preprocessing, model_weights=None, metadata=None,
                       views=1):
    """Writes the next numeric version of a SavedModel under `export_base`: the one export of tfdogs.

    Training, `python -m tfdogs.export` and `tfdogs.ensemble` all call this: a
    single model or an ensemble, BatchNorms folded (see `serving_module`),
    each member with its own `Preprocessing`. The version is written to a
    hidden temporary folder and renamed into place, so an interrupted export
    never leaves a half-written version that TF Serving would try to load;
    earlier versions stay untouched. `tfdogs.json` beside it records the
    breeds, the members and their preprocessing records, and the
    test-time augmentation views (`tta_views`, `tta_view_names`).

    Args:
        models: a Keras classifier returning logits, or a list of them (an ensemble).
        class_names: breed names in class-index order.
        export_base: folder holding the numbered versions.
        preprocessing: one `Preprocessing` for all models, or one per model.
        model_weights: optional ensemble weights (normalised to sum to 1).
        metadata: extra JSON-serialisable facts to store in `tfdogs.json`.
        views: test-time augmentation views per image baked into the graph, 1 (none), 2 or 10
            (`data.eval_views`); the signatures stay the same.

    Returns:
        The path of the new version folder.
    """
    models = [models] if isinstance(models, keras.Model) else list(models)
    records = _records(preprocessing, len(models))
    module = serving_module(models, class_names, records, model_weights, views)
    facts = {
        "class_names": list(class_names),
        # the record every member shares, or null when members differ (see member_preprocessing)
        "preprocessing": module.pipelines[0].as_dict() if len(module.pipelines) == 1 else None,
        "member_preprocessing": [record.as_dict() for record in records],
        "members": [model.name for model in models],
        "member_weights": module.model_weights,
        "batch_norms_folded": True,
        # probabilities = mean over these views of each view's softmax (data.eval_views)
        "tta_views": views,
        "tta_view_names": list(data.TTA_VIEWS[views]),
        **(metadata or {}),
    }
    return _write_version(_serving_archive(module), export_base, facts)


def _serving_archive(module):
    """An ExportArchive of the module's models with the two serving signatures."""
    archive = keras.export.ExportArchive()
    for model in module.models:
        archive.track(model)
    archive.add_endpoint("serving_default", module.from_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.add_endpoint("serving_images", module.from_images,
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
    return archive


def _write_version(archive, export_base, facts):
    """Writes an ExportArchive as the next numeric version, atomically, with `tfdogs.json` facts."""
    export_base = pathlib.Path(export_base)
    export_base.mkdir(parents=True, exist_ok=True)
    version = next_version(export_base)
    temporary = export_base / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    archive.write_out(str(temporary), verbose=False)
    (temporary / METADATA_FILE).write_text(json.dumps(facts, indent=2))
    final = export_base / str(version)
    os.replace(temporary, final)
    return final


def read_metadata(version_dir):
    """Returns the `tfdogs.json` facts stored beside a SavedModel version."""
    path = pathlib.Path(version_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {version_dir} is not a tfdogs SavedModel export.")
    return json.loads(path.read_text())


def latest_version(export_base):
    """Returns the highest numeric version folder under `export_base`, or the folder itself if it is a version."""
    export_base = pathlib.Path(export_base)
    if (export_base / "saved_model.pb").is_file():
        return export_base
    versions = sorted((path for path in export_base.glob("*") if path.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise FileNotFoundError(f"No numeric SavedModel version folder (1/, 2/, ...) in {export_base}.")
    return versions[-1]


# ----------------------------------------------------------------------------- TFLite, CLI


TFLITE_FILE = "model.tflite"
TFLITE_LABELS_FILE = "labels.txt"


def tflite_input(image, preprocessing):
    """The pixels a TFLite export expects for one image: resized and centre-cropped, not normalised.

    This is `data.preprocess_eval` without its last step, so that feeding these
    pixels to the TFLite model gives what the SavedModel gives for the image.

    Args:
        image: [h, w, 3] uint8 or float RGB in [0, 255], or encoded image bytes.
        preprocessing: the export's `Preprocessing` (in its `tfdogs.json`; `Preprocessing.from_dict`).

    Returns:
        float32 [image_size, image_size, 3] in [0, 255].
    """
    if isinstance(image, (bytes, str)) or (tf.is_tensor(image) and image.dtype == tf.string):
        image = data.decode_image(image)
    # mean 0 and std 1/255 turn the normalisation back into plain pixels.
    pixels = preprocessing.replace(mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)
    return data.preprocess_eval(image, **pixels.as_dict())


def export_tflite(models, class_names, output_dir, *, preprocessing, model_weights=None, metadata=None):
    """Converts a model or an ensemble to a float32 TFLite file for on-device use.

    The TFLite model takes `images`, float32 [batch, S, S, 3] RGB pixels in
    [0, 255] that are already resized (shorter side `Preprocessing.resize_size`,
    Pillow's resampling with the record's interpolation) and centre-cropped to S x S — what
    `tflite_input` computes — and returns `probabilities` [batch, classes]
    (normalisation, softmax and the ensemble average are inside). Decoding and
    resizing stay outside because the converter has no built-in kernels for
    string decoding or antialiased resizing; phones decode and resize with
    their own image APIs anyway.

    Writes `model.tflite`, `labels.txt` (one breed per line, in output order)
    and `tfdogs.json` (class names and the preprocessing records) to `output_dir`.

    Args:
        models: a Keras classifier returning logits, or a list of them.
        class_names: breed names in class-index order.
        output_dir: folder to write into (created if needed).
        preprocessing: one `Preprocessing`, or one per model; all must share
            everything but mean and std, since the file has one input.
        model_weights: optional ensemble weights (normalised to sum to 1).
        metadata: extra JSON-serialisable facts for `tfdogs.json`.

    Returns:
        The path of `model.tflite`.
    """
    models = [models] if isinstance(models, keras.Model) else list(models)
    preprocessing = _records(preprocessing, len(models))
    inputs = {(record.image_size, record.crop_fraction, record.interpolation, record.resize_rounding)
              for record in preprocessing}
    if len(inputs) != 1:
        raise ValueError(
            "A TFLite export has one input, but the members need different input preprocessing "
            f"(image_size, crop_fraction, interpolation, resize_rounding): {sorted(inputs)}. "
            "Export them to TFLite separately.")
    image_size = preprocessing[0].image_size
    models = [inference.fold_batch_norms(model) for model in models]
    if model_weights is None:
        model_weights = [1.0] * len(models)
    total = float(sum(model_weights))
    member_weights = [float(weight) / total for weight in model_weights]
    means = [tf.constant(record.mean, tf.float32) for record in preprocessing]
    stds = [tf.constant(record.std, tf.float32) for record in preprocessing]

    def classify(images):
        probabilities = 0.0
        for model, weight, mean, std in zip(models, member_weights, means, stds):
            logits = tf.cast(model((images / 255.0 - mean) / std, training=False), tf.float32)
            probabilities += weight * tf.nn.softmax(logits, axis=-1)
        return {"probabilities": probabilities}

    # Through a SavedModel: it is the converter's documented input for Keras 3 models, and it
    # freezes the weights into constants (a concrete function keeps them as resource variables).
    archive = keras.export.ExportArchive()
    for model in models:
        archive.track(model)
    archive.add_endpoint("serving_default", classify, input_signature=[
        tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")])
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir) as saved_model_dir:
        archive.write_out(saved_model_dir, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        flatbuffer = converter.convert()
    path = output_dir / TFLITE_FILE
    temporary = output_dir / f".partial-{os.getpid()}-{TFLITE_FILE}"
    temporary.write_bytes(flatbuffer)
    os.replace(temporary, path)
    (output_dir / TFLITE_LABELS_FILE).write_text("".join(f"{name}\n" for name in class_names))
    facts = {"class_names": list(class_names),
             "preprocessing": preprocessing[0].as_dict() if len(set(preprocessing)) == 1 else None,
             "member_preprocessing": [record.as_dict() for record in preprocessing],
             "input": "float32 [batch, image_size, image_size, 3] RGB pixels in [0, 255], shorter side resized "
                      "to the record's resize_size (Pillow's resampling, its interpolation), then centre-cropped "
                      "(tfdogs.export.tflite_input)",
             "output": "probabilities [batch, classes], in labels.txt order",
             "members": [model.name for model in models], "member_weights": member_weights,
             "batch_norms_folded": True, **(metadata or {})}
    (output_dir / METADATA_FILE).write_text(json.dumps(facts, indent=2))
    return path


def main(argv=None):
    """Command-line entry point: exports a run or ensemble folder as a SavedModel or a TFLite file."""
    from tfdogs import ensemble, evaluate  # noqa: PLC0415  (they import this module)

    parser = argparse.ArgumentParser(
        prog="python -m tfdogs.export",
        description="Exports a run folder or an ensemble folder as a SavedModel (TF Serving) or TFLite file.")
    parser.add_argument("model", help="run folder (python -m tfdogs.train) or ensemble folder (tfdogs.ensemble)")
    parser.add_argument("--format", choices=("saved_model", "tflite"), default="saved_model",
                        help="saved_model: the next numeric version under --output; tflite: model.tflite, "
                             "labels.txt and tfdogs.json in --output")
    parser.add_argument("--output", help="default: saved_models/<folder name> (saved_model), "
                                         "MODEL/tflite (tflite)")
    parser.add_argument("--tta", type=int, default=1, choices=sorted(data.TTA_VIEWS), metavar="N",
                        help="test-time augmentation in the SavedModel: answer the mean softmax of N views of "
                             "each image: 1 none, 2 the evaluation crop and its mirror, 10 the centre and four "
                             "corner crops and their mirrors (same signatures)")
    args = parser.parse_args(argv)
    folder = pathlib.Path(args.model)
    if args.format == "tflite" and args.tta != 1:
        print(f"error: --tta {args.tta} is for SavedModel exports only: the TFLite file takes one image already "
              "resized and centre-cropped outside the model (tflite_input), so it cannot take the other views; "
              "export without --tta, or average the app's own views.", file=sys.stderr)
        return 2
    try:
        if (folder / ensemble.ENSEMBLE_FILE).is_file():
            runs, member_weights = ensemble.load_ensemble(folder)
        else:
            runs, member_weights = [evaluate.load_run(folder)], None
        models = [run.load_model() for run in runs]
        preprocessing = [run.preprocessing for run in runs]
        metadata = {"exported_from": str(folder.resolve())}
        if args.format == "tflite":
            path = export_tflite(models, runs[0].class_names, args.output or folder / "tflite",
                                 preprocessing=preprocessing, model_weights=member_weights, metadata=metadata)
        else:
            export_base = args.output or pathlib.Path("saved_models") / folder.name
            path = export_saved_model(models, runs[0].class_names, export_base, preprocessing=preprocessing,
                                      model_weights=member_weights, metadata=metadata, views=args.tta)
    except (evaluate.RunFolderError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Exported {folder} to {path}" + (f" ({args.tta} views of each image)" if args.tta > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
