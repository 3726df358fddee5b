"""Bilinear affine resampling with reflected borders, compiled by XLA: the study's rotation, zoom and translation.

Keras' RandomRotation, RandomZoom and RandomTranslation resample a batch
through `backend.image.affine_transform`, which on TensorFlow is the
`ImageProjectiveTransformV3` kernel. That kernel works out the transform, the
border reflection and the four bilinear reads once for every output value,
channel by channel: on a 2-core Intel Xeon each of the three layers took
0.072-0.074 CPU-seconds for a batch of 32 images of 224 px, most of the study
augmentation's cost. `affine_transform` here does the kernel's arithmetic,
formula for formula, once per pixel for all channels, in one XLA-compiled
function: 0.023-0.027 CPU-seconds a layer for the same batch
(`benchmarks/augmentation_layers.py`).

The result is the kernel's up to rounding: XLA fuses the transform's
multiply-adds, so a source coordinate can differ from the kernel's in its last
bit, and a pixel by up to about 0.01 of 255 (measured on rotated, zoomed and
translated batches; `tests/test_resample.py` allows 0.05). Other
interpolations, fill modes and layouts go to the backend's own
`affine_transform`.
"""

import tensorflow as tf


def affine_transform(images, transform, interpolation="bilinear", fill_mode="constant", fill_value=0,
                     data_format=None, *, fallback):
    """Keras' `affine_transform`: compiled here for bilinear reflection, else `fallback`.

    Args:
        images: float32 [batch, height, width, channels].
        transform: [batch, 8] or [8] projective transforms, each mapping output
            pixel (x, y) to the input point ((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k),
            k = c0 x + c1 y + 1, as `keras.ops.image.affine_transform` takes them.
        interpolation, fill_mode, fill_value, data_format: as there.
        fallback: the backend's `affine_transform`, for every other case.

    Returns:
        The resampled images, shaped and typed as `images`.
    """
    if (interpolation != "bilinear" or fill_mode != "reflect" or data_format == "channels_first"
            or images.shape.rank != 4 or images.dtype != tf.float32 or None in images.shape[1:]):
        return fallback(images, transform, interpolation=interpolation, fill_mode=fill_mode,
                        fill_value=fill_value, data_format=data_format)
    transform = tf.cast(transform, tf.float32)
    if transform.shape.rank == 1:
        transform = tf.broadcast_to(transform, [tf.shape(images)[0], 8])
    return _bilinear_reflect(images, transform, tf.cast(fill_value, tf.float32))


def _reflect(coordinate, length):
    """TensorFlow's REFLECT coordinate map (dcba|abcd|dcba), then clamped into [0, length - 1]."""
    if length <= 1:
        return tf.zeros_like(coordinate)
    size, twice = float(length), 2.0 * length

    def truncated(value):  # the kernel's static_cast to an integer: towards zero
        return tf.cast(tf.cast(value, tf.int64), tf.float32)

    below = twice * truncated(-coordinate / twice) + coordinate
    below = tf.where(below < -size, below + twice, -below - 1.0)
    above = coordinate - twice * truncated(coordinate / twice)
    above = tf.where(above >= size, twice - above - 1.0, above)
    mapped = tf.where(coordinate < 0.0, below, tf.where(coordinate > size - 1.0, above, coordinate))
    return tf.clip_by_value(mapped, 0.0, size - 1.0)


@tf.function(jit_compile=True)
def _bilinear_reflect(images, transform, fill_value):
    batch, height, width, channels = images.shape
    batch = tf.shape(images)[0] if batch is None else batch
    rows, columns = tf.meshgrid(tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32),
                                indexing="ij")
    a = transform[:, :, None, None]
    projection = a[:, 6] * columns + a[:, 7] * rows + 1.0
    x = _reflect((a[:, 0] * columns + a[:, 1] * rows + a[:, 2]) / projection, width)
    y = _reflect((a[:, 3] * columns + a[:, 4] * rows + a[:, 5]) / projection, height)
    # Where the projection is 0 the kernel answers the fill value: point those pixels at the padding's
    # corner with all weight on it (a select on the coordinates; one on the output would stop XLA fusing).
    undefined = projection == 0.0
    x, y = tf.where(undefined, float(width), x), tf.where(undefined, float(height), y)
    x_floor, y_floor = tf.floor(x), tf.floor(y)
    x_ceil, y_ceil = x_floor + 1.0, y_floor + 1.0
    # A ceiling one past the last row or column reads the fill value, as the kernel does: pad by one.
    # (XLA clamps a gather's indices, so the reads past the padding's corner stay in range, at weight 0.)
    padded = tf.pad(images, [[0, 0], [0, 1], [0, 1], [0, 0]], constant_values=fill_value)
    pixels = tf.reshape(padded, [-1, channels])
    first = tf.range(batch)[:, None, None] * ((height + 1) * (width + 1))

    def read(row, column):
        return tf.gather(pixels, first + tf.cast(row, tf.int32) * (width + 1) + tf.cast(column, tf.int32))

    left, right = (x_ceil - x)[..., None], (x - x_floor)[..., None]
    top = left * read(y_floor, x_floor) + right * read(y_floor, x_ceil)
    bottom = left * read(y_ceil, x_floor) + right * read(y_ceil, x_ceil)
    return (y_ceil - y)[..., None] * top + (y - y_floor)[..., None] * bottom
