"""Distillation (`tfdogs.distill`): the loss against NumPy, the targets, alpha's two ends, a real Lite0 student.

The NumPy reference: KL(p || q) = sum p (log p - log q) with p = softmax(log p_teacher / T),
q = softmax(z / T), and cross-entropy with (smoothed) one-hot labels on softmax(z).
"""

import json

import keras
import numpy as np
import pandas as pd
import pytest

from tfdogs import config as config_lib, data
from tfdogs.runs.distill import distill, load_teacher
from tfdogs.runs.folder import RunFolderError, load_run
from tfdogs.training import distillation, loop as training_loop

from conftest import small_config


def numpy_softmax(logits, temperature=1.0):
    scaled = np.asarray(logits, np.float64) / temperature
    exponentials = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def numpy_distillation_loss(labels, teacher_logits, student_logits, temperature, alpha, smoothing=0.0):
    classes = labels.shape[-1]
    targets = labels * (1 - smoothing) + smoothing / classes
    cross_entropy = -(targets * np.log(numpy_softmax(student_logits))).sum(-1)
    teacher = numpy_softmax(teacher_logits, temperature)
    divergence = (teacher * (np.log(teacher) - np.log(numpy_softmax(student_logits, temperature)))).sum(-1)
    return np.mean(alpha * temperature ** 2 * divergence + (1 - alpha) * cross_entropy)


@pytest.mark.parametrize("temperature, alpha, smoothing", [(2.0, 0.5, 0.0), (4.0, 0.9, 0.1), (1.0, 0.0, 0.0)])
def test_the_loss_equals_numpy_on_fixed_logits(temperature, alpha, smoothing):
    generator = np.random.default_rng(0)
    labels = np.eye(5)[generator.integers(0, 5, 8)]
    teacher_logits, student_logits = generator.normal(0, 3, (8, 5)), generator.normal(0, 3, (8, 5))
    targets = np.concatenate([labels, distillation.soften(teacher_logits, temperature)], axis=1)
    loss = distillation.DistillationLoss(temperature, alpha, smoothing)
    got = float(loss(targets.astype(np.float32), student_logits.astype(np.float32)))
    assert got == pytest.approx(numpy_distillation_loss(labels, teacher_logits, student_logits, temperature,
                                                        alpha, smoothing), rel=1e-5)
    # Validation batches carry the labels alone: plain cross-entropy
    plain = float(loss(labels.astype(np.float32), student_logits.astype(np.float32)))
    assert plain == pytest.approx(numpy_distillation_loss(labels, teacher_logits, student_logits, 1.0, 0.0,
                                                          smoothing), rel=1e-5)


def fit_small_model(targets, images):
    """A tiny network fitted one epoch on fixed images and 2 C-column targets with alpha 1."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(4)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=distillation.DistillationLoss(3.0, 1.0),
                  metrics=distillation.distillation_metrics())
    history = model.fit(images, targets, batch_size=8, epochs=2, shuffle=False, verbose=0)
    return model.get_weights(), history.history["loss"]


def test_with_alpha_1_the_labels_do_not_matter():
    generator = np.random.default_rng(1)
    images = generator.normal(size=(32, 8, 8, 3)).astype(np.float32)
    labels = generator.integers(0, 4, 32)
    teacher = distillation.soften(generator.normal(0, 2, (32, 4)), 3.0)
    weights, losses = fit_small_model(np.concatenate([np.eye(4)[labels], teacher], 1).astype(np.float32), images)
    shuffled_weights, shuffled_losses = fit_small_model(
        np.concatenate([np.eye(4)[generator.permutation(labels)], teacher], 1).astype(np.float32), images)
    assert losses == pytest.approx(shuffled_losses, abs=1e-6)
    for kept, other in zip(weights, shuffled_weights):
        np.testing.assert_allclose(kept, other, atol=1e-6)
    # and the teacher does matter: another teacher trains otherwise
    other_teacher, _ = fit_small_model(np.concatenate(
        [np.eye(4)[labels], distillation.soften(generator.normal(0, 2, (32, 4)), 3.0)], 1).astype(np.float32), images)
    assert not np.allclose(weights[0], other_teacher[0], atol=1e-4)


@pytest.fixture(scope="module")
def teacher_file(lenet_run, tmp_path_factory):
    """The LeNet run's teacher.npz, written as `distill` writes it."""
    teacher = load_teacher(lenet_run)
    path = tmp_path_factory.mktemp("teacher") / distillation.TEACHER_FILE
    distillation.write_teacher(path, [teacher.names[i] for i in teacher.train_indices],
                               teacher.log_probabilities(teacher.train_indices), teacher.runs[0].class_names)
    return path


def test_the_teacher_file_is_numpy_softmax_of_the_teachers_logits(lenet_run, teacher_file):
    run = load_run(lenet_run)
    records, train_indices, _ = run.split()
    dataset = data.make_dataset([records.paths[i] for i in train_indices], records.labels[train_indices],
                                training=False, batch_size=16, **run.preprocessing.as_dict())
    logits = np.concatenate([np.asarray(run.load_model()(images)) for images, _ in dataset])
    saved = np.load(teacher_file)
    split = pd.read_csv(lenet_run / "split.csv")
    assert saved["names"].tolist() == split["path"][train_indices].tolist()
    np.testing.assert_allclose(np.exp(saved["log_probabilities"]), numpy_softmax(logits), atol=1e-6)
    np.testing.assert_allclose(distillation.soften(saved["log_probabilities"], 4.0), numpy_softmax(logits, 4.0),
                               atol=1e-6)


def student(lenet_run, folder, **overrides):
    config = small_config(data=None, data_dir=str(lenet_run / "synthetic_data"), epochs=2, calibrate=False,
                          output=str(folder / "run"), export_dir=str(folder / "export"), **overrides)
    run_dir = training_loop.train(config)
    return pd.read_csv(run_dir / "history.csv"), keras.saving.load_model(run_dir / "model.keras").get_weights()


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_with_alpha_0_the_student_trains_exactly_as_a_labels_only_run(lenet_run, teacher_file, tmp_path, mixup):
    # With MixUp, the photo-indexed one-hot rows mix the targets exactly as the labels-only run mixes its labels.
    history, weights = student(lenet_run, tmp_path / "labels", mixup=mixup)
    distilled_history, distilled_weights = student(lenet_run, tmp_path / "alpha0", teacher=str(teacher_file),
                                                   distill_alpha=0.0, mixup=mixup)
    scores = ["loss", "accuracy", "top5_accuracy", "log_loss", "val_loss", "val_accuracy", "val_log_loss"]
    np.testing.assert_allclose(distilled_history[scores], history[scores], atol=1e-6)
    for kept, other in zip(weights, distilled_weights):
        np.testing.assert_allclose(other, kept, atol=1e-6)


def test_a_teacher_of_another_split_is_refused(lenet_run, teacher_file, tmp_path):
    with pytest.raises(Exception, match="Config key 'teacher'.*split"):
        student(lenet_run, tmp_path / "other", teacher=str(teacher_file), val_fraction=0.3)


def test_members_of_different_splits_are_refused(lenet_run, tmp_path):
    other = training_loop.train(small_config(output=str(tmp_path / "seed1"), export_dir=str(tmp_path / "export"),
                                             epochs=1, seed=1))
    (tmp_path / "ensemble").mkdir()
    (tmp_path / "ensemble" / "ensemble.json").write_text(json.dumps(
        {"members": [{"run": str(lenet_run), "weight": 0.5}, {"run": str(other), "weight": 0.5}]}))
    with pytest.raises(RunFolderError, match="different splits"):
        load_teacher(tmp_path / "ensemble")


@pytest.mark.slow
def test_a_lite0_student_of_a_lite0_teacher_on_dogs10(dogs10_dir, tmp_path):
    """A real Lite0 teacher (fine-tuned, 160 px) distilled into a Lite0 student, against the labels-only student."""
    common = dict(model="efficientnet_lite0", weights="imagenet", strategy="fine-tune", data=None,
                  data_dir=str(dogs10_dir), image_size=160, epochs=4, head_epochs=2, batch_size=32,
                  learning_rate=1e-3, early_stopping_patience=0, verbose=0)
    teacher_dir = training_loop.train(config_lib.validate({**config_lib.DEFAULTS, **common, "output": str(
        tmp_path / "teacher"), "export_dir": str(tmp_path / "teacher-export")}))
    overrides = {key: common[key] for key in ("model", "weights", "image_size", "epochs")}
    summary = distill(teacher_dir, tmp_path / "distill", overrides, temperature=2.0, alpha=0.5)
    print(json.dumps(summary, indent=1))
    assert json.loads((tmp_path / "distill" / "distill.json").read_text()) == summary
    teacher, student, labels_only = summary["teacher"]["val"], summary["student"]["val"], summary["labels_only"]["val"]
    assert summary["num_val"] == 41
    # Measured (AMD EPYC, 2 cores shared, seed 0): teacher 85.4 % / log loss 0.413, distilled student (T 2,
    # alpha 0.5) 68.3 % / 0.861, labels-only student 85.4 % / 0.413. The student did NOT beat the labels-only
    # student (17.1 points below), so that is not asserted; what holds is asserted, with room for other CPUs.
    assert student["accuracy"] >= 0.6 and student["log_loss"] < 1.0  # 10 breeds: chance is 0.1 / 2.303
    # The labels-only student has the teacher's own settings and seed: it is the same run, the same scores.
    assert labels_only == pytest.approx(teacher, abs=1e-6)
    assert summary["student"]["parameters"] == summary["labels_only"]["parameters"]
