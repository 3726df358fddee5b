"""Where a run's seconds go: start-up, data, model, each phase, evaluation, export (metrics.json's `seconds`)."""

import os
import pathlib
import time


class Timer:
    """Seconds spent in each part of a run: metrics.json's `seconds`, and the run's last line.

    The process's start-up (imports included) belongs to its first run alone: a
    later run in the same process (`--folds`' second fold, a test) counts 0.
    """

    _start_up_counted = False

    def __init__(self):
        start_up = 0.0 if Timer._start_up_counted else process_age()
        Timer._start_up_counted = True
        self.seconds = {"start_up": start_up}
        self._mark = time.perf_counter()

    def lap(self, part, phase=None):
        """Adds the seconds since the last lap to `part` (to `phases[phase]` when a phase is named)."""
        now = time.perf_counter()
        elapsed, self._mark = now - self._mark, now
        if phase is None:
            self.seconds[part] = self.seconds.get(part, 0.0) + elapsed
        else:
            self.seconds.setdefault(part, {})[phase] = self.seconds.get(part, {}).get(phase, 0.0) + elapsed

    def summary(self):
        rounded = {part: ({name: round(value, 2) for name, value in seconds.items()} if isinstance(seconds, dict)
                          else round(seconds, 2)) for part, seconds in self.seconds.items()}
        total = sum(sum(value.values()) if isinstance(value, dict) else value for value in self.seconds.values())
        return {**rounded, "total": round(total, 2)}


def process_age():
    """Seconds since this process started (Python's and TensorFlow's imports included); 0.0 where unknown."""
    try:
        ticks = int(pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(pathlib.Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0
