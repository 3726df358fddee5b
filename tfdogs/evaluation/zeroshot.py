"""The untrained ImageNet classifier restricted to the data set's breeds: the baseline any fine-tuned number must beat.

The command line: `tfdogs.zeroshot`.
"""


import tensorflow as tf

from tfdogs import data, models, progress, weights
from tfdogs.models import hub
from tfdogs.data import breeds
from tfdogs.evaluation import metrics


def breed_columns(class_names):
    """ImageNet class index of each breed, in class order; ValueError naming those with none."""
    columns, unknown = [], []
    for name in class_names:
        try:
            columns.append(breeds.imagenet_index(name))
        except KeyError:
            unknown.append(name)
    if unknown:
        raise ValueError(f"No ImageNet class for the breed(s) {', '.join(unknown)}; the zero-shot baseline "
                         "needs breed names of the 120 Kaggle breeds (e.g. 'golden_retriever').")
    return columns


def breed_probabilities(imagenet_logits, class_names):
    """Softmax over the logits of the data set's breeds only, [N, len(class_names)]."""
    logits = tf.gather(tf.cast(imagenet_logits, tf.float32), breed_columns(class_names), axis=1)
    return tf.nn.softmax(logits, axis=-1).numpy()


def evaluate_zero_shot(model_name, records, indices, *, weights_source, preprocessing, batch_size=32, verbose=1):
    """Scores the ImageNet classifier restricted to the data set's breeds.

    Args:
        model_name: "resnet18", "resnet34" or "keras_hub:PRESET" (an ImageClassifier preset).
        records: the labelled photos (`data.Records`).
        indices: which of them to score.
        weights_source: "imagenet", "timm" or a checkpoint path with a 1000-class head ("preset" for keras-hub).
        preprocessing: the `Preprocessing` of those weights (a run's `RUN/preprocessing.json`,
            or `weights.resolve_preprocessing`); its `image_size` is the input size.
        batch_size: images per inference batch.
        verbose: 0 hides the progress bar (shown on a terminal for a few hundred photos or more).

    Returns:
        Dict with accuracy, top5_accuracy, log_loss and what was measured.

    Raises:
        ValueError: a breed without an ImageNet class, or weights without a 1000-class head.
    """
    breed_columns(records.class_names)  # fail before loading any weights
    if not weights.imagenet_head(weights_source, model_name):
        raise ValueError(f"The weights {weights_source!r} of {model_name} have no 1000-class ImageNet head, "
                         "which the zero-shot baseline needs; pass --weights imagenet, timm or such a checkpoint.")
    size = preprocessing.image_size
    if models.is_hub_name(model_name):  # the preset's own ImageNet head, not tfdogs' one
        model = hub.imagenet_classifier(models.preset_of(model_name))
    else:
        model = weights.pretrained_model(model_name, 1000, weights_source, input_shape=(size, size, 3))
    dataset = data.make_dataset([records.paths[i] for i in indices], records.labels[indices],
                                batch_size=batch_size, training=False, **preprocessing.as_dict())
    bar = progress.photos(len(indices), verbose)
    logits = model.predict(dataset.map(data.traced_as_written(lambda images, labels: images)), verbose=0,
                           callbacks=[progress.PredictCallback(bar, len(indices), batch_size)])
    probabilities = breed_probabilities(logits, records.class_names)
    return {"model": model_name, "weights": str(weights_source), "num_images": int(len(indices)),
            "num_classes": len(records.class_names), "preprocessing": preprocessing.as_dict(),
            **metrics.scores(probabilities, records.labels[indices])}
