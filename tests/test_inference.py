"""Inference rewrites: folded BatchNorms give the model's answers with fewer ops."""

import keras
import numpy as np
import pytest

from tfdogs import models
from tfdogs.serving import fold


def with_trained_statistics(model, seed=0):
    """Moves every BatchNorm away from its identity initialisation, as training would."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            shape = gamma.shape
            layer.set_weights([gamma * rng.uniform(0.5, 1.5, shape), beta + rng.normal(0, 0.1, shape),
                               mean + rng.normal(0, 0.1, shape), variance * rng.uniform(0.5, 2.0, shape)])
    return model


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_folded_resnet_answers_like_the_original_without_batch_norms(name):
    keras.utils.set_random_seed(0)
    model = with_trained_statistics(models.build(name, 10, input_shape=(64, 64, 3)))
    folded = fold.fold_batch_norms(model)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert [layer.name for layer in folded.layers] == [layer.name for layer in model.layers]
    assert folded.get_layer("conv1").use_bias and not model.get_layer("conv1").use_bias
    images = np.random.default_rng(1).standard_normal((4, 64, 64, 3)).astype("float32")
    expected = model(images, training=False).numpy()
    np.testing.assert_allclose(folded(images, training=False).numpy(), expected, rtol=1e-4, atol=1e-4)
    assert model.count_params() > folded.count_params()  # 4 numbers per channel became 1 bias


def test_folding_keeps_a_mixed_bfloat16_model_in_bfloat16():
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = with_trained_statistics(models.build("resnet18", 10, input_shape=(64, 64, 3)))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    folded = fold.fold_batch_norms(model)
    assert folded.get_layer("layer1.0.conv1").compute_dtype == "bfloat16"
    images = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype("float32")
    logits = folded(images, training=False).numpy()
    assert logits.dtype == np.float32
    reference = model(images, training=False).numpy()
    # bfloat16 keeps 8 significant bits; the fold rounds the kernel once more
    assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max() + 0.05


def test_a_float32_model_folded_into_bfloat16_answers_as_the_model_built_in_bfloat16():
    keras.utils.set_random_seed(0)
    model = with_trained_statistics(models.build("resnet18", 10, input_shape=(64, 64, 3)))
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        built_in_bfloat16 = models.build("resnet18", 10, input_shape=(64, 64, 3))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    built_in_bfloat16.set_weights(model.get_weights())
    backbone = keras.Model(model.inputs, model.get_layer("avgpool").output)
    reference = keras.Model(built_in_bfloat16.inputs, built_in_bfloat16.get_layer("avgpool").output)
    folded = fold.fold_batch_norms(backbone, dtype_policy="mixed_bfloat16")
    assert folded.inputs[0].dtype == "float32"  # the images stay float32; the first convolution casts them
    images = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype("float32")
    features = np.asarray(folded(images, training=False))
    assert str(features.dtype) == "bfloat16"
    expected = np.asarray(fold.fold_batch_norms(reference)(images, training=False), np.float32)
    np.testing.assert_array_equal(features.astype(np.float32), expected)  # the same bfloat16 network
    float32_features = np.asarray(fold.fold_batch_norms(backbone)(images, training=False))
    assert np.abs(features.astype(np.float32) - float32_features).max() > 1e-4  # rounded: not the float32 copy


def test_a_model_without_batch_norm_is_copied_unchanged():
    keras.utils.set_random_seed(0)
    model = models.build("lenet5", 4, input_shape=(32, 32, 3))
    folded = fold.fold_batch_norms(model)
    assert folded is not model
    for original, copy in zip(model.get_weights(), folded.get_weights()):
        np.testing.assert_array_equal(original, copy)


class Unrebuildable(keras.layers.Layer):
    """A layer whose config cannot rebuild it (as keras-hub's ViT patch embedding)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), initializer="glorot_uniform")

    def call(self, inputs):
        return keras.ops.matmul(inputs, self.kernel)

    def get_config(self):
        return {**super().get_config(), "width": self.units}  # not the constructor's argument


def test_folding_shares_a_layer_it_cannot_rebuild_and_still_folds_the_rest():
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = Unrebuildable(5, name="custom")(x)
    model = keras.Model(inputs, outputs)
    norm = model.get_layer("bn")
    norm.moving_mean.assign(np.random.default_rng(0).normal(0, 0.5, 4))
    norm.moving_variance.assign(np.random.default_rng(1).uniform(0.5, 2.0, 4))
    with pytest.raises(TypeError):
        Unrebuildable.from_config(model.get_layer("custom").get_config())
    folded = fold.fold_batch_norms(model)
    assert folded.get_layer("custom") is model.get_layer("custom")  # shared, not rebuilt
    assert isinstance(folded.get_layer("bn"), fold.PassThrough)
    images = np.random.default_rng(2).normal(size=(3, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(folded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)


def test_the_counts_say_which_batch_norms_were_folded_and_which_were_left():
    inputs = keras.Input((8, 8, 3), name="images")
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, use_bias=False)(inputs))  # foldable
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(x))  # after a biased convolution: left
    x = keras.layers.BatchNormalization()(keras.layers.ReLU()(x))  # after an activation: left
    folded = fold.fold_batch_norms(keras.Model(inputs, x))
    assert fold.folding_counts([folded, folded]) == {"folded": 2, "left": 4}
