"""A float32 TFLite file for phones: it takes pixels already resized and centre-cropped."""

import pathlib
import shutil

import keras
import tensorflow as tf

from tfdogs import data, files
from tfdogs.serving.fold import fold_batch_norms, folding_counts
from tfdogs.serving.saved_model import METADATA_FILE, preprocessing_records, write_saved_model
from tfdogs.evaluation import metrics
from tfdogs.data.image import normalize

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
    preprocessing = preprocessing_records(preprocessing, len(models))
    inputs = {(record.image_size, record.crop_fraction, record.interpolation, record.resize_rounding)
              for record in preprocessing}
    if len(inputs) != 1:
        raise ValueError(
            "A TFLite export has one input, but the members need different input preprocessing "
            f"(image_size, crop_fraction, interpolation, resize_rounding): {sorted(inputs)}. "
            "Export them to TFLite separately.")
    image_size = preprocessing[0].image_size
    models = [fold_batch_norms(model) for model in models]
    member_weights = metrics.normalised_weights(model_weights, len(models))

    def classify(images):
        members = [tf.nn.softmax(tf.cast(model(normalize(images, record.mean, record.std), training=False),
                                         tf.float32), axis=-1) for model, record in zip(models, preprocessing)]
        return {"probabilities": metrics.weighted_mean(members, member_weights)}

    # Through a SavedModel: it is the converter's documented input for Keras 3 models, and it
    # freezes the weights into constants (a concrete function keeps them as resource variables).
    endpoints = {"serving_default": (classify, [tf.TensorSpec([None, image_size, image_size, 3], tf.float32,
                                                              name="images")])}
    output_dir = pathlib.Path(output_dir)
    files.refuse_foreign_folder(output_dir, TFLITE_FILE)  # before the conversion's minutes
    facts = {"class_names": list(class_names),
             "preprocessing": preprocessing[0].as_dict() if len(set(preprocessing)) == 1 else None,
             "member_preprocessing": [record.as_dict() for record in preprocessing],
             "input": "float32 [batch, image_size, image_size, 3] RGB pixels in [0, 255], shorter side resized "
                      "to the record's resize_size (Pillow's resampling, its interpolation), then centre-cropped "
                      "(tfdogs.serving.tflite.tflite_input)",
             "output": "probabilities [batch, classes], in labels.txt order",
             "members": [model.name for model in models], "member_weights": member_weights,
             "batch_norms_folded": folding_counts(models), **(metadata or {})}
    # The file, its labels and its facts replace an earlier export together; the intermediate
    # SavedModel lives inside the temporary folder, so an interruption leaves none of it behind.
    with files.whole_folder(output_dir, TFLITE_FILE) as folder:
        saved_model_dir = folder / "intermediate_saved_model"
        write_saved_model(models, endpoints, str(saved_model_dir))
        flatbuffer = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir)).convert()
        shutil.rmtree(saved_model_dir)
        (folder / TFLITE_FILE).write_bytes(flatbuffer)
        (folder / TFLITE_LABELS_FILE).write_text("".join(f"{name}\n" for name in class_names))
        files.write_json(facts, folder / METADATA_FILE)
    return output_dir / TFLITE_FILE
