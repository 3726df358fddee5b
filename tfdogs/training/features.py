"""Cached backbone features: a frozen backbone runs once per view of each photo, and the head trains on them.

While the backbone is frozen (`--strategy feature-extract`, and fine-tune's
head phase), every epoch would push every photo through the same unchanging
network again. With `--feature-views N` the backbone runs once on N views of
each training photo and once on the validation photos; the pooled features
(the ``avgpool`` output, where every tfdogs model's head begins) are kept in
memory and in `RUN/feature_cache/`, and the head (``dropout`` -> ``fc``, the
same layers, so the full model is trained in place) trains on them for the
phase's epochs:

    N = 1   the evaluation crop of each photo, every epoch: no augmentation at all;
    N >= 2  N epochs of the training pipeline (random crops, flips and the
            run's augmentation, mixing included), computed once; epoch e
            trains on view e mod N.

What changes: the augmentation is limited to those views, and BatchNorm runs
with its moving statistics as it does for a frozen backbone anyway. With
N = 1 in float32 the head trained on cached features equals the uncached one
on the same photos in the same order (`tests/test_features.py`). The
checkpoint, backup, early stopping, history and TensorBoard callbacks see the
head; `best.weights.h5` and the phase's weights hold the whole model.
"""

import json
import pathlib
import time

import keras
import numpy as np
import tensorflow as tf

from tfdogs import files
from tfdogs.data.decode import traced_as_written
from tfdogs.data.pipeline import without_autotuner
from tfdogs.models import FEATURE_LAYER
from tfdogs.serving.fold import fold_batch_norms
from tfdogs.training.phases import STAGES

CACHE_FOLDER = "feature_cache"


def can_cache(model):
    """Whether the model has the pooled-features layer its head starts from."""
    return any(layer.name == FEATURE_LAYER for layer in model.layers)


def on_features(config, phase, model, multi_worker):
    """Whether a phase trains the classifier alone on features of a backbone that runs apart as inference.

    So it does where the phase freezes the whole backbone (single-worker, a model with pooled features),
    per batch (`--frozen-inference`, the default) or on cached views (`--feature-views`).
    """
    frozen = phase.frozen_stages == STAGES[:-1] and not multi_worker and can_cache(model)
    return frozen and bool(config["feature_views"] or config["frozen_inference"])


def split_at_features(model):
    """(backbone, head): the model cut after ``avgpool``; the head reuses the model's own layers.

    Training the head trains the model: both hold the same ``dropout`` and ``fc`` (and any later) layers.
    """
    names = [layer.name for layer in model.layers]
    cut = names.index(FEATURE_LAYER)
    features = model.get_layer(FEATURE_LAYER).output
    backbone = keras.Model(model.inputs, features, name=f"{model.name}_backbone")
    head_input = keras.Input(features.shape[1:], name="features")
    x = head_input
    for layer in model.layers[cut + 1:]:
        x = layer(x)
    return backbone, keras.Model(head_input, x, name=f"{model.name}_head")


def compiled(backbone):
    """The backbone's inference as one graph (an eager call runs layer by layer), float32 out.

    Traced once for any batch size: the last, smaller batch of each split would otherwise trace it again.
    """
    images = tf.TensorSpec([None, *backbone.input_shape[1:]], tf.float32)
    return tf.function(lambda images: tf.cast(backbone(images, training=False), tf.float32), input_signature=[images],
                       autograph=False)


def inference_of(backbone, dtype_policy=None):
    """The frozen backbone as the serving path runs it: BatchNorms folded, in `dtype_policy`, one graph.

    Args:
        backbone: the model up to its pooled features (from `split_at_features`).
        dtype_policy: the Keras dtype policy it computes in (a run's `frozen_precision`: mixed bfloat16 on a
            CPU that computes it natively, even where the run trains in float32); None keeps the backbone's own.
    """
    return compiled(fold_batch_norms(backbone, dtype_policy))


def features_of(backbone, dataset):
    """float32 features and labels of every batch of an (images, labels) dataset, in its order.

    Args:
        backbone: the model up to its pooled features, or its `compiled` form.
        dataset: batches of (images, labels).
    """
    return features_of_each(backbone, [dataset])[0]


def features_of_each(backbone, datasets):
    """`features_of` each dataset, one after the other, each started while the one before runs.

    A pipeline's first batches are being read and decoded while the network
    still runs on the one before it (and while it is traced, before the
    first), so it never waits for a pipeline to fill: on 300 photos in two
    splits that wait cost about 0.1 s, besides making each iterator (0.04 s).
    At most two pipelines are open at a time.

    Returns:
        A list of (features, labels), one per dataset.
    """
    forward = backbone if isinstance(backbone, tf.types.experimental.PolymorphicFunction) else compiled(backbone)
    results, upcoming = [], iter(datasets[0])
    forward.get_concrete_function()  # traced while the first batches load
    for index in range(len(datasets)):
        batches, upcoming = upcoming, iter(datasets[index + 1]) if index + 1 < len(datasets) else None
        features, labels = [], []
        for images, batch_labels in batches:
            features.append(forward(images).numpy())
            labels.append(np.asarray(batch_labels, np.float32))
        results.append((np.concatenate(features), np.concatenate(labels)))
    return results


def inference_epochs(forward, train_dataset, val_dataset, batch_size):
    """The frozen backbone run as inference, batch by batch: the datasets the head trains and validates on.

    Every batch of the training pipeline (each epoch's own augmented crops, in
    its order) goes through the backbone with its BatchNorms folded
    (`tfdogs.serving.fold`), in one compiled function and with no gradient
    tape; the head trains on the pooled features. The next batch's features
    are computed while the head trains on the current one. Nothing is kept
    between epochs, so the training is the one of the whole model with its
    backbone frozen: in float32 the trained head agrees with it to about 1e-6.
    The validation photos' features are computed once: the backbone does not
    change during the phase.

    Args:
        forward: the frozen backbone as inference (`inference_of`).
        train_dataset: batches of (images, labels), every epoch of the phase.
        val_dataset: batches of (images, labels) of the validation photos.
        batch_size: the batch size of the returned validation dataset.

    Returns:
        (training dataset of (features, labels), validation dataset of (features, labels),
        the validation features and labels as arrays).
    """
    val = features_of(forward, val_dataset)
    labels_spec = train_dataset.element_spec[1]

    def batches():
        for images, labels in train_dataset:
            yield forward(images), labels

    features_spec = tf.TensorSpec([None, val[0].shape[1]], tf.float32)
    # Without tf.data's autotuner, as the run's other pipelines: on 2 cores it left each epoch
    # waiting about 4 s for it, and the backbone running on one core (`without_autotuner`).
    train = without_autotuner(
        tf.data.Dataset.from_generator(batches, output_signature=(features_spec, labels_spec)).prefetch(1))
    return train, without_autotuner(tf.data.Dataset.from_tensor_slices(val).batch(batch_size)), val


class FeatureCache:
    """The cached views of the training photos and the validation features, as `tf.data` pipelines.

    Args:
        views: list of (features [n, D], labels [n, C]) per view, each the same n.
        val: (features, labels) of the validation photos.
        seed: the run's seed; each epoch's order is keyed by (seed, epoch).
    """

    def __init__(self, views, val, seed):
        self.features = tf.constant(np.stack([view[0] for view in views]))
        self.labels = tf.constant(np.stack([view[1] for view in views]))
        self.val = val
        self.seed = seed

    def train_epochs(self, first_epoch, num_epochs, batch_size, steps_per_epoch):
        """Epochs `first_epoch`.. of `steps_per_epoch` batches: view e mod N, shuffled by (seed, epoch)."""
        count_views, rows = int(self.features.shape[0]), int(self.features.shape[1])
        taken = steps_per_epoch * batch_size
        if taken > rows:
            raise ValueError(f"{steps_per_epoch} steps of {batch_size} need {taken} cached rows; {rows} are cached.")

        def epoch_rows(epoch):
            order = tf.argsort(tf.random.stateless_uniform([rows], seed=tf.stack([tf.constant(self.seed, tf.int64),
                                                                                  epoch])))[:taken]
            view = tf.fill([taken], tf.cast(epoch % count_views, tf.int32))
            return tf.data.Dataset.from_tensor_slices(tf.stack([view, order], axis=1))

        return (tf.data.Dataset.range(first_epoch, first_epoch + num_epochs).flat_map(traced_as_written(epoch_rows))
                .batch(batch_size, drop_remainder=True)
                .map(traced_as_written(lambda pairs: (tf.gather_nd(self.features, pairs), tf.gather_nd(self.labels, pairs))))
                .prefetch(tf.data.AUTOTUNE).apply(without_autotuner))

    def val_dataset(self, batch_size):
        return without_autotuner(tf.data.Dataset.from_tensor_slices(self.val).batch(batch_size))


def build_cache(forward, train_epochs, evaluation_of, views, seed, folder=None, key=None):
    """Runs the frozen backbone over the views and the validation photos once (or reads them back).

    Args:
        forward: the frozen backbone as inference (`inference_of`).
        train_epochs: the run's training pipeline, `train_epochs(first_epoch, num_epochs)`.
        evaluation_of: `evaluation_of(which)`, the evaluation crops of the training ("train") or
            validation ("val") photos, in split order.
        views: N, see the module docstring.
        seed: the run's seed.
        folder: where the features are kept for a resumed run (`RUN/feature_cache`), or None.
        key: what the features depend on (model weights' source, image size, views, the
            precision `forward` computes in); a cache written under another key is recomputed.

    Returns:
        (FeatureCache, seconds spent computing, or 0.0 when read back).
    """
    stored = pathlib.Path(folder) / "features.npz" if folder else None
    if stored and stored.is_file() and json.loads((stored.parent / "key.json").read_text()) == key:
        with np.load(stored) as saved:
            count = int(saved["count"])
            cache_views = [(saved[f"view{index}"], saved[f"view{index}_labels"]) for index in range(count)]
            return FeatureCache(cache_views, (saved["val"], saved["val_labels"]), seed), 0.0
    started = time.perf_counter()
    training = [evaluation_of("train")] if views == 1 else [train_epochs(view, 1) for view in range(views)]
    *cache_views, val = features_of_each(forward, [*training, evaluation_of("val")])
    seconds = time.perf_counter() - started
    if stored:
        arrays = {"count": np.array(len(cache_views)), "val": val[0], "val_labels": val[1]}
        for index, (features, labels) in enumerate(cache_views):
            arrays[f"view{index}"], arrays[f"view{index}_labels"] = features, labels
        files.replace_into(stored, lambda temporary: np.savez(temporary, **arrays))
        files.write_json(key, stored.parent / "key.json")
    return FeatureCache(cache_views, val, seed), seconds
