"""Random-initialised keras-hub presets with exactly the architecture of published ones, for throughput.

keras-hub's built-in presets (``resnet_50_imagenet`` ..) are downloaded from
Kaggle; where that is not possible this script builds the same networks with
fresh weights and writes them with ``save_to_preset`` into local folders, so
that ``python -m tfdogs.bench --models keras_hub:DIR`` and
``python -m tfdogs.train --model keras_hub:DIR`` measure and run the very same
architecture. Speed does not depend on the weights' values; accuracy does, so
these folders are for throughput and for seconds-long smoke runs only.

Each architecture comes from the code keras-hub itself ran when it converted
the checkpoint (``keras_hub.src.utils.timm`` and ``..transformers``
``convert_backbone_config``, fed the source model's config), or, for ResNet-vd
(converted from PaddleClas by a script outside the package), from that
script's arguments. A classifier preset is saved as an ``ImageClassifier``
whose ``ImageConverter`` carries the source checkpoint's preprocessing (size,
mean/std as scale/offset, filter), so tfdogs takes its preprocessing record
from it as it would from the real preset; DINOv2, published as a backbone plus
an image converter, is saved the same way.

The table printed at the end compares the parameter counts of what was built
with the count in keras-hub's preset metadata, which is not counted the same
way for every family: the backbone's ``count_params()`` (BatchNorm moving
statistics included) for ResNet, MobileNet, ViT and DINOv2; the whole
classifier's for ResNet-vd (the conversion script printed the classifier's);
the whole classifier's trainable weights for EfficientNet (timm's count of
the PyTorch model, which has no moving statistics among its parameters). The
table names the way that matches; ``--strict`` exits non-zero when none does.

Example:
    python benchmarks/architecture_presets.py                       # all, into benchmarks/presets/
    python benchmarks/architecture_presets.py --presets efficientnet_b0_ra_imagenet --output /tmp/presets
"""

import argparse
import dataclasses
import math
import pathlib
import sys

DEFAULT_OUTPUT = pathlib.Path(__file__).resolve().parent / "presets"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One published keras-hub preset: where its architecture and preprocessing come from.

    ``family`` picks keras-hub's classes (``"resnet"``, ``"resnet_vd"``, ``"efficientnet"``,
    ``"mobilenet"``, ``"vit"``, ``"dinov2"``); ``source`` is the checkpoint
    keras-hub converted, ``source_config`` what its converter reads from it;
    ``image_size``, ``mean``, ``std`` and ``interpolation`` are the source
    checkpoint's preprocessing, which the preset's ``ImageConverter`` holds.
    """

    family: str
    source: str
    source_config: dict
    image_size: int
    interpolation: str
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    classifier: bool = True


ARCHITECTURES = {
    # timm resnet50.a1_in1k ("ResNet strikes back"), tools/checkpoint_conversion/convert_resnet_checkpoints.py.
    "resnet_50_imagenet": Architecture(
        "resnet", "timm/resnet50.a1_in1k", {"architecture": "resnet50"}, 224, "bicubic"),
    # PaddleClas ResNet34_vd, tools/checkpoint_conversion/convert_resnet_vd_checkpoints.py (deep 3x3 stem).
    "resnet_vd_34_imagenet": Architecture(
        "resnet_vd", "PaddleClas ResNet34_vd", {"stackwise_num_blocks": [3, 4, 6, 3], "block_type": "basic_block_vd"},
        224, "bilinear"),
    # timm efficientnet_b0.ra_in1k / efficientnet_b3.ra2_in1k (train size 288), convert_efficientnet_checkpoints.py.
    "efficientnet_b0_ra_imagenet": Architecture(
        "efficientnet", "timm/efficientnet_b0.ra_in1k", {"architecture": "efficientnet_b0"}, 224, "bicubic"),
    "efficientnet_b3_ra2_imagenet": Architecture(
        "efficientnet", "timm/efficientnet_b3.ra2_in1k", {"architecture": "efficientnet_b3"}, 288, "bicubic"),
    # timm mobilenetv3_large_100: keras-hub names no tag; ra_in1k is timm's ImageNet-1k default (bicubic).
    "mobilenet_v3_large_100_imagenet": Architecture(
        "mobilenet", "timm/mobilenetv3_large_100.ra_in1k", {"architecture": "mobilenetv3_large_100"}, 224, "bicubic"),
    # google/vit-base-patch16-224 (ImageNet-21k pre-training, 1k fine-tuning), convert_vit_checkpoints.py.
    "vit_base_patch16_224_imagenet": Architecture(
        "vit", "google/vit-base-patch16-224",
        {"image_size": 224, "patch_size": 16, "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_size": 768,
         "intermediate_size": 3072, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "qkv_bias": True},
        224, "bilinear", INCEPTION_MEAN, INCEPTION_STD),
    # facebook/dinov2-small (self-supervised, no classifier), convert_dinov2_checkpoints.py: converter at 518 px.
    "dinov2_small": Architecture(
        "dinov2", "facebook/dinov2-small",
        {"model_type": "dinov2", "image_size": 518, "patch_size": 14, "num_hidden_layers": 12, "hidden_size": 384,
         "num_attention_heads": 6, "mlp_ratio": 4, "layerscale_value": 1.0, "use_swiglu_ffn": False,
         "hidden_dropout_prob": 0.0, "drop_path_rate": 0.0},
        518, "bicubic", classifier=False),
}


def backbone_arguments(architecture):
    """The keyword arguments keras-hub builds this preset's backbone with."""
    if architecture.family == "resnet_vd":
        return dict(input_conv_filters=[32, 32, 64], input_conv_kernel_sizes=[3, 3, 3],
                    stackwise_num_filters=[64, 128, 256, 512], stackwise_num_strides=[1, 2, 2, 2],
                    **architecture.source_config)
    # The converters keras-hub runs on a timm / transformers checkpoint's config (private modules of 0.32).
    if architecture.family in ("resnet", "efficientnet", "mobilenet"):
        from keras_hub.src.utils.timm import (
            convert_efficientnet,
            convert_mobilenet,
            convert_resnet,
        )

        converter = {"resnet": convert_resnet, "efficientnet": convert_efficientnet,
                     "mobilenet": convert_mobilenet}[architecture.family]
    else:
        from keras_hub.src.utils.transformers import convert_dinov2, convert_vit

        converter = {"vit": convert_vit, "dinov2": convert_dinov2}[architecture.family]
    return converter.convert_backbone_config(architecture.source_config)


def build(name, architecture):
    """(backbone, task or None, image converter) of one preset, with fresh weights."""
    import keras_hub

    classes = {
        "resnet": ("ResNet", keras_hub.models.ResNetBackbone), "resnet_vd": ("ResNet", keras_hub.models.ResNetBackbone),
        "efficientnet": ("EfficientNet", keras_hub.models.EfficientNetBackbone),
        "mobilenet": ("MobileNet", keras_hub.models.MobileNetBackbone),
        "vit": ("ViT", keras_hub.models.ViTBackbone), "dinov2": ("DINOV2", keras_hub.models.DINOV2Backbone),
    }
    prefix, backbone_class = classes[architecture.family]
    backbone = backbone_class(**backbone_arguments(architecture))
    # keras-hub feeds the network pixels * scale + offset (pixels in 0-255): mean/std folded in.
    converter = getattr(keras_hub.layers, f"{prefix}ImageConverter")(
        image_size=(architecture.image_size, architecture.image_size),
        scale=[1 / (255 * s) for s in architecture.std],
        offset=[-m / s for m, s in zip(architecture.mean, architecture.std)],
        interpolation=architecture.interpolation)
    if not architecture.classifier:
        return backbone, None, converter
    preprocessor = getattr(keras_hub.models, f"{prefix}ImageClassifierPreprocessor")(image_converter=converter)
    head = {"num_features": 1280} if architecture.family == "mobilenet" else {}  # timm's MobileNetV3 head width
    task = getattr(keras_hub.models, f"{prefix}ImageClassifier")(
        backbone=backbone, num_classes=1000, preprocessor=preprocessor, **head)
    return backbone, task, converter


def published_parameters(name):
    """The backbone parameter count in keras-hub's preset metadata, or None for an unknown name."""
    import keras_hub

    entry = keras_hub.models.Backbone.presets.get(name)
    return entry["metadata"].get("params") if entry else None


def save(name, architecture, output):
    """Builds and saves one preset into ``output/name``; returns its table row."""
    import keras

    keras.utils.set_random_seed(0)
    folder = pathlib.Path(output) / name
    backbone, task, converter = build(name, architecture)
    if task is not None:
        task.save_to_preset(str(folder))
    else:
        backbone.save_to_preset(str(folder))
        converter.save_to_preset(str(folder))
    published = published_parameters(name)
    counts = parameter_counts(backbone, task)
    matched = next((way for way, count in counts.items() if count == published), None)
    return {"preset": name, "built": counts["backbone"], "trainable": counts["backbone, trainable"],
            "published": published, "match": matched is not None, "matched_as": matched or "none",
            "source": architecture.source, "folder": str(folder)}


def parameter_counts(backbone, task):
    """The ways a preset's size is counted: {way: count}; ``task`` (the ImageClassifier) may be None."""

    def trainable(model):
        return sum(math.prod(weight.shape) for weight in model.trainable_weights)

    counts = {"backbone": backbone.count_params(), "backbone, trainable": trainable(backbone)}
    if task is not None:
        counts.update({"classifier": task.count_params(), "classifier, trainable": trainable(task)})
    return counts


def _count(value):
    return f"{value:,}" if value is not None else "-"


def format_table(rows):
    """The rows as an aligned text table."""
    header = ("preset", "backbone params", "trainable", "keras-hub metadata", "equal to", "source checkpoint")
    lines = [header] + [(row["preset"], _count(row["built"]), _count(row.get("trainable")), _count(row["published"]),
                         row.get("skipped") or (row["matched_as"] if row["match"] else "NO MATCH"), row["source"])
                        for row in rows]
    widths = [max(len(str(line[column])) for line in lines) for column in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in lines[:1] + [["-" * width for width in widths]] + lines[1:])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="folder to write one preset folder per name")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a count differs or a preset is skipped")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for name in args.presets:
        try:
            rows.append(save(name, ARCHITECTURES[name], args.output))
        except Exception as error:  # noqa: BLE001 (an architecture this keras-hub cannot build: said, not fatal)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            rows.append({"preset": name, "built": None, "published": published_parameters(name), "match": False,
                         "skipped": f"skipped: {reason}", "source": ARCHITECTURES[name].source})
        print(f"{name}: {rows[-1].get('folder') or rows[-1].get('skipped')}", file=sys.stderr, flush=True)
    print(format_table(rows))
    return 1 if args.strict and not all(row["match"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
