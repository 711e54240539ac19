"""Verification for models too large to run twice in memory: check every folded tensor.

For each weight the fold wrote, read back *from the written output file*, with random vectors
x (rows of X, [r, K] in the channel layout)::

    X @ B*   ==   (X * g) @ B        (within the weight dtype's rounding)

on up to ``columns`` randomly chosen output columns of each tensor (all of them for small
tensors), so the check costs a fraction of the fold. Tensors are memory-mapped and released
one at a time: memory stays bounded by the largest tensor. This checks the arithmetic of every
fold that reached the disk; the structural decisions (which readers, untying) are the code paths
the ONNX Runtime comparison checks on every model that fits in memory.
"""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir

from flashnorm_onnx.report import VerificationResult

#: max |X@B* - (X*g)@B| relative to max |(X*g)@B|, by weight dtype
TOLERANCES = {"float64": 1e-12, "float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}


def _columns(weight: np.ndarray, k_axis: int, picks: np.ndarray | None) -> np.ndarray:
    """The [K, n] matrix of the chosen output columns, as float32/float64."""
    b = weight if k_axis == 0 else weight.T
    if picks is not None:
        b = b[:, picks]
    work = np.float64 if weight.dtype.itemsize >= 4 else np.float32
    return np.ascontiguousarray(b).astype(work)


def check_folds(folds, output: str | os.PathLike | None = None, rows: int = 4, columns: int = 256,
                seed: int = 0) -> VerificationResult:
    rng = np.random.default_rng(seed)
    written = None
    if output is not None:
        written = {v.name: v.const_value for v in ir.load(str(output)).graph.initializers.values()}
    result = VerificationResult(method="algebraic", passed=True)
    for record in folds:
        name = record.folded.name or record.name
        folded_tensor = written.get(name) if written is not None else record.folded
        if folded_tensor is None:
            result.passed = False
            result.message = f"folded tensor '{name}' is missing from the output"
            continue
        original = record.original.numpy()
        folded = folded_tensor.numpy()
        k = original.shape[record.k_axis]
        n = original.shape[1 - record.k_axis]
        picks = np.sort(rng.choice(n, size=columns, replace=False)) if n > columns else None
        b = _columns(original, record.k_axis, picks)
        bf = _columns(folded, record.k_axis, picks)
        x = rng.standard_normal((rows, k)).astype(b.dtype)
        g = np.broadcast_to(np.asarray(record.g, dtype=np.float64).reshape(-1), (k,)).astype(b.dtype)
        expected = ((x * g) @ b).astype(np.float64)
        got = (x @ bf).astype(np.float64)
        scale = float(np.abs(expected).max()) or 1.0
        max_abs = float(np.abs(got - expected).max())
        tol = TOLERANCES.get(np.dtype(original.dtype).name, 1e-6)
        ok = max_abs <= tol * scale * np.sqrt(k / 16 + 1)
        result.outputs.append(
            {"case": "x@B*", "name": name, "max_abs": max_abs, "max_rel": max_abs / scale,
             "argmax_agreement": None, "ok": bool(ok), "rtol": tol, "dtype": np.dtype(original.dtype).name,
             "shape": list(original.shape)}
        )
        if not ok:
            result.passed = False
            result.message = f"folded tensor '{name}' does not equal diag(g)·B"
        del original, folded, b, bf
        for tensor in (record.original, folded_tensor):
            if isinstance(tensor, ir.ExternalTensor):
                try:
                    tensor.release()
                except BufferError:
                    pass
    result.cases.append(
        f"{len(folds)} folded tensors read back from the output, each checked on {rows} random vectors "
        f"(up to {columns} output columns)"
    )
    return result
