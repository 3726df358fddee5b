"""Architecture tests for tfdogs.models: shapes, names, parameter counts."""

import keras
import numpy as np
import pytest

from tfdogs import models, weights

# torchvision.models.resnet18/34(num_classes=1000): sum(p.numel() for p in parameters()).
TORCHVISION_PARAMETERS = {"resnet18": 11_689_512, "resnet34": 21_797_672}


def batch_norm_channels(model):
    return sum(layer.gamma.shape[0] for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_resnet_parameter_count_equals_torchvision(name):
    model = models.build(name, 1000)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == TORCHVISION_PARAMETERS[name]
    # Keras also counts BatchNorm's moving mean and variance (torch buffers, not parameters).
    assert model.count_params() == TORCHVISION_PARAMETERS[name] + 2 * batch_norm_channels(model)
    assert model.name == name


def test_resnet18_layer_names_follow_torchvision_state_dict():
    model = models.build("resnet18", 10, input_shape=(64, 64, 3))
    names = {layer.name for layer in model.layers}
    expected = {"conv1", "bn1", "maxpool", "avgpool", "fc"}
    for stage, blocks in enumerate(models.STAGE_DEPTHS[18], start=1):
        for block in range(blocks):
            expected |= {f"layer{stage}.{block}.{part}" for part in ("conv1", "bn1", "conv2", "bn2")}
    expected |= {f"layer{stage}.0.downsample.{i}" for stage in (2, 3, 4) for i in (0, 1)}
    assert expected <= names
    assert "layer1.0.downsample.0" not in names
    assert model.get_layer("layer2.0.downsample.0").kernel.shape == (1, 1, 64, 128)
    assert model.get_layer("layer2.0.downsample.0").strides == (2, 2)
    assert model.get_layer("conv1").kernel.shape == (7, 7, 3, 64)


def test_resnet34_block_counts_come_from_the_depth_table():
    model = models.build("resnet34", 10, input_shape=(64, 64, 3))
    names = {layer.name for layer in model.layers}
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        assert f"layer{stage}.{blocks - 1}.conv2" in names
        assert f"layer{stage}.{blocks}.conv2" not in names


def test_batch_norm_matches_torch_defaults():
    model = models.build("resnet18", 10, input_shape=(64, 64, 3))
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(n.epsilon == 1e-5 and n.momentum == 0.9 for n in norms)


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_resnet_output_shape_and_float32_logits(name):
    model = models.build(name, 7, input_shape=(64, 64, 3))
    logits = model(np.zeros((2, 64, 64, 3), "float32"), training=False)
    assert tuple(logits.shape) == (2, 7)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"


def test_resnet_accepts_any_image_size():
    model = models.build("resnet18", 5, input_shape=(None, None, 3))
    for size in (199, 224):
        assert tuple(model(np.zeros((2, size, size, 3), "float32"), training=False).shape) == (2, 5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_still_returns_float32_logits(policy):
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        model = models.build("resnet18", 3, input_shape=(64, 64, 3))
        assert model.get_layer("conv1").compute_dtype != "float32"
        logits = model(np.zeros((2, 64, 64, 3), "float32"), training=False)
        assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_head_options():
    plain = models.build("resnet18", 4, input_shape=(64, 64, 3))
    assert "dropout" not in {layer.name for layer in plain.layers}
    assert plain.get_layer("fc").kernel_regularizer is None
    model = models.build("resnet18", 4, input_shape=(64, 64, 3), dropout=0.3, l2=1e-4)
    assert model.get_layer("dropout").rate == 0.3
    regularizer = model.get_layer("fc").kernel_regularizer
    assert isinstance(regularizer, keras.regularizers.L1L2) and regularizer.l2 == pytest.approx(1e-4)
    assert [layer.name for layer in model.layers][-3:] == ["avgpool", "dropout", "fc"]


def test_stage_of():
    model = models.build("resnet18", 4, input_shape=(64, 64, 3), dropout=0.1)
    stages = {layer.name: models.stage_of(layer.name) for layer in model.layers}
    assert {stages[n] for n in ("conv1", "bn1", "relu", "maxpool", "conv1_pad")} == {"stem"}
    assert stages["layer1.0.conv1"] == "layer1" and stages["layer4.1.bn2"] == "layer4"
    assert stages["layer3.0.downsample.1"] == "layer3"
    assert {stages[n] for n in ("avgpool", "dropout", "fc")} == {"head"}
    assert set(stages.values()) == {"stem", "layer1", "layer2", "layer3", "layer4", "head"}


@pytest.mark.parametrize("size", [32, 64])
def test_lenet5_shapes(size):
    model = models.build("lenet5", 120, input_shape=(size, size, 3))
    assert model.name == "lenet5"
    assert model.get_layer("conv1").kernel.shape == (5, 5, 3, 6)
    assert model.get_layer("conv2").kernel.shape == (5, 5, 6, 16)
    assert model.get_layer("fc1").units == 120 and model.get_layer("fc2").units == 84
    side = ((size - 4) // 2 - 4) // 2
    assert model.get_layer("fc1").kernel.shape == (side * side * 16, 120)
    assert tuple(model(np.zeros((2, size, size, 3), "float32")).shape) == (2, 120)


def test_lenet5_at_32px_has_the_paper_feature_map_sizes():
    model = models.build("lenet5", 10, input_shape=(32, 32, 3))
    assert tuple(model.get_layer("pool2").output.shape) == (None, 5, 5, 16)


def test_lenet5_rejects_small_inputs():
    with pytest.raises(ValueError, match="32x32"):
        models.build("lenet5", 10, input_shape=(28, 28, 3))
    with pytest.raises(ValueError, match="fixed input size"):
        models.build("lenet5", 10, input_shape=(None, None, 3))


def test_lenet5_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="lenet5"):
        weights.pretrained_model("lenet5", 10, weights="imagenet", input_shape=(32, 32, 3))


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="resnet50.*lenet5.*resnet18.*resnet34"):
        models.build("resnet50", 10)
