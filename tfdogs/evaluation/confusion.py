"""Which breeds a model mistakes for which: the confusion counts, per-breed accuracy, the most confused pairs."""


import numpy as np
import pandas as pd


def confusion_matrix(probabilities, labels, num_classes):
    """counts[true, predicted] of the most probable class."""
    predicted = np.argmax(probabilities, axis=1)
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (np.asarray(labels), predicted), 1)
    return counts


def per_breed_accuracy(counts, class_names):
    """Accuracy per breed from a confusion matrix, worst first.

    Returns:
        DataFrame: breed, images, correct, accuracy (NaN without images) and
        `most_predicted_instead`, the most frequent wrong answer ('' if none).
    """
    wrong = counts.copy()
    np.fill_diagonal(wrong, 0)
    images = counts.sum(axis=1)
    correct = np.diag(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(images > 0, correct / np.maximum(images, 1), np.nan)
    instead = [class_names[int(np.argmax(row))] if row.any() else "" for row in wrong]
    table = pd.DataFrame({"breed": class_names, "images": images, "correct": correct, "accuracy": accuracy,
                          "most_predicted_instead": instead})
    return table.sort_values(["accuracy", "breed"], na_position="last", kind="stable").reset_index(drop=True)


def most_confused_pairs(counts, class_names, top=10):
    """The breed pairs mistaken for each other most often, in either direction.

    Returns:
        DataFrame: breed_a, breed_b, a_as_b, b_as_a, total (a < b by index),
        most confusions first, pairs never confused left out.
    """
    rows = []
    for a in range(len(class_names)):
        for b in range(a + 1, len(class_names)):
            total = counts[a, b] + counts[b, a]
            if total:
                rows.append((class_names[a], class_names[b], int(counts[a, b]), int(counts[b, a]), int(total)))
    table = pd.DataFrame(rows, columns=["breed_a", "breed_b", "a_as_b", "b_as_a", "total"])
    return table.sort_values(["total", "breed_a", "breed_b"], ascending=[False, True, True],
                             kind="stable").head(top).reset_index(drop=True)
