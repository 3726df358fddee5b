"""BatchNorm's fused training step (`phases.freeze_statistics`): the same step as Keras' own layer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdogs import models
from tfdogs.training import phases

SIZE = 32


def one_step(fused, precision="float32"):
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        keras.utils.set_random_seed(11)
        model = models.build("resnet18", 5, input_shape=(SIZE, SIZE, 3))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    phases.configure_phase(model, phases.Phase("all", 0, 1), freeze_bn=False)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not fused:
        for layer in norms:
            vars(layer).pop("call", None)
    assert all(("call" in vars(layer)) == fused for layer in norms)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, SIZE, SIZE, 3)).astype(np.float32)
    labels = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 8)]
    loss = model.train_on_batch(images, labels)
    return loss, [np.asarray(weight, np.float32) for weight in model.weights], model


def test_the_fused_step_trains_exactly_as_keras_batch_norm_in_float32():
    keras_loss, keras_weights, _ = one_step(fused=False)
    fused_loss, fused_weights, model = one_step(fused=True)
    assert fused_loss == pytest.approx(keras_loss, rel=1e-5)
    moved = 0
    for name, want, have in zip([weight.path for weight in model.weights], keras_weights, fused_weights):
        np.testing.assert_allclose(have, want, atol=2e-5, rtol=1e-4, err_msg=name)
        moved += "moving_variance" in name and not np.allclose(have, 1.0)
    assert moved >= 10  # the moving statistics were updated, by the same rule


def test_in_bfloat16_the_fused_step_is_as_close_to_float32_as_keras_own():
    """bfloat16 steps differ from the float32 step either way; the fused one by no more than Keras' own."""
    _, reference, _ = one_step(fused=False)
    keras_loss, keras_weights, _ = one_step(fused=False, precision="mixed_bfloat16")
    fused_loss, fused_weights, _ = one_step(fused=True, precision="mixed_bfloat16")
    assert fused_loss == pytest.approx(keras_loss, rel=2e-2)

    def distance(weights):
        return sum(float(np.abs(have - want).sum()) for have, want in zip(weights, reference))

    assert distance(fused_weights) <= 1.1 * distance(keras_weights)


def test_frozen_statistics_and_inference_are_keras_own():
    model = models.build("resnet18", 5, input_shape=(SIZE, SIZE, 3))
    phases.configure_phase(model, phases.Phase("all", 0, 1), freeze_bn=True)
    norm = next(layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    before = np.asarray(norm.moving_mean).copy()
    model(tf.random.normal((4, SIZE, SIZE, 3)), training=True)
    np.testing.assert_array_equal(np.asarray(norm.moving_mean), before)  # frozen: moving statistics kept
