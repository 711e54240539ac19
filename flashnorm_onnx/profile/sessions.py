"""ONNX Runtime sessions as ``profile`` creates them: settings, the shared thread pool, options, providers."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from flashnorm_onnx.errors import InputModelError, ProviderUnavailable, first_line

logger = logging.getLogger(__name__)

DEFAULT_TARGET = 0.02
DEFAULT_BUDGET_S = 120.0
DEFAULT_MIN_RUNS = 32
DEFAULT_MAX_RUNS = 1000
DEFAULT_ROUNDS = 4  # fresh session pairs per shape (flashnorm_onnx/profile/rounds.py)


@dataclasses.dataclass
class Settings:
    provider: str = "cpu"
    runs: int | None = None  # a fixed number of pairs; None: adaptive (target, budget_s, min/max)
    warmup: int = 5
    cuda_graph: bool = False
    threads: int | None = None
    device_id: int = 0
    seed: int = 0
    target: float = DEFAULT_TARGET
    budget_s: float = DEFAULT_BUDGET_S
    min_runs: int = DEFAULT_MIN_RUNS
    max_runs: int = DEFAULT_MAX_RUNS
    rounds: int = DEFAULT_ROUNDS


def creation_order() -> tuple[str, str]:
    """Which of A and B gets its session, its runner and the first warm-up run first: drawn afresh
    in every measuring process (not from ``--seed``: with a fixed order, anything that treats the
    first- and second-created session differently favours the same model in every run)."""
    import random

    return ("A", "B") if random.SystemRandom().random() < 0.5 else ("B", "A")


# intra-op size of ORT's process-wide thread pool, once this module has created it
_shared_pool_size: int | None = None


def shared_pool(threads: int | None) -> bool:
    """Make both sessions use ORT's one process-wide intra-op pool of ``threads`` (0: ORT's
    default, one per physical core). The pool's size is fixed once per process: False when
    it already exists with another size (the caller then uses per-session pools)."""
    global _shared_pool_size
    import onnxruntime as ort

    size = int(threads or 0)
    if _shared_pool_size is None:
        ort.set_global_thread_pool_sizes(size, 1)
        _shared_pool_size = size
    return _shared_pool_size == size


def threading_description(settings: Settings) -> dict:
    shared = shared_pool(settings.threads)
    return {
        "intra_op_threads": settings.threads or f"ORT default ({_physical_cores()} physical cores)",
        "pool": "one pool shared by both sessions" if shared else
                "one pool per session, spinning off (the process's shared pool has another size)",
        "spinning": shared,
    }


def _physical_cores() -> int:
    try:
        cores = set()
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
                cores.add((phys, core))
        return len(cores) or (os.cpu_count() or 1)
    except OSError:
        return os.cpu_count() or 1


def session_options(settings: Settings, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures come back as exceptions
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if shared_pool(settings.threads):
        options.use_per_session_threads = False
    else:
        # two pools that spin would take each other's cores (see the docstring of flashnorm_onnx.profile)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if settings.threads:
            options.intra_op_num_threads = settings.threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def providers_for(settings: Settings) -> list:
    if settings.provider == "cuda":
        cuda = {
            "device_id": settings.device_id,
            "arena_extend_strategy": "kNextPowerOfTwo",
            "cudnn_conv_algo_search": "EXHAUSTIVE",
            "do_copy_in_default_stream": True,
        }
        if settings.cuda_graph:
            cuda["enable_cuda_graph"] = True
        return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def cuda_available_reason() -> str | None:
    """None when the CUDA provider is listed by this onnxruntime build; else why not."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"this onnxruntime build ({ort.__version__}, package "
                f"{_ort_package()}) has no CUDAExecutionProvider; install onnxruntime-gpu")
    return None


def _ort_package() -> str:
    import importlib.metadata

    for name in ("onnxruntime-gpu", "onnxruntime", "onnxruntime-directml", "onnxruntime-openvino"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def make_session(path: str | Path, settings: Settings, profile_prefix: str | None = None):
    """An InferenceSession on the requested provider; ProviderUnavailable when ORT fell back."""
    import onnxruntime as ort

    if settings.provider == "cuda":
        reason = cuda_available_reason()
        if reason:
            raise ProviderUnavailable(f"CUDA provider unavailable: {reason} (use --provider cpu, or --fallback-cpu)")
        if not logger.isEnabledFor(logging.DEBUG):
            ort.set_default_logger_severity(4)  # the failed-load log; the error below says it in one line
    try:
        session = ort.InferenceSession(str(path), session_options(settings, profile_prefix),
                                       providers=providers_for(settings))
    except Exception as e:
        msg = first_line(e)
        if settings.provider == "cuda" and ("CUDA" in msg or "cuda" in msg):
            raise ProviderUnavailable(f"CUDA provider failed for {path}: {msg}") from e
        raise InputModelError(f"ONNX Runtime cannot load {path}: {msg}") from e
    if settings.provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise ProviderUnavailable(
            "the CUDA provider could not load (ONNX Runtime fell back to "
            f"{', '.join(session.get_providers())}; it needs an NVIDIA GPU, CUDA 13 and cuDNN 9). "
            "Measure on CPU with --provider cpu, or add --fallback-cpu"
        )
    return session
