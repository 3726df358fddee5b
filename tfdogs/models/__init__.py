"""The three networks of the study, picked by name.

    lenet5    LeNet-5 from scratch (LeCun et al. 1998), `tfdogs.models.lenet`.
    resnet18  ResNet-18, torchvision-identical (He et al. 2016), `tfdogs.models.resnet`.
    resnet34  ResNet-34, likewise.
    efficientnet_lite0, efficientnet_lite1, efficientnet_lite2
              EfficientNet-Lite (Tan and Le 2019), TensorFlow's Lite builder by hand,
              `tfdogs.models.efficientnet_lite`; these take ``(pixels - 127) / 128``.

Pretrained weights are loaded into a built model by `tfdogs.weights`
(`weights.pretrained_model`); model code never imports weight code.

And any keras-hub image backbone, ``keras_hub:PRESET`` (a preset name, a
handle or a local preset directory), with the same head: `tfdogs.models.hub`.

Every model takes normalised float NHWC images (as its weights' `Preprocessing` says; no normalisation
layer inside) and returns float32 class logits from a Dense layer named ``fc``.

Example:
    >>> from tfdogs import models
    >>> model = models.build("resnet18", 120, dropout=0.2)
    >>> {models.stage_of(layer.name) for layer in model.layers}
    {'stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head'}
"""

import re

from tfdogs.models.hub import PresetError, hub_model, is_hub_name, preset_of
from tfdogs.models.efficientnet_lite import VARIANTS as LITE_VARIANTS, efficientnet_lite
from tfdogs.models.lenet import lenet5
from tfdogs.models.resnet import STAGE_DEPTHS, resnet

__all__ = ["FEATURE_LAYER", "HEAD_LAYERS", "HUB_WEIGHTS", "LITE_PREFIX", "MODEL_NAMES", "PresetError", "STAGE_DEPTHS", "build", "file_name",
           "is_hub_name", "is_known", "preset_of", "stage_of"]

LITE_PREFIX = "efficientnet_lite"
MODEL_NAMES = ("lenet5", "resnet18", "resnet34", *(f"{LITE_PREFIX}{variant}" for variant in LITE_VARIANTS))
HUB_WEIGHTS = "preset"  # a keras-hub model's pretrained weights are its preset's

HEAD_LAYERS = ("avgpool", "dropout", "fc")
FEATURE_LAYER = HEAD_LAYERS[0]  # the pooled features every head starts from
_STAGE_PATTERN = re.compile(r"^(layer[1-4])\.")


def is_known(name):
    """Whether `build` knows a model name: one of `MODEL_NAMES` or ``keras_hub:PRESET``."""
    return name in MODEL_NAMES or is_hub_name(name)


def file_name(name):
    """A model name fit for a folder name: ``keras_hub:/a/b/resnet_50`` -> ``keras_hub-resnet_50``."""
    if not is_hub_name(name):
        return name
    preset = preset_of(name).rstrip("/").replace("://", "-")
    tail = preset.rsplit("/", 1)[-1] or "preset"
    return "keras_hub-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in tail)


def stage_of(layer_name):
    """Which part of the network a layer belongs to.

    Used by the trainer for differential learning rates and freezing.

    Args:
        layer_name: a Keras layer name of a model made by `build`.

    Returns:
        ``"layer1"`` .. ``"layer4"`` for residual-stage layers, ``"head"`` for
        ``avgpool``, ``dropout`` and ``fc``, and ``"stem"`` for everything else
        (the input, ``conv1`` .. ``maxpool``; for LeNet-5, all layers but the head).
        keras-hub backbones' layers carry their stage in their names (`tfdogs.models.hub`).
    """
    match = _STAGE_PATTERN.match(layer_name)
    if match:
        return match.group(1)
    if layer_name in HEAD_LAYERS:
        return "head"
    return "stem"


def build(name, num_classes, weights=None, *, input_shape=None, dropout=0.0, l1=0.0, l2=0.0):
    """Builds one of `MODEL_NAMES` with random weights, or a keras-hub model with its preset's.

    Args:
        name: one of `MODEL_NAMES` (``"lenet5"``, ``"resnet18"``, ``"efficientnet_lite0"`` ...) or
            ``"keras_hub:PRESET"``.
        num_classes: number of output logits.
        weights: None (random init), or for a keras-hub model ``"preset"`` (the
            preset's own weights, which come with the architecture). Checkpoints
            for the hand-built networks are loaded by `tfdogs.weights.pretrained_model`.
        input_shape: NHWC shape without batch (default 224 x 224 x 3, EfficientNet-Lite's own side for
            those); ResNets and EfficientNet-Lite accept None spatial dims.
        dropout: dropout rate before ``fc``.
        l1: L1 penalty on the ``fc`` kernel.
        l2: L2 penalty on the ``fc`` kernel.

    Returns:
        A `keras.Model` whose ``name`` is ``name``.

    Raises:
        ValueError: unknown name, or weights other than a keras-hub preset's.
        PresetError: a keras-hub preset that cannot be loaded (a ValueError).
    """
    head = dict(dropout=dropout, l1=l1, l2=l2)
    if is_hub_name(name):
        if weights not in (None, HUB_WEIGHTS):
            raise ValueError(f"{name} takes its weights from its preset: weights must be {HUB_WEIGHTS!r} or None, "
                             f"not {weights!r}.")
        return hub_model(preset_of(name), num_classes, load_weights=weights == HUB_WEIGHTS,
                         input_shape=input_shape or (224, 224, 3), **head)
    if name not in MODEL_NAMES:
        raise ValueError(f"Unknown model {name!r}; choose one of {MODEL_NAMES} or keras_hub:PRESET.")
    if weights is not None:
        raise ValueError(f"models.build makes {name} with random weights; load {weights!r} with "
                         "tfdogs.weights.pretrained_model.")
    if name.startswith(LITE_PREFIX):
        return efficientnet_lite(int(name.removeprefix(LITE_PREFIX)), num_classes, input_shape=input_shape, **head)
    input_shape = input_shape or (224, 224, 3)
    if name == "lenet5":
        return lenet5(num_classes, input_shape=input_shape, **head)
    depth = int(name.removeprefix("resnet"))
    assert depth in STAGE_DEPTHS
    return resnet(depth, num_classes, input_shape=input_shape, **head)
