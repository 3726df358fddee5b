"""Knowledge distillation (Hinton, Vinyals and Dean 2015, https://arxiv.org/abs/1503.02531): the loss and the targets.

A run with config ``teacher`` (a `TEACHER_FILE` that `tfdogs.distill` writes)
trains on targets of 2 C columns: the (possibly mixed) one-hot labels, then the
teacher's probabilities softened at temperature T. `DistillationLoss` reads
both halves; validation batches keep their C label columns and are scored by
plain cross-entropy, so a distilled run's history is comparable with any other.

Keras 3.15 has no public distillation API (only `keras.src.distillation`, a
private module), so the loss is a small `keras.losses.Loss` of its own.
"""

import pathlib

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from tfdogs import config as config_lib
from tfdogs.data.decode import traced_as_written

TEACHER_FILE = "teacher.npz"


def soften(log_probabilities, temperature):
    """softmax(log p / T) of each row: the teacher's probabilities at temperature T (float64).

    For a single network log p is its logits up to a constant, so this is
    softmax(logits / T); for an ensemble it softens the averaged probabilities.
    """
    scaled = np.asarray(log_probabilities, np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    exponentials = np.exp(scaled)
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def write_teacher(path, names, log_probabilities, class_names):
    """Writes the log of the teacher's probabilities of each training photo (rows named as in split.csv)."""
    np.savez(path, names=np.asarray(names, str), log_probabilities=log_probabilities,
             class_names=np.asarray(class_names, str))


def targets_table(teacher_path, run_dir, train_indices, labels, class_names, temperature):
    """float32 [training photos, 2 C]: each training photo's one-hot label, then the teacher's softened row.

    The photos are named as in the run's split.csv; the teacher must hold
    exactly the run's training photos (the same split) and the same breeds.

    Raises:
        ConfigError: naming the key, what differs and how many photos.
    """
    with np.load(teacher_path) as saved:
        names, log_probabilities = saved["names"].tolist(), saved["log_probabilities"]
        teacher_classes = saved["class_names"].tolist()
    if teacher_classes != list(class_names):
        raise config_lib.ConfigError(f"Config key 'teacher': {teacher_path} predicts other breeds (or another "
                                     f"order) than this run's {len(class_names)}: {teacher_classes[:5]} ...")
    relative = pd.read_csv(pathlib.Path(run_dir) / "split.csv", dtype=str, keep_default_na=False)["path"].tolist()
    wanted = [relative[i] for i in train_indices]
    row_of = {name: row for row, name in enumerate(names)}
    if set(wanted) != set(names):
        missing, extra = sorted(set(wanted) - set(names)), sorted(set(names) - set(wanted))
        raise config_lib.ConfigError(
            f"Config key 'teacher': {teacher_path} holds the teacher's training photos, and this run's differ "
            f"({len(missing)} of its training photos missing there, e.g. {missing[:3]}; {len(extra)} others there, "
            f"e.g. {extra[:3]}). Distil on the teacher's split: the same data, seed and val_fraction.")
    teacher = soften(log_probabilities[[row_of[name] for name in wanted]], temperature)
    one_hot = np.eye(len(class_names))[np.asarray(labels)[train_indices]]
    return np.concatenate([one_hot, teacher], axis=1).astype(np.float32)


def with_targets(dataset, table):
    """Training batches whose labels are one-hot rows over the training photos, as rows of `table`.

    A photo-indexed one-hot row picks the photo's targets exactly; a row that
    MixUp or CutMix mixed gives the same mix of the two photos' targets.
    """
    table = tf.constant(table)
    return dataset.map(traced_as_written(lambda images, photos: (images, tf.matmul(photos, table))))


class DistillationLoss(keras.losses.Loss):
    """alpha * T^2 * KL(teacher_T || softmax(logits / T)) + (1 - alpha) * CE(labels, softmax(logits)), per image.

    Targets of 2 C columns are (labels, teacher's softened probabilities); of C
    columns (validation), labels alone, scored by cross-entropy. T^2 keeps the
    teacher term's gradients on the scale of the labels' as T changes (Hinton et al.).
    """

    def __init__(self, temperature, alpha, label_smoothing=0.0, name="distillation", **kwargs):
        super().__init__(name=name, **kwargs)
        self.temperature, self.alpha, self.label_smoothing = float(temperature), float(alpha), float(label_smoothing)

    def call(self, y_true, y_pred):
        logits = keras.ops.cast(y_pred, "float32")
        classes = logits.shape[-1]
        labels = y_true[..., :classes]
        cross_entropy = keras.losses.categorical_crossentropy(labels, logits, from_logits=True,
                                                              label_smoothing=self.label_smoothing)
        if y_true.shape[-1] != 2 * classes:
            return cross_entropy
        teacher = y_true[..., classes:]
        student_log = keras.ops.log_softmax(logits / self.temperature, axis=-1)
        teacher_log = keras.ops.log(keras.ops.maximum(teacher, 1e-12))
        divergence = keras.ops.sum(teacher * (teacher_log - student_log), axis=-1)
        return self.alpha * self.temperature ** 2 * divergence + (1 - self.alpha) * cross_entropy

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature, "alpha": self.alpha,
                "label_smoothing": self.label_smoothing}


def _labels_part(function):
    """A metric function of (labels, logits) that reads only the labels' half of distillation targets."""
    def on_labels(y_true, y_pred, **kwargs):
        return function(y_true[..., :y_pred.shape[-1]], y_pred, **kwargs)
    return on_labels


def distillation_metrics():
    """A run's metrics (accuracy, top-5, log loss) on the labels' half of the targets."""
    return [keras.metrics.MeanMetricWrapper(_labels_part(keras.metrics.categorical_accuracy), name="accuracy"),
            keras.metrics.MeanMetricWrapper(_labels_part(keras.metrics.top_k_categorical_accuracy),
                                            name="top5_accuracy", k=5),
            keras.metrics.MeanMetricWrapper(_labels_part(keras.losses.categorical_crossentropy), name="log_loss",
                                            from_logits=True)]
