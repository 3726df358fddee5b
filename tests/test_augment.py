"""Tests for tfdogs.data.augment: the Keras augmentation block for training batches."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdogs.data.augment import build_augmentation


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


# ----------------------------------------------------------------------------- the modern recipe

from tfdogs import data  # noqa: E402
from tfdogs.data import augment  # noqa: E402

NONE = dict(flip=False, rotation=0, zoom=0, translation=0, contrast=0)
RECIPE = {
    "randaugment": dict(randaugment=(2, 9)),
    "augmix": dict(augmix=True),
    "random_erasing": dict(random_erasing=1.0),
    "mixup": dict(mixup=0.4),
    "cutmix": dict(cutmix=1.0),
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return data.find_records(data.make_synthetic(tmp_path_factory.mktemp("recipe"), num_classes=4,
                                                 images_per_class=8, image_size=48))


def _recipe_batches(records, seed=0, **amounts):
    augmentation = build_augmentation(**NONE, **amounts) if amounts else None
    dataset = data.make_dataset(records.paths, records.labels, image_size=32, batch_size=8, training=True,
                                mean=(0.5,) * 3, std=(0.25,) * 3, augmentation=augmentation, num_classes=4,
                                seed=seed)
    return [(images.numpy(), labels.numpy()) for images, labels in dataset]


@pytest.mark.parametrize("name", list(RECIPE))
def test_each_recipe_augmentation_changes_the_batches_and_keeps_the_label_mass(photos, name):
    plain = _recipe_batches(photos)
    augmented = _recipe_batches(photos, **RECIPE[name])
    again = _recipe_batches(photos, **RECIPE[name])
    assert len(plain) == len(augmented) == 4
    for (plain_images, plain_labels), (images, labels), (images_again, _) in zip(plain, augmented, again):
        np.testing.assert_array_equal(images, images_again)  # seeded by (seed, epoch, batch)
        np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-6)  # one unit of label mass per image
        assert (labels >= 0).all()
        if name in ("mixup", "cutmix"):
            # mixed: each image now carries a share of another's label, in proportion to its pixels
            assert (np.count_nonzero(labels > 1e-6, axis=1) <= 2).all()
        else:
            np.testing.assert_array_equal(labels, plain_labels)  # the others leave labels alone
    changed = [not np.allclose(images, plain_images, atol=1e-4)
               for (plain_images, _), (images, _) in zip(plain, augmented)]
    assert any(changed), name
    if name in ("mixup", "cutmix"):
        mixed = np.concatenate([labels for _, labels in augmented])
        assert (mixed.max(axis=1) < 1 - 1e-3).any(), "no label was mixed"


def test_cutmix_mixes_labels_by_the_pasted_area(photos):
    """CutMix's labels are the area shares: the pixels that changed are the pasted patch."""
    plain = _recipe_batches(photos)
    mixed = _recipe_batches(photos, cutmix=1.0)
    checked = 0
    for (plain_images, plain_labels), (images, labels) in zip(plain, mixed):
        own_share = (labels * plain_labels).sum(axis=1)  # the label mass kept by the image's own breed
        pasted = np.any(np.abs(images - plain_images) > 1e-5, axis=-1).mean(axis=(1, 2))
        same_breed = own_share > 1 - 1e-6  # a patch from a photo of the same breed leaves the label whole
        np.testing.assert_allclose(own_share[~same_breed], 1 - pasted[~same_breed], atol=0.07)
        checked += int((~same_breed).sum())
    assert checked >= 8  # most images got a patch of another breed


def test_mixing_needs_one_hot_labels(photos):
    with pytest.raises(data.DataError, match="one-hot"):
        data.make_dataset(photos.paths, photos.labels, image_size=32, batch_size=8, training=True,
                          mean=(0.5,) * 3, std=(0.25,) * 3, augmentation=build_augmentation(**NONE, mixup=0.2))
    assert augment.mixes_labels(build_augmentation(**NONE, cutmix=1.0))
    assert not augment.mixes_labels(build_augmentation(**NONE, randaugment=(2, 9)))


def _op_types(function, *args):
    """Every op type in a traced tf.function, the functions it calls included."""
    graph = function.get_concrete_function(*args).graph.as_graph_def()
    return {node.op for node in graph.node} | {node.op for f in graph.library.function for node in f.node_def}


def test_study_resampling_runs_compiled_and_matches_tensorflow_s_kernel_to_rounding(monkeypatch):
    from tfdogs.data import augment

    images, seed = tf.constant(_batch(size=4, side=40)), tf.constant([7, 3], tf.int64)
    augmentation = build_augmentation()
    compiled = tf.function(lambda batch: augment.augment_batch(augmentation, batch, seed))
    assert "ImageProjectiveTransformV3" not in _op_types(compiled, images)
    result = compiled(images).numpy()
    monkeypatch.setattr(augment, "RESAMPLING_LAYERS", ())  # the layers' own kernel, the same draws
    with_kernel = tf.function(lambda batch: augment.augment_batch(augmentation, batch, seed))
    assert "ImageProjectiveTransformV3" in _op_types(with_kernel, images)
    np.testing.assert_allclose(result, with_kernel(images).numpy(), rtol=0, atol=0.1)
    assert not np.allclose(result, images.numpy(), atol=1.0)
