"""`python -m tfdogs.lr_find`: the learning rate to train with, read off a short sweep (the learning-rate finder).

Trains the run's network for one batch per rate, the rate growing
exponentially from --start-lr to --end-lr over --steps batches of the
training photos, with the run's weights, strategy phase (which variables
train, at which rate factors, with which optimizer and weight decay) and
augmentation: every `python -m tfdogs.train` flag means the same here. The
batch loss is smoothed by a debiased moving average (beta 0.98) and the sweep
stops once the smoothed loss exceeds 4 times its lowest (fastai's rule).

Examples:
    python -m tfdogs.lr_find --model efficientnet_lite0 --data-dir path/to/photos --strategy feature-extract
    python -m tfdogs.lr_find --from-run runs/efficientnet_lite0-20250101-120000 --phase whole
    python -m tfdogs.lr_find --model lenet5 --data synthetic --image-size 64 --steps 60 --end-lr 1

It writes OUTPUT/lr_find.csv (step, rate, loss, smoothed loss), lr_find.png
(the curve, log rate, the suggestion marked) and lr_find.json, and prints
the suggested --learning-rate: where the smoothed loss falls fastest, with a
tenth of the rate at its minimum beside it. For fine-tune's whole phase
(--phase whole) the whole network trains at --backbone-lr-factor times the
rate swept, as in training; the suggestion is the --learning-rate value.
"""

import argparse
import datetime
import pathlib
import sys

from tfdogs import config as config_lib, data, lock, models, weights
from tfdogs.training.interruption import stops_in_one_line
from tfdogs.training.lr_find_run import PHASES, find_learning_rate
from tfdogs.training.lr_finder import Sweep
from tfdogs.training.phases import TrainingError

# A run's recorded keys that name its own folders, not the finder's.
RUN_FOLDER_KEYS = ("output", "export_dir")


def build_parser():
    """`python -m tfdogs.train`'s flags (every config key, `--config`) and the sweep's own."""
    parser = argparse.ArgumentParser(
        prog="python -m tfdogs.lr_find", description=__doc__.split("\n\n")[0],
        usage="python -m tfdogs.lr_find [--config FILE | --from-run RUN] [--KEY VALUE ...] [--start-lr R] "
              "[--end-lr R] [--steps N] [--phase {head,whole}]",
        epilog=__doc__[__doc__.index("Examples:"):__doc__.index("\n\nIt writes")],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep = parser.add_argument_group("the sweep", "--output is the finder's folder (default "
                                                   "runs/lr_find-<model>-<timestamp>, or RUN/lr_find-<phase>)")
    sweep.add_argument("--start-lr", type=float, default=Sweep.start_rate, help="first rate (default: %(default)g)")
    sweep.add_argument("--end-lr", type=float, default=Sweep.end_rate, help="last rate (default: %(default)g)")
    sweep.add_argument("--steps", type=int, default=Sweep.steps,
                       help="batches, one per rate (default: %(default)s); fewer when the loss diverges")
    sweep.add_argument("--phase", choices=tuple(PHASES),
                       help="the strategy's phase: head (frozen backbone) or whole (fine-tune's second phase, "
                            "scratch, discriminative); default: the strategy's first")
    sweep.add_argument("--from-run", metavar="RUN",
                       help="a finished run: its settings (config.yaml; flags override), its split, and for "
                            "--phase whole its head phase's final weights, where its whole phase started. "
                            "Without it --phase whole starts from the checkpoint with a new classifier, as "
                            "fine-tune with --head-epochs 0 does")
    config_lib.add_arguments(parser)
    return parser


def resolve(args):
    """The config: defaults, then the run's config.yaml (with --from-run) or --config, then the flags."""
    config = dict(config_lib.DEFAULTS)
    if args.from_run and not args.config:
        recorded = config_lib.load_yaml(pathlib.Path(args.from_run) / "config.yaml")
        if recorded.get("data") == "synthetic":  # its generated photos are in the recorded data_dir
            recorded["data"] = None
        config.update({key: value for key, value in recorded.items() if key not in RUN_FOLDER_KEYS})
    elif args.config:
        config.update(config_lib.load_yaml(args.config))
    config.update({key: value for key, value in vars(args).items() if key in config_lib.DEFAULTS})
    return config_lib.validate(config)


def output_folder(args, config):
    if config["output"]:
        return pathlib.Path(config["output"])
    if args.from_run:
        return pathlib.Path(args.from_run) / f"lr_find-{args.phase or 'first'}"
    return pathlib.Path("runs") / f"lr_find-{models.file_name(config['model'])}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


@stops_in_one_line
def main(argv=None):
    """Command-line entry point: sweeps, writes the curve, prints the suggested rate."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sweep = Sweep(args.start_lr, args.end_lr, args.steps)
    except ValueError as error:
        parser.error(str(error))
    try:
        config = resolve(args)
        finding = find_learning_rate(config, sweep, output_folder(args, config), args.phase, args.from_run)
    except (config_lib.ConfigError, data.DataError, weights.WeightsError, models.PresetError, TrainingError,
            lock.LockedError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = finding.result
    print(f"Learning-rate sweep of the {finding.phase} phase ({config['model']}, {config['strategy']}, "
          f"{config['optimizer']}): {len(result.rates)} steps from {result.rates[0]:.3g} to {result.rates[-1]:.3g}; "
          f"{result.stopped}.")
    print(f"Curve: {finding.output / 'lr_find.csv'}, {finding.output / 'lr_find.png'}")
    print(f"{finding.suggestion.describe()[0].upper()}{finding.suggestion.describe()[1:]}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
