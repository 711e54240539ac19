"""How much memory is available now: what the verification's caps and the calibration's pieces are
sized against. Read by every layer, like :mod:`flashnorm_onnx.errors`."""

from __future__ import annotations

import os


def available_memory() -> int | None:
    """Bytes of memory available now: MemAvailable from /proc/meminfo, else os.sysconf; None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
