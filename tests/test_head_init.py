"""--head-init imagenet: the new classifier's columns start from the weights' ImageNet classifier."""

import keras
import numpy as np
import pytest
from conftest import small_config

from tfdogs import models, weights
from tfdogs.training import loop as training_loop

BREEDS = ["beagle", "poodle", "dachshund"]  # one ImageNet class, three (toy, miniature, standard), none


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """A 1000-class ResNet-18 checkpoint with a random classifier and bias, and that classifier."""
    keras.utils.set_random_seed(2)
    model = models.build("resnet18", 1000, input_shape=(64, 64, 3))
    kernel, _ = model.get_layer("fc").get_weights()
    bias = np.random.default_rng(3).normal(size=1000).astype(np.float32)
    model.get_layer("fc").set_weights([kernel, bias])
    path = tmp_path_factory.mktemp("weights") / "imagenet-like.weights.h5"
    model.save_weights(path)
    return path, kernel, bias


def expected_head(kernel, bias):
    """Each breed's column and bias, computed here from the rule in NumPy."""
    poodles, dogs = [265, 266, 267], list(range(151, 269))
    columns = np.stack([kernel[:, 162], kernel[:, poodles].mean(1), kernel[:, dogs].mean(1)], 1)
    return columns, np.array([bias[162], np.log(np.exp(bias[poodles].astype(np.float64)).sum()), bias[dogs].mean()])


@pytest.mark.parametrize("head_init", ["imagenet", "random"])
def test_the_flag_starts_the_classifier_from_the_imagenet_rows_or_at_random(imagenet_like, head_init, tmp_path):
    path, kernel, bias = imagenet_like
    config = small_config(model="resnet18", weights=str(path), strategy="fine-tune", image_size=64,
                          head_init=head_init, output=str(tmp_path / "run"))
    keras.utils.set_random_seed(0)
    model = training_loop.build_model(config, len(BREEDS), config["weights"], BREEDS)
    new_kernel, new_bias = model.get_layer("fc").get_weights()
    columns, biases = expected_head(kernel, bias)
    if head_init == "imagenet":
        np.testing.assert_allclose(new_kernel, columns, rtol=1e-6)
        np.testing.assert_allclose(new_bias, biases, rtol=1e-5)
    else:
        assert not np.allclose(new_kernel, columns) and np.all(new_bias == 0)


def test_weights_without_an_imagenet_classifier_keep_the_random_start(tmp_path):
    keras.utils.set_random_seed(2)
    path = tmp_path / "ten-classes.weights.h5"
    models.build("resnet18", 10, input_shape=(64, 64, 3)).save_weights(path)
    keras.utils.set_random_seed(0)
    started = weights.pretrained_model("resnet18", 3, str(path), input_shape=(64, 64, 3),
                                       head_from_imagenet=BREEDS)
    keras.utils.set_random_seed(0)
    plain = weights.pretrained_model("resnet18", 3, str(path), input_shape=(64, 64, 3))
    for ours, theirs in zip(started.get_layer("fc").get_weights(), plain.get_layer("fc").get_weights()):
        np.testing.assert_array_equal(ours, theirs)


def test_a_keras_hub_imagenet_classifier_preset_starts_the_head_from_its_own_classifier(tmp_path):
    import keras_hub
    from test_hub import tiny_backbone

    keras.utils.set_random_seed(4)
    classifier = keras_hub.models.ResNetImageClassifier(backbone=tiny_backbone(), num_classes=1000)
    dense = [layer for layer in classifier.layers if isinstance(layer, keras.layers.Dense)][-1]
    kernel, _ = dense.get_weights()
    bias = np.random.default_rng(5).normal(size=1000).astype(np.float32)
    dense.set_weights([kernel, bias])
    classifier.save_to_preset(str(tmp_path / "classifier"))
    model = weights.pretrained_model(f"keras_hub:{tmp_path / 'classifier'}", 3, "preset", input_shape=(64, 64, 3),
                                     head_from_imagenet=BREEDS)
    columns, biases = expected_head(kernel, bias)
    new_kernel, new_bias = model.get_layer("fc").get_weights()
    np.testing.assert_allclose(new_kernel, columns, rtol=1e-6)
    np.testing.assert_allclose(new_bias, biases, rtol=1e-5)
