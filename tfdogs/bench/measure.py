"""Throughput and peak-memory measurement, shared by `tfdogs.bench` and `benchmarks/`.

Standard library only: the PyTorch scripts under `benchmarks/` run in another
virtual environment (one without TensorFlow) and import this file by path.

Example:
    timing = Timing(warmup_steps=2, window_steps=5, windows=4)
    with PeakMemory() as memory:
        result = throughput(lambda steps: run(steps), items_per_step=32, timing=timing)
    print(result["images_per_second"], memory.peak_mb)
"""

import dataclasses
import os
import resource
import statistics
import sys
import threading
import time


@dataclasses.dataclass(frozen=True)
class Timing:
    """How long to measure: untimed warm-up steps, then `windows` timed windows of `window_steps`."""

    warmup_steps: int = 2
    window_steps: int = 5
    windows: int = 5

    def __post_init__(self):
        if self.warmup_steps < 0 or self.window_steps < 1 or self.windows < 1:
            raise ValueError(f"Timing needs warmup_steps >= 0, window_steps >= 1, windows >= 1; got {self}.")


def throughput(run_steps, items_per_step, timing, synchronize=None):
    """Median items per second over timed windows, after a warm-up.

    Args:
        run_steps: `run_steps(n)` runs n steps and returns when they are done.
        items_per_step: images per step (the batch size).
        timing: a `Timing`.
        synchronize: called at the end of each window before the clock is
            read (for asynchronous devices, e.g. `torch.cuda.synchronize`).

    Returns:
        {"images_per_second": median over windows, "spread_percent": (max - min) / median
        in percent, "windows": per-window images per second}.
    """
    synchronize = synchronize or (lambda: None)
    if timing.warmup_steps:
        run_steps(timing.warmup_steps)
    synchronize()
    rates = []
    for _ in range(timing.windows):
        started = time.perf_counter()
        run_steps(timing.window_steps)
        synchronize()
        rates.append(timing.window_steps * items_per_step / (time.perf_counter() - started))
    median = statistics.median(rates)
    return {"images_per_second": median,
            "spread_percent": 100 * (max(rates) - min(rates)) / median,
            "windows": rates}


def _rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:  # the process ended between listing and reading
        pass
    return 0


def _children(pid):
    """Child processes started by a process's main thread (Linux), e.g. DataLoader workers.

    Only the main thread's list is read: reading every thread's (TensorFlow
    runs dozens) many times a second would itself cost measurable CPU time.
    """
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except OSError:
        return []


def _tree_rss_kib(pid):
    return _rss_kib(pid) + sum(_tree_rss_kib(child) for child in _children(pid))


class PeakMemory:
    """Peak resident memory (MiB) of this process and its child processes while the block runs.

    On Linux the process's own high-water mark is reset on entry (so earlier
    work does not count) and its children's memory is sampled every
    `interval` seconds and added. Elsewhere it falls back to the process's
    lifetime peak (`ru_maxrss`).
    """

    def __init__(self, interval=0.05):
        self.interval = interval
        self.peak_mb = None
        self._peak_kib = 0
        self._done = threading.Event()
        self._linux = os.path.exists("/proc/self/status")

    def __enter__(self):
        if self._linux:
            try:  # "5" resets VmHWM, the kernel's record of peak resident memory.
                with open("/proc/self/clear_refs", "w") as clear:
                    clear.write("5")
            except OSError:
                pass
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        pid = os.getpid()
        while not self._done.wait(self.interval):
            self._peak_kib = max(self._peak_kib, _tree_rss_kib(pid))

    def __exit__(self, *exc_info):
        if self._linux:
            self._done.set()
            self._thread.join()
            own_peak = _status_kib("VmHWM")
            children = sum(_tree_rss_kib(child) for child in _children(os.getpid()))
            self._peak_kib = max(self._peak_kib, own_peak + children)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self._peak_kib = peak / 1024 if sys.platform == "darwin" else peak  # macOS counts bytes
        self.peak_mb = self._peak_kib / 1024
        return False


def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0
