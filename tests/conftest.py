"""Shared fixtures: generated data and small finished runs, made once per session."""

import os
import pathlib

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
