"""The validation pass over a photo directory, before any training.

Real photo collections are messy: PNGs named `.jpg`, CMYK JPEGs, truncated
downloads, empty files, labels.csv rows without an image. Every training run
passes its data through `check_data` first, and the same pass runs alone:

    python -m tfdogs.check --data-dir path/to/dog-breed-identification
    python -m tfdogs.check --data-dir path/to/class-folders --strict --report problems.csv

Each file ends in one of three states, and every problem is listed with the
file, the labels.csv line where there is one, and the reason:

- kept: TensorFlow decodes it correctly as it is (any JPEG, PNG, GIF, BMP or
  WebP, whatever its extension says); odd but harmless traits are noted
  (grayscale, alpha dropped, wrong extension, tiny).
- converted: Pillow decodes it but TensorFlow cannot, or not correctly (CMYK
  JPEG, palette BMP, TIFF named .jpg, anything TensorFlow fails on), or it is
  larger than `MAX_SIDE` pixels a side (a 10,000 x 8,000 photo costs 240 MB
  decoded and about 1 GB to resize, per parallel reader). A training run
  writes one RGB copy per such file to `<run>/converted/` (PNG, or JPEG
  quality 95 when shrunk) and trains on it, so the tf.data pipeline only
  ever reads files TensorFlow decodes.
- skipped: empty, not an image, truncated or corrupt, too large even for
  Pillow's decompression-bomb guard, unreadable, or a labels.csv problem
  (see `tfdogs.data.scan_records`).

Byte-identical files (the Kaggle and Stanford Dogs photos come from ImageNet,
which holds exact copies under different names) are kept and listed as
duplicate photos, or as a labelling conflict when their breeds differ; the
report's `groups` lets the split keep each group on one side.

A run fails only when nothing usable remains, or with `--strict` when
anything would be skipped. Nothing outside the data directory is opened.
Cost: every kept image is decoded once by TensorFlow (in parallel, a few
milliseconds per photo), which is what guarantees that a long run never stops
at a bad file in its tenth hour.
"""

import dataclasses
import hashlib
import os
import pathlib
import re
from concurrent import futures

import numpy as np

from tfdogs import files
from tfdogs.data.inspection import MAX_SIDE, convert, converted_name, inspect_files
from tfdogs.data.layouts import DataError, Problem, Records, scan_records

_PROBLEMS_COLUMNS = ["file", "line", "kind", "action", "reason"]


@dataclasses.dataclass(frozen=True, eq=False)
class Report:
    """What the validation pass found.

    Attributes:
        records: The usable images, as their original files.
        sources: Per record, the file the pipeline reads: the original, or its
            converted copy (when `check_data` was given a folder for them).
        problems: Every problem found, in data-directory order.
        groups: Per record, the id of its group of byte-identical files: the
            index of the group's first record (a file without a copy is alone
            in its group). `stratified_split(..., groups=report.groups)`
            keeps each group on one side of the split.
        digests: Per record, the SHA-256 of its bytes (hex): what `split.csv`
            records, so that a resumed run or an evaluation knows the photos by
            content.
    """

    records: Records
    sources: list[str]
    problems: list[Problem]
    groups: np.ndarray
    digests: list[str]

    @property
    def skipped(self) -> list[Problem]:
        return [problem for problem in self.problems if problem.action == "skipped"]

    @property
    def duplicate_groups(self) -> list[list[int]]:
        """Record indices of each group of two or more byte-identical files."""
        members = {}
        for index, group in enumerate(self.groups.tolist()):
            members.setdefault(group, []).append(index)
        return [indices for indices in members.values() if len(indices) > 1]

    @property
    def similar_breeds(self) -> list[list[tuple[str, int]]]:
        """Each group of breed names that `comparable_breed_name` makes equal: [(name, photos), ...]."""
        counts = np.bincount(self.records.labels, minlength=len(self.records.class_names))
        spellings = {}
        for label, name in enumerate(self.records.class_names):
            spellings.setdefault(comparable_breed_name(name), []).append((name, int(counts[label])))
        return [group for group in spellings.values() if len(group) > 1]

    def decodable_records(self) -> Records:
        """The usable records with each path replaced by the file the pipeline should read."""
        return dataclasses.replace(self.records, paths=list(self.sources))

    def summary(self) -> str:
        files = {action: len({p.where for p in self.problems if p.action == action})
                 for action in ("skipped", "converted", "kept")}
        duplicates = self.duplicate_groups
        copies = f"{len(duplicates)} group{'' if len(duplicates) == 1 else 's'} of byte-identical photos"
        if duplicates:
            copies += f" ({sum(map(len, duplicates))} files, each group kept on one side of the split)"
        names = ""
        if self.similar_breeds:
            names = (f"; {len(self.similar_breeds)} probable duplicate breed name"
                     f"{'' if len(self.similar_breeds) == 1 else 's'} (same name but for case, spaces, hyphens "
                     f"or underscores): {'; '.join(map(_spellings, self.similar_breeds))}")
        return (f"{len(self.records.paths)} usable images in {len(self.records.class_names)} breeds; "
                f"{files['skipped']} files or rows skipped, {files['converted']} converted, "
                f"{files['kept']} kept with a note; {copies}{names}")

    def write_csv(self, path) -> None:
        """Writes the problems as CSV (file, line, kind, action, reason), atomically."""
        files.write_csv(path, _PROBLEMS_COLUMNS, ([p.file, "" if p.line is None else p.line, p.kind, p.action,
                                                   p.reason] for p in self.problems))

    def require_clean(self) -> None:
        """Raises DataError listing what would be skipped, or probable duplicate breed names (the --strict rule)."""
        if self.skipped:
            raise DataError(
                f"strict: {len(self.skipped)} problems would skip data in {self.records.root}: "
                f"{_listing(self.skipped)}")
        if self.similar_breeds:
            raise DataError(
                f"strict: breed names in {self.records.root} differ only in case, spaces, hyphens or underscores, "
                f"so they are probably one breed each: {'; '.join(map(_spellings, self.similar_breeds))}. "
                "Write each breed one way.")

    def require_trainable(self, val_fraction) -> None:
        """Raises DataError, naming the breeds, unless there are two breeds and each can give a validation photo.

        Args:
            val_fraction: The validation share asked for; every breed then needs two photos.
        """
        counts = np.bincount(self.records.labels, minlength=len(self.records.class_names))
        if len(self.records.class_names) < 2:
            found = ", ".join(f"{name!r} ({count} photos)" for name, count in zip(self.records.class_names, counts))
            raise DataError(
                f"{self.records.root} has one breed ({found}); a classifier needs photos of at least two breeds")
        alone = [f"{name!r}" for name, count in zip(self.records.class_names, counts) if count < 2]
        if alone and val_fraction > 0:
            raise DataError(
                f"breed{'s' if len(alone) > 1 else ''} {', '.join(alone)} in {self.records.root} "
                f"{'have' if len(alone) > 1 else 'has'} a single usable photo, but the validation split "
                f"(val_fraction {val_fraction}) needs at least two photos of every breed; add photos or remove "
                "the breed")


def check_data(data_dir, converted_dir=None, max_side=MAX_SIDE, verbose=1) -> Report:
    """Validates a data directory: labels, then every image's content.

    Args:
        data_dir: Kaggle-layout or class-folder directory (see `tfdogs.data`).
        converted_dir: Where to write RGB copies of the files TensorFlow cannot
            decode correctly; None only checks that Pillow can decode them.
            Copies are named by the file's path, size and modification time,
            so a resumed run reuses them.
        max_side: Longer-side limit above which images are shrunk.
        verbose: 0 hides the progress bar over the decoding pass (shown on a
            terminal for a few hundred photos or more, see `tfdogs.progress`).

    Returns:
        The report: usable records, the file to read for each, every problem.

    Raises:
        DataError: The directory cannot be read as a data set, or no usable
            image remains (the message lists the problems).
    """
    records, problems = scan_records(data_dir)
    root = pathlib.Path(records.root)
    # TensorFlow must decode every file the pipeline will read as it is, with the size Pillow reports.
    inspections = inspect_files(records.paths, max_side, verbose)

    to_convert = [i for i, inspection in enumerate(inspections) if inspection.action == "converted"]
    with futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        converted = pool.map(lambda i: convert(pathlib.Path(records.paths[i]), root, converted_dir, max_side),
                             to_convert)
        sources = list(records.paths)
        for index, (target, error) in zip(to_convert, converted):
            if error is None:
                sources[index] = target or sources[index]
            else:
                inspections[index].skip("corrupt", f"cannot be decoded, so it is probably truncated or corrupt "
                                                   f"({error})")

    usable = []
    for index, (path, inspection) in enumerate(zip(records.paths, inspections)):
        file = pathlib.Path(path).relative_to(root).as_posix()
        problems += [Problem(file, None, kind, inspection.action, reason) for kind, reason in inspection.notes]
        if inspection.action != "skipped":
            usable.append(index)
    records, sources, class_problems = _keep(records, sources, usable)
    problems += class_problems
    digests, groups, duplicate_problems = _duplicates(records)
    problems += duplicate_problems + _similar_breed_problems(records)
    report = Report(records, sources, sorted(problems, key=_order), groups, digests)
    if not records.paths:
        raise DataError(
            f"no usable image in {root}: {len(report.skipped)} problems, {_listing(report.skipped)}")
    return report


def _order(problem):
    return (problem.file != "labels.csv", problem.file, problem.line or 0)


def _keep(records, sources, usable):
    """Records restricted to `usable`, breeds left without images dropped and reported."""
    kept_labels = records.labels[usable]
    present = sorted(set(kept_labels.tolist()))
    problems = []
    for label, name in enumerate(records.class_names):
        if label not in present:
            first = next(p for p, l in zip(records.paths, records.labels) if l == label)
            where = ("labels.csv" if records.layout == "kaggle"
                     else pathlib.Path(first).parent.relative_to(records.root).as_posix())
            problems.append(Problem(where, None, "breed-without-images", "skipped",
                                         f"breed {name!r} has no usable image; left out of the classes"))
    relabel = {old: new for new, old in enumerate(present)}
    kept = Records([records.paths[i] for i in usable], [relabel[label] for label in kept_labels.tolist()],
                        [records.class_names[label] for label in present], records.layout, records.root)
    return kept, [sources[i] for i in usable], problems


def comparable_breed_name(name) -> str:
    """A breed name as names are compared: case-folded, without spaces, hyphens or underscores.

    `Golden Retriever`, `golden-retriever` and `GOLDEN_RETRIEVER` compare
    equal. Breeds keep the names as written; equal names are reported as
    probable duplicates and refused by --strict.
    """
    return re.sub(r"[\s_-]+", "", name.casefold())


def _spellings(group):
    return " and ".join(f"{name!r} ({count} photo{'' if count == 1 else 's'})" for name, count in group)


def _similar_breed_problems(records):
    """One problem per breed name that compares equal to another one (see `comparable_breed_name`)."""
    root = pathlib.Path(records.root)
    spellings = {}
    for label, name in enumerate(records.class_names):
        spellings.setdefault(comparable_breed_name(name), []).append(label)
    counts = np.bincount(records.labels, minlength=len(records.class_names))
    problems = []
    for labels in (labels for labels in spellings.values() if len(labels) > 1):
        group = [(records.class_names[label], int(counts[label])) for label in labels]
        for label in labels:
            if records.layout == "kaggle":
                where = "labels.csv"
            else:
                paths = [path for path, own in zip(records.paths, records.labels) if own == label]
                where = pathlib.Path(os.path.commonpath([os.path.dirname(path) for path in paths]))
                where = where.relative_to(root).as_posix()
            problems.append(Problem(
                where, None, "similar-breed-names", "kept",
                f"breed {records.class_names[label]!r}: the names {_spellings(group)} differ only in case, spaces, "
                f"hyphens or underscores, so they are probably one breed; kept as {len(group)} classes "
                "(write them one way to merge them; --strict refuses them)"))
    return problems


def _duplicates(records):
    """Groups byte-identical files (SHA-256 of their bytes) and lists each group of two or more.

    Kaggle's and Stanford Dogs' photos come from ImageNet, which holds exact
    copies under different names; a copy on each side of the split would be
    validated on after being trained on.

    Returns:
        (SHA-256 per record in hex, group id per record: the index of the group's first record, problems).
    """
    with futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(file_digest, records.paths))
    members_of = {}
    for index, digest in enumerate(digests):
        members_of.setdefault(digest, []).append(index)
    groups = np.array([members_of[digest][0] for digest in digests], np.int64)
    root = pathlib.Path(records.root)
    files = [pathlib.Path(path).relative_to(root).as_posix() for path in records.paths]
    problems = []
    for members in (members for members in members_of.values() if len(members) > 1):
        breeds = {index: records.class_names[records.labels[index]] for index in members}
        for index in members:
            others = [i for i in members if i != index]
            if len(set(breeds.values())) == 1:
                kind, reason = "duplicate-photo", (
                    f"byte-identical to {', '.join(files[i] for i in others)}; all {len(members)} copies "
                    "are kept and go to the same side of the split")
            else:
                kind, reason = "duplicate-photo-conflict", (
                    f"labelled {breeds[index]!r}, but byte-identical to "
                    f"{', '.join(f'{files[i]} ({breeds[i]!r})' for i in others)}: a labelling conflict; "
                    f"all {len(members)} copies are kept as labelled and go to the same side of the split")
            problems.append(Problem(files[index], None, kind, "kept", reason))
    return digests, groups, problems


def file_digest(path):
    """The SHA-256 of a file's bytes, in hex."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def with_converted_copies(records, converted_dir) -> Records:
    """The records with each file a training run converted replaced by its copy.

    For tools that re-read a run's photos from its `split.csv` (evaluation,
    prediction): they then read what training read. Copies are found by name
    (path, size and modification time of the original); other files stay.

    Args:
        records: Records whose paths are original files under records.root.
        converted_dir: The run's `converted/` folder.
    """
    root, folder = pathlib.Path(records.root), pathlib.Path(converted_dir)
    paths = []
    for path in map(pathlib.Path, records.paths):
        stem = folder / converted_name(path, root)
        copies = [copy for copy in (stem.with_suffix(".png"), stem.with_suffix(".jpg")) if copy.is_file()]
        paths.append(str(copies[0]) if copies else str(path))
    return dataclasses.replace(records, paths=paths)


def _listing(problems, limit=10):
    shown = "; ".join(str(problem) for problem in problems[:limit])
    more = f"; ... and {len(problems) - limit} more (python -m tfdogs.check lists them all)" \
        if len(problems) > limit else ""
    return shown + more
