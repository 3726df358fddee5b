"""Photo bytes to upright RGB pixels: decoding, EXIF orientation, and the bytes a served model refuses.

Shared by training, evaluation and serving; `tfdogs.data.image` crops and
resizes what these functions decode.
"""

import numpy as np
import tensorflow as tf

def traced_as_written(function):
    """`function` for tf.data or `tf.function` to trace as it is, without AutoGraph's rewrite of its source.

    tfdogs' traced functions branch on Python values only (tensor branches are
    `tf.cond`), so AutoGraph's conversion changes nothing in their graphs; it
    cost about 0.6 s of each evaluation pipeline's construction and 0.4 s of
    each training pipeline's on the CPUs these numbers come from (AMD EPYC,
    2 cores), paid by every command before its first batch.
    """
    return tf.autograph.experimental.do_not_convert(function)


def decode_image(image_bytes) -> tf.Tensor:
    """Decodes JPEG, PNG, GIF (first frame), BMP or WebP bytes to uint8 [h, w, 3], upright.

    Grayscale gains two channels and RGBA loses alpha. A JPEG's EXIF
    orientation (what phones write instead of rotating the pixels) is applied,
    as Pillow's `ImageOps.exif_transpose` does; see `exif_orientation`. Works
    eagerly and in graphs (Dataset.map, the SavedModel's signature).
    """
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return orient(tf.ensure_shape(image, [None, None, 3]), exif_orientation(image_bytes))


# Where the in-graph EXIF search looks: the Exif segment is one of the application segments that
# open a JPEG (right after SOI, or after JFIF's APP0, an XMP APP1, ...), within its first 64 KiB;
# IFD0's entries are sorted by tag, so Orientation (0x0112) is among the first.
_EXIF_SEARCH_BYTES = 1 << 16
_OPENING_SEGMENTS = 4
_MAX_IFD_ENTRIES = 32
_EXIF_SEGMENT = b"Exif\x00\x00"
_ORIENTATION_TAG = 0x0112
# The bytes the reader looks at: an Exif segment opens within the first 64 KiB and holds at most 64 KiB,
# IFD0 included. The longest read is IFD0's entry count and entries.
_WINDOW = 2 * _EXIF_SEARCH_BYTES + 16
_LONGEST_READ = 2 + 12 * _MAX_IFD_ENTRIES
# The TIFF header's 42 and IFD0's offset (its bytes 2-3 and 4-7) as little-endian, then as big-endian numbers.
_HEADER_NUMBERS = np.array([[1, 256, 0, 0, 0, 0], [0, 0, 1, 256, 1 << 16, 1 << 24],
                            [256, 1, 0, 0, 0, 0], [0, 0, 1 << 24, 1 << 16, 256, 1]], np.int64)


# One trace per process, called from every pipeline and serving graph (tracing it took about 0.1 s each time).
@tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
def exif_orientation(image_bytes) -> tf.Tensor:
    """The EXIF orientation (1 to 8) of encoded image bytes, read in the graph; 1 when there is none.

    Finds the JPEG's Exif segment (APP1: `FF E1`, length, `Exif\0\0`) among
    the first four segments, reads the TIFF header's byte order ("II"
    little-endian, "MM" big-endian), its 42 and the offset of IFD0, and looks
    up tag 0x0112 (type SHORT) among IFD0's entries. Anything else (not a
    JPEG, no Exif segment, a malformed one, a value outside 1-8) gives 1: the
    image is used as stored.

    Pure TensorFlow ops without loops or branches, on the first 128 KiB of the
    file as one byte array, so TF Serving and the input pipelines apply it to
    every image. The graph is kept small (270 nodes) because tf.data optimises
    every map function again each time an iterator is made (every validation
    pass of every epoch): with 628 nodes that cost about 0.08 s an iterator,
    now about 0.04 s (2 cores).

    Args:
        image_bytes: scalar tf.string.

    Returns:
        int32 scalar.
    """
    head = tf.strings.substr(tf.convert_to_tensor(image_bytes, tf.string), 0, _WINDOW)
    length = tf.strings.length(head, unit="BYTE")
    # zeros after the data, far enough that a read from anywhere up to its end stays inside
    window = tf.cast(tf.pad(tf.io.decode_raw(head, tf.uint8), [[0, _WINDOW + _LONGEST_READ - length]]), tf.int32)

    def read(position, count):
        """`count` bytes from `position` (clipped to the data) as int32, zeros past its end."""
        return tf.gather(window, tf.clip_by_value(position, 0, length) + np.arange(count, dtype=np.int32))

    searched = tf.reshape(tf.strings.substr(head, 0, _EXIF_SEARCH_BYTES), [1])
    before_exif = tf.raw_ops.StringSplitV2(input=searched, sep=_EXIF_SEGMENT, maxsplit=1).values[0]
    segment = tf.strings.length(before_exif, unit="BYTE") - 4  # where FF E1 should be
    candidate = tf.logical_and(
        tf.reduce_all(tf.equal(tf.concat([read(0, 2), read(segment, 2)], 0), [0xFF, 0xD8, 0xFF, 0xE1])),
        tf.logical_and(segment >= 2, segment + 4 < tf.minimum(length, _EXIF_SEARCH_BYTES)))

    # The segments that open a JPEG: FF <APPn or COM> <16-bit big-endian length, counting itself> <payload>.
    # Entropy-coded data never holds FF E1, so a walk of a few steps tells a real Exif segment.
    position, opens_file = tf.constant(2), tf.constant(False)
    for _ in range(_OPENING_SEGMENTS):
        marker, kind, high, low = tf.unstack(read(position, 4))
        opening = tf.logical_and(tf.equal(marker, 0xFF), tf.logical_or(
            tf.logical_and(kind >= 0xE0, kind <= 0xEF), tf.equal(kind, 0xFE)))
        opens_file = tf.logical_or(opens_file, tf.logical_and(opening, tf.equal(position, segment)))
        position = tf.where(opening, position + 2 + high * 256 + low, -1)

    valid, value = _ifd0_orientation(read, segment + 4 + len(_EXIF_SEGMENT), _WINDOW)
    usable = tf.logical_and(tf.logical_and(candidate, tf.logical_and(opens_file, valid)),
                            tf.logical_and(value >= 1, value <= 8))
    return tf.where(usable, value, 1)


def _ifd0_orientation(read, tiff, end):
    """(whether a TIFF header starts at `tiff`, the Orientation SHORT among its IFD0 entries or 0), in the graph.

    Args:
        read: `read(position, count)`, int32 bytes from the data, zeros past its end.
        tiff: where the TIFF header ("II" or "MM", 42, IFD0's offset) should start.
        end: IFD0 offsets are clipped to this position.
    """
    order_1, order_2, *numbers = tf.unstack(tf.cast(read(tiff, 8), tf.int64))
    little_endian = tf.logical_and(tf.equal(order_1, 0x49), tf.equal(order_2, 0x49))
    big_endian = tf.logical_and(tf.equal(order_1, 0x4D), tf.equal(order_2, 0x4D))
    as_little, as_big = tf.unstack(tf.reshape(tf.reduce_sum(tf.stack(numbers) * _HEADER_NUMBERS, axis=1), [2, 2]))
    magic, offset = tf.unstack(tf.where(little_endian, as_little, as_big))
    valid = tf.logical_and(tf.logical_or(little_endian, big_endian), tf.equal(magic, 42))
    directory = tf.cast(tf.minimum(tf.cast(tiff, tf.int64) + offset, end), tf.int32)
    # IFD0 as 16-bit words: the entry count, then 6 per entry: tag, type, count (2 words), the value
    # (a SHORT's is its first word) and one more.
    first, second = tf.unstack(tf.reshape(read(directory, _LONGEST_READ), [-1, 2]), axis=1)
    count, entries = tf.split(tf.where(little_endian, first + 256 * second, 256 * first + second), [1, -1])
    tag, kind, _, _, value, _ = tf.unstack(tf.reshape(entries, [_MAX_IFD_ENTRIES, 6]), axis=1)
    matches = tf.logical_and(tf.range(_MAX_IFD_ENTRIES) < count, tf.logical_and(
        tf.equal(tag, _ORIENTATION_TAG), tf.equal(kind, 3)))
    return valid, tf.reduce_max(tf.where(matches, value, 0))


def orient(image, orientation) -> tf.Tensor:
    """Turns an [h, w, c] image stored with EXIF `orientation` (1 to 8) upright, as Pillow's `exif_transpose`.

    Orientations 5 to 8 swap the sides (a transpose), then 2, 3, 6, 7 mirror
    left-right and 3, 4, 7, 8 top-bottom: 6, what phones held upright
    write, is a quarter turn clockwise.
    """
    orientation = tf.convert_to_tensor(orientation, tf.int32)

    def turn():
        turned = tf.cond(orientation >= 5, lambda: tf.transpose(image, [1, 0, 2]), lambda: image)
        mirror = tf.reduce_any(tf.equal(orientation, [2, 3, 6, 7]))
        turned = tf.cond(mirror, lambda: tf.reverse(turned, [1]), lambda: turned)
        flip = tf.reduce_any(tf.equal(orientation, [3, 4, 7, 8]))
        return tf.cond(flip, lambda: tf.reverse(turned, [0]), lambda: turned)

    return tf.cond(tf.equal(orientation, 1), lambda: image, turn)


# The longer side above which the data check shrinks a photo (a Pillow RGB copy) before training.
MAX_SIDE = 4096
_CONVERT_FIRST = "; convert it to an RGB JPEG or PNG first (as the data check does before training)"
_BMP_HEAD = 2048  # file header, the largest DIB header (124 bytes) and a 256-colour palette
_BYTE_READ = 1024  # the longest read of `_byte_reader` (a BMP palette)


def decode_served_image(image_bytes, max_side=MAX_SIDE) -> tf.Tensor:
    """`decode_image`, refusing the bytes that the data check would have converted before training.

    The serving signature decodes in the graph, where Pillow cannot run, so a
    file that training only saw as the check's Pillow RGB copy (see
    `tfdogs.data.inspection`) would be served other pixels: a palette BMP
    decodes as grey palette indices (mean 109 levels off, max 244, on a dog
    photo), a PNG or WebP stored sideways stays sideways, a CMYK JPEG differs
    by up to 10 levels (mean 1.1), a TIFF or 1-bit BMP does not decode. Those bytes raise InvalidArgumentError whose message
    says what the file is (`served_image_refusal`), as do images larger than
    `max_side` pixels a side, which training saw shrunk by Pillow.

    Args:
        image_bytes: scalar tf.string.
        max_side: longer-side limit, the data check's.

    Returns:
        uint8 [h, w, 3], as `decode_image`.
    """
    reason = served_image_refusal(image_bytes)
    with tf.control_dependencies([tf.debugging.Assert(tf.equal(reason, ""), [reason])]):
        image = decode_image(image_bytes)
    height, width = tf.unstack(tf.shape(image)[:2])
    too_large = tf.strings.format(
        "image of {}x{} px, larger than {} px a side, which the data check shrinks with Pillow" + _CONVERT_FIRST,
        (width, height, max_side))
    with tf.control_dependencies([tf.debugging.Assert(tf.maximum(height, width) <= max_side, [too_large])]):
        return tf.identity(image)


def served_image_refusal(image_bytes) -> tf.Tensor:
    """Why the serving graph cannot decode these bytes as training saw them: a tf.string, empty when it can.

    Read from the header bytes in the graph, no decoding: TIFF (TensorFlow
    cannot decode it); a BMP of 8 bits per pixel or fewer unless its palette
    is the grey ramp (TensorFlow reads the palette indices as grey); a JPEG
    whose header declares 4 components (CMYK or YCCK); a PNG (eXIf chunk) or
    WebP (EXIF chunk) with an EXIF orientation other than 1, which only
    Pillow applies. Palette and 16-bit PNGs, GIFs and grey BMPs decode as the
    training pipeline decodes them and pass.

    Args:
        image_bytes: scalar tf.string.

    Returns:
        scalar tf.string.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    read_head, _ = _byte_reader(image_bytes, 0, _BMP_HEAD)
    magic = read_head(0, 12)
    starts = lambda signature, at=0: tf.reduce_all(tf.equal(magic[at:at + len(signature)], list(signature)))
    # Each format's test runs only on its own bytes (tf.cond): the chunk searches read the whole file.
    when = lambda format, test: tf.cond(format, test, lambda: tf.constant(False))
    refusals = [
        (tf.logical_or(starts(b"II*\0"), starts(b"MM\0*")), "TIFF image, which TensorFlow cannot decode"),
        (when(starts(b"BM"), lambda: _palette_bmp(read_head)),
         "palette BMP (8 bits per pixel or fewer, not grey), which TensorFlow decodes as grey palette indices"),
        (when(starts(b"\xff\xd8\xff"), lambda: tf.equal(tf.io.extract_jpeg_shape(image_bytes)[2], 4)),
         "CMYK JPEG (4 colour components), which TensorFlow converts to RGB otherwise than Pillow"),
        (when(starts(b"\x89PNG"), lambda: _chunk_orientation(image_bytes, b"eXIf", 4) > 1),
         "PNG with an EXIF orientation, which TensorFlow does not apply"),
        (when(tf.logical_and(starts(b"RIFF"), starts(b"WEBP", 8)),
              lambda: _chunk_orientation(image_bytes, b"EXIF", 8) > 1),
         "WebP with an EXIF orientation, which TensorFlow does not apply"),
    ]
    reason = tf.constant("")
    for refused, what in reversed(refusals):
        reason = tf.where(refused, what + _CONVERT_FIRST, reason)
    return reason


def _byte_reader(image_bytes, start, size):
    """`read(position, count)`: int32 bytes of image_bytes[start:start + size] (zeros past it), and its length."""
    start = tf.minimum(start, tf.strings.length(image_bytes, unit="BYTE"))  # substr refuses a start past the end
    head = tf.strings.substr(image_bytes, start, size)
    length = tf.strings.length(head, unit="BYTE")
    window = tf.cast(tf.pad(tf.io.decode_raw(head, tf.uint8), [[0, size + _BYTE_READ - length]]), tf.int32)

    def read(position, count):
        return tf.gather(window, tf.clip_by_value(position, 0, length) + np.arange(count, dtype=np.int32))

    return read, length


def _palette_bmp(read):
    """Whether a BMP header (from `read`) declares 8 bits per pixel or fewer without the grey ramp palette.

    Pillow reads an 8-bit BMP whose palette entry i is (i, i, i) for every
    colour used as grey ("L"), which is what TensorFlow gives; any other
    palette is colour. A 12-byte OS/2 header is refused too (its fields lie elsewhere).
    """
    little = lambda position, count: tf.reduce_sum(read(position, count) * 256 ** np.arange(count, dtype=np.int32))
    header_size, bits, colours = little(14, 4), little(28, 2), little(46, 4)
    colours = tf.where(tf.logical_or(colours <= 0, colours > 256), 256, colours)
    palette = tf.reshape(read(14 + header_size, 1024), [256, 4])[:, :3]
    ramp = np.arange(256, dtype=np.int32)[:, None]
    grey = tf.reduce_all(tf.logical_or(tf.equal(palette, ramp), tf.range(256)[:, None] >= colours))
    return tf.logical_or(tf.equal(header_size, 12),
                         tf.logical_and(bits <= 8, tf.logical_not(tf.logical_and(tf.equal(bits, 8), grey))))


def _chunk_orientation(image_bytes, chunk, header):
    """The EXIF orientation in the first `chunk` (PNG eXIf, WebP EXIF) of the file; 0 when there is none.

    The chunk's data (after its 4-letter name, then `header` - 4 more bytes)
    is a TIFF header, possibly after "Exif\0\0" (WebP writers differ).
    """
    before = tf.raw_ops.StringSplitV2(input=tf.reshape(image_bytes, [1]), sep=chunk, maxsplit=1).values[0]
    found = tf.strings.length(before, unit="BYTE") < tf.strings.length(image_bytes, unit="BYTE")
    start = tf.strings.length(before, unit="BYTE") + header
    read, _ = _byte_reader(image_bytes, start, _EXIF_SEARCH_BYTES)
    prefixed = tf.reduce_all(tf.equal(read(0, len(_EXIF_SEGMENT)), list(_EXIF_SEGMENT)))
    valid, value = _ifd0_orientation(read, tf.where(prefixed, len(_EXIF_SEGMENT), 0), _EXIF_SEARCH_BYTES)
    return tf.where(tf.logical_and(found, valid), value, 0)
