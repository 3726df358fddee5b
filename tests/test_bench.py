"""python -m tfdogs.bench: runs at tiny sizes and writes a well-formed table.

The PyTorch side runs in its own environment (torchvision is not in the test
extra), so these tests stand in for it: once with fixed PyTorch results, once
with PyTorch absent.
"""

import csv
import json
import statistics
import time
import types

import numpy as np
import pytest
from PIL import Image

from tfdogs import bench
from tfdogs.bench import measure, steps
from tfdogs.data import preprocessing

TINY = ["--models", "lenet5", "--image-size", "32", "--batch-size", "4", "--warmup-steps", "1",
        "--window-steps", "2", "--windows", "2", "--in-process"]
# The fake PyTorch's rate per setting: all different, so a ratio taken against the wrong row shows.
TORCH_RATES = {"fp32": 50.0, "tuned": 80.0, "dataloader": 30.0}


@pytest.fixture
def fake_torch(monkeypatch):
    """PyTorch 'present', answering each measurement with its setting's TORCH_RATES img/s."""
    calls = []

    def run_torch(torch_python, job):
        calls.append(job)
        rate = TORCH_RATES[job["setting"] if isinstance(job["setting"], str) else job["setting"]["name"]]
        return {"images_per_second": rate, "spread_percent": 1.0, "windows": [rate] * 2, "peak_rss_mb": 300.0}

    monkeypatch.setattr(bench, "probe_torch", lambda torch_python: ("torch 9.9, torchvision 9.9", None))
    monkeypatch.setattr(bench, "run_torch", run_torch)
    return calls


@pytest.fixture
def clocked(monkeypatch):
    """Every `measure.throughput` call, with the steps it ran and the clock readings it took.

    The readings come from a stand-in for the `time` module that `measure` reads, so the test knows the
    seconds each window measured and can compute the rates itself.
    """
    calls, readings = [], []

    def perf_counter():
        readings.append(time.perf_counter())
        return readings[-1]

    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=perf_counter))
    real = measure.throughput

    def recorded(run_steps, items_per_step, timing, synchronize=None):
        steps_run, first = [], len(readings)

        def counted(steps):
            steps_run.append(steps)
            run_steps(steps)

        result = real(counted, items_per_step, timing, synchronize)
        calls.append(dict(items=items_per_step, timing=timing, steps=steps_run, readings=readings[first:],
                          result=result))
        return result

    monkeypatch.setattr(measure, "throughput", recorded)
    return calls


def check_rates(call):
    """The call's windows are its images over its measured seconds; its rate the median, its spread theirs."""
    timing, readings = call["timing"], call["readings"]
    assert call["steps"] == [timing.warmup_steps] * bool(timing.warmup_steps) + [timing.window_steps] * timing.windows
    assert len(readings) == 2 * timing.windows
    windows = [timing.window_steps * call["items"] / (end - start) for start, end in zip(readings[::2], readings[1::2])]
    result = call["result"]
    assert result["windows"] == pytest.approx(windows, rel=1e-12)
    assert result["images_per_second"] == pytest.approx(statistics.median(windows), rel=1e-12)
    assert result["spread_percent"] == pytest.approx(100 * (max(windows) - min(windows)) / statistics.median(windows),
                                                     rel=1e-9, abs=1e-9)


def memory_mb(field):
    """A field of /proc/self/status (VmRSS, VmPeak, ...) in MiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field + ":"))


def check_tfdogs_rows(rows, calls, rss_before_mb):
    """tfdogs' rows (one run each) are their measurements' rates, at the batch size measured; their peak memory
    lies between the memory this process already held and its virtual peak, and above the weights' bytes."""
    ours = [row for row in rows if row["framework"] == "tfdogs"]
    assert len(ours) == len(calls)
    for row, call in zip(ours, calls):
        check_rates(call)
        assert float(row["images_per_second"]) == pytest.approx(call["result"]["images_per_second"], rel=1e-9), row
        assert int(row["batch_size"]) == call["items"], row
        peak = float(row["peak_rss_mb"])
        weights_mb = 4 * int(row["parameters"] or 0) / 2 ** 20  # float32 weights
        assert max(0.9 * rss_before_mb, weights_mb) <= peak <= memory_mb("VmPeak"), (row, rss_before_mb)


def read_table(output):
    with open(output.with_suffix(".csv"), newline="") as file:
        rows = list(csv.DictReader(file))
    return rows, json.loads(output.with_suffix(".json").read_text())


def test_full_table_with_pytorch_has_every_part_and_ratio(tmp_path, dogs10_dir, fake_torch, clocked, capsys):
    output = tmp_path / "bench"
    rss_before_mb = memory_mb("VmRSS")
    bench.main(TINY + ["--data-dir", str(dogs10_dir), "--output", str(output)])
    rows, report = read_table(output)
    assert list(rows[0]) == list(steps.COLUMNS)
    expected = {("pipeline", "", "torch", "dataloader"), ("pipeline", "", "tfdogs", "decode-and-crop"),
                ("pipeline", "", "tfdogs", "cache (memory)")}
    for part in ("train", "inference"):
        expected |= {(part, "lenet5", "torch", "fp32"), (part, "lenet5", "torch", "tuned"),
                     (part, "lenet5", "tfdogs", "float32")}
    assert expected <= {(row["part"], row["model"], row["framework"], row["setting"]) for row in rows}
    check_tfdogs_rows(rows, clocked, rss_before_mb)
    for row in rows:
        if row["framework"] == "torch":
            assert float(row["images_per_second"]) == TORCH_RATES[row["setting"]] and row["ratio_vs_torch"] == ""
        else:  # against the PyTorch row of the same part and model: the DataLoader, fp32, tuned
            baseline = TORCH_RATES["dataloader" if row["part"] == "pipeline" else "fp32"]
            assert float(row["ratio_vs_torch"]) == pytest.approx(float(row["images_per_second"]) / baseline), row
            if row["part"] != "pipeline":
                assert float(row["ratio_vs_torch_tuned"]) == pytest.approx(
                    float(row["images_per_second"]) / TORCH_RATES["tuned"]), row
    pipeline = [row for row in rows if row["part"] == "pipeline" and row["framework"] == "tfdogs"]
    assert all(row["target"] == ">= 3x torch dataloader" and row["target_met"] in ("True", "False")
               for row in pipeline)
    # The PyTorch side gets the same files, workers, sizes and timing.
    dataloader_job = next(job for job in fake_torch if job["part"] == "pipeline")
    assert (dataloader_job["workers"], dataloader_job["image_size"], dataloader_job["batch_size"]) == (2, 32, 4)
    assert report["torch"] == "torch 9.9, torchvision 9.9"
    assert report["environment"]["tensorflow"] and len(report["rows"]) == len(rows)
    printed = capsys.readouterr().out
    assert "PyTorch: torch 9.9" in printed and "x tuned" in printed


def test_without_pytorch_measures_tfdogs_alone_and_says_so(tmp_path, monkeypatch, clocked, capsys):
    monkeypatch.setattr(bench, "probe_torch", lambda torch_python: (None, "No module named 'torchvision'"))
    output = tmp_path / "alone"
    rss_before_mb = memory_mb("VmRSS")
    bench.main(TINY + ["--parts", "train", "--output", str(output)])
    rows, report = read_table(output)
    assert {row["framework"] for row in rows} == {"tfdogs"}
    assert all(row["ratio_vs_torch"] == "" for row in rows)
    check_tfdogs_rows(rows, clocked, rss_before_mb)
    assert report["torch"].startswith("PyTorch absent")
    assert "PyTorch absent (No module named 'torchvision')" in capsys.readouterr().out


def test_targets_apply_to_resnet18_at_224_against_tuned_pytorch():
    rows = [
        {"part": "train", "model": "resnet18", "framework": "torch", "setting": "fp32", "image_size": 224,
         "images_per_second": 10.0},
        {"part": "train", "model": "resnet18", "framework": "torch", "setting": "tuned", "image_size": 224,
         "images_per_second": 40.0},
        {"part": "train", "model": "resnet18", "framework": "tfdogs", "setting": "x", "image_size": 224,
         "images_per_second": 50.0},
        {"part": "train", "model": "resnet18", "framework": "tfdogs", "setting": "x", "image_size": 64,
         "images_per_second": 50.0},
    ]
    rows = bench.add_ratios(rows)
    assert rows[2]["ratio_vs_torch"] == pytest.approx(5.0) and rows[2]["ratio_vs_torch_tuned"] == 1.25
    assert rows[2]["target"] == ">= 1.2x torch tuned" and rows[2]["target_met"] is True
    assert rows[3]["target"] is None  # other sizes are measured but carry no target
    assert rows[0]["ratio_vs_torch"] is None  # PyTorch rows are the reference


def test_generated_photos_have_the_kaggle_median_size(tmp_path):
    paths = steps.make_photo_like_jpegs(tmp_path, count=3)
    assert len(paths) == 3
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == steps.PHOTO_SIZE
            assert np.asarray(image).std() > 10  # not a flat image: decoding costs what a photo does


# The pipeline options the benchmark measures (tfdogs.data.make_dataset).

def pipeline(paths, **options):
    from tfdogs import data

    return data.make_dataset(paths, np.zeros(len(paths), np.int64), image_size=32, batch_size=8, training=True,
                             mean=preprocessing.IMAGENET_MEAN, std=preprocessing.IMAGENET_STD, seed=3, **options)


def test_per_image_flip_mirrors_some_crops_and_keeps_the_others(dogs10_dir):
    paths = sorted(str(path) for path in dogs10_dir.glob("*/*.jpg"))[:16]
    plain = next(iter(pipeline(paths)))[0].numpy()
    flipped = next(iter(pipeline(paths, flip=True)))[0].numpy()
    mirrored = [np.allclose(f, p[:, ::-1], atol=1e-5) for f, p in zip(flipped, plain)]
    unchanged = [np.allclose(f, p, atol=1e-5) for f, p in zip(flipped, plain)]
    assert all(m or u for m, u in zip(mirrored, unchanged)) and any(mirrored) and any(unchanged)
    again = next(iter(pipeline(paths, flip=True)))[0].numpy()
    np.testing.assert_array_equal(flipped, again)  # seeded: the same flips for the same seed


def test_normalising_each_image_equals_normalising_the_batch(dogs10_dir):
    import keras

    paths = sorted(str(path) for path in dogs10_dir.glob("*/*.jpg"))[:16]
    per_image = next(iter(pipeline(paths)))[0].numpy()
    # any augmentation block moves normalisation to the batch map, after it
    per_batch = next(iter(pipeline(paths, augmentation=keras.layers.Identity())))[0].numpy()
    np.testing.assert_allclose(per_image, per_batch, atol=2e-6)


def test_cache_size_must_be_a_sensible_side(dogs10_dir):
    from tfdogs import data

    paths = sorted(str(path) for path in dogs10_dir.glob("*/*.jpg"))[:16]
    with pytest.raises(data.DataError, match="cache_size"):
        pipeline(paths, cache="memory", cache_size=4)
    batch = next(iter(pipeline(paths, cache="memory", cache_size=40)))[0]
    assert batch.shape == (8, 32, 32, 3)


def test_end_to_end_names_what_it_needs_before_any_work(monkeypatch, capsys):
    with pytest.raises(SystemExit, match="--end-to-end needs --data-dir"):
        bench.main(["--end-to-end"])
    monkeypatch.setattr(bench, "probe_torch", lambda torch_python: (None, "No module named 'torchvision'"))
    ran = []
    monkeypatch.setattr(bench.end_to_end, "run_end_to_end", lambda *args, **kwargs: ran.append(args))
    with pytest.raises(SystemExit, match="needs torch and torchvision.*No module named 'torchvision'"):
        bench.main(["--end-to-end", "--data-dir", "photos", "--torch-python", "python-without-torch"])
    assert not ran


def test_the_train_part_fits_on_a_batch_without_the_autotuner(monkeypatch):
    """As tfdogs.train's pipelines: with tf.data's autotuner, three ResNet-18 steps in `fit` stalled to
    one core on 2 cores (20.5 s against 10.9-11.2 s by `train_on_batch`)."""
    import keras
    import tensorflow as tf

    from tfdogs.bench import measure, steps

    fitted = []
    fit = keras.Model.fit

    def recording_fit(model, x=None, *args, **kwargs):
        fitted.append(x)
        return fit(model, x, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", recording_fit)
    steps.measure_training("lenet5", steps.Setting("float32"), image_size=32, batch_size=2, num_classes=3,
                           timing=measure.Timing(warmup_steps=1, window_steps=1, windows=1))
    assert fitted and all(isinstance(dataset, tf.data.Dataset) for dataset in fitted)
    assert all(dataset.options().autotune.enabled is False for dataset in fitted)
