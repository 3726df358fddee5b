"""`python -m tfdogs.export`: a run folder or an ensemble folder as a SavedModel (TF Serving) or a TFLite file.

What an export holds (signatures, outputs, `tfdogs.json`) is said in
`tfdogs.serving.saved_model` and `tfdogs.serving.tflite`.

Examples:
    python -m tfdogs.export runs/resnet18-demo                  # saved_models/resnet18-demo/<next version>
    python -m tfdogs.export runs/resnet18-demo --tta 10         # ten views of each image, averaged
    python -m tfdogs.export runs/resnet18-demo --format tflite  # runs/resnet18-demo/tflite/model.tflite
"""

import argparse
import pathlib
import sys

from tfdogs import data, files, lock
from tfdogs.serving import export_folder
from tfdogs.runs.folder import RunFolderError, load_model_folder
from tfdogs.serving.saved_model import export_saved_model
from tfdogs.serving.tflite import export_tflite
from tfdogs.training.interruption import stops_in_one_line


def build_parser():
    """The command line's flags; `--help` ends with the examples of this module's docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m tfdogs.export",
        description="Exports a run folder or an ensemble folder as a SavedModel (TF Serving) or TFLite file.",
        epilog=__doc__[__doc__.index("Examples:"):], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="run folder (python -m tfdogs.train) or ensemble folder (tfdogs.ensemble)")
    parser.add_argument("--format", choices=("saved_model", "tflite"), default="saved_model",
                        help="saved_model: the next numeric version under --output; tflite: model.tflite, "
                             "labels.txt and tfdogs.json in --output")
    parser.add_argument("--output", help="default: saved_models/<folder name> for runs/<folder name>, else "
                                         "saved_models/<folder name>-<hash of its path> (saved_model); "
                                         "MODEL/tflite (tflite)")
    parser.add_argument("--tta", type=int, default=1, choices=sorted(data.TTA_VIEWS), metavar="N",
                        help="test-time augmentation in the SavedModel: answer the mean softmax of N views of "
                             "each image: 1 none, 2 the evaluation crop and its mirror, 10 the centre and four "
                             "corner crops and their mirrors (same signatures)")
    return parser


@stops_in_one_line
def main(argv=None):
    """Command-line entry point: exports a run or ensemble folder as a SavedModel or a TFLite file."""
    args = build_parser().parse_args(argv)
    folder = pathlib.Path(args.model)
    if args.format == "tflite" and args.tta != 1:
        print(f"error: --tta {args.tta} is for SavedModel exports only: the TFLite file takes one image already "
              "resized and centre-cropped outside the model (tflite_input), so it cannot take the other views; "
              "export without --tta, or average the app's own views.", file=sys.stderr)
        return 2
    try:
        runs, member_weights = load_model_folder(folder)
        models = [run.load_model() for run in runs]
        preprocessing = [run.preprocessing for run in runs]
        metadata = {"run": str(folder.resolve()), "exported_from": str(folder.resolve())}
        if args.format == "tflite":
            path = export_tflite(models, runs[0].class_names, args.output or folder / "tflite",
                                 preprocessing=preprocessing, model_weights=member_weights, metadata=metadata)
        else:
            export_base = pathlib.Path(args.output or export_folder.default_export_dir(folder))
            export_folder.check_owner(export_base, folder, explicit=args.output is not None)
            path = export_saved_model(models, runs[0].class_names, export_base, preprocessing=preprocessing,
                                      model_weights=member_weights, metadata=metadata, views=args.tta)
    # ExportFolderError is a ValueError
    except (RunFolderError, ValueError, files.ForeignFolderError, lock.LockedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Exported {folder} to {path}" + (f" ({args.tta} views of each image)" if args.tta > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
