"""Scores and trivial baselines, computed from predicted probabilities.

Every tool (training, evaluation, ensembling, comparison) scores predictions
through these functions, so their numbers agree to the last digit. Log loss is
Kaggle's multi-class log loss: probabilities clipped to [1e-15, 1 - 1e-15] and
renormalised per row, averaged over images.
"""

import numpy as np

KAGGLE_EPSILON = 1e-15


def log_loss(probabilities, labels):
    """Kaggle's multi-class log loss of `probabilities` [N, C] against integer `labels` [N]."""
    probabilities = np.clip(np.asarray(probabilities, np.float64), KAGGLE_EPSILON, 1 - KAGGLE_EPSILON)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    labels = np.asarray(labels)
    return float(-np.mean(np.log(probabilities[np.arange(len(labels)), labels])))


def top_k_accuracy(probabilities, labels, k):
    """Fraction of images whose label is among the k most probable classes."""
    probabilities = np.asarray(probabilities)
    k = min(k, probabilities.shape[1])
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


def scores(probabilities, labels):
    """Accuracy, top-5 accuracy and log loss of one set of predictions.

    Args:
        probabilities: [N, C] class probabilities (rows sum to 1).
        labels: [N] integer class indices.

    Returns:
        Dict with `accuracy`, `top5_accuracy` and `log_loss`.
    """
    return {
        "accuracy": top_k_accuracy(probabilities, labels, 1),
        "top5_accuracy": top_k_accuracy(probabilities, labels, 5),
        "log_loss": log_loss(probabilities, labels),
    }


def baselines(train_labels, val_labels, num_classes, class_names=None):
    """The study's trivial baselines on an actual split.

    Args:
        train_labels: integer labels of the training subset.
        val_labels: integer labels of the validation subset.
        num_classes: number of classes.
        class_names: optional names, to name the most frequent breed.

    Returns:
        Dict with `random_guess` (uniform probabilities: accuracy 1/C, log loss
        ln C), `most_frequent` (always the most frequent training breed) and
        `class_prior` (the training class frequencies as probabilities, the
        best log loss a model ignoring the image can reach).
    """
    train_labels = np.asarray(train_labels)
    val_labels = np.asarray(val_labels)
    counts = np.bincount(train_labels, minlength=num_classes)
    most_frequent = int(np.argmax(counts))
    prior = np.tile(counts / counts.sum(), (len(val_labels), 1))
    return {
        "random_guess": {"accuracy": 1.0 / num_classes, "log_loss": float(np.log(num_classes))},
        "most_frequent": {
            "breed": class_names[most_frequent] if class_names is not None else most_frequent,
            "accuracy": float(np.mean(val_labels == most_frequent)),
        },
        "class_prior": {"log_loss": log_loss(prior, val_labels)},
    }
