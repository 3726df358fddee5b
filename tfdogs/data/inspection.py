"""What one photo file is: Pillow's reading of its header, TensorFlow's decoding, a converted copy.

`inspect_files` decides, and `converted_bytes` makes, the RGB copy of each
file TensorFlow cannot decode as Pillow does; the data check
(`tfdogs.data.validation`) and prediction (`tfdogs.runs.predictor`) both call
them, so a photo is predicted from the pixels a run trained and evaluated on.
Files larger than `MAX_SIDE` pixels a side are shrunk to it on conversion.
"""

import hashlib
import io
import pathlib

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps, UnidentifiedImageError

from tfdogs import files, progress
from tfdogs.data.decode import MAX_SIDE, decode_image, exif_orientation, traced_as_written

# Images with a side below this are kept but noted: the resize enlarges them a lot.
SMALL_SIDE = 32
# Modes TensorFlow decodes correctly, per format (None: all). Palette and 1-bit
# BMPs decode as grey palette indices; CMYK JPEG decoding depends on the Adobe
# marker, so Pillow converts it.
_TENSORFLOW_MODES = {"JPEG": {"L", "RGB"}, "PNG": None, "GIF": None, "WEBP": None, "BMP": {"L", "RGB", "RGBA"}}
_EXTENSION_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".webp": "WEBP"}
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
# What reading a photo with each EXIF orientation does to its stored pixels (Pillow's exif_transpose).
_ORIENTATION_TURNS = {2: "mirrored left-right", 3: "turned half a turn", 4: "mirrored top-bottom",
                      5: "transposed", 6: "turned a quarter clockwise", 7: "transposed and turned half a turn",
                      8: "turned a quarter anticlockwise"}


class _Inspection:
    """The verdict on one file: an action and the reasons behind it."""

    def __init__(self, shape=None):
        self.action, self.notes, self.shape, self.orientation = "kept", [], shape, 1

    def note(self, kind, reason):
        self.notes.append((kind, reason))

    def convert(self, kind, reason):
        self.action = "converted"
        self.notes.append((kind, reason))

    def skip(self, kind, reason):
        self.action = "skipped"
        self.notes = [(kind, reason)]


def inspect_file(path, max_side):
    """Reads the file's header with Pillow (no decoding) and decides how to use it."""
    try:
        size = path.stat().st_size
    except OSError as error:
        inspection = _Inspection()
        inspection.skip("unreadable", f"cannot be read ({error.strerror})")
        return inspection
    inspection = _Inspection()
    if size == 0:
        inspection.skip("empty-file", "empty file (0 bytes)")
        return inspection
    try:
        with Image.open(path) as image:
            format, mode, (width, height) = image.format, image.mode, image.size
            transparent = "transparency" in image.info
            orientation = _orientation(image)
    except Image.DecompressionBombError as error:
        inspection.skip("too-large", f"too large to decode safely ({error})")
        return inspection
    except UnidentifiedImageError:
        inspection.skip("not-an-image", f"not an image: no image format matches its {size} bytes")
        return inspection
    except OSError as error:
        if error.errno is not None:  # the file system refused, e.g. PermissionError
            inspection.skip("unreadable", f"cannot be read ({error.strerror})")
        else:
            inspection.skip("corrupt", f"cannot be decoded, so it is probably truncated or corrupt ({error})")
        return inspection
    inspection.shape = (height, width)
    if orientation in _ORIENTATION_TURNS:
        # TensorFlow reads it upright (tfdogs.data.decode_image), so it is compared with the upright shape.
        inspection.orientation = orientation
        inspection.shape = (width, height) if orientation >= 5 else (height, width)
        stored = (f"EXIF orientation {orientation}: the pixels are stored sideways or flipped (as phones write "
                  f"them) and are {_ORIENTATION_TURNS[orientation]} to stand upright")
        if format == "JPEG":
            inspection.note("exif-orientation", f"{stored}; training, evaluation and serving read it upright")
        else:
            inspection.convert("exif-orientation", f"{stored}; TensorFlow applies it only to JPEGs, so a "
                                                   "copy is converted upright")
    expected = _EXTENSION_FORMATS.get(path.suffix.lower())
    if format != expected:
        inspection.note("wrong-extension", f"{format} data in a {path.suffix} file; decoded as {format}")
    if format not in _TENSORFLOW_MODES:
        inspection.convert("format", f"{format} format, which TensorFlow cannot decode; converted to RGB")
    elif _TENSORFLOW_MODES[format] is not None and mode not in _TENSORFLOW_MODES[format]:
        inspection.convert("colour-mode", f"{mode} {format}, which TensorFlow does not decode reliably; "
                                          "converted to RGB")
    if max(width, height) > max_side:
        inspection.convert("oversized", f"{width}x{height} px, larger than {max_side} px a side; shrunk to "
                                        f"{max_side} px on the longer side")
    if inspection.action == "kept":
        if mode in _GREY_MODES or mode == "LA":
            inspection.note("grayscale", f"grayscale ({mode}); its grey is used for red, green and blue")
        if mode in ("RGBA", "LA", "PA") or transparent:
            inspection.note("alpha", "has transparency; the alpha channel is dropped")
    if min(width, height) < SMALL_SIDE:
        inspection.note("tiny", f"only {width}x{height} px; the resize enlarges it")
    return inspection


def _orientation(image):
    """The EXIF orientation Pillow reads from an open image: 1 to 8, 1 when absent or unreadable."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError):  # a malformed EXIF block: the pixels are still usable
        return 1
    return orientation if orientation in _ORIENTATION_TURNS else 1


def inspect_files(paths, max_side=MAX_SIDE, verbose=0):
    """The verdict on each file: Pillow reads its header, then TensorFlow decodes each file kept so far.

    A file TensorFlow fails on, or decodes to another size or orientation
    than Pillow, is to be converted too.

    Args:
        paths: image files.
        max_side: longer-side limit above which images are shrunk.
        verbose: 0 hides the progress bar over the decoding pass (see `tfdogs.progress`).

    Returns:
        One inspection per path: `action` ("kept", "converted" or "skipped"), `notes` [(kind, reason)].
    """
    paths = [str(path) for path in paths]
    inspections = [inspect_file(pathlib.Path(path), max_side) for path in paths]
    candidates = [i for i, inspection in enumerate(inspections) if inspection.action == "kept"]
    decoded = tensorflow_shapes([paths[i] for i in candidates], progress.photos(len(candidates), verbose))
    for position, index in enumerate(candidates):
        inspection = inspections[index]
        if position not in decoded:
            inspection.convert("tensorflow-fails", f"TensorFlow cannot decode it ({tensorflow_error(paths[index])})")
            continue
        shape, orientation = decoded[position]
        if shape != inspection.shape:
            inspection.convert("tensorflow-disagrees",
                               f"TensorFlow decodes it as {shape} pixels, Pillow as {inspection.shape}")
        elif orientation != inspection.orientation:
            inspection.convert("tensorflow-disagrees",
                               f"TensorFlow reads EXIF orientation {orientation}, Pillow {inspection.orientation}; "
                               "converted upright as Pillow reads it")
    return inspections


def tensorflow_shapes(paths, bar):
    """{position in paths: ((height, width), EXIF orientation)} as TensorFlow decodes the files; failures are absent."""
    if not paths:
        return {}

    def decode(index, path):
        image_bytes = tf.io.read_file(path)
        return index, tf.shape(decode_image(image_bytes))[:2], exif_orientation(image_bytes)

    files = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
    decoded = files.map(traced_as_written(decode), num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    found = {}
    for index, shape, orientation in decoded.as_numpy_iterator():
        found[int(index)] = (tuple(int(side) for side in shape), int(orientation))
        bar.update(int(index) + 1)
    bar.update(len(paths), finalize=True)
    return found


def tensorflow_error(path):
    try:
        decode_image(tf.io.read_file(path))
    except tf.errors.OpError as error:
        return error.message.split("}}")[-1].strip().splitlines()[0]
    return "it failed inside tf.data only"


def converted_name(path, root):
    stat = path.stat()
    key = f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def convert(path, root, folder, max_side):
    """Decodes with Pillow to RGB (shrunk to max_side) and, given a folder, saves a copy.

    Returns:
        (path of the copy or None, None) or (None, the decoding error).
    """
    if folder is not None:
        folder = pathlib.Path(folder)
        stem = folder / converted_name(path, root)
        for existing in (stem.with_suffix(".png"), stem.with_suffix(".jpg")):
            if existing.is_file():
                return str(existing), None
    copy, suffix, error = converted_bytes(path, max_side)
    if error is not None or folder is None:
        return None, error
    folder.mkdir(parents=True, exist_ok=True)
    target = stem.with_suffix(suffix)
    files.replace_into(target, lambda temporary: temporary.write_bytes(copy))
    return str(target), None


def converted_bytes(path, max_side=MAX_SIDE):
    """The encoded RGB copy the data check makes of a file: Pillow's decoding, upright, shrunk to max_side.

    PNG, or JPEG quality 95 when shrunk; the copy has no EXIF block, so its
    pixels are stored upright. Pillow encodes the same pixels to the same
    bytes, so a caller that feeds these bytes to TensorFlow reads exactly
    what a run read from its `converted/` copy.

    Returns:
        (bytes, ".png" or ".jpg", None) or (None, None, the decoding error).
    """
    try:
        with Image.open(path) as image:
            shrunk = max(image.size) > max_side
            if shrunk:
                # JPEGs decode at 1/2, 1/4 or 1/8 scale: a 10,000 px photo costs a fraction of its full size.
                image.draft(None, _fitted(image.size, max_side))
            image.load()
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        return None, None, str(error) or type(error).__name__
    if max(rgb.size) > max_side:
        rgb = rgb.resize(_fitted(rgb.size, max_side), Image.Resampling.LANCZOS)
    encoded = io.BytesIO()
    rgb.save(encoded, format="JPEG" if shrunk else "PNG", quality=95)
    return encoded.getvalue(), ".jpg" if shrunk else ".png", None


def _fitted(size, max_side):
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))
