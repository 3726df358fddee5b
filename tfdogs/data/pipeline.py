"""The tf.data pipeline: seeded training crops, augmentation, evaluation crops, caching."""

import functools
import hashlib
import json
import pathlib

import numpy as np
import tensorflow as tf

from tfdogs.data import augment
from tfdogs.data.decode import decode_image, exif_orientation, traced_as_written
from tfdogs.data.image import TTA_VIEWS, eval_crop, eval_views, normalize, pillow_resize, preprocess_eval, rgb_constant
from tfdogs.data.layouts import DataError

_JPEG_MAGIC = b"\xff\xd8\xff"
# Inception / torchvision RandomResizedCrop aspect-ratio range (width / height).
_CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
# The training cache keeps images 50% larger than the eval resize (384 px at 224): a 500x375 photo is
# cached whole, and a larger one loses a mean of 0.9 levels per crop (docs/training.md).
_TRAIN_CACHE_MARGIN = 1.5
KEPT_CROPS_BYTES = 1 << 30  # the most an evaluation pipeline's kept crops take (224 px: 7,133 photos)


def _is_jpeg(image_bytes):
    return tf.equal(tf.strings.substr(image_bytes, 0, 3), _JPEG_MAGIC)


def _crop_window(image_shape, seed, scale):
    """Random crop (begin, size) covering `scale` of the area at aspect 3/4..4/3."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=_CROP_ASPECT_RANGE,
        area_range=scale,
        max_attempts=10,  # as torchvision; after 10 misses the whole image is used.
    )
    return begin, size


def random_crop_image(image, seed, scale):
    begin, size = _crop_window(tf.shape(image), seed, scale)
    return tf.slice(image, begin, size)


def random_crop_bytes(image_bytes, seed, scale):
    """Random crop of encoded bytes; JPEG is decoded only inside the crop window."""

    def jpeg_crop():
        begin, size = _crop_window(tf.io.extract_jpeg_shape(image_bytes), seed, scale)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        return tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)

    def other_crop():
        return random_crop_image(decode_image(image_bytes), seed, scale)

    # A JPEG stored sideways (EXIF orientation) is decoded whole and turned upright before cropping.
    upright = tf.equal(exif_orientation(image_bytes), 1)
    crop = tf.cond(tf.logical_and(_is_jpeg(image_bytes), upright), jpeg_crop, other_crop)
    return tf.ensure_shape(crop, [None, None, 3])


def _resize_square(image, size, interpolation="bilinear", box=None):
    """A training crop (or the `box` region of an image) resized to size x size: float32 whole values.

    Pillow's resampling, the evaluation resize's (`pillow_resize`): TensorFlow's
    antialiased `tf.image.resize` differs from it by up to 1 level with
    bilinear and 12 with bicubic (its overshoot is not clipped as Pillow's 8-bit
    passes are; measured on crops of the dogs10 photos).
    """
    return tf.ensure_shape(tf.cast(pillow_resize(image, [size, size], interpolation, box), tf.float32),
                           [size, size, 3])


def _cached_shape(shape, shorter_side):
    """The shape [h, w] an image of `shape` is cached at: shrunk (never enlarged) to shorter side <= S, longer <= 2 S.

    A very elongated photo is shrunk further rather than cut, so every crop
    window of the photo stays inside its cached image; 2 S bounds the memory.
    """
    shape = tf.cast(shape, tf.float64)
    scale = tf.reduce_min(tf.stack([1.0, shorter_side / tf.reduce_min(shape), 2 * shorter_side / tf.reduce_max(shape)]))
    return tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), 1)


def _shrink_for_cache(image, shorter_side, interpolation="bilinear"):
    """(uint8 image shrunk for the training cache with the weights' resampling, its original shape [h, w])."""
    shape = tf.shape(image)[:2]
    return pillow_resize(image, _cached_shape(shape, shorter_side), interpolation), shape


def _cached_crop(image, original_shape, seed, scale, size, interpolation):
    """The training crop of a cached image: the window drawn on the original photo, resampled from the cache.

    The window is the one `random_crop_bytes` draws at the same seed on the
    original photo (the draw depends on the shape). Mapped into the shrunk
    image its edges fall between pixels: the whole pixels around it are cut
    out and Pillow resamples the window's part of them (`box`) to size x
    size. A photo the cache did not shrink gives `random_crop_bytes`'s crop
    exactly; a shrunk one differs where the crop is enlarged from the cache
    but shrunk from the photo (measured in docs/training.md).
    """
    begin, window = _crop_window(tf.concat([original_shape, [3]], 0), seed, scale)
    ratio = tf.cast(tf.shape(image)[:2], tf.float64) / tf.cast(original_shape, tf.float64)
    start = tf.cast(begin[:2], tf.float64) * ratio
    end = tf.cast(begin[:2] + window[:2], tf.float64) * ratio
    cached_shape = tf.shape(image)[:2]
    end = tf.minimum(end, tf.cast(cached_shape, tf.float64))  # a window to the photo's edge may round past it
    first = tf.minimum(tf.cast(tf.floor(start), tf.int32), cached_shape - 1)
    last = tf.maximum(tf.cast(tf.math.ceil(end), tf.int32), first + 1)
    pixels = tf.slice(image, tf.concat([first, [0]], 0), tf.concat([last - first, [3]], 0))
    start, end = start - tf.cast(first, tf.float64), end - tf.cast(first, tf.float64)
    return _resize_square(pixels, size, interpolation, box=tf.stack([start[1], start[0], end[1], end[0]]))


def make_dataset(paths, labels, *, image_size, batch_size, training, mean, std, seed=0,
                 augmentation=None, cache=None, shuffle_buffer=1024, crop_fraction=0.875,
                 scale=(0.08, 1.0), num_parallel_calls=tf.data.AUTOTUNE,
                 interpolation="bilinear", flip=False, cache_size=None, resize_rounding="round",
                 first_epoch=0, num_epochs=1, steps_per_epoch=None, num_classes=None,
                 part=None, views=1, keep_crops=False) -> tf.data.Dataset:
    """tf.data pipeline of normalised image batches and labels.

    Training: epochs `first_epoch` to `first_epoch + num_epochs - 1` one
    after the other, each `steps_per_epoch` full batches (default: all of
    them). Per epoch: shuffle the file list, read in parallel,
    random-resized-crop (area `scale`, aspect 3/4..4/3; JPEGs, found by their
    magic bytes, are decoded only inside the crop window), resize to
    image_size with Pillow (`interpolation`, the evaluation resize's
    resampler), batch dropping the remainder, apply `augmentation` to each
    batch of float images in [0, 255] (so RandomContrast's value_range is
    (0, 255)), then normalise.

    Randomness is keyed by (seed, epoch): the shuffle order, every image's
    crop and flip and every batch's augmentation in epoch e are drawn by
    stateless ops from seeds derived from `seed` and e alone (crops from the
    image's index in `paths`, augmentation from the batch's position in the
    epoch). A pipeline that starts at epoch e therefore gives exactly the
    batches that a pipeline started at epoch 0 gives in its epoch e, which
    is what makes a resumed run equal an uninterrupted one.

    Evaluation: no shuffle or augmentation, `preprocess_eval` per image (its
    resize done by Pillow itself, the same pixels as the SavedModel's
    in-graph resize, 3x faster), the last batch keeps the remainder; with
    `views` > 1, `eval_views` per image (test-time augmentation).

    Cache memory per image: training caches uint8 images shrunk (by Pillow,
    with `interpolation`) to shorter side S = round(image_size / crop_fraction
    * 1.5) and longer side <= 2 S, at most 6 S^2 bytes (image_size 224: S =
    384, <= 885 kB, ~590 kB for a 4:3 photo, so a 500x375 photo is kept whole;
    64: S = 110, <= 73 kB), with the photo's shape. Each crop window is drawn
    on the photo's shape, as without a cache, and resampled from the cached
    image (`_cached_crop`): crops of photos kept whole are the uncached crops;
    a shrunk photo's differ a little (docs/training.md). A `shuffle_buffer`
    of such images follows the cache. Evaluation caches the final float32
    image, 12 * image_size^2 bytes (224: 602 kB; 64: 49 kB). `cache_size`
    sets S directly: less memory and faster crops, at the price of enlarging
    crops from the cache that the photo would have shrunk.

    Speed: without `augmentation` every per-image step (crop, resize, `flip`,
    normalise) runs in one parallel map; a Keras flip on batches runs
    sequentially and costs more than the decoding on 2 cores.

    Args:
        paths: Image file paths.
        labels: Integer class per path.
        image_size: Output side in pixels.
        batch_size: Images per batch.
        training: Training (random) or evaluation (deterministic) pipeline.
        mean: 3 RGB means for images in [0, 1].
        std: 3 RGB standard deviations for images in [0, 1].
        seed: Seed of the shuffles and random crops.
        augmentation: Keras layer called on training batches with training=True.
        cache: None (off), "memory", or a file path prefix; the files get a
            suffix from the mode, size and file list, so settings never share
            stale caches.
        shuffle_buffer: Images in the shuffle buffer after a training cache
            (without a cache the whole file list is shuffled).
        crop_fraction: Eval centre-crop share, see `preprocess_eval`; also
            sets the training cache size.
        scale: Area range of the training random crop, within (0, 1].
        num_parallel_calls: Parallelism of the per-image maps.
        interpolation: Resize method, "bilinear" or "bicubic", as the weights were trained with.
        resize_rounding: Eval: "round" or "floor" of image_size / crop_fraction, see `preprocess_eval`.
        flip: Training: mirror each image left-right with probability 1/2
            (stateless, seeded like its crop) inside the parallel map.
        cache_size: Training cache: shorter side S of the cached images
            (default round(image_size / crop_fraction * 1.15)).
        first_epoch: Training: the first epoch the pipeline gives.
        num_epochs: Training: how many epochs it gives, one after the other.
        steps_per_epoch: Training: batches per epoch, at most (and by
            default) the number of full batches.
        num_classes: Give labels as one-hot float32 [B, num_classes] rows
            (soft labels, as MixUp and CutMix in `augmentation` need) instead
            of class indices.
        part: Training: (index, count): give only the index-th of count
            equal slices of every batch (batch_size / count images), as
            they are in the whole batch, augmentation included (see
            `augment.augment_batch`). Each worker of a multi-worker run
            loads and augments its own slice of the global batch alone.
        views: Evaluation: 1, or the test-time augmentation views of each image, 2 or 10 (`eval_views`).
        keep_crops: Evaluation, one view, no `cache`: keep the uint8 crops (the same pixels) in memory
            after the first pass when they fit in `KEPT_CROPS_BYTES`, so later passes read no photo.

    Returns:
        A Dataset of (float32 [B, image_size, image_size, 3], int32 [B] or float32 [B, num_classes]).
        With `part`, B is batch_size / count. With `views` > 1, the images are [B, views, image_size,
        image_size, 3].
    """
    paths = [str(p) for p in paths]
    labels = np.asarray(labels)
    if not paths or labels.shape != (len(paths),):
        raise DataError(
            f"make_dataset: need one label per path; got {len(paths)} paths, labels of shape {labels.shape}")
    if training and len(paths) < batch_size:
        raise DataError(f"make_dataset: {len(paths)} training images give no full batch of {batch_size}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise DataError(f"scale must satisfy 0 < low <= high <= 1; got {scale}")
    if cache is not None and not str(cache):
        raise DataError("cache must be None, 'memory' or a file path prefix; got ''")
    if cache_size is not None and cache_size < 8:
        raise DataError(f"cache_size is the cached images' shorter side in pixels (>= 8); got {cache_size}")
    # Checked here, so a bad mean/std fails now rather than inside a traced map.
    rgb_constant(mean, "mean")
    rgb_constant(std, "std")
    cache_settings = dict(paths=paths, image_size=image_size, crop_fraction=crop_fraction, training=training,
                          mean=[float(v) for v in mean], std=[float(v) for v in std], interpolation=interpolation,
                          resize_rounding=resize_rounding)
    if cache_size:
        cache_settings["cache_size"] = cache_size
    if training:  # the cached elements: Pillow-shrunk image and the photo's shape (older caches held neither)
        cache_settings["training_cache"] = "pillow, original shape"
    if views != 1:
        if training or views not in TTA_VIEWS:
            raise DataError(f"make_dataset: views are test-time augmentation, {', '.join(map(str, TTA_VIEWS))} "
                            f"views of evaluation images; got views={views!r} with training={training}")
        cache_settings["views"] = views

    if not training:
        files = tf.data.Dataset.from_tensor_slices((paths, labels.astype(np.int32)))
        if keep_crops and views == 1 and cache is None and len(paths) * 3 * image_size ** 2 <= KEPT_CROPS_BYTES:
            def crop_eval(path, label):
                crop = eval_crop(decode_image(tf.io.read_file(path)), image_size, crop_fraction, interpolation,
                                 resize_rounding, with_pillow=True)
                return tf.saturate_cast(crop, tf.uint8), label

            kept = files.map(traced_as_written(crop_eval), num_parallel_calls).batch(batch_size).cache()
            dataset = kept.map(traced_as_written(lambda crops, classes: (normalize(crops, mean, std), classes)))
            return without_autotuner(_labels_as(dataset, num_classes).prefetch(tf.data.AUTOTUNE))

        def load_eval(path, label):
            image = decode_image(tf.io.read_file(path))
            if views != 1:
                return eval_views(image, views, image_size, mean, std, crop_fraction, interpolation,
                                  resize_rounding, with_pillow=True), label
            return preprocess_eval(image, image_size, mean, std, crop_fraction, interpolation,
                                   resize_rounding, with_pillow=True), label

        dataset = _maybe_cache(files.map(traced_as_written(load_eval), num_parallel_calls), cache, cache_settings)
        return without_autotuner(_labels_as(dataset.batch(batch_size), num_classes).prefetch(tf.data.AUTOTUNE))

    full_batches = len(paths) // batch_size
    steps = min(steps_per_epoch or full_batches, full_batches)
    base_seed = tf.constant([seed, 0], tf.int64)

    def epoch_seed(epoch, purpose):
        """Seed of one kind of draw (0 shuffle, 1 crops, 2 augmentation) in one epoch."""
        fold = tf.random.experimental.stateless_fold_in
        return fold(fold(base_seed, tf.cast(epoch, tf.int64)), purpose)

    # Examples are indices into paths: crops are keyed by the index, so by the photo, not its position.
    path_of, label_of = tf.constant(paths), tf.constant(labels.astype(np.int32))
    if cache is None:
        def epoch_examples(epoch):
            order = tf.random.experimental.stateless_shuffle(tf.range(len(paths), dtype=tf.int64),
                                                             epoch_seed(epoch, 0))
            return tf.data.Dataset.from_tensor_slices(order).map(traced_as_written(lambda index: (epoch, index)))

        def load_train(epoch, index):
            path, label = tf.gather(path_of, index), tf.gather(label_of, index)
            crop_seed = tf.random.experimental.stateless_fold_in(epoch_seed(epoch, 1), index)
            crop = random_crop_bytes(tf.io.read_file(path), crop_seed, scale)
            return _resize_square(crop, image_size, interpolation), label, crop_seed
    else:
        # Mixed once before caching (the same order every epoch), so a class-sorted file list is mixed
        # beyond the shuffle buffer below.
        order = tf.random.experimental.stateless_shuffle(tf.range(len(paths), dtype=tf.int64), base_seed)
        shorter_side = cache_size or round(image_size / crop_fraction * _TRAIN_CACHE_MARGIN)
        decoded = tf.data.Dataset.from_tensor_slices(order).map(traced_as_written(
            lambda index: (index, *_shrink_for_cache(decode_image(tf.io.read_file(tf.gather(path_of, index))),
                                                     shorter_side, interpolation))),
            num_parallel_calls)
        cached = _maybe_cache(decoded, cache, cache_settings)

        def epoch_examples(epoch):
            # A Python seed per epoch (Dataset.shuffle refuses a tensor seed when TF's global seed is 0), so the
            # order also depends on that global seed, which training sets from `seed` too.
            shuffle_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
            return cached.shuffle(shuffle_buffer, seed=shuffle_seed).map(traced_as_written(
                lambda index, image, shape: (tf.constant(epoch, tf.int64), index, image, shape)))

        def load_train(epoch, index, image, original_shape):
            label = tf.gather(label_of, index)
            crop_seed = tf.random.experimental.stateless_fold_in(epoch_seed(epoch, 1), index)
            crop = _cached_crop(image, original_shape, crop_seed, scale, image_size, interpolation)
            return crop, label, crop_seed

    # (x / 255 - mean) / std as one multiply-add with image-shaped constants: broadcasting 3 channel
    # values costs Eigen more than the arithmetic (0.5 ms per 224 px image on these CPUs).
    full_shape = [image_size, image_size, 3]
    pixel_scale = tf.constant(np.broadcast_to(1 / (255 * np.asarray(std, np.float64)), full_shape), tf.float32)
    pixel_offset = tf.constant(np.broadcast_to(-np.asarray(mean, np.float64) / np.asarray(std), full_shape),
                               tf.float32)

    def load_and_finish(*example):
        image, label, crop_seed = load_train(*example)
        if flip:
            image = tf.image.stateless_random_flip_left_right(
                image, tf.random.experimental.stateless_fold_in(crop_seed, 1))
        if augmentation is None:  # elementwise, so per image it equals per batch, and runs in parallel
            image = image * pixel_scale + pixel_offset
        return image, label

    # Each epoch gives exactly steps * batch_size images, so batches never straddle two epochs.
    if cache is None:
        epochs = tf.data.Dataset.range(first_epoch, first_epoch + num_epochs)
        examples = epochs.flat_map(traced_as_written(lambda epoch: epoch_examples(epoch).take(steps * batch_size)))
    else:
        examples = functools.reduce(tf.data.Dataset.concatenate, [
            epoch_examples(epoch).take(steps * batch_size) for epoch in range(first_epoch, first_epoch + num_epochs)])
    part_start, part_size = 0, batch_size
    if part is not None:
        part_index, part_count = part
        if batch_size % part_count or not 0 <= part_index < part_count:
            raise DataError(f"make_dataset: part {part} must be one of equal slices of batch {batch_size}")
        part_size = batch_size // part_count
        part_start = part_index * part_size
        # Chosen by position before any image is read: each worker decodes only its own images.
        examples = examples.enumerate().filter(traced_as_written(
            lambda position, example: (position % batch_size) // part_size == part_index)).map(
            traced_as_written(lambda position, example: example))
    dataset = examples.map(traced_as_written(load_and_finish), num_parallel_calls).batch(part_size, drop_remainder=True)
    dataset = _labels_as(dataset, num_classes)
    whole = None if part is None else (part_start, batch_size)
    if augmentation is not None:
        if augment.mixes_labels(augmentation) and not num_classes:
            raise DataError("make_dataset: MixUp and CutMix mix labels; give num_classes for one-hot labels")

        def augment_and_normalise(position, batch):
            images, batch_labels = batch
            epoch, step = first_epoch + position // steps, position % steps
            seed = tf.random.experimental.stateless_fold_in(epoch_seed(epoch, 2), step)
            if num_classes:
                images, batch_labels = augment.augment_batch(augmentation, images, seed, batch_labels, part=whole)
            else:
                images = augment.augment_batch(augmentation, images, seed, part=whole)
            return normalize(images, mean, std), batch_labels

        dataset = dataset.enumerate().map(traced_as_written(augment_and_normalise), num_parallel_calls)
    return without_autotuner(dataset.prefetch(tf.data.AUTOTUNE))


def without_autotuner(dataset):
    """`dataset` with tf.data's model-based autotuner off; AUTOTUNE then means one thread per core.

    The autotuner's optimisation thread made deleting an iterator wait for it,
    in steps of about 1 s: 0.2 s or 2.2 s for a 6-epoch training pipeline,
    and 14-15 s at the end of about every other 6-epoch ResNet-18 run on
    dogs10 (2 cores, where it also competes with training). Without it the
    same runs never stalled and trained as fast (33-34 s against 34-50 s);
    prefetch buffers still grow with demand (tf.data's legacy prefetch
    autotuning, a separate mechanism). The frozen backbone's per-batch
    features (`tfdogs.training.features.inference_epochs`) waited about 4 s
    an epoch with it, the backbone on one core: ResNet-18 feature extraction
    on dogs10, 10 epochs, 100.9 s with it and 69.0 s without.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def _labels_as(dataset, num_classes):
    """Batches with class indices, or with one-hot float32 rows when num_classes is given."""
    if not num_classes:
        return dataset
    return dataset.map(traced_as_written(lambda images, labels: (images, tf.one_hot(labels, num_classes, dtype=tf.float32))))


def _maybe_cache(dataset, cache, settings):
    if cache is None:
        return dataset
    if cache == "memory":
        return dataset.cache()
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    prefix = pathlib.Path(cache)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    mode = "train" if settings["training"] else "eval"
    return dataset.cache(f"{prefix}_{mode}_{settings['image_size']}px_{digest}")
