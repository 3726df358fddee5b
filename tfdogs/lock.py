"""One owner per output: an exclusive lock that a second process is refused, and a dead one's is taken over.

A lock is a small file holding who owns it (pid, host, command, start time),
locked with `fcntl.flock` for as long as the owner runs. The kernel releases
a flock when its process ends, however it ends (kill -9 included), so a lock
left by a dead process is free: the next owner takes it over and says whose
it was. Two processes started in the same instant cannot both hold it.

    with lock.hold(run_dir / lock.RUN_LOCK, f"run folder {run_dir}"):
        ...  # only this process writes the run folder

The file exists only while someone holds it, or after its owner was killed.
`flock` locks are advisory and local to one machine's kernel (and, on NFS,
not always shared between machines): a multi-worker run has only its chief
take the lock, and every tfdogs command that writes takes one.
"""

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import shlex
import socket
import sys
import time

RUN_LOCK = ".lock"  # inside a run folder


class LockedError(RuntimeError):
    """Another running process owns the output; the message names it."""


@contextlib.contextmanager
def hold(path, what):
    """Holds an exclusive lock on `path` for the block.

    Args:
        path: the lock file (created, with its folder, if missing).
        what: what the lock guards, for the messages ("run folder runs/a").

    Raises:
        LockedError: another live process holds it: one line with its pid, host, start time and command.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = _lock(path, what)
    try:
        earlier = _read(descriptor)
        if earlier.get("pid"):  # an owner that ended without letting go: killed
            print(f"Taking over {what} from {_describe(earlier)}, which is no longer running.", file=sys.stderr,
                  flush=True)
        _write(descriptor, {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.argv),
                            "started": datetime.datetime.now().isoformat(timespec="seconds")})
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # still held: whoever opens the name next makes a new file
    finally:
        os.close(descriptor)  # releases the flock


def _lock(path, what):
    """Opens and flocks the lock file; returns its descriptor.

    An owner removes the file as it lets go, so the file opened here may be
    one that was just removed: locked, it must still be the one at `path`,
    else the lock is taken again on the new file.
    """
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            facts = _owner_facts(descriptor)
            os.close(descriptor)
            raise LockedError(f"{what} is in use by {_describe(facts)}; wait for it to end, or stop it "
                              f"(a run resumes where it stopped).") from None
        try:
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)


def _owner_facts(descriptor, patience_s=2.0):
    """What the owner of a held lock wrote, waiting up to `patience_s` for an owner that has just taken it."""
    deadline = time.monotonic() + patience_s
    while not (facts := _read(descriptor)) and time.monotonic() < deadline:
        time.sleep(0.01)  # between its flock and its write: microseconds, unless the machine is loaded
    return facts


def owner(path):
    """Who holds the lock file `path` now, as written by its owner, or None when nobody does."""
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    descriptor = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(descriptor)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)


def _read(descriptor):
    os.lseek(descriptor, 0, os.SEEK_SET)
    text = b""
    while chunk := os.read(descriptor, 65536):
        text += chunk
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:  # written by an owner killed mid-write
        return {}


def _write(descriptor, facts):
    os.ftruncate(descriptor, 0)
    os.lseek(descriptor, 0, os.SEEK_SET)
    os.write(descriptor, json.dumps(facts).encode())


def _describe(facts):
    if not facts.get("pid"):
        return "another process (starting)"
    return (f"pid {facts['pid']} on {facts.get('host', '?')} since {facts.get('started', '?')} "
            f"({facts.get('command', '?')})")
