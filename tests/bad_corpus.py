"""Writes dog-photo directories that hold every bad case of issue 6 beside good images.

Everything is made at test time with Pillow or raw bytes. `write_kaggle_corpus`
returns what the validation pass must report for each bad case, so a test can
demand that every bad case is listed and nothing else is.

Example:
    expected = write_kaggle_corpus(tmp_path / "data")
    report = validation.check_data(tmp_path / "data")
"""

import csv
import dataclasses
import io
import os

import numpy as np
from PIL import Image

# Breed names with spaces, capitals and non-ASCII letters; they must survive untouched.
GOOD_BREEDS = ("beagle", "Great Dane", "épagneul breton", "柴犬")
GOOD_COLOURS = ((200, 40, 60), (40, 180, 70), (50, 60, 200), (210, 190, 40))
SOLO_BREED = "solo"  # a breed with a single image: the stratified split must still work
# The colour of every decodable odd file, so tests can read it back through the pipeline.
CASE_COLOUR = (200, 40, 60)
HUGE_SIZE = (10_000, 8_000)


@dataclasses.dataclass(frozen=True)
class Expected:
    """One problem the validation pass must list: where, which kind, what it does."""

    file: str
    line: int | None
    kind: str
    action: str


def encode(image, format, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def solid(colour, size=(24, 20), mode="RGB"):
    return Image.new("RGB", size, colour).convert(mode)


def noisy(colour, rng, size=40):
    """A learnable good image: the breed's colour with noise."""
    pixels = np.clip(np.array(colour) + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def odd_files(huge=True):
    """{case name: (file bytes, problem kinds, action)} for files with odd or broken content."""
    colour = solid(CASE_COLOUR)
    photo = encode(noisy(CASE_COLOUR, np.random.default_rng(1), size=64), "JPEG", quality=90)
    cases = {
        # The header survives, the picture data stops half way, as in an interrupted download.
        "truncated_jpeg": (photo[: len(photo) // 2], ["corrupt"], "skipped"),
        "zero_bytes": (b"", ["empty-file"], "skipped"),
        "not_an_image": (b"id,breed\nthis is a text file, not a photo\n", ["not-an-image"], "skipped"),
        "png_named_jpg": (encode(colour, "PNG"), ["wrong-extension", "tiny"], "kept"),
        "gif_named_jpg": (encode(colour.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
                          ["wrong-extension", "tiny"], "kept"),
        "bmp_named_jpg": (encode(colour, "BMP"), ["wrong-extension", "tiny"], "kept"),
        # TensorFlow decodes palette BMPs as grey palette indices: silently wrong colours.
        "palette_bmp_named_jpg": (encode(colour.convert("P", palette=Image.Palette.ADAPTIVE), "BMP"),
                                  ["wrong-extension", "colour-mode", "tiny"], "converted"),
        "webp_named_jpg": (encode(colour, "WEBP", lossless=True), ["wrong-extension", "tiny"], "kept"),
        "tiff_named_jpg": (encode(colour, "TIFF"), ["wrong-extension", "format", "tiny"], "converted"),
        "cmyk_jpeg": (encode(solid(CASE_COLOUR, (64, 48), "CMYK"), "JPEG", quality=95), ["colour-mode"],
                      "converted"),
        "grayscale_jpeg": (encode(solid(CASE_COLOUR, (64, 48), "L"), "JPEG", quality=95), ["grayscale"], "kept"),
        "rgba_png": (encode(solid(CASE_COLOUR, (64, 48), "RGBA"), "PNG"), ["wrong-extension", "alpha"], "kept"),
        "one_pixel": (encode(solid(CASE_COLOUR, (1, 1)), "JPEG"), ["tiny"], "kept"),
    }
    if huge:
        cases["huge_jpeg"] = (encode(Image.new("RGB", HUGE_SIZE, CASE_COLOUR), "JPEG", quality=80),
                              ["oversized"], "converted")
    return cases


def write_kaggle_corpus(root, good_per_breed=8, huge=True, seed=0):
    """Writes a Kaggle-layout directory (labels.csv + train/) with every bad case.

    Also writes, outside `root`, the file `../../etc/passwd` would name from
    train/ and the target of a symbolic link, both valid JPEGs that a careless
    reader would happily train on.

    Args:
        root: The data directory to create.
        good_per_breed: Good images of each of `GOOD_BREEDS`.
        huge: Whether to add the 10,000 x 8,000 photo (1-2 s to write).
        seed: Seed of the good images' noise.

    Returns:
        (expected problems, {case name: file relative to root} for the odd files,
        paths outside root that must never be read).
    """
    rng = np.random.default_rng(seed)
    train = root / "train"
    train.mkdir(parents=True)
    rows, expected = [], []

    def add_row(image_id, breed):
        rows.append((image_id, breed))
        return len(rows) + 1  # labels.csv line: the header is line 1

    for breed, colour in zip(GOOD_BREEDS, GOOD_COLOURS):
        for i in range(good_per_breed):
            image_id = f"good-{GOOD_BREEDS.index(breed)}-{i}"
            noisy(colour, rng).save(train / f"{image_id}.jpg", format="JPEG", quality=90)
            add_row(image_id, breed)
    noisy((120, 120, 120), rng).save(train / "solo-0.jpg", format="JPEG", quality=90)
    add_row("solo-0", SOLO_BREED)

    odd = {}
    for index, (name, (content, kinds, action)) in enumerate(odd_files(huge).items()):
        (train / f"{name}.jpg").write_bytes(content)
        add_row(name, GOOD_BREEDS[index % len(GOOD_BREEDS)])
        odd[name] = f"train/{name}.jpg"
        expected += [Expected(f"train/{name}.jpg", None, kind, action) for kind in kinds]

    # A breed whose only image is broken disappears from the classes.
    (train / "ghost-0.jpg").write_bytes(b"")
    add_row("ghost-0", "ghost")
    expected += [Expected("train/ghost-0.jpg", None, "empty-file", "skipped"),
                 Expected("labels.csv", None, "breed-without-images", "skipped")]

    line = add_row("missing-photo", "beagle")
    expected.append(Expected("train/missing-photo.jpg", line, "missing", "skipped"))
    noisy(GOOD_COLOURS[0], rng).save(train / "no-row.jpg", format="JPEG")
    expected.append(Expected("train/no-row.jpg", None, "unlabelled", "skipped"))

    first = add_row("good-0-0", "beagle")  # the same id and breed again
    expected.append(Expected("train/good-0-0.jpg", first, "duplicate-id", "skipped"))
    noisy(GOOD_COLOURS[1], rng).save(train / "conflict.jpg", format="JPEG")
    for breed in ("beagle", "Great Dane"):
        line = add_row("conflict", breed)
        expected.append(Expected("train/conflict.jpg", line, "conflicting-id", "skipped"))

    outside = root.parent / f"{root.name}-outside"
    outside.mkdir()
    noisy(GOOD_COLOURS[0], rng).save(outside / "secret.jpg", format="JPEG")
    os.symlink(outside / "secret.jpg", train / "link-out.jpg")
    line = add_row("link-out", "beagle")
    expected.append(Expected("train/link-out.jpg", line, "outside", "skipped"))
    # train/../../etc/passwd.jpg: outside root, and it exists, so only a refusal keeps it out.
    traversal_target = (train / "../../etc/passwd.jpg").resolve()
    traversal_target.parent.mkdir(parents=True, exist_ok=True)
    noisy(GOOD_COLOURS[0], rng).save(traversal_target, format="JPEG")
    line = add_row("../../etc/passwd", "beagle")
    expected.append(Expected("labels.csv", line, "unsafe-id", "skipped"))

    line = add_row("good-1-0-copy", "")
    (train / "good-1-0-copy.jpg").write_bytes((train / "good-1-0.jpg").read_bytes())
    expected.append(Expected("train/good-1-0-copy.jpg", line, "empty-breed", "skipped"))

    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "breed"])
        writer.writerows(rows)
        writer.writerow(["too", "many", "fields"])
    expected.append(Expected("labels.csv", len(rows) + 2, "bad-row", "skipped"))
    return expected, odd, [outside / "secret.jpg", traversal_target]


def write_folder_corpus(root, seed=0):
    """Class folders with odd breed names, a real RGBA .png, a broken file and a link out of root.

    Returns:
        (expected problems, the outside file that must never be read).
    """
    rng = np.random.default_rng(seed)
    for breed, colour in zip(GOOD_BREEDS, GOOD_COLOURS):
        (root / breed).mkdir(parents=True)
        for i in range(3):
            noisy(colour, rng).save(root / breed / f"{i}.jpg", format="JPEG")
    (root / "beagle" / "clear.png").write_bytes(encode(solid(CASE_COLOUR, (64, 48), "RGBA"), "PNG"))
    (root / "Great Dane" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir()
    noisy(GOOD_COLOURS[0], rng).save(outside / "secret.jpg", format="JPEG")
    os.symlink(outside / "secret.jpg", root / "beagle" / "link-out.jpg")
    expected = [Expected("beagle/clear.png", None, "alpha", "kept"),
                Expected("Great Dane/broken.jpeg", None, "corrupt", "skipped"),
                Expected("beagle/link-out.jpg", None, "outside", "skipped")]
    return expected, outside / "secret.jpg"
