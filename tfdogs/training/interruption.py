"""Ctrl-C and SIGTERM during training: one line that says where the run is and how to resume it.

Every file of a run is written under a temporary name and renamed (see
`tfdogs.train`), so a stop at any moment loses at most the epoch under way;
the same command with the same `--output` resumes. `python -m tfdogs.train`
turns SIGTERM (what `kill`, job schedulers and container runtimes send) into
the same clean stop as Ctrl-C: `signals_interrupt` raises KeyboardInterrupt
for it, and `stopped` tidies up and prints the line instead of a traceback.
"""

import contextlib
import functools
import os
import pathlib
import shlex
import signal
import sys

from tfdogs import files

# Exit status of a process ended by a signal, as shells report it: 128 + the signal number.
EXIT_STATUS = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


@contextlib.contextmanager
def signals_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt("SIGTERM"), as Ctrl-C raises KeyboardInterrupt."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stops_in_one_line(main):
    """Makes a command's `main(argv)` end on Ctrl-C or SIGTERM with one line and 130 or 143, no traceback.

    Every command writes its outputs whole (`tfdogs.files`), so an earlier
    output stands as it was and the new one is either complete or absent. A
    folder it may not write in (read-only, another user's) also ends it with
    one line naming the folder, and 2.
    """
    command = f"python -m {main.__module__}"

    @functools.wraps(main)
    def main_stopping_in_one_line(argv=None):
        try:
            with signals_interrupt():
                return main(argv)
        except PermissionError as error:
            if error.filename is None:
                raise
            folder = pathlib.Path(error.filename).parent
            print(f"error: cannot write in {folder} ({error.strerror}); give an output folder you can write to.",
                  file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt as interrupt:
            name = "SIGTERM" if interrupt.args[:1] == ("SIGTERM",) else "SIGINT"
            print(f"Stopped by {'Ctrl-C' if name == 'SIGINT' else name}: {command} left its earlier outputs as they "
                  f"were and wrote no partial one.", file=sys.stderr, flush=True)
            return EXIT_STATUS[name]

    return main_stopping_in_one_line


def stopped(interrupt, command, run_dir=None, export_dir=None, total_epochs=None, kept_epochs=0):
    """Ends an interrupted training run: removes empty folders, prints one line, gives the exit status.

    Args:
        interrupt: The KeyboardInterrupt (its argument "SIGTERM" for SIGTERM, else Ctrl-C).
        command: The command line that resumes the run, as a list of words.
        run_dir: The run folder, when it was known.
        export_dir: The SavedModel base folder, when it was known.
        total_epochs: The run's epochs, for the message.
        kept_epochs: The epochs a resumed run keeps (see `tfdogs.train.resume_epoch`).

    Returns:
        130 (SIGINT) or 143 (SIGTERM).
    """
    # A second Ctrl-C while tidying up must not leave a traceback; the handlers come back after it, so a
    # process that goes on (a notebook, a test session) still stops on the next one.
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _tidy_and_say(interrupt, command, run_dir, export_dir, total_epochs, kept_epochs)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _tidy_and_say(interrupt, command, run_dir, export_dir, total_epochs, kept_epochs):
    """`stopped`'s work, with the signals ignored."""
    name = "SIGTERM" if interrupt.args[:1] == ("SIGTERM",) else "SIGINT"
    where = "before training started"
    if run_dir is not None:
        run_dir = pathlib.Path(run_dir)
        if export_dir is not None:
            files.remove_leftovers(export_dir, own=True)
            _remove_empty_folders(pathlib.Path(export_dir))
        files.remove_leftovers(run_dir, own=True)
        if (run_dir / "metrics.json").is_file():
            where = f"after training, while finishing {run_dir}"
        elif kept_epochs:
            where = f"after {kept_epochs} of {total_epochs} epochs in {run_dir}"
        elif (run_dir / "config.yaml").is_file():
            where = f"during the first epoch in {run_dir}"
        _remove_empty_folders(run_dir)
    if sys.stdout.isatty():
        print(file=sys.stdout, flush=True)  # off the progress bar's line
    print(f"Stopped by {'Ctrl-C' if name == 'SIGINT' else name} {where}; nothing saved was lost "
          f"(every file is replaced whole). Resume with: {shlex.join(command)}", file=sys.stderr, flush=True)
    return EXIT_STATUS[name]


def _remove_empty_folders(folder):
    """Removes `folder`, the folders under it and, for a relative path, the ones above it that hold no file.

    A relative path's folders above (the default `runs/`, `saved_models/`) were made for this run.
    """
    if not folder.is_dir():
        return
    for directory, _, _ in sorted(os.walk(folder), key=lambda entry: -len(pathlib.Path(entry[0]).parts)):
        with contextlib.suppress(OSError):
            os.rmdir(directory)  # refuses a folder that still holds anything
    if not folder.is_absolute():
        for parent in list(folder.parents)[:-1]:  # the last one is "."
            with contextlib.suppress(OSError):
                os.rmdir(parent)
