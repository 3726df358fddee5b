"""Two `train` processes into one run folder: one trains, the other is refused at once naming it."""

import os
import pathlib
import subprocess
import sys
import time

import pandas as pd
import pytest

# Each process imports tfdogs (seconds), then waits for the go file: both call main within milliseconds.
STARTER = """
import pathlib, sys, time
from tfdogs import train
go = pathlib.Path(sys.argv[1])
pathlib.Path(sys.argv[2]).touch()
while not go.exists():
    time.sleep(0.001)
sys.exit(train.main(sys.argv[3:]))
"""


def start_together(tmp_path, flags_of):
    """Starts one `train` per flag list, releases them together, returns (return code, stderr) of each."""
    go = tmp_path / "go"
    processes = []
    for index, flags in enumerate(flags_of):
        processes.append(subprocess.Popen(
            [sys.executable, "-c", STARTER, str(go), str(tmp_path / f"ready{index}"), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}))
    deadline = time.time() + 300
    while not all((tmp_path / f"ready{index}").exists() for index in range(len(flags_of))):
        assert time.time() < deadline, "the processes did not start"
        time.sleep(0.05)
    go.touch()
    return [(process.wait(timeout=600), process.communicate()[1]) for process in processes]


def flags(tmp_path, learning_rate):
    return ["--model", "lenet5", "--weights", "none", "--strategy", "scratch", "--data", "synthetic",
            "--image-size", "32", "--epochs", "2", "--verbose", "0", "--learning-rate", str(learning_rate),
            "--output", str(tmp_path / "run"), "--export-dir", str(tmp_path / "export")]


@pytest.mark.slow
@pytest.mark.parametrize("settings", ["same", "different"])
def test_two_trains_started_together_give_one_run_and_one_refusal(tmp_path, settings):
    rates = (0.003, 0.003) if settings == "same" else (0.003, 0.01)
    outcomes = start_together(tmp_path, [flags(tmp_path, rate) for rate in rates])
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    refused = next(error for code, error in outcomes if code == 2)
    assert f"error: run folder {tmp_path / 'run'} is in use by pid " in refused, refused
    assert "Traceback" not in refused and refused.count("\n") == 1
    history = (tmp_path / "run" / "history.csv").read_text()
    assert history.count("epoch,") == 1 and len(pd.read_csv(tmp_path / "run" / "history.csv")) == 2
    assert sorted(path.name for path in (tmp_path / "export").iterdir()) == ["1"]  # one export, not two
    assert not (tmp_path / "run" / ".lock").exists()  # let go at the end
