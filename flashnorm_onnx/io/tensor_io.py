"""Reading and writing tensor bytes at disk speed, in fixed-size blocks.

The fold streams every weight once: row blocks of the stored 2-D array are read with ``pread``
into one reused buffer (nothing memory-mapped, so the resident set does not grow with the
tensor), folded, and written with large sequential ``pwrite`` calls by a writer thread while the
next block is read and folded; tensors the fold leaves unchanged go from the input's data file
to the output's by ``os.copy_file_range`` (the kernel copies, no Python buffer), adjacent ones
in one range. The data file is laid out exactly as ``onnx_ir.save`` lays it out (initializers
in declaration order, packed densely, those of at most 256 bytes kept inline), so the output
is the same file, byte for byte, as the in-memory path writes. Node-attribute tensors the input
keeps in external data (a Constant's value) follow the initializers in the data file: onnx_ir.save
would leave them pointing at the input's file, which is not beside the output.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnx_ir as ir

from flashnorm_onnx.io import fp16_kernel  # noqa: F401 - gives the fold its float16 kernel
from flashnorm_onnx.passes.tensor_access import (  # noqa: F401 - used here, and by callers of this module
    BLOCK_BYTES,
    STATS,
    external_source,
    iter_row_blocks,
    read_exactly,
    read_rows,
)

#: Blocks in flight between the folding thread and the writer thread (memory: this many blocks).
BUFFERS = 3
#: Largest single kernel copy (progress is reported between them).
COPY_CHUNK = 256 << 20
#: ``onnx_ir.save``'s default: tensors of at most this many bytes stay inline in the model file.
SIZE_THRESHOLD = 256



#: Alignment of direct (``O_DIRECT``) writes: file offset, length and memory address.
ALIGN = 4096
#: Write folded blocks with ``O_DIRECT`` (where the file system allows it): True, False, or None
#: to decide per write (:func:`_use_direct`): direct unless the verification that follows reads
#: the whole output back and both files would stay in the page cache.
DIRECT: bool | None = None


def _use_direct(total: int, read_back: bool = True) -> bool:
    """Direct writes? ``read_back=False``: nothing will read the output whole after the write (no
    verification, or one that reads only samples), so the page cache has nothing to keep for it:
    direct writes go to the disk while the input is read, where buffered ones wait for the final
    fsync (a 2.1 GB model here: 5.2-5.5 s against 8.2-9.6 s for the whole ``--no-verify`` run)."""
    if DIRECT is not None:
        return DIRECT
    if not read_back:
        return True
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line[0] in "MC"}
        available = info.get("MemAvailable", 0)
    except (OSError, ValueError, IndexError):
        available = 0
    return 2 * total > available


def _aligned_buffer(nbytes: int) -> np.ndarray:
    import mmap

    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)


class _Writer:
    """A thread that performs writes and kernel copies into one file, in submission order.

    ``buffer()`` hands out one of :data:`BUFFERS` reusable page-aligned blocks (waiting while all
    are queued), so the memory held is fixed whatever the tensors' sizes. Folded blocks are
    written with ``O_DIRECT`` where the file system allows it: the whole pages of a block go
    straight to the disk, without the page cache (on this kind of machine that is twice the
    speed of a buffered write, and it leaves the cache to the input); the partial pages at a
    block's two ends, and everything the kernel copies, go through the page cache. No page is
    written both ways."""

    def __init__(self, fd: int, path: Path | None = None):
        self.fd = fd
        self.direct: int | None = None
        if path is not None and hasattr(os, "O_DIRECT"):
            try:
                self.direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:  # tmpfs and others: buffered writes only
                self.direct = None
        self.jobs: queue.Queue = queue.Queue()
        self.free: queue.Queue = queue.Queue()
        for _ in range(BUFFERS):
            self.free.put(_aligned_buffer(BLOCK_BYTES + ALIGN))
        self.error: BaseException | None = None
        self.sources: dict[str, int] = {}
        self.thread = threading.Thread(target=self._run, name="flashnorm-writer", daemon=True)
        self.thread.start()

    def buffer(self, nbytes: int) -> np.ndarray:
        """A buffer of at least ``nbytes`` (one of the pool when it fits, else a new one)."""
        self._raise()
        if nbytes > BLOCK_BYTES + ALIGN:
            return _aligned_buffer(nbytes)
        t = time.perf_counter()
        try:
            while True:
                try:
                    return self.free.get(timeout=1.0)
                except queue.Empty:
                    self._raise()
        finally:
            STATS["wait"] += time.perf_counter() - t

    def write(self, buf: np.ndarray, start: int, nbytes: int, offset: int) -> None:
        """Write ``buf[start:start + nbytes]`` at ``offset``; ``start == offset % ALIGN`` lets the
        block's whole pages go out directly (the buffer must be one from :meth:`buffer`)."""
        self._raise()
        self.jobs.put(("write", buf, start, nbytes, offset))

    def copy(self, path: str, src_offset: int, nbytes: int, offset: int) -> None:
        self._raise()
        self.jobs.put(("copy", path, src_offset, nbytes, offset))

    def close(self) -> None:
        self._stop()
        self._raise()

    def abort(self) -> None:
        self._stop()

    def _stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        for fd in [*self.sources.values(), *([self.direct] if self.direct is not None else [])]:
            os.close(fd)
        self.sources.clear()
        self.direct = None

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is not None:
                if job[0] == "write":
                    self._recycle(job[1])
                continue
            t = time.perf_counter()
            try:
                if job[0] == "write":
                    _, buf, start, nbytes, offset = job
                    self._write(memoryview(buf), start, nbytes, offset, buf.ctypes.data % ALIGN == 0)
                    self._recycle(buf)
                    STATS["write"] += time.perf_counter() - t
                else:
                    _, path, src_offset, nbytes, offset = job
                    src = self.sources.get(path)
                    if src is None:
                        src = self.sources[path] = os.open(path, os.O_RDONLY)
                    copy_range(src, self.fd, src_offset, nbytes, offset)
                    STATS["copy"] += time.perf_counter() - t
            except BaseException as e:  # noqa: BLE001 - handed to the submitting thread
                self.error = e
                if job[0] == "write":
                    self._recycle(job[1])

    def _write(self, view: memoryview, start: int, nbytes: int, offset: int, aligned: bool) -> None:
        end = offset + nbytes
        a0 = -(-offset // ALIGN) * ALIGN  # the block's whole pages: [a0, a1)
        a1 = end // ALIGN * ALIGN
        if self.direct is not None and aligned and a1 > a0 and start == offset % ALIGN:
            try:
                _pwrite_all(self.direct, view[start + a0 - offset: start + a1 - offset], a0)
            except OSError:  # direct I/O refused after all: buffered from here on
                os.close(self.direct)
                self.direct = None
            else:
                _pwrite_all(self.fd, view[start: start + a0 - offset], offset)
                _pwrite_all(self.fd, view[start + a1 - offset: start + nbytes], a1)
                return
        _pwrite_all(self.fd, view[start: start + nbytes], offset)

    def _recycle(self, buf: np.ndarray) -> None:
        if buf.nbytes == BLOCK_BYTES + ALIGN:
            self.free.put(buf)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


_copy_file_range_works = hasattr(os, "copy_file_range")


def copy_range(src: int, dst: int, src_offset: int, nbytes: int, dst_offset: int) -> None:
    """Copy ``nbytes`` from ``src`` at ``src_offset`` to ``dst`` at ``dst_offset``: by the kernel
    (``copy_file_range``) where it can, else through one buffer."""
    global _copy_file_range_works
    done = 0
    while done < nbytes and _copy_file_range_works:
        try:
            n = os.copy_file_range(src, dst, min(nbytes - done, 1 << 30), src_offset + done, dst_offset + done)
        except OSError:  # EXDEV on old kernels, ENOSYS, EINVAL on some file systems
            _copy_file_range_works = False
            break
        if n <= 0:
            raise OSError(f"unexpected end of file copying {nbytes} bytes at offset {src_offset}")
        done += n
    if done < nbytes:
        buf = bytearray(min(BLOCK_BYTES, nbytes - done))
        while done < nbytes:
            view = memoryview(buf)[: min(len(buf), nbytes - done)]
            read_exactly(src, view, src_offset + done)
            written = 0
            while written < len(view):
                written += os.pwrite(dst, view[written:], dst_offset + done + written)
            done += len(view)


def _initializers(model: ir.Model) -> list[ir.Value]:
    return [v for graph in model.graphs() for v in graph.initializers.values() if v.const_value is not None]


class _AttributeSlot:
    """A node attribute's tensor (a Constant's ``value``, one of a TENSORS list) seen as an
    initializer value is: ``const_value`` reads and replaces it in the node."""

    def __init__(self, node, attribute: str, index: int | None):
        self.node, self.attribute, self.index = node, attribute, index

    @property
    def name(self) -> str | None:
        return self.const_value.name

    @property
    def const_value(self):
        value = self.node.attributes[self.attribute].value
        return value if self.index is None else value[self.index]

    @const_value.setter
    def const_value(self, tensor) -> None:
        old = self.node.attributes[self.attribute]
        value = tensor if self.index is None else [*old.value[: self.index], tensor, *old.value[self.index + 1:]]
        self.node.attributes[self.attribute] = ir.Attr(self.attribute, old.type, value, doc_string=old.doc_string)


def _external_attribute_tensors(model: ir.Model) -> list[_AttributeSlot]:
    """Attribute tensors whose data is in an external file (beside the input): their bytes go into
    the output's data file, else the output would reference a file that is not beside it."""
    from flashnorm_onnx.io.walk import attribute_tensors

    return [_AttributeSlot(node, name, index) for node, name, index, tensor in attribute_tensors(model)
            if isinstance(tensor, ir.ExternalTensor)]


def _sample_for(tensor, sample_window: Callable) -> tuple[slice, np.ndarray] | None:
    """(columns, empty array) for a folded ``[K, N]`` weight the subgraph check samples, else None."""
    shape = tuple(int(d) for d in tensor.shape.numpy())
    if tensor.k_axis != 0 or len(shape) != 2:
        return None  # [N, K]: the sampled output columns are whole rows, one contiguous read
    cols = sample_window(shape, 0, tensor.dtype.itemsize)
    if cols is None:
        return None
    return cols, np.empty((shape[0], cols.stop - cols.start), dtype=tensor.dtype.numpy())


def save_with_external_data(
    model: ir.Model,
    path: Path,
    data_name: str,
    progress: Callable[[int, int], None] | None = None,
    keep_samples: dict | None = None,
    read_back: bool = True,
    copied: dict | None = None,
    sample_window: Callable | None = None,
) -> None:
    """``ir.save(model, path, external_data=data_name)``, streamed (see the module docstring).

    ``progress(bytes_done, bytes_total)`` is called as the data file fills. ``keep_samples``: a
    dict that receives, for each folded ``[K, N]`` weight the subgraph check runs on sampled
    columns, ``name -> (columns, array)`` copied from the buffers as they are written (see
    ``sample_window(shape, k_axis, itemsize)``: the columns the check runs on, or None: the
    verification's plan, ``verify.subgraph.sample_window``), so the check need not read them back
    from the disk.
    ``read_back``: whether something reads the whole output afterwards (see :func:`_use_direct`).
    ``copied``: a dict that receives, for each tensor copied unchanged from an external data file,
    ``name -> (source path, source offset, bytes, data file written, offset in it)``: what the plan-diff check
    (``verify_plan``) compares with the input's own locations instead of reading both back."""
    path = Path(path)
    layout = _plan_data_file(model)
    data_path = path.parent / data_name
    _write_data_file(layout, data_path, read_back, progress, keep_samples, copied, sample_window)
    _write_model_file(model, path, data_name, layout)


@dataclasses.dataclass
class _DataLayout:
    """Where each tensor goes in the data file, as ``onnx_ir.save`` lays it out (see :func:`_plan_data_file`)."""

    values: list[ir.Value]
    """Every initializer with a value (the model file's references replace theirs)."""
    small_external: list[ir.Value]
    """Initializers of at most :data:`SIZE_THRESHOLD` bytes kept in an external file: inlined."""
    attributes: list[_AttributeSlot]
    """Attribute tensors in external data: written after the initializers."""
    entries: list[tuple[ir.Value | _AttributeSlot, int, int]]
    """``(value, offset in the data file, bytes)`` in file order."""
    total: int
    """The data file's size."""


def _plan_data_file(model: ir.Model) -> _DataLayout:
    """The data file's layout: the initializers of over :data:`SIZE_THRESHOLD` bytes in declaration
    order, then the external attribute tensors, packed densely."""
    values = _initializers(model)
    big = [v for v in values if v.const_value.nbytes > SIZE_THRESHOLD]
    small_external = [v for v in values if v.const_value.nbytes <= SIZE_THRESHOLD
                      and isinstance(v.const_value, ir.ExternalTensor)]
    # external attribute tensors (rare: onnx.save_model's external data moves Constants' values
    # too) stay external, after the initializers; they are not initializers: not in ``copied``
    attributes = _external_attribute_tensors(model)
    plan: list[tuple[ir.Value | _AttributeSlot, int, int]] = []
    offset = 0
    for v in [*big, *attributes]:
        plan.append((v, offset, v.const_value.nbytes))
        offset += v.const_value.nbytes
    return _DataLayout(values, small_external, attributes, plan, offset)


def _write_data_file(
    layout: _DataLayout,
    data_path: Path,
    read_back: bool,
    progress: Callable[[int, int], None] | None,
    keep_samples: dict | None,
    copied: dict | None,
    sample_window: Callable | None,
) -> None:
    """Create ``data_path`` and stream the layout's tensors into it through a writer thread
    (:class:`_DataStream`); the file is closed, and the writer stopped, whatever happens."""
    fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    writer = _Writer(fd, data_path if _use_direct(layout.total, read_back) else None)
    try:
        stream = _DataStream(writer, data_path, layout.total, progress, keep_samples, copied, sample_window)
        stream.write_all(layout.entries)
        writer.close()
    except BaseException:
        writer.abort()
        os.close(fd)
        raise
    os.close(fd)


class _DataStream:
    """Feeds the data file's writer, tensor by tensor in file order, and reports progress.

    Tensors copied unchanged from an external data file are coalesced into one kernel copy while
    they are adjacent in both files (``pending``); a folded tensor is folded block by block into
    the writer's buffers; any other tensor is written from its bytes in memory."""

    def __init__(self, writer: _Writer, data_path: Path, total: int,
                 progress: Callable[[int, int], None] | None, keep_samples: dict | None,
                 copied: dict | None, sample_window: Callable | None):
        """The state of one data file's stream (the arguments: see :func:`save_with_external_data`)."""
        self.writer = writer
        self.data_path = data_path
        self.total = total
        self.progress = progress
        self.keep_samples = keep_samples
        self.copied = copied
        self.sample_window = sample_window
        self.done = 0
        self.reported = 0
        self.pending: list | None = None  # a kernel copy being extended: [path, src_offset, nbytes, dst_offset]

    def write_all(self, entries: list[tuple[ir.Value | _AttributeSlot, int, int]]) -> None:
        """Hand every ``(value, offset, bytes)`` of the layout to the writer, the way its tensor needs."""
        from flashnorm_onnx.passes.fold_math import FoldedTensor

        for value, dst_offset, nbytes in entries:
            tensor = value.const_value
            source = external_source(tensor) if not isinstance(tensor, FoldedTensor) else None
            if source is not None:
                self.copy_unchanged(value, source, dst_offset, nbytes)
                continue
            self.flush_copy()
            if isinstance(tensor, FoldedTensor) and tensor.streamable():
                self.write_folded(value, tensor, dst_offset)
            else:
                self.write_in_memory(tensor, dst_offset, nbytes)
        self.flush_copy()

    def copy_unchanged(self, value, source: tuple, dst_offset: int, nbytes: int) -> None:
        """A tensor copied unchanged from ``source`` (path, offset, ...): recorded in ``copied``,
        and added to the pending kernel copy when it continues it in both files."""
        src_path, src_offset, _ = source
        if self.copied is not None and not isinstance(value, _AttributeSlot):
            self.copied[value.name] = (str(src_path), int(src_offset), int(nbytes), str(self.data_path),
                                       int(dst_offset))
        pending = self.pending
        if (pending is not None and pending[0] == src_path and pending[1] + pending[2] == src_offset
                and pending[3] + pending[2] == dst_offset):
            pending[2] += nbytes
        else:
            self.flush_copy()
            self.pending = [src_path, src_offset, nbytes, dst_offset]
        if self.writer.direct is None:
            self.advance(nbytes)

    def flush_copy(self) -> None:
        """Hand the pending copy, if any, to the writer."""
        if self.pending is None:
            return
        source, src_offset, nbytes, dst_offset = self.pending
        self.pending = None
        if self.writer.direct is None:
            self.copy_by_kernel(source, src_offset, nbytes, dst_offset)
            return
        self.copy_as_blocks(source, src_offset, nbytes, dst_offset)

    def copy_by_kernel(self, source: str, src_offset: int, nbytes: int, dst_offset: int) -> None:
        """The copy as kernel copies of at most :data:`COPY_CHUNK` bytes (progress was counted
        when the tensors were queued)."""
        # the kernel copies through the page cache: fastest while the dirty pages stay under
        # the kernel's writeback threshold, which is when direct writes are not used
        for k in range(0, nbytes, COPY_CHUNK):
            self.writer.copy(source, src_offset + k, min(COPY_CHUNK, nbytes - k), dst_offset + k)

    def copy_as_blocks(self, source: str, src_offset: int, nbytes: int, dst_offset: int) -> None:
        """The copy read into the writer's buffers and written as folded blocks are (direct writes)."""
        # direct writes: a large copy through the page cache would be throttled to the disk's
        # writeback speed behind them; read the range in blocks and write it as folded blocks are
        src = os.open(source, os.O_RDONLY)
        try:
            for k in range(0, nbytes, BLOCK_BYTES):
                n = min(BLOCK_BYTES, nbytes - k)
                at = dst_offset + k
                pad = at % ALIGN
                buf = self.writer.buffer(pad + n)
                t = time.perf_counter()
                read_exactly(src, memoryview(buf)[pad: pad + n], src_offset + k)
                STATS["read"] += time.perf_counter() - t
                self.writer.write(buf, pad, n, at)
                self.advance(n)
        finally:
            os.close(src)

    def write_folded(self, value, tensor, dst_offset: int) -> None:
        """A folded tensor, block by block into the writer's buffers; the sampled columns the
        subgraph check runs on are kept in ``keep_samples`` as they pass."""
        sample = _sample_for(tensor, self.sample_window) if self.keep_samples is not None else None
        for start, block_bytes, fill in tensor.blocks(BLOCK_BYTES):
            at = dst_offset + start
            pad = at % ALIGN  # the buffer's pages line up with the file's
            buf = self.writer.buffer(pad + block_bytes)
            t = time.perf_counter()
            fill(buf[pad: pad + block_bytes])
            if sample is not None:  # the sampled columns, from the bytes about to be written
                cols, kept = sample
                block = buf[pad: pad + block_bytes].view(kept.dtype).reshape(-1, int(tensor.shape[1]))
                r0 = start // (block.shape[1] * kept.dtype.itemsize)
                kept[r0: r0 + block.shape[0]] = block[:, cols]
            STATS["fold"] += time.perf_counter() - t
            self.writer.write(buf, pad, block_bytes, at)
            self.advance(block_bytes)
        if sample is not None:
            self.keep_samples[value.name] = sample

    def write_in_memory(self, tensor, dst_offset: int, nbytes: int) -> None:
        """A tensor written from its bytes in memory, which must be the ``nbytes`` its shape needs."""
        data = tensor.tobytes()
        if len(data) != nbytes:
            raise ValueError(f"tensor '{tensor.name}' holds {len(data)} bytes, its shape needs {nbytes}")
        buf = np.frombuffer(data, dtype=np.uint8)
        self.writer.write(buf, 0, nbytes, dst_offset)
        self.advance(nbytes)

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` done; report progress every 64 MiB and at the end."""
        self.done += nbytes
        if self.progress is not None and (self.done - self.reported >= 64 << 20 or self.done == self.total):
            self.reported = self.done
            self.progress(self.done, self.total)


def _write_model_file(model: ir.Model, path: Path, data_name: str, layout: _DataLayout) -> None:
    """The model file: each written tensor becomes a reference into the data file, as ir.save does
    (small external initializers are inlined); the model's tensors are restored afterwards."""
    saved = [(v, v.const_value) for v in [*layout.values, *layout.attributes]]
    try:
        for value, dst_offset, nbytes in layout.entries:
            t = value.const_value
            value.const_value = ir.ExternalTensor(
                os.path.normpath(data_name), dst_offset, nbytes, t.dtype, shape=t.shape, name=t.name,
                base_dir=os.path.normpath(str(path.parent)),
            )
        for value in layout.small_external:
            t = value.const_value
            value.const_value = ir.Tensor(t.numpy().copy(), name=t.name, dtype=t.dtype)
        proto = ir.serde.serialize_model(model)
        onnx.save(proto, str(path))
    finally:
        for value, tensor in saved:
            value.const_value = tensor
