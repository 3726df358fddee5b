"""K-fold cross-validation (`--folds K`, `tfdogs.runs.folds`), checked against NumPy from the run's files alone.

Three folds of LeNet-5 on generated photos with byte-identical copies added: oof.csv holds every photo once
with the probabilities of the fold model that did not train on it (model.keras through Keras, its
temperature undone, softmax in NumPy), the folds are a stratified partition that keeps copies together,
folds.json's means and temperature are NumPy's, and a run stopped inside fold 2 and started again skips
fold 1 and ends with the uninterrupted run's oof.csv.
"""

import json
import pathlib
import shutil
import time

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import small_config

from tfdogs import data
from tfdogs.data.preprocessing import Preprocessing
from tfdogs.evaluation import metrics
from tfdogs.runs import folds

K = 3
COPIES = 3  # photos given a byte-identical copy, which must share their fold


def photos_with_copies(folder):
    """Generated photos (Kaggle layout) plus COPIES byte-identical copies under new ids, same breed."""
    data.make_synthetic(folder, num_classes=4, images_per_class=15, image_size=64, seed=0)
    labels = pd.read_csv(folder / "labels.csv")
    copies = []
    for row in labels.iloc[:COPIES].itertuples():
        copy_id = f"copy-of-{row.id}"
        shutil.copyfile(folder / "train" / f"{row.id}.jpg", folder / "train" / f"{copy_id}.jpg")
        copies.append({"id": copy_id, "breed": row.breed})
    pd.concat([labels, pd.DataFrame(copies)]).to_csv(folder / "labels.csv", index=False)
    return folder


def fold_config(base, output):
    return small_config(data=None, data_dir=str(base / "photos"), folds=K, epochs=2,
                        output=str(output), export_dir=str(output.parent / f"{output.name}-export"))


CALL_SECONDS = {}  # the uninterrupted run_folds call's wall time


@pytest.fixture(scope="module")
def kfold_run(tmp_path_factory):
    """An uninterrupted 3-fold run: (output folder, the photos' folder)."""
    base = tmp_path_factory.mktemp("kfold")
    photos_with_copies(base / "photos")
    started = time.perf_counter()
    output = folds.run_folds(fold_config(base, base / "run"))
    CALL_SECONDS["uninterrupted"] = time.perf_counter() - started
    return output, base


def numpy_softmax(logits):
    shifted = np.asarray(logits, np.float64) - np.max(logits, axis=1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)


def fold_logits(run_dir, paths):
    """model.keras's logits on `paths` (evaluation crops), its temperature layer undone (x / scale)."""
    model = keras.saving.load_model(run_dir / "model.keras")
    record = Preprocessing.load(run_dir / "preprocessing.json")
    dataset = data.make_dataset(list(paths), np.zeros(len(paths), np.int64), training=False, batch_size=8,
                                **record.as_dict())
    outputs = np.concatenate([np.asarray(model(images, training=False), np.float64) for images, _ in dataset])
    names = [layer.name for layer in model.layers]
    return outputs / float(model.get_layer("temperature").scale) if "temperature" in names else outputs


def test_oof_holds_every_photo_once_with_its_fold_models_probabilities(kfold_run):
    output, base = kfold_run
    oof = pd.read_csv(output / "oof.csv")
    labels = pd.read_csv(base / "photos" / "labels.csv")
    assert sorted(oof["path"]) == sorted(f"train/{name}.jpg" for name in labels["id"])
    assert not oof["path"].duplicated().any()
    breeds = list(oof.columns[4:])
    assert (oof["breed"] == [breeds[label] for label in oof["label"]]).all()
    for fold in range(1, K + 1):
        rows = oof[oof["fold"] == fold]
        probabilities = numpy_softmax(fold_logits(output / f"fold-{fold}",
                                                  [str(base / "photos" / path) for path in rows["path"]]))
        np.testing.assert_allclose(rows[breeds].to_numpy(), probabilities, atol=1e-5, err_msg=f"fold {fold}")


def test_each_folds_seconds_are_its_own(kfold_run):
    """The process's start-up is counted once: fold 2 and 3 say 0, and the folds' totals fit in the call's time."""
    output, _ = kfold_run
    seconds = [json.loads((output / f"fold-{fold}" / "metrics.json").read_text())["seconds"] for fold in (1, 2, 3)]
    assert [part["start_up"] for part in seconds[1:]] == [0.0, 0.0]
    assert sum(part["total"] - part["start_up"] for part in seconds) <= CALL_SECONDS["uninterrupted"]


def test_folds_are_a_stratified_partition_keeping_copies_together(kfold_run):
    output, _ = kfold_run
    oof = pd.read_csv(output / "oof.csv").set_index("path")
    for fold in range(1, K + 1):
        split = pd.read_csv(output / f"fold-{fold}" / "split.csv").set_index("path")
        assert set(split.index) == set(oof.index)
        assert set(split.index[split["subset"] == "val"]) == set(oof.index[oof["fold"] == fold])
    counts = pd.crosstab(oof["label"], oof["fold"]).to_numpy()
    assert counts.shape == (4, K)
    assert (counts.max(axis=1) - counts.min(axis=1) <= 1).all(), counts
    for path in oof.index[oof.index.str.startswith("train/copy-of-")]:
        original = path.replace("copy-of-", "")
        assert oof.loc[path, "fold"] == oof.loc[original, "fold"], path


def test_stratified_folds_balance_classes_and_never_split_a_group():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, size=300)
    fold_of = data.stratified_folds(labels, 5, seed=3)
    for label in range(7):
        counts = np.bincount(fold_of[labels == label], minlength=5)
        assert counts.max() - counts.min() <= 1, (label, counts)
    groups = np.arange(300)
    groups[1::10] = groups[0::10]  # every tenth photo has a copy right after it
    grouped = data.stratified_folds(labels, 5, seed=3, groups=groups)
    assert (grouped[1::10] == grouped[0::10]).all()
    assert np.array_equal(data.stratified_folds(labels, 5, seed=3), fold_of)


def numpy_temperature(logits, labels):
    """The temperature minimising the log loss, by a grid search in NumPy to 1e-3 in log T, refined once."""
    def loss(temperature):
        return -np.mean(np.log(np.clip(numpy_softmax(logits / temperature)[np.arange(len(labels)), labels],
                                       1e-15, None)))

    grid = np.exp(np.arange(np.log(0.05), np.log(20.0), 1e-2))
    best = grid[np.argmin([loss(t) for t in grid])]
    fine = best * np.exp(np.arange(-1e-2, 1e-2, 1e-4))
    return fine[np.argmin([loss(t) for t in fine])]


def test_folds_json_is_numpy_on_the_out_of_fold_predictions(kfold_run):
    output, _ = kfold_run
    summary = json.loads((output / "folds.json").read_text())
    oof = pd.read_csv(output / "oof.csv")
    probabilities, labels = oof[oof.columns[4:]].to_numpy(np.float64), oof["label"].to_numpy()
    per_fold = summary["per_fold"]
    assert [fold["fold"] for fold in per_fold] == list(range(1, K + 1))
    for fold in per_fold:
        rows = (oof["fold"] == fold["fold"]).to_numpy()
        assert fold["num_val"] == rows.sum()
        assert fold["accuracy"] == pytest.approx(np.mean(probabilities[rows].argmax(1) == labels[rows]), abs=1e-12)
        expected = -np.mean(np.log(probabilities[rows][np.arange(rows.sum()), labels[rows]]))
        assert fold["log_loss"] == pytest.approx(expected, abs=1e-9)
    for key in ("accuracy", "log_loss", "ece"):
        values = np.array([fold[key] for fold in per_fold])
        assert summary["cross_validated"][key] == pytest.approx(
            {"mean": values.mean(), "std": values.std(), "min": values.min(), "max": values.max()}, abs=1e-12)
    # log p differs from the logits by a constant per row: the same softmax at every temperature
    logits = np.log(probabilities)
    temperature = summary["oof_temperature"]["temperature"]
    assert temperature == pytest.approx(numpy_temperature(logits, labels), rel=1e-2)
    assert temperature == pytest.approx(metrics.fit_temperature(logits, labels), rel=1e-5)
    calibrated = numpy_softmax(logits / temperature)
    assert summary["oof_temperature"]["calibrated"]["log_loss"] == pytest.approx(
        -np.mean(np.log(calibrated[np.arange(len(labels)), labels])), abs=1e-9)
    assert "no model trained on" in summary["oof_temperature"]["fitted_on"]
    export = json.loads((pathlib.Path(summary["export"]) / "tfdogs.json").read_text())
    assert len(export["members"]) == K and export["temperature"]["value"] == temperature


class StopInsideFold(keras.callbacks.Callback):
    """Stops the K-fold run at the end of fold 2's first epoch, as Ctrl-C would."""

    def __init__(self, run_dir):
        super().__init__()
        self.run_dir = run_dir

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0 and self.run_dir.endswith("fold-2"):
            raise KeyboardInterrupt


def test_resume_skips_finished_folds_and_ends_as_the_uninterrupted_run(kfold_run, tmp_path, monkeypatch):
    uninterrupted, base = kfold_run
    output = tmp_path / "run"
    config = fold_config(base, output)
    train = folds.train
    monkeypatch.setattr(folds, "train", lambda run_config: train(run_config, [StopInsideFold(run_config["output"])]))
    with pytest.raises(KeyboardInterrupt):
        folds.run_folds(config)
    assert (output / "fold-1" / "metrics.json").is_file() and not (output / "fold-2" / "metrics.json").is_file()
    finished = {path: path.stat().st_mtime_ns for path in (output / "fold-1").rglob("*") if path.is_file()}
    monkeypatch.setattr(folds, "train", train)
    folds.run_folds(config)
    assert {path: path.stat().st_mtime_ns for path in (output / "fold-1").rglob("*") if path.is_file()} == finished
    history = pd.read_csv(output / "fold-2" / "history.csv")
    assert list(history["epoch"]) == [0, 1]  # fold 2 went on from its first epoch
    resumed, expected = pd.read_csv(output / "oof.csv"), pd.read_csv(uninterrupted / "oof.csv")
    assert resumed[["path", "fold", "label", "breed"]].equals(expected[["path", "fold", "label", "breed"]])
    np.testing.assert_allclose(resumed[expected.columns[4:]], expected[expected.columns[4:]], atol=1e-6)
