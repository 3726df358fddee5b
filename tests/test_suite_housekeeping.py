"""The suite's own housekeeping: what a test writes under `tmp_path` is gone once the test passes.

Many tests train and export ResNets, and such a test writes 45 MB to 1.2 GB
(weights, resume backups, SavedModels). Kept, as pytest keeps them by default,
the default tier leaves 3.3 GB in the temporary folder and the slow tier 7.9 GB
more, which once filled a CI machine's disk. A failing test keeps its folder,
for a look at what it wrote.
"""

import os
import pathlib
import subprocess
import sys

PROJECT = pathlib.Path(__file__).resolve().parents[1]
TWO_TESTS = """
def test_passes(tmp_path):
    (tmp_path / "run.bin").write_bytes(bytes(1 << 20))


def test_fails(tmp_path):
    (tmp_path / "kept.txt").write_text("what the failing test wrote")
    assert False
"""


def files_left(folder, *selection):
    """Runs the project's pytest settings on `selection` of TWO_TESTS, with its temporary root in `folder`;
    returns the names of the files left there."""
    (folder / "test_two.py").write_text(TWO_TESTS)
    root = folder / "temporary"
    root.mkdir()
    finished = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(PROJECT / "setup.cfg"), "--rootdir", str(folder),
         "-p", "no:cacheprovider", "-q", *(f"test_two.py::{name}" for name in selection)],
        cwd=folder, capture_output=True, text=True, env={**os.environ, "PYTEST_DEBUG_TEMPROOT": str(root)})
    assert finished.returncode == (1 if "test_fails" in selection else 0), finished.stdout[-2000:]
    return sorted(path.name for path in root.rglob("*") if path.is_file())


def test_a_passing_test_leaves_no_files(tmp_path):
    assert files_left(tmp_path, "test_passes") == []


def test_a_failing_test_keeps_its_own_files_and_only_those(tmp_path):
    assert files_left(tmp_path, "test_passes", "test_fails") == ["kept.txt"]
