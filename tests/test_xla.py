"""XLA: the models compile with `jit_compile`, as the GPU defaults (XLA + mixed float16) need.

A full XLA training step of a ResNet takes about a minute to compile on two
CPU cores, so LeNet-5 runs `fit` under XLA while the ResNets are lowered to
XLA's HLO: the step that fails when an op has no XLA kernel.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdogs import models
from tfdogs.training import devices, optimizer as training_optimizer


def compiled_model(name, size, policy="float32", jit_compile=True, dropout=0.2):
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        model = models.build(name, 4, input_shape=(size, size, 3), dropout=dropout)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    model.compile(optimizer=training_optimizer.make_optimizer("adam", 1e-3, 0.9, {}),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")], jit_compile=jit_compile)
    return model


def batch(size, count=4):
    rng = np.random.default_rng(0)
    return rng.standard_normal((count, size, size, 3)).astype("float32"), np.arange(count) % 4


def test_lenet_trains_under_xla_and_keras_keeps_xla_on():
    images, labels = batch(32, 8)
    model = compiled_model("lenet5", 32)
    history = model.fit(images, labels, batch_size=4, epochs=2, verbose=0)
    # Keras turns jit_compile off for a model it cannot compile; a failed XLA compilation raises.
    assert model.jit_compile is True
    assert np.isfinite(history.history["loss"]).all()
    # Without dropout's random numbers (drawn differently under XLA), XLA computes what the graph does.
    with_xla, without_xla = (compiled_model("lenet5", 32, jit_compile=jit, dropout=0.0) for jit in (True, False))
    losses = [run.fit(images, labels, batch_size=4, epochs=2, verbose=0).history["loss"]
              for run in (with_xla, without_xla)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_resnet_training_step_lowers_to_xla(name, policy):
    model = compiled_model(name, 32, policy)
    assert model.jit_compile is True
    loss_function = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(jit_compile=True)
    def gradients(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_function(labels, model(images, training=True))
        return tape.gradient(loss, model.trainable_variables)

    images, labels = batch(32)
    hlo = gradients.experimental_get_compiler_ir(tf.constant(images), tf.constant(labels))(stage="hlo")
    assert "convolution" in hlo
    if policy == "mixed_float16":
        assert "f16[" in hlo  # the convolutions really run in half precision


def test_gpu_defaults_are_xla_and_mixed_float16(monkeypatch):
    from conftest import small_config

    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    runtime = devices.resolve_runtime(small_config())
    assert (runtime["device"], runtime["jit_compile"], runtime["precision"]) == ("GPU", True, "mixed_float16")
    assert runtime["frozen_precision"] == "mixed_float16"


@pytest.mark.parametrize("model_name, native_bfloat16, expected, frozen", [
    ("resnet18", True, "mixed_bfloat16", "mixed_bfloat16"), ("resnet34", True, "mixed_bfloat16", "mixed_bfloat16"),
    ("efficientnet_lite0", True, "float32", "mixed_bfloat16"), ("lenet5", True, "float32", "float32"),
    ("resnet18", False, "float32", "float32"), ("efficientnet_lite0", False, "float32", "float32")])
def test_cpu_defaults_are_no_xla_and_bfloat16_only_where_it_pays(monkeypatch, model_name, native_bfloat16, expected,
                                                               frozen):
    from conftest import small_config

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: native_bfloat16)
    runtime = devices.resolve_runtime(small_config(model=model_name, image_size=64))
    assert (runtime["device"], runtime["jit_compile"], runtime["precision"]) == ("CPU", False, expected)
    assert runtime["frozen_precision"] == frozen  # a frozen backbone, as inference
    named = devices.resolve_runtime(small_config(model=model_name, image_size=64, precision="float32"))
    assert named["precision"] == named["frozen_precision"] == "float32"
