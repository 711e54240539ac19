"""Kernel time by op group (normalization, MatMul/Gemm, attention, other) from ORT's profiler trace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flashnorm_onnx.passes.norm_patterns import FUSED_NORM_OPS

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


def _self_times(kernels: list[dict]) -> list[float]:
    """Each kernel event's own time: its duration less that of the events nested in it.

    A control-flow node (``If``, ``Loop``, ``Scan``) is timed by ORT's profiler over its whole
    subgraph run, and the subgraph's nodes are timed again as events of their own, inside its
    interval on the same thread: summing both would count the subgraph twice. Direct children
    are found by interval containment per thread (a stack over events sorted by start)."""
    own = [float(ev.get("dur", 0)) for ev in kernels]
    order = sorted(range(len(kernels)), key=lambda i: (kernels[i].get("tid"), float(kernels[i].get("ts", 0)),
                                                        -own[i]))
    stack: list[tuple[object, float, int]] = []  # (thread, end, index) of the open events
    for i in order:
        ev = kernels[i]
        tid, start = ev.get("tid"), float(ev.get("ts", 0))
        end = start + float(ev.get("dur", 0))
        while stack and (stack[-1][0] != tid or stack[-1][1] < end):
            stack.pop()
        if stack:
            own[stack[-1][2]] -= float(ev.get("dur", 0))
        stack.append((tid, end, i))
    return [max(t, 0.0) for t in own]


def parse_profile(path: Path, runs: int, norm_names: set[str], skip_runs: int = 0) -> dict:
    """Kernel time per run by op type and group from an ORT profile (JSON trace events).

    Kernel events are assigned to the ``model_run`` that contains them; the first
    ``skip_runs`` runs (shape discovery, warm-up) are left out; the rest are averaged. A
    control-flow node counts only its own time, not its subgraph's nodes (:func:`_self_times`).
    """
    events = json.loads(Path(path).read_text())
    if isinstance(events, dict):
        events = events.get("traceEvents", [])
    windows = sorted((float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0)))
                     for ev in events if ev.get("cat") == "Session" and ev.get("name") == "model_run")
    measured = windows[skip_runs:] if len(windows) > skip_runs else windows
    starts = np.array([w[0] for w in measured])
    kernels = []
    for ev in events:
        name = ev.get("name", "")
        if ev.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        if measured:
            ts = float(ev.get("ts", 0))
            i = int(np.searchsorted(starts, ts, side="right")) - 1
            if i < 0 or ts > measured[i][1]:
                continue  # a run that is not measured
        kernels.append(ev)
    by_op: dict[str, float] = {}
    by_group = {g: 0.0 for g in GROUPS}
    for ev, dur in zip(kernels, _self_times(kernels)):
        args = ev.get("args", {})
        op = args.get("op_name", "?")
        node = ev["name"][: -len("_kernel_time")]
        shapes = []
        for item in args.get("input_type_shape", []) or []:
            if isinstance(item, dict) and item:
                shapes.append(list(item.values())[0])
            else:
                shapes.append(None)
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
