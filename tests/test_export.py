import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdogs import data
from tfdogs.data.preprocessing import Preprocessing
from tfdogs.evaluation import predictions as predictions_lib
from tfdogs.runs import folder as run_folder
from tfdogs.serving import saved_model

# Runs in a fresh interpreter with TensorFlow alone: the export must not need tfdogs.
FRESH_PROCESS_PREDICT = """
import json, sys
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
images = [open(path, "rb").read() for path in sys.argv[2:]]
outputs = loaded.signatures["serving_default"](image_bytes=tf.constant(images))
assert "tfdogs" not in sys.modules
print(json.dumps({key: value.numpy().tolist() if value.dtype != tf.string
                  else [[name.decode() for name in row] for row in value.numpy()]
                  for key, value in outputs.items()}))
"""


def val_images(run_dir, count=6):
    records, _, val_indices = run_folder.load_run(run_dir).split()
    chosen = val_indices[:count]
    return [records.paths[i] for i in chosen], records


def test_export_predicts_in_a_fresh_process_like_the_model_in_process(lenet_run):
    summary = json.loads((lenet_run / "metrics.json").read_text())
    version_dir = summary["export"]
    assert version_dir.endswith("/1")
    paths, records = val_images(lenet_run)

    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS_PREDICT, version_dir, *paths],
                            capture_output=True, text=True, check=True)
    served = json.loads(result.stdout.strip().splitlines()[-1])

    model = keras.saving.load_model(lenet_run / "model.keras")
    dataset = data.make_dataset(paths, np.zeros(len(paths), np.int64), image_size=32, batch_size=4,
                                training=False, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    expected = predictions_lib.predict_probabilities(model, dataset)
    np.testing.assert_allclose(served["probabilities"], expected, atol=1e-5)
    np.testing.assert_allclose(np.sum(served["probabilities"], axis=1), 1.0, atol=1e-5)
    order = np.argsort(-expected, axis=1)[:, :4]
    assert served["top5_breeds"] == [[records.class_names[i] for i in row] for row in order]
    np.testing.assert_allclose(served["top5_probabilities"], np.take_along_axis(expected, order, 1), atol=1e-5)


def test_float_image_signature_matches_bytes_signature(lenet_run):
    version_dir = json.loads((lenet_run / "metrics.json").read_text())["export"]
    paths, _ = val_images(lenet_run, count=1)
    loaded = tf.saved_model.load(version_dir)
    encoded = tf.io.read_file(paths[0])
    from_bytes = loaded.signatures["serving_default"](image_bytes=tf.reshape(encoded, [1]))
    pixels = tf.cast(tf.io.decode_jpeg(encoded, channels=3), tf.float32)[None]
    from_pixels = loaded.signatures["serving_images"](images=pixels)
    np.testing.assert_allclose(from_pixels["probabilities"], from_bytes["probabilities"], atol=1e-5)


def test_export_metadata_and_next_version(lenet_run, tmp_path):
    version_dir = json.loads((lenet_run / "metrics.json").read_text())["export"]
    facts = saved_model.read_metadata(version_dir)
    record = Preprocessing.from_dict(facts["preprocessing"])
    assert record == Preprocessing.load(lenet_run / "preprocessing.json") and record.image_size == 32
    assert len(facts["class_names"]) == 4 and facts["member_preprocessing"] == [facts["preprocessing"]]
    model = keras.saving.load_model(lenet_run / "model.keras")
    base = tmp_path / "export"
    first = saved_model.export_saved_model(model, facts["class_names"], base, preprocessing=record)
    second = saved_model.export_saved_model(model, facts["class_names"], base, preprocessing=record)
    assert (first.name, second.name) == ("1", "2")
    assert saved_model.latest_version(base) == second
    assert sorted(path.name for path in base.iterdir()) == ["1", "2"]  # no temporary folders left


def test_non_image_request_fails_with_a_clear_error_and_serving_goes_on(lenet_run):
    version_dir = json.loads((lenet_run / "metrics.json").read_text())["export"]
    paths, _ = val_images(lenet_run, count=1)
    serve = tf.saved_model.load(version_dir).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="(?i)image"):
        serve(image_bytes=tf.constant([b"this is not an image"]))
    good = serve(image_bytes=tf.constant([open(paths[0], "rb").read()]))
    assert good["probabilities"].shape == (1, 4)
