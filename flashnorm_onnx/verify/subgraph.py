"""Verification at any model size: re-run every rewritten norm and linear in ONNX Runtime.

For each folded norm (a :class:`~flashnorm_onnx.passes.fold_result.RewriteSite`), small
models are cut out of the *input file* and out of the *written output file*, and run in ONNX
Runtime on random activations:

* the norm: from its activation inputs ``x`` (and ``skip``) to the value its readers read::

      y_in(x)  ==  y_out(x) * g + beta          (y_out: the weightless norm as written)

  which fails when the weightless rewrite is missing or wrong (the scale applied twice);
* each linear reader, from the value it reads to its result after its bias Add::

      z_in(d * g + beta)  ==  z_out(d)

  which fails when a folded weight or a moved LayerNorm bias is wrong (the wrong axis, the scale
  twice, a bias dropped) — the nodes that run are the output file's, with the tensors as written;
* the wiring: in the output file every reader still reads the weightless norm, through the same
  ops as in the input file (the row-moving ops between them are not rewritten by the fold).

Together with the identity of every other node (the fold touches nothing else), this is the
whole-model equality, checked piece by piece: memory is bounded by the largest piece (external
tensors stay in their files; ONNX Runtime maps them) and never holds both models.

A linear whose weight is over :data:`SAMPLE_BYTES` runs on a window of its output columns. For a
``[K, N]`` weight those columns are a short run of every row, which read back from a file that
was written past the page cache costs a disk read of most of the tensor; the streamed writer
keeps them instead from the very buffers it writes (``kept``), and the algebraic check
(:mod:`flashnorm_onnx.verify.algebraic`, run beside this one for large models) reads sampled
rows back from the file, which is what sees a block the writer put in the wrong place.
Ops between the norm and its readers (Reshape, Gather of rows) are channel-preserving: per-channel
``* g + beta`` commutes with them, which is why feeding ``d * g + beta`` to the input's reader is
the same as feeding it the input's norm output.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from flashnorm_onnx.errors import VerificationTimeout, VerificationUnavailable, first_line
from flashnorm_onnx.verify.result import VerificationResult
from flashnorm_onnx.passes.graph_utils import release_tensor
from flashnorm_onnx.passes.linear_consumers import is_linear_reader, trace_weight, weight_k_axis
from flashnorm_onnx.passes.scopes import Scopes, proto_scopes
from flashnorm_onnx.verify.result import failed_entry
from flashnorm_onnx.verify.whole import Deadline, _compare

logger = logging.getLogger(__name__)

#: Ops allowed between a norm and its linear readers (the row-moving ops the fold looks through).
_PATH_DEPTH = 16


#: A linear whose weight is larger than this runs on SAMPLE_COLUMNS contiguous output columns
#: (the same ones in both files, its bias sliced alike, see :func:`sample_window`): every row of
#: the weight as written still runs, so time and memory do not follow the largest tensor. The
#: fold scales rows (input channels), and the streamed writer writes row blocks: a wrong scale,
#: axis or block shows in every column.
SAMPLE_BYTES = 8 << 20
SAMPLE_COLUMNS = 128


def sample_window(shape: tuple, k_axis: int, itemsize: int) -> slice | None:
    """The output columns (along axis ``1 - k_axis`` of the stored 2-D weight) that a linear
    runs on in this check, or None when it runs whole. A function of the shape alone, so the
    input's and the output's weight are sampled alike, and the streamed writer can keep the
    output's sample from the buffer it writes (see ``tensor_io.save_with_external_data``)."""
    if len(shape) != 2 or int(shape[0]) * int(shape[1]) * itemsize <= SAMPLE_BYTES:
        return None
    n = int(shape[1 - k_axis])
    if n <= SAMPLE_COLUMNS:
        return None
    start = int(np.random.default_rng([n, int(shape[k_axis])]).integers(0, n - SAMPLE_COLUMNS + 1))
    return slice(start, start + SAMPLE_COLUMNS)


@dataclasses.dataclass
class _Piece:
    inputs: list[str]
    outputs: list[str]
    linear: bool = False
    """A linear reader's piece (its weight may be sampled, see SAMPLE_BYTES)."""


class ModelFile:
    """One model file, loaded once and lazily (external tensors stay memory-mapped), with its
    values by name. The checks of one verification share it.

    ``kept``: weight name -> (columns, array) of sampled columns the writer kept from the bytes it
    wrote (see :func:`sample_window`), used instead of reading them back from the file."""

    @classmethod
    def of(cls, model: "ModelFile | str | os.PathLike") -> "ModelFile":
        return model if isinstance(model, ModelFile) else cls(Path(model))

    def __init__(self, path: Path, kept: dict | None = None):
        self.path = Path(path)
        self.kept = kept or {}
        self.model = ir.load(str(path))
        self.graph = self.model.graph
        self.scopes = Scopes(self.graph)
        self.values: dict[str, ir.Value] = {}
        """Every value of every graph (main graph and subgraphs) by its qualified name."""
        for prefix, graph in self.scopes.graphs:
            for v in graph.inputs:
                self.values[prefix + v.name] = v
            for name, v in graph.initializers.items():
                self.values[prefix + name] = v
            for node in graph:
                for o in node.outputs:
                    if o.name:
                        self.values[prefix + o.name] = o
        self._inferred: dict[str, ir.DataType] | None = None
        self.sampled = 0
        """Linear pieces that ran on a sample of their output columns."""
        self.sampled_kept = 0
        """Of those, the ones whose sample came from ``kept``."""

    def dtype(self, name: str) -> ir.DataType | None:
        v = self.values.get(name)
        if v is not None and v.dtype is not None:
            return v.dtype
        if self._inferred is None:  # legacy/optimum graphs carry no value_info: infer types once
            self._inferred = {}
            try:
                proto = onnx.load_model(str(self.path), load_external_data=False)
                inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
                for prefix, g, _ in proto_scopes(inferred.graph):
                    for vi in list(g.value_info) + list(g.output):
                        if vi.type.tensor_type.elem_type:
                            self._inferred[prefix + vi.name] = ir.DataType(vi.type.tensor_type.elem_type)
            except Exception as e:  # shape inference is a hint only
                logger.debug("shape inference failed: %s", e)
        if name in self._inferred:
            return self._inferred[name]
        # contrib ops are not inferred: most ops want their activation in the type of the constant
        # beside it (MatMul's weight, a norm's scale)
        for use in (v.uses() if v is not None else []):
            for other in use.node.inputs:
                if other is not None and other is not v and other.const_value is not None \
                        and other.dtype is not None and other.dtype.is_floating_point():
                    return other.dtype
        return None

    def build(self, pieces: list[_Piece]) -> tuple[bytes, list[str]]:
        """One small model running every piece side by side (each in its own name space).

        Returns the serialized model and its input names (its outputs: the pieces', in order)."""
        nodes: list[onnx.NodeProto] = []
        initializers: dict[str, ir.Value] = {}
        extra_initializers: list[onnx.TensorProto] = []
        inputs: list[onnx.ValueInfoProto] = []
        outputs: list[onnx.ValueInfoProto] = []
        input_names = []
        for i, piece in enumerate(pieces):
            prefix = f"p{i}/"
            picked, consts = self._pick(piece)
            local = self._sample(piece, picked, consts)
            initializers.update((n, v) for n, v in consts.items() if n not in local)
            nodes += self._renamed(picked, prefix, local, initializers)
            for name, array in local.items():
                extra_initializers.append(onnx.numpy_helper.from_array(array, prefix + name))
            for name in piece.inputs:
                inputs.append(self._input_info(name, prefix))
                input_names.append(prefix + name)
            for name in piece.outputs:
                outputs.append(onnx.ValueInfoProto(name=prefix + name))
        initializer_protos = [_tensor_proto(name, v) for name, v in initializers.items()] + extra_initializers
        return self._serialize(nodes, inputs, outputs, initializer_protos), input_names

    def _pick(self, piece: _Piece) -> tuple[list[ir.Node], dict[str, ir.Value]]:
        """The nodes that compute the piece's outputs from its inputs, and the constants they read;
        :class:`_NotIsolable` when they reach another graph input, a subgraph or too far."""
        cut = set(piece.inputs)
        seen: set[int] = set()
        picked: list[ir.Node] = []
        frontier = []
        for name in piece.outputs:
            v = self.values.get(name)
            if v is None:
                raise _NotIsolable(f"value '{name}' is not in {self.path.name}")
            frontier.append(v)
        consts: dict[str, ir.Value] = {}
        while frontier:
            v = frontier.pop()
            name = self.scopes.name(v)
            if name in cut or v.const_value is not None or v.is_graph_input():
                if v.const_value is not None:
                    consts[name] = v
                elif name not in cut:
                    raise _NotIsolable(f"'{name}' depends on the graph input '{name}'")
                continue
            node = v.producer()
            if node is None:
                raise _NotIsolable(f"value '{v.name}' has no producer")
            if id(node) in seen:
                continue
            seen.add(id(node))
            picked.append(node)
            if len(picked) > 64:
                raise _NotIsolable(f"the piece ending in '{piece.outputs[0]}' does not end at its inputs")
            for a in node.attributes.values():
                if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                    raise _NotIsolable(f"node '{node.name}' has a subgraph")
            frontier.extend(x for x in _data_inputs(node) if x is not None)
        return picked, consts

    def _sample(self, piece: _Piece, picked: list[ir.Node], consts: dict[str, ir.Value]) -> dict[str, np.ndarray]:
        """A linear piece's constants sliced to its sampled columns (:func:`_sampled`; {} when it
        runs whole), counted in :attr:`sampled` and :attr:`sampled_kept`."""
        local = _sampled(piece, picked, consts, self.kept, self.scopes.name) if piece.linear else {}
        self.sampled += bool(local)
        self.sampled_kept += any(a is self.kept.get(n, (None, None))[1] for n, a in local.items())
        return local

    def _renamed(self, picked: list[ir.Node], prefix: str, local: dict, initializers: dict) -> list[onnx.NodeProto]:
        """The picked nodes in graph order, as protos whose values (all but the shared
        initializers) are renamed into the piece's name space."""
        out = []
        order = {id(n): k for k, n in enumerate(self.graph.all_nodes())}
        for node in sorted(picked, key=lambda n: order.get(id(n), 0)):
            proto = ir.serde.serialize_node(node)
            del proto.input[len(_data_inputs(node)):]
            for lst, values in ((proto.input, node.inputs), (proto.output, node.outputs)):
                for k, value in enumerate(values[:len(lst)]):
                    name = self.scopes.name(value)  # qualified: sibling branches reuse names
                    if name:
                        lst[k] = prefix + name if (name in local or name not in initializers) else name
            out.append(proto)
        return out

    def _input_info(self, name: str, prefix: str) -> onnx.ValueInfoProto:
        """The piece input ``name``'s graph input (its type; :class:`_NotIsolable` when unknown)."""
        dtype = self.dtype(name)
        if dtype is None:
            raise _NotIsolable(f"the type of '{name}' is unknown")
        return onnx.helper.make_tensor_value_info(prefix + name, int(dtype), None)

    def _serialize(self, nodes: list, inputs: list, outputs: list, initializers: list) -> bytes:
        """The pieces' graph as a model of this file's opsets and functions, serialized."""
        graph = onnx.helper.make_graph(nodes, "flashnorm_check", inputs, outputs, initializers)
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items()]
        model = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=min(self.model.ir_version, 10))
        for f in self.model.functions.values():
            model.functions.append(ir.serde.serialize_function(f))
        return model.SerializeToString()


def _data_inputs(node: ir.Node) -> list:
    """The inputs a piece needs: ORT's Attention runs on (input, weights, bias) alone, without its
    mask and past, which the fold does not touch."""
    if node.op_type == "Attention" and node.domain == "com.microsoft":
        return list(node.inputs[:3])
    return list(node.inputs)


def _sampled(piece: _Piece, nodes: list[ir.Node], consts: dict[str, ir.Value], kept: dict,
             qname) -> dict[str, np.ndarray]:
    """For a linear piece whose weight is over SAMPLE_BYTES: its weight, and every constant indexed
    by its output columns (a bias), sliced to the columns of :func:`sample_window`. Else {}.
    ``qname``: a value's qualified name (the keys of ``consts``)."""
    cut = set(piece.inputs)
    reader = next((n for n in nodes if is_linear_reader(n) and n.inputs and n.inputs[0] is not None
                   and qname(n.inputs[0]) in cut), None)
    if reader is None or len(reader.inputs) < 2 or reader.inputs[1] is None:
        return {}
    traced = trace_weight(reader.inputs[1], weight_k_axis(reader))
    if isinstance(traced, str) or qname(traced.source) not in consts:
        return {}
    weight, k_axis, tensor = traced.source, traced.k_axis, traced.source.const_value
    shape = tuple(tensor.shape.numpy())
    cols = sample_window(shape, k_axis, tensor.dtype.itemsize)
    if cols is None:
        return {}
    n = shape[1 - k_axis]
    keep = kept.get(qname(weight))
    if keep is not None and keep[0] == cols and keep[1].shape == (shape[0], cols.stop - cols.start) and k_axis == 0:
        sliced = keep[1]  # the bytes the writer wrote, kept as it wrote them
    else:
        sliced = _read_columns(tensor, shape, k_axis, cols)
    if sliced is None:  # not a plain external tensor: through numpy (mapped)
        array = tensor.numpy()
        sliced = np.ascontiguousarray(array[:, cols] if k_axis == 0 else array[cols, :])
        del array
    out = {qname(weight): sliced}
    release_tensor(tensor)
    for name, v in consts.items():
        if name == qname(weight):
            continue
        dims = tuple(v.const_value.shape.numpy())
        if dims and dims[-1] == n:  # a bias over the output columns
            out[name] = np.ascontiguousarray(v.const_value.numpy()[..., cols])
    return out


def _read_columns(tensor, shape: tuple, k_axis: int, cols: slice) -> np.ndarray | None:
    """The sampled output columns of a 2-D external weight, read with ``pread`` (only those
    bytes: the tensor is never mapped, so the resident set stays at the sample whatever the
    weight's size). None where the tensor is not a plain external one."""
    import os

    from flashnorm_onnx.passes.tensor_access import external_source

    source = external_source(tensor) if len(shape) == 2 else None
    if source is None or not hasattr(os, "pread"):
        return None
    path, offset, _ = source
    dtype = np.dtype(tensor.dtype.numpy())
    rows, row_len = shape
    width = cols.stop - cols.start
    fd = os.open(path, os.O_RDONLY)
    try:
        if k_axis == 1:  # [N, K]: the sampled columns of the output are whole rows, contiguous
            data = os.pread(fd, width * row_len * dtype.itemsize, offset + cols.start * row_len * dtype.itemsize)
            out = np.frombuffer(data, dtype=dtype).reshape(width, row_len)
        else:  # [K, N]: a short run of each row
            out = np.empty((rows, width), dtype=dtype)
            size = width * dtype.itemsize
            for r in range(rows):
                data = os.pread(fd, size, offset + (r * row_len + cols.start) * dtype.itemsize)
                out[r] = np.frombuffer(data, dtype=dtype)
    finally:
        os.close(fd)
    return np.ascontiguousarray(out)


class _NotIsolable(Exception):
    pass


def _tensor_proto(name: str, value: ir.Value) -> onnx.TensorProto:
    tensor = value.const_value
    if isinstance(tensor, ir.ExternalTensor):  # reference the bytes where they are: nothing is read here
        proto = onnx.TensorProto(name=name, data_type=int(tensor.dtype), dims=list(tensor.shape.numpy()))
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, val in (("location", tensor.location), ("offset", str(tensor.offset or 0)),
                         ("length", str(tensor.length if tensor.length is not None else tensor.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, val
        return proto
    proto = ir.serde.serialize_tensor(tensor)
    proto.name = name
    return proto


def _session(model: bytes, folder: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    # a piece runs once: no graph optimization (fp16 weights are cast once at run time instead of
    # constant-folded into a second, fp32 copy at load)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False  # give each piece's buffers back as soon as it ran
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    options.add_session_config_entry("session.disable_prepacking", "1")  # no packed copy of each weight
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _shape(file: ModelFile, name: str, channels: int, rank_hint: int) -> list[int]:
    v = file.values.get(name)
    dims = list(v.shape) if v is not None and v.shape is not None else [None] * rank_hint
    if not dims:
        return []
    out = []
    for k, d in enumerate(dims):
        if isinstance(d, int) and d >= 0:
            out.append(min(d, 64) if k < len(dims) - 1 else d)
        else:
            out.append(2 if k == 0 else 3)
    if channels > 1:
        out[-1] = channels
    return out


def _wiring(file: ModelFile, data: str, target: str) -> list[str] | None:
    """Op types from ``data`` back to ``target`` along first inputs (None: not connected)."""
    ops: list[str] = []
    v = file.values.get(data)
    for _ in range(_PATH_DEPTH):
        if v is None:
            return None
        if file.scopes.name(v) == target:
            return ops
        node = v.producer()
        if node is None or not node.inputs:
            return None
        ops.append(node.op_type)
        v = node.inputs[0]
    return None


def check_sites(sites, reference: ModelFile | str | os.PathLike, candidate: ModelFile | str | os.PathLike,
                rtol: float | None = None, timeout: float | None = None, seed: int = 0) -> VerificationResult:
    """Run every rewrite site of ``candidate`` against ``reference`` (see the module docstring)."""
    deadline = Deadline(timeout)
    rng = np.random.default_rng(seed)
    ref, cand = ModelFile.of(reference), ModelFile.of(candidate)
    cand.sampled = cand.sampled_kept = 0
    result = VerificationResult(method="subgraph", passed=True)
    pieces_run = 0
    for site in sites:
        deadline.check()
        pieces_run += _check_site(site, ref, cand, rng, deadline, rtol, result)
    result.tolerance = max((o["rtol"] for o in result.outputs), default=0.0)
    result.cases.append(_summary(len(sites), pieces_run, cand))
    return result


def _check_site(site, ref: ModelFile, cand: ModelFile, rng, deadline: Deadline, rtol: float | None,
                result: VerificationResult) -> int:
    """One folded norm: its wiring, then its pieces built, fed and run in both files and compared,
    into ``result``. Returns how many pieces ran (0 when the output's failed to run)."""
    after = site.output_after_name
    g, beta, channels = _site_scale(site, ref)
    # a linear reading the norm directly reads, in the output, the weightless norm's value
    data_after = [after if r.data == site.output_before else r.data for r in site.readers]
    _check_wiring(site, ref, cand, data_after, result)
    ref_model, ref_in, cand_model, cand_in = _build_site(site, ref, cand, data_after)
    feeds_ref, feeds_cand = _site_feeds(site, ref, ref_in, cand_in, g, beta, channels, rng)
    got = _run_site(site, ref, cand, ref_model, cand_model, feeds_ref, feeds_cand, deadline, result)
    if got is None:
        return 0
    got_ref, got_cand = got
    _record(site, _site_entries(site, got_ref, got_cand, g, beta, rtol), result)
    return 1 + len(site.readers)


def _site_scale(site, ref: ModelFile) -> tuple[np.ndarray, np.ndarray | None, int]:
    """The norm's scale g and bias beta (float64, flat), and its channel count (a scalar g and no
    bias: the channels of the norm's output in the input file, else 1)."""
    g = np.asarray(site.g, dtype=np.float64).reshape(-1)
    beta = None if site.beta is None else np.asarray(site.beta, dtype=np.float64).reshape(-1)
    channels = g.size if g.size > 1 else (beta.size if beta is not None else 1)
    if channels == 1:
        last = ref.values.get(site.output_before)
        if last is not None and last.shape is not None and last.shape and isinstance(last.shape[-1], int):
            channels = last.shape[-1]
    return g, beta, channels


def _check_wiring(site, ref: ModelFile, cand: ModelFile, data_after: list[str], result: VerificationResult) -> None:
    """Every reader reads the weightless norm through the ops it read the norm through in the
    input; each one that does not fails ``result``."""
    after = site.output_after_name
    for r, d_after in zip(site.readers, data_after):
        want, got = _wiring(ref, r.data, site.output_before), _wiring(cand, d_after, after)
        if got is None or got != want:
            result.passed = False
            result.message = (f"norm '{site.norm}': the reader of '{r.data}' does not read the weightless "
                              f"norm '{after}' in the output ({got} vs {want})")
            result.outputs.append(failed_entry("subgraph", f"{r.data} ({site.norm})"))


def _build_site(site, ref: ModelFile, cand: ModelFile, data_after: list[str]) -> tuple[bytes, list, bytes, list]:
    """The site's pieces (the norm, each linear reader) cut out of each file: (input's model, its
    input names, output's model, its input names); :class:`VerificationUnavailable` when they
    cannot be cut out."""
    after = site.output_after_name
    norm_piece_ref = _Piece(site.inputs, [site.output_before, *site.extra_outputs])
    norm_piece_cand = _Piece(site.inputs, [after, *site.extra_outputs])
    reader_ref = [_Piece([r.data], [r.result_before], linear=True) for r in site.readers]
    reader_cand = [_Piece([d], [r.result_after_name], linear=True) for r, d in zip(site.readers, data_after)]
    try:
        ref_model, ref_in = ref.build([norm_piece_ref, *reader_ref])
        cand_model, cand_in = cand.build([norm_piece_cand, *reader_cand])
    except _NotIsolable as e:
        raise VerificationUnavailable(
            f"norm '{site.norm}' cannot be checked in isolation ({e}); use --verify onnxruntime"
        ) from None
    return ref_model, ref_in, cand_model, cand_in


def _site_feeds(site, ref: ModelFile, ref_in: list[str], cand_in: list[str], g: np.ndarray,
                beta: np.ndarray | None, channels: int, rng) -> tuple[dict, dict]:
    """Random feeds for both files' pieces: x (and skip) for the norm, d for each reader, whose
    input-file piece gets d * g + beta. Draws from ``rng`` in that order."""
    feeds_ref, feeds_cand = {}, {}
    for name, rname, cname in zip(site.inputs, ref_in, cand_in):
        dtype = ref.dtype(name).numpy()
        value = rng.standard_normal(_shape(ref, name, channels, 3)).astype(dtype)
        feeds_ref[rname] = feeds_cand[cname] = value
    offset = len(site.inputs)
    for r, rname, cname in zip(site.readers, ref_in[offset:], cand_in[offset:]):
        dtype = ref.dtype(r.data).numpy()
        d = rng.standard_normal(_shape(ref, r.data, channels, 2 if r.op == "Gemm" else 3))
        feeds_cand[cname] = d.astype(dtype)
        scaled = d.astype(dtype).astype(np.float64) * g + (beta if beta is not None else 0.0)
        feeds_ref[rname] = scaled.astype(dtype)
    return feeds_ref, feeds_cand


def _run_site(site, ref: ModelFile, cand: ModelFile, ref_model: bytes, cand_model: bytes, feeds_ref: dict,
              feeds_cand: dict, deadline: Deadline, result: VerificationResult) -> tuple[list, list] | None:
    """Both files' pieces run: (input's outputs, output's outputs). The input's failing raises
    :class:`VerificationUnavailable`; the output's fails ``result`` and returns None."""
    try:
        got_ref = _run(ref_model, ref.path.parent, feeds_ref, deadline)
    except VerificationTimeout:
        raise
    except Exception as e:
        raise VerificationUnavailable(
            f"norm '{site.norm}': its piece of the input model does not run in isolation "
            f"({first_line(e)}); use --verify onnxruntime"
        ) from None
    try:
        got_cand = _run(cand_model, cand.path.parent, feeds_cand, deadline)
    except VerificationTimeout:
        raise
    except Exception as e:
        result.passed = False
        result.message = f"norm '{site.norm}': the output's piece fails to run: {first_line(e)}"
        result.outputs.append(failed_entry("subgraph", f"{site.output_after_name} ({site.norm})"))
        return None
    return got_ref, got_cand


def _site_entries(site, got_ref: list, got_cand: list, g: np.ndarray, beta: np.ndarray | None,
                  rtol: float | None) -> list[dict]:
    """The comparisons of one site's outputs: the norm (y_in == y_out * g + beta, in float64
    rounded to the output's dtype), its other outputs, and each linear reader's result."""
    y_ref, y_cand = np.asarray(got_ref[0]), np.asarray(got_cand[0])
    expected = y_cand.astype(np.float64) * g + (beta if beta is not None else 0.0)
    entries = [_compare(f"{site.output_before} (norm)", "subgraph", y_ref, expected.astype(y_ref.dtype), rtol)]
    for k, name in enumerate(site.extra_outputs, start=1):
        entries.append(_compare(f"{name} (norm output {k})", "subgraph", np.asarray(got_ref[k]),
                                np.asarray(got_cand[k]), rtol))
    first = 1 + len(site.extra_outputs)
    for r, a, b in zip(site.readers, got_ref[first:], got_cand[first:]):
        entries.append(_compare(f"{r.result_before} ({r.op})", "subgraph", np.asarray(a), np.asarray(b), rtol))
    return entries


def _record(site, entries: list[dict], result: VerificationResult) -> None:
    """The entries into ``result``; the first that fails sets its message."""
    for entry in entries:
        result.outputs.append(entry)
        if not entry["ok"] and result.passed:
            result.passed = False
            result.message = (f"norm '{site.norm}': '{entry['name']}' differs by {entry['max_rel']:.3e} "
                              f"(relative), tolerance {entry['rtol']:.1e}")
        elif not entry["ok"]:
            result.passed = False


def _summary(sites: int, pieces_run: int, cand: ModelFile) -> str:
    """The check's case line: how many norms and pieces ran, and how many linears ran on a sample."""
    kept = f", {cand.sampled_kept} of them as kept from the buffers the writer wrote" if cand.sampled_kept else ""
    sampled = f"; {cand.sampled} linears with weights over {SAMPLE_BYTES >> 20} MB ran on {SAMPLE_COLUMNS} " \
        f"contiguous output columns (all rows{kept})" if cand.sampled else ""
    return (
        f"{sites} folded norms: {pieces_run} pieces (each norm, each of its linears with its bias) cut out of "
        f"the input and the written output and run in ONNX Runtime on random activations{sampled}"
    )


def _run(model: bytes, folder: Path, feeds: dict, deadline: Deadline) -> list:
    session = _session(model, folder)
    try:
        return deadline.run(session, feeds)
    finally:
        del session
