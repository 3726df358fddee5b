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
`<output>.csv` and `<output>.json`. `--models` also takes ``keras_hub:PRESET``
(a keras-hub preset name, handle or local preset folder, as `tfdogs.train`
does), built from the preset's architecture with fresh weights; PyTorch has no
counterpart for those, so their rows are tfdogs alone, without ratios. Each
measurement runs in a fresh process (so memory peaks and thread settings don't
leak between rows); `--in-process` trades that for speed. The PyTorch side is
`benchmarks/torch_bench.py`, run with `--torch-python` (default: this Python),
so torch and torchvision may live in a virtual environment of their own;
without them tfdogs is measured alone and the table says "PyTorch absent".

Examples:
    python -m tfdogs.bench --torch-python venv-bench/bin/python
    python -m tfdogs.bench --models resnet18 --parts train inference --repeats 3
    python -m tfdogs.bench --models lenet5 --image-size 32 --windows 2 --in-process --no-torch   # seconds
"""

import argparse
import csv
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile

from tfdogs import files, models
from tfdogs.bench import end_to_end, measure, results
from tfdogs.bench.pytorch import probe_torch, run_torch
from tfdogs.bench.steps import (
    COLUMNS,
    PARTS,
    PHOTO_SIZE,
    TARGETS,
    TORCH_MODELS,
    Setting,
    jpeg_files,
    run_isolated,
    run_job,
    tensorflow_settings,
)
from tfdogs.training.devices import cpu_has_native_bfloat16


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
            job = dict(base, part=part, model=model, build=_buildable(model), workdir=str(workdir))
            if model in TORCH_MODELS:
                jobs += [("torch", dict(job, setting=name)) for name in ("fp32", "tuned")]
            jobs += [("tfdogs", dict(job, setting=dataclasses.asdict(setting))) for setting in settings_for(part)]
    return jobs


def model_name(value):
    """`--models` entries: one of `tfdogs.models.MODEL_NAMES` or ``keras_hub:PRESET``."""
    if not models.is_known(value):
        raise argparse.ArgumentTypeError(f"unknown model {value!r}; choose from {', '.join(models.MODEL_NAMES)} "
                                         "or keras_hub:PRESET (a keras-hub preset name, handle or local folder)")
    return value


def _buildable(model):
    """The name to build: a local keras-hub preset folder made absolute, for measurements in another directory."""
    if models.is_hub_name(model) and os.path.isdir(os.path.expanduser(models.preset_of(model))):
        return models.hub.PREFIX + os.path.abspath(os.path.expanduser(models.preset_of(model)))
    return model


def _short(model):
    """A model name fit for a table column: ``keras_hub:/a/b/efficientnet_b0`` -> ``keras_hub-efficientnet_b0``."""
    return models.file_name(model) if model else ""


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
            print(f"  {job['part']:<9} {_short(job.get('model')):<8} {framework:<6} {_setting_name(job):<24} "
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
            "parameters": runs[0].get("parameters"),
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
    header = ("part", "model", "framework", "setting", "img/s", "spread %", "peak MB", "params M",
              "x torch", "x tuned", "target", "met")
    lines = [[row["part"], _short(row["model"]), row["framework"], row["setting"],
              _format(row["images_per_second"]), _format(row["spread_percent"], 0), _format(row["peak_rss_mb"], 0),
              _format(row["parameters"] / 1e6 if row.get("parameters") else None, 2),
              _format(row["ratio_vs_torch"], 2), _format(row["ratio_vs_torch_tuned"], 2),
              _format(row["target"]), _format(row["target_met"])] for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    text = [torch_note, ""]
    if any(models.is_hub_name(row["model"]) for row in rows):
        text[1:1] = [("keras_hub rows: tfdogs alone (PyTorch has no counterpart), so no ratios; built from the "
                      "preset's architecture with fresh weights.")]
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
            "cpu_bfloat16": cpu_has_native_bfloat16(), "tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version()}


def whole_commands(args):
    """`--end-to-end`: both training commands timed from the outside; prints and writes the table."""
    if not args.data_dir:
        sys.exit("error: --end-to-end needs --data-dir: the photos both training commands train on.")
    versions, reason = probe_torch(args.torch_python)
    if versions is None:
        sys.exit(f"error: --end-to-end needs torch and torchvision in --torch-python ({reason}).")
    try:
        rows = end_to_end.run_end_to_end(args.data_dir, args.torch_python, max(args.repeats, 1), jobs=args.jobs,
                                         workdir=args.end_to_end_dir)
    except FileExistsError as error:
        sys.exit(f"error: {error}")
    print(results.format_markdown(rows))
    scores = results.format_scores_markdown(rows)
    if scores:
        print(f"\nScored jobs, mean (min-max) over {max(args.repeats, 1)} repeats, repeat r with seed r:\n{scores}")
    output = pathlib.Path(f"{args.output}-end-to-end.json")
    files.write_json({"environment": environment_report(), "torch": versions, "rows": rows,
                      "load_average_after": os.getloadavg()}, output)
    print(f"\nWritten: {output}")
    return rows


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default in its help, and the examples laid out as written."""


def build_parser():
    """The command line's flags, in groups; `--help` ends with the examples of this module's docstring."""
    parser = argparse.ArgumentParser(prog="python -m tfdogs.bench", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__[__doc__.index("Examples:"):], formatter_class=_HelpFormatter)
    measured = parser.add_argument_group("what is measured")
    pipeline = parser.add_argument_group("the input pipeline's photos")
    timing = parser.add_argument_group("timing")
    pytorch = parser.add_argument_group("the PyTorch side")
    whole = parser.add_argument_group("whole training commands")
    output = parser.add_argument_group("output")
    measured.add_argument("--models", nargs="+", default=list(TORCH_MODELS), type=model_name, metavar="MODEL",
                        help="lenet5, resnet18, resnet34 or keras_hub:PRESET (tfdogs alone: no PyTorch counterpart)")
    measured.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    measured.add_argument("--image-size", type=int, default=224)
    measured.add_argument("--batch-size", type=int, default=32)
    measured.add_argument("--num-classes", type=int, default=120)
    pipeline.add_argument("--data-dir", help="JPEGs for the pipeline (Kaggle or class-folder layout); "
                        f"default: generated {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} photo-like JPEGs")
    pipeline.add_argument("--workers", type=int, default=2, help="DataLoader workers = tf.data threads")
    pipeline.add_argument("--crop-scale-min", type=float, default=0.25, help="random-resized-crop area range low")
    timing.add_argument("--warmup-steps", type=int, default=2)
    timing.add_argument("--window-steps", type=int, default=3)
    timing.add_argument("--windows", type=int, default=5)
    timing.add_argument("--repeats", type=int, default=1, help="run everything this often; report medians")
    pytorch.add_argument("--torch-python", default=os.environ.get("TFDOGS_TORCH_PYTHON", sys.executable),
                        help="Python with torch and torchvision (env TFDOGS_TORCH_PYTHON)")
    pytorch.add_argument("--no-torch", action="store_true", help="measure tfdogs alone")
    timing.add_argument("--in-process", action="store_true",
                        help="measure TensorFlow rows in this process (faster; memory peaks less clean, "
                        "settings' environment variables ignored)")
    output.add_argument("--output", default="benchmark", help="writes OUTPUT.csv and OUTPUT.json")
    whole.add_argument("--end-to-end", action="store_true",
                        help="instead of the parts: whole training commands, python -m tfdogs.train against "
                        "benchmarks/torch_train.py on --data-dir (required), timed as processes and alternated "
                        "--repeats times (tfdogs.bench.end_to_end); writes OUTPUT-end-to-end.json")
    whole.add_argument("--jobs", nargs="+", choices=end_to_end.JOB_NAMES, metavar="JOB",
                        help="--end-to-end: only these jobs (default: all): " + ", ".join(end_to_end.JOB_NAMES))
    whole.add_argument("--end-to-end-dir", help="--end-to-end: keep every run and its log here; a folder "
                        "holding these jobs' runs already is refused (default: a temporary folder, removed)")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: one isolated measurement
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None):
    """Command-line entry point; returns the rows it measured (or prints one job's result)."""
    args = parse_args(argv)
    if args.job:
        print(json.dumps(run_job(json.loads(args.job))))
        return None
    if args.end_to_end:
        return whole_commands(args)
    import tensorflow as tf

    report = {"environment": environment_report(), "settings": {
        key: value for key, value in vars(args).items() if key not in ("job", "output")}}
    torch_versions, reason = (None, "--no-torch") if args.no_torch else probe_torch(args.torch_python)
    torch_note = (f"PyTorch: {torch_versions} ({args.torch_python})" if torch_versions
                  else f"PyTorch absent ({reason}): tfdogs measured alone, no ratios.")
    report["torch"] = torch_versions or f"PyTorch absent: {reason}"
    print(torch_note, file=sys.stderr)
    has_gpu, bfloat16 = bool(tf.config.list_physical_devices("GPU")), cpu_has_native_bfloat16()

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
