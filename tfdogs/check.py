"""`python -m tfdogs.check`: the validation pass over a photo directory, alone.

Every problem is printed with its file, labels.csv line and reason; what each
file's state (kept, converted, skipped) means is in `tfdogs.data.validation`.

Examples:
    python -m tfdogs.check --data-dir path/to/dog-breed-identification
    python -m tfdogs.check --data-dir path/to/class-folders --strict --report problems.csv
"""

import argparse
import sys

from tfdogs import data
from tfdogs.data.validation import check_data
from tfdogs.training.interruption import stops_in_one_line


def build_parser():
    """The command line's flags; `--help` ends with the examples of this module's docstring."""
    parser = argparse.ArgumentParser(prog="python -m tfdogs.check", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__[__doc__.index("Examples:"):],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="Kaggle layout (labels.csv + train/) or class folders")
    parser.add_argument("--strict", action="store_true", help="fail if any file or row would be skipped")
    parser.add_argument("--report", help="also write the problems to this CSV file")
    parser.add_argument("--verbose", type=int, choices=(0, 1), default=1,
                        help="1: a progress bar on a terminal for a few hundred photos or more")
    return parser


@stops_in_one_line
def main(argv=None):
    """Command-line entry point: prints every problem, exits 2 when the data cannot be used."""
    args = build_parser().parse_args(argv)
    try:
        report = check_data(args.data_dir, verbose=args.verbose)
    except data.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for problem in report.problems:
        print(problem)
    print(report.summary())
    if args.report:
        report.write_csv(args.report)
    if args.strict:
        try:
            report.require_clean()
        except data.DataError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
