"""A student trained on a teacher's (a run's or an ensemble's) softened probabilities, scored against it.

The command line and what it writes: `tfdogs.distill`.
"""

import dataclasses
import pathlib
import time

import numpy as np
import pandas as pd

from tfdogs import config as config_lib, data, files
from tfdogs.evaluation import metrics
from tfdogs.evaluation.predictions import predict_logits
from tfdogs.runs.folder import RunFolderError, load_model_folder, load_run, predict_paths
from tfdogs.training.distillation import TEACHER_FILE, write_teacher
from tfdogs.training.loop import train

DISTILL_FILE = "distill.json"


def logsumexp(values, axis, keepdims=False):
    """log sum exp of `values` along `axis`, shifted by the largest value so that nothing overflows."""
    largest = np.max(values, axis=axis, keepdims=True)
    total = largest + np.log(np.sum(np.exp(values - largest), axis=axis, keepdims=True))
    return total if keepdims else np.squeeze(total, axis=axis)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The teacher: its member runs and weights, and the first member's split (which every member shares)."""

    runs: list
    member_weights: list  # None: equal
    records: object
    train_indices: np.ndarray
    val_indices: np.ndarray
    names: list  # split.csv's row names

    def log_probabilities(self, indices, batch_size=32):
        """log of the teacher's probabilities of `records[indices]`, each member on its own evaluation crop.

        An ensemble's are log sum_m w_m softmax(z_m), computed from the members'
        logits (log-sum-exp), so a confident member's tiny probabilities keep their size.
        """
        member_weights = metrics.normalised_weights(self.member_weights, len(self.runs))
        terms = []
        for run, weight in zip(self.runs, member_weights):
            dataset = data.make_dataset([self.records.paths[i] for i in indices], np.zeros(len(indices), np.int64),
                                        training=False, batch_size=batch_size, **run.preprocessing.as_dict())
            logits = predict_logits(run.load_model(), dataset).astype(np.float64)
            terms.append(np.log(weight) + logits - logsumexp(logits, axis=1, keepdims=True))
        return logsumexp(np.stack(terms), axis=0)


def load_teacher(folder):
    """The teacher of a run or ensemble folder.

    Raises:
        RunFolderError: the members were trained on different splits (named): a
            student trains on one split, and every member must have held out its
            validation photos.
    """
    runs, member_weights = load_model_folder(folder)
    splits = [pd.read_csv(run.run_dir / "split.csv", dtype=str, keep_default_na=False) for run in runs]
    first = dict(zip(splits[0]["path"], splits[0]["subset"]))
    for run, split in zip(runs[1:], splits[1:]):
        if dict(zip(split["path"], split["subset"])) != first:
            raise RunFolderError(
                f"The teacher's members were trained on different splits ({runs[0].run_dir / 'split.csv'} and "
                f"{run.run_dir / 'split.csv'}): a student trains on one split, and each member must have held "
                f"out its validation photos. Distil an ensemble of runs with the same data, seed and val_fraction.")
    records, train_indices, val_indices = runs[0].split()
    return Teacher(runs, member_weights, records, train_indices, val_indices, splits[0]["path"].tolist())


def student_config(teacher, overrides, output, teacher_file=None):
    """The student's config: the first member's photos, seed and val_fraction (hence its split), `overrides`."""
    first = teacher.runs[0].config
    values = {**config_lib.DEFAULTS, **overrides, "data_dir": str(teacher.runs[0].data_dir()), "data": None,
              "seed": first["seed"], "val_fraction": first["val_fraction"], "output": str(output),
              "export_dir": str(pathlib.Path(output).parent / "saved_models" / pathlib.Path(output).name)}
    if teacher_file is not None:
        values["teacher"] = str(teacher_file)
    return config_lib.validate(values)


def images_per_second(model, images, batch_size=32, repeats=3):
    """Forward passes per second over preprocessed images, batch by batch, after a warm-up pass."""
    batches = [images[start:start + batch_size] for start in range(0, len(images), batch_size)]
    model.predict_on_batch(batches[0])
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            model.predict_on_batch(batch)
        best = min(best, time.perf_counter() - started)
    return len(images) / best


def scored(probabilities, labels):
    """Accuracy, top-5, log loss and expected calibration error of probabilities on labels."""
    return {**metrics.scores(probabilities, labels), "ece": metrics.reliability(probabilities, labels)[1]}


def student_facts(run_dir, teacher, labels):
    """A finished student run's scores on the teacher's validation photos, its size and its speed."""
    run = load_run(run_dir)
    model = run.load_model()
    paths = [teacher.records.paths[i] for i in teacher.val_indices]
    probabilities = predict_paths(model, paths, run.preprocessing)
    images = np.concatenate([batch for batch, _ in data.make_dataset(
        paths, labels, training=False, batch_size=32, **run.preprocessing.as_dict())])
    export = pathlib.Path(run.summary["export"])
    return {"run": str(run_dir), "val": scored(probabilities, labels),
            "parameters": int(model.count_params()), "input_size": run.preprocessing.image_size,
            "saved_model_bytes": sum(path.stat().st_size for path in export.rglob("*") if path.is_file()),
            "images_per_second": round(images_per_second(model, images), 1)}


def distill(teacher_dir, output, overrides, *, temperature=2.0, alpha=0.5, baseline=True):
    """Trains a student on the teacher's softened probabilities (and a labels-only student) and scores all three.

    Args:
        teacher_dir: a run folder or an ensemble folder.
        output: the distillation folder: teacher.npz, student/, labels-only/, distill.json.
        overrides: config keys of the students (model, weights, epochs, ...).
        temperature: T of `distillation.DistillationLoss`.
        alpha: the teacher term's weight.
        baseline: also train the same student on the labels alone.

    Returns:
        The summary written to `output/distill.json`.
    """
    output = pathlib.Path(output)
    teacher = load_teacher(teacher_dir)
    output.mkdir(parents=True, exist_ok=True)
    teacher_file = output / TEACHER_FILE
    write_teacher(teacher_file, [teacher.names[i] for i in teacher.train_indices],
                  teacher.log_probabilities(teacher.train_indices), teacher.runs[0].class_names)
    labels = teacher.records.labels[teacher.val_indices]
    summary = {"teacher": {"folder": str(teacher_dir), "members": [str(run.run_dir) for run in teacher.runs],
                           "val": scored(np.exp(teacher.log_probabilities(teacher.val_indices)), labels),
                           "parameters": int(sum(run.summary["parameters"]["total"] for run in teacher.runs))},
               "temperature": temperature, "alpha": alpha, "num_val": int(len(labels)),
               "targets": "the teacher's probabilities on each training photo's evaluation crop, once per photo"}
    distilled = {**overrides, "distill_temperature": temperature, "distill_alpha": alpha}
    student_dir = train(student_config(teacher, distilled, output / "student", teacher_file))
    summary["student"] = student_facts(student_dir, teacher, labels)
    if baseline:
        labels_dir = train(student_config(teacher, overrides, output / "labels-only"))
        summary["labels_only"] = student_facts(labels_dir, teacher, labels)
    files.write_json(summary, output / DISTILL_FILE)
    return summary
