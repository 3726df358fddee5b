"""The input preprocessing a network expects, as one record that travels with it.

A `Preprocessing` is resolved once per run from its weights
(`tfdogs.weights.resolve_preprocessing`), written to `RUN/preprocessing.json`
and into every export's `tfdogs.json`; evaluation, ensembles, prediction,
submissions and the zero-shot baseline read it back instead of re-deriving it
from a name (as timm's `pretrained_cfg` feeds `resolve_data_config`).

Evaluation applies it as torchvision's and timm's eval transforms do on a PIL
image: resize the shorter side to `resize_size` (antialiased, `interpolation`),
centre-crop `image_size`, scale to [0, 1], normalise with `mean`/`std`.

Example:
    record = Preprocessing(image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                           crop_fraction=0.95, interpolation="bicubic", resize_rounding="floor")
    record.resize_size  # 235, timm's math.floor(224 / 0.95)
    record.save(run_dir / FILE_NAME)
"""

import dataclasses
import json
import math
import pathlib

from tfdogs import files

FILE_NAME = "preprocessing.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")
# How the resized shorter side image_size / crop_fraction becomes whole pixels: torchvision's
# eval transforms name the size (256 for 224, 224 / 0.875 exactly); timm floors it (235 for 224 / 0.95).
RESIZE_ROUNDINGS = ("round", "floor")


class PreprocessingError(ValueError):
    """A preprocessing record that is missing, malformed or out of range; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Everything the evaluation and serving pipelines need to feed a network.

    Attributes:
        image_size: side of the square network input, in pixels.
        mean: per-channel RGB mean of images scaled to [0, 1].
        std: per-channel RGB standard deviation.
        crop_fraction: centre-crop side / resized shorter side, in (0, 1].
        interpolation: resize filter, ``"bilinear"`` or ``"bicubic"``.
        resize_rounding: how image_size / crop_fraction becomes the resized shorter side,
            ``"round"`` (torchvision) or ``"floor"`` (timm).
    """

    image_size: int
    mean: tuple
    std: tuple
    crop_fraction: float
    interpolation: str = "bilinear"
    resize_rounding: str = "round"

    def __post_init__(self):
        for name in ("mean", "std"):
            values = tuple(float(value) for value in getattr(self, name))
            if len(values) != 3:
                raise PreprocessingError(f"Preprocessing field '{name}' needs 3 values (R, G, B); got {values}.")
            object.__setattr__(self, name, values)
        if any(value <= 0 for value in self.std):
            raise PreprocessingError(f"Preprocessing field 'std' must be positive; got {self.std}.")
        if isinstance(self.image_size, bool) or int(self.image_size) != self.image_size or self.image_size < 1:
            raise PreprocessingError(f"Preprocessing field 'image_size' must be a positive whole number; "
                                     f"got {self.image_size!r}.")
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "crop_fraction", float(self.crop_fraction))
        if not 0 < self.crop_fraction <= 1:
            raise PreprocessingError(f"Preprocessing field 'crop_fraction' must be in (0, 1]; "
                                     f"got {self.crop_fraction}.")
        if self.interpolation not in INTERPOLATIONS:
            raise PreprocessingError(f"Preprocessing field 'interpolation' is {self.interpolation!r}; "
                                     f"allowed: {', '.join(INTERPOLATIONS)}.")
        if self.resize_rounding not in RESIZE_ROUNDINGS:
            raise PreprocessingError(f"Preprocessing field 'resize_rounding' is {self.resize_rounding!r}; "
                                     f"allowed: {', '.join(RESIZE_ROUNDINGS)}.")

    @property
    def resize_size(self):
        """The shorter side before the centre crop, in pixels."""
        return resize_size(self.image_size, self.crop_fraction, self.resize_rounding)

    def as_dict(self):
        """The fields by name, JSON-ready; also the keyword arguments of `data.make_dataset` and `preprocess_eval`."""
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def replace(self, **changes):
        """A copy with some fields changed (e.g. another `image_size`)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values, source="the preprocessing record"):
        """The record from `as_dict`'s mapping; PreprocessingError naming `source` and the field otherwise."""
        if not isinstance(values, dict):
            raise PreprocessingError(f"{source} must hold a mapping of fields, not {type(values).__name__}.")
        fields = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(fields))
        missing = [name for name in fields if name not in values]
        if unknown or missing:
            raise PreprocessingError(f"{source}: unknown fields {unknown}, missing fields {missing}; "
                                     f"expected {fields}.")
        try:
            return cls(**values)
        except PreprocessingError as error:
            raise PreprocessingError(f"{source}: {error}") from None
        except (TypeError, ValueError) as error:
            raise PreprocessingError(f"{source}: {error}") from None

    def save(self, path):
        """Writes the record as JSON (to a temporary name, then renamed into place)."""
        files.write_json(self.as_dict(), path)

    @classmethod
    def load(cls, path):
        """Reads a record written by `save`; PreprocessingError naming the file when missing or malformed."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise PreprocessingError(f"{path} is missing.")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise PreprocessingError(f"{path} is not valid JSON: {error}") from None
        return cls.from_dict(values, source=str(path))


def resize_size(image_size, crop_fraction, rounding="round"):
    """The shorter side resized to before a centre crop of `image_size` keeping `crop_fraction` of it.

    Args:
        image_size: crop side in pixels.
        crop_fraction: crop side / resized side.
        rounding: ``"round"`` or ``"floor"`` (timm's ``math.floor(img_size / crop_pct)``).

    Returns:
        The resized shorter side in pixels.
    """
    if rounding not in RESIZE_ROUNDINGS:
        raise PreprocessingError(f"resize_rounding is {rounding!r}; allowed: {', '.join(RESIZE_ROUNDINGS)}.")
    exact = image_size / crop_fraction
    return math.floor(exact) if rounding == "floor" else round(exact)
