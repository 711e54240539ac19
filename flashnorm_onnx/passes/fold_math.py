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


class DeferredFoldRefused(FoldRefused):
    """A fold whose overflow check was left to the write (so each weight is read once, see
    :class:`FoldedTensor`) found a product beyond the weight's dtype while writing. The write is
    abandoned; the caller plans again with the norm ``key`` (its index and name in the model
    that was written) skipped for ``reason``."""

    def __init__(self, key: tuple[int, str], weight: str, reason: str):
        super().__init__(reason)
        self.key, self.weight, self.reason = key, weight, reason


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


def _row_blocks(weight: np.ndarray, elements: int | None = None):
    rows = max(1, (elements or CHUNK_ELEMENTS) // max(1, int(np.prod(weight.shape[1:]))))
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
    check = OverflowCheck(g, k_axis, weight.dtype, weight.shape)
    if check.needed:
        for rows in _row_blocks(weight):
            check.add(weight[rows], rows)
    check.finish()


def check_tensor(tensor, g: np.ndarray, k_axis: int) -> None:
    """:func:`check_fold` on an ir tensor, read block by block (external data with ``pread`` into
    one reused buffer, nothing memory-mapped), and not read at all when no product can
    overflow (every |g| <= 1)."""
    from flashnorm_onnx.passes import tensor_access

    shape = tuple(int(d) for d in tensor.shape.numpy())
    check = OverflowCheck(g, k_axis, tensor.dtype.numpy(), shape)
    if check.needed:
        for rows, block in tensor_access.iter_row_blocks(tensor):
            check.add(block, rows)
    check.finish()


#: ``|x|`` as an unsigned integer of the same width: for IEEE floats the order of these bit
#: patterns is the order of the magnitudes, with inf above every finite value and NaN above inf.
_MAGNITUDE_BITS = {2: (np.uint16, 0x7FFF), 4: (np.uint32, 0x7FFFFFFF), 8: (np.uint64, 0x7FFFFFFFFFFFFFFF)}


def _abs_max(block: np.ndarray, axis: int) -> np.ndarray:
    """``np.abs(block).max(axis)`` in the block's dtype, exactly (NaN where a NaN is), computed on
    the bit patterns (integer SIMD: several times faster than 16-bit float arithmetic)."""
    kind = _MAGNITUDE_BITS.get(block.dtype.itemsize)
    if kind is None or block.dtype.kind not in "fV":
        return np.abs(block).max(axis=axis)
    uint, mask = kind
    bits = block.view(uint) & uint(mask)
    return bits.max(axis=axis).view(block.dtype)


class OverflowCheck:
    """The overflow test of the fold, fed block by block (row blocks of the stored 2-D weight).

    Reproduces the whole-tensor check exactly, including its treatment of NaN and inf in the
    weight (a block holding a NaN, in rows of :data:`CHUNK_ELEMENTS`, is not counted; an inf
    product means the weight already holds inf and nothing is refused), whatever blocks it is
    given: per-row maxima (g along rows) or per-column maxima (g along columns) are kept, a few
    floats per channel."""

    def __init__(self, g: np.ndarray, k_axis: int, dtype, shape: tuple[int, ...]):
        self.g = np.asarray(g, dtype=np.float64).reshape(-1)
        self.k_axis = k_axis
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(d) for d in shape)
        if len(self.shape) != 2:
            raise FoldRefused(f"weight has rank {len(self.shape)}")
        if self.g.size not in (1, self.shape[k_axis]):
            raise FoldRefused(
                f"the norm has {self.g.size} channels but the weight's input dimension is {self.shape[k_axis]}"
            )
        # no product can overflow when every |g| <= 1 (|g*w| <= |w|, and NaN/inf weights refuse nothing)
        self.needed = self.shape[0] * self.shape[1] > 0 and not bool(np.all(np.abs(self.g) <= 1.0))
        self.row_max = np.zeros(self.shape[0], dtype=self.dtype) if k_axis == 0 else None
        self.col_max = None

    def add(self, block: np.ndarray, rows: slice) -> None:
        if block.size == 0:
            return
        if self.k_axis == 0:
            self.row_max[rows] = _abs_max(block, axis=1)
        else:
            m = _abs_max(block, axis=0)
            self.col_max = m if self.col_max is None else np.maximum(self.col_max, m)

    def finish(self) -> None:
        if not self.needed:
            return
        limit = _finfo_max(self.dtype)
        g_abs = np.abs(self.g)
        worst = 0.0
        if self.k_axis == 0:
            products = self.row_max.astype(np.float64) * g_abs
            step = max(1, CHUNK_ELEMENTS // max(1, self.shape[1]))
            # the whole-tensor check's blocks: max per block (NaN propagates), then Python's max()
            for m in np.maximum.reduceat(products, np.arange(0, products.size, step)):
                worst = max(worst, float(m))
        elif self.col_max is not None:
            worst = max(worst, float(np.max(self.col_max.astype(np.float64) * g_abs)))
        if not np.isfinite(worst):
            return  # the weight already holds inf/nan; the fold keeps them where they are
        if worst > limit:
            raise FoldRefused(
                f"g*w reaches {worst:.4g}, beyond the {self.dtype.name} maximum {limit:.4g}"
            )


def fold_scale(
    weight: np.ndarray, g: np.ndarray, k_axis: int, check: bool = True, out: np.ndarray | None = None
) -> np.ndarray:
    """Return weight scaled by g along k_axis, in weight's dtype (computed block by block).

    ``check=False`` when :func:`check_fold` already ran on the same tensor. ``out``: an array of
    weight's shape and dtype to write into (it may be ``weight`` itself); returned."""
    if check:
        check_fold(weight, g, k_axis)
    else:
        _check_shapes(weight, np.asarray(g).reshape(-1), k_axis)
    work = compute_dtype(weight.dtype)
    g = np.asarray(g).astype(work).reshape(-1)
    if out is None:
        out = np.empty(weight.shape, dtype=weight.dtype)
    kernel = fast_kernel(weight.dtype, g) if weight.size >= FAST_KERNEL_MIN_ELEMENTS else None
    for rows in _row_blocks(weight, KERNEL_ELEMENTS if kernel is not None else CHUNK_ELEMENTS):
        gr = g if g.size == 1 or k_axis == 1 else g[rows]
        if kernel is not None:
            out[rows] = kernel(np.ascontiguousarray(weight[rows]), gr, k_axis)
            continue
        block = weight[rows].astype(work)
        if g.size == 1:
            block *= g[0]
        elif k_axis == 0:
            block *= gr[:, None]
        else:
            block *= g[None, :]
        out[rows] = block.astype(weight.dtype)
    return out


# -- a faster kernel for float16 -------------------------------------------------------------------
#
# numpy converts float16 <-> float32 one element at a time on CPUs without AVX512-FP16 (about
# 0.2 GB/s for the fold). ONNX Runtime's Cast uses the F16C instructions: the same arithmetic
# (exact widening, one IEEE float32 multiply, round to nearest even) at several GB/s, releasing
# the GIL. It is used only after a self-test shows it bit-identical to the numpy path on this
# machine (every float16 bit pattern, NaN and inf included, times a set of scales), and only for
# finite scales; anything else takes the numpy path.

#: Tensors smaller than this fold with numpy (ONNX Runtime's start-up is not worth it).
FAST_KERNEL_MIN_ELEMENTS = 1 << 16
#: Elements per kernel call: its float32 intermediate (2 MB) stays in the cache.
KERNEL_ELEMENTS = 1 << 19
_kernel_state: dict = {}
#: Builds the float16 kernel, or returns None (no ONNX Runtime): set by whoever can run one
#: (``io.fp16_kernel``, imported by the streamed writer), so the fold itself needs only numpy.
KERNEL_FACTORY = None


def fast_kernel(dtype, g: np.ndarray):
    """A ``kernel(block, g_rows, k_axis) -> folded block`` bit-identical to the numpy path, or None
    (checked once by :func:`kernel_agrees` before it is used)."""
    if np.dtype(dtype) != np.dtype(np.float16) or g.dtype != np.float32 or not np.all(np.isfinite(g)):
        return None
    if "kernel" not in _kernel_state:
        kernel = KERNEL_FACTORY() if KERNEL_FACTORY is not None else None
        _kernel_state["kernel"] = kernel if kernel is not None and kernel_agrees(kernel) else None
    return _kernel_state["kernel"]


def kernel_agrees(kernel) -> bool:
    """Every float16 bit pattern times scales of every magnitude: bit-identical to numpy?"""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(256, 256)
    rng = np.random.default_rng(0)
    scales = np.concatenate([
        np.array([1.0, 0.5, 2.0, 1.5, 0.999, 1.001, 3.0, 1e-3, 7.5, 0.0, -1.0, -1.25, 2.0**-20, 100.0]),
        rng.uniform(0.01, 4.0, 242),
    ]).astype(np.float32)
    for g, k_axis in ((scales, 0), (scales, 1), (scales[3:4], 0)):
        with np.errstate(all="ignore"):
            want = (every.astype(np.float32) * (g[:, None] if k_axis == 0 and g.size > 1 else g[None, :])).astype(np.float16)
        got = kernel(every, g, k_axis)
        if got.shape != want.shape or got.dtype != want.dtype or not np.array_equal(got.view(np.uint16), want.view(np.uint16)):
            return False
    return True


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


# -- the folded tensor, computed when it is written -------------------------------------------------

import onnx_ir as _ir  # noqa: E402


class FoldedTensor(_ir.LazyTensor):
    """``g`` folded into ``original`` along ``k_axis``, computed only when read.

    Read whole (``numpy()``, ``tobytes()``), it is :func:`fold_scale` of the whole original. The
    streamed writer (:mod:`flashnorm_onnx.io.tensor_io`) reads it with :meth:`blocks` instead: row
    blocks of the stored array, each read once and folded by the same :func:`fold_scale` into a
    reused buffer, so memory stays at a few blocks whatever the tensor's size.

    ``check_for=((norm index, norm name), weight name)``: the overflow check was not run when the fold was
    decided; it runs here, on the blocks as they are read for the write, and a product beyond
    the dtype raises :class:`DeferredFoldRefused` (after the last block: the writer has then
    abandoned nothing it could keep, and the caller plans again without that norm)."""

    def __init__(self, original, g: np.ndarray, k_axis: int, name: str | None = None,
                 check_for: tuple[tuple[int, str], str] | None = None):
        self.original = original
        self.g = np.array(g, copy=True)
        self.k_axis = k_axis
        self.check_for = check_for
        super().__init__(self._compute, dtype=original.dtype, shape=_ir.Shape(original.shape.numpy()), name=name)

    def _refused(self, e: FoldRefused) -> DeferredFoldRefused:
        key, weight = self.check_for
        return DeferredFoldRefused(key, weight, f"folding into '{weight}' is not representable: {e}")

    def _compute(self):
        from flashnorm_onnx.passes.graph_utils import release_tensor

        try:
            array = self.original.numpy()
            if self.check_for is not None:
                try:
                    check_fold(array, self.g, self.k_axis)
                except FoldRefused as e:
                    raise self._refused(e) from None
            return _ir.Tensor(fold_scale(array, self.g, self.k_axis, check=False), name=self.name)
        finally:
            release_tensor(self.original)

    def streamable(self) -> bool:
        return len(self.original.shape) == 2

    def blocks(self, block_bytes: int):
        """(byte offset, byte count, fill): ``fill(buffer)`` writes the folded bytes of that block
        into a uint8 buffer of ``byte count`` bytes. Call each fill before asking for the next."""
        from flashnorm_onnx.passes import tensor_access

        g = np.asarray(self.g).reshape(-1)
        shape = tuple(int(d) for d in self.original.shape.numpy())
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * int(self.dtype.itemsize)
        check = None
        if self.check_for is not None:
            check = OverflowCheck(g, self.k_axis, self.dtype.numpy(), shape)
            check = check if check.needed else None
        for rows, block in tensor_access.iter_row_blocks(self.original, block_bytes):
            gr = g if g.size == 1 or self.k_axis == 1 else g[rows]
            nbytes = block.nbytes

            def fill(buffer: np.ndarray, block=block, gr=gr, rows=rows) -> None:
                if check is not None:  # the overflow check, on the bytes read for the write
                    check.add(block, rows)
                out = buffer.view(block.dtype).reshape(block.shape)
                # looked up at call time: tests replace fold_scale to check that verification catches a bad fold;
                # an out-of-range product here is refused after the last block (the output is then discarded)
                with np.errstate(over="ignore" if check is not None else "warn"):
                    result = globals()["fold_scale"](block, gr, self.k_axis, check=False, out=out)
                if result is not out:
                    out[...] = result

            yield rows.start * row_bytes, nbytes, fill
        if check is not None:
            try:
                check.finish()
            except FoldRefused as e:
                raise self._refused(e) from None
