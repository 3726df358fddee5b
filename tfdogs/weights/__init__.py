"""Pretrained weights for the hand-built ResNets: registry, download, conversion, loading.

Modules:
    registry: one `WeightSpec` per checkpoint (URL, SHA-256, preprocessing, top-1, licence),
        and the `Preprocessing` a run's weights call for.
    fetch: downloads into the Keras cache and checks them.
    pth, port: reading ``.pth`` without torch; the torch-to-Keras name map.
    load: a converted checkpoint assigned to a built model.

Example:
    >>> from tfdogs import weights
    >>> model = weights.pretrained_model("resnet18", 120, "imagenet", dropout=0.2)
"""

from tfdogs import models
from tfdogs.weights.fetch import default_cache_dir, fetch
from tfdogs.weights.load import imagenet_head, load_pretrained
from tfdogs.weights.registry import (
    CONVENTIONS,
    REGISTRY,
    SOURCES,
    WeightsError,
    WeightSpec,
    converter_preprocessing,
    hub_preprocessing,
    resolve_preprocessing,
)

__all__ = ["CONVENTIONS", "REGISTRY", "SOURCES", "WeightSpec", "WeightsError", "converter_preprocessing",
           "default_cache_dir", "fetch", "hub_preprocessing", "imagenet_head", "load_pretrained", "pretrained_model",
           "resolve_preprocessing"]


def pretrained_model(name, num_classes, weights=None, **build_arguments):
    """`tfdogs.models.build`, then the pretrained weights loaded into it.

    Args:
        name: a model name `tfdogs.models.build` knows.
        num_classes: number of output logits.
        weights: None (random init); ``"imagenet"`` (torchvision), ``"timm"``,
            ``"timm:NAME"`` or a path to a .pth / .safetensors / .weights.h5 file
            (see `load_pretrained`); for a keras-hub model, ``"preset"`` or None.
            The ImageNet classifier is kept only when its shape matches
            ``num_classes``; otherwise ``fc`` stays freshly initialised.
        **build_arguments: ``input_shape``, ``dropout``, ``l1``, ``l2``.

    Returns:
        The built `keras.Model`.

    Raises:
        ValueError: LeNet-5 with weights (it trains from scratch), an unknown name.
        WeightsError: weights that cannot be found, fetched or converted.
    """
    if models.is_hub_name(name):
        return models.build(name, num_classes, weights, **build_arguments)
    if name == "lenet5" and weights is not None:
        raise ValueError(f"lenet5 is trained from scratch and has no pretrained weights; got weights={weights!r}.")
    model = models.build(name, num_classes, **build_arguments)
    if weights is not None:
        load_pretrained(model, weights, arch=name)
    return model
