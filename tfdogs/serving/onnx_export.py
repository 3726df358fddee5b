"""An ONNX file through Keras' own `Model.export(format="onnx")`: the TFLite file's input, for ONNX Runtime.

Keras converts with tf2onnx (the `onnx` extra: `pip install -e '.[onnx]'`);
tested with TensorFlow 2.21, Keras 3.15, tf2onnx 1.17.0 and ONNX Runtime 1.32.0.
"""

import pathlib
import warnings

import keras
import tensorflow as tf

from tfdogs import files
from tfdogs.serving.saved_model import METADATA_FILE, preprocessing_records
from tfdogs.serving.tflite import TFLITE_LABELS_FILE, PixelClassifier, export_facts, one_input

ONNX_FILE = "model.onnx"


def pixel_model(classifier):
    """A `PixelClassifier` as one Keras model: `images` (pixels in [0, 255]) to the members' weighted softmax.

    Normalisation is a `Rescaling` layer: (x / 255 - mean) / std is
    x / (255 std) - mean / std, the same to float rounding.
    """
    size = classifier.preprocessing[0].image_size
    images = keras.Input((size, size, 3), name="images")
    members = []
    for model, record, weight in zip(classifier.models, classifier.preprocessing, classifier.member_weights):
        normalized = keras.layers.Rescaling(scale=[1 / (255 * std) for std in record.std],
                                            offset=[-mean / std for mean, std in zip(record.mean, record.std)])(images)
        members.append(keras.layers.Rescaling(weight)(keras.layers.Softmax()(model(normalized))))
    probabilities = members[0] if len(members) == 1 else keras.layers.Add()(members)
    return keras.Model(images, probabilities, name="tfdogs_pixels")


def export_onnx(models, class_names, output_dir, *, preprocessing, model_weights=None, metadata=None):
    """Writes `model.onnx`, `labels.txt` and `tfdogs.json` to `output_dir`, whole or not at all.

    The ONNX model takes `images`, float32 [batch, S, S, 3] RGB pixels in [0, 255],
    resized and centre-cropped as for the TFLite file (`tflite.tflite_input`), and
    returns the probabilities [batch, classes] (normalisation, softmax and the
    ensemble average inside; BatchNorms folded, as in every export).

    Args:
        models: a Keras classifier returning logits, or a list of them.
        class_names: breed names in class-index order.
        output_dir: folder to write into (created if needed).
        preprocessing: one `Preprocessing`, or one per model, sharing everything but mean and std.
        model_weights: optional ensemble weights (normalised to sum to 1).
        metadata: extra JSON-serialisable facts for `tfdogs.json`.

    Returns:
        The path of `model.onnx`.

    Raises:
        ValueError: tf2onnx is not installed (names the extra to install).
    """
    try:
        import tf2onnx  # noqa: F401  Keras' ONNX export converts with it
    except ImportError:
        raise ValueError("--format onnx needs tf2onnx: pip install -e '.[onnx]'.") from None
    models = [models] if isinstance(models, keras.Model) else list(models)
    classifier = PixelClassifier(models, one_input(preprocessing_records(preprocessing, len(models))), model_weights)
    output_dir = pathlib.Path(output_dir)
    files.refuse_foreign_folder(output_dir, ONNX_FILE)
    facts = {**export_facts(classifier, class_names, "float32", metadata), "format": "onnx"}
    size = classifier.preprocessing[0].image_size
    with files.whole_folder(output_dir, ONNX_FILE) as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # tf2onnx's use of np.object under NumPy 2
        pixel_model(classifier).export(str(folder / ONNX_FILE), format="onnx", verbose=False, input_signature=[
            tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
        (folder / TFLITE_LABELS_FILE).write_text("".join(f"{name}\n" for name in class_names))
        files.write_json(facts, folder / METADATA_FILE)
    return output_dir / ONNX_FILE
