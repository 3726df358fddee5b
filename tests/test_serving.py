"""The exports as TF Serving, a fresh TensorFlow process and TFLite see them."""

import json
import pathlib
import re
import shutil
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdogs import data, export, predict
from tfdogs.data.preprocessing import Preprocessing
from tfdogs.runs import ensemble as run_ensemble, folder as run_folder
from tfdogs.serving import tflite

# TFLite float32 against the SavedModel, probabilities in [0, 1]: both run float32 kernels, and
# the TFLite input goes through the same resize and crop ops; what is left is summation order.
TFLITE_ATOL = 1e-5

# Runs in a fresh interpreter with TensorFlow alone, as a server would.
FRESH_PROCESS = """
import json, sys
import tensorflow as tf
images = tf.constant([open(path, "rb").read() for path in sys.argv[3:]])
answers = {}
for version_dir in sys.argv[1:3]:
    outputs = tf.saved_model.load(version_dir).signatures["serving_default"](image_bytes=images)
    answers[version_dir] = {"probabilities": outputs["probabilities"].numpy().tolist(),
                            "top5_breeds": [[b.decode() for b in row] for row in outputs["top5_breeds"].numpy()],
                            "top5_probabilities": outputs["top5_probabilities"].numpy().tolist()}
print(json.dumps({"answers": answers, "tfdogs_loaded": "tfdogs" in sys.modules}))
"""


@pytest.fixture(scope="module")
def twin_ensemble(lenet_run, tmp_path_factory):
    """An ensemble of `lenet_run` and a copy with other classifier weights (same inputs, no training)."""
    base = tmp_path_factory.mktemp("serving")
    twin = base / "twin"
    twin.mkdir()
    for name in ("config.yaml", "split.csv", "metrics.json"):
        shutil.copy(lenet_run / name, twin / name)
    model = keras.saving.load_model(lenet_run / "model.keras")
    kernel = model.get_layer("fc").kernel
    kernel.assign(0.5 * kernel.numpy() + np.random.default_rng(0).normal(0, 0.2, kernel.shape).astype("float32"))
    model.save(twin / "model.keras")
    return run_ensemble.ensemble([lenet_run, twin], base / "twins", export_dir=base / "saved_models")


def exports(lenet_run, twin_ensemble):
    return {"single": json.loads((lenet_run / "metrics.json").read_text())["export"],
            "ensemble": json.loads((twin_ensemble / "ensemble.json").read_text())["export"]}


def val_paths(run_dir, count=5):
    records, _, val_indices = run_folder.load_run(run_dir).split()
    return [records.paths[i] for i in val_indices[:count]]


def signatures(saved_model_cli_text):
    """{signature: {"inputs"/"outputs": {name: (dtype, shape)}}} from `saved_model_cli show --all`."""
    found = {}
    for block in re.split(r"\n(?=signature_def\[)", saved_model_cli_text):
        name = re.match(r"signature_def\['(\w+)'\]", block)
        if not name:
            continue
        found[name.group(1)] = {
            side: {tensor: (dtype, shape) for tensor, dtype, shape in re.findall(
                side + r"\['(\w+)'\] tensor_info:\s+dtype: (\w+)\s+shape: (\S+(?: \S+)*)", block)}
            for side in ("inputs", "outputs")}
    return found


@pytest.mark.parametrize("kind", ["single", "ensemble"])
def test_saved_model_cli_shows_the_serving_signatures(lenet_run, twin_ensemble, kind):
    saved_model_cli = pathlib.Path(sys.executable).parent / "saved_model_cli"
    result = subprocess.run([str(saved_model_cli), "show", "--dir", exports(lenet_run, twin_ensemble)[kind], "--all"],
                            capture_output=True, text=True, check=True)
    found = signatures(result.stdout)
    outputs = {"probabilities": ("DT_FLOAT", "(-1, 4)"), "top5_breeds": ("DT_STRING", "(-1, 4)"),
               "top5_probabilities": ("DT_FLOAT", "(-1, 4)")}
    assert found["serving_default"] == {"inputs": {"image_bytes": ("DT_STRING", "(-1)")}, "outputs": outputs}
    assert found["serving_images"] == {"inputs": {"images": ("DT_FLOAT", "(-1, -1, -1, 3)")}, "outputs": outputs}
    assert "Method name is: tensorflow/serving/predict" in result.stdout


def keras_probabilities(run_dir, paths):
    """Softmax of the run's `model.keras`, loaded with Keras, on its own validation preprocessing of the files."""
    settings = run_folder.load_run(run_dir).preprocessing.as_dict()
    images = np.stack([data.preprocess_eval(tf.io.decode_image(open(path, "rb").read(), channels=3,
                                                               expand_animations=False), **settings)
                       for path in paths])
    logits = keras.saving.load_model(pathlib.Path(run_dir) / "model.keras").predict(images, verbose=0)
    return tf.nn.softmax(tf.cast(logits, tf.float64)).numpy()


def test_a_fresh_process_answers_like_the_keras_models(lenet_run, twin_ensemble, capsys):
    versions = exports(lenet_run, twin_ensemble)
    images = val_paths(lenet_run)
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, versions["single"], versions["ensemble"], *images],
                            capture_output=True, text=True, check=True)
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    assert reply["tfdogs_loaded"] is False
    members = json.loads((twin_ensemble / "ensemble.json").read_text())["members"]
    assert len(members) == 2 and sum(member["weight"] for member in members) == pytest.approx(1)
    expected = {"single": keras_probabilities(lenet_run, images),
                "ensemble": sum(member["weight"] * keras_probabilities(member["run"], images) for member in members)}
    for kind, model_folder in (("single", lenet_run), ("ensemble", twin_ensemble)):
        served = reply["answers"][versions[kind]]
        # the SavedModel, alone in its process, answers what Keras computes from the run's model.keras
        np.testing.assert_allclose(served["probabilities"], expected[kind], atol=1e-5)
        top5 = np.argsort(-expected[kind], axis=1, kind="stable")[:, :5]
        class_names = run_folder.load_run(lenet_run).class_names
        assert served["top5_breeds"] == [[class_names[i] for i in row] for row in top5]
        # and python -m tfdogs.predict prints those answers
        assert predict.main([str(model_folder), *images, "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert [[entry["breed"] for entry in answer["top5"]] for answer in printed] == served["top5_breeds"]
        np.testing.assert_allclose([[entry["probability"] for entry in answer["top5"]] for answer in printed],
                                   served["top5_probabilities"], atol=1e-6)
    # the two members differ, so the ensemble is not just one of them
    assert not np.allclose(reply["answers"][versions["single"]]["probabilities"],
                           reply["answers"][versions["ensemble"]]["probabilities"], atol=1e-3)


@pytest.mark.parametrize("kind", ["single", "ensemble"])
def test_tflite_export_matches_the_saved_model(lenet_run, twin_ensemble, tmp_path, kind):
    folder = {"single": lenet_run, "ensemble": twin_ensemble}[kind]
    assert export.main([str(folder), "--format", "tflite", "--output", str(tmp_path / "tflite")]) == 0
    facts = json.loads((tmp_path / "tflite" / "tfdogs.json").read_text())
    assert (tmp_path / "tflite" / "labels.txt").read_text().split() == facts["class_names"]
    images = val_paths(lenet_run)
    record = Preprocessing.from_dict(facts["preprocessing"])
    pixels = np.stack([tflite.tflite_input(open(path, "rb").read(), record).numpy() for path in images])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's notice that it moves to ai-edge-litert
        interpreter = tf.lite.Interpreter(model_path=str(tmp_path / "tflite" / "model.tflite"))
    from_tflite = interpreter.get_signature_runner()(images=pixels)["probabilities"]

    version_dir = exports(lenet_run, twin_ensemble)[kind]
    served = tf.saved_model.load(version_dir).signatures["serving_default"](
        image_bytes=tf.constant([open(path, "rb").read() for path in images]))["probabilities"].numpy()
    assert from_tflite.shape == (len(images), 4)
    np.testing.assert_allclose(from_tflite, served, atol=TFLITE_ATOL)


def test_tflite_refuses_members_that_need_different_inputs(lenet_run):
    model = keras.saving.load_model(lenet_run / "model.keras")
    settings = run_folder.load_run(lenet_run).preprocessing
    with pytest.raises(ValueError, match=r"different input preprocessing.*32.*40"):
        tflite.export_tflite([model, model], ["a", "b", "c", "d"], "unused",
                             preprocessing=[settings, settings.replace(image_size=40)])


def test_an_export_traces_the_network_and_the_preprocessing_once_for_both_signatures(tmp_path, monkeypatch):
    from tfdogs import models
    from tfdogs.serving import saved_model

    build_module, modules = saved_model.serving_module, []
    monkeypatch.setattr(saved_model, "serving_module",
                        lambda *args, **kwargs: modules.append(build_module(*args, **kwargs)) or modules[-1])
    record = Preprocessing(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 0.875)
    version = saved_model.export_saved_model(models.build("lenet5", 3, input_shape=(32, 32, 3)), ["a", "b", "c"],
                                             tmp_path, preprocessing=record)
    # a trace before tf.saved_model.save is not the one it saves: it would be traced a second time
    assert modules[0]._forward[0].experimental_get_tracing_count() == 1
    assert modules[0]._preprocess.experimental_get_tracing_count() == 1
    loaded = tf.saved_model.load(str(version))
    assert set(loaded.signatures) == {"serving_default", "serving_images"}
