"""The XLA-compiled resampling against a NumPy bilinear-reflect reference and TensorFlow's own kernel."""

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from PIL import Image

from tfdogs.data import resample

HEIGHT, WIDTH = 48, 64  # not square, so that a swapped height and width shows


def photos():
    """Two real photos (scikit-image's cat and astronaut) at 48 x 64, float32 in [0, 255]."""
    return np.stack([np.asarray(Image.fromarray(picture).resize((WIDTH, HEIGHT)), np.float32)
                     for picture in (skimage.data.chelsea(), skimage.data.astronaut())])


def reflect(coordinate, length):
    """TensorFlow's REFLECT fill (dcba|abcd|dcba) as a period of 2 * length, clamped into the image."""
    folded = np.mod(coordinate, 2 * length)
    folded = np.where(folded >= length, 2 * length - folded - 1, folded)
    return np.clip(folded, 0, length - 1)


def numpy_affine(images, transforms, fill_value=0.0):
    """Bilinear resampling with reflected borders in float64, one output pixel at a time, vectorised."""
    batch, height, width, _ = images.shape
    rows, columns = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64),
                                indexing="ij")
    output = np.empty(images.shape, np.float64)
    for index, (a0, a1, a2, b0, b1, b2, c0, c1) in enumerate(np.asarray(transforms, np.float64)):
        projection = c0 * columns + c1 * rows + 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            x = reflect((a0 * columns + a1 * rows + a2) / projection, width)
            y = reflect((b0 * columns + b1 * rows + b2) / projection, height)
        x = np.nan_to_num(x)
        y = np.nan_to_num(y)
        x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
        padded = np.pad(images[index].astype(np.float64), [(0, 1), (0, 1), (0, 0)], constant_values=fill_value)
        dx, dy = (x - x0)[..., None], (y - y0)[..., None]
        top = (1 - dx) * padded[y0, x0] + dx * padded[y0, x0 + 1]
        bottom = (1 - dx) * padded[y0 + 1, x0] + dx * padded[y0 + 1, x0 + 1]
        output[index] = np.where((projection == 0)[..., None], fill_value, (1 - dy) * top + dy * bottom)
    return output


def kernel(images, transforms, interpolation="BILINEAR", fill_mode="REFLECT", fill_value=0.0):
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=tf.constant(transforms, tf.float32), output_shape=[HEIGHT, WIDTH],
        fill_value=fill_value, interpolation=interpolation, fill_mode=fill_mode).numpy()


def rotation(angle):
    """Keras' rotation about the image centre, as RandomRotation builds it (output -> input)."""
    cx, cy = (WIDTH - 1) / 2, (HEIGHT - 1) / 2
    c, s = np.cos(angle), np.sin(angle)
    return [c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy, 0, 0]


TRANSFORMS = {
    # the study's amounts: 18 degrees, 10 % zoom, 10 % shifts, at their extremes and past the borders
    "rotation": [rotation(0.314), rotation(-0.2)],
    "zoom": [[1.1, 0, (WIDTH - 1) / 2 * -0.1, 0, 0.9, (HEIGHT - 1) / 2 * 0.1, 0, 0],
             [0.93, 0, (WIDTH - 1) / 2 * 0.07, 0, 1.08, (HEIGHT - 1) / 2 * -0.08, 0, 0]],
    "translation": [[1, 0, -6.4, 0, 1, 4.8, 0, 0], [1, 0, 3.0, 0, 1, -2.0, 0, 0]],
    "far outside": [[3.0, 0.5, -200.0, -0.4, 2.5, 150.0, 0, 0], [-1.0, 0, 400.5, 0, -1.0, -300.25, 0, 0]],
    # projective, with the projection exactly 0 on the column x = 16 of the first image
    "projective": [[1, 0, 0, 0, 1, 0, -0.0625, 0], [1, 0.1, 0, 0, 1, 0, 0.001, 0.002]],
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("where", ["eager", "dataset map"])
def test_compiled_resampling_matches_numpy_and_the_kernel_to_rounding(name, where):
    images, transforms = photos(), np.asarray(TRANSFORMS[name], np.float32)
    if where == "eager":
        result = resample.affine_transform(tf.constant(images), tf.constant(transforms), "bilinear", "reflect",
                                           fallback=None).numpy()
    else:
        dataset = tf.data.Dataset.from_tensors((images, transforms)).map(
            lambda batch, transform: resample.affine_transform(batch, transform, "bilinear", "reflect",
                                                               fallback=None))
        result = next(iter(dataset)).numpy()
    assert result.dtype == np.float32 and result.shape == images.shape
    reference = numpy_affine(images, transforms)
    # a source coordinate may round differently in its last bit: a pixel moves by a tiny fraction of a level
    np.testing.assert_allclose(result, reference, rtol=0, atol=0.05)
    np.testing.assert_allclose(result, kernel(images, transforms), rtol=0, atol=0.05)
    assert np.abs(result - reference).mean() < 1e-3
    if name == "projective":
        assert (result[0, :, 16] == 0).all() and (reference[0, :, 16] == 0).all()


def test_other_interpolations_and_fill_modes_go_to_the_backend_unchanged():
    images, transforms = photos(), np.asarray(TRANSFORMS["rotation"], np.float32)
    calls = []

    def fallback(images, transform, **options):
        calls.append(options)
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=images, transforms=transform, output_shape=tf.shape(images)[1:3],
            fill_value=options["fill_value"], interpolation=options["interpolation"].upper(),
            fill_mode=options["fill_mode"].upper())

    for interpolation, fill_mode in [("nearest", "reflect"), ("bilinear", "constant"), ("bilinear", "nearest")]:
        result = resample.affine_transform(tf.constant(images), tf.constant(transforms), interpolation,
                                           fill_mode, 7.0, fallback=fallback).numpy()
        np.testing.assert_array_equal(result, kernel(images, transforms, interpolation.upper(),
                                                     fill_mode.upper(), 7.0))
    assert [call["fill_mode"] for call in calls] == ["reflect", "constant", "nearest"]
