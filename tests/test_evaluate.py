import json
import shutil
import struct

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import assert_scores_match, reference_logits, reference_run_scores, reference_scores

from tfdogs import config as config_lib, data, evaluate
from tfdogs.data import validation
from tfdogs.evaluation import confusion
from tfdogs.runs import evaluation as run_evaluation, folder as run_folder


def assert_png(path, min_bytes=10_000, min_width=600):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    assert width >= min_width and height >= 300 and path.stat().st_size > min_bytes, (path, width, height)


# The record every run of these tests writes to preprocessing.json (checked in test_train).
RECORD_32 = {"image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_fraction": 0.875,
             "interpolation": "bilinear", "resize_rounding": "round"}


@pytest.fixture(scope="module")
def raw_run(lenet_run, tmp_path_factory):
    """lenet_run with model.keras's temperature layer taken off: the raw logits, whose log loss (about 0.13 on
    the validation photos) moves with any change of preprocessing, where the fitted temperature (0.05) leaves
    the calibrated log loss near 1e-12 on these easy breeds."""
    run_dir = tmp_path_factory.mktemp("raw_run")
    for name in ("config.yaml", "split.csv", "preprocessing.json", "metrics.json"):
        shutil.copy(lenet_run / name, run_dir / name)
    calibrated = keras.saving.load_model(lenet_run / "model.keras")
    keras.Model(calibrated.input, calibrated.get_layer("temperature").input).save(run_dir / "model.keras")
    return run_dir


def reference_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)


def val_set(run_dir):
    records, _, val_indices = run_folder.load_run(run_dir).split()
    return records, [records.paths[i] for i in val_indices], records.labels[val_indices]


def test_confusion_tables_on_a_known_example():
    names = ["a", "b", "c"]
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    predicted = np.array([0, 1, 1, 0, 1, 2, 2, 0])
    probabilities = np.eye(3)[predicted] * 0.8 + 0.2 / 3
    counts = confusion.confusion_matrix(probabilities, labels, 3)
    assert counts.tolist() == [[1, 2, 0], [1, 1, 0], [1, 0, 2]]

    breeds = confusion.per_breed_accuracy(counts, names)
    assert breeds["breed"].tolist() == ["a", "b", "c"]  # worst first: 1/3, 1/2, 2/3
    assert breeds["accuracy"].tolist() == pytest.approx([1 / 3, 1 / 2, 2 / 3])
    assert breeds["images"].tolist() == [3, 2, 3] and breeds["correct"].tolist() == [1, 1, 2]
    assert breeds["most_predicted_instead"].tolist() == ["b", "a", "a"]

    pairs = confusion.most_confused_pairs(counts, names, top=5)
    assert pairs.values.tolist() == [["a", "b", 2, 1, 3], ["a", "c", 0, 1, 1]]  # b and c never confused


def test_evaluate_on_the_runs_split_reproduces_metrics_json(lenet_run, tmp_path):
    result = run_evaluation.evaluate(lenet_run, output=tmp_path / "evaluation")
    summary = json.loads((lenet_run / "metrics.json").read_text())
    # model.keras carries the run's temperature: it scores what metrics.json reports as calibrated
    calibrated = summary["val_calibrated"]
    assert result["scores"] == pytest.approx({key: calibrated[key] for key in result["scores"]}, abs=1e-6)
    assert_scores_match(result["scores"], reference_run_scores(lenet_run)["val_calibrated"], 1e-6, "evaluate")
    assert json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())["scores"] == result["scores"]
    assert result["num_images"] == summary["num_val"] and result["tta"] == 1

    _, _, labels = val_set(lenet_run)
    breeds = pd.read_csv(tmp_path / "evaluation" / "per_breed.csv", keep_default_na=False)
    assert sorted(breeds["breed"]) == ["beagle", "boxer", "chihuahua", "golden_retriever"]
    assert dict(zip(breeds["breed"], breeds["images"])) == {
        name: int(np.sum(labels == i)) for i, name in enumerate(sorted(breeds["breed"]))}
    assert breeds["correct"].sum() / breeds["images"].sum() == pytest.approx(summary["val"]["accuracy"])
    pairs = pd.read_csv(tmp_path / "evaluation" / "confused_pairs.csv")
    wrong = int(breeds["images"].sum() - breeds["correct"].sum())
    assert pairs["total"].sum() == wrong  # every mistake is in one of the (at most 6) pairs
    assert (pairs["a_as_b"] + pairs["b_as_a"] == pairs["total"]).all()
    assert_png(tmp_path / "evaluation" / "confusions.png")


def test_flip_tta_averages_each_image_with_its_mirror(raw_run, tmp_path):
    result = run_evaluation.evaluate(raw_run, tta=2, output=tmp_path / "tta")
    assert result["tta"] == 2
    _, paths, labels = val_set(raw_run)
    model = keras.saving.load_model(raw_run / "model.keras")
    plain_logits, mirrored_logits = (reference_logits(model, paths, RECORD_32, "tensorflow", mirror=mirror)
                                     for mirror in (False, True))
    assert not np.allclose(plain_logits, mirrored_logits, atol=1e-3)  # the mirror really is another input
    average = (reference_softmax(plain_logits) + reference_softmax(mirrored_logits)) / 2
    # the averaged probabilities' log probabilities stand in for logits: softmax gives them back
    assert_scores_match(result["scores"], reference_scores(np.log(average), labels), 1e-6, "tta=2")


def test_evaluate_on_another_labelled_set_maps_breeds_by_name(raw_run, tmp_path):
    other = data.make_synthetic(tmp_path / "other", num_classes=4, images_per_class=3, image_size=64, seed=7)
    result = run_evaluation.evaluate(raw_run, data_dir=other)
    assert result["output"] == str(raw_run / "evaluation-other")
    assert result["num_images"] == 12 and "all 12 labelled images" in result["data"]
    labels_csv = pd.read_csv(other / "labels.csv")
    breeds = sorted(pd.read_csv(raw_run / "split.csv")["breed"].unique())  # the run's class order
    model = keras.saving.load_model(raw_run / "model.keras")
    expected = reference_scores(
        reference_logits(model, [other / "train" / f"{name}.jpg" for name in labels_csv["id"]], RECORD_32,
                         "tensorflow"), [breeds.index(breed) for breed in labels_csv["breed"]])
    assert_scores_match(result["scores"], expected, 1e-6, "another labelled set")


def test_a_set_with_breeds_the_model_does_not_know_is_refused_by_name(lenet_run, tmp_path):
    other = data.make_synthetic(tmp_path / "five", num_classes=5, images_per_class=2, image_size=64, seed=1)
    with pytest.raises(run_folder.RunFolderError, match="1 breed.*does not know: pug"):
        run_evaluation.evaluate(lenet_run, data_dir=other, output=tmp_path / "out")


def test_cli_prints_scores_and_names_missing_files(lenet_run, tmp_path, capsys):
    assert evaluate.main([str(lenet_run), "--output", str(tmp_path / "cli"), "--top-pairs", "3"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((lenet_run / "metrics.json").read_text())
    assert f"accuracy {summary['val']['accuracy']:.4f}" in printed and "Hardest breeds" in printed

    assert evaluate.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    (tmp_path / "not_a_run").mkdir()
    assert evaluate.main([str(tmp_path / "not_a_run")]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err


def test_evaluation_reads_the_copies_training_converted(lenet_run, raw_run, tmp_path):
    from PIL import Image


    data_dir = shutil.copytree(lenet_run / "synthetic_data", tmp_path / "data")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("split.csv", "model.keras"):
        shutil.copy(raw_run / name, run_dir / name)
    config_lib.write({**config_lib.load_yaml(lenet_run / "config.yaml"), "data_dir": str(data_dir)},
                     run_dir / "config.yaml")
    records, _, val_indices = data.read_split(run_dir / "split.csv", data_dir)
    victim = records.paths[val_indices[0]]
    Image.open(victim).convert("CMYK").save(victim, format="JPEG")  # TensorFlow misreads CMYK JPEGs
    validation.check_data(data_dir, converted_dir=run_dir / "converted")  # what training does first

    converted, _, _ = run_folder.load_run(run_dir).split()
    copy = converted.paths[val_indices[0]]
    assert copy.startswith(str(run_dir / "converted"))
    assert converted.paths[val_indices[1]] == records.paths[val_indices[1]]  # only the victim is replaced
    result = run_evaluation.evaluate(run_dir, output=tmp_path / "evaluation")
    model = keras.saving.load_model(run_dir / "model.keras")
    paths = [converted.paths[i] for i in val_indices]
    expected = reference_scores(reference_logits(model, paths, RECORD_32, "tensorflow"), records.labels[val_indices])
    assert_scores_match(result["scores"], expected, 1e-6, "with the converted copy")


def test_evaluate_refits_the_temperature_on_the_images_it_scores(lenet_run, tmp_path):
    """The run's temperature was fitted on its validation split; --calibrate refits on whatever is scored."""
    plain = run_evaluation.evaluate(lenet_run, output=tmp_path / "plain", report=False)
    refitted = run_evaluation.evaluate(lenet_run, output=tmp_path / "refit", report=False, calibrate=True)
    calibrated = refitted["calibrated"]
    assert "calibrated" not in plain and refitted["scores"] == plain["scores"]
    assert calibrated["fitted_on"] == refitted["data"]
    assert calibrated["accuracy"] == plain["scores"]["accuracy"]  # one temperature keeps every answer
    assert calibrated["log_loss"] <= plain["scores"]["log_loss"] + 1e-9
    assert calibrated["temperature"] != pytest.approx(1.0, abs=1e-3)  # a real refit: the scores it gives moved
    assert calibrated["log_loss"] < plain["scores"]["log_loss"]
