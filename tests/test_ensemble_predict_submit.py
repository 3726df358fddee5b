"""From two finished runs to a Kaggle submission: compare, ensemble, predict, submit."""

import json
import pathlib
import shutil

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import small_config
from test_evaluate import assert_png

from PIL import Image

from tfdogs import compare, config as config_lib, ensemble, evaluate, predict, submit
from tfdogs.evaluation import gradcam, metrics
from tfdogs.runs import ensemble as run_ensemble, folder as run_folder, predictor as run_predictor, submission

MEMBER_WEIGHTS = [1.0, 3.0]  # normalised: 0.25 and 0.75


@pytest.fixture(scope="module")
def trained_pair(lenet_run, tmp_path_factory):
    """`compare --configs` trains a second LeNet (40 px, same split) and compares it with `lenet_run`."""
    base = tmp_path_factory.mktemp("pair")
    config_path = base / "lenet40.yaml"
    config_lib.write(small_config(image_size=40, epochs=3, learning_rate=5e-3), config_path)
    status = compare.main(["--configs", str(config_path), "--runs-dir", str(base / "runs"),
                           "--exports-dir", str(base / "saved_models"), "--output", str(base / "report"),
                           str(lenet_run)])
    assert status == 0
    return lenet_run, base / "runs" / "lenet40", base / "report"


@pytest.fixture(scope="module")
def ensemble_dir(trained_pair, tmp_path_factory):
    first, second, _ = trained_pair
    base = tmp_path_factory.mktemp("ensemble")
    return run_ensemble.ensemble([first, second], base / "pair", member_weights=MEMBER_WEIGHTS,
                             export_dir=base / "saved_models")


def test_compare_trains_the_configs_and_tabulates_both_runs(trained_pair):
    first, second, report = trained_pair
    second_config = config_lib.load_yaml(second / "config.yaml")
    assert second_config["image_size"] == 40 and (second / "model.keras").is_file()
    table = pd.read_csv(report / "table.csv").set_index("name")
    for run_dir in (first, second):
        summary = json.loads((run_dir / "metrics.json").read_text())
        row = table.loc[run_dir.name]
        assert (row["val_accuracy"], row["val_log_loss"], row["peak_val_accuracy"], row["peak_epoch"]) == (
            summary["val"]["accuracy"], summary["val"]["log_loss"], summary["peak_val_accuracy"],
            summary["best_epoch"])
    assert_png(report / "validation_curves.png")
    assert_png(report / "curves" / "lenet40.png")


def test_ensemble_scores_are_those_of_the_weighted_mean_of_its_members(trained_pair, ensemble_dir):
    first, second, _ = trained_pair
    summary = json.loads((ensemble_dir / "ensemble.json").read_text())
    assert summary["split_note"] is None and summary["num_val"] == 16
    assert [member["weight"] for member in summary["members"]] == [0.25, 0.75]
    members_probabilities = []
    for member, run_dir in zip(summary["members"], (first, second)):
        # the same split: each member (calibrated in model.keras) scores here exactly what its training reported
        reported = json.loads((run_dir / "metrics.json").read_text())["val_calibrated"]
        assert member["val"] == pytest.approx({key: reported[key] for key in member["val"]}, abs=1e-6)
        run = run_folder.load_run(run_dir)
        records, _, val_indices = run.split()
        members_probabilities.append(run_folder.predict_paths(
            run.load_model(), [records.paths[i] for i in val_indices], run.preprocessing))
    labels = records.labels[val_indices]
    expected = metrics.scores(0.25 * members_probabilities[0] + 0.75 * members_probabilities[1], labels)
    assert summary["val"] == pytest.approx(expected, abs=1e-6)
    scores = pd.read_csv(ensemble_dir / "scores.csv")
    assert scores["accuracy"].tolist() == pytest.approx(
        [summary["members"][0]["val"]["accuracy"], summary["members"][1]["val"]["accuracy"], expected["accuracy"]])
    assert "| pair | ensemble | 1.000 |" in (ensemble_dir / "scores.md").read_text()


def test_ensemble_export_answers_the_weighted_mean_of_the_member_exports(trained_pair, ensemble_dir):
    first, second, _ = trained_pair
    records, _, val_indices = run_folder.load_run(first).split()
    blobs = tf.constant([open(records.paths[i], "rb").read() for i in val_indices[:6]])

    def serve(version_dir, signature="serving_default", **inputs):
        return tf.saved_model.load(str(version_dir)).signatures[signature](**inputs)

    # the members take 32 and 40 px: each keeps its own preprocessing inside the one export
    members = [serve(json.loads((run / "metrics.json").read_text())["export"], image_bytes=blobs)["probabilities"]
               for run in (first, second)]
    version_dir = json.loads((ensemble_dir / "ensemble.json").read_text())["export"]
    served = serve(version_dir, image_bytes=blobs)
    np.testing.assert_allclose(served["probabilities"], 0.25 * members[0] + 0.75 * members[1], atol=1e-6)
    pixels = tf.cast(tf.io.decode_jpeg(blobs[0], channels=3), tf.float32)[None]
    from_pixels = serve(version_dir, "serving_images", images=pixels)
    np.testing.assert_allclose(from_pixels["probabilities"], served["probabilities"][:1], atol=1e-6)
    facts = json.loads((pathlib.Path(version_dir) / "tfdogs.json").read_text())
    assert [settings["image_size"] for settings in facts["member_preprocessing"]] == [32, 40]
    assert facts["member_weights"] == [0.25, 0.75]


def test_evaluate_scores_an_ensemble_folder_as_its_members_weighted_mean(ensemble_dir, capsys):
    """`evaluate ENSEMBLE`: the same photos and the same weighted mean as the ensemble's own scores, with a report."""
    assert evaluate.main([str(ensemble_dir), "--verbose", "0"]) == 0
    assert "accuracy" in capsys.readouterr().out
    result = json.loads((ensemble_dir / "evaluation" / "evaluation.json").read_text())
    summary = json.loads((ensemble_dir / "ensemble.json").read_text())
    assert result["num_images"] == summary["num_val"] == 16
    assert result["scores"] == pytest.approx(summary["val"], abs=1e-6)
    assert [member["weight"] for member in result["members"]] == [0.25, 0.75]
    report = ensemble_dir / "evaluation" / "report"
    page = (report / "index.html").read_text()
    assert "members&#x27; maps averaged" in page or "members' maps averaged" in page
    assert "no temperature of its own" in page and "--no-calibrate" not in page
    maps = sorted((report / "heat_maps").glob("*.jpg"))
    assert len(maps) == 2 * min(12, 16) and all(Image.open(path).size == (128, 128) for path in maps)
    per_breed = pd.read_csv(ensemble_dir / "evaluation" / "per_breed.csv")
    assert per_breed["images"].sum() == 16


def test_predict_explain_on_an_ensemble_averages_its_members_maps(trained_pair, ensemble_dir, tmp_path, capsys):
    first, second, _ = trained_pair
    photos = sorted((first / "synthetic_data" / "train").glob("*.jpg"))[:2]
    assert predict.main([str(ensemble_dir), *map(str, photos), "--json", "--explain", str(tmp_path / "why")]) == 0
    results = json.loads(capsys.readouterr().out)
    runs = [run_folder.load_run(first), run_folder.load_run(second)]
    explainers = [gradcam.Explainer(run.load_model()) for run in runs]
    predicted = [runs[0].class_names.index(result["top5"][0]["breed"]) for result in results]
    preprocessings = [run.preprocessing for run in runs]
    weighted = gradcam.explain_paths(explainers, [0.25, 0.75], photos, predicted, preprocessings)
    first_alone = gradcam.explain_paths(explainers, [1.0, 0.0], photos, predicted, preprocessings)
    for result, expected, other in zip(results, weighted, first_alone):
        written = np.asarray(Image.open(result["explanation"]), np.int16)
        assert written.shape == (224, 224, 3)
        assert np.abs(written - np.asarray(expected, np.int16)).max() == 0  # PNG: the ensemble's own map, exactly
        assert np.abs(written - np.asarray(other, np.int16)).mean() > 1  # and not the first member's alone


def test_members_with_other_breeds_are_refused_and_other_splits_are_said(lenet_run, tmp_path, capsys):
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    shutil.copy(lenet_run / "config.yaml", renamed / "config.yaml")
    split = pd.read_csv(lenet_run / "split.csv")
    split.loc[split["breed"] == "beagle", "breed"] = "basset"
    split.to_csv(renamed / "split.csv", index=False)
    with pytest.raises(run_folder.RunFolderError, match=r"same breeds.*only in .*: \['beagle'\].*\['basset'\]"):
        run_ensemble.ensemble([lenet_run, renamed], tmp_path / "refused")

    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("config.yaml", "model.keras", "metrics.json"):
        shutil.copy(lenet_run / name, moved / name)
    split = pd.read_csv(lenet_run / "split.csv")
    split.loc[split.index[split["subset"] == "val"][:2], "subset"] = "train"  # 2 of 16 now trained on
    split.to_csv(moved / "split.csv", index=False)
    assert ensemble.main([str(lenet_run), str(moved), "--output", str(tmp_path / "ens"),
                          "--export-dir", str(tmp_path / "export")]) == 0
    printed = capsys.readouterr().out
    assert "validated on different splits" in printed and "use the 14 images" in printed
    summary = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert summary["num_val"] == 14 and "different splits" in summary["split_note"]

    assert ensemble.main([str(lenet_run)]) == 2
    assert "at least two run folders" in capsys.readouterr().err
    assert ensemble.main([str(lenet_run), str(moved), "--member-weights", "1"]) == 2
    assert "1 member weights given for 2 members" in capsys.readouterr().err


def test_predict_prints_top5_as_table_or_json_for_runs_ensembles_and_saved_models(
        trained_pair, ensemble_dir, capsys):
    first, _, _ = trained_pair
    records, _, val_indices = run_folder.load_run(first).split()
    images = [records.paths[i] for i in val_indices[:3]]

    assert predict.main([str(ensemble_dir), *images, "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)
    outputs = run_predictor.predict_files(run_predictor.load_predictor(ensemble_dir), images)
    assert [answer["image"] for answer in answers] == images
    for answer, probabilities in zip(answers, outputs["probabilities"]):
        order = np.argsort(-probabilities)[:4]
        assert [entry["breed"] for entry in answer["top5"]] == [records.class_names[i] for i in order]
        assert [entry["probability"] for entry in answer["top5"]] == pytest.approx(probabilities[order], abs=1e-7)

    # the ensemble folder and its SavedModel (base folder: newest version) answer alike
    saved = run_predictor.predict_files(run_predictor.load_predictor(ensemble_dir.parent / "saved_models"), images)
    np.testing.assert_allclose(saved["probabilities"], outputs["probabilities"], atol=1e-6)

    assert predict.main([str(first), images[0]]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == images[0] and table[1].startswith("  1. ") and table[1].endswith(" %") and len(table) == 5


def test_predict_names_bad_images_and_folders(lenet_run, tmp_path, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    assert predict.main([str(lenet_run), str(text)]) == predict.SOME_FAILED
    assert "notes.jpg: not an image TensorFlow can decode" in capsys.readouterr().err
    assert predict.main([str(lenet_run), str(tmp_path / "gone.jpg")]) == predict.SOME_FAILED
    assert "gone.jpg: not found" in capsys.readouterr().err
    assert predict.main([str(tmp_path), str(text)]) == predict.NOTHING_RUN
    assert "is not a run folder (config.yaml), an ensemble folder" in capsys.readouterr().err
    assert predict.main([str(tmp_path), str(text), "--json"]) == predict.NOTHING_RUN
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["image"] == str(text) and entry["error"].startswith("model not loaded: ")


def test_one_bad_file_fails_alone_and_json_has_one_entry_per_input(lenet_run, tmp_path, capsys):
    photos = sorted((lenet_run / "synthetic_data" / "train").glob("*.jpg"))
    good1, good2 = str(photos[0]), str(photos[1])
    truncated, junk, empty = tmp_path / "truncated.jpg", tmp_path / "junk.jpg", tmp_path / "empty.jpg"
    truncated.write_bytes(photos[2].read_bytes()[:300])
    junk.write_bytes(b"GIF89a not really")
    empty.write_bytes(b"")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(photos[3], folder / "sub" / "in-folder.jpg")
    (tmp_path / "no-images").mkdir()
    url = "https://example.com/dog.jpg"
    arguments = [good1, str(truncated), good2, str(junk), str(empty), str(tmp_path / "gone.jpg"), str(folder),
                 str(tmp_path / "no-images"), url]

    assert predict.main([str(lenet_run), *arguments, "--json", "--batch-size", "4"]) == predict.SOME_FAILED
    captured = capsys.readouterr()
    answers = json.loads(captured.out)
    assert [answer["image"] for answer in answers] == [
        good1, str(truncated), good2, str(junk), str(empty), str(tmp_path / "gone.jpg"),
        str(folder / "sub" / "in-folder.jpg"), str(tmp_path / "no-images"), url]
    answered = [answer for answer in answers if "top5" in answer]
    assert [answer["image"] for answer in answered] == [good1, good2, str(folder / "sub" / "in-folder.jpg")]
    errors = {answer["image"]: answer["error"] for answer in answers if "error" in answer}
    assert "not an image TensorFlow can decode" in errors[str(truncated)]
    assert "not an image TensorFlow can decode" in errors[str(junk)]
    assert errors[str(empty)] == "empty file (0 bytes)"
    assert errors[str(tmp_path / "gone.jpg")] == "not found"
    assert errors[str(tmp_path / "no-images")].startswith("a folder without images")
    assert errors[url] == "URLs are not read: download the photo first"
    assert "6 of 9 images could not be read" in captured.err

    # the good photos get what they get on their own
    assert predict.main([str(lenet_run), good1, good2, "--json"]) == predict.ALL_ANSWERED
    alone = json.loads(capsys.readouterr().out)
    for mixed, single in zip(answered[:2], alone):
        assert [e["breed"] for e in mixed["top5"]] == [e["breed"] for e in single["top5"]]
        assert [e["probability"] for e in mixed["top5"]] == pytest.approx([e["probability"] for e in single["top5"]],
                                                                         abs=1e-6)
    assert predict.main([str(lenet_run), good1, str(junk)]) == predict.SOME_FAILED
    table = capsys.readouterr().out.splitlines()
    assert table[0] == good1 and table[1].startswith("  1. ") and table[-2] == str(junk)
    assert table[-1].startswith("  error: not an image")


@pytest.fixture
def kaggle_download(lenet_run, tmp_path):
    """The run's synthetic Kaggle download with the sample's breed columns in reverse order."""
    source = lenet_run / "synthetic_data"
    target = tmp_path / "dog-breed-identification"
    shutil.copytree(source / "test", target / "test")
    sample = pd.read_csv(source / "sample_submission.csv")
    sample[["id", *reversed(sample.columns[1:])]].to_csv(target / "sample_submission.csv", index=False)
    return target


def test_submission_follows_the_sample_and_its_rows_sum_to_one(ensemble_dir, kaggle_download, tmp_path):
    output = tmp_path / "submission.csv"
    assert submit.main([str(ensemble_dir), "--data-dir", str(kaggle_download), "--output", str(output)]) == 0
    sample = pd.read_csv(kaggle_download / "sample_submission.csv")
    written = pd.read_csv(output)
    assert list(written.columns) == list(sample.columns)
    assert written["id"].tolist() == sample["id"].tolist() and len(written) == 8
    np.testing.assert_allclose(written.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-6)

    predictor = run_predictor.load_predictor(ensemble_dir)
    outputs = run_predictor.predict_files(predictor, [kaggle_download / "test" / f"{i}.jpg" for i in sample["id"]])
    expected = pd.DataFrame(outputs["probabilities"], columns=predictor.class_names)[list(sample.columns[1:])]
    np.testing.assert_allclose(written.iloc[:, 1:].to_numpy(), expected.to_numpy(), atol=1e-6)


def test_submission_errors_name_the_file(lenet_run, kaggle_download, capsys):
    sample_path = kaggle_download / "sample_submission.csv"
    sample = pd.read_csv(sample_path)
    sample.rename(columns={"beagle": "basset"}).to_csv(sample_path, index=False)
    with pytest.raises(submission.SubmissionError, match=r"breeds of sample_submission.csv .*\['basset'\].*\['beagle'\]"):
        submission.write_submission(lenet_run, kaggle_download, kaggle_download / "out.csv")

    (kaggle_download / "test" / f"{sample['id'][0]}.jpg").unlink()
    with pytest.raises(submission.SubmissionError, match=f"1 of the 8 test images .* missing .*{sample['id'][0]}.jpg"):
        submission.read_sample_submission(kaggle_download)
    shutil.rmtree(kaggle_download / "test")
    assert submit.main([str(lenet_run), "--data-dir", str(kaggle_download)]) == 2
    assert "dog-breed-identification/test is missing" in capsys.readouterr().err
    sample_path.unlink()
    assert submit.main([str(lenet_run), "--data-dir", str(kaggle_download)]) == 2
    assert "sample_submission.csv is missing" in capsys.readouterr().err


def test_submission_names_every_unreadable_test_photo(lenet_run, kaggle_download):
    sample = pd.read_csv(kaggle_download / "sample_submission.csv")
    truncated, junk = (kaggle_download / "test" / f"{image_id}.jpg" for image_id in sample["id"][:2])
    truncated.write_bytes(truncated.read_bytes()[:200])
    junk.write_text("not a photo")
    with pytest.raises(submission.SubmissionError, match=f"2 of the 8 test images cannot be read.*{truncated.name} "
                                                     rf"\(not an image .*{junk.name} \(not an image"):
        submission.write_submission(lenet_run, kaggle_download, kaggle_download / "out.csv")
    assert not (kaggle_download / "out.csv").exists()
