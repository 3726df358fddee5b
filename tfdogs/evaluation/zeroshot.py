"""The untrained ImageNet classifier restricted to the data set's breeds: the baseline any fine-tuned number must beat.

A breed that ImageNet splits into several classes (``poodle``) gets the sum
of their probabilities. Where some breeds of the data set have no ImageNet
class at all (``dachshund``), the baseline is measured on the photos of the
others, over those others alone, and the result names the breeds left out.

The command line: `tfdogs.zeroshot`.
"""

import numpy as np
import tensorflow as tf

from tfdogs import data, models, progress, weights
from tfdogs.models import hub
from tfdogs.data import breeds
from tfdogs.evaluation import metrics


def covered_breeds(class_names):
    """The breeds that have ImageNet classes: {class index: their ImageNet indices}, in class order."""
    covered = {}
    for index, name in enumerate(class_names):
        try:
            covered[index] = breeds.imagenet_classes(name)
        except KeyError:
            continue
    return covered


def breed_columns(class_names):
    """The ImageNet class indices of each breed, in class order; ValueError naming the breeds with none."""
    covered = covered_breeds(class_names)
    unknown = [name for index, name in enumerate(class_names) if index not in covered]
    if unknown:
        raise ValueError(f"No ImageNet class for the breed(s) {', '.join(unknown)}; the zero-shot baseline "
                         "needs breed names of the 120 Kaggle breeds (e.g. 'golden_retriever').")
    return list(covered.values())


def breed_probabilities(imagenet_logits, class_names):
    """Softmax over the logits of the data set's breeds' ImageNet classes, summed per breed: [N, len(class_names)]."""
    columns = breed_columns(class_names)
    flat = [column for group in columns for column in group]
    probabilities = tf.nn.softmax(tf.gather(tf.cast(imagenet_logits, tf.float32), flat, axis=1), axis=-1).numpy()
    starts = np.cumsum([0] + [len(group) for group in columns[:-1]])
    return np.add.reduceat(probabilities, starts, axis=1)


def evaluate_zero_shot(model_name, records, indices, *, weights_source, preprocessing, batch_size=32, verbose=1,
                       features=None, imagenet_classifier=None):
    """Scores the ImageNet classifier restricted to the data set's breeds.

    Args:
        model_name: a `tfdogs.models.MODEL_NAMES` network other than lenet5, or "keras_hub:PRESET" (an
            ImageClassifier preset).
        records: the labelled photos (`data.Records`).
        indices: which of them to score.
        weights_source: "imagenet", "timm" or a checkpoint path with a 1000-class head ("preset" for keras-hub).
        preprocessing: the `Preprocessing` of those weights (a run's `RUN/preprocessing.json`,
            or `weights.resolve_preprocessing`); its `image_size` is the input size.
        batch_size: images per inference batch.
        verbose: 0 hides the progress bar (shown on a terminal for a few hundred photos or more).
        features: the pooled features of the photos at `indices`, in that order, from the weights'
            backbone with `preprocessing` (a training run's frozen pass computes them): then no
            network runs here, and `imagenet_classifier` maps them to the ImageNet logits.
        imagenet_classifier: (kernel [features, 1000], bias [1000]), with `features`.

    Returns:
        Dict with accuracy, top5_accuracy, log_loss and what was measured; where some breeds have no
        ImageNet class, measured on the photos of the others (``breeds_left_out`` names them).

    Raises:
        ValueError: fewer than two breeds with an ImageNet class, or weights without a 1000-class head.
    """
    covered = covered_breeds(records.class_names)  # fail before loading any weights
    if len(covered) < 2:
        raise ValueError(f"The zero-shot baseline needs at least two breeds with an ImageNet class; of "
                         f"{', '.join(records.class_names)} {len(covered)} has one.")
    left_out = [name for index, name in enumerate(records.class_names) if index not in covered]
    remap = np.full(len(records.class_names), -1)
    remap[list(covered)] = np.arange(len(covered))
    kept = remap[records.labels[np.asarray(indices)]] >= 0
    indices = np.asarray(indices)[kept]
    labels = remap[records.labels[indices]]
    class_names = [records.class_names[index] for index in covered]
    if imagenet_classifier is not None:  # the run has the head at hand: its file is not read again
        has_head = np.shape(imagenet_classifier[0])[-1] == 1000
    else:
        has_head = weights.imagenet_head(weights_source, model_name)
    if not has_head:
        raise ValueError(f"The weights {weights_source!r} of {model_name} have no 1000-class ImageNet head, "
                         "which the zero-shot baseline needs; pass --weights imagenet, timm or such a checkpoint.")
    if features is not None:
        kernel, bias = imagenet_classifier
        logits = np.asarray(features, np.float64)[kept] @ np.asarray(kernel, np.float64) + bias
    else:
        logits = _imagenet_logits(model_name, records, indices, weights_source, preprocessing, batch_size, verbose)
    probabilities = breed_probabilities(logits, class_names)
    return {"model": model_name, "weights": str(weights_source), "num_images": int(len(indices)),
            "num_classes": len(class_names), "breeds_left_out": left_out, "preprocessing": preprocessing.as_dict(),
            **metrics.scores(probabilities, labels)}


def _imagenet_logits(model_name, records, indices, weights_source, preprocessing, batch_size, verbose):
    """The 1000 ImageNet logits of each photo at `indices`: the weights' network built and run."""
    size = preprocessing.image_size
    if models.is_hub_name(model_name):  # the preset's own ImageNet head, not tfdogs' one
        model = hub.imagenet_classifier(models.preset_of(model_name))
    else:
        model = weights.pretrained_model(model_name, 1000, weights_source, input_shape=(size, size, 3))
    dataset = data.make_dataset([records.paths[i] for i in indices], records.labels[indices],
                                batch_size=batch_size, training=False, **preprocessing.as_dict())
    bar = progress.photos(len(indices), verbose)
    return model.predict(dataset.map(data.traced_as_written(lambda images, labels: images)), verbose=0,
                         callbacks=[progress.PredictCallback(bar, len(indices), batch_size)])
