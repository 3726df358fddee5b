"""Shared fixtures: generated data and small finished runs, made once per session.

Also the independent reference of the evaluation path (Pillow + NumPy, no tfdogs code): the photo decoded
and turned upright, the shorter side resized as torchvision's and timm's eval transforms do, the centre
crop, the normalisation, then accuracy and Kaggle's log loss. Tests score a run's model through it and
compare with what tfdogs reports.
"""

import json
import math
import os
import pathlib

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfdogs import config as config_lib  # noqa: E402
from tfdogs.training import loop as training_loop


def small_config(**overrides):
    """A validated config for a seconds-long run on generated data."""
    values = {
        **config_lib.DEFAULTS,
        "model": "lenet5", "weights": "none", "strategy": "scratch", "data": "synthetic",
        "image_size": 32, "batch_size": 16, "epochs": 3, "learning_rate": 3e-3,
        "synthetic_classes": 4, "synthetic_images_per_class": 20, "rotation": 0.0,
        "zoom": 0.0, "translation": 0.0, "contrast": 0.0, "crop_scale_min": 0.6,
        "early_stopping_patience": 0, "verbose": 0,
    }
    values.update(overrides)
    return config_lib.validate(values)


@pytest.fixture(scope="session")
def lenet_run(tmp_path_factory):
    """A finished LeNet-5 run on synthetic data (run folder and export)."""

    base = tmp_path_factory.mktemp("lenet_run")
    return training_loop.train(small_config(output=str(base / "run"), export_dir=str(base / "export"), epochs=4))


@pytest.fixture(scope="session")
def dogs10_dir():
    """The shared real dog photos (10 breeds).

    On a clone without them (any user's) the tests that need them are skipped
    with the reason printed; `.ci/run` sets TFDOGS_REQUIRE_DOGS10=1, which
    makes them required, so CI fails rather than skips when they are missing.
    """
    candidates = [os.environ.get("TFDOGS_DOGS10", "")]
    candidates += [str(parent / "shared/data/dogs10") for parent in pathlib.Path(__file__).resolve().parents]
    for candidate in candidates:
        if candidate and pathlib.Path(candidate).is_dir():
            return pathlib.Path(candidate)
    message = ("The real dog photos are missing: expected shared/data/dogs10 beside the checkout "
               "or a folder named by TFDOGS_DOGS10.")
    if os.environ.get("TFDOGS_REQUIRE_DOGS10"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def torch_python():
    """A Python with torch and torchvision, for the PyTorch side of the benchmark (env TFDOGS_TORCH_PYTHON).

    torchvision cannot be imported beside the project's torch, so that Python
    has an environment of its own (`.ci/run` makes one). Without
    TFDOGS_TORCH_PYTHON the tests that need it are skipped with the reason
    printed, or fail under CI; a TFDOGS_TORCH_PYTHON that cannot import torch
    and torchvision always fails.
    """
    from tfdogs.bench.pytorch import probe_torch

    path = os.environ.get("TFDOGS_TORCH_PYTHON")
    if not path:
        message = ("The PyTorch side needs a Python with torch and torchvision: TFDOGS_TORCH_PYTHON is not set "
                   "(.ci/run makes one: .venv-torch).")
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):  # CI=true: required, never skipped
            pytest.fail(message)
        pytest.skip(message)
    versions, reason = probe_torch(path)
    if versions is None:
        pytest.fail(f"TFDOGS_TORCH_PYTHON={path} cannot import torch and torchvision: {reason}")
    return path


# Pillow's ImageOps.exif_transpose, by EXIF orientation (1 needs nothing).
EXIF_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                  7: "TRANSVERSE", 8: "ROTATE_90"}


def reference_image(path, decoder="pillow"):
    """The photo at `path` as an upright RGB PIL image.

    decoder "pillow" decodes with Pillow. "tensorflow" takes TensorFlow's own decoder (tf.io.decode_image,
    as tfdogs' pipeline does) and Pillow for the rest: on JPEGs the two decoders differ by up to 5 levels
    (TensorFlow's default DCT is INTEGER_FAST, Pillow's the accurate one), which moves a small model's log
    loss by about 1e-3; with TensorFlow's pixels the rest of the path can be held to float rounding.
    """
    from PIL import Image

    with Image.open(path) as opened:
        orientation = opened.getexif().get(0x0112, 1)
        if decoder == "pillow":
            image = opened.convert("RGB")
        else:
            import tensorflow as tf

            image = Image.fromarray(tf.io.decode_image(tf.io.read_file(str(path)), channels=3,
                                                       expand_animations=False).numpy())
    if orientation in EXIF_TRANSPOSE:
        image = image.transpose(getattr(Image.Transpose, EXIF_TRANSPOSE[orientation]))
    return image


def pil_eval_transform(path, record, decoder="pillow"):
    """torchvision/timm eval transforms on a PIL image: Resize(shorter side), CenterCrop, ToTensor, Normalize.

    timm's transforms_imagenet_eval computes scale_size = math.floor(img_size / crop_pct) and uses
    torchvision's Resize, which for an int size resizes the shorter side and truncates the longer.

    Args:
        path: an image file.
        record: a `Preprocessing` or its `as_dict()` mapping (e.g. a run's preprocessing.json).
        decoder: "pillow" or "tensorflow", see `reference_image`.

    Returns:
        float64 [image_size, image_size, 3].
    """
    from PIL import Image

    record = record if isinstance(record, dict) else record.as_dict()
    image = reference_image(path, decoder)
    width, height = image.size
    exact = record["image_size"] / record["crop_fraction"]
    size = math.floor(exact) if record["resize_rounding"] == "floor" else round(exact)
    new_width, new_height = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    filters = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
    resized = np.asarray(image.resize((new_width, new_height), filters[record["interpolation"]]), np.float64)
    crop_size = record["image_size"]
    top, left = int(round((new_height - crop_size) / 2)), int(round((new_width - crop_size) / 2))
    crop = resized[top:top + crop_size, left:left + crop_size] / 255.0
    return (crop - np.array(record["mean"])) / np.array(record["std"])


def reference_scores(logits, labels):
    """Accuracy, top-5 accuracy and Kaggle's log loss (probabilities clipped to [1e-15, 1 - 1e-15], rows
    renormalised) of `logits` [N, C], in NumPy float64."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    clipped = np.clip(probabilities, 1e-15, 1 - 1e-15)
    clipped /= clipped.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    # rank of the true class: how many classes score strictly higher
    rank = (logits > logits[rows, labels][:, None]).sum(axis=1)
    return {"accuracy": float(np.mean(logits.argmax(axis=1) == labels)),
            "top5_accuracy": float(np.mean(rank < 5)),
            "log_loss": float(-np.mean(np.log(clipped[rows, labels])))}


def reference_logits(model, paths, record, decoder="pillow", mirror=False):
    """`model`'s outputs (float64) on `paths` through the Pillow reference preprocessing, mirrored left-right
    when `mirror`."""
    images = np.stack([pil_eval_transform(path, record, decoder) for path in paths]).astype(np.float32)
    if mirror:
        images = images[:, :, ::-1, :]
    return np.asarray(model(images, training=False), np.float64)


def reference_run_scores(run_dir, decoder="tensorflow"):
    """metrics.json's `val` and `val_calibrated` scores recomputed from the run's files alone.

    model.keras (the best epoch's weights, then a `temperature` layer multiplying the logits by
    1 / temperature), the run's preprocessing.json and the validation rows of split.csv, through
    `pil_eval_transform` and `reference_scores`.

    Returns:
        {"val": scores of the raw logits, "val_calibrated": scores of model.keras's output}; "val" alone
        when the run was not calibrated.
    """
    import keras
    import pandas as pd

    run_dir = pathlib.Path(run_dir)
    record = json.loads((run_dir / "preprocessing.json").read_text())
    split = pd.read_csv(run_dir / "split.csv")
    val = split[split["subset"] == "val"]
    from tfdogs.runs import folder as run_folder  # where the photos are (config's data_dir or converted copies)

    records, _, val_indices = run_folder.load_run(run_dir).split()
    paths = [records.paths[i] for i in val_indices]
    assert [pathlib.Path(path).name for path in paths] == [pathlib.Path(path).name for path in val["path"]]
    model = keras.saving.load_model(run_dir / "model.keras")
    outputs = reference_logits(model, paths, record, decoder)
    if "temperature" not in [layer.name for layer in model.layers]:  # trained with calibrate off
        return {"val": reference_scores(outputs, val["label"])}
    scale = float(model.get_layer("temperature").scale)
    return {"val": reference_scores(outputs / scale, val["label"]),
            "val_calibrated": reference_scores(outputs, val["label"])}


def assert_scores_match(reported, reference, log_loss_atol, what="scores"):
    """`reported` (e.g. metrics.json's "val") against `reference_scores`: the accuracies exactly (to float
    rounding), the log loss to `log_loss_atol`; the message shows both."""
    for key in ("accuracy", "top5_accuracy", "log_loss"):
        tolerance = log_loss_atol if key == "log_loss" else 1e-9
        assert abs(reported[key] - reference[key]) <= tolerance, (
            f"{what}: {key} {reported[key]!r} reported, {reference[key]!r} by the Pillow/NumPy reference "
            f"(difference {reported[key] - reference[key]:.3g}, tolerance {tolerance:g})")
