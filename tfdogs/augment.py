"""Training-set augmentation from Keras preprocessing layers.

The block is mapped over training batches in the tf.data pipeline
(`data.make_dataset(augmentation=build_augmentation())`), never put inside the
model: random image ops keep a model from compiling under XLA, and the exported
model should hold no training-only layers.

`augment_batch` draws every random number from a seed it is given rather than
from the layers' own seed generators, so a batch's augmentation depends only
on that seed (the pipeline derives it from the run seed, the epoch and the
batch's position): a resumed run augments exactly as an uninterrupted one.
"""

import keras
import tensorflow as tf


def build_augmentation(flip=True, rotation=0.05, zoom=0.1, translation=0.1, contrast=0.1,
                       seed=0) -> keras.Sequential | None:
    """Random flip, rotation, zoom, translation and contrast for float images in [0, 255].

    Each layer is included only when its amount is positive. Layer k (in the
    order of the arguments) gets seed `seed + k`, so the layers draw
    independent numbers and a block built afresh with the same seed repeats the
    same sequence of augmentations; a block keeps advancing its sequence across
    calls and epochs.

    Args:
        flip: Mirror left-right with probability 1/2.
        rotation: Largest rotation, as a fraction of a full turn (0.05 = 18 degrees).
        zoom: Largest zoom in or out, as a fraction of the image side.
        translation: Largest shift, as a fraction of the image height and width.
        contrast: Contrast factor drawn from [1 - contrast, 1 + contrast].
        seed: Base seed of the layers.

    Returns:
        A keras.Sequential named "augmentation" to call on a batch with
        training=True, or None when nothing is enabled.
    """
    amounts = {"rotation": rotation, "zoom": zoom, "translation": translation, "contrast": contrast}
    for name, amount in amounts.items():
        if amount < 0:
            raise ValueError(f"build_augmentation: {name} must be >= 0; got {amount}")
    # float32 whatever the global dtype policy: under mixed precision the images stay full precision
    # until the model casts them.
    options = {"dtype": "float32"}
    candidates = [
        (flip, lambda: keras.layers.RandomFlip("horizontal", seed=seed, **options)),
        (rotation, lambda: keras.layers.RandomRotation(rotation, seed=seed + 1, **options)),
        (zoom, lambda: keras.layers.RandomZoom(zoom, seed=seed + 2, **options)),
        (translation,
         lambda: keras.layers.RandomTranslation(translation, translation, seed=seed + 3, **options)),
        (contrast,
         lambda: keras.layers.RandomContrast(contrast, value_range=(0, 255), seed=seed + 4, **options)),
    ]
    layers = [make_layer() for amount, make_layer in candidates if amount]
    return keras.Sequential(layers, name="augmentation") if layers else None


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


def augment_batch(augmentation, images, seed, part=None):
    """Applies an augmentation block to a batch with randomness drawn from `seed` alone.

    Equivalent to `augmentation(images, training=True)` except for where the
    random numbers come from: the same seed gives the same augmentation, in
    any process and at any point of a run.

    Args:
        augmentation: the block from `build_augmentation`, or one Keras layer.
        images: float32 [batch, height, width, 3] in [0, 255].
        seed: int32 or int64 [2], a stateless seed (`tf.random.experimental.stateless_fold_in`).
        part: (start, whole): `images` are images start to start + batch of
            a batch of `whole` (a worker's slice of a multi-worker run's
            global batch). Flip, rotation, zoom, translation and contrast
            then give exactly what those images get in the whole batch.

    Returns:
        The augmented batch, float32 like `images`.
    """
    for index, layer in enumerate(getattr(augmentation, "layers", [augmentation])):
        if not hasattr(layer, "get_random_transformation"):  # a layer that draws nothing
            images = layer(images, training=True)
            continue
        layer_seed = _FixedSeed(tf.random.experimental.stateless_fold_in(seed, index))
        if part is not None and isinstance(layer, SLICEABLE_LAYERS):
            transformation = _slice_of_whole_batch(layer, images, layer_seed, *part)
        else:
            transformation = layer.get_random_transformation(images, training=True, seed=layer_seed)
        images = layer.transform_images(images, transformation, training=True)
    return images


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
