"""A Kaggle submission: the sample's ids and breed columns, one probability row per test photo."""

import csv
import pathlib

import numpy as np
import pandas as pd

from tfdogs import files, lock
from tfdogs.runs.predictor import load_predictor, predict_files

SAMPLE_FILE = "sample_submission.csv"


class SubmissionError(ValueError):
    """The data folder or the model does not fit a Kaggle submission; the message names the file."""


def read_sample_submission(data_dir):
    """Test ids and breed columns of a Kaggle download, checking the test images are there.

    Returns:
        (ids, breed columns in file order, test image paths in id order).

    Raises:
        SubmissionError: `sample_submission.csv` or `test/` is missing or
            malformed, or test images are missing; the message names them.
    """
    data_dir = pathlib.Path(data_dir)
    sample = data_dir / SAMPLE_FILE
    test_dir = data_dir / "test"
    if not data_dir.is_dir():
        raise SubmissionError(f"Data folder {data_dir} does not exist.")
    if not sample.is_file():
        raise SubmissionError(f"{sample} is missing: the Kaggle download has sample_submission.csv beside test/; "
                              "it gives the test ids and the column order.")
    if not test_dir.is_dir():
        raise SubmissionError(f"{test_dir} is missing: expected the Kaggle test images as test/<id>.jpg.")
    with open(sample, newline="") as file:
        rows = [row for row in csv.reader(file) if row]
    if not rows or rows[0][:1] != ["id"] or len(rows[0]) < 3:
        found = rows[0][:4] if rows else "nothing"
        raise SubmissionError(f"{sample}: expected a header 'id,<breed>,<breed>,...'; found {found}.")
    header = rows[0]
    ids = [row[0] for row in rows[1:]]
    if not ids:
        raise SubmissionError(f"{sample} lists no test ids.")
    paths = [test_dir / f"{image_id}.jpg" for image_id in ids]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise SubmissionError(f"{len(missing)} of the {len(ids)} test images listed in {sample} are missing from "
                              f"{test_dir}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return ids, header[1:], paths


def submission_table(ids, breed_columns, probabilities, class_names, source="the model"):
    """Probabilities rearranged into Kaggle's columns, rows renormalised to sum to 1.

    Args:
        ids: test ids, one per row of `probabilities`.
        breed_columns: breed names in `sample_submission.csv` order.
        probabilities: [N, C] in `class_names` order.
        class_names: the model's breed names.
        source: how to name the columns' origin in an error.

    Returns:
        DataFrame with `id` then one column per breed.
    """
    if sorted(breed_columns) != sorted(class_names):
        only_sample = sorted(set(breed_columns) - set(class_names))
        only_model = sorted(set(class_names) - set(breed_columns))
        raise SubmissionError(
            f"The breeds of {SAMPLE_FILE} ({len(breed_columns)}) and of {source} ({len(class_names)}) differ: "
            f"only in {SAMPLE_FILE}: {only_sample[:10]}; only in the model: {only_model[:10]}.")
    order = [class_names.index(breed) for breed in breed_columns]
    columns = np.asarray(probabilities, np.float64)[:, order]
    columns /= columns.sum(axis=1, keepdims=True)  # float32 sums drift by ~1e-7; Kaggle wants 1
    table = pd.DataFrame(columns, columns=breed_columns)
    table.insert(0, "id", ids)
    return table


def write_submission(model, data_dir, output, *, batch_size=32, verbose=1, tta=None):
    """Predicts every test image of a Kaggle download and writes the submission CSV.

    Args:
        model: run folder, ensemble folder or SavedModel folder.
        data_dir: the Kaggle "dog-breed-identification" folder (`test/`, `sample_submission.csv`).
        output: CSV path to write.
        batch_size: images per forward pass.
        verbose: 0 hides the progress bar shown on a terminal.
        tta: test-time augmentation views per photo, 1, 2 or 10, as `load_predictor` takes.

    Returns:
        The submission as a DataFrame; its `attrs` hold the model's "not a dog" facts (``dog_check``) and,
        when it has the check, each test image's answer (``not_a_dog``), which is also written to
        `not_a_dog_path(output)`.

    Raises:
        SubmissionError: the download does not fit, or test images cannot be
            read (every one is named, after all the others were predicted).
        tfdogs.lock.LockedError: another process is writing `output`.
    """
    output = pathlib.Path(output)
    with lock.hold(output.with_name(f".{output.name}.lock"), str(output)):  # one writer: a second is refused
        return _predict_and_write(model, data_dir, output, batch_size, verbose, tta)


def _predict_and_write(model, data_dir, output, batch_size, verbose, tta):
    ids, breed_columns, paths = read_sample_submission(data_dir)
    predictor = load_predictor(model, tta=tta)
    outputs = predict_files(predictor, paths, batch_size=batch_size, verbose=verbose)
    failed = [f"{path.name} ({error})" for path, error in zip(paths, outputs["errors"]) if error]
    if failed:
        raise SubmissionError(f"{len(failed)} of the {len(paths)} test images cannot be read, and Kaggle needs a "
                              f"row for each: {'; '.join(failed[:10])}{' ...' if len(failed) > 10 else ''}")
    table = submission_table(ids, breed_columns, outputs["probabilities"], predictor.class_names,
                             predictor.description)
    files.replace_into(output, lambda temporary: table.to_csv(temporary, index=False, float_format="%.9g"))
    if "dog_score" in outputs:  # beside the submission, whose columns Kaggle fixes
        checks = pd.DataFrame({"id": ids, "dog_score": outputs["dog_score"], "not_a_dog": outputs["not_a_dog"]})
        files.replace_into(not_a_dog_path(output), lambda temporary: checks.to_csv(
            temporary, index=False, float_format="%.6g"))
        table.attrs["not_a_dog"] = outputs["not_a_dog"]
    table.attrs["dog_check"] = predictor.dog_check
    return table


def not_a_dog_path(output):
    """Where `write_submission` writes each test image's "not a dog" answer: OUTPUT's stem + `.not_a_dog.csv`."""
    output = pathlib.Path(output)
    return output.with_name(f"{output.stem}.not_a_dog.csv")
