"""`python -m tfdogs.compare`: the study's comparison of finished runs, as a table and figures.

For run folders (and ensemble folders from `tfdogs.ensemble`) writes to
`reports/<name>/`:

    table.csv             one row per run, ensemble and baseline, raw numbers
    table.md              the same in Markdown, accuracies in percent
    validation_curves.png validation accuracy and log loss of all runs per epoch, baselines as lines
    curves/<run>.png      each run's training against validation curves
    index.html            all of it on one page, linking each run's evaluation report where one exists
                          (`python -m tfdogs.evaluate RUN`: RUN/evaluation/report/index.html)

Columns: accuracy, top-5 accuracy and Kaggle log loss of the saved (best)
model on the validation split; peak and final validation accuracy over the
epochs and the epoch of the peak; epochs run, training time and parameter
count. Baselines come from the runs' `metrics.json` (random guess, most
frequent breed, class prior) and, where a run folder holds `zeroshot.json` or
`--zeroshot FILE` is given, the ImageNet classifier with no training. Every
number is read from the files the runs wrote, never recomputed.

`--configs` trains configs first (through `tfdogs.training.loop.train`, into
`runs/<name>/<config name>/`) and compares the new runs with any RUN_DIR given.

Examples:
    python -m tfdogs.compare runs/lenet5-a runs/resnet18-b runs/resnet34-c --name study
    python -m tfdogs.compare --configs configs/lenet5.yaml configs/resnet18.yaml configs/resnet34.yaml \\
        --set data_dir=path/to/dog-breed-identification --name study
    python -m tfdogs.compare --configs configs/lenet5.yaml configs/resnet18.yaml --set data=synthetic \\
        --set epochs=2 --set image_size=64 --set weights=none --set strategy=scratch --name demo
"""

import argparse
import pathlib
import sys

from tfdogs import config as config_lib, data, files, lock, weights
from tfdogs.evaluation.html import markdown_table
from tfdogs.runs.comparison import DISPLAY, NUMERIC, compare, display_rows, parse_overrides, train_configs
from tfdogs.runs.folder import RunFolderError
from tfdogs.training.interruption import stops_in_one_line
from tfdogs.training.phases import TrainingError


def build_parser():
    """The command line's flags; `--help` ends with the examples of this module's docstring."""
    parser = argparse.ArgumentParser(prog="python -m tfdogs.compare", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__[__doc__.index("Examples:"):],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", metavar="RUN_DIR", help="run folders (or ensemble folders)")
    parser.add_argument("--configs", nargs="+", default=[], metavar="CONFIG",
                        help="config files to train first (runs go to --runs-dir/<config name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config value for every --configs run, e.g. --set data_dir=path (repeatable)")
    parser.add_argument("--name", default="comparison", help="report name: reports/<name>/")
    parser.add_argument("--output", help="report folder (default reports/<name>)")
    parser.add_argument("--runs-dir", help="where --configs runs go (default runs/<name>)")
    parser.add_argument("--exports-dir", help="where --configs SavedModels go (default saved_models)")
    parser.add_argument("--zeroshot", nargs="+", default=[], metavar="FILE",
                        help="zero-shot result files (python -m tfdogs.zeroshot) to add as baselines")
    return parser


@stops_in_one_line
def main(argv=None):
    """Command-line entry point: trains configs if asked, compares, prints the table."""
    args = build_parser().parse_args(argv)
    output = pathlib.Path(args.output or pathlib.Path("reports") / args.name)
    try:
        files.refuse_foreign_folder(output, "table.csv")  # before any training
        folders = list(args.folders)
        if args.configs:
            try:
                folders += train_configs(args.configs, parse_overrides(args.overrides),
                                         args.runs_dir or pathlib.Path("runs") / args.name, args.exports_dir)
            except (weights.WeightsError, TrainingError) as error:
                raise RunFolderError(str(error)) from None
        table = compare(folders, output, zeroshot_files=args.zeroshot, title=args.name)
    except (RunFolderError, config_lib.ConfigError, data.DataError, files.ForeignFolderError,
            lock.LockedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(DISPLAY, display_rows(table), NUMERIC))
    print(f"Report: {output / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
