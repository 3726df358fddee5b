"""Files and folders written whole: a swap over an old folder, and what a killed process left is tidied."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tfdogs import files


def dead_pid():
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_new_folder_replaces_the_old_one_whole(tmp_path):
    old = tmp_path / "evaluation"
    old.mkdir()
    (old / "report.html").write_text("old")
    (old / "only_in_the_old.csv").write_text("old")

    def write(folder):
        folder.mkdir()
        (folder / "report.html").write_text("new")

    files.replace_into(old, write)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["evaluation"]
    assert {path.name: path.read_text() for path in old.iterdir()} == {"report.html": "new"}


def test_a_failed_write_leaves_the_old_folder_and_no_partial(tmp_path):
    old = tmp_path / "evaluation"
    old.mkdir()
    (old / "report.html").write_text("old")

    def write(folder):
        folder.mkdir()
        (folder / "report.html").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.replace_into(old, write)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["evaluation"]
    assert (old / "report.html").read_text() == "old"


def test_the_fallback_swap_gives_the_same_result(tmp_path, monkeypatch):
    """Where renameat2 is missing, the folder is renamed aside, the new one in, and the old removed."""
    monkeypatch.setattr(files.ctypes, "CDLL", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("no libc")))
    old = tmp_path / "ensemble"
    old.mkdir()
    (old / "stale.json").write_text("{}")
    files.replace_into(old, lambda folder: (folder.mkdir(), (folder / "ensemble.json").write_text("[]")))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ensemble"]
    assert [path.name for path in old.iterdir()] == ["ensemble.json"]


def test_what_a_killed_process_left_goes_with_the_next_write_and_a_live_ones_stays(tmp_path):
    """kill -9 in the middle of writing a folder, then the next write into the same folder tidies it."""
    script = ("import pathlib, sys, time; from tfdogs import files\n"
              "def write(folder):\n"
              "    folder.mkdir(); (folder / 'saved_model.pb').write_bytes(b'x' * 1000); print('writing', flush=True)\n"
              "    time.sleep(60)\n"
              "files.replace_into(pathlib.Path(sys.argv[1]) / '3', write)\n")
    writer = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    left = tmp_path / f".partial-{writer.pid}-3"
    assert (left / "saved_model.pb").is_file()  # a kill -9 runs no clean-up

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / f".partial-{sleeper.pid}-4"
        alive.mkdir()
        dead_file = tmp_path / f".partial-{dead_pid()}-config.yaml"
        dead_file.write_text("half")
        (tmp_path / ".hidden-but-not-ours").write_text("kept")
        files.write_json({"version": 4}, tmp_path / "4.json")
        assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
            [alive.name, ".hidden-but-not-ours", "4.json"])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_interrupted_command_removes_its_own_partials(tmp_path):
    own = tmp_path / f".partial-{os.getpid()}-7"
    own.mkdir()
    assert files.remove_leftovers(tmp_path) == []  # still running: kept
    assert files.remove_leftovers(tmp_path, own=True) == [own.name]
    assert not own.exists()
