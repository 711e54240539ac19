"""The arithmetic of the fold, on numpy arrays.

Proposition 1 of FlashNorm (arXiv 2407.09577), in ONNX's row-vector layout ``y = x @ B`` with
``B`` of shape ``[K, N]``::

    (x * g) @ B  ==  x @ B*        with  B*[i, :] = g[i] * B[i, :]

and for a PyTorch-layout weight ``W [N, K]`` (reached through ``Transpose`` or ``Gemm
transB=1``) the same is ``W*[:, i] = W[:, i] * g[i]``. A LayerNorm bias ``beta`` adds a
constant row to the linear's output: ``(x * g + beta) @ B + c == x @ B* + (c + beta @ B)``.

Products are computed in float64 for float32/float64 weights and in float32 for 16-bit
weights, then rounded once to the weight's dtype. A product that does not fit the weight's
dtype (|g*w| > max) is refused rather than written as inf.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np


class FoldRefused(ValueError):
    """The fold would not be representable in the weight's dtype."""


def compute_dtype(dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _finfo_max(dtype: np.dtype) -> float:
    dtype = np.dtype(dtype)
    if dtype == np.dtype(ml_dtypes.bfloat16):
        return float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    try:
        return float(np.finfo(dtype).max)
    except ValueError:
        return float(ml_dtypes.finfo(dtype).max)


def _channel_shape(ndim: int, k_axis: int, size: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[k_axis] = size
    return tuple(shape)


#: Elements processed at a time: memory stays at the output tensor plus one block.
CHUNK_ELEMENTS = 1 << 22


def _row_blocks(weight: np.ndarray):
    rows = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(weight.shape[1:]))))
    for start in range(0, weight.shape[0], rows):
        yield slice(start, min(start + rows, weight.shape[0]))


def _check_shapes(weight: np.ndarray, g: np.ndarray, k_axis: int) -> None:
    if weight.ndim != 2:
        raise FoldRefused(f"weight has rank {weight.ndim}")
    if g.size not in (1, weight.shape[k_axis]):
        raise FoldRefused(
            f"the norm has {g.size} channels but the weight's input dimension is {weight.shape[k_axis]}"
        )


def check_fold(weight: np.ndarray, g: np.ndarray, k_axis: int) -> None:
    """Raise FoldRefused if g*weight overflows the weight's dtype (block by block)."""
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    _check_shapes(weight, g, k_axis)
    limit = _finfo_max(weight.dtype)
    g_abs = np.abs(g)
    worst = 0.0
    col_max = None
    for rows in _row_blocks(weight):
        # |w| max is exact in the weight's own dtype: no conversion of the whole block
        block = np.abs(weight[rows])
        if k_axis == 0:  # g indexes rows: max over each row, times its g
            row_max = block.max(axis=1).astype(np.float64) if block.size else np.zeros(0)
            gr = g_abs if g.size == 1 else g_abs[rows]
            worst = max(worst, float(np.max(row_max * gr)) if row_max.size else 0.0)
        else:
            m = block.max(axis=0) if block.size else None
            if m is not None:
                col_max = m if col_max is None else np.maximum(col_max, m)
    if col_max is not None:
        worst = max(worst, float(np.max(col_max.astype(np.float64) * g_abs)))
    if not np.isfinite(worst):
        return  # the weight already holds inf/nan; the fold keeps them where they are
    if worst > limit:
        raise FoldRefused(
            f"g*w reaches {worst:.4g}, beyond the {np.dtype(weight.dtype).name} maximum {limit:.4g}"
        )


def fold_scale(weight: np.ndarray, g: np.ndarray, k_axis: int, check: bool = True) -> np.ndarray:
    """Return weight scaled by g along k_axis, in weight's dtype (computed block by block).

    ``check=False`` when :func:`check_fold` already ran on the same tensor."""
    if check:
        check_fold(weight, g, k_axis)
    else:
        _check_shapes(weight, np.asarray(g).reshape(-1), k_axis)
    work = compute_dtype(weight.dtype)
    g = np.asarray(g).astype(work).reshape(-1)
    out = np.empty(weight.shape, dtype=weight.dtype)
    for rows in _row_blocks(weight):
        block = weight[rows].astype(work)
        if g.size == 1:
            block *= g[0]
        elif k_axis == 0:
            block *= g[rows, None]
        else:
            block *= g[None, :]
        out[rows] = block.astype(weight.dtype)
    return out


def bias_delta(weight: np.ndarray, beta: np.ndarray, k_axis: int) -> np.ndarray:
    """beta @ B for the effective [K, N] matrix (float64)."""
    w = np.asarray(weight).astype(np.float64)
    if k_axis == 1:
        w = w.T
    beta = np.asarray(beta, dtype=np.float64).reshape(-1)
    if beta.size == 1:
        beta = np.full(w.shape[0], beta[0])
    return beta @ w


def is_all(array: np.ndarray | None, value: float) -> bool:
    if array is None:
        return value == 0.0
    return bool(np.all(np.asarray(array).astype(np.float64) == value))
