"""One export folder per run: same-named runs never share one, and another run's folder is refused by default."""

import hashlib
import json
import shutil

import pytest

from tfdogs import export as export_command, train as train_command


@pytest.fixture
def same_named_runs(lenet_run, tmp_path, monkeypatch):
    """Copies of one finished run at a/run, b/run and runs/run; the working directory is tmp_path."""
    monkeypatch.chdir(tmp_path)
    for parent in ("a", "b", "runs"):
        shutil.copytree(lenet_run, tmp_path / parent / "run")
    return tmp_path


def versions(base):
    return {path.parent.name: json.loads(path.read_text())["run"] for path in sorted(base.glob("*/tfdogs.json"))}


def test_same_named_runs_export_to_their_own_folders_and_each_version_names_its_run(same_named_runs):
    for parent in ("a", "b", "runs"):
        assert export_command.main([f"{parent}/run"]) == 0
    exports = same_named_runs / "saved_models"
    expected = {f"run-{hashlib.sha256(str(same_named_runs / parent / 'run').encode()).hexdigest()[:8]}": parent
                for parent in ("a", "b")}
    expected["run"] = "runs"  # the default place keeps the plain name
    assert sorted(path.name for path in exports.iterdir()) == sorted(expected)
    for folder, parent in expected.items():
        assert versions(exports / folder) == {"1": str(same_named_runs / parent / "run")}
    assert export_command.main(["a/run"]) == 0  # the same run again: its own folder, the next version
    assert sorted(versions(exports / next(name for name, parent in expected.items() if parent == "a"))) == ["1", "2"]


def test_a_default_folder_serving_another_run_is_refused_and_an_explicit_one_is_not(same_named_runs, capsys):
    exports = same_named_runs / "saved_models"
    assert export_command.main(["a/run", "--output", "saved_models/run"]) == 0  # on purpose: allowed
    capsys.readouterr()
    assert export_command.main(["runs/run"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: saved_models/run already serves {same_named_runs / 'a' / 'run'}, not "
                            f"{same_named_runs / 'runs' / 'run'}") and "--export-dir" in error
    assert versions(exports / "run") == {"1": str(same_named_runs / "a" / "run")}  # nothing added
    assert export_command.main(["runs/run", "--output", "saved_models/run"]) == 0
    assert versions(exports / "run")["2"] == str(same_named_runs / "runs" / "run")


def test_train_refuses_a_default_export_folder_that_serves_another_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    version = tmp_path / "saved_models" / "mine" / "1"
    version.mkdir(parents=True)
    (version / "tfdogs.json").write_text(json.dumps({"run": "/elsewhere/mine"}))
    flags = ["--model", "lenet5", "--weights", "none", "--strategy", "scratch", "--data", "synthetic",
             "--image-size", "32", "--epochs", "1", "--verbose", "0", "--output", "runs/mine"]
    assert train_command.main(flags) == 2
    error = capsys.readouterr().err
    assert "Config key 'export_dir': saved_models/mine already serves /elsewhere/mine" in error
    assert not (tmp_path / "runs").exists()  # refused before any folder was made
