"""`python -m tfdogs.bench`: tfdogs against PyTorch on the same machine, side by side.

Measures, for each model and each TensorFlow setting that applies to the
device, the throughput (images per second: the median of several timed
windows after a warm-up) and peak resident memory of

    pipeline   the training input pipeline (`tfdogs.data.make_dataset`: decode,
               random-resized crop, flip, normalise) on JPEG files, without
               and with the in-memory cache, against a torchvision
               `DataLoader` with as many worker processes as tf.data threads;
    train      the training step (Adam, model only, a fixed random batch),
               against torchvision in float32 and tuned (channels-last +
               bfloat16 autocast on CPU, float16 AMP on GPU);
    inference  the model as training exports it (BatchNorms folded) in a
               model-only SavedModel loaded with `tf.saved_model.load`, plain
               and with TensorFlow's oneDNN bfloat16 rewrite, against the same
               two PyTorch settings in inference mode;

and prints one table with the ratios (tfdogs / PyTorch), also written as
`<output>.csv` and `<output>.json`. Each measurement runs in a fresh process
(so memory peaks and thread settings don't leak between rows); `--in-process`
trades that for speed. The PyTorch side is `benchmarks/torch_bench.py`, run
with `--torch-python` (default: this Python), so torch and torchvision may
live in a virtual environment of their own; without them tfdogs is measured
alone and the table says "PyTorch absent".

Examples:
    python -m tfdogs.bench --torch-python venv-bench/bin/python
    python -m tfdogs.bench --models resnet18 --parts train inference --repeats 3
    python -m tfdogs.bench --models lenet5 --image-size 32 --windows 2 --in-process   # seconds
"""

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile

import numpy as np

from tfdogs import distribute, measure

PARTS = ("pipeline", "train", "inference")
REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
TORCH_SCRIPT = REPOSITORY / "benchmarks" / "torch_bench.py"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The Kaggle photos' median size, for the generated stand-ins when no --data-dir is given.
PHOTO_SIZE = (500, 375)

# (part, model, image size) -> (PyTorch setting compared against, lowest ratio that meets the target)
TARGETS = {
    ("pipeline", None, None): ("dataloader", 3.0),
    ("train", "resnet18", 224): ("tuned", 1.2),
    ("inference", "resnet18", 224): ("tuned", 1.0),
}

COLUMNS = ("part", "model", "framework", "setting", "batch_size", "image_size", "images_per_second",
           "spread_percent", "peak_rss_mb", "ratio_vs_torch", "ratio_vs_torch_tuned", "target", "target_met")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way of running tfdogs: a Keras dtype policy, XLA or not, serving options, environment variables.

    `bfloat16_rewrite` turns on TensorFlow's oneDNN bfloat16 graph rewrite
    (`auto_mixed_precision_onednn_bfloat16`) in the process that loads a
    float32 SavedModel. `environment` is applied before TensorFlow starts,
    so it takes effect only in a fresh (isolated) measurement process.
    """

    name: str
    precision: str = "float32"
    jit_compile: bool = False
    bfloat16_rewrite: bool = False
    environment: tuple = ()


def tensorflow_settings(part, has_gpu, bfloat16_cpu):
    """The settings worth measuring for a part on this device.

    Training: float32 and the mixed precision the device computes fast.
    Inference: the float32 SavedModel that training exports, plain and, on a
    CPU with native bfloat16, served with the bfloat16 rewrite.
    """
    if part == "train":
        if has_gpu:
            return [Setting("float32"), Setting("mixed_float16+xla", "mixed_float16", jit_compile=True)]
        return [Setting("float32")] + ([Setting("mixed_bfloat16", "mixed_bfloat16")] if bfloat16_cpu else [])
    settings = [Setting("float32")]
    if bfloat16_cpu and not has_gpu:
        settings.append(Setting("float32+bf16 rewrite", bfloat16_rewrite=True))
    return settings


# ----------------------------------------------------------------------------- data


def make_photo_like_jpegs(directory, count=256, size=PHOTO_SIZE, seed=0):
    """Writes `count` JPEGs of `size` (width, height) that decode like photos.

    Shapes on a noisy background, drawn at half resolution and enlarged (as
    smooth as a photo), saved at quality 85: about 40 kB each, near the
    Kaggle photos' 34 kB at 500x375. Returns the file paths.
    """
    from PIL import Image

    from tfdogs import data

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    side = max(width, height)
    paths = []
    for index in range(count):
        square = Image.fromarray(data._synthetic_image(rng, index % 8, 8, side // 2)).resize(
            (side, side), Image.BILINEAR)
        top, left = (side - height) // 2, (side - width) // 2
        buffer = io.BytesIO()
        square.crop((left, top, left + width, top + height)).save(buffer, format="JPEG", quality=85)
        path = directory / f"photo-{index:04d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(str(path))
    return paths


def jpeg_files(data_dir, workdir):
    """JPEG paths from a Kaggle or class-folder directory, or generated stand-ins."""
    if data_dir is None:
        return make_photo_like_jpegs(pathlib.Path(workdir) / "photos", count=1024)
    from tfdogs import data

    return data.find_records(data_dir).paths


# ----------------------------------------------------------------------------- TensorFlow measurements


def measure_pipeline(paths, *, cache, image_size, batch_size, workers, crop_scale_min, timing):
    """Training pipeline throughput: decode, crop, flip, normalise, with `workers` tf.data threads.

    Without the cache the file list is repeated into one long epoch (as the
    DataLoader's is); with it, the cache is filled during the warm-up (one
    whole epoch) and the timed windows read decoded images from memory.
    The flip is `make_dataset`'s per-image one (`flip=True`, no Keras block).
    """
    import tensorflow as tf

    from tfdogs import data

    steps_needed = timing.warmup_steps + timing.window_steps * timing.windows + 1
    # At least 1024 entries per epoch (the list repeated), so epoch boundaries cost what they cost in a
    # real epoch of thousands of photos; the cache then holds each photo as often as it is listed.
    files = list(paths) * max(1, math.ceil(1024 / len(paths)))
    if cache:
        timing = dataclasses.replace(
            timing, warmup_steps=max(timing.warmup_steps, math.ceil(len(files) / batch_size) + 1))
    else:
        files = (files * (steps_needed * batch_size // len(files) + 1))[:max(steps_needed * batch_size, len(files))]
    dataset = data.make_dataset(
        files, np.zeros(len(files), np.int64), image_size=image_size, batch_size=batch_size, training=True,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, flip=True, cache="memory" if cache else None,
        shuffle_buffer=min(len(files), 1024), scale=(crop_scale_min, 1.0))
    options = tf.data.Options()
    options.threading.private_threadpool_size = workers  # as many threads as the DataLoader has workers
    batches = iter(dataset.repeat().with_options(options))

    def run_steps(steps):
        for _ in range(steps):
            next(batches)

    return measure.throughput(run_steps, batch_size, timing)


def _build(model_name, setting, *, image_size, num_classes):
    import keras

    from tfdogs import models

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_dtype_policy(setting.precision)
    try:
        return models.build(model_name, num_classes, input_shape=(image_size, image_size, 3))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def _random_batch(batch_size, image_size, num_classes):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size, image_size, image_size, 3), dtype=np.float32)
    return images, rng.integers(0, num_classes, batch_size).astype(np.int32)


def measure_training(model_name, setting, *, image_size, batch_size, num_classes, timing):
    """Training-step throughput of `model.fit` on a fixed batch (model only, no input cost)."""
    import keras
    import tensorflow as tf

    from tfdogs import train

    model = _build(model_name, setting, image_size=image_size, num_classes=num_classes)
    model.compile(optimizer=train.make_optimizer("adam", 1e-3, 0.9, {}),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  jit_compile=setting.jit_compile)
    dataset = tf.data.Dataset.from_tensors(_random_batch(batch_size, image_size, num_classes)).repeat()

    def run_steps(steps):
        model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)

    result = measure.throughput(run_steps, batch_size, timing)
    result["jit_compile"] = bool(model.jit_compile)
    return result


def measure_inference(model_name, setting, *, image_size, batch_size, num_classes, timing, workdir):
    """Throughput of the model as `tfdogs.train` exports it (BatchNorms folded), loaded back as a SavedModel.

    The SavedModel holds the model alone (`model.export`: no JPEG decoding
    or resizing, as the PyTorch side does none); the model is exported and
    dropped before the measurement starts, so the memory peak is that of a
    serving process.
    """
    import gc

    import keras
    import tensorflow as tf

    from tfdogs import inference

    model = inference.fold_batch_norms(_build(model_name, setting, image_size=image_size, num_classes=num_classes))
    export_dir = pathlib.Path(workdir) / f"savedmodel-{model_name}-{setting.name}".replace(" ", "-")
    model.export(str(export_dir), format="tf_saved_model", verbose=False)
    del model
    keras.backend.clear_session()
    gc.collect()
    if setting.bfloat16_rewrite:
        tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
    with measure.PeakMemory() as memory:
        loaded = tf.saved_model.load(str(export_dir))
        serve = loaded.serve  # `loaded` owns the variables; keep it alive
        images = tf.constant(_random_batch(batch_size, image_size, num_classes)[0])

        def run_steps(steps):
            for _ in range(steps):
                serve(images)

        result = measure.throughput(run_steps, batch_size, timing)
    tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": False})
    result["peak_rss_mb"] = memory.peak_mb
    return result


def run_job(job):
    """Runs one TensorFlow measurement described by a JSON-able dict; returns its result dict."""
    timing = measure.Timing(**job["timing"])
    setting = Setting(**{**job["setting"], "environment": tuple(map(tuple, job["setting"]["environment"]))})
    common = dict(image_size=job["image_size"], batch_size=job["batch_size"], timing=timing)
    with measure.PeakMemory() as memory:
        if job["part"] == "pipeline":
            result = measure_pipeline(job["paths"], cache=job["cache"], workers=job["workers"],
                                      crop_scale_min=job["crop_scale_min"], **common)
        elif job["part"] == "train":
            result = measure_training(job["model"], setting, num_classes=job["num_classes"], **common)
        else:
            result = measure_inference(job["model"], setting, num_classes=job["num_classes"],
                                       workdir=job["workdir"], **common)
    result.setdefault("peak_rss_mb", memory.peak_mb)
    return result


def _last_json_line(text, command):
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{' '.join(map(str, command))} printed no result:\n{text[-2000:]}")


def run_isolated(job):
    """`run_job` in a fresh Python process with the setting's environment variables."""
    environment = {**os.environ, **dict(job["setting"]["environment"])}
    command = [sys.executable, "-m", "tfdogs.bench", "--job", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPOSITORY)
    if done.returncode:
        raise RuntimeError(f"benchmark job failed ({done.returncode}): {job['part']} {job.get('model')}\n"
                           f"{done.stderr[-3000:]}")
    return _last_json_line(done.stdout, command[:3])


# ----------------------------------------------------------------------------- PyTorch side


def probe_torch(torch_python):
    """(versions, None) when torch and torchvision import in `torch_python`, else (None, reason)."""
    if not TORCH_SCRIPT.is_file():
        return None, f"{TORCH_SCRIPT} not found (run from a source checkout)"
    try:
        done = subprocess.run(
            [torch_python, "-c", "import torch, torchvision; print(torch.__version__, torchvision.__version__)"],
            capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"{torch_python}: {error}"
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        return None, f"{torch_python}: {lines[-1] if lines else 'exit ' + str(done.returncode)}"
    torch_version, vision_version = done.stdout.split()
    return f"torch {torch_version}, torchvision {vision_version}", None


def run_torch(torch_python, job):
    """One PyTorch measurement (`benchmarks/torch_bench.py`) in its own process."""
    timing = job["timing"]
    command = [torch_python, str(TORCH_SCRIPT), "--part", job["part"], "--setting", job["setting"],
               "--image-size", str(job["image_size"]), "--batch-size", str(job["batch_size"]),
               "--num-classes", str(job["num_classes"]), "--warmup-steps", str(timing["warmup_steps"]),
               "--window-steps", str(timing["window_steps"]), "--windows", str(timing["windows"])]
    if job["part"] == "pipeline":
        command += ["--files", job["files"], "--workers", str(job["workers"]),
                    "--crop-scale-min", str(job["crop_scale_min"])]
    else:
        command += ["--model", job["model"]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"PyTorch benchmark failed ({done.returncode}): {' '.join(command)}\n"
                           f"{done.stderr[-3000:]}")
    return _last_json_line(done.stdout, command)


# ----------------------------------------------------------------------------- the table


def plan(args, settings_for, workdir, paths, files_list):
    """The measurements to make, as (row key, framework, job) in the order they run."""
    base = dict(image_size=args.image_size, batch_size=args.batch_size, num_classes=args.num_classes,
                timing=dataclasses.asdict(measure.Timing(args.warmup_steps, args.window_steps, args.windows)))
    jobs = []
    if "pipeline" in args.parts:
        pipeline = dict(base, part="pipeline", model=None, workers=args.workers,
                        crop_scale_min=args.crop_scale_min)
        jobs.append(("torch", dict(pipeline, setting="dataloader", files=files_list)))
        for cache in (False, True):
            name = "cache (memory)" if cache else "decode-and-crop"
            jobs.append(("tfdogs", dict(pipeline, setting=dataclasses.asdict(Setting(name)), cache=cache,
                                        paths=list(paths))))
    for part in ("train", "inference"):
        if part not in args.parts:
            continue
        for model in args.models:
            job = dict(base, part=part, model=model, workdir=str(workdir))
            jobs += [("torch", dict(job, setting=name)) for name in ("fp32", "tuned")]
            jobs += [("tfdogs", dict(job, setting=dataclasses.asdict(setting))) for setting in settings_for(part)]
    return jobs


def _setting_name(job):
    return job["setting"] if isinstance(job["setting"], str) else job["setting"]["name"]


def run_plan(jobs, *, repeats, isolate, torch_python):
    """Runs every job `repeats` times (interleaved, so drift hits all alike); returns rows of medians."""
    results = {}
    for _ in range(repeats):
        for index, (framework, job) in enumerate(jobs):
            if framework == "torch":
                result = run_torch(torch_python, job)
            else:
                result = run_isolated(job) if isolate else run_job(job)
            results.setdefault(index, []).append(result)
            print(f"  {job['part']:<9} {job.get('model') or '':<8} {framework:<6} {_setting_name(job):<24} "
                  f"{result['images_per_second']:9.1f} img/s", file=sys.stderr, flush=True)
    rows = []
    for index, (framework, job) in enumerate(jobs):
        runs = results[index]
        rows.append({
            "part": job["part"], "model": job.get("model") or "", "framework": framework,
            "setting": _setting_name(job), "batch_size": job["batch_size"], "image_size": job["image_size"],
            "images_per_second": statistics.median(run["images_per_second"] for run in runs),
            "spread_percent": statistics.median(run["spread_percent"] for run in runs),
            "peak_rss_mb": statistics.median(run["peak_rss_mb"] for run in runs),
            "runs": [run["images_per_second"] for run in runs],
        })
    return add_ratios(rows)


def add_ratios(rows):
    """Fills tfdogs rows' ratios against the PyTorch rows of the same part and model, and the targets."""
    torch_rate = {(row["part"], row["model"], row["setting"]): row["images_per_second"]
                  for row in rows if row["framework"] == "torch"}
    for row in rows:
        row.update(ratio_vs_torch=None, ratio_vs_torch_tuned=None, target=None, target_met=None)
        if row["framework"] != "tfdogs":
            continue
        key = (row["part"], row["model"])
        baseline = torch_rate.get(key + ("dataloader" if row["part"] == "pipeline" else "fp32",))
        tuned = torch_rate.get(key + ("tuned",))
        if baseline:
            row["ratio_vs_torch"] = row["images_per_second"] / baseline
        if tuned:
            row["ratio_vs_torch_tuned"] = row["images_per_second"] / tuned
        model_key = (None, None) if row["part"] == "pipeline" else (row["model"], row["image_size"])
        target = TARGETS.get((row["part"],) + model_key)
        if target:
            reference, lowest = target
            ratio = row["ratio_vs_torch_tuned"] if reference == "tuned" else row["ratio_vs_torch"]
            row["target"] = f">= {lowest:g}x torch {reference}"
            row["target_met"] = None if ratio is None else ratio >= lowest
    return rows


def _format(value, digits=1):
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows, torch_note):
    """The rows as an aligned text table, with the PyTorch note on top."""
    header = ("part", "model", "framework", "setting", "img/s", "spread %", "peak MB",
              "x torch", "x tuned", "target", "met")
    lines = [[row["part"], row["model"], row["framework"], row["setting"],
              _format(row["images_per_second"]), _format(row["spread_percent"], 0), _format(row["peak_rss_mb"], 0),
              _format(row["ratio_vs_torch"], 2), _format(row["ratio_vs_torch_tuned"], 2),
              _format(row["target"]), _format(row["target_met"])] for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    text = [torch_note, ""]
    for line in [header, ["-" * width for width in widths]] + lines:
        text.append("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())
    return "\n".join(text)


def write_outputs(rows, report, output):
    """Writes `<output>.csv` (the rows) and `<output>.json` (rows plus how they were measured)."""
    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output.with_suffix(".csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    output.with_suffix(".json").write_text(json.dumps({**report, "rows": rows}, indent=2))
    return output.with_suffix(".csv"), output.with_suffix(".json")


def environment_report():
    """What the numbers were measured on."""
    import keras
    import tensorflow as tf

    cpu = platform.processor()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = [device.name for device in tf.config.list_physical_devices("GPU")]
    return {"cpu": cpu, "cores": os.cpu_count(), "gpus": gpus,
            "cpu_bfloat16": distribute.cpu_has_native_bfloat16(), "tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version()}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tfdogs.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet18", "resnet34"],
                        choices=("lenet5", "resnet18", "resnet34"))
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=120)
    parser.add_argument("--data-dir", help="JPEGs for the pipeline (Kaggle or class-folder layout); "
                        f"default: generated {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} photo-like JPEGs")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = tf.data threads")
    parser.add_argument("--crop-scale-min", type=float, default=0.25, help="random-resized-crop area range low")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--window-steps", type=int, default=3)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="run everything this often; report medians")
    parser.add_argument("--torch-python", default=os.environ.get("TFDOGS_TORCH_PYTHON", sys.executable),
                        help="Python with torch and torchvision (env TFDOGS_TORCH_PYTHON)")
    parser.add_argument("--no-torch", action="store_true", help="measure tfdogs alone")
    parser.add_argument("--in-process", action="store_true",
                        help="measure TensorFlow rows in this process (faster; memory peaks less clean, "
                        "settings' environment variables ignored)")
    parser.add_argument("--output", default="benchmark", help="writes OUTPUT.csv and OUTPUT.json")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: one isolated measurement
    return parser.parse_args(argv)


def main(argv=None):
    """Command-line entry point; returns the rows it measured (or prints one job's result)."""
    args = parse_args(argv)
    if args.job:
        print(json.dumps(run_job(json.loads(args.job))))
        return None
    import tensorflow as tf

    report = {"environment": environment_report(), "settings": {
        key: value for key, value in vars(args).items() if key not in ("job", "output")}}
    torch_versions, reason = (None, "--no-torch") if args.no_torch else probe_torch(args.torch_python)
    torch_note = (f"PyTorch: {torch_versions} ({args.torch_python})" if torch_versions
                  else f"PyTorch absent ({reason}): tfdogs measured alone, no ratios.")
    report["torch"] = torch_versions or f"PyTorch absent: {reason}"
    print(torch_note, file=sys.stderr)
    has_gpu, bfloat16 = bool(tf.config.list_physical_devices("GPU")), distribute.cpu_has_native_bfloat16()

    def settings_for(part):
        return tensorflow_settings(part, has_gpu, bfloat16)

    with tempfile.TemporaryDirectory(prefix="tfdogs-bench-") as workdir:
        paths = jpeg_files(args.data_dir, workdir) if "pipeline" in args.parts else []
        files_list = pathlib.Path(workdir) / "files.txt"
        files_list.write_text("\n".join(paths))
        jobs = plan(args, settings_for, workdir, paths, str(files_list))
        if not torch_versions:
            jobs = [(framework, job) for framework, job in jobs if framework != "torch"]
        report["load_average_before"] = os.getloadavg()
        rows = run_plan(jobs, repeats=args.repeats, isolate=not args.in_process,
                        torch_python=args.torch_python)
        report["load_average_after"] = os.getloadavg()
    print(format_table(rows, torch_note))
    csv_path, json_path = write_outputs(rows, report, args.output)
    print(f"\nWritten: {csv_path}, {json_path}")
    return rows


if __name__ == "__main__":
    main()
