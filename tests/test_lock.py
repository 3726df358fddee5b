"""One owner per output: a second process is refused at once, a dead owner's lock is taken over."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from tfdogs import lock


def hold_until_killed(path, ready):
    with lock.hold(path, "run folder demo"):
        ready.set()
        time.sleep(60)


def race(path, barrier, results):
    barrier.wait()  # both processes leave the barrier together
    try:
        with lock.hold(path, "run folder demo"):
            results.put(("held", os.getpid()))
            time.sleep(2)
    except lock.LockedError as error:
        results.put(("refused", str(error)))


def test_two_processes_started_together_one_holds_and_the_other_is_refused_naming_it(tmp_path):
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=race, args=(tmp_path / ".lock", barrier, results)) for _ in range(2)]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    (held, holder), (refused, message) = outcomes
    assert (held, refused) == ("held", "refused")
    assert message.startswith(f"run folder demo is in use by pid {holder} on ") or \
        message.startswith("run folder demo is in use by another process (starting)")
    assert lock.owner(tmp_path / ".lock") is None  # let go at the end


def test_a_lock_left_by_a_killed_process_is_taken_over_and_said(tmp_path, capsys):
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    owner = context.Process(target=hold_until_killed, args=(tmp_path / ".lock", ready))
    owner.start()
    assert ready.wait(60)
    assert lock.owner(tmp_path / ".lock")["pid"] == owner.pid
    with pytest.raises(lock.LockedError, match=f"in use by pid {owner.pid}"):
        with lock.hold(tmp_path / ".lock", "run folder demo"):
            pass
    os.kill(owner.pid, signal.SIGKILL)
    owner.join()
    with lock.hold(tmp_path / ".lock", "run folder demo"):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert capsys.readouterr().err.startswith(f"Taking over run folder demo from pid {owner.pid} on ")
    with lock.hold(tmp_path / ".lock", "run folder demo"):  # let go cleanly last time: nothing to say
        pass
    assert capsys.readouterr().err == ""
