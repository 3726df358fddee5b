"""`python -m tfdogs.ensemble`: several finished runs voting as one model.

Averages the members' softmax probabilities (optionally weighted), scores the
average next to each member on the same validation images, and exports the
ensemble as one SavedModel with the same signatures as a single model, so TF
Serving, `predict` and `submit` use it unchanged. The study expected the two
fine-tuned ResNets to generalise better together than apart; this measures it.

Writes the ensemble folder (`--output`, default `runs/ensemble-<timestamp>`):

    ensemble.json   members (run folder, weight, scores), the ensemble's scores, baselines, the export
    scores.csv      one row per member and one for the ensemble, same images
    scores.md       the same as a Markdown table

and the SavedModel under `--export-dir` (default `saved_models/<output name>/<version>/`, with
`-<8 hex digits of its path>` after the name for an ensemble folder outside `runs/`).

Members must predict the same breeds in the same order. They are scored on
the images that every member held out for validation; runs trained with the
same data, `seed` and `val_fraction` share the whole split. When they do not,
the message and `ensemble.json` say so and how many images remain.

Examples:
    python -m tfdogs.ensemble runs/resnet18-a runs/resnet34-b --output runs/ensemble-resnets
    python -m tfdogs.ensemble runs/resnet18-a runs/resnet34-b --member-weights 1 2 --output runs/ensemble-weighted
    python -m tfdogs.ensemble runs/resnet18-a runs/lenet5-c --export-dir saved_models/dogs
"""

import argparse
import json
import pathlib
import sys

from tfdogs import data, files, lock
from tfdogs.runs.ensemble import ensemble
from tfdogs.runs.folder import ENSEMBLE_FILE, RunFolderError
from tfdogs.serving.export_folder import ExportFolderError
from tfdogs.training.interruption import stops_in_one_line


def build_parser():
    """The command line's flags; `--help` ends with the examples of this module's docstring."""
    parser = argparse.ArgumentParser(prog="python -m tfdogs.ensemble", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__[__doc__.index("Examples:"):],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders of the members")
    parser.add_argument("--output", help="ensemble folder (default runs/ensemble-<timestamp>)")
    parser.add_argument("--member-weights", type=float, nargs="+", metavar="WEIGHT",
                        help="one weight per member, in order (default: equal)")
    parser.add_argument("--export-dir", help="SavedModel base folder (default saved_models/<output name>, "
                                                       "plus a hash of its path outside runs/)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    return parser


@stops_in_one_line
def main(argv=None):
    """Command-line entry point: ensembles runs, prints members' and ensemble's scores."""
    args = build_parser().parse_args(argv)
    replaced = args.output is not None and (pathlib.Path(args.output) / ENSEMBLE_FILE).is_file()
    try:
        output = ensemble(args.run_dirs, args.output, member_weights=args.member_weights,
                          export_dir=args.export_dir, batch_size=args.batch_size)
    except (RunFolderError, data.DataError, files.ForeignFolderError, lock.LockedError, ExportFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = json.loads((output / ENSEMBLE_FILE).read_text())
    if summary["split_note"]:
        print(f"note: {summary['split_note']}")
    print(f"Validation, {summary['num_val']} images:\n\n{(output / 'scores.md').read_text()}")
    print(f"Ensemble folder: {output}" + (" (the earlier ensemble there, and its evaluation, replaced whole)"
                                          if replaced else "") + f"\nSavedModel: {summary['export']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
