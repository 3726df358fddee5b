"""`python -m tfdogs.predict`: the five most likely breeds of dog photos.

MODEL is any of:

- a run folder (`python -m tfdogs.train`): its best model, `model.keras`;
- an ensemble folder (`python -m tfdogs.ensemble`): its members' models;
- a SavedModel: a version folder (`saved_models/<name>/1`) or the base
  folder holding numbered versions (the newest is used).

Run and ensemble folders are rebuilt in process with the serving code of the
export, so their answers are the SavedModel's (the tests check this).

`--tta N` averages the softmax probabilities of N views of each image
(test-time augmentation, `data.eval_views`): 1 none, 2 the evaluation crop
and its mirror image, 10 the centre and four corner crops of the resized
image and their mirrors. A run or ensemble folder takes any N (default 1); a
SavedModel answers with the views it was exported with (`tfdogs.export
--tta`), and refuses another N.

A model trained from pretrained weights also says whether each photo shows
a dog at all: a photo whose pooled features lie too far from every breed it
learned (a cat, a person, a cup of coffee) is marked "not a dog" above its
nearest breeds, and `--json` gives `not_a_dog` and `dog_score` for each image
(`tfdogs.evaluation.not_a_dog`). A model trained from random weights cannot
tell, and says so.

IMAGE is an image file or a folder (its images, sub-folders included). A
photo that the data check converts before training (palette BMP, CMYK JPEG,
TIFF, PNG or WebP stored sideways, over 4096 px a side) is answered from the
check's RGB copy, made in memory, as training and evaluation read it. Every
readable image is answered; every other one is named with the reason (not
found, empty, not an image or truncated, a URL), in the table or as an
`error` entry of the JSON. Exit status: 0 every image answered, 1 some could
not be read, 2 the model could not be loaded.

Examples:
    python -m tfdogs.predict runs/resnet18-20240101-120000 dog.jpg other_dog.png
    python -m tfdogs.predict saved_models/resnet18-20240101-120000 photos/ --json
    python -m tfdogs.predict runs/resnet18-20240101-120000 photos/ --json --explain why/   # heat maps
"""

import argparse
import json
import sys

from tfdogs.runs.explain import ExplainError, add_explanations
from tfdogs.runs.predictor import (
    PredictError,
    add_model_arguments,
    format_table,
    image_inputs,
    load_predictor,
    predict_files,
    top5,
)
from tfdogs.training.interruption import stops_in_one_line

# Exit status: every image answered, some could not be read, the model could not be loaded.
ALL_ANSWERED, SOME_FAILED, NOTHING_RUN = 0, 1, 2


def build_parser():
    """The command line's flags; `--help` ends with the exit statuses and the examples of this module's docstring."""
    parser = argparse.ArgumentParser(prog="python -m tfdogs.predict", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 every image answered, 1 some images could not be read "
                                            "(the rest are answered), 2 the model could not be loaded.\n\n"
                                            + __doc__[__doc__.index("Examples:"):],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, images=True)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--explain", metavar="DIR", help="write a heat map (Grad-CAM) of each answered image's "
                        "top breed to DIR/<image name>.png; needs a run or ensemble folder (tfdogs.runs.explain)")
    return parser


@stops_in_one_line
def main(argv=None):
    """Command-line entry point: prints the top-5 breeds of each image.

    Returns:
        0 when every image is answered, 1 when some could not be read (the
        others are answered and each failure is named), 2 when the model
        cannot be loaded or the command line is wrong.
    """
    args = build_parser().parse_args(argv)
    inputs = image_inputs(args.images)
    try:
        predictor = load_predictor(args.model, tta=args.tta)
    except PredictError as error:
        print(f"error: {error}", file=sys.stderr)
        if args.json:  # still one entry per input, so that a script reading stdout is not left with nothing
            print(json.dumps([{"image": path, "error": f"model not loaded: {error}"} for path, _ in inputs],
                             indent=2))
        return NOTHING_RUN
    files = [path for path, error in inputs if error is None]
    outputs = predict_files(predictor, files, batch_size=args.batch_size, verbose=args.verbose)
    answered = iter(top5(files, outputs))
    results = [next(answered) if error is None else {"image": path, "error": error} for path, error in inputs]
    if args.explain:
        try:
            add_explanations(args.model, results, args.explain)
        except ExplainError as error:
            print(f"error: {error}", file=sys.stderr)
            return NOTHING_RUN
    print(json.dumps(results, indent=2) if args.json else format_table(results, predictor.dog_check.get("threshold")))
    if predictor.cannot_reject_note():
        print(predictor.cannot_reject_note(), file=sys.stderr)
    failed = [result for result in results if "error" in result]
    if failed:
        print(f"{len(failed)} of {len(results)} images could not be read: "
              + "; ".join(f"{result['image']}: {result['error']}" for result in failed[:10])
              + (" ..." if len(failed) > 10 else ""), file=sys.stderr)
        return SOME_FAILED
    return ALL_ANSWERED


if __name__ == "__main__":
    sys.exit(main())
