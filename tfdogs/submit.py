"""`python -m tfdogs.submit`: a Kaggle submission for the unlabelled test photos.

Reads `sample_submission.csv` of the Kaggle "dog-breed-identification"
download for the test ids and the breed column order, predicts
`test/<id>.jpg` with MODEL (a run folder, an ensemble folder or a SavedModel,
as for `tfdogs.predict`) and writes `id` plus one probability column per breed,
in the sample's column order, each row summing to 1. Kaggle scores it by
multi-class log loss. Test photos the data check would convert are predicted
from its RGB copy, as `tfdogs.predict` does. `--tta N` averages the softmax probabilities of N views
of each photo, as for `tfdogs.predict`.

Examples:
    python -m tfdogs.submit runs/resnet34-20240101-120000 --data-dir path/to/dog-breed-identification
    python -m tfdogs.submit runs/ensemble-resnets --data-dir path/to/dog-breed-identification --output ensemble.csv
    python -m tfdogs.submit runs/resnet34-20240101-120000 --data-dir path/to/dog-breed-identification --tta 10
"""

import argparse
import sys

from tfdogs import lock
from tfdogs.runs.predictor import PredictError, add_model_arguments
from tfdogs.runs.submission import SubmissionError, not_a_dog_path, write_submission
from tfdogs.training.interruption import stops_in_one_line


def build_parser():
    """The command line's flags; `--help` ends with the examples of this module's docstring."""
    parser = argparse.ArgumentParser(prog="python -m tfdogs.submit", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__[__doc__.index("Examples:"):],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data-dir", required=True, help="the Kaggle dog-breed-identification folder")
    parser.add_argument("--output", default="submission.csv", help="CSV file to write")
    return parser


@stops_in_one_line
def main(argv=None):
    """Command-line entry point: writes the submission and says where."""
    args = build_parser().parse_args(argv)
    try:
        table = write_submission(args.model, args.data_dir, args.output, batch_size=args.batch_size,
                                 verbose=args.verbose, tta=args.tta)
    except (SubmissionError, PredictError, lock.LockedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {args.output}: {len(table)} test images x {table.shape[1] - 1} breeds.")
    if "not_a_dog" in table.attrs:
        print(f"Not a dog: {sum(table.attrs['not_a_dog'])} of {len(table)} test images score under the threshold "
              f"{table.attrs['dog_check']['threshold']:.3f} (each image's answer: {not_a_dog_path(args.output)}).")
    else:
        print(f"note: the model cannot say 'not a dog' ({table.attrs['dog_check']['why']}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
