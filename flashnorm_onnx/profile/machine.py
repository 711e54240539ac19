"""Description of the machine a profile ran on: platform, CPU, ONNX Runtime build, GPU."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

from flashnorm_onnx.profile.sessions import _ort_package


def machine_info(provider: str, sessions: list) -> dict:
    import onnxruntime as ort

    info = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_package": _ort_package(),
        "available_providers": ort.get_available_providers(),
        "session_providers": sorted({p for s in sessions for p in s.get_providers()}),
        "gpu": None,
    }
    if provider == "cuda":
        info["gpu"] = gpu_info()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_info() -> dict | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except Exception:
        return None
    if not out:
        return None
    name, driver, memory = (part.strip() for part in (out[0].split(",") + ["", "", ""])[:3])
    return {"name": name, "driver": driver, "memory": memory}
