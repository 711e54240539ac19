"""Other load on the machine while measuring: load average and the CPU time other processes used."""

from __future__ import annotations

import os
import time
from pathlib import Path


def _cpu_ticks() -> tuple[float, float] | None:
    """(busy seconds of all CPUs, seconds of this process) now; None where /proc/stat is absent."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in fields]
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = (sum(ticks[:8]) - idle) / hz  # user nice system idle iowait irq softirq steal
    t = os.times()
    return busy, t.user + t.system


class LoadMonitor:
    """Load average before/after and the CPU other processes used while measuring."""

    # more than this many cores' worth of other work on average is reported as competition
    THRESHOLD_CORES = 0.25

    def __init__(self):
        self.load_before = _loadavg()
        self._start = _cpu_ticks()
        self._t0 = time.perf_counter()

    def finish(self) -> dict:
        end = _cpu_ticks()
        elapsed = time.perf_counter() - self._t0
        other = None
        if self._start and end and elapsed > 0:
            other = max(0.0, ((end[0] - self._start[0]) - (end[1] - self._start[1])) / elapsed)
        record = {"load_before": self.load_before, "load_after": _loadavg(),
                  "other_cores_busy": None if other is None else round(other, 3)}
        record["competed"] = other is not None and other > self.THRESHOLD_CORES
        return record


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None
