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


def softmax(logits, temperature=1.0):
    """Row-wise softmax of logits / temperature, float64."""
    scaled = np.asarray(logits, np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exponentials = np.exp(scaled)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def fit_temperature(logits, labels, bounds=(0.05, 20.0)):
    """The temperature T that minimises the log loss of softmax(logits / T) (Guo et al. 2017).

    One scalar for all classes: it changes how confident the probabilities
    are, never which class is most probable, so accuracy stays as it is. The
    log loss is convex in 1/T, so a golden-section search over log T finds the
    minimum to about 1e-6 relative.

    Args:
        logits: [N, C] raw scores.
        labels: [N] integer class indices.
        bounds: the range searched.

    Returns:
        The fitted temperature, a float.
    """
    labels = np.asarray(labels)

    def loss(log_temperature):
        return log_loss(softmax(logits, np.exp(log_temperature)), labels)

    low, high = np.log(bounds[0]), np.log(bounds[1])
    ratio = (np.sqrt(5) - 1) / 2
    inner_low, inner_high = high - ratio * (high - low), low + ratio * (high - low)
    loss_low, loss_high = loss(inner_low), loss(inner_high)
    while high - low > 1e-7:
        if loss_low < loss_high:
            high, inner_high, loss_high = inner_high, inner_low, loss_low
            inner_low = high - ratio * (high - low)
            loss_low = loss(inner_low)
        else:
            low, inner_low, loss_low = inner_low, inner_high, loss_high
            inner_high = low + ratio * (high - low)
            loss_high = loss(inner_high)
    return float(np.exp((low + high) / 2))


def reliability(probabilities, labels, bins=15):
    """Per confidence bin: mean confidence, accuracy and share of images; and the expected calibration error.

    Confidence is the top probability; bins split [0, 1] evenly. ECE is the
    image-weighted mean gap between accuracy and confidence (Naeini et al.
    2015; Guo et al. 2017 use 15 bins).

    Returns:
        (dict with `confidence`, `accuracy`, `share` arrays of length `bins`
        (NaN for empty bins), ece).
    """
    probabilities = np.asarray(probabilities)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    table = {"confidence": np.full(bins, np.nan), "accuracy": np.full(bins, np.nan), "share": np.zeros(bins)}
    ece = 0.0
    for index in range(bins):
        members = which == index
        if members.any():
            table["confidence"][index] = confidence[members].mean()
            table["accuracy"][index] = correct[members].mean()
            table["share"][index] = members.mean()
            ece += members.mean() * abs(table["accuracy"][index] - table["confidence"][index])
    return table, float(ece)


def calibrated_scores(logits, labels, temperature):
    """`scores` of softmax(logits / temperature), with the temperature and the expected calibration error."""
    probabilities = softmax(logits, temperature)
    return {"temperature": float(temperature), **scores(probabilities, labels),
            "ece": reliability(probabilities, labels)[1]}


def normalised_weights(member_weights, count):
    """Ensemble member weights scaled to sum to 1 (equal when None); ValueError for negative or mismatched ones."""
    if member_weights is None:
        return [1.0 / count] * count
    if len(member_weights) != count:
        raise ValueError(f"{len(member_weights)} member weights given for {count} members.")
    if any(weight < 0 for weight in member_weights) or sum(member_weights) <= 0:
        raise ValueError(f"Member weights must be >= 0 with a positive sum; got {list(member_weights)}.")
    total = float(sum(member_weights))
    return [float(weight) / total for weight in member_weights]


def weighted_mean(probabilities, member_weights=None):
    """An ensemble's probabilities: the members' [N, C] probabilities averaged with `normalised_weights`.

    Works on NumPy arrays and on TensorFlow tensors alike (the serving graph uses it too).
    """
    member_weights = normalised_weights(member_weights, len(probabilities))
    return sum(weight * member for weight, member in zip(member_weights, probabilities))
