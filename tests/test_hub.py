"""keras-hub backbones (--model keras_hub:PRESET): stages, strategies, preprocessing, export, offline errors.

The presets are tiny random keras-hub ResNets written by `save_to_preset` into
temporary folders: a Backbone alone, and an ImageClassifier that carries its
image converter. Nothing is downloaded.
"""

import json
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import small_config

from tfdogs import data, models, weights
from tfdogs.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from tfdogs.training import loop as training_loop, phases as training_phases

SIZE = 32
STAGE_ORDER = {stage: index for index, stage in enumerate(training_phases.STAGES)}


def tiny_backbone():
    import keras_hub

    # keras-hub's ResNet wants 64 filters first; the rest are kept small.
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 8, 8, 8],
        stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(None, None, 3))


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    """{"backbone": DIR, "classifier": DIR}: a tiny random Backbone alone, and as an ImageClassifier with a converter."""
    import keras_hub

    base = tmp_path_factory.mktemp("presets")
    keras.utils.set_random_seed(2)
    backbone = tiny_backbone()
    # Non-trivial BatchNorm statistics, so that frozen ones and folded ones are tested for real.
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(np.random.default_rng(0).normal(0, 0.1, channels))
            layer.moving_variance.assign(np.random.default_rng(1).uniform(0.5, 1.5, channels))
    backbone.save_to_preset(str(base / "backbone"))
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(SIZE, SIZE), scale=[1 / (255 * s) for s in IMAGENET_STD],
        offset=[-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], interpolation="bicubic")
    classifier = keras_hub.models.ResNetImageClassifier(
        backbone=backbone, num_classes=7,
        preprocessor=keras_hub.models.ResNetImageClassifierPreprocessor(image_converter=converter))
    classifier.save_to_preset(str(base / "classifier"))
    return {"backbone": base / "backbone", "classifier": base / "classifier"}


def hub_name(presets, kind="backbone"):
    return f"keras_hub:{presets[kind]}"


def weights_by_layer(model):
    return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in model.layers if layer.weights}


def run(tmp_path, presets, kind="backbone", **overrides):
    settings = dict(model=hub_name(presets, kind), weights="preset", image_size=SIZE, batch_size=8, epochs=2,
                    precision="float32", output=str(tmp_path / "run"), export_dir=str(tmp_path / "export"))
    config = small_config(**{**settings, **overrides})
    return training_loop.train(config)


def test_config_accepts_keras_hub_models_and_their_weights(presets):
    config = small_config(model=hub_name(presets), weights="auto", strategy="auto")
    assert config["weights"] == "preset" and config["strategy"] == "fine-tune"
    from tfdogs import config as config_lib

    with pytest.raises(config_lib.ConfigError, match="'weights'"):
        small_config(model=hub_name(presets), weights="imagenet", strategy="auto")
    with pytest.raises(config_lib.ConfigError, match="'model'"):
        small_config(model="keras_hub:", weights="auto")
    assert models.file_name(hub_name(presets)) == "keras_hub-backbone"


def test_the_model_has_the_tfdogs_head_and_ordered_stages(presets):
    model = models.build(hub_name(presets), 5, weights="preset", input_shape=(SIZE, SIZE, 3), dropout=0.2)
    assert [layer.name for layer in model.layers[-3:]] == ["avgpool", "dropout", "fc"]
    assert model.get_layer("fc").dtype == "float32" and model.output.shape == (None, 5)
    # the preset's weights are loaded: the same as the backbone's own
    import keras_hub

    backbone = keras_hub.models.Backbone.from_preset(str(presets["backbone"]))
    loaded = [w for layer in model.layers if models.stage_of(layer.name) != "head" for w in layer.get_weights()]
    np.testing.assert_array_equal(np.concatenate([w.ravel() for w in loaded]),
                                  np.concatenate([np.asarray(w).ravel() for w in backbone.get_weights()]))
    # stages follow the network's order: stem first, then layer1 .. layer4, then the head
    weighted = [models.stage_of(layer.name) for layer in model.layers if layer.weights]
    assert weighted == sorted(weighted, key=STAGE_ORDER.get)
    assert set(weighted) == set(training_phases.STAGES)
    assert models.stage_of("stem.conv1_conv") == "stem" and models.stage_of("layer2.stack1_block0_1_conv") == "layer2"
    # discriminative rates rise from the stem to the head
    phase, = training_phases.plan_phases(small_config(model=hub_name(presets), weights="preset", strategy="discriminative",
                                            backbone_lr_factor=0.01))
    factors = training_phases.configure_phase(model, phase, freeze_bn=False)
    by_stage = {}
    for layer in model.layers:
        for variable in layer.trainable_weights:
            by_stage.setdefault(models.stage_of(layer.name), set()).add(factors[variable.path])
    rates = [by_stage[stage] for stage in training_phases.STAGES]
    assert all(len(rate) == 1 for rate in rates)
    rates = [rate.pop() for rate in rates]
    assert rates[0] == pytest.approx(0.01) and rates[-1] == 1.0 and rates == sorted(rates)
    assert len(set(rates)) == len(rates)


def test_feature_extract_trains_only_the_head(tmp_path, presets, capsys):
    before = weights_by_layer(models.build(hub_name(presets), 4, weights="preset", input_shape=(SIZE, SIZE, 3)))
    run_dir = run(tmp_path, presets, strategy="feature-extract")
    after = weights_by_layer(keras.saving.load_model(run_dir / "model.keras"))
    backbone = [name for name in before if models.stage_of(name) != "head"]
    assert len(backbone) == 24  # 12 convolutions, 12 BatchNorms
    for name in backbone:  # kernels and BatchNorm statistics alike
        assert all(np.array_equal(a, b) for a, b in zip(before[name], after[name])), name
    assert not np.array_equal(before["fc"][0], after["fc"][0])
    # a Backbone saved alone has no converter: ImageNet's preprocessing, and the output says so
    assert "has no image converter" in capsys.readouterr().out
    record = Preprocessing.load(run_dir / "preprocessing.json")
    assert record == weights.REGISTRY[("resnet18", "torchvision")].preprocessing(SIZE)
    assert run_dir.name == "run" and json.loads((run_dir / "metrics.json").read_text())["model"] == hub_name(presets)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fine-tune", "discriminative"])
def test_fine_tune_and_discriminative_train_the_backbone(tmp_path, presets, strategy):
    before = weights_by_layer(models.build(hub_name(presets), 4, weights="preset", input_shape=(SIZE, SIZE, 3)))
    run_dir = run(tmp_path, presets, strategy=strategy, epochs=2, head_epochs=1, freeze_bn=True, learning_rate=1e-2)
    after = weights_by_layer(keras.saving.load_model(run_dir / "model.keras"))
    norms = [name for name in before if name.endswith("_bn")]
    convolutions = [name for name in before if name.endswith("_conv")]
    assert len(norms) == len(convolutions) == 12
    for name in norms:  # --freeze-bn: moving statistics fixed, gamma and beta train
        gamma, beta, mean, variance = before[name]
        assert np.array_equal(mean, after[name][2]) and np.array_equal(variance, after[name][3]), name
    assert all(not np.array_equal(before[name][0], after[name][0]) for name in convolutions)
    assert any(not np.array_equal(before[name][0], after[name][0]) for name in norms)
    if strategy == "fine-tune":
        head_phase = models.build(hub_name(presets), 4, input_shape=(SIZE, SIZE, 3))
        head_phase.load_weights(run_dir / "phase-head.weights.h5")
        head_only = weights_by_layer(head_phase)
        assert all(np.array_equal(before[name][0], head_only[name][0]) for name in convolutions)


def test_classifier_preset_brings_its_preprocessing_and_serves_like_keras(tmp_path, presets):
    run_dir = run(tmp_path, presets, kind="classifier", strategy="feature-extract", epochs=1)
    record = Preprocessing.load(run_dir / "preprocessing.json")
    np.testing.assert_allclose(record.mean, IMAGENET_MEAN, atol=1e-12)
    np.testing.assert_allclose(record.std, IMAGENET_STD, atol=1e-12)
    assert (record.image_size, record.crop_fraction, record.interpolation) == (SIZE, 1.0, "bicubic")
    export_dir = json.loads((run_dir / "metrics.json").read_text())["export"]
    assert json.loads((pathlib_path(export_dir) / "tfdogs.json").read_text())["preprocessing"] == record.as_dict()
    paths = sorted((run_dir / "synthetic_data" / "train").glob("*.jpg"))[:3]
    images = np.stack([data.preprocess_eval(tf.io.decode_image(path.read_bytes(), channels=3,
                                                               expand_animations=False), **record.as_dict())
                       for path in paths])
    expected = tf.nn.softmax(keras.saving.load_model(run_dir / "model.keras").predict(images, verbose=0)).numpy()
    served = subprocess.run([sys.executable, "-c", FRESH_PROCESS, export_dir, *map(str, paths)],
                            capture_output=True, text=True, check=True)
    reply = json.loads(served.stdout.strip().splitlines()[-1])
    assert reply["keras_hub_loaded"] is False and reply["tfdogs_loaded"] is False
    np.testing.assert_allclose(reply["probabilities"], expected, atol=1e-5)


def pathlib_path(text):
    import pathlib

    return pathlib.Path(text)


# A server's process: TensorFlow alone, the export's serving signature on the photo files.
FRESH_PROCESS = """
import json, sys
import tensorflow as tf
images = tf.constant([open(path, "rb").read() for path in sys.argv[2:]])
outputs = tf.saved_model.load(sys.argv[1]).signatures["serving_default"](image_bytes=images)
print(json.dumps({"probabilities": outputs["probabilities"].numpy().tolist(),
                  "tfdogs_loaded": "tfdogs" in sys.modules, "keras_hub_loaded": "keras_hub" in sys.modules}))
"""


def test_an_unknown_preset_fails_at_once_naming_it_without_a_traceback(tmp_path):
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "tfdogs.train", "--model", "keras_hub:no_such_preset_anywhere",
                             "--data", "synthetic", "--output", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "'no_such_preset_anywhere'" in message and "kagglehub" in message and "--model keras_hub:DIR" in message
    assert not (tmp_path / "run").exists()
    assert time.time() - started < 60  # TensorFlow's import included


def test_a_builtin_preset_offline_fails_within_seconds(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    started = time.time()
    with pytest.raises(models.PresetError) as raised:
        models.build("keras_hub:resnet_18_imagenet", 4, weights="preset")
    assert time.time() - started < 10
    message = str(raised.value)
    assert "'resnet_18_imagenet'" in message and "cannot be reached" in message
    assert "kagglehub" in message and "save_to_preset" in message and "--model keras_hub:DIR" in message


@pytest.mark.parametrize("name, arch, interpolation, crop, resized, mean", [
    ("resnet34.ra4_e3600_r224_in1k", "resnet34", "bicubic", 0.9, 248, (0.5, 0.5, 0.5)),  # floor(224 / 0.9)
    ("resnet18.fb_swsl_ig1b_ft_in1k", "resnet18", "bilinear", 0.875, 256, IMAGENET_MEAN),
])
def test_stronger_timm_resnet_weights_bring_their_preprocessing(name, arch, interpolation, crop, resized, mean):
    spec = weights.REGISTRY[(arch, f"timm:{name}")]
    assert spec.url == f"https://huggingface.co/timm/{name}/resolve/main/model.safetensors"
    assert spec.sha256 is None  # no published SHA-256 found; the download is checked to be readable safetensors
    record = weights.resolve_preprocessing(f"timm:{name}", arch, 224)
    assert (record.interpolation, record.crop_fraction, record.resize_size, record.mean) == (
        interpolation, crop, resized, mean)
    assert small_config(model=arch, weights=f"timm:{name}", strategy="auto")["strategy"] == "fine-tune"
    with pytest.raises(weights.WeightsError, match="resnet34.ra4_e3600_r224_in1k"):
        weights.resolve_preprocessing("timm:resnet18.nonexistent", arch, 224)
    with pytest.raises(weights.WeightsError, match="No"):  # a checkpoint of the other depth
        weights.resolve_preprocessing(f"timm:{name}", "resnet18" if arch == "resnet34" else "resnet34", 224)


@pytest.fixture(scope="module")
def imagenet_classifier_preset(tmp_path_factory):
    """A tiny random ImageClassifier preset with a 1000-class head: the zero-shot baseline applies."""
    import keras_hub

    keras.utils.set_random_seed(4)
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(SIZE, SIZE), scale=[1 / (255 * s) for s in IMAGENET_STD],
        offset=[-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], interpolation="bilinear")
    classifier = keras_hub.models.ResNetImageClassifier(
        backbone=tiny_backbone(), num_classes=1000,
        preprocessor=keras_hub.models.ResNetImageClassifierPreprocessor(image_converter=converter))
    folder = tmp_path_factory.mktemp("imagenet_classifier") / "preset"
    classifier.save_to_preset(str(folder))
    return folder


def test_a_1000_class_classifier_preset_gets_the_zero_shot_baseline_of_its_own_head(
        tmp_path, presets, imagenet_classifier_preset):
    from tfdogs.evaluation import metrics, zeroshot
    from tfdogs.models import hub
    from tfdogs.runs import folder as run_folder

    assert hub.classifier_classes(imagenet_classifier_preset) == 1000
    assert hub.classifier_classes(presets["backbone"]) is None  # a Backbone alone has no head
    assert not weights.imagenet_head("preset", hub_name(presets, "classifier"))  # 7 classes: no ImageNet head
    run_dir = training_loop.train(small_config(
        model=f"keras_hub:{imagenet_classifier_preset}", weights="preset", image_size=SIZE, batch_size=8, epochs=1,
        strategy="feature-extract", precision="float32", output=str(tmp_path / "run"),
        export_dir=str(tmp_path / "export")))
    summary = json.loads((run_dir / "metrics.json").read_text())
    baseline = summary["baselines"]["imagenet_zero_shot"]
    assert baseline == json.loads((run_dir / "zeroshot.json").read_text())
    # The preset's own 1000 logits on the run's validation photos, restricted to the breeds:
    run = run_folder.load_run(run_dir)
    records, _, val_indices = run.split()
    images = np.stack([data.preprocess_eval(tf.io.decode_image(tf.io.read_file(records.paths[i]), channels=3,
                                                               expand_animations=False), **run.preprocessing.as_dict())
                       for i in val_indices])
    logits = hub.imagenet_classifier(imagenet_classifier_preset).predict(images, verbose=0)
    expected = metrics.scores(zeroshot.breed_probabilities(logits, records.class_names), records.labels[val_indices])
    assert baseline["num_images"] == len(val_indices)
    assert {key: baseline[key] for key in expected} == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_a_keras_hub_run_and_a_lenet_run_ensemble_export_and_predict_as_one(tmp_path, presets, lenet_run, capsys):
    """The ensemble of a keras-hub backbone and LeNet-5 (each with its own preprocessing) serves their weighted mean."""
    from tfdogs import predict
    from tfdogs.runs import ensemble as run_ensemble, folder as run_folder

    hub_run = training_loop.train(small_config(
        model=hub_name(presets, "classifier"), weights="preset", strategy="feature-extract", image_size=40,
        batch_size=8, epochs=2, precision="float32", output=str(tmp_path / "hub"),
        export_dir=str(tmp_path / "hub-export")))
    folder = run_ensemble.ensemble([hub_run, lenet_run], tmp_path / "pair", member_weights=[3.0, 1.0],
                                   export_dir=tmp_path / "saved_models")
    summary = json.loads((folder / "ensemble.json").read_text())
    assert [member["weight"] for member in summary["members"]] == [0.75, 0.25]
    assert summary["split_note"] is None  # same data and seed: the same split
    photos = sorted((lenet_run / "synthetic_data" / "train").glob("*.jpg"))[:4]
    members = []
    for run_dir in (hub_run, lenet_run):
        run = run_folder.load_run(run_dir)
        members.append(run_folder.predict_paths(run.load_model(), [str(path) for path in photos], run.preprocessing))
    expected = 0.75 * members[0] + 0.25 * members[1]
    capsys.readouterr()  # what training printed
    assert predict.main([str(tmp_path / "saved_models"), *map(str, photos), "--json"]) == 0
    served = json.loads(capsys.readouterr().out)
    names = run_folder.load_run(hub_run).class_names
    for answer, row in zip(served, expected):
        top = answer["top5"][0]
        assert top["breed"] == names[int(np.argmax(row))]
        assert top["probability"] == pytest.approx(float(row.max()), abs=1e-5)


def test_a_layer_with_several_outputs_is_placed_by_its_first():
    """DINOv2's encoder returns a list: the stage probe takes its first output instead of failing."""
    from tfdogs.models import hub

    class TwoOutputs(keras.layers.Layer):
        def build(self, input_shape):
            self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

        def call(self, inputs):
            return [inputs * self.scale, inputs]

        def compute_output_spec(self, inputs):
            return [keras.KerasTensor(inputs.shape), keras.KerasTensor(inputs.shape)]

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem_conv")(inputs)
    first, _ = TwoOutputs(name="encoder")(x)
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3, strides=2, padding="same", name="after")(first))
    stages = hub._layer_stages(model)
    assert set(stages) >= {"stem_conv", "encoder", "after"}
