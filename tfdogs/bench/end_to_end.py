"""Whole training commands timed from the outside: `python -m tfdogs.train` against an expert PyTorch script.

`tfdogs.bench` measures parts (the input pipeline, a training step, inference)
from inside; this module measures what a user waits for: each command from
process start to exit (imports, data check, every epoch with its validation,
saving and exporting included), timed with `time.perf_counter` around
`subprocess.run`. The PyTorch side is `benchmarks/torch_train.py`, run with an
interpreter of its own (`torch_python`), since torchvision cannot be imported
beside the project's torch.

The two jobs of issue 15, on the same photo folder:

    resnet18-scratch          ResNet-18 from random weights, 6 epochs
    resnet18-feature-extract  ResNet-18 from a checkpoint, backbone frozen, 10 epochs

Both sides start the second job from the same random torchvision-format
ResNet-18 checkpoint (`write_random_checkpoint`), since nothing may be
downloaded. The commands run alternated (tfdogs, torch, tfdogs, torch, ...) so
that drift in the machine's load hits both sides alike, each repeat into fresh
output folders so that no run resumes another.

Command line (about 3 minutes a repeat on two cores at 224 px on dogs10):

    python -m tfdogs.bench --end-to-end --data-dir shared/data/dogs10 --torch-python venv-bench/bin/python \\
        --repeats 3
"""

import dataclasses
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]
TORCH_SCRIPT = REPOSITORY / "benchmarks" / "torch_train.py"
# Stands in an argv for the repeat number, so that every repeat writes into folders of its own.
REPEAT = "{repeat}"
SIDES = ("tfdogs", "torch")


class CommandFailed(RuntimeError):
    """A timed command exited with a non-zero status or ran past its time limit."""


@dataclasses.dataclass(frozen=True)
class CommandPair:
    """One job done both ways: the tfdogs command and the PyTorch command, as argv lists.

    Either argv may hold `REPEAT`, replaced by the repeat number (0, 1, ...) when it runs.
    """

    name: str
    tfdogs: tuple
    torch: tuple


def write_random_checkpoint(torch_python, path, seed=0):
    """Saves a randomly initialised torchvision ResNet-18 state dict (1000 classes) to `path`, with torch.

    Args:
        torch_python: a Python interpreter that has torch and torchvision.
        path: the `.pth` file to write.
        seed: torch's seed for the initialisation.

    Returns:
        `path`, as a `pathlib.Path`.
    """
    script = ("import sys, torch, torchvision; torch.manual_seed(int(sys.argv[2])); "
              "torch.save(torchvision.models.resnet18(weights=None).state_dict(), sys.argv[1])")
    command = [str(torch_python), "-c", script, str(path), str(seed)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise CommandFailed(f"Writing the random ResNet-18 checkpoint failed (exit status {done.returncode}): "
                            f"{shlex.join(command)}\n{done.stderr[-3000:]}")
    return pathlib.Path(path)


def end_to_end_jobs(data_dir, workdir, torch_python, *, checkpoint=None, tfdogs_python=sys.executable,
                    scratch_epochs=6, feature_extract_epochs=10, batch_size=32, image_size=224, seed=0):
    """The command pairs of the jobs: ResNet-18 from scratch, and feature extraction from a checkpoint.

    Feature extraction runs twice on the tfdogs side: every epoch through the
    frozen backbone as the PyTorch script does, and on cached backbone features
    (`--feature-views 1`, `tfdogs.training.features`), against the same
    PyTorch command.

    Both sides get the same photos, split (seed, 20 % of each breed), batch,
    image size, epochs, optimizer (AdamW, rate 1e-3 with cosine decay, decay
    0.01 off biases and BatchNorm), head dropout (0.2) and smallest crop area
    (0.25). tfdogs runs with early stopping off, so that it trains every epoch
    the PyTorch script trains; it keeps its other defaults (its extra
    augmentation, the data check, calibration, the SavedModel export), since
    the point is the whole command as a user runs it.

    Args:
        data_dir: the photos, Kaggle or class-folder layout.
        workdir: folder for every run's output (`<side>-<job>-r<repeat>`).
        torch_python: the interpreter that runs `benchmarks/torch_train.py`.
        checkpoint: torchvision ResNet-18 `.pth` both sides start the feature
            extraction from; default `workdir/resnet18-random.pth` (see
            `write_random_checkpoint`).
        tfdogs_python: the interpreter that runs `python -m tfdogs.train`.
        scratch_epochs, feature_extract_epochs: epochs of each job.
        batch_size, image_size, seed: as the flags of both commands.

    Returns:
        A list of three `CommandPair`s, whose output folders hold `REPEAT`.
    """
    workdir = pathlib.Path(workdir).resolve()  # absolute: the commands may run in another folder
    checkpoint = pathlib.Path(checkpoint).resolve() if checkpoint else workdir / "resnet18-random.pth"
    common = ["--data-dir", str(pathlib.Path(data_dir).resolve()), "--batch-size", str(batch_size),
              "--image-size", str(image_size), "--seed", str(seed)]
    jobs = [("resnet18-scratch", "scratch", None, scratch_epochs, ()),
            ("resnet18-feature-extract", "feature-extract", checkpoint, feature_extract_epochs, ()),
            ("resnet18-feature-extract-cached", "feature-extract", checkpoint, feature_extract_epochs,
             ("--feature-views", "1"))]
    pairs = []
    for name, strategy, start_from, epochs, extra in jobs:
        run_dir = workdir / f"tfdogs-{name}-r{REPEAT}"
        tfdogs = [str(tfdogs_python), "-m", "tfdogs.train", "--model", "resnet18", "--strategy", strategy,
                  "--weights", str(start_from or "none"), *common, "--epochs", str(epochs), "--optimizer", "adamw",
                  "--early-stopping-patience", "0", "--output", str(run_dir), "--export-dir", f"{run_dir}-export",
                  "--verbose", "2", *extra]
        torch = [str(torch_python), str(TORCH_SCRIPT), "--strategy", strategy,
                 *(["--weights", str(start_from)] if start_from else []), *common, "--epochs", str(epochs),
                 "--crop-scale-min", "0.25", "--output", str(workdir / f"torch-{name}-r{REPEAT}")]
        pairs.append(CommandPair(name, tuple(tfdogs), tuple(torch)))
    return pairs


def expand(argv, repeat):
    """`argv` with `REPEAT` replaced by the repeat number."""
    return [str(part).replace(REPEAT, str(repeat)) for part in argv]


def time_commands(pairs, repeats, *, cwd=None, env=None, timeout=None, log=sys.stderr, output_dir=None):
    """Runs every pair's two commands `repeats` times, alternated, and times each from the outside.

    The order is, for each repeat, for each pair: its tfdogs command, then its
    torch command. Each command's wall time is `time.perf_counter` around
    `subprocess.run`, its output captured.

    Args:
        pairs: `CommandPair`s (e.g. from `end_to_end_jobs`).
        repeats: how many times to run each command.
        cwd, env: the commands' working folder and environment (default: this process's).
        timeout: seconds one command may take; None: no limit.
        log: where to write one line per finished command; None: silent.
        output_dir: where to keep each command's stdout and stderr, as
            `<job>-<side>-r<repeat>.log` (the PyTorch script's last line holds its own
            timings, tfdogs' run folder its `metrics.json`); None: not kept.

    Returns:
        One dict per command run, in order: job, side, repeat, seconds, command.

    Raises:
        CommandFailed: a command exited with a non-zero status or timed out;
            the message names the job, the side, the command and the end of its stderr.
    """
    rows = []
    for repeat in range(repeats):
        for pair in pairs:
            for side in SIDES:
                command = expand(getattr(pair, side), repeat)
                where = f"{pair.name} ({side}, repeat {repeat + 1} of {repeats})"
                started = time.perf_counter()
                try:
                    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env,
                                          timeout=timeout)
                except subprocess.TimeoutExpired as error:
                    raise CommandFailed(f"{where} ran past {timeout} s: {shlex.join(command)}\n"
                                        f"{_tail(error.stderr)}") from None
                seconds = time.perf_counter() - started
                if output_dir is not None:
                    pathlib.Path(output_dir, f"{pair.name}-{side}-r{repeat}.log").write_text(
                        f"$ {shlex.join(command)}\n{done.stdout}\n--- stderr ---\n{done.stderr}")
                if done.returncode:
                    raise CommandFailed(f"{where} failed with exit status {done.returncode}: "
                                        f"{shlex.join(command)}\n{_tail(done.stderr)}")
                rows.append({"job": pair.name, "side": side, "repeat": repeat, "seconds": seconds,
                             "command": shlex.join(command)})
                if log is not None:
                    print(f"  {where}: {seconds:.1f} s", file=log, flush=True)
    return rows


def _tail(stderr, characters=3000):
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    stderr = (stderr or "").rstrip()
    return f"--- end of its stderr ---\n{stderr[-characters:]}" if stderr else "(nothing on stderr)"


def summarise(rows):
    """Per job: median seconds of each side, every repeat's seconds, and torch / tfdogs (> 1: tfdogs faster).

    Args:
        rows: the rows `time_commands` returns.

    Returns:
        One dict per job, in the order the jobs first ran: job, tfdogs_seconds,
        torch_seconds (medians), tfdogs_runs, torch_runs (seconds of each repeat)
        and ratio (torch_seconds / tfdogs_seconds).
    """
    jobs = {}
    for row in rows:
        jobs.setdefault(row["job"], {side: [] for side in SIDES})[row["side"]].append(row["seconds"])
    summary = []
    for job, runs in jobs.items():
        medians = {side: statistics.median(runs[side]) if runs[side] else None for side in SIDES}
        ratio = medians["torch"] / medians["tfdogs"] if medians["torch"] and medians["tfdogs"] else None
        summary.append({"job": job, "tfdogs_seconds": medians["tfdogs"], "torch_seconds": medians["torch"],
                        "tfdogs_runs": runs["tfdogs"], "torch_runs": runs["torch"], "ratio": ratio})
    return summary


def format_markdown(summary):
    """The `summarise` rows as a markdown table."""
    def seconds(values):
        return ", ".join(f"{value:.1f}" for value in values)

    lines = ["| job | tfdogs s (median) | torch s (median) | torch / tfdogs | tfdogs runs s | torch runs s |",
             "| --- | ---: | ---: | ---: | --- | --- |"]
    for row in summary:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"| {row['job']} | {row['tfdogs_seconds']:.1f} | {row['torch_seconds']:.1f} | {ratio} "
                     f"| {seconds(row['tfdogs_runs'])} | {seconds(row['torch_runs'])} |")
    return "\n".join(lines)


def run_end_to_end(data_dir, torch_python, repeats=3, *, workdir=None, cwd=None, **job_settings):
    """Writes the shared checkpoint, runs both jobs alternated `repeats` times, and summarises.

    Args:
        data_dir: the photos, Kaggle or class-folder layout.
        torch_python: an interpreter with torch and torchvision.
        repeats: runs of each command.
        workdir: where the runs and their logs are written (kept); default a temporary folder,
            removed afterwards.
        cwd: the commands' working folder (default: this process's).
        **job_settings: passed to `end_to_end_jobs` (epochs, batch_size, image_size, seed, tfdogs_python).

    Returns:
        The `summarise` rows.
    """
    with tempfile.TemporaryDirectory(prefix="tfdogs-end-to-end-") as temporary:
        workdir = pathlib.Path(workdir or temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint = write_random_checkpoint(torch_python, workdir / "resnet18-random.pth")
        pairs = end_to_end_jobs(data_dir, workdir, torch_python, checkpoint=checkpoint, **job_settings)
        return summarise(time_commands(pairs, repeats, cwd=cwd, output_dir=workdir))
