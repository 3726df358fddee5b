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
from tfdogs.weights.fetch import default_cache_dir, fetch, require_installed
from tfdogs.weights.load import hub_imagenet_classifier, imagenet_head, load_pretrained, start_head_from_imagenet
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
           "default_cache_dir", "fetch", "hub_imagenet_classifier", "hub_preprocessing", "imagenet_head",
           "load_pretrained", "pretrained_model", "pretrained_with_classifier", "require_installed",
           "resolve_preprocessing", "start_head_from_imagenet"]


def pretrained_model(name, num_classes, weights=None, *, head_from_imagenet=None, **build_arguments):
    """`tfdogs.models.build`, then the pretrained weights loaded into it (see `pretrained_with_classifier`)."""
    return pretrained_with_classifier(name, num_classes, weights, head_from_imagenet=head_from_imagenet,
                                      **build_arguments)[0]


def pretrained_with_classifier(name, num_classes, weights=None, *, head_from_imagenet=None, **build_arguments):
    """`tfdogs.models.build`, then the pretrained weights loaded into it, and the weights' ImageNet classifier.

    Args:
        name: a model name `tfdogs.models.build` knows.
        num_classes: number of output logits.
        weights: None (random init); ``"imagenet"`` (torchvision), ``"timm"``,
            ``"timm:NAME"`` or a path to a .pth / .safetensors / .weights.h5 file
            (see `load_pretrained`); for a keras-hub model, ``"preset"`` or None.
            The ImageNet classifier is kept only when its shape matches
            ``num_classes``; otherwise ``fc`` stays freshly initialised.
        head_from_imagenet: the data set's breeds, to start ``fc`` from the weights' ImageNet
            classifier's rows of those breeds (`start_head_from_imagenet`; a line says how many);
            None, or weights without a 1000-class classifier: a random start.
        **build_arguments: ``input_shape``, ``dropout``, ``l1``, ``l2``.

    Returns:
        (the built `keras.Model`, the weights' ImageNet classifier (kernel [features, 1000], bias [1000])
        on the pooled features, or None: random weights, a checkpoint without one, or a keras-hub
        preset, whose classifier may not sit on the same features).

    Raises:
        ValueError: LeNet-5 with weights (it trains from scratch), an unknown name.
        WeightsError: weights that cannot be found, fetched or converted.
    """
    if models.is_hub_name(name):
        model = models.build(name, num_classes, weights, **build_arguments)
        imagenet = hub_imagenet_classifier(name) if head_from_imagenet and imagenet_head(weights, name) else None
    else:
        if name == "lenet5" and weights is not None:
            raise ValueError(f"lenet5 is trained from scratch and has no pretrained weights; got weights={weights!r}.")
        model = models.build(name, num_classes, **build_arguments)
        imagenet = None if weights is None else load_pretrained(model, weights, arch=name)
    if head_from_imagenet and imagenet is not None and num_classes != 1000:
        started = start_head_from_imagenet(model, imagenet, head_from_imagenet)
        left = [breed for breed in head_from_imagenet if breed not in started]
        print(f"Head: {len(started)} of {len(head_from_imagenet)} breeds start from the ImageNet classifier's rows"
              + (f"; {', '.join(left)} (no ImageNet class) start as the mean of its 118 dog classes."
                 if left else "."))
    return model, None if models.is_hub_name(name) else imagenet
