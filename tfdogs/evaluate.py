"""`python -m tfdogs.evaluate`: a finished run's (or ensemble's) scores, breed by breed.

Scores the run's best model (`model.keras`) on its own validation split (from
`split.csv`), or on another labelled data set with `--data-dir` (leaving out,
with a warning and a count, any photo with the same bytes as one the run
trained on), and writes to `RUN/evaluation/` (or `--output`). An ensemble folder (`tfdogs.ensemble`) is
scored the same way on the photos every member held out, its members'
probabilities averaged with its weights and its heat maps likewise:

    evaluation.json     accuracy, top-5 accuracy, Kaggle log loss, what was scored
    per_breed.csv       images, correct answers, accuracy and the most frequent wrong answer per breed
    confused_pairs.csv  the breed pairs mistaken for each other most often
    confusions.png      those pairs as bars, beside the confusion counts among their breeds
    report/index.html   a page of pictures: top-loss photos, confused pairs side by side, the whole
                        confusion matrix, per-breed accuracy, calibration, Grad-CAM heat maps and
                        predictions.csv (`tfdogs.evaluation.report`; --no-report leaves it out)

Fine-grained errors are the interesting ones: a model that mixes up Siberian
husky and malamute has learnt something; one that mixes up pug and borzoi has
not. `--tta N` is test-time augmentation: each image's softmax probabilities
are averaged over N views of it (`data.eval_views`): 2, the evaluation crop and
its mirror image; 10, the centre and four corner crops of the resized image,
each with its mirror image (a bare `--tta` means 2).

Examples:
    python -m tfdogs.evaluate runs/resnet18-20240101-120000
    python -m tfdogs.evaluate runs/ensemble-resnets --tta 10
    python -m tfdogs.evaluate runs/lenet --data-dir path/to/other/labelled/photos --output reports/lenet-other
"""

import argparse
import pathlib
import sys

import pandas as pd

from tfdogs import data, files, lock
from tfdogs.runs.evaluation import evaluate
from tfdogs.runs.folder import RunFolderError
from tfdogs.training.interruption import stops_in_one_line


def build_parser():
    """The command line's flags; `--help` ends with the examples of this module's docstring."""
    parser = argparse.ArgumentParser(prog="python -m tfdogs.evaluate", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__[__doc__.index("Examples:"):],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run folder (python -m tfdogs.train) or ensemble folder (tfdogs.ensemble)")
    parser.add_argument("--data-dir",
                        help="another labelled data set to score on (default: the run's validation split)")
    parser.add_argument("--tta", type=int, nargs="?", const=2, default=1, choices=sorted(data.TTA_VIEWS),
                        metavar="N", help="test-time augmentation: average the softmax probabilities of N views "
                        "of each image: 1 none, 2 the evaluation crop and its mirror (a bare --tta), 10 the centre "
                        "and four corner crops and their mirrors")
    parser.add_argument("--output", help="results folder (default RUN/evaluation)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--top-pairs", type=int, default=10, help="how many confused breed pairs to show")
    parser.add_argument("--no-report", action="store_true", help="leave out the picture report (report/index.html)")
    parser.add_argument("--verbose", type=int, choices=(0, 1), default=1,
                        help="1: a progress bar on a terminal for a few hundred photos or more")
    parser.add_argument("--calibrate", action="store_true",
                        help="refit the temperature on these images and report the calibrated scores too")
    return parser


@stops_in_one_line
def main(argv=None):
    """Command-line entry point: evaluates one run or ensemble and prints the scores and worst breeds."""
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(args.run_dir, data_dir=args.data_dir, tta=args.tta, output=args.output,
                          batch_size=args.batch_size, top_pairs=args.top_pairs, report=not args.no_report,
                          calibrate=args.calibrate, verbose=args.verbose)
    except (RunFolderError, data.DataError, files.ForeignFolderError, lock.LockedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    scores, output = result["scores"], pathlib.Path(result["output"])
    if result["excluded_training_photos"]:
        print(f"warning: left out {result['excluded_training_photos']} photos of {args.data_dir} that the run "
              f"trained on (same bytes as photos in its split.csv); scored the other {result['num_images']}.",
              file=sys.stderr)
    views = f" with {result['tta']}-view TTA" if result["tta"] > 1 else ""
    print(f"{result['data']}{views}:\n"
          f"  accuracy {scores['accuracy']:.4f}, top-5 {scores['top5_accuracy']:.4f}, "
          f"log loss {scores['log_loss']:.4f} (random guess {result['random_guess']['accuracy']:.4f})")
    if "calibrated" in result:
        calibrated = result["calibrated"]
        print(f"  refitted temperature {calibrated['temperature']:.3f} on these images: log loss "
              f"{calibrated['log_loss']:.4f}, expected calibration error {result['ece']:.4f} -> {calibrated['ece']:.4f}")
    breeds = pd.read_csv(output / "per_breed.csv", keep_default_na=False)
    print("\nHardest breeds:\n" + breeds.head(5).to_string(index=False))
    pairs = pd.read_csv(output / "confused_pairs.csv")
    if len(pairs):
        print("\nMost-confused pairs:\n" + pairs.head(5).to_string(index=False))
    print(f"\nWritten to {output}/")
    if not args.no_report:
        print(f"Report: {output / 'report' / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
