"""On-disk layouts: the Kaggle folder and class folders, read into `Records`."""

import csv
import dataclasses
import os
import pathlib
import re

import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})

LAYOUTS_HELP = (
    "Expected either the Kaggle layout (labels.csv with header 'id,breed' beside "
    "train/<id>.jpg) or class folders (<dir>/<breed>/*.jpg, or one level down as in "
    "Stanford Dogs' Images/n02085620-Chihuahua/*.jpg)."
)


_WORDNET_PREFIX = re.compile(r"n\d{8}-(.+)")


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
            f"{pathlib.Path(records.root) / 'labels.csv'} are missing: {preview(missing)}")
    raise DataError(
        f"{len(problems)} problems in {records.root}: {preview([str(p) for p in problems], 3)}. "
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
        outside = outside_reason(path, root)
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


def outside_reason(path, root):
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
    candidates = [child for child in subdirectories(root) if _class_folders(child)]
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
        f"found: {preview(entries) if entries else 'nothing (empty directory)'}. {LAYOUTS_HELP}"
    )


def _folder_records(root, class_root):
    folders_by_name = {}
    # A breed folder's photos may sit in sub-folders of it (beagle/2019/*.jpg); they all count.
    for folder in (sub for sub in subdirectories(class_root) if images_in(sub)):
        name = breed_name(folder.name)
        if name in folders_by_name:
            raise DataError(
                f"class folders {folders_by_name[name]} and {folder} both give the breed name {name!r}"
            )
        folders_by_name[name] = folder
    paths, breeds, problems = [], [], []
    for name in sorted(folders_by_name):
        for path in images_in(folders_by_name[name]):
            outside = outside_reason(path, root)
            if outside:
                problems.append(Problem(path.relative_to(root).as_posix(), None, "outside", "skipped", outside))
            else:
                paths.append(str(path))
                breeds.append(name)
    class_names = sorted(set(breeds))
    index = {name: i for i, name in enumerate(class_names)}
    return Records(paths, [index[b] for b in breeds], class_names, "folders", str(root)), problems


def breed_name(folder_name):
    """`n02085620-Chihuahua` -> `chihuahua` (the Kaggle name); other names unchanged."""
    match = _WORDNET_PREFIX.fullmatch(folder_name)
    return match.group(1).lower() if match else folder_name


def subdirectories(directory):
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def images_in(folder):
    """The images in `folder` and its sub-folders (hidden ones left out), sorted by path; links to folders not followed."""
    found = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        found += [path for path in map(pathlib.Path(directory).joinpath, files) if is_image(path)]
    return sorted(found, key=lambda path: path.relative_to(folder).parts)


def _class_folders(directory):
    return [sub for sub in subdirectories(directory) if any(is_image(p) for p in sub.iterdir())]


def is_image(path):
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def preview(items, limit=5):
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
