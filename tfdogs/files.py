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


def save_weights(model, path, optimizer_state=False):
    """The model's weights whole or not at all; its optimizer's state only with `optimizer_state`.

    Keras 3's `save_weights` also writes a compiled model's optimizer variables
    (Adam's two moments: 3x the file); a checkpoint of the weights needs none,
    and only a resume backup keeps them (`optimizer_state=True`).
    """
    remember_keras_skipsets()
    if optimizer_state:
        return replace_into(path, model.save_weights)
    optimizer = getattr(model, "optimizer", None)
    model.optimizer = None
    try:
        return replace_into(path, model.save_weights)
    finally:
        model.optimizer = optimizer


def save_model(model, path):
    """`model.save(path)` whole or not at all."""
    remember_keras_skipsets()
    return replace_into(path, model.save)


# The kinds of objects a tfdogs model, its optimizer, metrics and loss are saved as (`_obj_type()`).
_SAVED_KINDS = ("Operation", "Layer", "Functional", "Sequential", "Metric", "Optimizer", "Loss")


def remember_keras_skipsets():
    """Makes Keras keep the attribute lists it skips when saving and loading, as it means to.

    For every layer, optimizer, metric and loss of a model it saves or loads,
    Keras 3 (`saving_lib.get_attr_skipset`) lists the attributes not to visit
    by building a reference object of its kind. It stores the list for next
    time under another name (`saving_attr_skipset_<kind>`) than it looks up
    (`saving_attr_skiplist_<kind>`), so it builds them again every time:
    about 0.04 s of every ResNet-18 checkpoint, backup and load (75 of
    them). Stored here under the name Keras reads, computed by Keras itself,
    once per process (again after `keras.backend.clear_session`).
    """
    from keras.src.backend.common import global_state
    from keras.src.saving import saving_lib

    for kind in _SAVED_KINDS:
        name = f"saving_attr_skiplist_{kind}"
        if global_state.get_global_attribute(name) is None:
            global_state.set_global_attribute(name, saving_lib.get_attr_skipset(kind))
