"""Resume tells the truth about data: photos added, removed or changed since the run began are refused by name."""

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tfdogs import train as train_command


def photo(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


@pytest.fixture
def finished_run(tmp_path, capsys):
    photos = tmp_path / "photos"
    for breed_index, breed in enumerate(("beagle", "boxer", "pug")):
        for index in range(8):
            photo(photos / breed / f"{breed}{index}.jpg", seed=10 * breed_index + index)
    flags = ["--model", "lenet5", "--weights", "none", "--strategy", "scratch", "--data-dir", str(photos),
             "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--verbose", "0",
             "--output", str(tmp_path / "run"), "--export-dir", str(tmp_path / "export")]
    assert train_command.main(flags) == 0
    capsys.readouterr()
    return photos, flags


def resume_error(flags, capsys):
    """Resumes the run for a second epoch; returns the error line."""
    assert train_command.main([*flags[:-6], "--epochs", "2", *flags[-4:]]) == 2
    return capsys.readouterr().err


def test_photos_added_after_the_run_began_are_refused_by_name(finished_run, capsys, tmp_path):
    photos, flags = finished_run
    split = pd.read_csv(tmp_path / "run" / "split.csv")
    assert len(split) == 24 and split["sha256"].str.fullmatch("[0-9a-f]{64}").all()
    photo(photos / "pug" / "pug_new.jpg", seed=99)
    error = resume_error(flags, capsys)
    assert "differ from the ones this run started with" in error and "1 added (pug/pug_new.jpg)" in error
    assert len(pd.read_csv(tmp_path / "run" / "history.csv")) == 1  # no epoch trained on the old split


def test_photos_removed_or_changed_are_refused_by_name(finished_run, capsys, tmp_path):
    photos, flags = finished_run
    (photos / "beagle" / "beagle3.jpg").unlink()
    photo(photos / "boxer" / "boxer5.jpg", seed=1234)  # same name, other bytes
    error = resume_error(flags, capsys)
    assert "1 removed or now unusable (beagle/beagle3.jpg)" in error and "1 changed (boxer/boxer5.jpg)" in error


def test_the_same_photos_resume(finished_run, capsys, tmp_path):
    photos, flags = finished_run
    shutil.copystat(photos / "pug" / "pug0.jpg", photos / "pug" / "pug1.jpg")  # times change nothing: content counts
    assert train_command.main([*flags[:-6], "--epochs", "2", *flags[-4:]]) == 0
    assert len(pd.read_csv(tmp_path / "run" / "history.csv")) == 2


def test_a_folder_of_other_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    run_dir = tmp_path / "results"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"mine": true}')
    (run_dir / "notes.txt").write_text("mine")
    flags = ["--model", "lenet5", "--weights", "none", "--strategy", "scratch", "--data", "synthetic",
             "--image-size", "32", "--epochs", "1", "--verbose", "0", "--output", str(run_dir),
             "--export-dir", str(tmp_path / "export")]
    assert train_command.main(flags) == 2
    assert f"{run_dir} holds files that no tfdogs run wrote (metrics.json, notes.txt)" in capsys.readouterr().err
    assert sorted(path.name for path in run_dir.iterdir()) == ["metrics.json", "notes.txt"]
    assert (run_dir / "metrics.json").read_text() == '{"mine": true}' and not (tmp_path / "export").exists()


def test_a_run_stopped_while_starting_is_taken_up(finished_run, tmp_path):
    """What a run writes before config.yaml is its own: the same command goes on."""
    photos, flags = finished_run
    run_dir = tmp_path / "run"
    for name in sorted(path.name for path in run_dir.iterdir()):
        if name not in ("problems.csv", "split.csv", "data_source.json"):
            shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
    assert train_command.main(flags) == 0
    assert len(pd.read_csv(run_dir / "history.csv")) == 1


def test_a_finished_run_run_again_says_so_and_exports_nothing_new(finished_run, tmp_path, capsys):
    photos, flags = finished_run
    assert train_command.main(flags) == 0
    assert f"{tmp_path / 'run'} holds this run, finished (1 epochs): nothing trained or exported again" in \
        capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "export").iterdir()) == ["1"]
    assert train_command.main([*flags[:-6], "--epochs", "2", *flags[-4:]]) == 0  # more epochs: trains on
    assert sorted(path.name for path in (tmp_path / "export").iterdir()) == ["1", "2"]
    assert len(pd.read_csv(tmp_path / "run" / "history.csv")) == 2


def test_epochs_without_their_backup_are_refused(tmp_path, capsys):
    """Killed after three epochs (no phases.json, no metrics.json yet), then backup/ deleted."""
    run_dir = tmp_path / "run"
    flags = ["--model", "lenet5", "--weights", "none", "--strategy", "scratch", "--data", "synthetic",
             "--image-size", "32", "--epochs", "3", "--verbose", "0", "--output", str(run_dir),
             "--export-dir", str(tmp_path / "export")]
    assert train_command.main(flags) == 0
    for name in ("metrics.json", "phases.json", "backup"):
        shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
    capsys.readouterr()
    assert train_command.main(flags) == 2
    assert (f"{run_dir / 'history.csv'} records 3 finished epochs, but {run_dir / 'backup'} can resume only 0"
            in capsys.readouterr().err)
    assert len(pd.read_csv(run_dir / "history.csv")) == 3  # nothing trained beside the old history
