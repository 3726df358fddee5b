"""BatchNorm's fused training step (`phases.freeze_statistics`): the same step as Keras' own layer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdogs import models
from tfdogs.training import phases

SIZE = 32


def build(precision, seed):
    """A small ResNet-18 under `precision`'s dtype policy, its weights drawn from `seed`."""
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        keras.utils.set_random_seed(seed)
        return models.build("resnet18", 5, input_shape=(SIZE, SIZE, 3))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def one_step(fused, precision="float32"):
    model = build(precision, 11)
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


def inference_outputs(precision, configured):
    """A ResNet-18 (non-trivial moving statistics) in inference, configured by `configure_phase` or as built."""
    model = build(precision, 5)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.uniform(-0.5, 0.5, size))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size))
            layer.gamma.assign(rng.uniform(0.5, 1.5, size))
    if configured:
        phases.configure_phase(model, phases.Phase("all", 0, 1), freeze_bn=False)
    images = tf.constant(rng.standard_normal((4, SIZE, SIZE, 3)), tf.float32)
    forward = tf.function(lambda x: model(x, training=False))
    fused = sum(op.type == "FusedBatchNormV3" for op in forward.get_concrete_function(images).graph.get_operations())
    return np.asarray(forward(images), np.float32), fused


def test_inference_is_fused_on_bfloat16_and_keras_own_in_float32():
    reference, fused_ops = inference_outputs("float32", configured=True)
    assert fused_ops == 0
    np.testing.assert_array_equal(reference, inference_outputs("float32", configured=False)[0])
    keras_bf16, fused_ops = inference_outputs("mixed_bfloat16", configured=False)
    assert fused_ops == 0
    fused_bf16, fused_ops = inference_outputs("mixed_bfloat16", configured=True)
    assert fused_ops == 20  # every BatchNormalization of ResNet-18
    # Both round float32 arithmetic to bfloat16 (here often to the same values): the fused op is no further
    # from float32 than Keras' own bfloat16 is.
    assert np.abs(fused_bf16 - reference).mean() <= 1.25 * np.abs(keras_bf16 - reference).mean()


def test_frozen_statistics_train_through_the_fused_inference_in_bfloat16():
    model = build("mixed_bfloat16", 3)
    phases.configure_phase(model, phases.Phase("all", 0, 1), freeze_bn=True)
    norm = next(layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    before = [np.asarray(norm.moving_mean).copy(), np.asarray(norm.gamma).copy()]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, SIZE, SIZE, 3)).astype(np.float32)

    def gradients(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(model(x, training=True), tf.float32))
        return tape.gradient(loss, model.trainable_variables)

    graph = tf.function(gradients).get_concrete_function(tf.constant(images)).graph
    # the backward pass of every frozen BatchNorm is the fused op's own gradient
    assert sum(op.type == "FusedBatchNormGradV3" for op in graph.get_operations()) == 20
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    model.train_on_batch(images, np.eye(5, dtype=np.float32)[rng.integers(0, 5, 8)])
    np.testing.assert_array_equal(np.asarray(norm.moving_mean), before[0])  # statistics frozen
    assert not np.allclose(np.asarray(norm.gamma), before[1])  # gamma learns through the fused op's gradient
