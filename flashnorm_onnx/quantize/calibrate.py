"""Collects the activation statistics of ``--calibrate`` by running the float model in ONNX Runtime with the values the search needs exposed as extra outputs.

A copy of the model's graph (the file's ``ModelProto`` without its tensor data; the session reads
the weights from the input's own external data files, so nothing is written) gets each requested
intermediate value as a graph output. The copy computes the same function: only outputs are
added. For each value, over every token of every run:

* per channel (the last axis): the count, the sum of |x| and of x^2 -- mean|x| places the norms'
  scales, E[x^2] weighs each input channel's share of a linear's output error;
* for the values named in ``rows``: the activations themselves, up to ``max_rows`` rows (tokens),
  for the output-error objective of the scale search, and (for at most :data:`MAX_COV_CHANNELS`
  channels) the second-moment matrix E[x x^T] over every token, whose diagonal blocks weigh the
  clip search's error by the block's input covariance.

Models larger than memory stream: when the model's initializers take more than a cap (default
:data:`MEMORY_FRACTION` of the memory available, from ``/proc/meminfo``), :func:`collect` runs the
graph piece by piece (:mod:`flashnorm_onnx.quantize.pieces`): consecutive nodes holding at most the
cap in weights each, one session at a time, every feed through it, the boundary values a later
piece reads kept per feed. Each value's statistics are gathered as its piece computes it, feeds in
the same order, so they equal the whole run's (to float rounding). Peak memory is about one piece's
weights plus the boundary activations of all feeds (for a decoder: the hidden state and what the
layers share, such as rotary tables and the attention mask).

Token ids come from the caller (:func:`tokenize`): the text is the calibration corpus, never an
evaluation text.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np

from flashnorm_onnx import memory
from flashnorm_onnx.errors import FlashNormError
from flashnorm_onnx.quantize import pieces

#: Rows of activations kept per value for the output-error objective (tokens beyond are counted
#: in the per-channel statistics only).
MAX_ROWS = 2048
#: The full second-moment matrix [K, K] is kept for row values of at most this many channels
#: (float64: 32 MiB at 2048); wider values fall back to the kept rows' blocks.
MAX_COV_CHANNELS = 2048
#: Above this fraction of the memory available, the model's weights are not loaded at once: the
#: calibration runs the graph piece by piece, each piece holding at most this many bytes of weights.
MEMORY_FRACTION = 0.25

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ActivationStats:
    """What was seen of one intermediate value [..., K] over the calibration tokens."""

    name: str
    count: int = 0
    abs_sum: np.ndarray | None = None
    sq_sum: np.ndarray | None = None
    rows: list[np.ndarray] = dataclasses.field(default_factory=list)
    kept_rows: int = 0
    gram: np.ndarray | None = None
    """sum over tokens of x x^T [K, K] (values in ``rows`` of at most MAX_COV_CHANNELS channels)."""

    def add(self, x: np.ndarray, keep_rows: int) -> None:
        x = np.asarray(x, dtype=np.float32)
        x = x.reshape(-1, x.shape[-1])
        x64 = x.astype(np.float64)
        if self.abs_sum is None:
            self.abs_sum = np.zeros(x.shape[1])
            self.sq_sum = np.zeros(x.shape[1])
        self.abs_sum += np.abs(x64).sum(axis=0)
        self.sq_sum += (x64 * x64).sum(axis=0)
        self.count += x.shape[0]
        if keep_rows and x.shape[1] <= MAX_COV_CHANNELS:
            if self.gram is None:
                self.gram = np.zeros((x.shape[1], x.shape[1]))
            self.gram += x64.T @ x64
        room = keep_rows - self.kept_rows
        if room > 0:
            self.rows.append(np.ascontiguousarray(x[:room]))
            self.kept_rows += min(room, x.shape[0])

    @property
    def mean_abs(self) -> np.ndarray:
        """Per channel: mean |x| over the tokens."""
        return self.abs_sum / max(self.count, 1)

    @property
    def mean_sq(self) -> np.ndarray:
        """Per channel: E[x^2] over the tokens."""
        return self.sq_sum / max(self.count, 1)

    @property
    def second_moment(self) -> np.ndarray | None:
        """E[x x^T] [K, K] over every token, where it was kept (else None)."""
        return None if self.gram is None else self.gram / max(self.count, 1)

    def block_moments(self, block: int) -> np.ndarray | None:
        """E[x_b x_b^T] for each block b of ``block`` consecutive channels: [blocks, block, block]
        (a last partial block zero-padded), over every token where the full matrix was kept, else over
        the kept rows; None when neither was kept."""
        if self.gram is not None:
            return diagonal_blocks(self.gram / max(self.count, 1), block)
        if not self.kept_rows:
            return None
        r = self.row_matrix()
        k = r.shape[1]
        out = np.zeros((-(-k // block), block, block))
        for b in range(out.shape[0]):
            part = r[:, b * block:(b + 1) * block].astype(np.float64)
            out[b, :part.shape[1], :part.shape[1]] = part.T @ part / r.shape[0]
        return out

    def row_matrix(self) -> np.ndarray:
        """The kept rows [R, K] (float32)."""
        return np.concatenate(self.rows, axis=0) if self.rows else np.zeros((0, self.abs_sum.size), np.float32)


def diagonal_blocks(matrix: np.ndarray, block: int) -> np.ndarray:
    """The diagonal blocks [blocks, block, block] of a square matrix (a last partial block zero-padded)."""
    k = matrix.shape[0]
    blocks = -(-k // block)
    out = np.zeros((blocks, block, block), dtype=matrix.dtype)
    for b in range(blocks):
        part = matrix[b * block:(b + 1) * block, b * block:(b + 1) * block]
        out[b, :part.shape[0], :part.shape[1]] = part
    return out


@dataclasses.dataclass
class Calibration:
    """The statistics of one calibration run."""

    stats: dict[str, ActivationStats]
    tokens: int
    runs: int
    seconds: float


class CalibrationError(FlashNormError):
    """The calibration cannot run (no text, no tokenizer, no token input); the message is one line."""

    exit_code = 2


def read_text(path: str | os.PathLike | None) -> tuple[str, str]:
    """(text, where it came from): the file's text, or the bundled text for None."""
    if path is None:
        from flashnorm_onnx.quantize.calibration_text import TEXT

        return TEXT, "the bundled calibration text"
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"--calibrate: calibration text '{path}' not found (a UTF-8 text file; "
                               "without a path, the bundled text is used)")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CalibrationError(f"--calibrate: calibration text '{path}' is empty")
    return text, str(p)


def find_tokenizer(model_path: str | os.PathLike, given: str | os.PathLike | None = None) -> Path:
    """``tokenizer.json`` for the model: the one given, else the one beside the model file."""
    if given is not None:
        p = Path(given)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise CalibrationError(f"--tokenizer: '{given}' not found (a Hugging Face tokenizer.json)")
        return p
    p = Path(model_path).parent / "tokenizer.json"
    if not p.is_file():
        raise CalibrationError(f"--calibrate needs the model's tokenizer to read the text: no tokenizer.json beside "
                               f"{model_path}; give one with --tokenizer PATH")
    return p


def tokenize(text: str, tokenizer: Path, vocab: int | None) -> np.ndarray:
    """Token ids of ``text`` by a Hugging Face ``tokenizer.json`` (the ``tokenizers`` package)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CalibrationError("--calibrate needs the 'tokenizers' package (pip install tokenizers)") from None
    try:
        ids = np.array(Tokenizer.from_file(str(tokenizer)).encode(text).ids, dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - a broken file: one line
        raise CalibrationError(f"--calibrate: cannot use tokenizer '{tokenizer}': {e}") from None
    if ids.size < 2:
        raise CalibrationError("--calibrate: the calibration text gives fewer than 2 tokens")
    if vocab is not None and ids.max() >= vocab:
        raise CalibrationError(f"--calibrate: tokenizer '{tokenizer}' gives token id {int(ids.max())}, past the "
                               f"model's embedding ({vocab} rows): not this model's tokenizer")
    return ids


def windows(ids: np.ndarray, length: int) -> list[np.ndarray]:
    """``ids`` cut into consecutive windows of at most ``length`` tokens (the last may be shorter;
    one of fewer than 2 tokens is dropped)."""
    out = [ids[i:i + length] for i in range(0, ids.size, length)]
    return [w for w in out if w.size >= 2] or [ids]


def weight_bytes(proto) -> int:
    """Bytes of the main graph's initializers (external or inline), read from the protos only."""
    return sum(pieces.tensor_bytes(t) for t in proto.graph.initializer) + sum(
        pieces.tensor_bytes(t.values) for t in proto.graph.sparse_initializer)


def piece_cap() -> int | None:
    """The default weight bytes held at once: :data:`MEMORY_FRACTION` of the memory available now
    (None where unknown: the whole model is run)."""
    available = memory.available_memory()
    return None if available is None else int(available * MEMORY_FRACTION)


def collect(model_path: str | os.PathLike, feeds: list[dict[str, np.ndarray]], values: dict[str, int],
            rows: set[str] = frozenset(), max_rows: int = MAX_ROWS, threads: int | None = None,
            cap: int | None = None) -> Calibration:
    """Run the model at ``model_path`` on each feed dict with ``values`` (name -> ONNX element type)
    exposed as extra outputs, and gather their statistics (:class:`ActivationStats`); the values in
    ``rows`` also keep up to ``max_rows`` rows of activations.

    When the model's initializers take more than ``cap`` bytes (default :func:`piece_cap`), the
    graph is run piece by piece (:mod:`flashnorm_onnx.quantize.pieces`), each piece of at most
    ``cap`` bytes of weights; the statistics are the same."""
    import onnx

    start = time.perf_counter()
    path = Path(model_path)
    proto = onnx.load(str(path), load_external_data=False)
    if cap is None:
        cap = piece_cap()
    if cap is not None and weight_bytes(proto) > cap:
        del proto
        return _collect_pieces(path, feeds, values, rows, max_rows, threads, cap, start)
    import onnxruntime as ort

    declared = {o.name for o in proto.graph.output}
    names = [n for n in values if n not in declared]
    for name in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, values[name], None))
    # the copy is given as bytes: its external tensors are read from the input's folder
    options = pieces.session_options(path.parent, threads)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del proto
    wanted = list(values)
    stats = {n: ActivationStats(n) for n in wanted}
    for feed in feeds:
        outputs = session.run(wanted, feed)
        for name, x in zip(wanted, outputs):
            stats[name].add(x, max_rows if name in rows else 0)
    return Calibration(stats=stats, tokens=_tokens(feeds), runs=len(feeds), seconds=time.perf_counter() - start)


def _tokens(feeds: list[dict[str, np.ndarray]]) -> int:
    return sum(int(max((v.size for v in feed.values() if v.dtype.kind in "iu"), default=0)) for feed in feeds)


def _collect_pieces(path: Path, feeds, values, rows, max_rows, threads, cap, start) -> Calibration:
    """:func:`collect` piece by piece: each value's statistics gathered as its piece computes it (for
    each value, the feeds in the same order as the whole run)."""
    stats = {n: ActivationStats(n) for n in values}

    def on_value(_feed: int, name: str, x: np.ndarray) -> None:
        stats[name].add(x, max_rows if name in rows else 0)

    logger.info("calibration: the model's weights exceed %.0f MB: running it piece by piece", cap / 2**20)
    pieces.run(path, feeds, cap, list(values), on_value, threads=threads)
    return Calibration(stats=stats, tokens=_tokens(feeds), runs=len(feeds), seconds=time.perf_counter() - start)
