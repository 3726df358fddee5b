"""Any keras-hub image backbone, with tfdogs' classifier head: ``--model keras_hub:PRESET``.

keras-hub (https://keras.io/keras_hub/) publishes vision backbones as
presets: a built-in name (``resnet_50_imagenet``, ``efficientnet_b0_ra_imagenet``),
a ``kaggle://`` or ``hf://`` handle, or a local directory written by
``save_to_preset`` for a ``Backbone`` or an ``ImageClassifier``. This module
loads the backbone from such a preset and puts tfdogs' head on it
(``avgpool`` -> ``dropout`` -> ``fc``), so the model has the same shape as the
hand-built ones: a functional Keras model on normalised images returning
float32 logits. An ``ImageClassifier``'s own classifier is not used.

Stages: the backbone's layers are renamed ``stem.<name>``, ``layer1.<name>`` ..
``layer4.<name>`` from the network's structure, so `tfdogs.models.stage_of`
reads them like the ResNets' (discriminative rates, freezing). A backbone that
downsamples in four or more steps (every CNN) maps its last four resolutions
to ``layer1`` .. ``layer4`` and everything before to the stem; one that keeps
one resolution throughout (a ViT) is cut by depth into a stem (its first
weighted layer, the patch embedding) and four equal runs of weighted layers.

The preset's preprocessing (its ``ImageConverter``) is read by
`tfdogs.weights.resolve_preprocessing` through `image_converter_config`; this
module never imports the weight code.

Example:
    >>> model = hub_model("/path/to/preset_dir", num_classes=120, load_weights=True)
    >>> sorted({name.split(".")[0] for name in (layer.name for layer in model.layers) if "." in name})
    ['layer1', 'layer2', 'layer3', 'layer4', 'stem']
"""

import os
import pathlib
import socket

import keras
from keras import layers

PREFIX = "keras_hub:"
STAGE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")
# Where keras-hub's downloads come from, for the reachability check before a download.
HOSTS = {"kaggle": ("www.kaggle.com", 443), "hf": ("huggingface.co", 443)}
CONNECT_TIMEOUT_SECONDS = 3.0
# The spatial side the stage analysis traces a backbone of any input size at (symbolically: nothing is computed).
PROBE_SIZE = 224


class PresetError(ValueError):
    """A keras-hub preset that cannot be loaded or used; the message names it and says what to do."""


def is_hub_name(name):
    """Whether a model name is ``keras_hub:PRESET``."""
    return isinstance(name, str) and name.startswith(PREFIX) and len(name) > len(PREFIX)


def preset_of(name):
    """The PRESET of ``keras_hub:PRESET`` (a name, a handle or a directory)."""
    if not is_hub_name(name):
        raise PresetError(f"{name!r} is not a keras-hub model name; expected 'keras_hub:PRESET'.")
    return name[len(PREFIX):]


def _keras_hub():
    import keras_hub  # heavy (about 2 s): imported only for keras-hub models

    return keras_hub


def cache_locations():
    """Where keras-hub keeps downloaded presets: kagglehub's and the Hugging Face hub's caches."""
    home = pathlib.Path.home()
    kaggle = os.environ.get("KAGGLEHUB_CACHE") or str(home / ".cache" / "kagglehub")
    hf_home = os.environ.get("HF_HOME") or str(home / ".cache" / "huggingface")
    return {"kaggle": kaggle, "hf": os.environ.get("HF_HUB_CACHE") or os.path.join(hf_home, "hub")}


def _help(preset):
    caches = cache_locations()
    return (f"keras-hub caches downloaded presets in {caches['kaggle']} (Kaggle, the built-in names) and "
            f"{caches['hf']} (hf:// handles). To use a preset without a network, save it on a machine that has "
            "one (keras_hub.models.Backbone.from_preset(NAME).save_to_preset(DIR), or an ImageClassifier's "
            "save_to_preset to keep its preprocessing), copy DIR here and pass --model keras_hub:DIR.")


def _source(preset):
    """``"local"``, ``"kaggle"``, ``"hf"``, ``"other"`` (another scheme) or ``"unknown"`` for a preset string."""
    if os.path.isdir(os.path.expanduser(preset)):
        return "local"
    if preset.startswith("kaggle://"):
        return "kaggle"
    if preset.startswith("hf://"):
        return "hf"
    if "://" in preset:
        return "other"
    if preset in _keras_hub().models.Backbone.presets:
        return "kaggle"
    return "unknown"


def _reachable(host_port):
    try:
        with socket.create_connection(host_port, timeout=CONNECT_TIMEOUT_SECONDS):
            return True
    except OSError:
        return False


def _from_preset(preset, load):
    """Runs ``load()`` (a keras-hub ``from_preset`` call) with errors that name the preset, within seconds offline.

    A preset that needs a download is first checked against its host: when
    the host cannot be reached the download libraries are told to stay
    offline (they would retry for tens of seconds), so a cached preset still
    loads and an uncached one fails at once.
    """
    source = _source(preset)
    if source == "unknown":
        raise PresetError(
            f"keras-hub preset {preset!r} is neither a built-in keras-hub preset name, a kaggle:// or hf:// handle, "
            f"nor an existing local preset directory. Built-in vision backbones include resnet_50_imagenet and "
            f"efficientnet_b0_ra_imagenet (keras_hub.models.ImageClassifier.presets lists them). " + _help(preset))
    offline = source in HOSTS and not _reachable(HOSTS[source])
    saved = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "KAGGLEHUB_OFFLINE")}
    if offline:
        os.environ.update(HF_HUB_OFFLINE="1", KAGGLEHUB_OFFLINE="1")
    try:
        return load()
    except PresetError:
        raise
    except Exception as error:  # keras-hub, kagglehub and huggingface_hub raise many kinds
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = f" ({HOSTS[source][0]} cannot be reached from here)" if offline else ""
        raise PresetError(f"Could not load keras-hub preset {preset!r}{where}: {reason} " + _help(preset)) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_backbone(preset, *, load_weights=True, input_shape=None):
    """The keras-hub ``Backbone`` of a preset (a Backbone's or an ImageClassifier's).

    Args:
        preset: a built-in name, a ``kaggle://``/``hf://`` handle or a local preset directory.
        load_weights: False builds the architecture with fresh weights (the preset's config only).
        input_shape: NHWC shape without batch, given to backbones that take ``image_shape``.

    Returns:
        A `keras_hub.models.Backbone` under the current dtype policy.

    Raises:
        PresetError: unknown, unreachable or unusable preset.
    """
    keras_hub = _keras_hub()
    options = {"load_weights": load_weights, "dtype": keras.config.dtype_policy().name}

    def load():
        try:
            return keras_hub.models.Backbone.from_preset(preset, image_shape=tuple(input_shape), **options)
        except TypeError:  # a backbone without an image_shape argument
            return keras_hub.models.Backbone.from_preset(preset, **options)

    backbone = _from_preset(preset, load) if input_shape is not None else _from_preset(
        preset, lambda: keras_hub.models.Backbone.from_preset(preset, **options))
    if len(backbone.inputs) != 1 or len(backbone.outputs) != 1:
        raise PresetError(f"keras-hub preset {preset!r} is a {type(backbone).__name__} with "
                          f"{len(backbone.inputs)} inputs and {len(backbone.outputs)} outputs; tfdogs needs an "
                          "image backbone with one image input and one feature output.")
    return backbone


def classifier_classes(preset):
    """How many classes the preset's own ImageClassifier head has; None for a Backbone saved alone.

    Raises:
        PresetError: a preset that cannot be reached or read.
    """
    _keras_hub()
    from keras_hub.src.utils.preset_utils import load_json

    preset = str(preset)

    def load():
        try:
            task = load_json(preset, "task.json")
        except FileNotFoundError:  # no task.json: a backbone-only preset
            return None
        return task.get("config", {}).get("num_classes")

    return _from_preset(preset, load)


def imagenet_classifier(preset):
    """The preset's ImageClassifier (its backbone and its own head) as a Keras model on normalised images.

    Used for the zero-shot baseline of presets with a 1000-class ImageNet head;
    tfdogs' models drop that head (`hub_model`).
    """
    keras_hub = _keras_hub()
    preset = str(preset)
    classifier = _from_preset(preset, lambda: keras_hub.models.ImageClassifier.from_preset(preset))
    return keras.Model(classifier.inputs, classifier.outputs, name="keras_hub_classifier")


def image_converter_config(preset):
    """The preset's ``ImageConverter`` settings (``get_config()``), or None for a preset without one.

    A Backbone saved alone has no converter; an ImageClassifier's preset (and
    keras-hub's built-in classifier presets) carry one.

    Raises:
        PresetError: a preset that cannot be reached or read.
    """
    keras_hub = _keras_hub()

    def load():
        try:
            return keras_hub.layers.ImageConverter.from_preset(preset).get_config()
        except FileNotFoundError:  # no image_converter.json: a backbone-only preset
            return None

    return _from_preset(preset, load)


def _layer_stages(backbone):
    """{layer name: stage} for the backbone's layers, from their output resolution or, failing that, depth."""
    inner = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    weighted = [layer for layer in inner if layer.weights]
    if not weighted:
        raise PresetError(f"The keras-hub backbone {backbone.name!r} has no weights to train.")
    # A layer with several outputs (DINOv2's encoder returns a list) is placed by its first.
    probe = keras.Model(backbone.inputs[0], [layer.output[0] if isinstance(layer.output, (list, tuple))
                                             else layer.output for layer in inner])
    height, width, channels = backbone.inputs[0].shape[1:]
    size = (height or PROBE_SIZE, width or PROBE_SIZE)
    specs = probe.compute_output_spec(keras.KerasTensor((1, *size, channels)))
    strides = {layer.name: size[0] / spec.shape[1] if len(spec.shape) == 4 and spec.shape[1] else None
               for layer, spec in zip(inner, specs)}
    levels = sorted({strides[layer.name] for layer in weighted} - {None})
    stages, current = {}, "stem"
    if len(levels) >= 4:
        # The last four resolutions are the four stages; anything at a finer one is the stem.
        names = {level: f"layer{index + 1}" for index, level in enumerate(levels[-4:])}
        for layer in inner:
            stride = strides[layer.name]
            current = names.get(stride, "stem" if stride is not None and stride < levels[-4] else current)
            stages[layer.name] = current
        return stages
    # One resolution throughout (a transformer): the first weighted layer is the stem, the rest cut in four by depth.
    depth = {layer.name: index for index, layer in enumerate(weighted[1:])}
    for layer in inner:
        if layer.name in depth:
            current = f"layer{1 + (4 * depth[layer.name]) // len(depth)}"
        stages[layer.name] = current
    return stages


def _name_stages(backbone):
    """Prefixes every layer's name with its stage (``layer2.<name>``); weights and wiring are untouched.

    The input is named ``images`` as in the hand-built models (and so that
    `keras.models.clone_model` keeps its name).
    """
    stages = _layer_stages(backbone)
    for layer in backbone.layers:
        stage = stages.get(layer.name)
        if stage is None:  # the input
            layer.name = backbone.inputs[0].name = "images"
        else:
            layer.name = f"{stage}.{layer.name}"


def hub_model(preset, num_classes, *, load_weights=True, input_shape=(224, 224, 3), dropout=0.0, l1=0.0, l2=0.0):
    """A keras-hub backbone with tfdogs' head: ``avgpool``, ``dropout`` (when asked) and ``fc``.

    Args:
        preset: a built-in keras-hub preset name, a handle, or a local preset directory.
        num_classes: width of the ``fc`` logits layer.
        load_weights: load the preset's pretrained weights (False: fresh ones of the same architecture).
        input_shape: NHWC shape without batch.
        dropout: dropout rate before ``fc`` (no layer when 0).
        l1: L1 penalty on the ``fc`` kernel.
        l2: L2 penalty on the ``fc`` kernel.

    Returns:
        A flat functional `keras.Model` named ``keras_hub`` mapping normalised images to float32 logits.

    Raises:
        PresetError: the preset cannot be loaded or is not an image backbone.
    """
    from tfdogs.models.resnet import classifier_head  # the head every tfdogs model shares

    backbone = load_backbone(preset, load_weights=load_weights, input_shape=input_shape)
    features = backbone.outputs[0]
    if len(features.shape) not in (3, 4):
        raise PresetError(f"keras-hub preset {preset!r} gives features of shape {features.shape}; tfdogs needs "
                          "a feature map (batch, height, width, channels) or tokens (batch, tokens, channels).")
    _name_stages(backbone)
    # The backbone's own layers, not the backbone as one nested layer: stages and BatchNorms stay visible.
    pooling = layers.GlobalAveragePooling2D if len(features.shape) == 4 else layers.GlobalAveragePooling1D
    pooled = pooling(name="avgpool")(features)
    outputs = classifier_head(pooled, num_classes, dropout=dropout, l1=l1, l2=l2)
    return keras.Model(backbone.inputs[0], outputs, name="keras_hub")
