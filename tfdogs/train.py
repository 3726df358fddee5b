"""`python -m tfdogs.train`: the study's experiment end to end.

Loads labelled dog photos, splits them (stratified, seeded), trains LeNet-5,
ResNet-18/34 or EfficientNet-Lite0/1/2 with a transfer strategy, and writes a run folder:

    config.yaml    the resolved settings (re-run with --config RUN/config.yaml)
    problems.csv   every bad file or labels.csv row, and whether it was skipped,
                   converted (the copy is in converted/) or kept (see tfdogs.check)
    split.csv      which photo went to training and which to validation
    history.csv    per-epoch loss, accuracy, top-5, log loss, learning rate
    metrics.json   validation scores of the best epoch, the trivial baselines
                   (and the untrained ImageNet classifier's, also in zeroshot.json)
    curves.png     loss and accuracy, training against validation
    model.keras    the best model (plain Keras layers: loads without tfdogs)
    best.weights.h5, tensorboard/, backup/ (resume state while training)

and a SavedModel for TF Serving under `saved_models/<run name>/<version>/` (a run
folder outside `runs/` adds 8 hex digits of its path to the name: one export folder per run).

Examples:
    python -m tfdogs.train --model efficientnet_lite0 --data-dir path/to/photos
    python -m tfdogs.train --config configs/resnet18.yaml --data-dir path/to/dog-breed-identification
    python -m tfdogs.train --model lenet5 --data synthetic --epochs 5 --image-size 64

Running the same command (same --output) after an interruption, even kill -9,
resumes from the last finished epoch; checkpoints, the model and the export
are written under temporary names and renamed, so a kill never leaves a
corrupt file where a good one was.
"""

import argparse
import atexit
import json
import os
import sys

from tfdogs import config as config_lib, data, lock, models, weights
from tfdogs.runs import folds
from tfdogs.runs.folder import RunFolderError
from tfdogs.training.cluster import PEER_TIMEOUT_VARIABLE, ClusterError, PeerLost, rejoin
from tfdogs.training.interruption import signals_interrupt, stopped
from tfdogs.training.loop import train
from tfdogs.training.phases import TrainingError
from tfdogs.training.prepare import output_folders
from tfdogs.training.resume import resume_epoch


def build_parser():
    """Every config key as a flag, in groups; `--help` ends with the examples of this module's docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m tfdogs.train", description=__doc__.split("\n\n")[0],
        usage="python -m tfdogs.train [--config FILE] [--KEY VALUE ...]",
        epilog=__doc__[__doc__.index("Examples:"):__doc__.index("\n\nRunning")],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_arguments(parser)
    return parser


def main(argv=None):
    """Command-line entry point: parses flags, trains, prints where everything went."""
    args = build_parser().parse_args(argv)
    command = ["python", "-m", "tfdogs.train", *(sys.argv[1:] if argv is None else argv)]
    config = run_dir = export_dir = None
    try:
        with signals_interrupt():
            config = config_lib.resolve(args)
            run_dir, export_dir = output_folders(config)
            if not config["output"]:  # the timestamped default: resuming must name it
                command += ["--output", str(run_dir)]
            if config["folds"] > 1:  # K runs, their out-of-fold scores and one ensemble export
                run_dir = folds.run_folds({**config, "output": str(run_dir)})
                print(f"\nK-fold folder: {run_dir} (fold-1 ... fold-{config['folds']}, oof.csv, folds.json)")
                print(folds.summary_line(json.loads((run_dir / folds.FOLDS_FILE).read_text())))  # the last line
                return 0
            run_dir = train({**config, "output": str(run_dir)})  # the export folder follows from it
    except PeerLost as error:  # every surviving worker starts again and waits for the lost one
        print(f"error: {error} Running the same command again to wait for it and resume from the last backed-up "
              f"epoch (up to {PEER_TIMEOUT_VARIABLE} seconds).", file=sys.stderr)
        atexit._run_exitfuncs()  # exec skips them: this worker's temporary folders go now
        rejoin()
    except (config_lib.ConfigError, data.DataError, weights.WeightsError, models.PresetError, TrainingError,
            ClusterError, lock.LockedError, RunFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: one line, not a traceback
        kept = resume_epoch(run_dir) if run_dir else 0
        return stopped(stop, command, run_dir, export_dir, config and config["epochs"], kept)
    if run_dir is None:
        print(f"\nThis worker's part is done; the chief writes the run folder ({config['output']}) and the export.")
        return 0
    summary = json.loads((run_dir / "metrics.json").read_text())
    val = summary["val"]
    print(f"\nRun folder: {run_dir}\nSavedModel: {summary['export']}\n"
          f"Validation (best epoch {summary['best_epoch']}): accuracy {val['accuracy']:.4f}, "
          f"top-5 {val['top5_accuracy']:.4f}, log loss {val['log_loss']:.4f} "
          f"(random guess {summary['baselines']['random_guess']['accuracy']:.4f}, most frequent breed "
          f"{summary['baselines']['most_frequent']['accuracy']:.4f})")
    calibrated = summary.get("val_calibrated")
    if calibrated:
        print(f"Calibrated (temperature {calibrated['temperature']:.3f}, fitted on the same validation split; "
              f"model.keras and the SavedModel serve it): log loss {calibrated['log_loss']:.4f}, "
              f"expected calibration error {val['ece']:.4f} -> {calibrated['ece']:.4f}")
    seconds = summary["seconds"]
    parts = [f"{name.replace('_', ' ')} {value:.1f} s" if not isinstance(value, dict) else
             "phases " + ", ".join(f"{phase} {phase_seconds:.1f} s" for phase, phase_seconds in value.items())
             for name, value in seconds.items() if name != "total"]
    print(f"Time: {'; '.join(parts)}; total {seconds['total']:.1f} s")  # the last line
    return 0


def run_command(argv=None):
    """The command as a function: `main`, returning its exit status; the caller's process goes on."""
    return main(argv)


def exit_now(status):
    """Ends `python -m tfdogs.train` at once with `status`, its output flushed and its atexit work done.

    What a normal exit adds after that is the interpreter tearing down
    TensorFlow's modules and threads: about 0.8 s on the 2-core machines
    these numbers come from, once the run has written everything. Only the
    `python -m` entry point ends this way; errors that escape `main` (and
    argparse's own exits) end the process the usual way.
    """
    atexit._run_exitfuncs()  # e.g. a worker's temporary folders; logging's flush
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_now(run_command())
