"""Tests for tfdogs.augment: the Keras augmentation block for training batches."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdogs.augment import build_augmentation


def _batch(size=8, side=16, seed=0):
    """float32 images in [0, 255] with no left-right symmetry."""
    return np.random.default_rng(seed).uniform(0, 255, (size, side, side, 3)).astype(np.float32)


def test_default_block_keeps_shape_dtype_and_range():
    augmentation = build_augmentation()
    assert augmentation.name == "augmentation"
    assert [type(layer).__name__ for layer in augmentation.layers] == [
        "RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast"]
    images = _batch()
    output = augmentation(images, training=True)
    assert output.shape == images.shape and output.dtype == "float32"
    assert np.all(np.asarray(output) >= 0) and np.all(np.asarray(output) <= 255)
    assert not np.allclose(output, images)


def test_nothing_enabled_gives_none_and_zero_amounts_are_left_out():
    assert build_augmentation(flip=False, rotation=0, zoom=0, translation=0, contrast=0) is None
    only_zoom = build_augmentation(flip=False, rotation=0, zoom=0.2, translation=0, contrast=0)
    assert [type(layer).__name__ for layer in only_zoom.layers] == ["RandomZoom"]


def test_negative_amount_is_rejected():
    with pytest.raises(ValueError, match="rotation"):
        build_augmentation(rotation=-0.1)


def test_flip_only_mirrors_or_keeps_each_image():
    augmentation = build_augmentation(flip=True, rotation=0, zoom=0, translation=0, contrast=0)
    images = _batch(size=16)
    output = np.asarray(augmentation(images, training=True))
    kept = [np.array_equal(out, image) for out, image in zip(output, images)]
    mirrored = [np.array_equal(out, image[:, ::-1]) for out, image in zip(output, images)]
    assert all(k or m for k, m in zip(kept, mirrored))
    assert any(kept) and any(mirrored)


def test_same_seed_repeats_and_other_seed_differs():
    images = _batch()
    first = build_augmentation(seed=3)(images, training=True)
    again = build_augmentation(seed=3)(images, training=True)
    other = build_augmentation(seed=4)(images, training=True)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_inference_mode_is_identity():
    images = _batch()
    np.testing.assert_array_equal(build_augmentation()(images, training=False), images)


def test_runs_inside_dataset_map_reproducibly():
    images = _batch(size=8)

    def augmented_batches(seed):
        augmentation = build_augmentation(seed=seed)
        dataset = tf.data.Dataset.from_tensor_slices(images).batch(4)
        dataset = dataset.map(lambda batch: augmentation(batch, training=True))
        return [np.asarray(batch) for batch in dataset]

    first, again = augmented_batches(seed=5), augmented_batches(seed=5)
    assert [b.shape for b in first] == [(4, 16, 16, 3)] * 2
    assert all(b.dtype == np.float32 for b in first)
    for batch, batch_again, original in zip(first, again, np.split(images, 2)):
        np.testing.assert_array_equal(batch, batch_again)
        assert not np.allclose(batch, original)


def test_stays_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        augmentation = build_augmentation()
    finally:
        keras.config.set_dtype_policy(previous)
    assert augmentation(_batch(), training=True).dtype == "float32"
