"""Latency comparison of two ONNX models (baseline A, candidate B) in ONNX Runtime.

Used by ``flashnorm-onnx profile``. The method:

* Inputs are generated as ``optimize``'s verification does (:mod:`flashnorm_onnx.inputs`):
  token ids within the vocabulary, masks of ones, positions after the past. A shape with a
  ``past`` length runs one step on a KV cache of that length (only for models with cache
  inputs; others skip it, with the reason).
* Both sessions are created in one process with the same options and share ONE intra-op
  thread pool (ORT's process-wide pool, ``use_per_session_threads = False``). With a pool per
  session, the workers of the session that just ran keep spinning
  (``session.intra_op.allow_spinning``, on by default) while the other session runs, and on a
  machine with few cores they take its cores: measured on SmolLM2 (2 cores, 1x128), a run that
  followed the other model took 385 ms, one that followed itself 324 ms, and the A B / B A order
  made every sample a draw from that mixture. One shared pool serves both sessions with the
  same threads, so neither competes with the other, and spinning stays on as in deployment.
* After ``warmup`` runs of each, the two are measured interleaved, in pairs whose order
  alternates (A B, B A, A B ...), so drift (thermal, frequency, a neighbour's load) hits both.
* Inputs and outputs go through IO binding: on CUDA every input, output and KV-cache tensor is
  on the device, so a run times the model, not host copies. Outputs are bound to buffers
  allocated once (required by ``--cuda-graph``).
* Statistics per model: median, p90, p99, mean, min, tokens/s (tokens of the step divided by
  the median). The ratio B/A is the median of the per-pair ratios b_i / a_i (the two runs of a
  pair are adjacent in time, so drift cancels within a pair, and the median ignores the odd
  outlier), with a 95% percentile-bootstrap interval over pairs; "no significant difference"
  when it holds 1. Its coverage is checked on noisy synthetic samples in the tests.
* Length: by default pairs run until the interval's half-width is at most ``target`` (2% of
  the ratio), or the time budget per shape runs out, or ``max_runs``; the report says which
  stopped it. A fixed ``runs`` measures exactly that many pairs.
* Other load: the 1-minute load average before and after, and the CPU time other processes
  used during the measurement (``/proc/stat`` minus this process); a warning when other work
  competed for the cores.
* ``ops``: ORT's profiler, on separate sessions so that its overhead stays out of the timing;
  kernel time summed by op type and by group (normalization, MatMul/Gemm, attention, other).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from flashnorm_onnx.errors import FlashNormError, InputModelError, ProviderUnavailable, VerificationUnavailable
from flashnorm_onnx.inputs import Case, has_past, make_feeds, specs_from_session
from flashnorm_onnx.passes.norm_patterns import FUSED_NORM_OPS

logger = logging.getLogger(__name__)

GROUPS = ("normalization", "MatMul/Gemm", "attention", "other")

NORM_OPS = FUSED_NORM_OPS | {"GroupNormalization", "BatchNormalization"}
"""Fused norm ops: the fold's catalogue's (:data:`~flashnorm_onnx.passes.norm_patterns.FUSED_NORM_OPS`),
plus the two norms it never folds (convolution nets' GroupNorm and BatchNorm), which are still
normalization time. The nodes of decomposed chains are found by the same catalogue
(:func:`flashnorm_onnx.passes.norm_patterns.find_norms`), by name: a GELU's ``Pow`` or an
attention's ``Sqrt`` is not normalization time."""
LINEAR_OPS = {"MatMul", "FusedMatMul", "Gemm", "MatMulNBits", "MatMulInteger", "QGemm", "MatMulIntegerToFloat",
              "DynamicQuantizeMatMul", "FusedGemm"}
ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                 "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "Softmax", "RotaryEmbedding",
                 "SparseAttention", "PagedAttention"}

BOOTSTRAP_RESAMPLES = 2000


# --------------------------------------------------------------------------- shapes


def parse_shape(text: str) -> Case:
    """``prefill=1x512`` -> Case(prefill, batch 1, 512 tokens); ``decode=1x1,past=1024``."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--shape expects NAME=BATCHxTOKENS[,past=N], got '{text}'")
    parts = rest.split(",")
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", parts[0])
    if not m:
        raise ValueError(f"--shape {text}: '{parts[0]}' is not BATCHxTOKENS (e.g. 1x512)")
    batch, seq = int(m.group(1)), int(m.group(2))
    past = 0
    for extra in parts[1:]:
        key, sep, value = extra.partition("=")
        if key.strip() != "past" or not sep or not value.strip().isdigit():
            raise ValueError(f"--shape {text}: unknown option '{extra}' (only past=N)")
        past = int(value)
    if batch < 1 or seq < 1:
        raise ValueError(f"--shape {text}: batch and tokens must be >= 1")
    return Case(name.strip(), batch=batch, sequence=seq, past=past)


DEFAULT_SHAPES = ("prefill=1x128", "decode=1x1,past=256")


# --------------------------------------------------------------------------- statistics


def summarize(samples_s: np.ndarray, tokens: int) -> dict:
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    median = float(np.median(ms))
    return {
        "runs": int(ms.size),
        "median_ms": median,
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "std_ms": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        "tokens_per_s": tokens / (median / 1e3) if median > 0 else float("inf"),
        "samples_ms": [round(float(v), 6) for v in ms],
    }


def bootstrap_ratio(a: np.ndarray, b: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """B/A as the median of the per-pair ratios b_i / a_i, with a percentile-bootstrap 95% interval.

    ``a[i]`` and ``b[i]`` are the two runs of pair i (adjacent in time). Resampling whole pairs
    keeps the pairing; the median makes one slow run (a page fault, a neighbour's burst) move
    the answer by at most one rank.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = min(a.size, b.size)
    r = b[:n] / a[:n]
    point = float(np.median(r))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    ratios = np.median(r[idx], axis=1)
    lo, hi = (float(v) for v in np.percentile(ratios, [2.5, 97.5]))
    if lo <= 1.0 <= hi:
        verdict = "no significant difference"
    elif hi < 1.0:
        verdict = "B faster"
    else:
        verdict = "B slower"
    return {"median": point, "ci95": [lo, hi], "half_width": half_width(point, lo, hi), "verdict": verdict,
            "estimator": "median of per-pair ratios, paired percentile bootstrap", "resamples": resamples,
            "pairs": int(n)}


def half_width(point: float, lo: float, hi: float) -> float:
    """The interval's half-width relative to the estimate (0.02 = +-2%)."""
    return (hi - lo) / 2 / point if point > 0 else float("inf")


# --------------------------------------------------------------------------- other load


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


# --------------------------------------------------------------------------- sessions


DEFAULT_TARGET = 0.02
DEFAULT_BUDGET_S = 120.0
DEFAULT_MIN_RUNS = 10
DEFAULT_MAX_RUNS = 1000


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
        # two pools that spin would take each other's cores (see the module docstring)
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
        msg = _first_line(e)
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


class Runner:
    """One model, one shape: feeds bound once, outputs bound to preallocated buffers."""

    def __init__(self, session, feeds: dict[str, np.ndarray], settings: Settings, path: str | Path | None = None):
        import onnxruntime as ort

        self.session = session
        self.settings = settings
        device = "cuda" if settings.provider == "cuda" else "cpu"
        self.device = device
        self.binding = session.io_binding()
        self._inputs = {}
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, settings.device_id)
            self._inputs[name] = value  # keep alive
            self.binding.bind_ortvalue_input(name, value)
        # learn the output shapes, then bind buffers allocated once (CUDA graphs need fixed addresses)
        if settings.cuda_graph and path is not None:
            # a CUDA-graph session captures on its first runs: learn the shapes on a CPU session
            cpu = ort.InferenceSession(str(path), session_options(dataclasses.replace(settings, cuda_graph=False)),
                                       providers=["CPUExecutionProvider"])
            shapes = [(np.asarray(v).shape, np.asarray(v).dtype) for v in cpu.run(None, feeds)]
            del cpu
        else:
            for out in session.get_outputs():
                self.binding.bind_output(out.name, device, settings.device_id)
            session.run_with_iobinding(self.binding)
            shapes = [(tuple(v.shape()), _np_dtype(v.data_type())) for v in self.binding.get_outputs()]
            self.binding.clear_binding_outputs()
        self._outputs = []
        for out, (shape, dtype) in zip(session.get_outputs(), shapes):
            buffer = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, device, settings.device_id)
            self._outputs.append(buffer)
            self.binding.bind_ortvalue_output(out.name, buffer)
        self.run_options = ort.RunOptions()

    def run(self) -> float:
        start = time.perf_counter()
        self.session.run_with_iobinding(self.binding, self.run_options)
        if self.device != "cpu":
            self.binding.synchronize_outputs()
        return time.perf_counter() - start


_ORT_NP = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
}


def _np_dtype(ort_type: str):
    return _ORT_NP.get(ort_type, np.float32)


# --------------------------------------------------------------------------- measurement


@dataclasses.dataclass
class ModelInfo:
    label: str
    path: Path
    session: object = None
    specs: list = dataclasses.field(default_factory=list)


def feeds_for(specs, case: Case, vocab: dict[str, int], dims: dict[str, int] | None, seed: int) -> dict:
    return make_feeds(specs, case, dims=dims, vocab=vocab, seed=seed)


def measure_pair(
    a: ModelInfo,
    b: ModelInfo,
    case: Case,
    settings: Settings,
    vocab: dict[str, int],
    dims: dict[str, int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Interleaved timing of A and B on one shape. Returns the result record."""
    runners = {}
    for info in (a, b):
        feeds = feeds_for(info.specs, case, vocab, dims, settings.seed)
        try:
            runners[info.label] = Runner(info.session, feeds, settings, info.path)
        except Exception as e:
            shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
            raise VerificationUnavailable(
                f"model {info.label} ({info.path}) does not run on generated inputs for {case.describe()} "
                f"({shapes}): {_first_line(e)}; set sizes with --dim NAME=VALUE"
            ) from e
    ra, rb = runners[a.label], runners[b.label]
    for _ in range(settings.warmup):
        ra.run()
        rb.run()
    monitor = LoadMonitor()
    ta: list[float] = []
    tb: list[float] = []
    fixed = settings.runs is not None
    limit = settings.runs if fixed else max(settings.max_runs, settings.min_runs)
    start = time.perf_counter()
    next_check = settings.min_runs
    stopped = f"fixed number of pairs ({settings.runs})" if fixed else f"max pairs ({limit})"
    while len(ta) < limit:
        if len(ta) % 2 == 0:
            ta.append(ra.run())
            tb.append(rb.run())
        else:
            tb.append(rb.run())
            ta.append(ra.run())
        if progress:
            progress(1)
        n = len(ta)
        if fixed or n < next_check:
            continue
        elapsed = time.perf_counter() - start
        ratio = bootstrap_ratio(np.array(ta), np.array(tb), seed=settings.seed, resamples=500)
        if ratio["half_width"] <= settings.target:
            stopped = f"interval half-width {100 * ratio['half_width']:.1f}% <= target {100 * settings.target:g}%"
            break
        if elapsed >= settings.budget_s:
            stopped = (f"time budget {settings.budget_s:g} s (half-width {100 * ratio['half_width']:.1f}% > "
                       f"target {100 * settings.target:g}%)")
            break
        next_check = n + max(2, n // 10)  # the bootstrap costs little against a run; check often
    load = monitor.finish()
    tokens = case.batch * case.sequence
    ta_arr, tb_arr = np.array(ta), np.array(tb)
    return {
        "shape": case.name,
        "batch": case.batch,
        "sequence": case.sequence,
        "past": case.past,
        "tokens": tokens,
        "provider": settings.provider,
        "A": summarize(ta_arr, tokens),
        "B": summarize(tb_arr, tokens),
        "ratio": bootstrap_ratio(ta_arr, tb_arr, seed=settings.seed),
        "pairs": len(ta),
        "stopped": stopped,
        "seconds": round(time.perf_counter() - start, 3),
        "load": load,
    }


# --------------------------------------------------------------------------- op profiling


def norm_chain_nodes(graph) -> list[tuple[str, list[str], str]]:
    """Decomposed RMSNorm/LayerNorm chains in an onnx GraphProto.

    Returns (input name, node names, output name) per chain: Pow(x, 2) -> ReduceMean -> Add(eps)
    -> Sqrt -> Reciprocal | Div(1, .) -> Mul(x, .) [-> Cast] [-> Mul(scale, .)], with a leading
    Cast(x) when the chain starts with one. Also used to build 'no norm' variants.
    """
    consumers: dict[str, list] = {}
    producer: dict[str, object] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node
    const_names = {t.name for t in graph.initializer}
    const_names |= {n.output[0] for n in graph.node if n.op_type == "Constant"}

    def only(name: str, ops: set[str]):
        users = [n for n in consumers.get(name, []) if n.op_type in ops]
        return users[0] if len(users) == 1 else None

    chains = []
    for pow_node in graph.node:
        if pow_node.op_type != "Pow":
            continue
        x = pow_node.input[0]
        names = [pow_node.name]
        node = only(pow_node.output[0], {"ReduceMean"})
        if node is None:
            continue
        names.append(node.name)
        node = only(node.output[0], {"Add"})
        if node is None:
            continue
        names.append(node.name)
        node = only(node.output[0], {"Sqrt"})
        if node is None:
            continue
        names.append(node.name)
        inv = only(node.output[0], {"Reciprocal", "Div"})
        if inv is None:
            continue
        names.append(inv.name)
        if inv.op_type == "Div" and inv.input[0] not in const_names:
            # Div(x, sqrt): the division is the normalization itself
            mul = inv
            names.pop()
        else:
            mul = only(inv.output[0], {"Mul"})
        if mul is None:
            continue
        if mul is not inv:
            names.append(mul.name)
        end = mul.output[0]
        nxt = only(end, {"Cast"})
        if nxt is not None and len(consumers.get(end, [])) == 1:
            names.append(nxt.name)
            end = nxt.output[0]
        nxt = only(end, {"Mul"})
        if nxt is not None and len(consumers.get(end, [])) == 1:
            other = [i for i in nxt.input if i != end]
            if other and (other[0] in const_names or other[0] in producer and
                          producer[other[0]].op_type in ("Cast", "Constant")):
                names.append(nxt.name)
                end = nxt.output[0]
        src = producer.get(x)
        if src is not None and src.op_type == "Cast":
            names.insert(0, src.name)
        chains.append((x, names, end))
    return chains


def _norm_names(model_path: Path) -> set[str]:
    """Names of the nodes that compute a norm, as the fold's catalogue finds them."""
    import onnx_ir as ir

    from flashnorm_onnx.passes.norm_patterns import find_norms, norm_nodes

    try:
        model = ir.load(str(model_path))  # external data stays on disk
    except Exception:
        return set()
    return {n.name for match in find_norms(model.graph) for n in norm_nodes(match) if n.name}


def op_group(op_type: str, node_name: str, input_shapes: list, norm_names: set[str]) -> str:
    if op_type in NORM_OPS or node_name in norm_names:
        return "normalization"
    if op_type in LINEAR_OPS:
        if op_type in ("MatMul", "FusedMatMul") and len(input_shapes) >= 2:
            # activation x activation (QK^T, attention x V) is attention; x @ W has a 2-D weight
            second = input_shapes[1]
            if second is not None and len(second) > 2:
                return "attention"
        return "MatMul/Gemm"
    if op_type in ATTENTION_OPS:
        return "attention"
    return "other"


def parse_profile(path: Path, runs: int, norm_names: set[str], skip_runs: int = 0) -> dict:
    """Kernel time per run by op type and group from an ORT profile (JSON trace events).

    Kernel events are assigned to the ``model_run`` that contains them; the first
    ``skip_runs`` runs (shape discovery, warm-up) are left out; the rest are averaged.
    """
    events = json.loads(Path(path).read_text())
    if isinstance(events, dict):
        events = events.get("traceEvents", [])
    windows = sorted((float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0)))
                     for ev in events if ev.get("cat") == "Session" and ev.get("name") == "model_run")
    measured = windows[skip_runs:] if len(windows) > skip_runs else windows
    starts = np.array([w[0] for w in measured])
    by_op: dict[str, float] = {}
    by_group = {g: 0.0 for g in GROUPS}
    for ev in events:
        name = ev.get("name", "")
        if ev.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        if measured:
            ts = float(ev.get("ts", 0))
            i = int(np.searchsorted(starts, ts, side="right")) - 1
            if i < 0 or ts > measured[i][1]:
                continue  # a run that is not measured
        args = ev.get("args", {})
        op = args.get("op_name", "?")
        node = name[: -len("_kernel_time")]
        shapes = []
        for item in args.get("input_type_shape", []) or []:
            if isinstance(item, dict) and item:
                shapes.append(list(item.values())[0])
            else:
                shapes.append(None)
        dur = float(ev.get("dur", 0))
        by_op[op] = by_op.get(op, 0.0) + dur
        by_group[op_group(op, node, shapes, norm_names)] += dur
    n_runs = len(measured) if measured else max(runs, 1)
    scale = 1e-3 / n_runs  # microseconds summed over runs -> ms per run
    return {
        "runs": n_runs,
        "by_op_ms": dict(sorted(((k, v * scale) for k, v in by_op.items()), key=lambda kv: -kv[1])),
        "by_group_ms": {k: v * scale for k, v in by_group.items()},
        "kernel_total_ms": sum(by_op.values()) * scale,
        "run_total_ms": (sum(b - a for a, b in measured) * 1e-3 / len(measured)) if measured else None,
    }


def profile_ops(info: ModelInfo, case: Case, settings: Settings, vocab: dict[str, int],
                dims: dict[str, int] | None, runs: int) -> dict:
    """Per-op kernel time of one model on one shape (ORT profiler, on its own session)."""
    tmp = Path(tempfile.mkdtemp(prefix="flashnorm-prof-"))
    try:
        session = make_session(info.path, settings, profile_prefix=str(tmp / "ort"))
        runner = Runner(session, feeds_for(info.specs, case, vocab, dims, settings.seed), settings, info.path)
        for _ in range(min(settings.warmup, 2)):
            runner.run()
        # the profile holds every run since the session started: leave out shape discovery and warm-up
        skip = (0 if settings.cuda_graph else 1) + min(settings.warmup, 2)
        for _ in range(runs):
            runner.run()
        profile_file = Path(session.end_profiling())
        result = parse_profile(profile_file, runs, _norm_names(info.path), skip_runs=skip)
        result["profiled_runs"] = result.pop("runs")
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- machine


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


# --------------------------------------------------------------------------- tables and plot


def format_table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    align = align or ("l" + "r" * (len(headers) - 1))

    def fmt(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def latency_table(results: list[dict]) -> str:
    headers = ["shape", "provider", "model", "median ms", "p90 ms", "p99 ms", "tokens/s", "B/A", "95% CI", "verdict",
               "pairs, stopped by"]
    rows = []
    for r in results:
        ratio = r["ratio"]
        shape = f"{r['shape']} {r['batch']}x{r['sequence']}" + (f" past {r['past']}" if r["past"] else "")
        for label in ("A", "B"):
            s = r[label]
            first = label == "A"
            rows.append([
                shape if first else "",
                r["provider"] if first else "",
                label,
                f"{s['median_ms']:.3f}",
                f"{s['p90_ms']:.3f}",
                f"{s['p99_ms']:.3f}",
                f"{s['tokens_per_s']:.1f}",
                "" if first else f"{ratio['median']:.3f}",
                "" if first else f"[{ratio['ci95'][0]:.3f}, {ratio['ci95'][1]:.3f}]",
                "" if first else ratio["verdict"],
                "" if first or "pairs" not in r else f"{r['pairs']}, {r['stopped']}",
            ])
    return format_table(headers, rows, align="lllrrrrrrll")


def ops_table(entry: dict, top: int = 12) -> str:
    a, b = entry["A"], entry["B"]
    lines = [f"time by group, ms per run ({entry['shape']}, {entry['provider']}):"]
    rows = []
    for g in GROUPS:
        va, vb = a["by_group_ms"][g], b["by_group_ms"][g]
        rows.append([g, f"{va:.3f}", f"{vb:.3f}", f"{vb - va:+.3f}", _pct(va, a["kernel_total_ms"]),
                     _pct(vb, b["kernel_total_ms"])])
    rows.append(["kernels total", f"{a['kernel_total_ms']:.3f}", f"{b['kernel_total_ms']:.3f}",
                 f"{b['kernel_total_ms'] - a['kernel_total_ms']:+.3f}", "100%", "100%"])
    if a.get("run_total_ms") is not None and b.get("run_total_ms") is not None:
        rows.append(["whole run", f"{a['run_total_ms']:.3f}", f"{b['run_total_ms']:.3f}",
                     f"{b['run_total_ms'] - a['run_total_ms']:+.3f}", "", ""])
    lines.append(format_table(["group", "A", "B", "B-A", "A %", "B %"], rows))
    ops = sorted(set(a["by_op_ms"]) | set(b["by_op_ms"]),
                 key=lambda k: -max(a["by_op_ms"].get(k, 0.0), b["by_op_ms"].get(k, 0.0)))
    rows = []
    for op in ops[:top]:
        va, vb = a["by_op_ms"].get(op, 0.0), b["by_op_ms"].get(op, 0.0)
        rows.append([op, f"{va:.3f}", f"{vb:.3f}", f"{vb - va:+.3f}"])
    if len(ops) > top:
        rest_a = sum(a["by_op_ms"].get(k, 0.0) for k in ops[top:])
        rest_b = sum(b["by_op_ms"].get(k, 0.0) for k in ops[top:])
        rows.append([f"({len(ops) - top} more)", f"{rest_a:.3f}", f"{rest_b:.3f}", f"{rest_b - rest_a:+.3f}"])
    lines.append("")
    lines.append(f"time by op type, ms per run ({entry['shape']}, {entry['provider']}):")
    lines.append(format_table(["op type", "A", "B", "B-A"], rows))
    return "\n".join(lines)


def _pct(v: float, total: float) -> str:
    return f"{100 * v / total:.1f}%" if total > 0 else "-"


def write_plot(report: dict, path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FlashNormError(
            "--plot needs matplotlib: pip install 'flashnorm-onnx[plot]'"
        ) from None
    results = report["results"]
    ops = report.get("ops") or []
    ncols = max(len(results), 1)
    nrows = 2 if ops else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 4 * nrows), squeeze=False)
    for i, r in enumerate(results):
        ax = axes[0][i]
        data = [r["A"]["samples_ms"], r["B"]["samples_ms"]]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks([1, 2], ["A (baseline)", "B"])
        for j, d in enumerate(data, start=1):
            jitter = np.random.default_rng(j).uniform(-0.08, 0.08, len(d))
            ax.plot(np.full(len(d), j) + jitter, d, ".", alpha=0.35, markersize=3)
        lo, hi = r["ratio"]["ci95"]
        ax.set_title(f"{r['shape']} {r['batch']}x{r['sequence']}"
                     + (f" past {r['past']}" if r["past"] else "")
                     + f" [{r['provider']}]\nB/A {r['ratio']['median']:.3f} [{lo:.3f}, {hi:.3f}]", fontsize=9)
        ax.set_ylabel("latency (ms)")
    if not results:
        axes[0][0].text(0.5, 0.5, "no results", ha="center")
    for i, entry in enumerate(ops[:ncols]):
        ax = axes[1][i]
        x = np.arange(2)
        bottom = np.zeros(2)
        for g in GROUPS:
            vals = np.array([entry["A"]["by_group_ms"][g], entry["B"]["by_group_ms"][g]])
            ax.bar(x, vals, bottom=bottom, label=g)
            bottom += vals
        ax.set_xticks(x, ["A", "B"])
        ax.set_ylabel("kernel time per run (ms)")
        ax.set_title(f"by group: {entry['shape']} [{entry['provider']}]", fontsize=9)
        ax.legend(fontsize=7)
    for j in range(len(ops), ncols):
        if nrows > 1:
            axes[1][j].axis("off")
    fig.suptitle(f"A = {Path(report['models']['A']['path']).name}   B = {Path(report['models']['B']['path']).name}",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(e).__name__


# --------------------------------------------------------------------------- driver


def _profile_here(
    *,
    baseline: str | Path,
    candidate: str | Path,
    shapes: list[Case] | None = None,
    providers: tuple[str, ...] = ("cpu",),
    runs: int | None = None,
    warmup: int = 5,
    ops: bool = False,
    ops_runs: int | None = None,
    cuda_graph: bool = False,
    fallback_cpu: bool = False,
    threads: int | None = None,
    dims: dict[str, int] | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
    tick: Callable[[str, object], None] = lambda _kind, _value: None,
    skip_failing: bool = False,
    target: float = DEFAULT_TARGET,
    budget_s: float = DEFAULT_BUDGET_S,
    min_runs: int = DEFAULT_MIN_RUNS,
    max_runs: int = DEFAULT_MAX_RUNS,
) -> dict:
    """:func:`profile`'s work, in the measuring process. ``tick(kind, value)`` reports progress:
    ("total", pairs or None), ("postfix", text), ("update", pairs)."""
    from flashnorm_onnx import __version__, model_io
    from flashnorm_onnx.inputs import vocab_sizes

    shapes = shapes or [parse_shape(s) for s in DEFAULT_SHAPES]
    paths = {}
    for label, p in (("A", baseline), ("B", candidate)):
        info = model_io.check_input(p)
        paths[label] = info.path
    vocab = vocab_sizes(model_io.load(model_io.check_input(paths["A"])))
    report = {
        "tool": "flashnorm-onnx profile",
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "models": {"A": {"path": str(paths["A"]), "role": "baseline"},
                   "B": {"path": str(paths["B"]), "role": "candidate"}},
        "settings": {"runs": runs if runs is not None else "adaptive", "target_half_width": target,
                     "budget_s_per_shape": budget_s, "min_runs": min_runs, "max_runs": max_runs, "warmup": warmup, "providers": list(providers), "cuda_graph": cuda_graph,
                     "io_binding": True, "threads": threads, "seed": seed, "order": "interleaved, alternating A B / B A",
                     "estimator": "median of per-pair ratios B/A, paired percentile bootstrap",
                     "bootstrap_resamples": BOOTSTRAP_RESAMPLES, "dims": dims or {}},
        "machine": None,
        "results": [],
        "skipped": [],
        "ops": [],
        "notes": [],
    }
    sessions = []
    todo = []
    for provider in providers:
        settings = Settings(provider=provider, runs=runs, warmup=warmup, cuda_graph=cuda_graph and provider == "cuda",
                            threads=threads, seed=seed, target=target, budget_s=budget_s, min_runs=min_runs,
                            max_runs=max_runs)
        report["settings"]["threading"] = threading_description(settings)
        try:
            models = []
            for label in ("A", "B"):
                session = make_session(paths[label], settings)
                models.append(ModelInfo(label, paths[label], session, specs_from_session(session)))
        except ProviderUnavailable as e:
            if provider == "cuda" and fallback_cpu:
                note = f"{e} -- measuring on CPU instead (--fallback-cpu)"
                report["notes"].append(note)
                log(f"warning: {note}")
                if "cpu" in providers:
                    continue
                settings = dataclasses.replace(settings, provider="cpu", cuda_graph=False)
                models = []
                for label in ("A", "B"):
                    session = make_session(paths[label], settings)
                    models.append(ModelInfo(label, paths[label], session, specs_from_session(session)))
            else:
                raise
        for m in models:
            sessions.append(m.session)
            report["models"][m.label].setdefault("providers", {})[settings.provider] = m.session.get_providers()
        with_past = has_past(models[0].specs)
        for case in shapes:
            if case.past and not with_past:
                reason = "the model has no KV-cache inputs: a decode step with a past cannot be timed"
                report["skipped"].append({"shape": case.name, "provider": settings.provider, "reason": reason})
                continue
            todo.append((settings, models, case))
    report["machine"] = machine_info("cuda" if "cuda" in providers else "cpu", sessions)
    if report["machine"]["gpu"]:
        gpu = report["machine"]["gpu"]
        log(f"GPU: {gpu['name']}, driver {gpu['driver']}")

    tick("total", len(todo) * runs if runs else None)
    for settings, models, case in todo:
        tick("postfix", f"{case.name} {settings.provider}")
        try:
            result = measure_pair(models[0], models[1], case, settings, vocab, dims,
                                  progress=lambda n: tick("update", n))
        except VerificationUnavailable as e:
            if not skip_failing:
                raise
            report["skipped"].append({"shape": case.name, "provider": settings.provider, "reason": str(e)})
            continue
        report["results"].append(result)
        log(f"{case.name} ({settings.provider}): {result['pairs']} pairs, stopped by {result['stopped']}")
        if result["load"]["competed"]:
            note = (f"{case.name} ({settings.provider}): other processes kept "
                    f"{result['load']['other_cores_busy']:.2f} cores busy while measuring (load average "
                    f"{result['load']['load_before']} before, {result['load']['load_after']} after); "
                    "the numbers may be disturbed")
            report["notes"].append(note)
            log(f"warning: {note}")
        if ops:
            n = ops_runs or max(3, min(result["pairs"], 10))
            entry = {"shape": case.name, "provider": settings.provider, "batch": case.batch,
                     "sequence": case.sequence, "past": case.past}
            for m in models:
                entry[m.label] = profile_ops(m, case, settings, vocab, dims, n)
            report["ops"].append(entry)
    return report


def _worker(kwargs: dict, conn) -> None:
    """Entry point of the measuring process: runs :func:`_profile_here`, sends back messages."""
    import pickle

    def send(kind, value):
        conn.send((kind, value))

    try:
        send("done", _profile_here(**kwargs, log=lambda m: send("log", m), tick=send))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the caller
        try:
            pickle.dumps(e)
        except Exception:
            e = FlashNormError(f"{type(e).__name__}: {_first_line(e)}")
        send("error", e)
    finally:
        conn.close()


def profile(
    baseline: str | Path,
    candidate: str | Path,
    shapes: list[Case] | None = None,
    providers: tuple[str, ...] = ("cpu",),
    runs: int | None = None,
    warmup: int = 5,
    ops: bool = False,
    ops_runs: int | None = None,
    cuda_graph: bool = False,
    fallback_cpu: bool = False,
    threads: int | None = None,
    dims: dict[str, int] | None = None,
    seed: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    skip_failing: bool = False,
    target: float = DEFAULT_TARGET,
    budget_s: float = DEFAULT_BUDGET_S,
    min_runs: int = DEFAULT_MIN_RUNS,
    max_runs: int = DEFAULT_MAX_RUNS,
) -> dict:
    """Measure A (baseline) against B (candidate); returns the report as a JSON-ready dict.

    ``runs``: a fixed number of interleaved pairs per shape; None (default) runs pairs until
    the 95% interval of B/A has a half-width of at most ``target`` (relative), or ``budget_s``
    seconds per shape have passed, between ``min_runs`` and ``max_runs`` pairs.

    The sessions live in a fresh process (``spawn``): ORT's shared thread pool, which keeps the
    two sessions from taking each other's cores, is process-wide, and once it exists every
    session of that process must use it -- the caller's own sessions stay as they were. As with
    any ``spawn``, a script that calls this at import time must do so under
    ``if __name__ == "__main__":``.
    """
    import multiprocessing

    log = log or (lambda _msg: None)
    if runs is not None and runs < 2:
        raise ValueError("--runs must be at least 2")
    if not (0 < target < 1) or budget_s <= 0 or min_runs < 2 or max_runs < min_runs:
        raise ValueError("need 0 < target < 1, budget > 0 and 2 <= min_runs <= max_runs")
    if warmup < 0:
        raise ValueError("--warmup must be >= 0")
    kwargs = dict(baseline=str(baseline), candidate=str(candidate), shapes=shapes, providers=tuple(providers),
                  runs=runs, warmup=warmup, ops=ops, ops_runs=ops_runs, cuda_graph=cuda_graph,
                  fallback_cpu=fallback_cpu, threads=threads, dims=dims, seed=seed, skip_failing=skip_failing,
                  target=target, budget_s=budget_s, min_runs=min_runs, max_runs=max_runs)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    worker = ctx.Process(target=_worker, args=(kwargs, send), daemon=True, name="flashnorm-profile")
    worker.start()
    send.close()
    bar = None
    try:
        while True:
            try:
                kind, value = receive.recv()
            except EOFError:
                worker.join(timeout=10)
                raise FlashNormError(f"the measuring process ended without a result (exit code {worker.exitcode}; "
                                     "out of memory?)") from None
            if kind == "log":
                log(value)
            elif kind == "total" and progress:
                import sys

                from tqdm import tqdm

                bar = tqdm(total=value, desc="measuring", unit="pair", file=sys.stderr, leave=False, disable=None)
            elif kind == "postfix" and bar is not None:
                bar.set_postfix_str(value)
            elif kind == "update" and bar is not None:
                bar.update(value)
            elif kind == "done":
                return value
            elif kind == "error":
                raise value
    finally:
        if bar is not None:
            bar.close()
        receive.close()
        worker.join(timeout=10)
        if worker.is_alive():
            worker.terminate()
            worker.join()
