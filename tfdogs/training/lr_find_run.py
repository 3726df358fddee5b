"""The learning-rate finder as a job: a run's config, photos, model and phase, swept, and the curve written.

`find_learning_rate` reads like `loop.train`'s first steps: the photos
checked and split, the run's network and weights built, its phase set up
(which variables train, their rate factors, BatchNorm), its optimizer built
on the sweep's rates (`lr_finder`), then `lr_find.csv`, `lr_find.png` and
`lr_find.json` written.
"""

import csv
import dataclasses
import math
import pathlib
import random
import shutil

import keras
import numpy as np

from tfdogs import config as config_lib, files, weights
from tfdogs.evaluation import plots
from tfdogs.training.devices import resolve_runtime
from tfdogs.training.loop import build_model
from tfdogs.training.lr_finder import (
    DIVERGENCE,
    SMOOTHING,
    ExponentialRate,
    left_as_found,
    process_state_kept,
    sweep_rates,
)
from tfdogs.training.optimizer import make_optimizer, training_loss
from tfdogs.training.phases import configure_phase, plan_phases
from tfdogs.training.prepare import build_datasets, load_data

PHASES = {"head": "head", "whole": "all"}  # --phase -> `plan_phases`' name
HEAD_WEIGHTS = "phase-head.weights.h5"  # what a fine-tune run's head phase ends with (loop.train)
CSV_FILE, PLOT_FILE, SUMMARY_FILE = "lr_find.csv", "lr_find.png", "lr_find.json"


@dataclasses.dataclass(frozen=True)
class Finding:
    """A finished sweep: its result, the suggestion, the phase swept and where the files went."""

    result: object  # lr_finder.SweepResult
    suggestion: object  # lr_finder.Suggestion
    phase: str
    output: pathlib.Path


def choose_phase(config, which=None):
    """The strategy's phase to sweep: "head" or "whole" (None: the strategy's first phase).

    Raises:
        ConfigError: a phase the strategy does not have, naming those it has.
    """
    phases = {phase.name: phase for phase in plan_phases({**config, "finetune_image_size": None})}
    if which is None:
        which = "head" if "head" in phases else "whole"
    if PHASES.get(which) not in phases:
        have = " and ".join(name for name, planned in PHASES.items() if planned in phases)
        raise config_lib.ConfigError(f"--phase {which}: strategy {config['strategy']} trains the {have} phase only"
                                     + (" (head_epochs is 0)" if config["strategy"] == "fine-tune" else "") + ".")
    return which, phases[PHASES[which]]


def sweep_model(model, config, phase, batches, sweep, jit_compile=False):
    """Sweeps `model` in a phase of a run, with the run's optimizer, loss and weight decay; puts it back after.

    Args:
        model: a built Keras model (its weights, BatchNorm statistics, dropout states and layer settings are
            put back afterwards, `lr_finder.left_as_found`).
        config: a validated config (optimizer, momentum, weight decay, label smoothing, freeze_bn, strategy).
        phase: a `phases.Phase`: which stages train and at which rate factors.
        batches: (images, labels) training batches, at least `sweep.steps` of them.
        sweep: a `lr_finder.Sweep`.
        jit_compile: XLA for the step.

    Returns:
        A `lr_finder.SweepResult`.
    """
    with left_as_found(model):
        factors = configure_phase(model, phase, config["freeze_bn"] and config["strategy"] != "scratch")
        optimizer = make_optimizer(config["optimizer"], ExponentialRate(sweep.start_rate, sweep.end_rate, sweep.steps),
                                   config["momentum"], factors, config["weight_decay"])
        return sweep_rates(model, batches, optimizer, training_loss(config), sweep, jit_compile)


def find_learning_rate(config, sweep, output, phase=None, from_run=None):
    """Runs the learning-rate finder on a run's training photos, model, weights, phase and augmentation.

    Args:
        config: a config mapping (validated here); its seed fixes the photos' split, crops and the model's
            random start, so two calls give the same curve.
        sweep: a `lr_finder.Sweep`.
        output: folder for the data check's files, `lr_find.csv`, `lr_find.png` and `lr_find.json`.
        phase: "head", "whole" or None (the strategy's first phase).
        from_run: a finished run's folder: its split, and for phase "whole" its head phase's weights
            (`phase-head.weights.h5`), where that run's whole-network phase started. Without it, "whole" starts
            from the checkpoint with a new classifier, as a fine-tune run with head_epochs 0 does.

    Returns:
        A `Finding`. Python's and NumPy's random states and the dtype policy are left as they were.
    """
    config = config_lib.validate(config)
    weights.require_installed(config["weights"], config["model"])
    which, planned = choose_phase(config, phase)
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    start_weights = start_from_run(from_run, output, which)
    records, train_indices, val_indices = load_data(config, output)
    runtime = resolve_runtime(config)
    steps_per_epoch = len(train_indices) // config["batch_size"]
    if config["steps_per_epoch"]:
        steps_per_epoch = min(steps_per_epoch, config["steps_per_epoch"])
    if steps_per_epoch == 0:
        raise config_lib.ConfigError(f"Config key 'batch_size' is {config['batch_size']}, larger than the "
                                     f"{len(train_indices)} training images; lower it.")
    preprocessing = weights.resolve_preprocessing(config["weights"], config["model"], config["image_size"],
                                                  config["weights_preprocessing"])
    train_epochs, _ = build_datasets(config, records, train_indices, val_indices, preprocessing,
                                     steps_per_epoch=steps_per_epoch)
    batches = train_epochs(0, math.ceil(sweep.steps / steps_per_epoch))
    with process_state_kept():
        random.seed(config["seed"])  # the model's random start and dropout seeds, as `loop.train` seeds them
        np.random.seed(config["seed"])
        keras.mixed_precision.set_dtype_policy(runtime["precision"])
        model = build_model(config, len(records.class_names), None if start_weights else config["weights"],
                            records.class_names)
        keras.mixed_precision.set_dtype_policy("float32")
        if start_weights:
            model.load_weights(start_weights)
        result = sweep_model(model, config, planned, batches, sweep, runtime["jit_compile"])
    suggestion = result.suggestion()
    write_finding(result, suggestion, output, config, sweep, which)
    return Finding(result=result, suggestion=suggestion, phase=which, output=output)


def start_from_run(run_dir, output, which):
    """With a finished run: its split copied into `output` (the data check then keeps it) and, for the whole
    phase, the path of its head phase's final weights; else None.

    Raises:
        ConfigError: a run without a split, or without head-phase weights for the whole phase.
    """
    if run_dir is None:
        return None
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "split.csv").is_file():
        raise config_lib.ConfigError(f"--from-run {run_dir}: no split.csv there; is it a run folder?")
    if (run_dir / "split.csv").resolve() != (output / "split.csv").resolve():
        shutil.copyfile(run_dir / "split.csv", output / "split.csv")
    if which != "whole":
        return None
    head = run_dir / HEAD_WEIGHTS
    if not head.is_file():
        raise config_lib.ConfigError(f"--from-run {run_dir} --phase whole: {HEAD_WEIGHTS} is missing, so its head "
                                     f"phase did not finish (or it trained no head phase).")
    return head


def write_finding(result, suggestion, output, config, sweep, which):
    """`lr_find.csv` (step, rate, loss, smoothed loss), `lr_find.png` and `lr_find.json` (settings, rule, result)."""
    def write_rows(temporary):
        with open(temporary, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["step", "rate", "loss", "smoothed_loss"])
            for step, row in enumerate(zip(result.rates, result.losses, result.smoothed)):
                writer.writerow([step, *(repr(float(value)) for value in row)])

    files.replace_into(output / CSV_FILE, write_rows)
    plots.plot_rate_sweep(result.rates, result.losses, result.smoothed, suggestion, output / PLOT_FILE,
                          title=f"{config['model']}, {config['strategy']}, {which} phase")
    files.write_json({
        "phase": which, "sweep": dataclasses.asdict(sweep), "steps_run": len(result.rates), "stopped": result.stopped,
        "rule": f"loss smoothed by a debiased moving average (beta {SMOOTHING}); stop when the smoothed loss "
                f"exceeds {DIVERGENCE:g} times its lowest or a loss is not finite",
        "suggested": suggestion.steepest, "minimum_rate": suggestion.minimum,
        "tenth_of_minimum": suggestion.minimum / 10, "how": suggestion.describe(),
        "config": config}, output / SUMMARY_FILE)
