"""Long steps over photos show Keras's progress bar with a count, on a terminal only, and not under --verbose 0."""

import keras
import numpy as np
import pytest
from PIL import Image

from tfdogs import check, data, predict, progress
from tfdogs.runs import evaluation as run_evaluation

PHOTOS = progress.MIN_PHOTOS


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory):
    """MIN_PHOTOS tiny photos in two breed folders."""
    root = tmp_path_factory.mktemp("many") / "photos"
    for index in range(PHOTOS):
        folder = root / ("beagle" if index % 2 else "boxer")  # two of the synthetic runs' breeds
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 12), (index % 256, 7 * index % 256, 90)).save(folder / f"{index}.jpg")
    return root


@pytest.fixture
def terminal(monkeypatch, capsys):
    """stdout captured, and reporting itself as a terminal (as `tfdogs.progress` asks it)."""
    monkeypatch.setattr(progress, "_on_terminal", lambda: True)
    return capsys


def test_a_bar_only_for_enough_photos_on_a_terminal_unless_verbose_0(terminal, monkeypatch):
    assert isinstance(progress.photos(PHOTOS, verbose=1), keras.utils.Progbar)
    assert not isinstance(progress.photos(PHOTOS - 1, verbose=1), keras.utils.Progbar)
    assert not isinstance(progress.photos(PHOTOS, verbose=0), keras.utils.Progbar)
    monkeypatch.setattr(progress, "_on_terminal", lambda: False)
    assert not isinstance(progress.photos(PHOTOS, verbose=1), keras.utils.Progbar)


def test_the_data_check_shows_its_count(many_photos, terminal, monkeypatch):
    assert check.main(["--data-dir", str(many_photos)]) == 0
    shown = terminal.readouterr().out
    assert f"{PHOTOS}/{PHOTOS}" in shown and "photo" in shown
    assert check.main(["--data-dir", str(many_photos), "--verbose", "0"]) == 0
    assert f"{PHOTOS}/{PHOTOS}" not in terminal.readouterr().out
    monkeypatch.setattr(progress, "_on_terminal", lambda: False)
    assert check.main(["--data-dir", str(many_photos)]) == 0
    assert f"/{PHOTOS}" not in terminal.readouterr().out


def test_predict_over_a_folder_shows_its_count(lenet_run, many_photos, terminal):
    assert predict.main([str(lenet_run), str(many_photos), "--json"]) == predict.ALL_ANSWERED
    shown = terminal.readouterr().out
    assert f"{PHOTOS}/{PHOTOS}" in shown
    assert predict.main([str(lenet_run), str(many_photos), "--json", "--verbose", "0"]) == predict.ALL_ANSWERED
    assert f"/{PHOTOS}" not in terminal.readouterr().out


def test_evaluate_on_many_photos_shows_its_count(lenet_run, many_photos, terminal, tmp_path):
    run_evaluation.evaluate(lenet_run, data_dir=many_photos, output=tmp_path / "shown", report=False)
    assert f"{PHOTOS}/{PHOTOS}" in terminal.readouterr().out
    run_evaluation.evaluate(lenet_run, data_dir=many_photos, output=tmp_path / "quiet", report=False, verbose=0)
    assert f"/{PHOTOS}" not in terminal.readouterr().out


def test_model_predict_advances_the_bar_per_photo(terminal):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    bar = progress.photos(PHOTOS)
    model.predict(np.zeros((PHOTOS, 3)), batch_size=64, verbose=0,
                  callbacks=[progress.PredictCallback(bar, PHOTOS, 64)])
    assert f"{PHOTOS}/{PHOTOS}" in terminal.readouterr().out


def test_the_stanford_export_shows_its_count(tmp_path, terminal):
    examples = ({"image": b"\xff\xd8 bytes", "image/filename": f"n02085620_{index}.jpg", "label": 0}
                for index in range(PHOTOS))
    assert data.export_to_class_folders(examples, ["n02085620-chihuahua"], tmp_path, total=PHOTOS) == PHOTOS
    assert f"{PHOTOS}/{PHOTOS}" in terminal.readouterr().out
