"""Runs a model too large for memory piece by piece: the main graph cut into consecutive pieces of bounded weight bytes, each run in ONNX Runtime as its own model.

:func:`partition` walks the main graph's nodes in their (topological) order and cuts them into
consecutive pieces whose initializer bytes stay under a cap (a node whose own weights exceed the cap
gets a piece of its own). Each :class:`Piece` is a model of its own (:func:`piece_model`):

* its inputs are the values its nodes read that graph inputs or earlier pieces produce; a node with
  subgraphs (If, Loop, Scan) reads, besides its inputs, every outer value its bodies read;
* its outputs are the values it produces that later pieces or the graph outputs read, plus the
  requested values it produces;
* its initializers are those of the main graph its nodes (or their bodies) read, with their
  external-data references kept: the session reads them from the input's folder, so nothing is
  written and only this piece's weights are loaded. An initializer read by two pieces is in both.

:func:`run` runs the pieces in order: for each piece, one session, every feed through it, then the
session is dropped. Between pieces it keeps, per feed, only the boundary values a later piece
still reads (each is dropped after its last reader), so peak memory is about one piece's weights
plus the boundary activations of every feed (the sessions do not prepack weights, which would
hold a second copy of them; for a decoder: a few hidden states of
[tokens, hidden] float32 each, per boundary). A piece whose outputs nothing needs is not run.

:func:`check` proves a partition sound before anything runs: every node in exactly one piece, and
every value a piece reads is a graph input, an initializer, or an output of an earlier piece. A
value read before any piece produced it raises :class:`PieceError`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from flashnorm_onnx.errors import FlashNormError

logger = logging.getLogger(__name__)

#: onnx.TensorProto.EXTERNAL, onnx.AttributeProto.GRAPH / GRAPHS / TENSOR
_EXTERNAL, _GRAPH, _GRAPHS, _TENSOR = 1, 5, 10, 4


class PieceError(FlashNormError):
    """A partition that cannot compute the graph (a value read before it is produced, a node in no
    piece or in two); the message is one line."""

    exit_code = 2


@dataclasses.dataclass
class Piece:
    """Consecutive nodes of the main graph, run as one model."""

    index: int
    nodes: list[int]
    """Indices into the main graph's node list, in order."""
    inputs: list[str] = dataclasses.field(default_factory=list)
    outputs: list[str] = dataclasses.field(default_factory=list)
    initializers: list[str] = dataclasses.field(default_factory=list)
    weight_bytes: int = 0


def tensor_bytes(tensor) -> int:
    """Bytes of a TensorProto's data (external or inline) without reading it."""
    if tensor.data_location == _EXTERNAL:
        for entry in tensor.external_data:
            if entry.key == "length":
                return int(entry.value)
    if tensor.raw_data:
        return len(tensor.raw_data)
    import onnx

    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    try:
        size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:  # noqa: BLE001 - an exotic type (int4, float8): a byte each is close enough
        size = 1
    return count * size


def _subgraphs(node) -> Iterable:
    for a in node.attribute:
        if a.type == _GRAPH:
            yield a.g
        elif a.type == _GRAPHS:
            yield from a.graphs


def outer_reads(graph) -> set[str]:
    """The names a (sub)graph reads from its enclosing scopes: read by its nodes (or their bodies)
    and defined neither by its inputs, its initializers nor its nodes."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    reads: set[str] = set()
    for node in graph.node:
        reads |= {n for n in node.input if n and n not in defined}
        for sub in _subgraphs(node):
            reads |= outer_reads(sub) - defined
        defined |= {n for n in node.output if n}
    return reads


def node_reads(node) -> list[str]:
    """What a node of the main graph reads: its inputs, then the outer values its bodies read."""
    out = [n for n in node.input if n]
    seen = set(out)
    for sub in _subgraphs(node):
        for n in sorted(outer_reads(sub)):
            if n not in seen:
                seen.add(n)
                out.append(n)
    return out


def _constant_bytes(node) -> int:
    return sum(tensor_bytes(a.t) for a in node.attribute if a.type == _TENSOR) if node.op_type == "Constant" else 0


def partition(graph, cap: int, requested: Iterable[str] = ()) -> list[Piece]:
    """The main graph's nodes cut into consecutive pieces of at most ``cap`` initializer bytes each
    (a single node over the cap alone in its piece), with each piece's inputs, outputs (including the
    ``requested`` values it produces) and initializers; checked by :func:`check`."""
    inits = {t.name: t for t in graph.initializer} | {t.values.name: t.values for t in graph.sparse_initializer}
    reads = [node_reads(n) for n in graph.node]
    groups: list[list[int]] = []
    current: list[int] = []
    held: set[str] = set()
    size = 0
    for i, node in enumerate(graph.node):
        new = {n for n in reads[i] if n in inits} - held
        extra = sum(tensor_bytes(inits[n]) for n in new) + _constant_bytes(node)
        if current and size + extra > cap:
            groups.append(current)
            current, held, size = [], set(), 0
            new = {n for n in reads[i] if n in inits}
            extra = sum(tensor_bytes(inits[n]) for n in new) + _constant_bytes(node)
        current.append(i)
        held |= new
        size += extra
    if current:
        groups.append(current)
    return describe(graph, groups, requested)


def describe(graph, groups: list[list[int]], requested: Iterable[str] = ()) -> list[Piece]:
    """Pieces of the given node groups (indices into the main graph's nodes, in run order): their
    inputs, outputs and initializers; checked by :func:`check`."""
    inits = {t.name: t for t in graph.initializer} | {t.values.name: t.values for t in graph.sparse_initializer}
    requested = set(requested)
    graph_outputs = {o.name for o in graph.output}
    reads = {i: node_reads(n) for i, n in enumerate(graph.node)}
    produced_in: dict[str, int] = {}
    for k, group in enumerate(groups):
        for i in group:
            for n in graph.node[i].output:
                if n:
                    produced_in[n] = k
    read_by: dict[str, set[int]] = {}
    pieces = []
    for k, group in enumerate(groups):
        piece = Piece(index=k, nodes=list(group))
        own = set()
        for i in group:
            for n in reads[i]:
                if n in own:
                    continue
                if n in inits:
                    if n not in piece.initializers:
                        piece.initializers.append(n)
                        piece.weight_bytes += tensor_bytes(inits[n])
                elif n not in piece.inputs:
                    piece.inputs.append(n)
                    read_by.setdefault(n, set()).add(k)
            own |= {n for n in graph.node[i].output if n}
            piece.weight_bytes += _constant_bytes(graph.node[i])
        pieces.append(piece)
    for piece in pieces:
        for i in piece.nodes:
            for n in graph.node[i].output:
                if n and (n in graph_outputs or n in requested or any(r > piece.index for r in read_by.get(n, ()))):
                    piece.outputs.append(n)
    check(graph, pieces)
    return pieces


def check(graph, pieces: list[Piece]) -> None:
    """Raise :class:`PieceError` unless the pieces compute the graph: every node in exactly one
    piece, pieces in the graph's node order, and every piece input a graph input or an output of an
    earlier piece (every initializer read carried by the piece)."""
    count = len(graph.node)
    seen = [i for p in pieces for i in p.nodes]
    if sorted(seen) != list(range(count)):
        missing = sorted(set(range(count)) - set(seen))
        twice = sorted({i for i in seen if seen.count(i) > 1})
        raise PieceError(f"partition: nodes in no piece {missing[:5]}, in two {twice[:5]}")
    inits = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    available = {i.name for i in graph.input if i.name not in inits}
    for piece in pieces:
        for n in piece.inputs:
            if n not in available:
                raise PieceError(f"piece {piece.index}: value '{n}' is read before any earlier piece or graph "
                                 "input produces it")
        own = set(piece.inputs) | set(piece.initializers)
        for i in piece.nodes:
            node = graph.node[i]
            for n in node_reads(node):
                if n not in own:
                    what = "initializer" if n in inits else "value"
                    raise PieceError(f"piece {piece.index}: node '{node.name or node.op_type}' reads {what} '{n}' "
                                     "that the piece neither has nor produces before it")
            own |= {n for n in node.output if n}
        available |= set(piece.outputs)


def piece_model(proto, piece: Piece, types: dict[str, object], arrays: dict[str, np.ndarray] | None = None):
    """The :class:`Piece` as a ``ModelProto`` (the model's opsets, functions and IR version; its
    initializers with their external-data references kept). ``types``: known ValueInfoProtos by name;
    an input without one is typed from ``arrays``; an output without one is left untyped (ONNX Runtime
    infers it)."""
    import onnx
    from onnx import helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    sparse = {t.values.name: t for t in graph.sparse_initializer}

    def info(name: str, is_input: bool):
        if name in types:
            return types[name]
        if is_input and arrays is not None and name in arrays:
            return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arrays[name].dtype), None)
        return onnx.ValueInfoProto(name=name)

    g = onnx.GraphProto(name=f"{graph.name}_piece{piece.index}")
    g.node.extend(graph.node[i] for i in piece.nodes)
    g.initializer.extend(inits[n] for n in piece.initializers if n in inits)
    g.sparse_initializer.extend(sparse[n] for n in piece.initializers if n in sparse)
    g.input.extend(info(n, True) for n in piece.inputs)
    g.output.extend(info(n, False) for n in piece.outputs)
    model = onnx.ModelProto(ir_version=proto.ir_version, producer_name="flashnorm-onnx piece",
                            graph=g)
    model.opset_import.extend(proto.opset_import)
    model.functions.extend(proto.functions)
    return model


def value_types(proto) -> dict[str, object]:
    """The ValueInfoProtos the model declares (inputs, outputs, value_info), by name."""
    out = {v.name: v for v in proto.graph.value_info}
    out.update({v.name: v for v in proto.graph.output})
    out.update({v.name: v for v in proto.graph.input})
    return {k: v for k, v in out.items() if v.type.HasField("tensor_type")}


def run(model_path: str | os.PathLike, feeds: list[dict[str, np.ndarray]], cap: int, wanted: Iterable[str],
        on_value: Callable[[int, str, np.ndarray], None], keep_outputs: bool = False,
        threads: int | None = None, pieces: list[Piece] | None = None) -> list[dict[str, np.ndarray]]:
    """Run the model at ``model_path`` piece by piece (:func:`partition` at ``cap`` bytes, or the
    ``pieces`` given) on each feed, calling ``on_value(feed index, name, array)`` for each ``wanted``
    value as its piece computes it (for each value: feeds in order). Returns, per feed, the graph
    outputs when ``keep_outputs`` (else empty dicts)."""
    import onnx
    import onnxruntime as ort

    path = Path(model_path)
    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    wanted = list(dict.fromkeys(wanted))
    inputs = {i.name for i in graph.input}
    if pieces is None:
        pieces = partition(graph, cap, wanted)
    else:
        check(graph, pieces)
    produced = {n for p in pieces for n in p.outputs}
    unknown = [n for n in wanted if n not in produced and n not in inputs]
    if unknown:
        raise PieceError(f"no piece produces the requested value '{unknown[0]}'")
    graph_outputs = [o.name for o in graph.output]
    # backwards: which pieces are needed, and what each must fetch
    needed = set(wanted) | (set(graph_outputs) if keep_outputs else set())
    fetch: dict[int, list[str]] = {}
    for piece in reversed(pieces):
        names = [n for n in piece.outputs if n in needed]
        if names:
            fetch[piece.index] = names
            needed |= set(piece.inputs)
    last_reader: dict[str, int] = {}
    for piece in pieces:
        if piece.index in fetch:
            for n in piece.inputs:
                last_reader[n] = piece.index
    keep_to_end = set(graph_outputs) if keep_outputs else set()
    types = value_types(proto)
    envs = [dict(feed) for feed in feeds]
    for f, feed in enumerate(feeds):
        for n in wanted:
            if n in inputs and n in feed:
                on_value(f, n, feed[n])
    run_pieces = [p for p in pieces if p.index in fetch]
    for step, piece in enumerate(run_pieces):
        logger.info("calibration piece %d/%d: %d nodes, %.1f MB of weights, %d boundary inputs",
                    step + 1, len(run_pieces), len(piece.nodes), piece.weight_bytes / 2**20, len(piece.inputs))
        names = fetch[piece.index]
        # prepacked MatMul weights are a second copy of the piece's weights: measured, a piece of
        # 32 MiB of weights peaked at 73 MiB with prepacking and 41 MiB without
        options = session_options(path.parent, threads, prepack=False)
        model = piece_model(proto, piece, types, envs[0] if envs else None)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        del model
        for f, env in enumerate(envs):
            missing = [n for n in piece.inputs if n not in env]
            if missing and missing[0] in inputs:
                raise PieceError(f"piece {piece.index}: graph input '{missing[0]}' is not in feed {f}")
            if missing:
                raise PieceError(f"piece {piece.index}: value '{missing[0]}' is not available (read before any "
                                 "earlier piece produced it, or dropped after its last reader)")
            outputs = session.run(names, {n: env[n] for n in piece.inputs})
            for name, x in zip(names, outputs):
                if name in wanted:
                    on_value(f, name, x)
                if last_reader.get(name, -1) > piece.index or name in keep_to_end:
                    env[name] = x
            for n in piece.inputs:
                if last_reader.get(n) == piece.index and n not in keep_to_end:
                    env.pop(n, None)
        del session
    if not keep_outputs:
        return [{} for _ in feeds]
    return [{n: env[n] for n in graph_outputs if n in env} for env in envs]


def session_options(folder: Path, threads: int | None, prepack: bool = True):
    """ONNX Runtime options for a calibration run of a model given as bytes: its external tensors
    read from ``folder`` (the input's own), no memory arena, quiet."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options
