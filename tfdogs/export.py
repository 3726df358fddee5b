"""`python -m tfdogs.export`: a run folder or an ensemble folder as a SavedModel (TF Serving) or a TFLite file.

What an export holds (signatures, outputs, `tfdogs.json`) is said in
`tfdogs.serving.saved_model` and `tfdogs.serving.tflite`.

Examples:
    python -m tfdogs.export runs/resnet18-demo                  # saved_models/resnet18-demo/<next version>
    python -m tfdogs.export runs/resnet18-demo --tta 10         # ten views of each image, averaged
    python -m tfdogs.export runs/resnet18-demo --tflite int8    # runs/resnet18-demo/tflite/model.tflite, scored
"""

import argparse
import json
import pathlib
import sys

from tfdogs import data, files, lock
from tfdogs.serving import export_folder
from tfdogs.serving.onnx_export import export_onnx
from tfdogs.runs.ensemble import common_validation_images
from tfdogs.runs.folder import RunFolderError, load_model_folder
from tfdogs.serving.quantize import VARIANTS, VariantRequest, choose_representative, summary_line
from tfdogs.serving.saved_model import export_saved_model
from tfdogs.serving.tflite import MEASUREMENT_FILE, export_tflite
from tfdogs.training.interruption import stops_in_one_line


def build_parser():
    """The command line's flags; `--help` ends with the examples of this module's docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m tfdogs.export",
        description="Exports a run folder or an ensemble folder as a SavedModel (TF Serving) or TFLite file.",
        epilog=__doc__[__doc__.index("Examples:"):], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="run folder (python -m tfdogs.train) or ensemble folder (tfdogs.ensemble)")
    parser.add_argument("--format", choices=("saved_model", "tflite", "onnx"),
                        help="saved_model (the default): the next numeric version under --output; tflite: "
                             "model.tflite, labels.txt, tfdogs.json and tflite.json in --output (float32); onnx: "
                             "model.onnx, labels.txt and tfdogs.json in --output (needs the onnx extra: tf2onnx)")
    parser.add_argument("--output", help="default: saved_models/<folder name> for runs/<folder name>, else "
                                         "saved_models/<folder name>-<hash of its path> (saved_model); "
                                         "MODEL/tflite (tflite), MODEL/onnx (onnx)")
    parser.add_argument("--tta", type=int, default=1, choices=sorted(data.TTA_VIEWS), metavar="N",
                        help="test-time augmentation in the SavedModel: answer the mean softmax of N views of "
                             "each image: 1 none, 2 the evaluation crop and its mirror, 10 the centre and four "
                             "corner crops and their mirrors (same signatures)")
    tflite = parser.add_argument_group(
        "TFLite variants", "Each variant is scored on the run's validation photos against the float model on the "
                           "same pixels (accuracy, log loss, calibration error, size, images/s: tflite.json) "
                           "before it is written.")
    tflite.add_argument("--tflite", choices=VARIANTS,
                        help="a TFLite file (implies --format tflite): float32; float16 (float16 weights); "
                             "dynamic (dynamic-range quantisation: int8 weights); int8 (full-integer post-training "
                             "quantisation, ranges from training photos). Input and output stay float32")
    tflite.add_argument("--representative-count", type=positive_int, default=100, metavar="N",
                        help="int8: training photos drawn to fix the activation ranges (all when fewer)")
    tflite.add_argument("--seed", type=int, default=0, help="int8: the seed that draws them")
    tflite.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="POINTS",
                        help="refuse a variant whose validation accuracy is more than POINTS percentage points "
                             "below the float model's (exit status 2, nothing written)")
    tflite.add_argument("--force", action="store_true",
                        help="write a variant past --max-accuracy-drop anyway; tflite.json records it as forced")
    tflite.add_argument("--threads", type=positive_int, default=1,
                        help="TFLite interpreter threads for the images/s measurement")
    return parser


def positive_int(text):
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def variant_request(runs, args):
    """The `VariantRequest` of the TFLite flags: the validation photos every member held out, and for int8
    `--representative-count` of the first member's training photos (none of which is among them)."""
    paths, labels, _, _ = common_validation_images(runs)
    representative = ()
    if args.tflite == "int8":
        records, train_indices, _ = runs[0].split()
        representative = choose_representative([records.paths[index] for index in train_indices],
                                               args.representative_count, args.seed)
    return VariantRequest(args.tflite, tuple(paths[0]), tuple(labels), representative, args.seed,
                          args.max_accuracy_drop, args.force, args.threads)


@stops_in_one_line
def main(argv=None):
    """Command-line entry point: exports a run or ensemble folder as a SavedModel or a TFLite file."""
    args = build_parser().parse_args(argv)
    folder = pathlib.Path(args.model)
    if args.tflite and args.format in ("saved_model", "onnx"):
        print(f"error: --tflite {args.tflite} writes a TFLite file, not {args.format}: drop --format {args.format}.",
              file=sys.stderr)
        return 2
    args.format = "tflite" if args.tflite else args.format or "saved_model"
    args.tflite = args.tflite or "float32"
    if args.format in ("tflite", "onnx") and args.tta != 1:
        print(f"error: --tta {args.tta} is for SavedModel exports only: the {args.format} file takes one image already "
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
                                 preprocessing=preprocessing, model_weights=member_weights, metadata=metadata,
                                 request=variant_request(runs, args))
        elif args.format == "onnx":
            path = export_onnx(models, runs[0].class_names, args.output or folder / "onnx",
                               preprocessing=preprocessing, model_weights=member_weights, metadata=metadata)
        else:
            export_base = pathlib.Path(args.output or export_folder.default_export_dir(folder))
            export_folder.check_owner(export_base, folder, explicit=args.output is not None)
            path = export_saved_model(models, runs[0].class_names, export_base, preprocessing=preprocessing,
                                      model_weights=member_weights, metadata=metadata, views=args.tta,
                                      gates=[run.dog_gate() for run in runs],
                                      gates_facts=[run.dog_facts() for run in runs])
    # ExportFolderError is a ValueError
    except (RunFolderError, ValueError, files.ForeignFolderError, lock.LockedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Exported {folder} to {path}" + (f" ({args.tta} views of each image)" if args.tta > 1 else ""))
    if args.format == "tflite":
        print(summary_line(json.loads((path.parent / MEASUREMENT_FILE).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
