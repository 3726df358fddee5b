"""`python -m tfdogs.port`: converts a torchvision or timm ResNet checkpoint into a ``.weights.h5`` file.

The conversion itself is `tfdogs.weights.port`. Training converts registry
weights by itself; this is for a checkpoint file to convert once by hand.

Examples:
    python -m tfdogs.port --arch resnet18 --checkpoint resnet18-f37072fd.pth \\
        --output resnet18_imagenet.weights.h5
    python -m tfdogs.port --arch resnet34 --checkpoint model.safetensors --output resnet34-timm.weights.h5
    python -m tfdogs.port --arch resnet18 --checkpoint resnet18-f37072fd.pth --num-classes 120 \\
        --output resnet18-120.weights.h5
"""

import argparse
import pathlib
import sys

from tfdogs import files
from tfdogs.models import MODEL_NAMES, build
from tfdogs.training.interruption import stops_in_one_line
from tfdogs.weights.port import checkpoint_num_classes, convert_state_dict, read_checkpoint


@stops_in_one_line
def main(argv=None):
    """``python -m tfdogs.port``: converts a checkpoint into a ``.weights.h5`` file.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The path of the written weights file.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.output.endswith(".weights.h5"):
        parser.error("--output must end in .weights.h5 (Keras' weights format).")

    state_dict = read_checkpoint(args.checkpoint)
    model = build(args.arch, args.num_classes)
    include_head = checkpoint_num_classes(state_dict) == args.num_classes
    convert_state_dict(model, state_dict, include_head=include_head)
    output = pathlib.Path(args.output)
    files.save_weights(model, output)
    head = "with its classifier" if include_head else f"with a fresh {args.num_classes}-class classifier"
    print(f"Wrote {output} ({args.arch}, {head}).", file=sys.stderr)
    return output


def build_parser():
    """The command line's flags; `--help` ends with the examples of this module's docstring."""
    parser = argparse.ArgumentParser(prog="python -m tfdogs.port", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__[__doc__.index("Examples:"):],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=[name for name in MODEL_NAMES if name != "lenet5"])
    parser.add_argument("--checkpoint", required=True,
                        help="torchvision .pth, timm .safetensors or EfficientNet-Lite .pth (efficientnet-lite-pytorch "
                             "keys) file")
    parser.add_argument("--output", required=True, help="destination, must end in .weights.h5")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=1000,
        help="classifier width; when it differs from the checkpoint's, fc is left freshly initialised",
    )
    return parser


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as error:  # PortError, unsafe or unreadable checkpoints
        sys.exit(f"error: {error}")
