"""TFLite variants (float16, dynamic range, int8): their outputs, their measured scores, the refusal of a lossy one.

The references are independent of the code under test: the SavedModel the
export already wrote, the Pillow/NumPy preprocessing of conftest
(`pil_eval_transform`), NumPy's own accuracy, log loss and calibration error,
and the interpreter run here on the written file.
"""

import json
import re
import shutil
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import pil_eval_transform, small_config
from PIL import Image

from tfdogs import export
from tfdogs.data.preprocessing import Preprocessing
from tfdogs.runs import folder as run_folder
from tfdogs.serving import tflite

# Largest difference from the float32 SavedModel, probabilities in [0, 1], on the softened LeNet-5 below:
# measured 2.2e-4 (float16 weights: 11 bits of mantissa) and 3.4e-3 (dynamic range: int8 weights, activations
# quantised per image); about three to five times that.
VARIANT_ATOL = {"float16": 1e-3, "dynamic": 1e-2}
# The Pillow reference resize differs from TensorFlow's by float rounding; that moves an int8 file's input by
# at most one quantisation step on a pixel or two, hence the log loss and calibration error to 1e-3.
SCORE_ATOL = 1e-3


def interpreter(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's notice that it moves to ai-edge-litert
        return tf.lite.Interpreter(model_path=str(path))


def file_probabilities(path, pixels):
    """The written file's probabilities, through its signature, on float32 pixels [N, S, S, 3]."""
    return interpreter(path).get_signature_runner()(images=np.asarray(pixels, np.float32))["probabilities"]


def validation_photos(run_dir):
    records, _, val_indices = run_folder.load_run(run_dir).split()
    return [records.paths[i] for i in val_indices], records.labels[val_indices]


def numpy_scores(probabilities, labels, bins=15):
    """Accuracy, Kaggle's log loss and the 15-bin expected calibration error, in NumPy alone."""
    probabilities, labels = np.asarray(probabilities, np.float64), np.asarray(labels)
    clipped = np.clip(probabilities, 1e-15, 1 - 1e-15)
    clipped /= clipped.sum(axis=1, keepdims=True)
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == labels
    bin_of = np.minimum(np.floor(confidence * bins), bins - 1)
    ece = sum(abs(correct[bin_of == b].mean() - confidence[bin_of == b].mean()) * np.mean(bin_of == b)
              for b in np.unique(bin_of))
    return {"accuracy": float(correct.mean()), "log_loss": float(-np.mean(np.log(clipped[np.arange(len(labels)),
                                                                                          labels]))),
            "ece": float(ece)}


@pytest.fixture(scope="module")
def soft_run(lenet_run, tmp_path_factory):
    """`lenet_run` with its classifier scaled down and jittered, and its own SavedModel.

    The trained LeNet-5 is right on every validation photo with probabilities near 1 (log loss about 0), which
    would hide wrong scores and quantisation alike; scaled by 0.05 with noise of 0.01 it measured accuracy
    0.56 and log loss 0.70.
    """
    base = tmp_path_factory.mktemp("soft")
    run_dir = base / "run"
    run_dir.mkdir()
    for name in ("config.yaml", "split.csv", "metrics.json", "preprocessing.json", "data_source.json"):
        shutil.copy(lenet_run / name, run_dir / name)
    model = keras.saving.load_model(lenet_run / "model.keras")
    kernel = model.get_layer("fc").kernel
    kernel.assign(0.05 * kernel.numpy() + np.random.default_rng(0).normal(0, 0.01, kernel.shape).astype("float32"))
    model.save(run_dir / "model.keras")
    assert export.main([str(run_dir), "--output", str(base / "saved_model")]) == 0
    return run_dir, base / "saved_model" / "1"


@pytest.fixture(scope="module")
def variant_exports(soft_run, tmp_path_factory):
    """Each variant of `soft_run`, exported by the command line; int8 from 5 training photos, seed 3."""
    base = tmp_path_factory.mktemp("variants")
    flags = {"float32": [], "float16": [], "dynamic": [], "int8": ["--representative-count", "5", "--seed", "3"]}
    for variant, extra in flags.items():
        # the softened model is a poor one: let every variant through, the checks below read what it measured
        assert export.main([str(soft_run[0]), "--tflite", variant, "--output", str(base / variant), "--force",
                            *extra]) == 0
    return base


@pytest.mark.parametrize("variant", ["float16", "dynamic"])
def test_float16_and_dynamic_files_answer_like_the_saved_model(soft_run, variant_exports, variant):
    folder = variant_exports / variant
    facts = json.loads((folder / "tfdogs.json").read_text())
    assert facts["variant"] == variant
    paths, _ = validation_photos(soft_run[0])
    pixels = np.stack([tflite.tflite_input(open(path, "rb").read(), Preprocessing.from_dict(facts["preprocessing"]))
                       for path in paths])
    served = tf.saved_model.load(str(soft_run[1])).signatures["serving_default"](
        image_bytes=tf.constant([open(path, "rb").read() for path in paths]))["probabilities"].numpy()
    from_file = file_probabilities(folder / "model.tflite", pixels)
    np.testing.assert_allclose(from_file, served, atol=VARIANT_ATOL[variant])
    # and it is that variant: float16 weights, or int8 weights; float32 pixels in, float32 probabilities out
    file = interpreter(folder / "model.tflite")
    stored = {detail["dtype"] for detail in file.get_tensor_details()}
    assert {"float16": np.float16, "dynamic": np.int8}[variant] in stored
    assert [detail["dtype"] for detail in file.get_input_details() + file.get_output_details()] == [np.float32] * 2
    # float16 halves the float32 file, int8 weights quarter it (plus what is not a weight)
    ratio = (folder / "model.tflite").stat().st_size / (variant_exports / "float32" / "model.tflite").stat().st_size
    assert ratio < {"float16": 0.55, "dynamic": 0.35}[variant]


@pytest.mark.parametrize("variant", ["float16", "dynamic", "int8"])
def test_reported_scores_equal_numpy_on_the_files_own_outputs(soft_run, variant_exports, variant):
    folder = variant_exports / variant
    measured = json.loads((folder / "tflite.json").read_text())
    assert json.loads((folder / "tfdogs.json").read_text())["measured"] == measured
    paths, labels = validation_photos(soft_run[0])
    # Pillow's resize and crop of TensorFlow's decoded photo; mean 0 and std 1/255 leave plain pixels
    record = {**json.loads((soft_run[0] / "preprocessing.json").read_text()), "mean": (0, 0, 0), "std": (1 / 255,) * 3}
    pixels = np.stack([pil_eval_transform(path, record, decoder="tensorflow") for path in paths]).astype(np.float32)
    expected = {"tflite": numpy_scores(file_probabilities(folder / "model.tflite", pixels), labels),
                # the float reference: the run's own Keras model (BatchNorms not folded) on the same pixels
                "float": numpy_scores(tf.nn.softmax(keras.saving.load_model(soft_run[0] / "model.keras")(
                    (pixels / 255 - record_mean(soft_run[0])) / record_std(soft_run[0]))).numpy(), labels)}
    for side in ("tflite", "float"):
        assert measured[side]["accuracy"] == pytest.approx(expected[side]["accuracy"], abs=1e-12), side
        assert measured[side]["log_loss"] == pytest.approx(expected[side]["log_loss"], abs=SCORE_ATOL), side
        assert measured[side]["ece"] == pytest.approx(expected[side]["ece"], abs=SCORE_ATOL), side
    assert measured["accuracy_change_points"] == pytest.approx(
        100 * (expected["tflite"]["accuracy"] - expected["float"]["accuracy"]), abs=1e-9)
    assert measured["validation_images"] == len(paths) and measured["threads"] == 1
    assert measured["size_bytes"] == (folder / "model.tflite").stat().st_size and measured["images_per_second"] > 0
    assert (measured["representative_count"], measured["representative_seed"]) == (
        (5, 3) if variant == "int8" else (None, None))


def record_mean(run_dir):
    return np.array(json.loads((run_dir / "preprocessing.json").read_text())["mean"], np.float32)


def record_std(run_dir):
    return np.array(json.loads((run_dir / "preprocessing.json").read_text())["std"], np.float32)


def snapshot(folder):
    """Every file under `folder` with its bytes, and the names beside it."""
    return ({path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()},
            sorted(path.name for path in folder.parent.iterdir()))


REFUSAL = re.compile(r"error: int8 accuracy (\d+\.\d) % is (\d+\.\d) points below float (\d+\.\d) % "
                     r"\(--max-accuracy-drop 1\.0\); --force writes it anyway")


def test_an_int8_file_past_the_allowed_drop_is_refused_and_forced(lenet_run, tmp_path, monkeypatch, capfd):
    """A drop made certain honestly: int8 calibrated on black photos alone.

    The int8 input's range is then [0, 0]: every real pixel saturates the
    input quantisation, every photo reaches the network as the same
    tensor, and the file answers one breed for all of them. Its accuracy is
    then at most the largest share of one breed among the validation photos,
    which the test checks is below the float model's, so the drop is more
    than 1 point whatever the training did.
    """
    output = tmp_path / "exports" / "tflite"
    assert export.main([str(lenet_run), "--format", "tflite", "--output", str(output)]) == 0
    before = snapshot(output)
    capfd.readouterr()

    black = [tmp_path / "black" / f"{index}.png" for index in range(3)]
    black[0].parent.mkdir()
    for path in black:
        Image.new("RGB", (40, 40)).save(path)
    monkeypatch.setattr(export, "choose_representative", lambda paths, count, seed: tuple(black))
    assert export.main([str(lenet_run), "--tflite", "int8", "--output", str(output)]) == 2
    captured = capfd.readouterr()  # what reaches the terminal, TFLite's C++ notices included
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    refused = REFUSAL.fullmatch(captured.err.strip())
    assert refused, captured.err
    assert snapshot(output) == before  # the float32 export as it was, and nothing left beside it

    assert export.main([str(lenet_run), "--tflite", "int8", "--output", str(output), "--force"]) == 0
    measured = json.loads((output / "tflite.json").read_text())
    assert measured["forced"] is True and measured["variant"] == "int8"
    assert json.loads((output / "tfdogs.json").read_text())["measured"]["forced"] is True
    # the refused numbers are the written file's, recomputed here
    paths, labels = validation_photos(lenet_run)
    record = Preprocessing.from_dict(json.loads((output / "tfdogs.json").read_text())["preprocessing"])
    answers = file_probabilities(output / "model.tflite", tflite.tflite_pixels(paths, record)).argmax(axis=1)
    assert len(set(answers)) == 1  # one breed for every photo, as argued above
    largest_share = np.bincount(labels).max() / len(labels)
    float_accuracy = measured["float"]["accuracy"]
    assert float_accuracy > largest_share + 0.01
    assert float(refused.group(1)) == pytest.approx(100 * np.mean(answers == labels), abs=0.05)
    assert float(refused.group(3)) == pytest.approx(100 * float_accuracy, abs=0.05)
    assert float(refused.group(2)) == pytest.approx(100 * (float_accuracy - np.mean(answers == labels)), abs=0.05)


def test_tflite_flags_that_contradict_are_refused_naming_them(lenet_run, tmp_path, capsys):
    assert export.main([str(lenet_run), "--tflite", "int8", "--format", "saved_model"]) == 2
    assert "--tflite int8" in capsys.readouterr().err
    assert export.main([str(lenet_run), "--tflite", "float16", "--tta", "2", "--output", str(tmp_path / "t")]) == 2
    assert "--tta 2" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    with pytest.raises(SystemExit):
        export.build_parser().parse_args([str(lenet_run), "--tflite", "int8", "--representative-count", "0"])


# Measured on dogs10's 41 validation photos by this test's run (Lite0 ImageNet feature extraction, 4 epochs on cached
# evaluation crops, seed 0; int8 from 100 training photos, seed 0), AMD EPYC (lscpu's model name: "AMD EPYC",
# 2 cores shared): float 85.4 %, int8 82.9 % (-2.4 points: one photo; log loss 0.407 against 0.417); int8 file
# 3,978,752 bytes against float32's 13,494,780 (0.29). One photo is 2.4 points, so the default 1-point limit
# would refuse it; the margin is two photos (4.9 points) either way.
INT8_ACCURACY_CHANGE_MARGIN_POINTS = 4.9


@pytest.mark.slow
def test_int8_lite0_on_real_photos_keeps_its_accuracy_in_a_third_of_the_size(dogs10_dir, tmp_path):
    from tfdogs.training import loop as training_loop

    run_dir = training_loop.train(small_config(
        model="efficientnet_lite0", weights="imagenet", data=None, data_dir=str(dogs10_dir), image_size=224,
        batch_size=32, learning_rate=1e-3, rotation=0.05, zoom=0.1, translation=0.1, contrast=0.1,
        crop_scale_min=0.25, strategy="feature-extract", head_init="random", epochs=4, feature_views=1,
        output=str(tmp_path / "run"), export_dir=str(tmp_path / "export")))
    for variant in ("float32", "int8"):
        assert export.main([str(run_dir), "--tflite", variant, "--output", str(tmp_path / variant),
                            "--max-accuracy-drop", str(INT8_ACCURACY_CHANGE_MARGIN_POINTS)]) == 0
    measured = json.loads((tmp_path / "int8" / "tflite.json").read_text())
    assert abs(measured["accuracy_change_points"]) <= INT8_ACCURACY_CHANGE_MARGIN_POINTS
    assert measured["float"]["accuracy"] >= 0.78  # the run learnt the breeds (test_transfer_dogs10's margin)
    assert (tmp_path / "int8" / "model.tflite").stat().st_size <= (tmp_path / "float32" / "model.tflite").stat().st_size / 3
