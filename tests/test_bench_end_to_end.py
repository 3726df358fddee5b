"""tfdogs.bench.end_to_end: whole commands timed alternately from the outside.

The runner is tested on tiny Python commands that sleep and log their turn;
the tfdogs commands of both jobs are run for one epoch at 32 px, so the flags
`end_to_end_jobs` writes are ones `python -m tfdogs.train` accepts. The
PyTorch script itself needs torchvision, which is not importable beside the
project's torch: it is run by hand in its own environment (see its docstring).
"""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tfdogs.bench import end_to_end as bench_end_to_end
from tfdogs.bench.end_to_end import REPEAT, CommandFailed, CommandPair

# Sleeps for argv[1] seconds, then appends argv[3] to the file argv[2].
SLEEP_AND_LOG = "import sys, time; time.sleep(float(sys.argv[1])); open(sys.argv[2], 'a').write(sys.argv[3] + '\\n')"


def sleeper(seconds, log, name):
    return (sys.executable, "-c", SLEEP_AND_LOG, str(seconds), str(log), f"{name}-{REPEAT}")


def test_commands_alternate_and_are_timed_from_outside(tmp_path):
    log = tmp_path / "order.txt"
    pairs = [CommandPair("slow", sleeper(0.6, log, "slow-tfdogs"), sleeper(0.2, log, "slow-torch")),
             CommandPair("quick", sleeper(0.0, log, "quick-tfdogs"), sleeper(0.0, log, "quick-torch"))]
    rows = bench_end_to_end.time_commands(pairs, repeats=2, log=None)

    expected = [f"{job}-{side}-{repeat}"
                for repeat in (0, 1) for job in ("slow", "quick") for side in ("tfdogs", "torch")]
    assert log.read_text().split() == expected
    assert [f"{row['job']}-{row['side']}-{row['repeat']}" for row in rows] == expected

    summary = {row["job"]: row for row in bench_end_to_end.summarise(rows)}
    slow = summary["slow"]
    assert slow["tfdogs_seconds"] == pytest.approx(np.median(slow["tfdogs_runs"]))
    assert slow["torch_seconds"] == pytest.approx(np.median(slow["torch_runs"]))
    # Each run is its sleep plus a Python start-up (tens of ms; more on a busy machine).
    assert all(0.6 <= seconds < 0.6 + 1.5 for seconds in slow["tfdogs_runs"]), slow
    assert all(0.2 <= seconds < 0.2 + 1.5 for seconds in slow["torch_runs"]), slow
    assert slow["tfdogs_seconds"] - slow["torch_seconds"] == pytest.approx(0.4, abs=0.3)
    assert slow["ratio"] == pytest.approx(slow["torch_seconds"] / slow["tfdogs_seconds"])
    assert 0.2 < slow["ratio"] < 0.8
    table = bench_end_to_end.format_markdown(list(summary.values()))
    assert f"| slow | {slow['tfdogs_seconds']:.1f} | {slow['torch_seconds']:.1f} | {slow['ratio']:.2f} |" in table


def test_summary_takes_medians_over_repeats():
    rows = [{"job": "a", "side": side, "repeat": repeat, "seconds": seconds}
            for repeat, (tfdogs, torch) in enumerate([(10.0, 30.0), (12.0, 20.0), (50.0, 25.0)])
            for side, seconds in (("tfdogs", tfdogs), ("torch", torch))]
    (row,) = bench_end_to_end.summarise(rows)
    assert (row["tfdogs_seconds"], row["torch_seconds"]) == (12.0, 25.0)
    assert row["tfdogs_runs"] == [10.0, 12.0, 50.0] and row["torch_runs"] == [30.0, 20.0, 25.0]
    assert row["ratio"] == pytest.approx(25.0 / 12.0)


def test_a_failing_command_stops_the_run_naming_it(tmp_path):
    log = tmp_path / "order.txt"
    failing = (sys.executable, "-c", "import sys; sys.stderr.write('no photos here\\n'); sys.exit(3)", "--marker-7")
    pairs = [CommandPair("broken", sleeper(0.0, log, "broken-tfdogs"), failing)]
    with pytest.raises(CommandFailed) as raised:
        bench_end_to_end.time_commands(pairs, repeats=2, log=None, output_dir=tmp_path)
    message = str(raised.value)
    assert "broken (torch, repeat 1 of 2)" in message and "exit status 3" in message
    assert "--marker-7" in message and "no photos here" in message
    assert log.read_text().split() == ["broken-tfdogs-0"]  # nothing ran after the failure
    assert "no photos here" in (tmp_path / "broken-torch-r0.log").read_text()  # its output is kept


def torchvision_resnet18_checkpoint(path):
    """A random state dict with torchvision's ResNet-18 keys and shapes, written by torch (torchvision absent)."""
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    state = {}

    def conv(name, out_channels, in_channels, kernel):
        state[f"{name}.weight"] = torch.randn(out_channels, in_channels, kernel, kernel, generator=generator) * 0.05

    def batch_norm(name, channels):
        state.update({f"{name}.weight": torch.ones(channels), f"{name}.bias": torch.zeros(channels),
                      f"{name}.running_mean": torch.zeros(channels), f"{name}.running_var": torch.ones(channels),
                      f"{name}.num_batches_tracked": torch.tensor(0)})

    conv("conv1", 64, 3, 7)
    batch_norm("bn1", 64)
    in_channels = 64
    for stage, channels in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            conv(f"{prefix}.conv1", channels, in_channels, 3)
            batch_norm(f"{prefix}.bn1", channels)
            conv(f"{prefix}.conv2", channels, channels, 3)
            batch_norm(f"{prefix}.bn2", channels)
            if block == 0 and stage > 1:
                conv(f"{prefix}.downsample.0", channels, in_channels, 1)
                batch_norm(f"{prefix}.downsample.1", channels)
            in_channels = channels
    state["fc.weight"] = torch.randn(1000, 512, generator=generator) * 0.01
    state["fc.bias"] = torch.zeros(1000)
    torch.save(state, path)
    return path


def tiny_breed_folders(directory, breeds=("beagle", "boxer"), per_breed=6):
    """A class-folder tree of small JPEGs, one colour per breed (Kaggle breed names: the zero-shot path runs too)."""
    rng = np.random.default_rng(0)
    for index, breed in enumerate(breeds):
        (directory / breed).mkdir(parents=True)
        for photo in range(per_breed):
            pixels = np.clip(rng.normal(80 + 100 * index, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(directory / breed / f"{photo}.jpg")
    return directory


@pytest.mark.slow
def test_the_tfdogs_commands_of_every_job_train(tmp_path):
    data_dir = tiny_breed_folders(tmp_path / "photos")
    checkpoint = torchvision_resnet18_checkpoint(tmp_path / "resnet18-random.pth")
    pairs = bench_end_to_end.end_to_end_jobs(data_dir, tmp_path / "runs", "torch-python", checkpoint=checkpoint,
                                             scratch_epochs=1, feature_extract_epochs=1, batch_size=4, image_size=32)
    assert [pair.name for pair in pairs] == ["resnet18-scratch", "resnet18-feature-extract",
                                             "resnet18-feature-extract-cached"]
    def without_output(command):
        return [part for part in command if "resnet18-feature-extract" not in part]

    assert without_output(pairs[1].torch) == without_output(pairs[2].torch)  # the same PyTorch job
    assert "--feature-views" in pairs[2].tfdogs and "--feature-views" not in pairs[1].tfdogs
    for pair in pairs:
        # Every repeat writes fresh folders, on both sides.
        assert bench_end_to_end.expand(pair.tfdogs, 0) != bench_end_to_end.expand(pair.tfdogs, 1)
        assert bench_end_to_end.expand(pair.torch, 0) != bench_end_to_end.expand(pair.torch, 1)
        assert pair.torch[:2] == ("torch-python", str(bench_end_to_end.TORCH_SCRIPT))
        assert ("--weights" in pair.torch) == pair.name.startswith("resnet18-feature-extract")
        command = bench_end_to_end.expand(pair.tfdogs, 0)
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(command)}\n{done.stderr[-3000:]}"
        run_dir = tmp_path / "runs" / f"tfdogs-{pair.name}-r0"
        assert (run_dir / "metrics.json").is_file() and (run_dir / "model.keras").is_file()
        assert ("Cached backbone features" in done.stdout) == pair.name.endswith("-cached")
        assert (tmp_path / "runs" / f"tfdogs-{pair.name}-r0-export" / "1").is_dir()


def test_photo_like_folder_deals_distinct_photos_into_class_folders(tmp_path):
    """benchmarks/photo_like_folder.py: a class-folder tree tfdogs reads, no two files alike; too few photos refused."""
    import hashlib
    import pathlib

    from tfdogs import data

    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "photo_like_folder.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "photos"), "--photos", "11", "--breeds", "4"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    records = data.find_records(tmp_path / "photos")
    assert len(records.paths) == 11 and records.class_names == [f"breed-{index:03d}" for index in range(4)]
    assert np.bincount(records.labels).tolist() == [3, 3, 3, 2]  # photo i into breed i mod 4
    assert len({hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest() for path in records.paths}) == 11
    with Image.open(records.paths[0]) as photo:
        assert photo.format == "JPEG" and photo.size == (500, 375)
    refused = subprocess.run([sys.executable, str(script), str(tmp_path / "few"), "--photos", "7", "--breeds", "4"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "each breed needs 2" in refused.stderr
