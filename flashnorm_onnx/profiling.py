"""Latency comparison of two ONNX models (baseline A, candidate B) in ONNX Runtime.

Used by ``flashnorm-onnx profile``. The method:

* Inputs are generated as ``optimize``'s verification does (:mod:`flashnorm_onnx.inputs`):
  token ids within the vocabulary, masks of ones, positions after the past. A shape with a
  ``past`` length runs one step on a KV cache of that length (only for models with cache
  inputs; others skip it, with the reason).
* Both sessions are created in one process with the same options. After ``warmup`` runs of
  each, the two are measured interleaved, in pairs whose order alternates (A B, B A, A B ...),
  so drift (thermal, frequency, a neighbour's load) hits both alike.
* Inputs and outputs go through IO binding: on CUDA every input, output and KV-cache tensor is
  on the device, so a run times the model, not host copies. Outputs are bound to buffers
  allocated once (required by ``--cuda-graph``).
* Statistics per model: median, p90, p99, mean, min, tokens/s (tokens of the step divided by
  the median). The ratio B/A is the ratio of medians, with a 95% interval from a paired
  bootstrap over the interleaved pairs; "no significant difference" when the interval holds 1.
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

logger = logging.getLogger(__name__)

GROUPS = ("normalization", "MatMul/Gemm", "attention", "other")

NORM_OPS = {
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RMSNormalization",
    "GroupNormalization",
    "BatchNormalization",
    # pieces of decomposed RMSNorm/LayerNorm chains (not used elsewhere in these models)
    "Pow",
    "ReduceMean",
    "Sqrt",
    "Reciprocal",
}
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
    """Ratio of medians B/A with a paired percentile-bootstrap 95% interval."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = min(a.size, b.size)
    a, b = a[:n], b[:n]
    point = float(np.median(b) / np.median(a))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    ratios = np.median(b[idx], axis=1) / np.median(a[idx], axis=1)
    lo, hi = (float(v) for v in np.percentile(ratios, [2.5, 97.5]))
    if lo <= 1.0 <= hi:
        verdict = "no significant difference"
    elif hi < 1.0:
        verdict = "B faster"
    else:
        verdict = "B slower"
    return {"median": point, "ci95": [lo, hi], "verdict": verdict, "resamples": resamples, "pairs": int(n)}


# --------------------------------------------------------------------------- sessions


@dataclasses.dataclass
class Settings:
    provider: str = "cpu"
    runs: int = 50
    warmup: int = 5
    cuda_graph: bool = False
    threads: int | None = None
    device_id: int = 0
    seed: int = 0


def session_options(settings: Settings, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures come back as exceptions
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
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
    ta = np.empty(settings.runs)
    tb = np.empty(settings.runs)
    for i in range(settings.runs):
        if i % 2 == 0:
            ta[i] = ra.run()
            tb[i] = rb.run()
        else:
            tb[i] = rb.run()
            ta[i] = ra.run()
        if progress:
            progress(1)
    tokens = case.batch * case.sequence
    return {
        "shape": case.name,
        "batch": case.batch,
        "sequence": case.sequence,
        "past": case.past,
        "tokens": tokens,
        "provider": settings.provider,
        "A": summarize(ta, tokens),
        "B": summarize(tb, tokens),
        "ratio": bootstrap_ratio(ta, tb, seed=settings.seed),
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
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:
        return set()
    names = set()
    for _x, nodes, _end in norm_chain_nodes(model.graph):
        names.update(nodes)
    return names


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
    headers = ["shape", "provider", "model", "median ms", "p90 ms", "p99 ms", "tokens/s", "B/A", "95% CI", "verdict"]
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
            ])
    return format_table(headers, rows, align="lllrrrrrrl")


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


def profile(
    baseline: str | Path,
    candidate: str | Path,
    shapes: list[Case] | None = None,
    providers: tuple[str, ...] = ("cpu",),
    runs: int = 50,
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
) -> dict:
    """Measure A (baseline) against B (candidate); returns the report as a JSON-ready dict."""
    from flashnorm_onnx import __version__, model_io
    from flashnorm_onnx.inputs import vocab_sizes

    log = log or (lambda _msg: None)
    if runs < 2:
        raise ValueError("--runs must be at least 2")
    if warmup < 0:
        raise ValueError("--warmup must be >= 0")
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
        "settings": {"runs": runs, "warmup": warmup, "providers": list(providers), "cuda_graph": cuda_graph,
                     "io_binding": True, "threads": threads, "seed": seed, "order": "interleaved, alternating A B / B A",
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
                            threads=threads, seed=seed)
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

    bar = None
    if progress and todo:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(todo) * runs, desc="measuring", unit="pair", file=sys.stderr, leave=False, disable=None)
    try:
        for settings, models, case in todo:
            if bar is not None:
                bar.set_postfix_str(f"{case.name} {settings.provider}")
            try:
                result = measure_pair(models[0], models[1], case, settings, vocab, dims,
                                      progress=bar.update if bar is not None else None)
            except VerificationUnavailable as e:
                if not skip_failing:
                    raise
                report["skipped"].append({"shape": case.name, "provider": settings.provider, "reason": str(e)})
                continue
            report["results"].append(result)
            if ops:
                n = ops_runs or max(3, min(runs, 10))
                entry = {"shape": case.name, "provider": settings.provider, "batch": case.batch,
                         "sequence": case.sequence, "past": case.past}
                for m in models:
                    entry[m.label] = profile_ops(m, case, settings, vocab, dims, n)
                report["ops"].append(entry)
    finally:
        if bar is not None:
            bar.close()
    return report
