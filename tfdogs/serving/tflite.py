"""TFLite files for phones, float32 or quantised: they take pixels already resized and centre-cropped."""

import pathlib
import shutil

import keras
import numpy as np
import tensorflow as tf

from tfdogs import data, files
from tfdogs.serving.fold import fold_batch_norms, folding_counts
from tfdogs.serving.quantize import check_accuracy_drop, configure_converter, measure, quiet_notices
from tfdogs.serving.saved_model import METADATA_FILE, preprocessing_records, write_saved_model
from tfdogs.evaluation import metrics
from tfdogs.data.image import normalize

TFLITE_FILE = "model.tflite"
TFLITE_LABELS_FILE = "labels.txt"
MEASUREMENT_FILE = "tflite.json"


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


def tflite_pixels(paths, preprocessing):
    """`tflite_input` of each image file, stacked: float32 [len(paths), S, S, 3]."""
    return np.stack([tflite_input(pathlib.Path(path).read_bytes(), preprocessing).numpy() for path in paths])


class PixelClassifier:
    """What a TFLite file computes: pixels in [0, 255] (`tflite_input`) to probabilities.

    Each member's BatchNorms are folded (as in every export), its own mean
    and std normalise the pixels, and the members' softmax probabilities are
    averaged with their weights. Called directly, it is the float reference a
    quantised file is scored against, on the same pixels.
    """

    def __init__(self, models, preprocessing, model_weights=None):
        self.models = [fold_batch_norms(model) for model in models]
        self.preprocessing = preprocessing_records(preprocessing, len(self.models))
        self.member_weights = metrics.normalised_weights(model_weights, len(self.models))

    def __call__(self, images):
        members = [tf.nn.softmax(tf.cast(model(normalize(images, record.mean, record.std), training=False),
                                         tf.float32), axis=-1)
                   for model, record in zip(self.models, self.preprocessing)]
        return {"probabilities": metrics.weighted_mean(members, self.member_weights)}

    def probabilities(self, pixels, batch_size=32):
        """float32 [N, classes] for `pixels` [N, S, S, 3], `batch_size` images at a time."""
        return np.concatenate([self(tf.constant(pixels[start:start + batch_size]))["probabilities"].numpy()
                               for start in range(0, len(pixels), batch_size)])


def convert(classifier, saved_model_dir, variant="float32", representative_pixels=None):
    """The classifier as a TFLite flatbuffer of one of `quantize.VARIANTS`, through a SavedModel.

    The SavedModel is the converter's documented input for Keras 3 models, and
    it freezes the weights into constants (a concrete function keeps them as
    resource variables). It is written at `saved_model_dir` and removed after.
    """
    image_size = classifier.preprocessing[0].image_size
    endpoints = {"serving_default": (classifier, [tf.TensorSpec([None, image_size, image_size, 3], tf.float32,
                                                                name="images")])}
    write_saved_model(classifier.models, endpoints, str(saved_model_dir))
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    with quiet_notices():
        flatbuffer = configure_converter(converter, variant, representative_pixels).convert()
    shutil.rmtree(saved_model_dir)
    return flatbuffer


def export_tflite(models, class_names, output_dir, *, preprocessing, model_weights=None, metadata=None,
                  request=None):
    """Converts a model or an ensemble to a TFLite file for on-device use, float32 or quantised.

    The TFLite model takes `images`, float32 [batch, S, S, 3] RGB pixels in
    [0, 255] that are already resized (shorter side `Preprocessing.resize_size`,
    Pillow's resampling with the record's interpolation) and centre-cropped to S x S — what
    `tflite_input` computes — and returns `probabilities` [batch, classes], float32
    (normalisation, softmax and the ensemble average are inside). Decoding and
    resizing stay outside because the converter has no built-in kernels for
    string decoding or antialiased resizing; phones decode and resize with
    their own image APIs anyway. Every variant (`quantize.VARIANTS`) keeps that
    float32 input and output: in the int8 file a quantise op follows the input
    and a dequantise op precedes the output, so apps feed every variant the same pixels.

    With a `request`, the file is scored on the run's validation photos against
    the float model on the same pixels before anything is written
    (`quantize.measure`), and a variant that loses more accuracy than the
    request allows is refused, leaving an earlier export in `output_dir` as it was.

    Writes `model.tflite`, `labels.txt` (one breed per line, in output order),
    `tfdogs.json` (class names, the preprocessing records, the variant and its
    measurement) and, with a request, `tflite.json` (the measurement) to `output_dir`.

    Args:
        models: a Keras classifier returning logits, or a list of them.
        class_names: breed names in class-index order.
        output_dir: folder to write into (created if needed).
        preprocessing: one `Preprocessing`, or one per model; all must share
            everything but mean and std, since the file has one input.
        model_weights: optional ensemble weights (normalised to sum to 1).
        metadata: extra JSON-serialisable facts for `tfdogs.json`.
        request: a `quantize.VariantRequest` (variant, photos, allowed accuracy drop);
            None writes float32 unmeasured.

    Returns:
        The path of `model.tflite`.

    Raises:
        quantize.AccuracyDropError: the variant lost more accuracy than allowed and was not forced.
    """
    models = [models] if isinstance(models, keras.Model) else list(models)
    classifier = PixelClassifier(models, one_input(preprocessing_records(preprocessing, len(models))), model_weights)
    output_dir = pathlib.Path(output_dir)
    files.refuse_foreign_folder(output_dir, TFLITE_FILE)  # before the conversion's minutes
    record, variant = classifier.preprocessing[0], request.variant if request else "float32"
    representative = tflite_pixels(request.representative_paths, record) if variant == "int8" else None
    facts = export_facts(classifier, class_names, variant, metadata)
    # The file, its labels and its facts replace an earlier export together; the intermediate
    # SavedModel lives inside the temporary folder, so an interruption or a refusal leaves none of it behind.
    with files.whole_folder(output_dir, TFLITE_FILE) as folder:
        flatbuffer = convert(classifier, folder / "intermediate_saved_model", variant, representative)
        if request:
            pixels = tflite_pixels(request.validation_paths, record)
            facts["measured"] = check_accuracy_drop(
                measure(flatbuffer, request, pixels, classifier.probabilities(pixels)), request)
            files.write_json(facts["measured"], folder / MEASUREMENT_FILE)
        (folder / TFLITE_FILE).write_bytes(flatbuffer)
        (folder / TFLITE_LABELS_FILE).write_text("".join(f"{name}\n" for name in class_names))
        files.write_json(facts, folder / METADATA_FILE)
    return output_dir / TFLITE_FILE


def one_input(preprocessing):
    """The members' records, unless they differ in more than mean and std (ValueError): the file has one input."""
    inputs = {(record.image_size, record.crop_fraction, record.interpolation, record.resize_rounding)
              for record in preprocessing}
    if len(inputs) != 1:
        raise ValueError(
            "A TFLite export has one input, but the members need different input preprocessing "
            f"(image_size, crop_fraction, interpolation, resize_rounding): {sorted(inputs)}. "
            "Export them to TFLite separately.")
    return preprocessing


def export_facts(classifier, class_names, variant, metadata=None):
    """`tfdogs.json`'s facts before the measurement: breeds, preprocessing, input, output, members, variant."""
    records = classifier.preprocessing
    return {"class_names": list(class_names),
            "preprocessing": records[0].as_dict() if len(set(records)) == 1 else None,
            "member_preprocessing": [record.as_dict() for record in records],
            "input": "float32 [batch, image_size, image_size, 3] RGB pixels in [0, 255], shorter side resized "
                     "to the record's resize_size (Pillow's resampling, its interpolation), then centre-cropped "
                     "(tfdogs.serving.tflite.tflite_input)",
            "output": "float32 probabilities [batch, classes], in labels.txt order",
            "variant": variant,
            "members": [model.name for model in classifier.models], "member_weights": classifier.member_weights,
            "batch_norms_folded": folding_counts(classifier.models), **(metadata or {})}
