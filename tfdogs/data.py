"""Dog-breed data: on-disk layouts, synthetic data, splits and the tf.data pipeline.

`find_records` understands two layouts:

* Kaggle "dog-breed-identification": `labels.csv` (header `id,breed`) beside
  `train/<id>.jpg`.
* Class folders (ImageFolder style): `<root>/<breed>/*.jpg`, also one level
  down, as in Stanford Dogs' `Images/n02085620-Chihuahua/*.jpg`. Photos in
  sub-folders of a breed folder (`beagle/2019/*.jpg`) belong to that breed.

Typical use:

    records = find_records("data/dog-breed-identification")
    train_indices, val_indices = stratified_split(records.labels, val_fraction=0.2)
    train_dataset = make_dataset(
        [records.paths[i] for i in train_indices], records.labels[train_indices],
        image_size=224, batch_size=64, training=True,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
"""

import colorsys
import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
import pathlib
import re
import socket

import numpy as np
import tensorflow as tf
from PIL import Image

from tfdogs import augment, progress
from tfdogs.breeds import KAGGLE_BREEDS
from tfdogs.preprocessing import resize_size

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})

LAYOUTS_HELP = (
    "Expected either the Kaggle layout (labels.csv with header 'id,breed' beside "
    "train/<id>.jpg) or class folders (<dir>/<breed>/*.jpg, or one level down as in "
    "Stanford Dogs' Images/n02085620-Chihuahua/*.jpg)."
)

# Host of the tfds stanford_dogs download URLs (http://vision.stanford.edu/aditya86/ImageNetDogs/*.tar).
STANFORD_DOGS_HOST = ("vision.stanford.edu", 80)
_EXPORT_MARKER = ".tfdogs_export_complete"

# Real Kaggle breed names, so synthetic data reads like the real thing: familiar ones first.
_FAMILIAR_BREEDS = ("beagle", "boxer", "chihuahua", "golden_retriever", "pug", "samoyed",
                    "siberian_husky", "border_collie", "pomeranian", "basset", "malamute", "dingo")
_SYNTHETIC_BREEDS = _FAMILIAR_BREEDS + tuple(b for b in KAGGLE_BREEDS if b not in _FAMILIAR_BREEDS)
_SYNTHETIC_SHAPES = ("disc", "square", "triangle", "stripes", "cross", "checker", "ring", "diamond")

_WORDNET_PREFIX = re.compile(r"n\d{8}-(.+)")
_JPEG_MAGIC = b"\xff\xd8\xff"
# Inception / torchvision RandomResizedCrop aspect-ratio range (width / height).
_CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
# The training cache keeps images 15% larger than the eval resize, so crops of a large share
# of the image are still shrunk, not enlarged, to image_size.
_TRAIN_CACHE_MARGIN = 1.15


class DataError(ValueError):
    """A data directory, file or argument is not what tfdogs expects.

    The message names the file, directory or argument, what was found and what
    was expected.
    """


@dataclasses.dataclass(frozen=True, eq=False)  # ndarray fields make a generated __eq__ ambiguous.
class Records:
    """Labelled image files of one dataset.

    Attributes:
        paths: Absolute file paths, one per labelled image.
        labels: int64 class index per path, into `class_names`.
        class_names: Sorted breed names.
        layout: "kaggle" or "folders".
        root: Absolute data directory.
    """

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    layout: str
    root: str

    def __post_init__(self):
        labels = np.asarray(self.labels, dtype=np.int64)
        if labels.shape != (len(self.paths),):
            raise DataError(f"Records: {len(self.paths)} paths but labels of shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise DataError(
                f"Records: labels range over [{labels.min()}, {labels.max()}] but there are "
                f"{len(self.class_names)} class names"
            )
        object.__setattr__(self, "labels", labels)


# ----------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a data file or a labels.csv row, and what tfdogs does about it.

    Attributes:
        file: The file, relative to the data directory ("train/abc.jpg",
            "labels.csv", "pug/1.jpg").
        line: The labels.csv line the problem comes from, or None.
        kind: Short slug of the problem ("missing", "unsafe-id", "corrupt", ...).
        action: "skipped" (not used), "converted" (used through a converted
            copy) or "kept" (used as it is; the reason says what to expect).
        reason: What was found, in words.
    """

    file: str
    line: int | None
    kind: str
    action: str
    reason: str

    @property
    def where(self) -> str:
        if self.line is None:
            return self.file
        if self.file == "labels.csv":
            return f"labels.csv line {self.line}"
        return f"{self.file} (labels.csv line {self.line})"

    def __str__(self):
        return f"{self.where}: {self.action}, {self.reason}"


def find_records(data_dir) -> Records:
    """Lists the labelled images of a Kaggle-layout or class-folder directory.

    Class-folder names that start with a WordNet id (Stanford Dogs'
    `n02085620-Chihuahua`) lose the id and are lower-cased (`chihuahua`), which
    makes them the Kaggle breed names; other folder names are kept as they are.
    This is the strict listing: any labelling problem is an error. Training
    goes through `tfdogs.check`, which skips and lists bad rows and files instead.

    Args:
        data_dir: The dataset directory.

    Returns:
        Records in labels.csv order (Kaggle) or sorted by breed, then file name
        (class folders).

    Raises:
        DataError: The directory is missing, malformed, fits neither layout or
            has a labelling problem (see `scan_records`).
    """
    records, problems = scan_records(data_dir)
    if not problems:
        return records
    if all(problem.kind == "missing" for problem in problems):
        missing = [str(pathlib.Path(records.root) / problem.file) for problem in problems]
        raise DataError(
            f"{len(missing)} of {len(missing) + len(records.paths)} images listed in "
            f"{pathlib.Path(records.root) / 'labels.csv'} are missing: {_preview(missing)}")
    raise DataError(
        f"{len(problems)} problems in {records.root}: {_preview([str(p) for p in problems], 3)}. "
        f"python -m tfdogs.check --data-dir {records.root} lists them all.")


def scan_records(data_dir) -> tuple[Records, list[Problem]]:
    """Lists the labelled images of a data directory, setting aside what cannot be used.

    Rows and files that cannot be used are left out and described: missing
    images, images without a row, duplicate or conflicting ids, empty breeds,
    ids that are paths (`../../etc/passwd`: refused without being looked at),
    and symbolic links that lead out of the data directory. Nothing outside
    the data directory is ever opened. The images' contents are not read here
    (see `tfdogs.check`).

    Args:
        data_dir: The dataset directory.

    Returns:
        (records of the usable rows and files, problems); the records may be empty.

    Raises:
        DataError: The directory is missing or empty, fits neither layout, or
            its labels.csv cannot be read as 'id,breed' rows.
    """
    root = pathlib.Path(data_dir).expanduser().resolve()
    if not root.exists():
        raise DataError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data directory {root} is a file, not a directory")
    if (root / "labels.csv").is_file():
        return _kaggle_records(root)
    return _folder_records(root, _find_class_root(root))


def _read_labels_csv(csv_path):
    """[(line number, stripped cells)] of the non-blank lines of labels.csv."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            return [(reader.line_num, [cell.strip() for cell in row]) for row in reader if any(row)]
    except UnicodeDecodeError as error:
        raise DataError(f"{csv_path} is not UTF-8 text ({error}); expected 'id,breed' rows") from None
    except csv.Error as error:
        raise DataError(f"{csv_path} is not a readable CSV file ({error}); expected 'id,breed' rows") from None


def _unsafe_id_reason(image_id):
    """Why an id cannot name a file in train/, or None: ids are bare file names."""
    if any(character in image_id for character in "/\\\0"):
        return f"id {image_id!r} is a path, not a file name; refused, nothing was read"
    if image_id in (".", ".."):
        return f"id {image_id!r} is not a file name; refused, nothing was read"
    return None


def _kaggle_records(root):
    csv_path, train_dir = root / "labels.csv", root / "train"
    rows = _read_labels_csv(csv_path)
    if not rows:
        raise DataError(f"{csv_path} is empty; expected a header 'id,breed' and one row per image")
    header_line, header = rows[0]
    columns = [cell.lower() for cell in header]
    if "id" not in columns or "breed" not in columns:
        raise DataError(
            f"{csv_path}: header is {','.join(header)!r}; expected 'id,breed' "
            f"(the first line names the columns)")
    id_column, breed_column = columns.index("id"), columns.index("breed")
    if len(rows) == 1:
        raise DataError(f"{csv_path} has a header but no images")
    if not train_dir.is_dir():
        raise DataError(f"{root} has labels.csv but no train/ folder; expected train/<id>.jpg beside it")

    problems = []

    def problem(file, line, kind, reason):
        problems.append(Problem(file, line, kind, "skipped", reason))

    rows_by_id = {}  # id -> [(line, breed)], in file order
    for line, row in rows[1:]:
        if len(row) != len(header):
            problem("labels.csv", line, "bad-row",
                    f"has {len(row)} fields {row}; expected {len(header)} ({','.join(header)})")
            continue
        image_id, breed = row[id_column], row[breed_column]
        unsafe = _unsafe_id_reason(image_id) if image_id else "empty id"
        if unsafe:
            problem("labels.csv", line, "unsafe-id" if image_id else "empty-id", unsafe)
            continue
        rows_by_id.setdefault(image_id, []).append((line, breed))

    paths, breeds = [], []
    for image_id, id_rows in rows_by_id.items():
        file = f"train/{image_id}.jpg"
        (line, breed), *repeats = id_rows
        if len({b for _, b in id_rows}) > 1:
            listed = ", ".join(f"{b!r} on line {n}" for n, b in id_rows)
            for repeat_line, _ in id_rows:
                problem(file, repeat_line, "conflicting-id", f"id {image_id!r} has different breeds: {listed}")
            continue
        for repeat_line, _ in repeats:
            problem(file, repeat_line, "duplicate-id",
                    f"id {image_id!r} is listed again (first on line {line}); the repeat is ignored")
        if not breed:
            problem(file, line, "empty-breed", "the breed is empty")
            continue
        path = train_dir / f"{image_id}.jpg"
        outside = _outside_reason(path, root)
        if outside:
            problem(file, line, "outside", outside)
        elif not path.is_file():
            hint = ""
            if image_id.lower().endswith(".jpg") and (train_dir / image_id).is_file():
                hint = (f"; ids are file names without .jpg and train/{image_id} exists, so the id should read "
                        f"{image_id[:-4]!r}")
            problem(file, line, "missing", f"listed in labels.csv but {file} does not exist{hint}")
        else:
            paths.append(str(path))
            breeds.append(breed)

    listed = {f"{image_id}.jpg" for image_id in rows_by_id}
    for path in sorted(train_dir.iterdir()):
        if path.name not in listed and not path.name.startswith(".") and not path.is_dir():
            problem(f"train/{path.name}", None, "unlabelled", "has no row in labels.csv; not used")
    class_names = sorted(set(breeds))
    index = {name: i for i, name in enumerate(class_names)}
    records = Records(paths, [index[b] for b in breeds], class_names, "kaggle", str(root))
    return records, sorted(problems, key=_problem_order)


def _problem_order(problem):
    return (problem.line is None, problem.line or 0, problem.file)


def _outside_reason(path, root):
    """Why `path` (inside `root` by name) must not be read, or None: links out of `root` are refused."""
    real = pathlib.Path(os.path.realpath(path))
    if real == root or root in real.parents:
        return None
    return f"symbolic link to {real}, outside the data directory; refused, nothing was read"


def _find_class_root(root):
    """Returns the directory whose sub-folders are the classes: `root` or one child."""
    class_folders = _class_folders(root)
    if class_folders:
        if {folder.name for folder in class_folders} <= {"train", "test"}:
            raise DataError(
                f"{root} looks like the Kaggle layout (train/ holds images) but has no "
                f"labels.csv; expected labels.csv with header 'id,breed' beside train/"
            )
        return root
    candidates = [child for child in _subdirectories(root) if _class_folders(child)]
    if len(candidates) > 1:
        raise DataError(
            f"{root} has several folders of class folders "
            f"({', '.join(c.name + '/' for c in candidates)}); pass one of them as the data directory"
        )
    if candidates:
        return candidates[0]
    entries = sorted(e.name + "/" if e.is_dir() else e.name for e in root.iterdir())
    raise DataError(
        f"no labels.csv and no class folders with images in {root}; "
        f"found: {_preview(entries) if entries else 'nothing (empty directory)'}. {LAYOUTS_HELP}"
    )


def _folder_records(root, class_root):
    folders_by_name = {}
    # A breed folder's photos may sit in sub-folders of it (beagle/2019/*.jpg); they all count.
    for folder in (sub for sub in _subdirectories(class_root) if images_in(sub)):
        name = _breed_name(folder.name)
        if name in folders_by_name:
            raise DataError(
                f"class folders {folders_by_name[name]} and {folder} both give the breed name {name!r}"
            )
        folders_by_name[name] = folder
    paths, breeds, problems = [], [], []
    for name in sorted(folders_by_name):
        for path in images_in(folders_by_name[name]):
            outside = _outside_reason(path, root)
            if outside:
                problems.append(Problem(path.relative_to(root).as_posix(), None, "outside", "skipped", outside))
            else:
                paths.append(str(path))
                breeds.append(name)
    class_names = sorted(set(breeds))
    index = {name: i for i, name in enumerate(class_names)}
    return Records(paths, [index[b] for b in breeds], class_names, "folders", str(root)), problems


def _breed_name(folder_name):
    """`n02085620-Chihuahua` -> `chihuahua` (the Kaggle name); other names unchanged."""
    match = _WORDNET_PREFIX.fullmatch(folder_name)
    return match.group(1).lower() if match else folder_name


def _subdirectories(directory):
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def images_in(folder):
    """The images in `folder` and its sub-folders (hidden ones left out), sorted by path; links to folders not followed."""
    found = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        found += [path for path in map(pathlib.Path(directory).joinpath, files) if _is_image(path)]
    return sorted(found, key=lambda path: path.relative_to(folder).parts)


def _class_folders(directory):
    return [sub for sub in _subdirectories(directory) if any(_is_image(p) for p in sub.iterdir())]


def _is_image(path):
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def _preview(items, limit=5):
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ----------------------------------------------------------------------------- synthetic data


def make_synthetic(directory, num_classes=6, images_per_class=30, image_size=64, seed=0) -> pathlib.Path:
    """Writes a small, learnable dog-breed stand-in in the Kaggle layout.

    Each class is a shape (disc, square, triangle, stripes, cross, checker, ring,
    diamond, then again) in its own hue, drawn at a random position and scale on a noisy
    grey background, so a tiny CNN beats chance within a few epochs at 32-64 px
    without the task being trivial. Besides `labels.csv` and `train/<id>.jpg`
    it writes unlabelled `test/<id>.jpg` (two per class) and a uniform
    `sample_submission.csv`, as the Kaggle download has. The same arguments give
    byte-identical files.

    Args:
        directory: Where to write; created if needed, same-named files overwritten.
        num_classes: Number of breeds, 2 to 120; beyond 8 the shapes repeat, so
            classes k and k + 8 differ only in hue.
        images_per_class: Labelled images per breed.
        image_size: Side of the square images in pixels.
        seed: Seed of everything random.

    Returns:
        The directory, as a Path.
    """
    if not 2 <= num_classes <= len(_SYNTHETIC_BREEDS):
        raise DataError(f"num_classes must be in [2, {len(_SYNTHETIC_BREEDS)}]; got {num_classes}")
    if images_per_class < 1 or image_size < 8:
        raise DataError(
            f"need images_per_class >= 1 and image_size >= 8; got {images_per_class} and {image_size}"
        )
    directory = pathlib.Path(directory)
    for sub in ("train", "test"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    class_names = sorted(_SYNTHETIC_BREEDS[:num_classes])

    def write_images(subset, labels):
        ids = sorted(rng.bytes(16).hex() for _ in labels)  # Kaggle ids: 32 hex digits, files sorted by id.
        for image_id, label in zip(ids, labels):
            pixels = _synthetic_image(rng, label, num_classes, image_size)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            (directory / subset / f"{image_id}.jpg").write_bytes(buffer.getvalue())
        return ids

    train_labels = rng.permutation(np.repeat(np.arange(num_classes), images_per_class))
    train_ids = write_images("train", train_labels)
    test_ids = write_images("test", rng.integers(0, num_classes, size=2 * num_classes))

    with open(directory / "sample_submission.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", *class_names])
        uniform = repr(1 / num_classes)
        writer.writerows([image_id] + [uniform] * num_classes for image_id in test_ids)
    # labels.csv is written last and renamed into place: its presence means the data is complete.
    temporary = directory / f".partial-{os.getpid()}-labels.csv"
    with open(temporary, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "breed"])
        writer.writerows((image_id, class_names[label]) for image_id, label in zip(train_ids, train_labels))
    os.replace(temporary, directory / "labels.csv")
    return directory


def _synthetic_image(rng, label, num_classes, image_size):
    """uint8 [size, size, 3]: the class's shape in the class's hue on grey noise."""
    size = image_size
    background = rng.uniform(60, 190) + rng.normal(0, 20, (size, size, 1))
    image = np.repeat(background, 3, axis=2)
    hue = (label / num_classes + rng.uniform(-0.02, 0.02)) % 1.0
    colour = 255 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)))
    centre_y, centre_x = rng.uniform(0.3, 0.7, 2) * size
    radius = rng.uniform(0.2, 0.35) * size
    y, x = np.mgrid[0:size, 0:size] + 0.5
    v, u = (y - centre_y) / radius, (x - centre_x) / radius  # unit coordinates around the centre
    in_box = np.maximum(abs(u), abs(v)) <= 1
    shape = _SYNTHETIC_SHAPES[label % len(_SYNTHETIC_SHAPES)]
    mask = {
        "disc": u**2 + v**2 <= 1,
        "square": np.maximum(abs(u), abs(v)) <= 0.8,
        "triangle": (abs(v) <= 0.8) & (abs(u) <= (v + 0.8) * 0.6),
        "stripes": in_box & (np.floor((v + 1) * 2.5) % 2 == 0),
        "cross": in_box & ((abs(u) <= 0.25) | (abs(v) <= 0.25)),
        "checker": in_box & ((np.floor((u + 1) * 2) + np.floor((v + 1) * 2)) % 2 == 0),
        "ring": (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.45),
        "diamond": abs(u) + abs(v) <= 1,
    }[shape]
    image[mask] = colour + rng.normal(0, 12, (mask.sum(), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- splits


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


def _group_members(groups):
    """Sorted image indices of each distinct group id."""
    _, group_of = np.unique(groups, return_inverse=True)
    order = np.argsort(group_of.ravel(), kind="stable")
    return np.split(order, np.cumsum(np.bincount(group_of.ravel()))[:-1])


def _majority(labels):
    """The most common label, the smallest one on a tie."""
    values, counts = np.unique(labels, return_counts=True)
    return values[np.argmax(counts)]


_SPLIT_COLUMNS = ["path", "label", "breed", "subset"]


def write_split(path, records, train_indices, val_indices) -> None:
    """Writes a split as CSV: path (relative to records.root), label, breed, subset.

    Rows follow `records` order; only images in one of the two subsets are
    written, so `read_split` gives back the same records when the subsets cover
    all of them (as `stratified_split`'s do).

    Args:
        path: CSV file to write; parent directories are created.
        records: The records the indices point into.
        train_indices: Indices of training images.
        val_indices: Indices of validation images.
    """
    subset_of = {int(i): "train" for i in train_indices}
    overlap = sorted(subset_of.keys() & {int(i) for i in val_indices})
    if overlap:
        raise DataError(f"write_split: indices {_preview(overlap)} are in both train and val")
    subset_of.update({int(i): "val" for i in val_indices})
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed: a resumed run must never read half a split.
    temporary = path.with_name(f".partial-{os.getpid()}-{path.name}")
    with open(temporary, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(_SPLIT_COLUMNS)
        for index in sorted(subset_of):
            relative = pathlib.Path(os.path.relpath(records.paths[index], records.root)).as_posix()
            label = int(records.labels[index])
            writer.writerow([relative, label, records.class_names[label], subset_of[index]])
    os.replace(temporary, path)


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
        if reader.fieldnames != _SPLIT_COLUMNS:
            raise DataError(f"{path}: header is {reader.fieldnames}; expected {','.join(_SPLIT_COLUMNS)}")
        rows = list(reader)
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    breed_of_label = {}
    for line_number, row in enumerate(rows, start=2):
        where = f"{path}, line {line_number}"
        if None in row or None in row.values() or not row["path"]:
            raise DataError(
                f"{where}: found {list(row.values())}; expected 4 fields {','.join(_SPLIT_COLUMNS)}")
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
    escaping = [p for p in paths if _outside_reason(p, root)]
    if escaping:
        raise DataError(f"{path} lists files outside the data directory {root}; refused: {_preview(escaping)}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(paths)} images listed in {path} are missing: {_preview(missing)}")
    layout = "kaggle" if (root / "labels.csv").is_file() else "folders"
    class_names = [breed_of_label[label] for label in range(len(breed_of_label))]
    records = Records(paths, [int(row["label"]) for row in rows], class_names, layout, str(root))
    subsets = np.array([row["subset"] for row in rows])
    return records, np.flatnonzero(subsets == "train"), np.flatnonzero(subsets == "val")


# ----------------------------------------------------------------------------- Stanford Dogs


def load_stanford_dogs(data_root=None, timeout=5.0) -> pathlib.Path:
    """Stanford Dogs (120 breeds, tfds train split) as a class-folder tree.

    tensorflow_datasets downloads and prepares "stanford_dogs" under
    `data_root`; the train split is then exported once, as the original JPEG
    bytes, to `<data_root>/tfdogs_stanford_dogs/<breed>/<name>.jpg` with Kaggle
    breed names (`chihuahua`). A complete export is returned without touching
    the network.

    Args:
        data_root: tfds data directory; default ~/tensorflow_datasets.
        timeout: Seconds to wait for the download host before giving up.

    Returns:
        The class-folder directory, ready for `find_records`.

    Raises:
        DataError: The data must be downloaded and the host cannot be reached.
    """
    import tensorflow_datasets as tfds  # Heavy import, needed only here.

    data_root = pathlib.Path(data_root or pathlib.Path.home() / "tensorflow_datasets").expanduser()
    folder = data_root / "tfdogs_stanford_dogs"
    if _export_is_complete(folder):
        return folder
    builder = tfds.builder("stanford_dogs", data_dir=str(data_root))
    if not builder.is_prepared():
        _require_host(STANFORD_DOGS_HOST, timeout)
        builder.download_and_prepare()
    examples = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    export_to_class_folders(tfds.as_numpy(examples), builder.info.features["label"].names, folder,
                            total=builder.info.splits["train"].num_examples)
    return folder


def export_to_class_folders(examples, label_names, folder, total=None, verbose=1) -> int:
    """Writes tfds-style examples to `folder/<breed>/<file name>` and marks the export complete.

    Args:
        examples: Iterable of dicts with "image" (encoded bytes, written as
            they are), "image/filename" (str or bytes; its last part names the
            file) and "label" (index into `label_names`).
        label_names: Class names; WordNet ids are stripped as in `find_records`.
        folder: Output directory.
        total: How many examples there are, for the progress bar (none without it).
        verbose: 0 hides the progress bar (shown on a terminal for a few hundred photos or more).

    Returns:
        The number of images written.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bar = progress.photos(total or 0, verbose)
    count = 0
    for example in examples:
        file_name = example["image/filename"]
        if isinstance(file_name, bytes):
            file_name = file_name.decode()
        target = folder / _breed_name(label_names[int(example["label"])]) / pathlib.PurePath(file_name).name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(example["image"])
        count += 1
        bar.update(count)
    # Written last, so an interrupted export is redone instead of trusted.
    (folder / _EXPORT_MARKER).write_text(json.dumps({"images": count}))
    return count


def _export_is_complete(folder):
    marker = folder / _EXPORT_MARKER
    if not marker.is_file():
        return False
    written = sum(1 for sub in _subdirectories(folder) for p in sub.iterdir() if _is_image(p))
    return written == json.loads(marker.read_text())["images"]


def _require_host(host_port, timeout):
    host, port = host_port
    try:
        socket.create_connection(host_port, timeout=timeout).close()
    except OSError as error:
        raise DataError(
            f"the Stanford Dogs download needs internet, but {host}:{port} cannot be reached ({error}). "
            "Pass --data-dir path/to/dog-breed-identification (the Kaggle layout: labels.csv + train/) "
            "or a class-folder directory (<breed>/*.jpg) instead."
        ) from error


# ----------------------------------------------------------------------------- image ops


def decode_image(image_bytes) -> tf.Tensor:
    """Decodes JPEG, PNG, GIF (first frame), BMP or WebP bytes to uint8 [h, w, 3], upright.

    Grayscale gains two channels and RGBA loses alpha. A JPEG's EXIF
    orientation (what phones write instead of rotating the pixels) is applied,
    as Pillow's `ImageOps.exif_transpose` does; see `exif_orientation`. Works
    eagerly and in graphs (Dataset.map, the SavedModel's signature).
    """
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return orient(tf.ensure_shape(image, [None, None, 3]), exif_orientation(image_bytes))


# Where the in-graph EXIF search looks: the Exif segment is one of the application segments that
# open a JPEG (right after SOI, or after JFIF's APP0, an XMP APP1, ...), within its first 64 KiB;
# IFD0's entries are sorted by tag, so Orientation (0x0112) is among the first.
_EXIF_SEARCH_BYTES = 1 << 16
_OPENING_SEGMENTS = 4
_MAX_IFD_ENTRIES = 32
_EXIF_SEGMENT = b"Exif\x00\x00"
_ORIENTATION_TAG = 0x0112


def exif_orientation(image_bytes) -> tf.Tensor:
    """The EXIF orientation (1 to 8) of encoded image bytes, read in the graph; 1 when there is none.

    Finds the JPEG's Exif segment (APP1: `FF E1`, length, `Exif\0\0`) among
    the first four segments, reads the TIFF header's byte order ("II"
    little-endian, "MM" big-endian), its 42 and the offset of IFD0, and looks
    up tag 0x0112 (type SHORT) among IFD0's entries. Anything else (not a
    JPEG, no Exif segment, a malformed one, a value outside 1-8) gives 1: the
    image is used as stored. Pure TensorFlow string ops without loops; a photo
    without `Exif\0\0` in its first 64 KiB costs a handful of ops, so TF
    Serving and the input pipeline apply it to every image.

    Args:
        image_bytes: scalar tf.string.

    Returns:
        int32 scalar.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    length = tf.cast(tf.strings.length(image_bytes, unit="BYTE"), tf.int64)

    def read(position, count):
        """`count` bytes from `position` as int64, zeros past the end of the data."""
        position = tf.cast(tf.clip_by_value(tf.cast(position, tf.int64), 0, length), tf.int32)
        raw = tf.io.decode_raw(tf.strings.substr(image_bytes, position, count), tf.uint8)
        return tf.cast(tf.pad(raw, [[0, count - tf.shape(raw)[0]]]), tf.int64)

    head_length = tf.minimum(length, _EXIF_SEARCH_BYTES)
    head = tf.strings.substr(image_bytes, 0, tf.cast(head_length, tf.int32))
    before_exif = tf.strings.split(head, _EXIF_SEGMENT, maxsplit=1)[0]
    segment = tf.cast(tf.strings.length(before_exif, unit="BYTE"), tf.int64) - 4  # where FF E1 should be
    marker = tf.concat([read(0, 2), read(segment, 2)], 0)
    candidate = tf.logical_and(tf.reduce_all(tf.equal(marker, [0xFF, 0xD8, 0xFF, 0xE1])),
                               tf.logical_and(segment >= 2, segment + 4 < head_length))
    return tf.cond(candidate, lambda: _tiff_orientation(read, segment), lambda: tf.constant(1, tf.int32))


def _tiff_orientation(read, segment):
    """The orientation in the Exif segment at `segment`, or 1 when it does not open the file or is malformed."""
    # The segments that open a JPEG: FF <APPn or COM> <16-bit big-endian length, counting itself> <payload>.
    # Entropy-coded data never holds FF E1, so a walk of a few steps tells a real Exif segment.
    position, opens_file = tf.constant(2, tf.int64), tf.constant(False)
    for _ in range(_OPENING_SEGMENTS):
        header = read(position, 4)
        opening = tf.logical_and(tf.equal(header[0], 0xFF), tf.logical_or(
            tf.logical_and(header[1] >= 0xE0, header[1] <= 0xEF), tf.equal(header[1], 0xFE)))
        opens_file = tf.logical_or(opens_file, tf.logical_and(opening, tf.equal(position, segment)))
        position = tf.where(opening, position + 2 + header[2] * 256 + header[3], -1)

    def unsigned(values, little_endian):
        weights = tf.cast(256 ** tf.range(tf.shape(values)[-1]), tf.int64)
        return tf.reduce_sum(values * tf.where(little_endian, weights, tf.reverse(weights, [0])), axis=-1)

    tiff = segment + 4 + len(_EXIF_SEGMENT)
    header = read(tiff, 8)
    little_endian = tf.reduce_all(tf.equal(header[:2], [0x49, 0x49]))
    valid = tf.logical_and(
        tf.logical_or(little_endian, tf.reduce_all(tf.equal(header[:2], [0x4D, 0x4D]))),
        tf.equal(unsigned(header[2:4], little_endian), 42))
    directory = tiff + unsigned(header[4:8], little_endian)
    count = tf.minimum(unsigned(read(directory, 2), little_endian), _MAX_IFD_ENTRIES)
    # Each entry: tag, type, count (2, 2, 4 bytes), then the value; a SHORT's value is in its first 2 bytes.
    entries = tf.reshape(read(directory + 2, 12 * _MAX_IFD_ENTRIES), [_MAX_IFD_ENTRIES, 12])
    matches = tf.logical_and(tf.range(_MAX_IFD_ENTRIES, dtype=tf.int64) < count, tf.logical_and(
        tf.equal(unsigned(entries[:, 0:2], little_endian), _ORIENTATION_TAG),
        tf.equal(unsigned(entries[:, 2:4], little_endian), 3)))
    value = tf.reduce_max(tf.where(matches, unsigned(entries[:, 8:10], little_endian), 0))
    usable = tf.logical_and(tf.logical_and(opens_file, valid), tf.logical_and(value >= 1, value <= 8))
    return tf.cast(tf.where(usable, value, 1), tf.int32)


def orient(image, orientation) -> tf.Tensor:
    """Turns an [h, w, c] image stored with EXIF `orientation` (1 to 8) upright, as Pillow's `exif_transpose`.

    Orientations 5 to 8 swap the sides (a transpose), then 2, 3, 6, 7 mirror
    left-right and 3, 4, 7, 8 top-bottom: 6, what phones held upright
    write, is a quarter turn clockwise.
    """
    orientation = tf.convert_to_tensor(orientation, tf.int32)

    def turn():
        turned = tf.cond(orientation >= 5, lambda: tf.transpose(image, [1, 0, 2]), lambda: image)
        mirror = tf.reduce_any(tf.equal(orientation, [2, 3, 6, 7]))
        turned = tf.cond(mirror, lambda: tf.reverse(turned, [1]), lambda: turned)
        flip = tf.reduce_any(tf.equal(orientation, [3, 4, 7, 8]))
        return tf.cond(flip, lambda: tf.reverse(turned, [0]), lambda: turned)

    return tf.cond(tf.equal(orientation, 1), lambda: image, turn)


def preprocess_eval(image, image_size, mean, std, crop_fraction=0.875, interpolation="bilinear",
                    resize_rounding="round") -> tf.Tensor:
    """Validation and serving preprocessing of one image.

    Resizes so the shorter side is image_size / crop_fraction (rounded as
    `resize_rounding` says), centre-crops image_size x image_size, scales to
    [0, 1] and normalises with mean/std. Sizes and offsets follow
    torchvision's Resize + CenterCrop, and the resize is Pillow's, which
    torchvision's and timm's eval transforms run on PIL images (see
    `_resize_shorter_side`). Pure TF with dynamic shapes: the SavedModel
    export reuses it.

    Args:
        image: [h, w, 3] uint8, or float in [0, 255] (rounded to whole values, as an 8-bit image).
        image_size: Output side in pixels.
        mean: 3 RGB means for images in [0, 1].
        std: 3 RGB standard deviations for images in [0, 1].
        crop_fraction: Share of the resized shorter side kept by the crop, in (0, 1].
        interpolation: "bilinear" (torchvision weights) or "bicubic" (timm weights).
        resize_rounding: "round" (torchvision) or "floor" (timm's math.floor(img_size / crop_pct)).

    Returns:
        float32 [image_size, image_size, 3].
    """
    if not 0 < crop_fraction <= 1:
        raise DataError(f"crop_fraction must be in (0, 1]; got {crop_fraction}")
    image = _resize_shorter_side(image, resize_size(image_size, crop_fraction, resize_rounding), interpolation)
    return _normalize(_centre_crop(image, image_size), mean, std)


# Test-time augmentation: the views `eval_views` gives for each allowed count, in order. Each count's views
# begin with the smaller count's, and view 0 is always the evaluation crop of `preprocess_eval`.
TTA_VIEWS = {
    1: ("centre",),
    2: ("centre", "centre mirrored"),
    10: ("centre", "centre mirrored", "top-left", "top-left mirrored", "top-right", "top-right mirrored",
         "bottom-left", "bottom-left mirrored", "bottom-right", "bottom-right mirrored"),
}


def eval_views(image, views, image_size, mean, std, crop_fraction=0.875, interpolation="bilinear",
               resize_rounding="round") -> tf.Tensor:
    """Test-time augmentation: `views` crops of one image, preprocessed as `preprocess_eval`.

    The image is resized once, exactly as `preprocess_eval` resizes it
    (shorter side `Preprocessing.resize_size`, longer side in proportion,
    Pillow's resampling), and every view is an image_size x image_size crop
    of that resized image, named in `TTA_VIEWS[views]`:

    - 1: the centre crop, which is `preprocess_eval`'s output, bit for bit;
    - 2: the centre crop and its mirror image (left-right);
    - 10: those two, then the crops at the four corners of the whole resized
      image (top-left, top-right, bottom-left, bottom-right; e.g. rows 0 to
      image_size - 1 and the last image_size columns for top-right), each
      followed by its mirror image.

    The ten are torchvision's `Resize(resize_size)` + `TenCrop(image_size)`
    (the classic AlexNet/ResNet 10-crop evaluation), except that mirrors are
    of the crops rather than crops of the mirrored image: the two differ
    only for the centre crop, by one pixel, when the margin is odd. On a
    4:3 photo at 224 px (resized to 256 x 341) the corner crops reach the
    far ends of the longer side. Callers average the views' softmax
    probabilities (not their logits).

    Args:
        image: [h, w, 3] uint8, or float in [0, 255] (rounded to whole values).
        views: 1, 2 or 10 (the keys of `TTA_VIEWS`).
        image_size, mean, std, crop_fraction, interpolation, resize_rounding: as for `preprocess_eval`.

    Returns:
        float32 [views, image_size, image_size, 3], in the order of `TTA_VIEWS[views]`.
    """
    if views not in TTA_VIEWS:
        raise DataError(f"test-time augmentation takes {', '.join(map(str, TTA_VIEWS))} views; got {views!r}")
    if not 0 < crop_fraction <= 1:
        raise DataError(f"crop_fraction must be in (0, 1]; got {crop_fraction}")
    image = _resize_shorter_side(image, resize_size(image_size, crop_fraction, resize_rounding), interpolation)
    crops = [_centre_crop(image, image_size)]
    if views == 10:
        shape = tf.shape(image)
        bottom, right = shape[0] - image_size, shape[1] - image_size
        crops += [tf.ensure_shape(image[top:top + image_size, left:left + image_size], [image_size, image_size, 3])
                  for top, left in ((0, 0), (0, right), (bottom, 0), (bottom, right))]
    crops = tf.stack(crops)
    if views > 1:  # each crop followed by its mirror image
        crops = tf.reshape(tf.stack([crops, tf.reverse(crops, [2])], axis=1), [-1, image_size, image_size, 3])
    return _normalize(crops, mean, std)


def _resize_shorter_side(image, size, interpolation="bilinear"):
    """Pillow's `Image.resize` of the shorter side to `size`, exactly, as float32 whole values in [0, 255].

    torchvision's `Resize(size)` and timm's eval transform resize PIL images,
    so what the weights were evaluated with is Pillow's resampling: antialiased
    (the filter widens with the downscale factor), horizontal pass first, each
    pass in 22-bit fixed point and rounded to 8 bits. `tf.image.resize` differs
    by up to 16 levels with bicubic (its overshoot is not clipped) and up to 7
    after clipping and rounding; this reproduces Pillow bit for bit.
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    shorter, longer = tf.minimum(height, width), tf.maximum(height, width)
    # torchvision truncates the longer side: int(size * longer / shorter); float64 keeps exact ratios exact.
    new_longer = tf.cast(size * tf.cast(longer, tf.float64) / tf.cast(shorter, tf.float64), tf.int32)
    portrait = height > width
    new_height, new_width = tf.where(portrait, new_longer, size), tf.where(portrait, size, new_longer)
    pixels = tf.clip_by_value(tf.round(tf.cast(image, tf.float64)), 0.0, 255.0)
    # Rows are gathered faster than columns, so the horizontal pass runs on the transposed image.
    pixels = tf.transpose(_pillow_resample(tf.transpose(pixels, [1, 0, 2]), new_width, interpolation), [1, 0, 2])
    return tf.cast(_pillow_resample(pixels, new_height, interpolation), tf.float32)


# Pillow's fixed point: 32-bit sums with 8 bits for the pixel and 2 for filter overshoot (Resample.c).
_PILLOW_PRECISION_BITS = 22
_PILLOW_FILTER_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def _pillow_filter(x, interpolation):
    x = tf.abs(x)
    if interpolation == "bilinear":
        return tf.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5  # Keys' cubic convolution, as Pillow
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, 0.0))


def _pillow_resample(pixels, out_size, interpolation):
    """One of Pillow's two resampling passes: float64 whole pixel values [h, w, 3] to [out_size, w, 3]."""
    if interpolation not in _PILLOW_FILTER_SUPPORT:
        raise DataError(f"interpolation must be one of {sorted(_PILLOW_FILTER_SUPPORT)}; got {interpolation!r}")
    in_size = tf.shape(pixels)[0]
    # Pillow's precompute_coeffs, step by step in float64 like its C doubles.
    scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
    filter_scale = tf.maximum(scale, 1.0)
    support = _PILLOW_FILTER_SUPPORT[interpolation] * filter_scale
    taps = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    centre = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
    first = tf.maximum(tf.cast(centre - support + 0.5, tf.int32), 0)  # C's (int) truncates, as tf.cast
    count = tf.minimum(tf.cast(centre + support + 0.5, tf.int32), in_size) - first
    offsets = tf.range(taps)[None, :]
    source = first[:, None] + offsets
    weights = _pillow_filter((tf.cast(source, tf.float64) - centre[:, None] + 0.5) * (1.0 / filter_scale),
                             interpolation)
    weights = tf.where(offsets < count[:, None], weights, 0.0)
    total = tf.reduce_sum(weights, axis=1, keepdims=True)
    weights = tf.math.divide_no_nan(weights, total)
    fixed = weights * (1 << _PILLOW_PRECISION_BITS)
    fixed = tf.where(fixed < 0, tf.math.ceil(fixed - 0.5), tf.floor(fixed + 0.5))  # C's (int)(x -/+ 0.5)
    source = tf.minimum(source, in_size - 1)  # taps past the edge have weight 0

    # One tap at a time: gathering all taps at once would hold [out, taps, w, 3] doubles, over 1 GB for
    # a 12-megapixel photo. Integer sums below 2^31 are exact in float64, so the order cannot matter.
    def add_tap(tap, sums):
        return tap + 1, sums + tf.gather(pixels, source[:, tap]) * fixed[:, tap, None, None]

    out_shape = tf.concat([[out_size], tf.shape(pixels)[1:]], 0)
    rounding = tf.fill(out_shape, tf.constant(1 << (_PILLOW_PRECISION_BITS - 1), tf.float64))
    _, sums = tf.while_loop(lambda tap, _: tap < taps, add_tap, (tf.constant(0), rounding))
    return tf.clip_by_value(tf.floor(sums / (1 << _PILLOW_PRECISION_BITS)), 0.0, 255.0)


def _centre_crop(image, size):
    shape = tf.shape(image)
    # torchvision rounds the offsets; tf.round, like Python's round, rounds half to even.
    top = tf.cast(tf.round((shape[0] - size) / 2), tf.int32)
    left = tf.cast(tf.round((shape[1] - size) / 2), tf.int32)
    return tf.ensure_shape(image[top:top + size, left:left + size], [size, size, 3])


def _normalize(images, mean, std):
    """[0, 255] images -> ((images / 255) - mean) / std, float32."""
    mean, std = _rgb_constant(mean, "mean"), _rgb_constant(std, "std")
    return (tf.cast(images, tf.float32) / 255.0 - mean) / std


def _rgb_constant(values, name):
    values = np.asarray(values, dtype=np.float32)
    if values.shape != (3,):
        raise DataError(f"{name} must hold 3 values (R, G, B); got {values.tolist()}")
    return tf.constant(values)


def _is_jpeg(image_bytes):
    return tf.equal(tf.strings.substr(image_bytes, 0, 3), _JPEG_MAGIC)


def _crop_window(image_shape, seed, scale):
    """Random crop (begin, size) covering `scale` of the area at aspect 3/4..4/3."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=_CROP_ASPECT_RANGE,
        area_range=scale,
        max_attempts=10,  # as torchvision; after 10 misses the whole image is used.
    )
    return begin, size


def _random_crop_image(image, seed, scale):
    begin, size = _crop_window(tf.shape(image), seed, scale)
    return tf.slice(image, begin, size)


def _random_crop_bytes(image_bytes, seed, scale):
    """Random crop of encoded bytes; JPEG is decoded only inside the crop window."""

    def jpeg_crop():
        begin, size = _crop_window(tf.io.extract_jpeg_shape(image_bytes), seed, scale)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        return tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)

    def other_crop():
        return _random_crop_image(decode_image(image_bytes), seed, scale)

    # A JPEG stored sideways (EXIF orientation) is decoded whole and turned upright before cropping.
    upright = tf.equal(exif_orientation(image_bytes), 1)
    crop = tf.cond(tf.logical_and(_is_jpeg(image_bytes), upright), jpeg_crop, other_crop)
    return tf.ensure_shape(crop, [None, None, 3])


def _resize_square(image, size, interpolation="bilinear"):
    # Clipped and rounded as the 8-bit PIL images torchvision and timm train on: bicubic overshoots [0, 255].
    resized = tf.image.resize(image, [size, size], method=interpolation, antialias=True)
    return tf.round(tf.clip_by_value(resized, 0.0, 255.0))


def _shrink_for_cache(image, shorter_side):
    """uint8 image shrunk (never enlarged) to shorter side <= S and longer side <= 2 S."""
    shape = tf.shape(image)[:2]
    scale = tf.minimum(1.0, shorter_side / tf.cast(tf.reduce_min(shape), tf.float32))
    new_shape = tf.cast(tf.round(tf.cast(shape, tf.float32) * scale), tf.int32)
    image = tf.image.resize(image, new_shape, method="bilinear", antialias=True)
    # Very elongated images lose the ends of their longer side, which bounds cache memory.
    keep = tf.minimum(new_shape, 2 * shorter_side)
    offset = (new_shape - keep) // 2
    image = tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([keep, [3]], 0))
    return tf.saturate_cast(tf.round(image), tf.uint8)


# ----------------------------------------------------------------------------- pipeline


def make_dataset(paths, labels, *, image_size, batch_size, training, mean, std, seed=0,
                 augmentation=None, cache=None, shuffle_buffer=1024, crop_fraction=0.875,
                 scale=(0.08, 1.0), num_parallel_calls=tf.data.AUTOTUNE,
                 interpolation="bilinear", flip=False, cache_size=None, resize_rounding="round",
                 first_epoch=0, num_epochs=1, steps_per_epoch=None, num_classes=None,
                 part=None, views=1) -> tf.data.Dataset:
    """tf.data pipeline of normalised image batches and labels.

    Training: epochs `first_epoch` to `first_epoch + num_epochs - 1` one
    after the other, each `steps_per_epoch` full batches (default: all of
    them). Per epoch: shuffle the file list, read in parallel,
    random-resized-crop (area `scale`, aspect 3/4..4/3; JPEGs, found by their
    magic bytes, are decoded only inside the crop window), resize to
    image_size, batch dropping the remainder, apply `augmentation` to each
    batch of float images in [0, 255] (so RandomContrast's value_range is
    (0, 255)), then normalise.

    Randomness is keyed by (seed, epoch): the shuffle order, every image's
    crop and flip and every batch's augmentation in epoch e are drawn by
    stateless ops from seeds derived from `seed` and e alone (crops from the
    image's index in `paths`, augmentation from the batch's position in the
    epoch). A pipeline that starts at epoch e therefore gives exactly the
    batches that a pipeline started at epoch 0 gives in its epoch e, which
    is what makes a resumed run equal an uninterrupted one.

    Evaluation: no shuffle or augmentation, `preprocess_eval` per image, the
    last batch keeps the remainder; with `views` > 1, `eval_views` per image
    (test-time augmentation).

    Cache memory per image: training caches uint8 images shrunk to shorter
    side S = round(image_size / crop_fraction * 1.15) and longer side <= 2 S,
    at most 6 S^2 bytes (image_size 224: S = 294, <= 519 kB, ~346 kB for a 4:3
    photo; 64: S = 84, <= 42 kB); random crops are then taken from the cached
    image, and a `shuffle_buffer` of such images follows the cache. Evaluation
    caches the final float32 image, 12 * image_size^2 bytes (224: 602 kB; 64:
    49 kB). `cache_size` sets S directly: less memory and faster crops, at the
    price of enlarging crops smaller than image_size.

    Speed: without `augmentation` every per-image step (crop, resize, `flip`,
    normalise) runs in one parallel map; a Keras flip on batches runs
    sequentially and costs more than the decoding on 2 cores.

    Args:
        paths: Image file paths.
        labels: Integer class per path.
        image_size: Output side in pixels.
        batch_size: Images per batch.
        training: Training (random) or evaluation (deterministic) pipeline.
        mean: 3 RGB means for images in [0, 1].
        std: 3 RGB standard deviations for images in [0, 1].
        seed: Seed of the shuffles and random crops.
        augmentation: Keras layer called on training batches with training=True.
        cache: None (off), "memory", or a file path prefix; the files get a
            suffix from the mode, size and file list, so settings never share
            stale caches.
        shuffle_buffer: Images in the shuffle buffer after a training cache
            (without a cache the whole file list is shuffled).
        crop_fraction: Eval centre-crop share, see `preprocess_eval`; also
            sets the training cache size.
        scale: Area range of the training random crop, within (0, 1].
        num_parallel_calls: Parallelism of the per-image maps.
        interpolation: Resize method, "bilinear" or "bicubic", as the weights were trained with.
        resize_rounding: Eval: "round" or "floor" of image_size / crop_fraction, see `preprocess_eval`.
        flip: Training: mirror each image left-right with probability 1/2
            (stateless, seeded like its crop) inside the parallel map.
        cache_size: Training cache: shorter side S of the cached images
            (default round(image_size / crop_fraction * 1.15)).
        first_epoch: Training: the first epoch the pipeline gives.
        num_epochs: Training: how many epochs it gives, one after the other.
        steps_per_epoch: Training: batches per epoch, at most (and by
            default) the number of full batches.
        num_classes: Give labels as one-hot float32 [B, num_classes] rows
            (soft labels, as MixUp and CutMix in `augmentation` need) instead
            of class indices.
        part: Training: (index, count): give only the index-th of count
            equal slices of every batch (batch_size / count images), as
            they are in the whole batch, augmentation included (see
            `augment.augment_batch`). Each worker of a multi-worker run
            loads and augments its own slice of the global batch alone.
        views: Evaluation: 1, or the test-time augmentation views of each image, 2 or 10 (`eval_views`).

    Returns:
        A Dataset of (float32 [B, image_size, image_size, 3], int32 [B] or float32 [B, num_classes]).
        With `part`, B is batch_size / count. With `views` > 1, the images are [B, views, image_size,
        image_size, 3].
    """
    paths = [str(p) for p in paths]
    labels = np.asarray(labels)
    if not paths or labels.shape != (len(paths),):
        raise DataError(
            f"make_dataset: need one label per path; got {len(paths)} paths, labels of shape {labels.shape}")
    if training and len(paths) < batch_size:
        raise DataError(f"make_dataset: {len(paths)} training images give no full batch of {batch_size}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise DataError(f"scale must satisfy 0 < low <= high <= 1; got {scale}")
    if cache is not None and not str(cache):
        raise DataError("cache must be None, 'memory' or a file path prefix; got ''")
    if cache_size is not None and cache_size < 8:
        raise DataError(f"cache_size is the cached images' shorter side in pixels (>= 8); got {cache_size}")
    # Checked here, so a bad mean/std fails now rather than inside a traced map.
    _rgb_constant(mean, "mean")
    _rgb_constant(std, "std")
    cache_settings = dict(paths=paths, image_size=image_size, crop_fraction=crop_fraction, training=training,
                          mean=[float(v) for v in mean], std=[float(v) for v in std], interpolation=interpolation,
                          resize_rounding=resize_rounding)
    if cache_size:
        cache_settings["cache_size"] = cache_size
    if views != 1:
        if training or views not in TTA_VIEWS:
            raise DataError(f"make_dataset: views are test-time augmentation, {', '.join(map(str, TTA_VIEWS))} "
                            f"views of evaluation images; got views={views!r} with training={training}")
        cache_settings["views"] = views

    if not training:
        files = tf.data.Dataset.from_tensor_slices((paths, labels.astype(np.int32)))

        def load_eval(path, label):
            image = decode_image(tf.io.read_file(path))
            if views != 1:
                return eval_views(image, views, image_size, mean, std, crop_fraction, interpolation,
                                  resize_rounding), label
            return preprocess_eval(image, image_size, mean, std, crop_fraction, interpolation,
                                   resize_rounding), label

        dataset = _maybe_cache(files.map(load_eval, num_parallel_calls), cache, cache_settings)
        return _labels_as(dataset.batch(batch_size), num_classes).prefetch(tf.data.AUTOTUNE)

    full_batches = len(paths) // batch_size
    steps = min(steps_per_epoch or full_batches, full_batches)
    base_seed = tf.constant([seed, 0], tf.int64)

    def epoch_seed(epoch, purpose):
        """Seed of one kind of draw (0 shuffle, 1 crops, 2 augmentation) in one epoch."""
        fold = tf.random.experimental.stateless_fold_in
        return fold(fold(base_seed, tf.cast(epoch, tf.int64)), purpose)

    # Examples are indices into paths: crops are keyed by the index, so by the photo, not its position.
    path_of, label_of = tf.constant(paths), tf.constant(labels.astype(np.int32))
    if cache is None:
        def epoch_examples(epoch):
            order = tf.random.experimental.stateless_shuffle(tf.range(len(paths), dtype=tf.int64),
                                                             epoch_seed(epoch, 0))
            return tf.data.Dataset.from_tensor_slices(order).map(lambda index: (epoch, index))

        def load_train(epoch, index):
            path, label = tf.gather(path_of, index), tf.gather(label_of, index)
            crop_seed = tf.random.experimental.stateless_fold_in(epoch_seed(epoch, 1), index)
            crop = _random_crop_bytes(tf.io.read_file(path), crop_seed, scale)
            return _resize_square(crop, image_size, interpolation), label, crop_seed
    else:
        # Mixed once before caching (the same order every epoch), so a class-sorted file list is mixed
        # beyond the shuffle buffer below.
        order = tf.random.experimental.stateless_shuffle(tf.range(len(paths), dtype=tf.int64), base_seed)
        shorter_side = cache_size or round(image_size / crop_fraction * _TRAIN_CACHE_MARGIN)
        decoded = tf.data.Dataset.from_tensor_slices(order).map(
            lambda index: (index, _shrink_for_cache(decode_image(tf.io.read_file(tf.gather(path_of, index))),
                                                    shorter_side)),
            num_parallel_calls)
        cached = _maybe_cache(decoded, cache, cache_settings)

        def epoch_examples(epoch):
            # A Python seed per epoch (Dataset.shuffle refuses a tensor seed when TF's global seed is 0), so the
            # order also depends on that global seed, which training sets from `seed` too.
            shuffle_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
            return cached.shuffle(shuffle_buffer, seed=shuffle_seed).map(
                lambda index, image: (tf.constant(epoch, tf.int64), index, image))

        def load_train(epoch, index, image):
            label = tf.gather(label_of, index)
            crop_seed = tf.random.experimental.stateless_fold_in(epoch_seed(epoch, 1), index)
            crop = _random_crop_image(image, crop_seed, scale)
            return _resize_square(crop, image_size, interpolation), label, crop_seed

    # (x / 255 - mean) / std as one multiply-add with image-shaped constants: broadcasting 3 channel
    # values costs Eigen more than the arithmetic (0.5 ms per 224 px image on these CPUs).
    full_shape = [image_size, image_size, 3]
    pixel_scale = tf.constant(np.broadcast_to(1 / (255 * np.asarray(std, np.float64)), full_shape), tf.float32)
    pixel_offset = tf.constant(np.broadcast_to(-np.asarray(mean, np.float64) / np.asarray(std), full_shape),
                               tf.float32)

    def load_and_finish(*example):
        image, label, crop_seed = load_train(*example)
        if flip:
            image = tf.image.stateless_random_flip_left_right(
                image, tf.random.experimental.stateless_fold_in(crop_seed, 1))
        if augmentation is None:  # elementwise, so per image it equals per batch, and runs in parallel
            image = image * pixel_scale + pixel_offset
        return image, label

    # Each epoch gives exactly steps * batch_size images, so batches never straddle two epochs.
    if cache is None:
        epochs = tf.data.Dataset.range(first_epoch, first_epoch + num_epochs)
        examples = epochs.flat_map(lambda epoch: epoch_examples(epoch).take(steps * batch_size))
    else:
        examples = functools.reduce(tf.data.Dataset.concatenate, [
            epoch_examples(epoch).take(steps * batch_size) for epoch in range(first_epoch, first_epoch + num_epochs)])
    part_start, part_size = 0, batch_size
    if part is not None:
        part_index, part_count = part
        if batch_size % part_count or not 0 <= part_index < part_count:
            raise DataError(f"make_dataset: part {part} must be one of equal slices of batch {batch_size}")
        part_size = batch_size // part_count
        part_start = part_index * part_size
        # Chosen by position before any image is read: each worker decodes only its own images.
        examples = examples.enumerate().filter(
            lambda position, example: (position % batch_size) // part_size == part_index).map(
            lambda position, example: example)
    dataset = examples.map(load_and_finish, num_parallel_calls).batch(part_size, drop_remainder=True)
    dataset = _labels_as(dataset, num_classes)
    whole = None if part is None else (part_start, batch_size)
    if augmentation is not None:
        if augment.mixes_labels(augmentation) and not num_classes:
            raise DataError("make_dataset: MixUp and CutMix mix labels; give num_classes for one-hot labels")

        def augment_and_normalise(position, batch):
            images, batch_labels = batch
            epoch, step = first_epoch + position // steps, position % steps
            seed = tf.random.experimental.stateless_fold_in(epoch_seed(epoch, 2), step)
            if num_classes:
                images, batch_labels = augment.augment_batch(augmentation, images, seed, batch_labels, part=whole)
            else:
                images = augment.augment_batch(augmentation, images, seed, part=whole)
            return _normalize(images, mean, std), batch_labels

        dataset = dataset.enumerate().map(augment_and_normalise, num_parallel_calls)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _labels_as(dataset, num_classes):
    """Batches with class indices, or with one-hot float32 rows when num_classes is given."""
    if not num_classes:
        return dataset
    return dataset.map(lambda images, labels: (images, tf.one_hot(labels, num_classes, dtype=tf.float32)))


def _maybe_cache(dataset, cache, settings):
    if cache is None:
        return dataset
    if cache == "memory":
        return dataset.cache()
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    prefix = pathlib.Path(cache)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    mode = "train" if settings["training"] else "eval"
    return dataset.cache(f"{prefix}_{mode}_{settings['image_size']}px_{digest}")
