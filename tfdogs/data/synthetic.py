"""A small, learnable synthetic stand-in for the dog photos (coloured shapes)."""

import colorsys
import csv
import io
import pathlib

import numpy as np
from PIL import Image

from tfdogs import files
from tfdogs.data.breeds import KAGGLE_BREEDS
from tfdogs.data.layouts import DataError

# Real Kaggle breed names, so synthetic data reads like the real thing: familiar ones first.
_FAMILIAR_BREEDS = ("beagle", "boxer", "chihuahua", "golden_retriever", "pug", "samoyed",
                    "siberian_husky", "border_collie", "pomeranian", "basset", "malamute", "dingo")
_SYNTHETIC_BREEDS = _FAMILIAR_BREEDS + tuple(b for b in KAGGLE_BREEDS if b not in _FAMILIAR_BREEDS)
_SYNTHETIC_SHAPES = ("disc", "square", "triangle", "stripes", "cross", "checker", "ring", "diamond")


def make_synthetic(directory, num_classes=6, images_per_class=30, image_size=64, seed=0) -> pathlib.Path:
    """Writes a small, learnable dog-breed stand-in in the Kaggle layout.

    Each class is a shape (disc, square, triangle, stripes, cross, checker, ring,
    diamond, then again) in its own hue, drawn at a random position and scale on a noisy
    grey background, so a tiny CNN beats chance within a few epochs at 32-64 px
    without the task being trivial. Besides `labels.csv` and `train/<id>.jpg`
    it writes unlabelled `test/<id>.jpg` (two per class) and a uniform
    `sample_submission.csv`, as the Kaggle download has. The same arguments give
    byte-identical files.

    Args:
        directory: Where to write; created if needed, same-named files overwritten.
        num_classes: Number of breeds, 2 to 120; beyond 8 the shapes repeat, so
            classes k and k + 8 differ only in hue.
        images_per_class: Labelled images per breed.
        image_size: Side of the square images in pixels.
        seed: Seed of everything random.

    Returns:
        The directory, as a Path.
    """
    if not 2 <= num_classes <= len(_SYNTHETIC_BREEDS):
        raise DataError(f"num_classes must be in [2, {len(_SYNTHETIC_BREEDS)}]; got {num_classes}")
    if images_per_class < 1 or image_size < 8:
        raise DataError(
            f"need images_per_class >= 1 and image_size >= 8; got {images_per_class} and {image_size}"
        )
    directory = pathlib.Path(directory)
    for sub in ("train", "test"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    class_names = sorted(_SYNTHETIC_BREEDS[:num_classes])

    def write_images(subset, labels):
        ids = sorted(rng.bytes(16).hex() for _ in labels)  # Kaggle ids: 32 hex digits, files sorted by id.
        for image_id, label in zip(ids, labels):
            pixels = synthetic_image(rng, label, num_classes, image_size)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            (directory / subset / f"{image_id}.jpg").write_bytes(buffer.getvalue())
        return ids

    train_labels = rng.permutation(np.repeat(np.arange(num_classes), images_per_class))
    train_ids = write_images("train", train_labels)
    test_ids = write_images("test", rng.integers(0, num_classes, size=2 * num_classes))

    with open(directory / "sample_submission.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", *class_names])
        uniform = repr(1 / num_classes)
        writer.writerows([image_id] + [uniform] * num_classes for image_id in test_ids)
    # labels.csv is written last and renamed into place: its presence means the data is complete.
    files.write_csv(directory / "labels.csv", ["id", "breed"],
                    ((image_id, class_names[label]) for image_id, label in zip(train_ids, train_labels)))
    return directory


def synthetic_image(rng, label, num_classes, image_size):
    """uint8 [size, size, 3]: the class's shape in the class's hue on grey noise."""
    size = image_size
    background = rng.uniform(60, 190) + rng.normal(0, 20, (size, size, 1))
    image = np.repeat(background, 3, axis=2)
    hue = (label / num_classes + rng.uniform(-0.02, 0.02)) % 1.0
    colour = 255 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)))
    centre_y, centre_x = rng.uniform(0.3, 0.7, 2) * size
    radius = rng.uniform(0.2, 0.35) * size
    y, x = np.mgrid[0:size, 0:size] + 0.5
    v, u = (y - centre_y) / radius, (x - centre_x) / radius  # unit coordinates around the centre
    in_box = np.maximum(abs(u), abs(v)) <= 1
    shape = _SYNTHETIC_SHAPES[label % len(_SYNTHETIC_SHAPES)]
    mask = {
        "disc": u**2 + v**2 <= 1,
        "square": np.maximum(abs(u), abs(v)) <= 0.8,
        "triangle": (abs(v) <= 0.8) & (abs(u) <= (v + 0.8) * 0.6),
        "stripes": in_box & (np.floor((v + 1) * 2.5) % 2 == 0),
        "cross": in_box & ((abs(u) <= 0.25) | (abs(v) <= 0.25)),
        "checker": in_box & ((np.floor((u + 1) * 2) + np.floor((v + 1) * 2)) % 2 == 0),
        "ring": (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.45),
        "diamond": abs(u) + abs(v) <= 1,
    }[shape]
    image[mask] = colour + rng.normal(0, 12, (mask.sum(), 3))
    return np.clip(image, 0, 255).astype(np.uint8)
