"""Training-set augmentation from Keras preprocessing layers.

The block is mapped over training batches in the tf.data pipeline
(`data.make_dataset(augmentation=build_augmentation())`), never put inside the
model: random image ops keep a model from compiling under XLA, and the exported
model should hold no training-only layers.

Besides the geometric and photometric layers of the study (flip, rotation,
zoom, translation, contrast), the block can hold the modern recipe's:
RandAugment (Cubuk et al. 2020), AugMix (Hendrycks et al. 2020), random
erasing (Zhong et al. 2020), and the two that mix pairs of images and their
labels, MixUp (Zhang et al. 2018) and CutMix (Yun et al. 2019). The mixing
layers need one-hot (soft) labels; the others leave labels alone.

`augment_batch` draws every random number from a seed it is given rather than
from the layers' own seed generators, so a batch's augmentation depends only
on that seed (the pipeline derives it from the run seed, the epoch and the
batch's position): a resumed run augments exactly as an uninterrupted one. It
also has the rotation, zoom and translation layers resample through
`resample.affine_transform` (XLA-compiled, the same arithmetic, two to three
times faster on a CPU) instead of TensorFlow's kernel.
"""

import random
import types

import keras
import tensorflow as tf

from tfdogs.data import resample

# Layers that mix two images and so their labels too.
MIXING_LAYERS = (keras.layers.MixUp, keras.layers.CutMix)


def build_augmentation(flip=True, rotation=0.05, zoom=0.1, translation=0.1, contrast=0.1, seed=0, *,
                       randaugment=None, augmix=False, random_erasing=0.0, mixup=0.0,
                       cutmix=0.0) -> keras.Sequential | None:
    """The training augmentation block for float images in [0, 255].

    Each layer is included only when its amount is positive, in this order:
    flip, rotation, zoom, translation, contrast, RandAugment, AugMix, random
    erasing, MixUp, CutMix (mixing last, so that each mixed image was
    augmented on its own first). Layer k gets seed `seed + k`; under
    `augment_batch` the seeds come from the batch instead.

    Args:
        flip: Mirror left-right with probability 1/2.
        rotation: Largest rotation, as a fraction of a full turn (0.05 = 18 degrees).
        zoom: Largest zoom in or out, as a fraction of the image side.
        translation: Largest shift, as a fraction of the image height and width.
        contrast: Contrast factor drawn from [1 - contrast, 1 + contrast].
        seed: Base seed of the layers.
        randaugment: (N, M) from `config.parse_randaugment`: N random operations of
            magnitude M / 10 per batch, or None.
        augmix: AugMix with Keras' defaults (3 chains of depth up to 3).
        random_erasing: Probability that an image gets a random rectangle
            replaced by noise.
        mixup: MixUp's Beta(alpha, alpha) parameter; 0 turns it off.
        cutmix: CutMix's Beta(alpha, alpha) parameter; 0 turns it off.

    Returns:
        A keras.Sequential named "augmentation", or None when nothing is enabled.
    """
    amounts = {"rotation": rotation, "zoom": zoom, "translation": translation, "contrast": contrast,
               "random_erasing": random_erasing, "mixup": mixup, "cutmix": cutmix}
    for name, amount in amounts.items():
        if amount < 0:
            raise ValueError(f"build_augmentation: {name} must be >= 0; got {amount}")
    # float32 whatever the global dtype policy: under mixed precision the images stay full precision
    # until the model casts them.
    options = {"dtype": "float32"}
    pixels = {"value_range": (0, 255), **options}
    candidates = [
        (flip, lambda k: keras.layers.RandomFlip("horizontal", seed=k, **options)),
        (rotation, lambda k: keras.layers.RandomRotation(rotation, seed=k, **options)),
        (zoom, lambda k: keras.layers.RandomZoom(zoom, seed=k, **options)),
        (translation, lambda k: keras.layers.RandomTranslation(translation, translation, seed=k, **options)),
        (contrast, lambda k: keras.layers.RandomContrast(contrast, seed=k, **pixels)),
        (randaugment, lambda k: keras.layers.RandAugment(
            num_ops=randaugment[0], factor=randaugment[1] / 10, seed=k, **pixels)),
        (augmix, lambda k: keras.layers.AugMix(seed=k, **pixels)),
        (random_erasing, lambda k: keras.layers.RandomErasing(factor=random_erasing, seed=k, **pixels)),
        (mixup, lambda k: keras.layers.MixUp(alpha=mixup, seed=k, **options)),
        (cutmix, lambda k: keras.layers.CutMix(factor=cutmix, seed=k, **options)),
    ]
    layers = [make_layer(seed + index) for index, (amount, make_layer) in enumerate(candidates) if amount]
    return keras.Sequential(layers, name="augmentation") if layers else None


def mixes_labels(augmentation):
    """Whether a block mixes images and labels (MixUp, CutMix), and so needs one-hot labels."""
    return augmentation is not None and any(isinstance(layer, MIXING_LAYERS) for layer in _layers(augmentation))


class _FixedSeed(keras.random.SeedGenerator):
    """A SeedGenerator stand-in that hands out seeds derived from one seed tensor.

    Keras' random ops take a SeedGenerator (stateful) or an int; this gives
    them a stateless sequence instead: draw k gets fold_in(seed, k). It holds
    no variable, so it can be made inside a tf.data map.
    """

    def __init__(self, seed):  # deliberately no super().__init__(): no state variable
        self._seed, self._draws = seed, 0

    def next(self, ordered=True):
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._draws)


def _layers(augmentation):
    return getattr(augmentation, "layers", [augmentation])


def augment_batch(augmentation, images, seed, labels=None, part=None):
    """Applies an augmentation block to a batch with randomness drawn from `seed` alone.

    Equivalent to `augmentation({"images": images, "labels": labels},
    training=True)` except for where the random numbers come from: the same
    seed gives the same augmentation, in any process and at any point of a
    run. Layers that draw through their own generator inside (RandAugment,
    AugMix) get the fixed seed in its place while they draw.

    Args:
        augmentation: the block from `build_augmentation`, or one Keras layer.
        images: float32 [batch, height, width, 3] in [0, 255].
        seed: int32 or int64 [2], a stateless seed (`tf.random.experimental.stateless_fold_in`).
        labels: float32 one-hot [batch, classes], needed by MixUp and CutMix.
        part: (start, whole): `images` are images start to start + batch of
            a batch of `whole` (a worker's slice of a multi-worker run's
            global batch). Flip, rotation, zoom, translation and contrast
            then give exactly what those images get in the whole batch; the
            other layers draw for the slice alone, and MixUp and CutMix mix
            within it.

    Returns:
        The augmented batch, or (batch, labels) when labels are given.
    """
    for index, layer in enumerate(_layers(augmentation)):
        if not hasattr(layer, "get_random_transformation"):  # a layer that draws nothing
            images = layer(images, training=True)
            continue
        layer_seed = _FixedSeed(tf.random.experimental.stateless_fold_in(seed, index))
        own_generator, own_backend = layer.generator, layer.backend
        object.__setattr__(layer, "generator", layer_seed)  # past Keras' tracking: it is put back below
        if isinstance(layer, RESAMPLING_LAYERS):
            object.__setattr__(layer, "backend", _CompiledResampling(own_backend))  # likewise
        # Keras' AugMix picks its chains' operations with Python's `random` while the pipeline is traced
        # (the same chains for every batch of a pipeline); seeded here, a resumed run traces the same ones.
        python_random = random.getstate()
        random.seed(index)
        try:
            data = images if labels is None else {"images": images, "labels": labels}
            if part is not None and isinstance(layer, SLICEABLE_LAYERS):
                transformation = _slice_of_whole_batch(layer, images, layer_seed, *part)
            else:
                transformation = layer.get_random_transformation(data, training=True, seed=layer_seed)
            mixed = layer.transform_images(images, transformation, training=True)
            if isinstance(layer, MIXING_LAYERS):
                if labels is None:
                    raise ValueError(f"{layer.name} mixes labels: give augment_batch one-hot labels")
                labels = layer.transform_labels(labels, transformation, training=True)
            images = mixed
        finally:
            object.__setattr__(layer, "generator", own_generator)
            object.__setattr__(layer, "backend", own_backend)
            random.setstate(python_random)
    return images if labels is None else (images, labels)


# Layers that resample through `self.backend.image.affine_transform` (Keras 3.15; tests/test_keras_internals.py).
RESAMPLING_LAYERS = (keras.layers.RandomRotation, keras.layers.RandomZoom, keras.layers.RandomTranslation)


class _CompiledResampling:
    """A Keras preprocessing layer's `backend` (its `DynamicBackend`), with `resample.affine_transform` as
    `image.affine_transform`: the layer draws and builds its transform as ever, and XLA resamples."""

    def __init__(self, backend):
        self._backend = backend
        self.image = types.SimpleNamespace(affine_transform=lambda *args, **kwargs: resample.affine_transform(
            *args, **kwargs, fallback=backend.image.affine_transform))

    def __getattr__(self, name):
        return getattr(self._backend, name)


# Layers whose random transformation holds one draw per image, in batch order (see `augment_batch`'s part).
SLICEABLE_LAYERS = (keras.layers.RandomFlip, keras.layers.RandomRotation, keras.layers.RandomZoom,
                    keras.layers.RandomTranslation, keras.layers.RandomContrast)


def _slice_of_whole_batch(layer, images, seed, start, whole):
    """The random transformation of a `whole`-image batch, cut to the images from `start` on.

    These layers draw from the batch's shape alone, so a stand-in batch of
    the whole size gives the whole batch's draws.
    """
    shape = tf.shape(images)
    stand_in = tf.zeros(tf.concat([[whole], shape[1:]], 0), images.dtype)
    transformation = layer.get_random_transformation(stand_in, training=True, seed=seed)
    if transformation is None:
        return None
    return {key: shape if key == "input_shape" else
            value[start:start + shape[0]] if getattr(value, "shape", None) is not None and len(value.shape) > 1
            else value
            for key, value in transformation.items()}
