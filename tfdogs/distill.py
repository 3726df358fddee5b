"""`python -m tfdogs.distill`: one small student trained on a run's or an ensemble's softened probabilities.

An ensemble of members at different input sizes cannot share one TFLite
input; a distilled student is one network at one size, exported like any run.
The teacher's probabilities of each training photo (of the split the members
share) are computed once, on the evaluation crop, softened with --temperature,
and the student trains on alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha)
* cross-entropy with the labels (`tfdogs.training.distillation`). The same
student trained on the labels alone is the comparison (--no-baseline: skipped).

Writes the distillation folder (`--output`, default runs/distill-<timestamp>):

    teacher.npz    the teacher's probabilities of each training photo
    student/       the student: an ordinary run folder (model.keras, metrics.json, ...), config `teacher` set
    labels-only/   the same student on the labels alone
    distill.json   teacher, student and labels-only student on the same validation photos: accuracy,
                   log loss, ECE; the students' parameters, SavedModel bytes and images/s

and their SavedModels under OUTPUT/saved_models/.

Examples:
    python -m tfdogs.distill runs/ensemble-lite0 --model efficientnet_lite0 --output runs/distill-lite0
    python -m tfdogs.distill runs/resnet34-a --model efficientnet_lite0 --epochs 6 --temperature 4 --alpha 0.9
"""

import argparse
import datetime
import pathlib
import sys

from tfdogs import config as config_lib, data, lock, weights
from tfdogs.runs.distill import distill
from tfdogs.runs.folder import RunFolderError
from tfdogs.training.phases import TrainingError
from tfdogs.training.interruption import stops_in_one_line


def build_parser():
    """The command line's flags; `--help` ends with the examples of this module's docstring."""
    parser = argparse.ArgumentParser(prog="python -m tfdogs.distill", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__[__doc__.index("Examples:"):],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", metavar="TEACHER", help="a run folder or an ensemble folder")
    parser.add_argument("--model", default="efficientnet_lite0", help="the student's network")
    parser.add_argument("--weights", default="auto", help="the student's starting weights (as train's --weights)")
    parser.add_argument("--epochs", type=int, default=6, help="the student's epochs")
    parser.add_argument("--image-size", type=int, default=224, help="the student's input size")
    parser.add_argument("--temperature", type=float, default=2.0,
                        help="T softening teacher and student (default 2: softer than 1 without flattening 10 breeds)")
    parser.add_argument("--alpha", type=float, default=0.5, help="the teacher term's weight, 0-1 (default 0.5)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the labels-only student")
    parser.add_argument("--output", help="distillation folder (default runs/distill-<timestamp>)")
    return parser


def table(summary):
    """The three models' scores as Markdown rows."""
    rows = ["| model | accuracy | log loss | ECE | parameters | SavedModel MB | images/s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("teacher", "student", "labels_only"):
        if name in summary:
            facts = summary[name]
            size = f"{facts['saved_model_bytes'] / 1e6:.1f}" if "saved_model_bytes" in facts else ""
            speed = f"{facts['images_per_second']:.1f}" if "images_per_second" in facts else ""
            rows.append(f"| {name} | {100 * facts['val']['accuracy']:.1f} % | {facts['val']['log_loss']:.4f} | "
                        f"{facts['val']['ece']:.4f} | {facts['parameters']:,} | {size} | {speed} |")
    return "\n".join(rows)


@stops_in_one_line
def main(argv=None):
    """Command-line entry point: distils, prints the three models' scores."""
    args = build_parser().parse_args(argv)
    output = pathlib.Path(args.output or pathlib.Path("runs") / f"distill-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    overrides = {"model": args.model, "weights": args.weights, "epochs": args.epochs, "image_size": args.image_size}
    try:
        summary = distill(args.teacher, output, overrides, temperature=args.temperature, alpha=args.alpha,
                          baseline=not args.no_baseline)
    except (RunFolderError, config_lib.ConfigError, data.DataError, weights.WeightsError, TrainingError,
            lock.LockedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\nValidation, {summary['num_val']} photos (T {args.temperature}, alpha {args.alpha}):\n\n{table(summary)}"
          f"\n\nDistillation folder: {output} ({output / 'distill.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
