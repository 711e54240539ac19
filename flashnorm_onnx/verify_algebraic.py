"""Verification for models too large to run twice in memory: check every folded tensor.

For each weight the fold wrote, with random vectors x (rows of X, [r, K] in the channel
layout)::

    X @ B*   ==   (X * g) @ B        (within the weight dtype's rounding)

One tensor is materialised at a time, so memory stays bounded by the largest tensor. This
checks the arithmetic of every fold; the structural decisions (which readers, untying) are the
same code paths the ORT comparison checks on every model that fits in memory.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from flashnorm_onnx.report import VerificationResult

#: max |X@B* - (X*g)@B| relative to max |(X*g)@B|, by weight dtype
TOLERANCES = {"float64": 1e-12, "float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}


def check_folds(folds, rows: int = 4, seed: int = 0) -> VerificationResult:
    rng = np.random.default_rng(seed)
    result = VerificationResult(method="algebraic", passed=True)
    for record in folds:
        original = record.original.numpy()
        folded = record.folded.numpy()
        k = original.shape[record.k_axis]
        x = rng.standard_normal((rows, k))
        xg = x * np.broadcast_to(np.asarray(record.g, dtype=np.float64).reshape(-1), (k,))
        expected, got = _matmul_blocks(xg, original, record.k_axis), _matmul_blocks(x, folded, record.k_axis)
        scale = float(np.abs(expected).max()) or 1.0
        max_abs = float(np.abs(got - expected).max())
        tol = TOLERANCES.get(np.dtype(original.dtype).name, 1e-6)
        ok = max_abs <= tol * scale * np.sqrt(k / 16 + 1)
        result.outputs.append(
            {"case": "x@B*", "name": record.name, "max_abs": max_abs, "max_rel": max_abs / scale,
             "argmax_agreement": None, "ok": bool(ok), "rtol": tol, "dtype": np.dtype(original.dtype).name,
             "shape": list(original.shape)}
        )
        if not ok:
            result.passed = False
            result.message = f"folded tensor '{record.name}' does not equal diag(g)·B"
        del original, folded
        for tensor in (record.original, record.folded):
            if isinstance(tensor, ir.ExternalTensor):
                try:
                    tensor.release()
                except BufferError:
                    pass
    result.cases.append(f"{len(folds)} folded tensors checked on {rows} random vectors each")
    return result


def _matmul_blocks(x: np.ndarray, weight: np.ndarray, k_axis: int, block: int = 1 << 20) -> np.ndarray:
    """x @ B in float64 for B = weight (k_axis 0) or weight.T (k_axis 1), a block of rows at a time."""
    rows = max(1, block // max(1, weight.shape[1]))
    if k_axis == 0:
        out = np.zeros((x.shape[0], weight.shape[1]))
        for s in range(0, weight.shape[0], rows):
            out += x[:, s:s + rows] @ weight[s:s + rows].astype(np.float64)
        return out
    out = np.empty((x.shape[0], weight.shape[0]))
    for s in range(0, weight.shape[0], rows):
        out[:, s:s + rows] = x @ weight[s:s + rows].astype(np.float64).T
    return out
