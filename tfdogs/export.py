"""SavedModel export for TF Serving.

An export is a numbered version folder under a base folder
(`saved_models/<run>/1/`, `2/`, ...), the layout TF Serving watches. Each holds
two signatures with the same outputs:

- `serving_default`: `image_bytes`, a batch of encoded images (`tf.string`:
  JPEG, PNG, GIF or BMP), decoded, resized and normalised exactly as the
  validation pipeline does.
- `serving_images`: `images`, float32 RGB pixels in [0, 255], shape
  `[batch, height, width, 3]` of any size, preprocessed the same way.

Outputs: `probabilities` `[batch, classes]` (float32, rows sum to 1),
`top5_breeds` `[batch, k]` (strings) and `top5_probabilities` `[batch, k]`,
with k = min(5, classes). Several models export as one ensemble that averages
their probabilities. Loading the export needs TensorFlow alone.

Example:
    loaded = tf.saved_model.load("saved_models/resnet18-demo/1")
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([jpeg]))
"""

import json
import os
import pathlib
import shutil

import keras
import tensorflow as tf

from tfdogs import data

METADATA_FILE = "tfdogs.json"


def next_version(export_base):
    """Returns the next free numeric version under `export_base` (1 when empty)."""
    export_base = pathlib.Path(export_base)
    versions = [int(path.name) for path in export_base.glob("*") if path.name.isdigit()]
    return max(versions, default=0) + 1


class ServingModule:
    """Builds the serving functions around one or more trained classifiers."""

    def __init__(self, models, class_names, *, image_size, mean, std, crop_fraction, interpolation="bilinear",
                 model_weights=None):
        self.models = list(models)
        self.class_names = tf.constant(list(class_names))
        self.image_size = image_size
        self.mean, self.std, self.crop_fraction, self.interpolation = mean, std, crop_fraction, interpolation
        if model_weights is None:
            model_weights = [1.0] * len(self.models)
        if len(model_weights) != len(self.models):
            raise ValueError(f"{len(model_weights)} ensemble weights given for {len(self.models)} models.")
        total = float(sum(model_weights))
        self.model_weights = [float(weight) / total for weight in model_weights]
        self.top_k = min(5, len(class_names))

    def probabilities(self, normalised_images):
        """Weighted mean of the members' softmax probabilities, float32."""
        probabilities = 0.0
        for model, weight in zip(self.models, self.model_weights):
            logits = tf.cast(model(normalised_images, training=False), tf.float32)
            probabilities += weight * tf.nn.softmax(logits, axis=-1)
        return probabilities

    def _outputs(self, normalised_images):
        probabilities = self.probabilities(normalised_images)
        top_probabilities, top_indices = tf.math.top_k(probabilities, k=self.top_k)
        return {
            "probabilities": probabilities,
            "top5_breeds": tf.gather(self.class_names, top_indices),
            "top5_probabilities": top_probabilities,
        }

    def _preprocess(self, image):
        return data.preprocess_eval(image, self.image_size, self.mean, self.std, self.crop_fraction,
                                    self.interpolation)

    def from_bytes(self, image_bytes):
        images = tf.map_fn(
            lambda encoded: self._preprocess(data.decode_image(encoded)),
            image_bytes,
            fn_output_signature=tf.TensorSpec([self.image_size, self.image_size, 3], tf.float32),
        )
        return self._outputs(images)

    def from_images(self, images):
        images = tf.map_fn(
            self._preprocess,
            images,
            fn_output_signature=tf.TensorSpec([self.image_size, self.image_size, 3], tf.float32),
        )
        return self._outputs(images)


def export_saved_model(models, class_names, export_base, *, image_size, mean, std, crop_fraction=0.875,
                       interpolation="bilinear", model_weights=None, metadata=None):
    """Writes the next numeric version of a SavedModel under `export_base`.

    The version is written to a hidden temporary folder and renamed into place,
    so an interrupted export never leaves a half-written version that TF
    Serving would try to load; earlier versions stay untouched.

    Args:
        models: a Keras classifier returning logits, or a list of them (an ensemble).
        class_names: breed names in class-index order.
        export_base: folder holding the numbered versions.
        image_size: the models' square input size.
        mean, std: RGB normalisation for images scaled to [0, 1].
        crop_fraction: centre-crop fraction of the validation preprocessing.
        interpolation: resize method of the validation preprocessing.
        model_weights: optional ensemble weights (normalised to sum to 1).
        metadata: extra JSON-serialisable facts to store in `tfdogs.json`.

    Returns:
        The path of the new version folder.
    """
    if isinstance(models, keras.Model):
        models = [models]
    export_base = pathlib.Path(export_base)
    export_base.mkdir(parents=True, exist_ok=True)
    module = ServingModule(
        models, class_names, image_size=image_size, mean=mean, std=std,
        crop_fraction=crop_fraction, interpolation=interpolation, model_weights=model_weights,
    )
    archive = keras.export.ExportArchive()
    for model in models:
        archive.track(model)
    archive.add_endpoint(
        "serving_default", module.from_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
    )
    archive.add_endpoint(
        "serving_images", module.from_images,
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")],
    )
    version = next_version(export_base)
    temporary = export_base / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    archive.write_out(str(temporary), verbose=False)
    facts = {
        "class_names": list(class_names),
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "crop_fraction": crop_fraction,
        "interpolation": interpolation,
        "members": [model.name for model in models],
        "member_weights": module.model_weights,
        **(metadata or {}),
    }
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
