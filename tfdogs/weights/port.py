"""Converts torchvision / timm ResNet state dicts into the Keras models.

The Keras layers carry the torchvision module names, so the conversion is a
name map plus two layout changes: convolution kernels go from torch's OIHW to
Keras' HWIO, and the ``fc`` weight is transposed. BatchNorm's
``weight / bias / running_mean / running_var`` become ``gamma / beta /
moving_mean / moving_variance``; ``num_batches_tracked`` is dropped. timm's
``resnet18`` / ``resnet34`` use the same BasicBlock and the same key names
(``conv1``, ``bn1``, ``layerN.i.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}``,
``fc``), so one map serves both sources.

EfficientNet-Lite's Keras layers carry the keys of the ``efficientnet-lite-pytorch``
state dicts behind a stage prefix and without their underscores
(``layer3.blocks.7.depthwise_conv`` is ``_blocks.7._depthwise_conv``, ``fc`` is
``_fc``); depthwise kernels go from torch's (channels, 1, H, W) to Keras' (H, W, channels, 1).

Conversion fails loudly (`PortError`): every checkpoint key must be consumed,
every Keras weight assigned and every shape must match, or nothing is assigned.

The command line is `python -m tfdogs.port`.
"""

import pathlib
import re

import numpy as np
from keras import layers

from tfdogs.models import stage_of
from tfdogs.weights.pth import load_state_dict

IGNORED_SUFFIXES = (".num_batches_tracked",)


class PortError(ValueError):
    """The checkpoint and the Keras model do not correspond one to one."""


def read_checkpoint(path):
    """Reads a torch state dict from ``.pth``/``.pt``/``.bin`` or ``.safetensors``.

    Args:
        path: checkpoint file.

    Returns:
        ``dict[str, np.ndarray]``.
    """
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin"):
        return load_state_dict(path)
    raise PortError(f"Unknown checkpoint format {path.name!r}: expected .pth, .pt, .bin or .safetensors.")


def _conv_kernel(value):
    return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO


def _dense_kernel(value):
    return np.transpose(value)  # (out, in) -> (in, out)


def _depthwise_kernel(value):
    return np.transpose(value, (2, 3, 0, 1))  # (C, 1, H, W) -> (H, W, C, 1)


def _identity(value):
    return value


_STAGE_PREFIX = re.compile(r"^layer[1-4]\.")


def torch_key(model_name, layer_name):
    """The torch state-dict module name of a Keras layer of model `model_name` (e.g. ``"efficientnet_lite0"``).

    A ResNet's layers are named as torchvision's modules. EfficientNet-Lite's drop the stage and put back
    the underscore before each module name: ``layer4.blocks.15.bn2`` is ``_blocks.15._bn2``.
    """
    if not model_name.startswith("efficientnet_lite"):
        return layer_name
    parts = _STAGE_PREFIX.sub("", layer_name).split(".")
    return ".".join(part if part.isdigit() else f"_{part}" for part in parts)


def torch_names(model):
    """Maps each torch state-dict key to the Keras variable it fills.

    Args:
        model: a ResNet or EfficientNet-Lite built by `tfdogs.models.build`.

    Returns:
        ``{torch_key: (keras_layer_name, variable, layout_fn)}`` in layer order.
    """
    mapping = {}
    for layer in model.layers:
        if isinstance(layer, layers.Flatten):
            raise PortError(
                f"Model {model.name!r} flattens feature maps; NCHW and NHWC flatten in "
                "different orders, so torch checkpoints cannot be ported into it."
            )
        if isinstance(layer, layers.DepthwiseConv2D):
            if layer.depth_multiplier != 1:
                raise PortError(f"Layer {layer.name!r} has depth multiplier {layer.depth_multiplier}; only 1 ports.")
            variables = {"weight": (layer.kernel, _depthwise_kernel)}
        elif isinstance(layer, layers.Conv2D):
            variables = {"weight": (layer.kernel, _conv_kernel)}
        elif isinstance(layer, layers.Dense):
            variables = {"weight": (layer.kernel, _dense_kernel)}
        elif isinstance(layer, layers.BatchNormalization):
            variables = {
                "weight": (layer.gamma, _identity),
                "bias": (layer.beta, _identity),
                "running_mean": (layer.moving_mean, _identity),
                "running_var": (layer.moving_variance, _identity),
            }
        elif layer.weights:
            raise PortError(f"No torch equivalent known for layer {layer.name!r} ({type(layer).__name__}).")
        else:
            continue
        if getattr(layer, "use_bias", False):
            variables["bias"] = (layer.bias, _identity)
        key = torch_key(model.name, layer.name)
        for suffix, (variable, layout) in variables.items():
            mapping[f"{key}.{suffix}"] = (layer.name, variable, layout)
    return mapping


def convert_state_dict(model, state_dict, *, include_head):
    """Assigns a torch ResNet state dict to a Keras ResNet, all or nothing.

    Args:
        model: a ResNet built by `tfdogs.models.build`.
        state_dict: ``{torch_key: array}``, e.g. from `read_checkpoint`.
        include_head: also assign ``fc``; when False the checkpoint's ``fc.*``
            keys are dropped and the model's ``fc`` keeps its weights.

    Raises:
        PortError: checkpoint keys the model lacks, model weights the checkpoint
            lacks, or shape mismatches; it lists every offending key, and the
            model is left untouched.
    """
    every_name = torch_names(model)
    # BatchNorm's step counter has no Keras counterpart; drop it for known layers only.
    ignored = {
        key
        for key in state_dict
        if key.endswith(IGNORED_SUFFIXES) and f"{key.rsplit('.', 1)[0]}.running_mean" in every_name
    }
    expected = every_name
    if not include_head:
        expected = {key: value for key, value in every_name.items() if stage_of(value[0]) != "head"}
        ignored |= set(every_name) - set(expected)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected) - ignored)
    if missing or unexpected:
        raise PortError(
            f"Checkpoint does not match {model.name!r}: "
            f"{len(missing)} model weights missing from the checkpoint {missing}; "
            f"{len(unexpected)} checkpoint keys unused by the model {unexpected}."
        )
    converted, mismatched = {}, []
    for key, (_, variable, layout) in expected.items():
        raw = np.asarray(state_dict[key])
        value = layout(raw)
        if tuple(value.shape) != tuple(variable.shape):
            mismatched.append(
                f"{key}: checkpoint {tuple(raw.shape)}, i.e. {tuple(value.shape)} in Keras layout, "
                f"but the model needs {tuple(variable.shape)}"
            )
        converted[key] = value
    if mismatched:
        raise PortError(f"Shape mismatch porting into {model.name!r}: " + "; ".join(mismatched))
    for key, (_, variable, _) in expected.items():
        variable.assign(converted[key].astype(variable.dtype))


def checkpoint_num_classes(state_dict):
    """Rows of the checkpoint's classifier weight (``fc.weight`` or ``_fc.weight``: its class count), or None."""
    weight = next((state_dict[key] for key in ("fc.weight", "_fc.weight") if key in state_dict), None)
    return None if weight is None else int(weight.shape[0])
