"""Reading a constant tensor's rows without mapping it whole: from its external data file with
positioned reads, in row blocks or by chosen rows (what the fold's overflow check, the streamed
writer and the algebraic check read)."""

from __future__ import annotations

import os
import sys
import time
from typing import Iterator

import numpy as np
import onnx_ir as ir

#: Seconds spent, summed over the process: ``read`` (pread of folded tensors and of the overflow
#: check), ``fold`` (the arithmetic), ``wait`` (the folding thread waiting for a free buffer, i.e.
#: for the disk), ``write`` and ``copy`` (the writer thread). For the benchmark's breakdown.
STATS: dict[str, float] = {"read": 0.0, "fold": 0.0, "wait": 0.0, "write": 0.0, "copy": 0.0}

#: Bytes per block of a streamed tensor (rounded to whole rows): large enough for few system
#: calls, small enough for the cache and a flat resident set.
BLOCK_BYTES = 4 << 20


def external_source(tensor) -> tuple[str, int, int] | None:
    """(file, offset, length) of an external tensor whose bytes are its values as numpy reads them
    (fixed-size little-endian dtype), else None."""
    if not isinstance(tensor, ir.ExternalTensor) or sys.byteorder != "little":
        return None
    try:
        itemsize = tensor.dtype.itemsize
        tensor.dtype.numpy()
    except Exception:  # noqa: BLE001 - a dtype numpy cannot hold
        return None
    if tensor.dtype == ir.DataType.STRING or not float(itemsize).is_integer() or itemsize < 1:
        return None
    length = tensor.nbytes
    if tensor.length is not None and tensor.length != length:
        return None
    return tensor.path, int(tensor.offset or 0), int(length)


def _rows_per_block(shape: tuple[int, ...], itemsize: int, block_bytes: int) -> int:
    row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    return max(1, block_bytes // row)


def iter_row_blocks(tensor, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, block) over the first axis of ``tensor``. External data is read with ``pread``
    into one buffer reused for every block: a block is valid until the next one is yielded."""
    shape = tuple(int(d) for d in tensor.shape.numpy())
    dtype = tensor.dtype.numpy()
    rows_total = shape[0] if shape else 1
    step = _rows_per_block(shape, dtype.itemsize, block_bytes)
    source = external_source(tensor)
    if source is None:
        array = tensor.numpy()
        if not shape:
            yield slice(0, 1), array.reshape(1)
            return
        for start in range(0, rows_total, step):
            rows = slice(start, min(start + step, rows_total))
            yield rows, array[rows]
        return
    path, offset, _ = source
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    starts = list(range(0, rows_total, step))
    fd = os.open(path, os.O_RDONLY)
    buffer = np.empty(min(step, rows_total) * row_bytes, dtype=np.uint8)
    try:
        for start in starts:
            stop = min(start + step, rows_total)
            n = (stop - start) * row_bytes
            t = time.perf_counter()
            read_exactly(fd, memoryview(buffer)[:n], offset + start * row_bytes)
            STATS["read"] += time.perf_counter() - t
            yield slice(start, stop), buffer[:n].view(dtype).reshape((stop - start, *shape[1:]))
    finally:
        os.close(fd)


def read_rows(tensor, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (sorted indices into the first axis) of a tensor, read without mapping it:
    ``pread`` of just those rows from an external file, else indexing of the in-memory array."""
    shape = tuple(int(d) for d in tensor.shape.numpy())
    dtype = tensor.dtype.numpy()
    source = external_source(tensor)
    if source is None:
        return np.asarray(tensor.numpy())[rows]
    path, offset, _ = source
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    out = np.empty((len(rows), row_bytes), dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        # runs of adjacent rows in one read
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            read_exactly(fd, memoryview(out[i:j].reshape(-1)), offset + int(rows[i]) * row_bytes)
            i = j
    finally:
        os.close(fd)
    return out.reshape(-1).view(dtype).reshape((len(rows), *shape[1:]))


def read_exactly(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file reading {len(view)} bytes at offset {offset}")
        done += n


# -- writing --------------------------------------------------------------------------------------


