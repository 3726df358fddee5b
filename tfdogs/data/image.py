"""Image ops shared by training, evaluation and serving: the evaluation crop, Pillow-exact resizing, normalising.

Decoding and EXIF orientation: `tfdogs.data.decode`.
"""


import numpy as np
import tensorflow as tf
from PIL import Image

from tfdogs.data.layouts import DataError
from tfdogs.data.preprocessing import resize_size


def preprocess_eval(image, image_size, mean, std, crop_fraction=0.875, interpolation="bilinear",
                    resize_rounding="round", with_pillow=False) -> tf.Tensor:
    """Validation and serving preprocessing of one image.

    Resizes so the shorter side is image_size / crop_fraction (rounded as
    `resize_rounding` says), centre-crops image_size x image_size, scales to
    [0, 1] and normalises with mean/std. Sizes and offsets follow
    torchvision's Resize + CenterCrop, and the resize is Pillow's, which
    torchvision's and timm's eval transforms run on PIL images (see
    `_resize_shorter_side`). Pure TF with dynamic shapes: the SavedModel
    export reuses it. `with_pillow` has Pillow itself resize instead: the
    same pixels, about 3x faster, for pipelines that run in this process.

    Args:
        image: [h, w, 3] uint8, or float in [0, 255] (rounded to whole values, as an 8-bit image).
        image_size: Output side in pixels.
        mean: 3 RGB means for images in [0, 1].
        std: 3 RGB standard deviations for images in [0, 1].
        crop_fraction: Share of the resized shorter side kept by the crop, in (0, 1].
        interpolation: "bilinear" (torchvision weights) or "bicubic" (timm weights).
        resize_rounding: "round" (torchvision) or "floor" (timm's math.floor(img_size / crop_pct)).
        with_pillow: resize with Pillow in a `tf.numpy_function` (see `_resize_shorter_side_with_pillow`);
            a SavedModel cannot hold that, so the export keeps the in-graph resize.

    Returns:
        float32 [image_size, image_size, 3].
    """
    return normalize(eval_crop(image, image_size, crop_fraction, interpolation, resize_rounding, with_pillow),
                     mean, std)


def eval_crop(image, image_size, crop_fraction=0.875, interpolation="bilinear", resize_rounding="round",
              with_pillow=False) -> tf.Tensor:
    """`preprocess_eval` before its normalisation: the resized centre crop, float32 whole values in [0, 255]."""
    if not 0 < crop_fraction <= 1:
        raise DataError(f"crop_fraction must be in (0, 1]; got {crop_fraction}")
    resize = _resize_shorter_side_with_pillow if with_pillow else _resize_shorter_side
    image = resize(image, resize_size(image_size, crop_fraction, resize_rounding), interpolation)
    return _centre_crop(image, image_size)


# Test-time augmentation: the views `eval_views` gives for each allowed count, in order. Each count's views
# begin with the smaller count's, and view 0 is always the evaluation crop of `preprocess_eval`.
TTA_VIEWS = {
    1: ("centre",),
    2: ("centre", "centre mirrored"),
    10: ("centre", "centre mirrored", "top-left", "top-left mirrored", "top-right", "top-right mirrored",
         "bottom-left", "bottom-left mirrored", "bottom-right", "bottom-right mirrored"),
}


def eval_views(image, views, image_size, mean, std, crop_fraction=0.875, interpolation="bilinear",
               resize_rounding="round", with_pillow=False) -> tf.Tensor:
    """Test-time augmentation: `views` crops of one image, preprocessed as `preprocess_eval`.

    The image is resized once, exactly as `preprocess_eval` resizes it
    (shorter side `Preprocessing.resize_size`, longer side in proportion,
    Pillow's resampling), and every view is an image_size x image_size crop
    of that resized image, named in `TTA_VIEWS[views]`:

    - 1: the centre crop, which is `preprocess_eval`'s output, bit for bit;
    - 2: the centre crop and its mirror image (left-right);
    - 10: those two, then the crops at the four corners of the whole resized
      image (top-left, top-right, bottom-left, bottom-right; e.g. rows 0 to
      image_size - 1 and the last image_size columns for top-right), each
      followed by its mirror image.

    The ten are torchvision's `Resize(resize_size)` + `TenCrop(image_size)`
    (the classic AlexNet/ResNet 10-crop evaluation), except that mirrors are
    of the crops rather than crops of the mirrored image: the two differ
    only for the centre crop, by one pixel, when the margin is odd. On a
    4:3 photo at 224 px (resized to 256 x 341) the corner crops reach the
    far ends of the longer side. Callers average the views' softmax
    probabilities (not their logits).

    Args:
        image: [h, w, 3] uint8, or float in [0, 255] (rounded to whole values).
        views: 1, 2 or 10 (the keys of `TTA_VIEWS`).
        image_size, mean, std, crop_fraction, interpolation, resize_rounding, with_pillow: as for
            `preprocess_eval`.

    Returns:
        float32 [views, image_size, image_size, 3], in the order of `TTA_VIEWS[views]`.
    """
    if views not in TTA_VIEWS:
        raise DataError(f"test-time augmentation takes {', '.join(map(str, TTA_VIEWS))} views; got {views!r}")
    if not 0 < crop_fraction <= 1:
        raise DataError(f"crop_fraction must be in (0, 1]; got {crop_fraction}")
    resize = _resize_shorter_side_with_pillow if with_pillow else _resize_shorter_side
    image = resize(image, resize_size(image_size, crop_fraction, resize_rounding), interpolation)
    crops = [_centre_crop(image, image_size)]
    if views == 10:
        shape = tf.shape(image)
        bottom, right = shape[0] - image_size, shape[1] - image_size
        crops += [tf.ensure_shape(image[top:top + image_size, left:left + image_size], [image_size, image_size, 3])
                  for top, left in ((0, 0), (0, right), (bottom, 0), (bottom, right))]
    crops = tf.stack(crops)
    if views > 1:  # each crop followed by its mirror image
        crops = tf.reshape(tf.stack([crops, tf.reverse(crops, [2])], axis=1), [-1, image_size, image_size, 3])
    return normalize(crops, mean, std)


def _resize_shorter_side(image, size, interpolation="bilinear"):
    """Pillow's `Image.resize` of the shorter side to `size`, exactly, as float32 whole values in [0, 255].

    torchvision's `Resize(size)` and timm's eval transform resize PIL images,
    so what the weights were evaluated with is Pillow's resampling: antialiased
    (the filter widens with the downscale factor), two passes in Pillow's
    order, each in 22-bit fixed point and rounded to 8 bits. `tf.image.resize` differs
    by up to 16 levels with bicubic (its overshoot is not clipped) and up to 7
    after clipping and rounding; this reproduces Pillow bit for bit.
    """
    _check_interpolation(interpolation)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    shorter, longer = tf.minimum(height, width), tf.maximum(height, width)
    # torchvision truncates the longer side: int(size * longer / shorter); float64 keeps exact ratios exact.
    new_longer = tf.cast(size * tf.cast(longer, tf.float64) / tf.cast(shorter, tf.float64), tf.int32)
    portrait = height > width
    new_height, new_width = tf.where(portrait, new_longer, size), tf.where(portrait, size, new_longer)
    pixels = tf.clip_by_value(tf.round(tf.cast(image, tf.float64)), 0.0, 255.0)
    # Each pass rounds to 8 bits, so the order shows in the pixels. Pillow (13 and later) resamples the
    # height first when it loses more than twice as many pixels as the width (photos over twice as tall as
    # wide); that is the usual order on the transposed image, which traces one resize instead of two.
    vertical_first = tf.logical_and(height > new_height, height - new_height > 2 * (width - new_width))
    # Each pass resamples axis 0 (rows are gathered faster than columns): the axis resampled first is put there.
    first_size = tf.where(vertical_first, new_height, new_width)
    second_size = tf.where(vertical_first, new_width, new_height)
    pixels = _pillow_resample(tf.transpose(pixels, tf.where(vertical_first, [0, 1, 2], [1, 0, 2])), first_size,
                              interpolation)
    pixels = _pillow_resample(tf.transpose(pixels, [1, 0, 2]), second_size, interpolation)
    pixels = tf.transpose(pixels, tf.where(vertical_first, [1, 0, 2], [0, 1, 2]))
    return tf.cast(pixels, tf.float32)


def _resize_shorter_side_with_pillow(image, size, interpolation="bilinear"):
    """`_resize_shorter_side` done by Pillow's own `Image.resize`, through `tf.numpy_function`.

    The same sizes and the same pixels (the in-graph form reproduces Pillow
    bit for bit), about 3x faster: 1.3 against 3.9 ms for a 500x375 photo on
    the CPUs these numbers come from, and Pillow lets go of Python's lock while
    it resamples, so a parallel tf.data map runs it on every core. A
    SavedModel cannot hold Python, so the export keeps `_resize_shorter_side`.
    """
    _check_interpolation(interpolation)
    if image.dtype != tf.uint8:  # whole values in [0, 255], as the in-graph form reads them
        image = tf.saturate_cast(tf.round(tf.clip_by_value(tf.cast(image, tf.float64), 0.0, 255.0)), tf.uint8)

    def resize(pixels):
        height, width = pixels.shape[:2]
        new_longer = int(size * max(height, width) / min(height, width))  # truncated, as torchvision
        new_size = (size, new_longer) if height > width else (new_longer, size)  # Pillow's (width, height)
        return np.asarray(Image.fromarray(pixels).resize(new_size, _PILLOW_FILTERS[interpolation]), np.float32)

    return tf.ensure_shape(tf.numpy_function(resize, [image], tf.float32, stateful=False), [None, None, 3])


_PILLOW_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def pillow_resize(image, size, interpolation="bilinear", box=None) -> tf.Tensor:
    """Pillow's `Image.resize` of a uint8 [h, w, 3] image (or of its `box` region) in a `tf.numpy_function`.

    The resampler of the evaluation resize (`preprocess_eval` with
    `with_pillow`), antialiased as the weights' eval transforms: the training
    crops and the training cache use it, so training, evaluation and serving
    resize alike. Pillow lets go of Python's lock while it resamples, so a
    parallel tf.data map runs it on every core.

    Args:
        image: uint8 [h, w, 3].
        size: (height, width), ints or an int32 tensor.
        interpolation: "bilinear" or "bicubic".
        box: None (the whole image), or (left, top, right, bottom) in pixels, fractions allowed:
            the region resampled, Pillow's `box` (its filter reads the pixels around the region too).

    Returns:
        uint8 [height, width, 3].
    """
    _check_interpolation(interpolation)
    resample = _PILLOW_FILTERS[interpolation]

    def resize(pixels, new_size, region):
        region = None if region.size == 0 else tuple(float(edge) for edge in region)
        new_size = (int(new_size[1]), int(new_size[0]))  # Pillow's (width, height)
        return np.asarray(Image.fromarray(pixels).resize(new_size, resample, box=region), np.uint8)

    region = tf.zeros([0], tf.float64) if box is None else tf.cast(box, tf.float64)
    resized = tf.numpy_function(resize, [image, tf.cast(size, tf.int32), region], tf.uint8, stateful=False)
    return tf.ensure_shape(resized, [None, None, 3])


def _check_interpolation(interpolation):
    if interpolation not in _PILLOW_FILTER_SUPPORT:
        raise DataError(f"interpolation must be one of {sorted(_PILLOW_FILTER_SUPPORT)}; got {interpolation!r}")


# Pillow's fixed point: 32-bit sums with 8 bits for the pixel and 2 for filter overshoot (Resample.c).
_PILLOW_PRECISION_BITS = 22
_PILLOW_FILTER_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def _pillow_filter(x, interpolation):
    x = tf.abs(x)
    if interpolation == "bilinear":
        return tf.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5  # Keys' cubic convolution, as Pillow
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, 0.0))


def _pillow_resample(pixels, out_size, interpolation):
    """One of Pillow's two resampling passes: float64 whole pixel values [h, w, 3] to [out_size, w, 3]."""
    in_size = tf.shape(pixels)[0]
    # Pillow's precompute_coeffs, step by step in float64 like its C doubles.
    scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
    filter_scale = tf.maximum(scale, 1.0)
    support = _PILLOW_FILTER_SUPPORT[interpolation] * filter_scale
    taps = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    centre = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
    first = tf.maximum(tf.cast(centre - support + 0.5, tf.int32), 0)  # C's (int) truncates, as tf.cast
    count = tf.minimum(tf.cast(centre + support + 0.5, tf.int32), in_size) - first
    offsets = tf.range(taps)[None, :]
    source = first[:, None] + offsets
    weights = _pillow_filter((tf.cast(source, tf.float64) - centre[:, None] + 0.5) * (1.0 / filter_scale),
                             interpolation)
    weights = tf.where(offsets < count[:, None], weights, 0.0)
    total = tf.reduce_sum(weights, axis=1, keepdims=True)
    weights = tf.math.divide_no_nan(weights, total)
    fixed = weights * (1 << _PILLOW_PRECISION_BITS)
    fixed = tf.where(fixed < 0, tf.math.ceil(fixed - 0.5), tf.floor(fixed + 0.5))  # C's (int)(x -/+ 0.5)
    source = tf.minimum(source, in_size - 1)  # taps past the edge have weight 0

    # One tap at a time: gathering all taps at once would hold [out, taps, w, 3] doubles, over 1 GB for
    # a 12-megapixel photo. Integer sums below 2^31 are exact in float64, so the order cannot matter.
    def add_tap(tap, sums):
        return tap + 1, sums + tf.gather(pixels, source[:, tap]) * fixed[:, tap, None, None]

    out_shape = tf.concat([[out_size], tf.shape(pixels)[1:]], 0)
    rounding = tf.fill(out_shape, tf.constant(1 << (_PILLOW_PRECISION_BITS - 1), tf.float64))
    _, sums = tf.while_loop(lambda tap, _: tap < taps, add_tap, (tf.constant(0), rounding))
    return tf.clip_by_value(tf.floor(sums / (1 << _PILLOW_PRECISION_BITS)), 0.0, 255.0)


def _centre_crop(image, size):
    shape = tf.shape(image)
    # torchvision rounds the offsets; tf.round, like Python's round, rounds half to even.
    top = tf.cast(tf.round((shape[0] - size) / 2), tf.int32)
    left = tf.cast(tf.round((shape[1] - size) / 2), tf.int32)
    return tf.ensure_shape(image[top:top + size, left:left + size], [size, size, 3])


def normalize(images, mean, std):
    """[0, 255] images -> ((images / 255) - mean) / std, float32."""
    mean, std = rgb_constant(mean, "mean"), rgb_constant(std, "std")
    return (tf.cast(images, tf.float32) / 255.0 - mean) / std


def rgb_constant(values, name):
    values = np.asarray(values, dtype=np.float32)
    if values.shape != (3,):
        raise DataError(f"{name} must hold 3 values (R, G, B); got {values.tolist()}")
    return tf.constant(values)
