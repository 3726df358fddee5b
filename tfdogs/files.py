"""Files written whole or not at all: a kill never leaves half a file where a good one was.

Every file or folder a run, an export or the data check writes goes through
`replace_into`: written under a temporary name beside its destination, then
renamed over it (a rename is atomic on one file system).
"""

import csv
import json
import os
import pathlib
import shutil


def replace_into(path, write):
    """Writes through `write(temporary_path)`, then renames the result over `path`.

    Args:
        path: the destination file or folder; its parent is created.
        write: called with a temporary path beside `path`; writes a file or a folder there.

    Returns:
        `path`, as a `pathlib.Path`.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".partial-{os.getpid()}-{path.name}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        raise
    return path


def write_csv(path, header, rows):
    """Writes a CSV file (UTF-8, a header line, then `rows`) whole or not at all."""
    def write(temporary):
        with open(temporary, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(header)
            writer.writerows(rows)

    return replace_into(path, write)


def write_json(value, path):
    """Writes `value` as indented JSON whole or not at all."""
    return replace_into(path, lambda temporary: temporary.write_text(json.dumps(value, indent=2)))


def save_weights(model, path):
    """The model's weights, without its optimizer's state, whole or not at all.

    Keras 3's `save_weights` also writes a compiled model's optimizer variables
    (Adam's two moments: 3x the file); a checkpoint of the weights needs none,
    and only a resume backup keeps them.
    """
    optimizer = getattr(model, "optimizer", None)
    model.optimizer = None
    try:
        return replace_into(path, model.save_weights)
    finally:
        model.optimizer = optimizer


def save_model(model, path):
    """`model.save(path)` whole or not at all."""
    return replace_into(path, model.save)
