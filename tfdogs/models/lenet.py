"""LeNet-5, the from-scratch baseline.

LeCun, Bottou, Bengio and Haffner, "Gradient-Based Learning Applied to Document
Recognition", Proc. IEEE 1998: http://yann.lecun.com/exdb/publis/pdf/lecun-01a.pdf

Adapted to RGB input of any fixed size from 32 px up: C1 (6 maps, 5x5) -> S2
(2x2 average pool) -> C3 (16 maps, 5x5) -> S4 (2x2 average pool) -> C5 (120
units) -> F6 (84 units) -> fc (logits). The paper's trainable subsampling
coefficients, sparse C3 connection table and RBF output layer are replaced by
plain average pooling, a full C3 and a linear softmax layer, as is usual today.
At 32 px, C5 sees 5x5x16 maps exactly as in the paper; larger inputs widen C5.

Example:
    >>> model = lenet5(num_classes=120, input_shape=(64, 64, 3))
"""

import keras
from keras import layers

from tfdogs.models.resnet import classifier_head

MIN_INPUT_SIZE = 32


def lenet5(num_classes, *, input_shape=(32, 32, 3), activation="tanh", dropout=0.0, l1=0.0, l2=0.0):
    """Builds LeNet-5 for RGB images.

    Paper: http://yann.lecun.com/exdb/publis/pdf/lecun-01a.pdf

    Args:
        num_classes: width of the ``fc`` logits layer.
        input_shape: NHWC shape without the batch axis; height and width must be
            known and at least `MIN_INPUT_SIZE` (32) pixels.
        activation: ``"tanh"`` as in the paper, or ``"relu"``.
        dropout: dropout rate before ``fc`` (no layer when 0).
        l1: L1 penalty on the ``fc`` kernel.
        l2: L2 penalty on the ``fc`` kernel.

    Returns:
        A functional `keras.Model` named ``"lenet5"`` that maps normalised
        float images to logits.

    Raises:
        ValueError: if the input is smaller than 32x32 or has unknown size.
    """
    height, width = input_shape[0], input_shape[1]
    if height is None or width is None:
        raise ValueError(
            f"lenet5 needs a fixed input size (its C5 layer is dense), got input_shape={input_shape}."
        )
    if min(height, width) < MIN_INPUT_SIZE:
        raise ValueError(
            f"lenet5 needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, "
            f"got {height}x{width}."
        )
    inputs = keras.Input(shape=input_shape, name="images")
    x = layers.Conv2D(6, 5, activation=activation, name="conv1")(inputs)  # C1
    x = layers.AveragePooling2D(2, name="pool1")(x)  # S2
    x = layers.Conv2D(16, 5, activation=activation, name="conv2")(x)  # C3
    x = layers.AveragePooling2D(2, name="pool2")(x)  # S4
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(120, activation=activation, name="fc1")(x)  # C5
    x = layers.Dense(84, activation=activation, name="fc2")(x)  # F6
    outputs = classifier_head(x, num_classes, dropout=dropout, l1=l1, l2=l2)
    return keras.Model(inputs, outputs, name="lenet5")
