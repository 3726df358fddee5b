"""python -m tfdogs.bench against a real PyTorch: the PyTorch side runs, in an environment without TensorFlow.

tests/test_bench.py stands in for the PyTorch side; here `benchmarks/torch_bench.py`
runs for real, in the Python named by TFDOGS_TORCH_PYTHON (torch and
torchvision, no TensorFlow: the `torch_python` fixture of conftest.py), one
tiny row of each part.
"""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from tfdogs.bench.pytorch import probe_torch
from tfdogs.bench.steps import TORCH_SCRIPT, make_photo_like_jpegs

pytestmark = pytest.mark.slow

TINY = ["--models", "lenet5", "--image-size", "32", "--batch-size", "4", "--warmup-steps", "1",
        "--window-steps", "2", "--windows", "2", "--workers", "1", "--in-process"]


def test_torch_script_imports_neither_tensorflow_nor_the_tfdogs_package(torch_python, tmp_path):
    # Run as tfdogs.bench runs it, and with the repository root on sys.path as a checkout's user may have it:
    # still no TensorFlow, and not even the tfdogs package, whose __init__s import Keras and TensorFlow.
    environment = dict(os.environ, PYTHONPATH=str(TORCH_SCRIPT.parents[1]))
    done = subprocess.run([torch_python, "-X", "importtime", str(TORCH_SCRIPT), "--help"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--part" in done.stdout
    # -X importtime writes one line per module imported: "import time: self | cumulative | name".
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:") and not line.rstrip().endswith("| imported package")}
    assert {"torch", "torchvision", "tfdogs_measure"} <= imported
    top_level = {name.split(".")[0] for name in imported}
    assert not top_level & {"tensorflow", "keras", "tfdogs"}, sorted(top_level & {"tensorflow", "keras", "tfdogs"})


def test_bench_measures_each_part_against_real_pytorch(torch_python, tmp_path):
    photos = tmp_path / "photos"
    for breed in ("beagle", "boxer"):
        make_photo_like_jpegs(photos / breed, count=4, size=(64, 48), seed=len(breed))
    output = tmp_path / "bench"
    command = [sys.executable, "-m", "tfdogs.bench", *TINY, "--parts", "pipeline", "train", "inference",
               "--data-dir", str(photos), "--torch-python", torch_python, "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]

    with open(output.with_suffix(".csv"), newline="") as file:
        rows = list(csv.DictReader(file))
    torch_rows = {(row["part"], row["model"], row["setting"]): row for row in rows if row["framework"] == "torch"}
    assert set(torch_rows) == {("pipeline", "", "dataloader"), ("train", "lenet5", "fp32"),
                               ("train", "lenet5", "tuned"), ("inference", "lenet5", "fp32"),
                               ("inference", "lenet5", "tuned")}
    for row in torch_rows.values():
        for field in ("images_per_second", "peak_rss_mb"):
            assert math.isfinite(float(row[field])) and float(row[field]) > 0, row
        assert (row["batch_size"], row["image_size"]) == ("4", "32"), row
    # Every tfdogs row is compared with a measured PyTorch row: its ratio is there and is its rate over that row's.
    ours = [row for row in rows if row["framework"] == "tfdogs"]
    assert {row["part"] for row in ours} == {"pipeline", "train", "inference"}
    for row in ours:
        baseline = torch_rows[(row["part"], row["model"], "dataloader" if row["part"] == "pipeline" else "fp32")]
        assert float(row["ratio_vs_torch"]) == pytest.approx(
            float(row["images_per_second"]) / float(baseline["images_per_second"]), rel=1e-6), row

    versions, _ = probe_torch(torch_python)
    assert json.loads(output.with_suffix(".json").read_text())["torch"] == versions
    assert f"PyTorch: {versions} ({torch_python})" in done.stdout
