"""The stratified, seeded train/validation split and its `split.csv`."""

import csv
import json
import os
import pathlib

import numpy as np

from tfdogs import files
from tfdogs.data.layouts import DataError, Records, outside_reason, preview


def stratified_split(labels, val_fraction=0.2, seed=0, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """Splits image indices into training and validation, class by class.

    Each class with n >= 2 images puts round(n * val_fraction), clipped to
    [1, n - 1], randomly chosen images in validation; a single-image class goes
    to training.

    With `groups`, the images of a group (byte-identical copies of one photo,
    see `tfdogs.check`) always land on the same side, so a photo is never
    validated on after being trained on. A group counts toward the class most
    of its images have (the smallest label on a tie: copies labelled with
    different breeds are a labelling conflict), and each class's groups, in
    shuffled order, fill its validation share; a group larger than what is
    left of the share goes to training. With every image in a group of its
    own, the split is exactly the one without `groups`.

    Args:
        labels: Class label per image (any sortable values).
        val_fraction: Validation share of every class, in (0, 1).
        seed: Seed of the per-class shuffles; same seed, same split.
        groups: Optional group id per image (any sortable values); images
            with the same id go to the same subset. None: one group per image.

    Returns:
        Sorted int64 index arrays (train_indices, val_indices), disjoint and
        together covering every image.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1); got {val_fraction}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise DataError(f"labels must be a non-empty 1-D array; got shape {labels.shape}")
    if groups is None:
        groups = np.arange(labels.size)
    groups = np.asarray(groups)
    if groups.shape != labels.shape:
        raise DataError(f"groups must hold one id per image: {labels.size} labels but groups of shape "
                        f"{groups.shape}")
    members = _group_members(groups)
    # Groups in order of their first image: with single-image groups, the shuffles below draw
    # exactly the permutations of the ungrouped split.
    members.sort(key=lambda indices: indices[0])
    group_labels = np.array([_majority(labels[indices]) for indices in members])
    sizes = np.array([len(indices) for indices in members])
    rng = np.random.default_rng(seed)
    val_groups = []
    for label in np.unique(group_labels):
        class_groups = np.flatnonzero(group_labels == label)
        count = int(sizes[class_groups].sum())
        val_count = 0 if count < 2 else min(max(round(count * val_fraction), 1), count - 1)
        filled = 0
        for group in rng.permutation(class_groups):
            if filled + sizes[group] <= val_count:
                val_groups.append(group)
                filled += sizes[group]
    in_val = np.zeros(labels.size, dtype=bool)
    for group in val_groups:
        in_val[members[group]] = True
    return np.flatnonzero(~in_val).astype(np.int64), np.flatnonzero(in_val).astype(np.int64)


def stratified_folds(labels, folds, seed=0, groups=None) -> np.ndarray:
    """Assigns every image to one of `folds` folds, class by class: K-fold cross-validation's partition.

    Within each class, groups (byte-identical copies, as in `stratified_split`;
    a group counts toward its majority class) go in shuffled order, the
    largest first, each to the fold holding the fewest images of that class,
    then the fewest images overall, then the lowest number. With single-image
    groups every class's counts differ by at most one between folds, and so
    do the folds' sizes.

    Args:
        labels: Class label per image (any sortable values).
        folds: Number of folds, 2 or more.
        seed: Seed of the per-class shuffles; same seed, same partition.
        groups: Optional group id per image; one group never spans two folds.

    Returns:
        int64 array, the 0-based fold of each image.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise DataError(f"labels must be a non-empty 1-D array; got shape {labels.shape}")
    if not 2 <= folds <= labels.size:
        raise DataError(f"folds must be between 2 and the {labels.size} images; got {folds}")
    groups = np.arange(labels.size) if groups is None else np.asarray(groups)
    if groups.shape != labels.shape:
        raise DataError(f"groups must hold one id per image: {labels.size} labels but groups of shape "
                        f"{groups.shape}")
    members = _group_members(groups)
    members.sort(key=lambda indices: indices[0])
    group_labels = np.array([_majority(labels[indices]) for indices in members])
    sizes = np.array([len(indices) for indices in members])
    rng = np.random.default_rng(seed)
    fold_of = np.zeros(labels.size, np.int64)
    totals = np.zeros(folds, np.int64)
    for label in np.unique(group_labels):
        shuffled = rng.permutation(np.flatnonzero(group_labels == label))
        class_counts = np.zeros(folds, np.int64)
        for group in shuffled[np.argsort(-sizes[shuffled], kind="stable")]:
            fold = np.lexsort((np.arange(folds), totals, class_counts))[0]
            fold_of[members[group]] = fold
            class_counts[fold] += sizes[group]
            totals[fold] += sizes[group]
    return fold_of


def _group_members(groups):
    """Sorted image indices of each distinct group id."""
    _, group_of = np.unique(groups, return_inverse=True)
    order = np.argsort(group_of.ravel(), kind="stable")
    return np.split(order, np.cumsum(np.bincount(group_of.ravel()))[:-1])


def _majority(labels):
    """The most common label, the smallest one on a tie."""
    values, counts = np.unique(labels, return_counts=True)
    return values[np.argmax(counts)]


# sha256: the photo's bytes, so that a resumed run and an evaluation know the photos by content.
_SPLIT_COLUMNS = ["path", "label", "breed", "subset", "sha256"]
_SPLIT_COLUMNS_BEFORE_DIGESTS = _SPLIT_COLUMNS[:4]  # split.csv of runs before the column: still read


def write_split(path, records, train_indices, val_indices, digests) -> None:
    """Writes a split as CSV: path (relative to records.root), label, breed, subset, sha256.

    Rows follow `records` order; only images in one of the two subsets are
    written, so `read_split` gives back the same records when the subsets cover
    all of them (as `stratified_split`'s do).

    Args:
        path: CSV file to write; parent directories are created.
        records: The records the indices point into.
        train_indices: Indices of training images.
        val_indices: Indices of validation images.
        digests: Per record, the SHA-256 of its file in hex (`Report.digests`).
    """
    subset_of = {int(i): "train" for i in train_indices}
    overlap = sorted(subset_of.keys() & {int(i) for i in val_indices})
    if overlap:
        raise DataError(f"write_split: indices {preview(overlap)} are in both train and val")
    subset_of.update({int(i): "val" for i in val_indices})
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed: a resumed run must never read half a split.
    rows = []
    for index in sorted(subset_of):
        relative = pathlib.Path(os.path.relpath(records.paths[index], records.root)).as_posix()
        label = int(records.labels[index])
        rows.append([relative, label, records.class_names[label], subset_of[index], digests[index]])
    files.write_csv(path, _SPLIT_COLUMNS, rows)


def read_split(path, root) -> tuple[Records, np.ndarray, np.ndarray]:
    """Reads a split written by `write_split`.

    Args:
        path: The split CSV.
        root: Data directory the CSV paths are relative to; its layout is
            "kaggle" when it holds labels.csv, else "folders".

    Returns:
        (records, train_indices, val_indices), indices into records.paths.

    Raises:
        DataError: The CSV is missing or malformed, a listed image is missing,
            or a path leads out of `root` (such a file is never read).
    """
    path = pathlib.Path(path)
    root = pathlib.Path(root).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"split file {path} does not exist")
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames not in (_SPLIT_COLUMNS, _SPLIT_COLUMNS_BEFORE_DIGESTS):
            raise DataError(f"{path}: header is {reader.fieldnames}; expected {','.join(_SPLIT_COLUMNS)}")
        rows = list(reader)
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    breed_of_label = {}
    for line_number, row in enumerate(rows, start=2):
        where = f"{path}, line {line_number}"
        if None in row or None in row.values() or not row["path"]:
            raise DataError(
                f"{where}: found {list(row.values())}; expected {len(reader.fieldnames)} fields "
                f"{','.join(reader.fieldnames)}")
        if not row["label"].isdigit():
            raise DataError(f"{where}: label {row['label']!r} is not a non-negative integer")
        if row["subset"] not in ("train", "val"):
            raise DataError(f"{where}: subset {row['subset']!r}; expected 'train' or 'val'")
        label = int(row["label"])
        if breed_of_label.setdefault(label, row["breed"]) != row["breed"]:
            raise DataError(
                f"{where}: label {label} is {row['breed']!r} here but {breed_of_label[label]!r} earlier")
    absent = sorted(set(range(len(breed_of_label))) - breed_of_label.keys())
    if absent or len(set(breed_of_label.values())) != len(breed_of_label):
        raise DataError(
            f"{path}: labels must number breeds 0..K-1 one-to-one; found {sorted(breed_of_label.items())}")
    paths = [str(root / row["path"]) for row in rows]
    escaping = [p for p in paths if outside_reason(p, root)]
    if escaping:
        raise DataError(f"{path} lists files outside the data directory {root}; refused: {preview(escaping)}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(paths)} images listed in {path} are missing: {preview(missing)}")
    layout = "kaggle" if (root / "labels.csv").is_file() else "folders"
    class_names = [breed_of_label[label] for label in range(len(breed_of_label))]
    records = Records(paths, [int(row["label"]) for row in rows], class_names, layout, str(root))
    subsets = np.array([row["subset"] for row in rows])
    return records, np.flatnonzero(subsets == "train"), np.flatnonzero(subsets == "val")


def split_digests(path):
    """The photos of a `split.csv` by content: {relative path: (subset, SHA-256 hex, or None before the column)}."""
    with open(path, newline="", encoding="utf-8") as file:
        return {row["path"]: (row["subset"], row.get("sha256") or None) for row in csv.DictReader(file)}


DATA_SOURCE_FILE = "data_source.json"


def write_data_source(run_dir, data_dir):
    """Records where a run's photos are: absolute, and relative to the run folder (`data_source.json`)."""
    run_dir, data_dir = pathlib.Path(run_dir).resolve(), pathlib.Path(data_dir).resolve()
    files.write_json({"absolute": str(data_dir), "relative_to_run": os.path.relpath(data_dir, run_dir)},
                     run_dir / DATA_SOURCE_FILE)


def read_data_source(run_dir):
    """`write_data_source`'s record of a run folder, or {} for a run without one."""
    path = pathlib.Path(run_dir) / DATA_SOURCE_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as error:
        raise DataError(f"{path} is not valid JSON: {error}") from None
