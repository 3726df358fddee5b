"""Files written whole or not at all: a kill never leaves half a file where a good one was.

Every file or folder a run, an evaluation, a report, an ensemble, a
comparison, an export or the data check writes goes through `replace_into`:
written under a temporary name beside its destination (`.partial-<pid>-<name>`),
then renamed over it (a rename is atomic on one file system; a folder that
already exists is swapped with the new one in one step where Linux allows,
see `_exchange`). What a killed process left under such a name is removed by
the next write into the same folder (`remove_leftovers`): its pid is gone.
"""

import contextlib
import csv
import ctypes
import errno
import json
import os
import pathlib
import re
import shutil
import threading

from tfdogs import lock

_PARTIAL = re.compile(r"\.partial-(\d+)-")


def replace_into(path, write):
    """Writes through `write(temporary_path)`, then renames the result over `path`.

    Args:
        path: the destination file or folder; its parent is created.
        write: called with a temporary path beside `path`; writes a file or a folder there.

    Returns:
        `path`, as a `pathlib.Path`.
    """
    path, temporary = _beside(path)
    try:
        write(temporary)
        _put_in_place(temporary, path)
    finally:
        _remove(temporary)
    return path


def refuse_foreign_folder(path, written_by):
    """Raises ForeignFolderError unless `path` is absent, empty, or an earlier folder with `written_by` in it."""
    path = pathlib.Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / written_by).is_file())):
        raise ForeignFolderError(f"{path} already holds files and no {written_by}: it is not an earlier output "
                                 f"of this command, so it is left as it is; give another output folder.")


def _beside(path):
    """`path` and its temporary name, its folder made and tidied of what dead processes left."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent)
    temporary = path.with_name(f".partial-{os.getpid()}-{path.name}")
    _remove(temporary)  # this process's own, from a write that an exception cut short in a `finally`
    return path, temporary


def _put_in_place(temporary, path):
    if temporary.is_dir() and path.is_dir():
        _exchange(temporary, path)  # `temporary` now holds the old folder, which the caller removes
    else:
        os.replace(temporary, path)


class ForeignFolderError(Exception):
    """A command would replace a folder that holds files it did not write."""


@contextlib.contextmanager
def whole_folder(path, written_by):
    """A folder written whole: the block writes into a new temporary folder, which then replaces `path`.

    Until the block ends, `path` keeps its old content (or stays absent); an
    exception or Ctrl-C inside it leaves `path` as it was and nothing beside it.

    Args:
        path: the folder to write.
        written_by: the name of a file the block always writes (`evaluation.json`):
            an existing, non-empty `path` without it holds someone else's
            files, and is refused rather than replaced.

    Yields:
        The temporary folder (created, empty), a sibling of `path`: paths
        relative to it are those relative to `path`.

    Raises:
        ForeignFolderError: `path` holds files but no `written_by`.
    """
    refuse_foreign_folder(path, written_by)
    path = pathlib.Path(path)
    with lock.hold(path.with_name(f".{path.name}.lock"), str(path)):  # a second writer is refused, not mixed in
        path, temporary = _beside(path)
        temporary.mkdir()
        try:
            yield temporary
            _put_in_place(temporary, path)
        finally:
            _remove(temporary)


def remove_leftovers(folder, own=False):
    """Removes the `.partial-<pid>-*` files and folders in `folder` whose process has ended.

    Args:
        folder: the folder to tidy; nothing happens if it does not exist.
        own: also remove this process's own (an interrupted command tidying up).

    Returns:
        The names removed.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        match = _PARTIAL.match(entry.name)
        if match and (not _alive(int(match.group(1))) or (own and int(match.group(1)) == os.getpid())):
            _remove(entry)
            removed.append(entry.name)
    return removed


def _alive(pid):
    """Whether a process with this pid runs on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(new, old):
    """Swaps two folders in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`).

    Elsewhere, or on a file system without it: the old folder is first
    renamed aside, under a name `remove_leftovers` tidies, then the new one
    into place; a kill between the two renames leaves neither at `old`.
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        renameat2 = None
    if renameat2 is not None:
        at_cwd = -100  # AT_FDCWD: paths relative to the working directory
        if renameat2(at_cwd, os.fsencode(new), at_cwd, os.fsencode(old), _RENAME_EXCHANGE) == 0:
            return
        if ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(old))
    aside = pathlib.Path(old).with_name(f".partial-{os.getpid()}-old-{pathlib.Path(old).name}")
    os.replace(old, aside)
    os.replace(new, old)
    os.replace(aside, new)


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


# Writes running beside the main thread (`write_in_background`): each thread and what it raised.
_BACKGROUND_WRITES = []


def write_in_background(write, *args):
    """Starts `write(*args)` in a thread of its own and returns; `wait_for_writes` waits for it.

    For a large file whose contents are already copied out (a resume
    backup): the disk works while training goes on. The thread is not a
    daemon, so a process that ends normally or by an exception still
    finishes the file; `write` should put it in place whole (`replace_into`),
    so a kill leaves the previous file.
    """
    raised = []

    def run():
        try:
            write(*args)
        except BaseException as error:  # handed to the waiting thread, which raises it
            raised.append(error)

    thread = threading.Thread(target=run, name=f"tfdogs-{getattr(write, '__name__', 'write')}")
    thread.start()
    _BACKGROUND_WRITES.append((thread, raised))


def wait_for_writes():
    """Returns once every `write_in_background` of this process has finished; raises the first error one raised."""
    errors = []
    while _BACKGROUND_WRITES:
        thread, raised = _BACKGROUND_WRITES.pop(0)
        thread.join()
        errors += raised
    if errors:
        raise errors[0]


@contextlib.contextmanager
def writes_finished():
    """Leaving the block waits for `write_in_background`'s writes; their error is raised only if the block's was not."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            wait_for_writes()
        raise
    wait_for_writes()


def save_weights(model, path, copy_of=None):
    """The model's weights whole or not at all, without its optimizer's state.

    Keras 3's `save_weights` also writes a compiled model's optimizer variables
    (Adam's two moments: 3x the file); a checkpoint of the weights needs none
    (a resume backup keeps them: `tfdogs.training.resume.write_backup`).

    Args:
        model: the model.
        path: the weights file.
        copy_of: a weights file that holds exactly the model's weights (a phase's
            `BestCheckpoint.ended_with`), or None: copied where it exists, in
            0.04-0.07 s against 0.25-0.87 s to save ResNet-18's on a 2-core Xeon.
    """
    if copy_of is not None and pathlib.Path(copy_of).is_file():
        return replace_into(path, lambda temporary: shutil.copyfile(copy_of, temporary))
    remember_keras_skipsets()
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
    about 0.04 s of every ResNet-18 checkpoint and load (75 of
    them). Stored here under the name Keras reads, computed by Keras itself,
    once per process (again after `keras.backend.clear_session`).
    """
    from keras.src.backend.common import global_state
    from keras.src.saving import saving_lib

    for kind in _SAVED_KINDS:
        name = f"saving_attr_skiplist_{kind}"
        if global_state.get_global_attribute(name) is None:
            global_state.set_global_attribute(name, saving_lib.get_attr_skipset(kind))
