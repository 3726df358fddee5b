"""Transfer strategies: what each one trains, and that frozen parts provably stay put."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import small_config

from tfdogs import models, weights
from tfdogs.training import loop as training_loop, optimizer as training_optimizer

SIZE = 64


@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory):
    """A 1000-class ResNet-18 checkpoint standing in for the ImageNet one (no downloads in tests)."""
    path = tmp_path_factory.mktemp("weights") / "resnet18-imagenet-like.weights.h5"
    keras.utils.set_random_seed(1)
    models.build("resnet18", 1000, input_shape=(SIZE, SIZE, 3)).save_weights(path)
    return path


def weights_by_layer(model):
    return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in model.layers if layer.weights}


def changed(before, after, layer_name):
    return any(not np.array_equal(a, b) for a, b in zip(before[layer_name], after[layer_name]))


def run(tmp_path, pretrained_file, **overrides):
    config = small_config(model="resnet18", weights=str(pretrained_file), image_size=SIZE,
                          output=str(tmp_path / "run"), export_dir=str(tmp_path / "export"), **overrides)
    run_dir = training_loop.train(config)
    return run_dir, weights_by_layer(keras.saving.load_model(run_dir / "model.keras"))


def initial(pretrained_file):
    return weights_by_layer(weights.pretrained_model("resnet18", 4, weights=str(pretrained_file), input_shape=(SIZE, SIZE, 3)))


def test_feature_extract_trains_only_the_head(tmp_path, pretrained_file):
    before = initial(pretrained_file)
    run_dir, after = run(tmp_path, pretrained_file, strategy="feature-extract", epochs=2)
    backbone = [name for name in before if models.stage_of(name) != "head"]
    assert len(backbone) == 40  # 20 convolutions, 20 BatchNorms
    for name in backbone:  # kernels, BatchNorm scales and running statistics alike
        assert not changed(before, after, name), name
    assert changed(before, after, "fc")
    # a run from pretrained weights says that ImageNet weights may have seen its validation photos
    assert "ImageNet images" in json.loads((run_dir / "metrics.json").read_text())["imagenet_overlap"]


@pytest.mark.slow
def test_fine_tune_trains_the_head_first_then_everything(tmp_path, pretrained_file):
    before = initial(pretrained_file)
    run_dir, after = run(tmp_path, pretrained_file, strategy="fine-tune", epochs=3, head_epochs=1,
                         freeze_bn=True, learning_rate=1e-2)
    head_phase = models.build("resnet18", 4, input_shape=(SIZE, SIZE, 3))
    head_phase.load_weights(run_dir / "phase-head.weights.h5")
    head_phase = weights_by_layer(head_phase)
    assert not changed(before, head_phase, "layer1.0.conv1") and changed(before, head_phase, "fc")
    # then the whole network trains; --freeze-bn keeps the BatchNorm statistics, not gamma and beta
    for name in ("conv1", "layer1.0.conv1", "layer4.1.conv2"):
        assert changed(head_phase, after, name), name
    for name in ("bn1", "layer1.0.bn1", "layer4.1.bn2"):
        gamma, beta, moving_mean, moving_variance = after[name]
        np.testing.assert_array_equal(moving_mean, before[name][2], err_msg=name)
        np.testing.assert_array_equal(moving_variance, before[name][3], err_msg=name)
        assert not np.array_equal(gamma, before[name][0]) and not np.array_equal(beta, before[name][1]), name


@pytest.mark.slow
def test_without_freeze_bn_the_statistics_follow_the_dog_photos(tmp_path, pretrained_file):
    before = initial(pretrained_file)
    run_dir, _ = run(tmp_path, pretrained_file, strategy="fine-tune", epochs=2, head_epochs=1)
    last_epoch = models.build("resnet18", 4, input_shape=(SIZE, SIZE, 3))
    last_epoch.load_weights(run_dir / "phase-all.weights.h5")  # the best epoch may be the head phase's
    after = weights_by_layer(last_epoch)
    for name in ("bn1", "layer4.1.bn2"):
        assert not np.array_equal(after[name][2], before[name][2]), name  # moving mean updated


def test_discriminative_rates_scale_each_variables_update():
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(3, name=name) for name in ("slow", "frozen", "fast")]
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Add()([layer(inputs) for layer in layers]))
    factors = {layer.kernel.path: factor for layer, factor in zip(layers, (0.25, 0.0, 1.0))}
    optimizer = training_optimizer.make_optimizer("sgd", 0.1, 0.0, factors)
    model.compile(optimizer=optimizer, loss="mse")
    before = [np.array(layer.kernel) for layer in layers]
    model.train_on_batch(np.ones((8, 4)), np.zeros((8, 3)))
    steps = [np.array(layer.kernel) - start for layer, start in zip(layers, before)]
    np.testing.assert_allclose(steps[0], 0.25 * steps[2], rtol=1e-4, atol=1e-7)  # same gradient, a quarter of the rate
    assert np.all(steps[1] == 0) and np.abs(steps[2]).max() > 0


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_weight_decay_follows_each_variables_rate_and_spares_biases(optimizer):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    slow, fast = keras.layers.Dense(3, name="slow"), keras.layers.Dense(3, name="fast")
    model = keras.Model(inputs, keras.layers.Add()([slow(inputs), fast(inputs)]))
    for layer in (slow, fast):
        layer.bias.assign(np.ones(3))
    factors = {variable.path: 0.25 for variable in slow.weights} | {variable.path: 1.0 for variable in fast.weights}
    optimizer = training_optimizer.make_optimizer(optimizer, 0.1, 0.0, factors, weight_decay=0.5)
    before = [np.array(variable) for variable in model.trainable_variables]
    # zero gradients: whatever moves is the decay alone
    optimizer.apply_gradients([(np.zeros_like(value), variable)
                               for value, variable in zip(before, model.trainable_variables)])
    after = {variable.path: np.array(variable) for variable in model.trainable_variables}
    start = {variable.path: value for variable, value in zip(model.trainable_variables, before)}
    np.testing.assert_allclose(after[slow.kernel.path], start[slow.kernel.path] * (1 - 0.1 * 0.25 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(after[fast.kernel.path], start[fast.kernel.path] * (1 - 0.1 * 0.5), rtol=1e-6)
    for layer in (slow, fast):  # biases (and BatchNorm's gamma and beta, also of rank 1) never decay
        np.testing.assert_array_equal(after[layer.bias.path], np.ones(3))


def numpy_adamw(start, gradients, rates, weight_decay, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Keras' Adam formula in float64, each variable at its own rate, with tfdogs' decoupled decay first."""
    weights = [value.astype(np.float64) for value in start]
    first, second = [np.zeros_like(w) for w in weights], [np.zeros_like(w) for w in weights]
    for step, step_gradients in enumerate(gradients, 1):
        for i, (gradient, rate) in enumerate(zip(step_gradients, rates)):
            if weights[i].ndim > 1:
                weights[i] = weights[i] - weights[i] * rate * weight_decay
            alpha = rate * np.sqrt(1 - beta_2 ** step) / (1 - beta_1 ** step)
            first[i] += (gradient - first[i]) * (1 - beta_1)
            second[i] += (gradient.astype(np.float64) ** 2 - second[i]) * (1 - beta_2)
            weights[i] = weights[i] - first[i] * alpha / (np.sqrt(second[i]) + epsilon)
    return weights


def test_adamw_steps_each_variable_with_one_fused_kernel_as_keras_formula_does():
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 8, 16), (16,), (16, 5)]
    start = [rng.normal(size=shape).astype(np.float32) for shape in shapes]
    gradients = [[(rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 0)).astype(np.float32) for shape in shapes]
                 for _ in range(6)]
    variables = [keras.Variable(value, name=f"w{i}") for i, value in enumerate(start)]
    factors = {variables[0].path: 0.1, variables[1].path: 0.5}
    optimizer = training_optimizer.make_optimizer("adamw", 1e-2, 0.0, factors, weight_decay=0.05)
    optimizer.build(variables)
    apply = tf.function(lambda step_gradients: optimizer.apply_gradients(zip(step_gradients, variables)))
    for step_gradients in gradients:
        apply([tf.constant(gradient) for gradient in step_gradients])
    reference = numpy_adamw(start, gradients, [1e-3, 5e-3, 1e-2], 0.05)
    for variable, expected in zip(variables, reference):
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6, atol=2e-6)
    graph = apply.get_concrete_function([tf.TensorSpec(shape) for shape in shapes]).graph
    kernels = [op for op in graph.get_operations() if op.type == "ResourceApplyAdam"]
    assert len(kernels) == len(variables)  # one pass over each variable and its moments, not Keras' dozen ops


def test_weight_decay_leaves_a_frozen_backbone_untouched(tmp_path, pretrained_file):
    before = initial(pretrained_file)
    _, after = run(tmp_path, pretrained_file, strategy="feature-extract", epochs=1, optimizer="adamw",
                   weight_decay=0.5, learning_rate=0.05)
    assert not changed(before, after, "layer4.1.conv2") and not changed(before, after, "bn1")
    assert changed(before, after, "fc")


@pytest.mark.slow
def test_discriminative_run_moves_the_stem_less_than_the_head(tmp_path, pretrained_file):
    before = initial(pretrained_file)
    _, after = run(tmp_path, pretrained_file, strategy="discriminative", epochs=2, backbone_lr_factor=1e-3,
                   optimizer="sgd", learning_rate=0.05)

    def relative_change(name):
        return np.abs(after[name][0] - before[name][0]).mean() / np.abs(before[name][0]).mean()

    assert 0 < relative_change("conv1") < relative_change("layer4.1.conv2") < relative_change("fc")
