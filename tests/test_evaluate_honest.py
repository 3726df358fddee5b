"""Evaluation is honest by default: --data-dir leaves out the run's training photos, found by content."""

import json
import pathlib
import shutil

import pandas as pd
import pytest

from tfdogs import evaluate as evaluate_command, train as train_command
from tfdogs.runs import evaluation as run_evaluation, folder as run_folder


def test_data_dir_over_the_runs_own_photos_scores_only_the_validation_photos(lenet_run, tmp_path, capsys):
    photos = tmp_path / "copy_of_the_photos"  # another folder, the same bytes: matched by content, not by path
    shutil.copytree(lenet_run / "synthetic_data", photos)
    split = pd.read_csv(lenet_run / "split.csv")
    assert evaluate_command.main([str(lenet_run), "--data-dir", str(photos), "--output", str(tmp_path / "other"),
                                  "--no-report", "--verbose", "0"]) == 0
    error = capsys.readouterr().err
    trained = int((split["subset"] == "train").sum())
    assert f"warning: left out {trained} photos of {photos} that the run trained on" in error
    other = json.loads((tmp_path / "other" / "evaluation.json").read_text())
    assert other["excluded_training_photos"] == trained and other["num_images"] == len(split) - trained

    own = run_evaluation.evaluate(lenet_run, output=tmp_path / "own", report=False)
    assert other["scores"] == pytest.approx(own["scores"], abs=1e-9)  # the same photos: the validation split


def test_data_dir_of_only_training_photos_is_refused(lenet_run, tmp_path):
    split = pd.read_csv(lenet_run / "split.csv")
    photos = tmp_path / "trained_only"
    for relative in split.loc[split["subset"] == "train", "path"]:
        target = photos / "train" / pathlib.PurePosixPath(relative).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lenet_run / "synthetic_data" / relative, target)
    labels = pd.read_csv(lenet_run / "synthetic_data" / "labels.csv")
    labels[labels["id"].isin([path.stem for path in (photos / "train").iterdir()])].to_csv(
        photos / "labels.csv", index=False)
    with pytest.raises(run_folder.RunFolderError, match="is one the run trained on"):
        run_evaluation.evaluate(lenet_run, data_dir=photos, output=tmp_path / "out", report=False)


def test_a_run_trained_from_a_relative_data_dir_is_evaluated_from_anywhere(lenet_run, tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(lenet_run / "synthetic_data", project / "photos")
    monkeypatch.chdir(project)
    assert train_command.main(["--model", "lenet5", "--weights", "none", "--strategy", "scratch", "--data-dir",
                               "photos", "--image-size", "32", "--epochs", "1", "--verbose", "0",
                               "--output", "runs/relative"]) == 0
    assert run_folder.load_run("runs/relative").config["data_dir"] == "photos"  # as given
    monkeypatch.chdir(tmp_path)  # elsewhere: "photos" means nothing here
    assert run_folder.load_run(project / "runs" / "relative").data_dir() == project / "photos"
    moved = tmp_path / "moved"
    shutil.move(project, moved)  # the whole project moved: found relative to the run folder
    assert run_folder.load_run(moved / "runs" / "relative").data_dir().resolve() == (moved / "photos").resolve()
