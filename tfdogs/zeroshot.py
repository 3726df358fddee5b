"""`python -m tfdogs.zeroshot`: the ImageNet classifier as a baseline, with no training.

Every one of the 120 Kaggle breeds is an ImageNet-1k class, so a network
pretrained on ImageNet already names dog breeds. Restricting its 1000 logits to
the breeds of the data set and taking the softmax over those gives a baseline
that any fine-tuned number must beat to mean anything.

Examples:
    python -m tfdogs.zeroshot --model resnet18 --data-dir path/to/dog-breed-identification
    python -m tfdogs.zeroshot --model efficientnet_lite0 --weights imagenet --data-dir DIR --subset all
    python -m tfdogs.zeroshot --model resnet34 --weights timm --run runs/resnet34-demo

By default the images are the validation part of the same stratified split
that `tfdogs.train` makes with its default seed and fraction. `--run` takes a
run's own `split.csv`, model, weights and preprocessing record
(`RUN/preprocessing.json`, image size included; flags given override them)
and writes `zeroshot.json` into that run folder, where `tfdogs.compare`
finds it: it reproduces the baseline training recorded in `metrics.json`.
"""

import argparse
import pathlib
import sys

import numpy as np

from tfdogs import data, files, models, weights
from tfdogs.evaluation.zeroshot import evaluate_zero_shot
from tfdogs.runs.folder import load_run
from tfdogs.training.interruption import stops_in_one_line


def build_parser():
    """The command line's flags in groups; `--help` ends with the examples of this module's docstring."""
    parser = argparse.ArgumentParser(prog="python -m tfdogs.zeroshot", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__[__doc__.index("Examples:"):__doc__.index("\n\nBy default")],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    network = parser.add_argument_group("model and weights")
    network.add_argument("--model", choices=[name for name in models.MODEL_NAMES if name != "lenet5"],
                         help="default: the run's, else resnet18")
    network.add_argument("--weights", help="imagenet, timm or a 1000-class checkpoint path; "
                                           "default: the run's, else imagenet")
    network.add_argument("--weights-preprocessing", choices=("auto", *weights.CONVENTIONS),
                         help="preprocessing of a checkpoint file the registry does not know (default auto)")
    network.add_argument("--image-size", type=int, help="default: the run's, else the weights' own (224 for "
                                                        "ResNets, 224/240/260 for EfficientNet-Lite0/1/2)")
    photos = parser.add_argument_group("photos")
    photos.add_argument("--data-dir", help="labelled photos (Kaggle or class-folder layout)")
    photos.add_argument("--run", help="a training run folder: its data, validation split, model, weights, "
                                      "image size and preprocessing record, unless flags say otherwise")
    photos.add_argument("--subset", default="val", choices=("val", "all"),
                        help="without --run: the default split's validation part, or every image")
    photos.add_argument("--batch-size", type=int, default=32)
    output = parser.add_argument_group("output")
    output.add_argument("--output", help="JSON file (default RUN/zeroshot.json, else zeroshot-<model>.json)")
    output.add_argument("--verbose", type=int, choices=(0, 1), default=1,
                        help="1: a progress bar on a terminal for a few hundred photos or more")
    return parser


@stops_in_one_line
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.run:

            run = load_run(args.run)
            # the run's own split, reading converted copies where training did (see tfdogs.check)
            records, _, indices = run.split(args.data_dir)
            model_name = args.model or run.config["model"]
            source = args.weights or run.config.get("weights")
            if args.model or args.weights or args.weights_preprocessing:  # other weights: their own record
                preprocessing = weights.resolve_preprocessing(source, model_name, run.preprocessing.image_size,
                                                              args.weights_preprocessing or "auto")
            else:
                preprocessing = run.preprocessing
            output = pathlib.Path(args.output or pathlib.Path(args.run) / "zeroshot.json")
        elif args.data_dir:
            records = data.find_records(args.data_dir)
            indices = (data.stratified_split(records.labels)[1] if args.subset == "val"
                       else np.arange(len(records.paths)))
            model_name, source = args.model or "resnet18", args.weights or "imagenet"
            preprocessing = weights.resolve_preprocessing(source, model_name, args.image_size,
                                                          args.weights_preprocessing or "auto")
            output = pathlib.Path(args.output or f"zeroshot-{model_name}.json")
        else:
            parser.error("give --data-dir or --run")
        if args.image_size:
            preprocessing = preprocessing.replace(image_size=args.image_size)
        result = evaluate_zero_shot(model_name, records, indices, weights_source=source,
                                    preprocessing=preprocessing, batch_size=args.batch_size, verbose=args.verbose)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    files.write_json(result, output)
    print(f"Zero-shot {model_name} ({source}, {preprocessing.image_size} px) on {result['num_images']} images of "
          f"{result['num_classes']} breeds: accuracy {result['accuracy']:.4f}, top-5 "
          f"{result['top5_accuracy']:.4f}, log loss {result['log_loss']:.4f} -> {output}")
    if result["breeds_left_out"]:
        print(f"Left out: {', '.join(result['breeds_left_out'])} (no ImageNet class), and their photos.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
