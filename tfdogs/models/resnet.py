"""ResNet-18 and ResNet-34, layer for layer the torchvision networks.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016:
https://arxiv.org/abs/1512.03385

Layer names repeat the torchvision state-dict keys (``conv1``, ``bn1``,
``layer2.0.downsample.0`` ... ``fc``) so that weight conversion
(`tfdogs.port`) is a name map. This module never imports torch.

Example:
    >>> model = resnet(18, num_classes=120)
    >>> model.get_layer("layer4.1.conv2").kernel.shape
    (3, 3, 512, 512)
"""

import keras
from keras import layers

# The one table that defines the family: BasicBlocks per stage.
STAGE_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
STAGE_FILTERS = (64, 128, 256, 512)

# PyTorch BatchNorm2d defaults; Keras momentum is 1 - torch's momentum (0.1).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def conv_initializer():
    """torchvision's ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``.

    Keras' ``he_normal`` draws from a truncated normal over fan-in; torchvision
    draws from an untruncated normal over fan-out.
    """
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )


def batch_norm(x, name):
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)(x)


def conv(x, filters, kernel_size, stride, name):
    """Bias-free convolution with torch's symmetric ``padding=kernel_size // 2``."""
    if stride > 1 and kernel_size > 1:
        # The padding between torch and TensorFlow differs when strides > 1:
        # TF "same" pads bottom/right only, torch pads both sides; pad explicitly.
        x = layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        # Stride 1 with an odd kernel (or a 1x1 kernel): "same" equals torch's padding.
        padding = "same" if kernel_size > 1 else "valid"
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding=padding,
        use_bias=False,
        kernel_initializer=conv_initializer(),
        name=name,
    )(x)


def basic_block(x, filters, stride, name):
    """torchvision's ``BasicBlock``: two 3x3 convolutions and a shortcut.

    Args:
        x: input tensor, NHWC.
        filters: output channels of both convolutions.
        stride: stride of the first convolution (2 opens stages 2-4).
        name: block prefix, e.g. ``"layer2.0"``.

    Returns:
        The block's output tensor.
    """
    shortcut = x
    y = conv(x, filters, 3, stride, name=f"{name}.conv1")
    y = batch_norm(y, name=f"{name}.bn1")
    y = layers.ReLU(name=f"{name}.relu1")(y)
    y = conv(y, filters, 3, 1, name=f"{name}.conv2")
    y = batch_norm(y, name=f"{name}.bn2")
    if stride != 1 or x.shape[-1] != filters:
        shortcut = conv(x, filters, 1, stride, name=f"{name}.downsample.0")
        shortcut = batch_norm(shortcut, name=f"{name}.downsample.1")
    y = layers.Add(name=f"{name}.add")([y, shortcut])
    return layers.ReLU(name=f"{name}.relu2")(y)


def stem(x):
    """7x7/2 convolution, BatchNorm, ReLU and 3x3/2 max-pool (``conv1`` .. ``maxpool``)."""
    x = conv(x, 64, 7, 2, name="conv1")
    x = batch_norm(x, name="bn1")
    x = layers.ReLU(name="relu")(x)
    # torch pads the max-pool with -inf; after a ReLU every value is >= 0, so zeros
    # are equivalent, and explicit padding + "valid" matches torch's window placement.
    x = layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    return layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool")(x)


def classifier_head(x, num_classes, dropout=0.0, l1=0.0, l2=0.0):
    """Dropout (when asked for) and the ``fc`` logits layer, always float32.

    torchvision initialises ``nn.Linear`` uniformly in +-1/sqrt(fan_in); the
    VarianceScaling below is that distribution for the kernel.
    """
    if dropout > 0:
        x = layers.Dropout(dropout, name="dropout")(x)
    regularizer = keras.regularizers.L1L2(l1=l1, l2=l2) if (l1 > 0 or l2 > 0) else None
    return layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.VarianceScaling(
            scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
        ),
        kernel_regularizer=regularizer,
        # float32 logits under mixed_float16 / mixed_bfloat16 policies.
        dtype="float32",
        name="fc",
    )(x)


def resnet(depth, num_classes, *, input_shape=(224, 224, 3), dropout=0.0, l1=0.0, l2=0.0):
    """Builds ResNet-18 or ResNet-34 exactly as torchvision does.

    Paper: https://arxiv.org/abs/1512.03385

    Args:
        depth: 18 or 34, a key of `STAGE_DEPTHS`.
        num_classes: width of the ``fc`` logits layer.
        input_shape: NHWC shape without the batch axis; spatial dims may be None.
        dropout: dropout rate before ``fc`` (no layer when 0).
        l1: L1 penalty on the ``fc`` kernel.
        l2: L2 penalty on the ``fc`` kernel.

    Returns:
        A functional `keras.Model` named ``f"resnet{depth}"`` that maps
        ImageNet-normalised float images to logits.
    """
    if depth not in STAGE_DEPTHS:
        raise ValueError(f"ResNet depth must be one of {sorted(STAGE_DEPTHS)}, got {depth}.")
    inputs = keras.Input(shape=input_shape, name="images")
    x = stem(inputs)
    for stage, (blocks, filters) in enumerate(zip(STAGE_DEPTHS[depth], STAGE_FILTERS), start=1):
        for block in range(blocks):
            stride = 2 if (stage > 1 and block == 0) else 1
            x = basic_block(x, filters, stride, name=f"layer{stage}.{block}")
    x = layers.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = classifier_head(x, num_classes, dropout=dropout, l1=l1, l2=l2)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")
