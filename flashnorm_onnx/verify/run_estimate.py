"""What running one verification case will create, estimated before anything runs.

The input model is read without its tensor data (:func:`model_skeleton`: large and external
initializers become typed graph inputs), ONNX shape inference gives every value's shape for the
case's input shapes, and a walk over the nodes in order sums the values alive at once
(:class:`RunEstimator`). :func:`flashnorm_onnx.verify.sizing.fit_case` reduces a case until the
estimate fits :func:`flashnorm_onnx.verify.sizing.verification_run_cap`."""

from __future__ import annotations

import logging
from pathlib import Path

from flashnorm_onnx.verify.sizing import RunEstimate

logger = logging.getLogger(__name__)

#: Bytes per element of an output that comparing it takes beyond the two outputs themselves:
#: :func:`_compare`'s float64 copies of both, the difference, its absolute value, the finite
#: values of each (8 + 8 + 8 + 8 + 8 + 1 at most at once); :func:`compare_quantized` takes less.
COMPARE_BYTES_PER_ELEMENT = 41

#: Initializers of at most this many bytes of data keep it in :func:`model_skeleton` (shape
#: inference reads the small ones: Reshape's shape, Tile's repeats, Slice's starts); larger ones,
#: and external ones, become graph inputs declaring their type and shape.
SKELETON_KEEP_BYTES = 4096

_TENSOR_DATA_FIELDS = frozenset({4, 5, 6, 7, 9, 10, 11})  # TensorProto float/int32/string/int64/raw/double/uint64


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def _fields(buf, start: int, end: int):
    """(field number, wire type, start of the key, start of a length-delimited value, end) for
    each field of the protobuf message in ``buf[start:end]``."""
    pos = start
    while pos < end:
        key_start = pos
        key, pos = _varint(buf, pos)
        wire, value_start = key & 7, pos
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            n, value_start = _varint(buf, pos)
            pos = value_start + n
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield key >> 3, wire, key_start, value_start, pos


def _graph_skeleton(buf, start: int, end: int, declared: list[bytes]) -> bytes:
    """The GraphProto in ``buf[start:end]`` without its large initializers (their headers go to
    ``declared``) nor sparse ones; everything else copied as it is."""
    out = bytearray()
    for field, wire, key_start, value_start, stop in _fields(buf, start, end):
        if wire == 2 and field == 15:  # sparse_initializer: left out (its consumers' shapes stay unknown)
            continue
        if wire != 2 or field != 5:  # not an initializer
            out += buf[key_start:stop]
            continue
        header = bytearray()
        data = 0
        external = False
        for t_field, t_wire, t_key, t_value, t_stop in _fields(buf, value_start, stop):
            if t_field in _TENSOR_DATA_FIELDS:
                data += t_stop - t_value
                continue
            if t_field == 14 and t_wire == 0 and _varint(buf, t_value)[0] == 1:  # data_location: EXTERNAL
                external = True
            header += buf[t_key:t_stop]
        if external or data > SKELETON_KEEP_BYTES:
            declared.append(bytes(header))
        else:
            out += buf[key_start:stop]
    return bytes(out)


def _declare(graph, tensors) -> None:
    """Each tensor (a TensorProto without its data) as a graph input of its type and shape."""
    import onnx

    inputs = {i.name for i in graph.input}
    for t in tensors:
        if t.name and t.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            inputs.add(t.name)


def model_skeleton(source: str | Path | bytes):
    """The model file's ModelProto without tensor data: its large (over :data:`SKELETON_KEEP_BYTES`)
    and external initializers become graph inputs declaring their type and shape.

    The file is memory-mapped and only the protobuf's field headers are read: an initializer's data,
    embedded or external, is never touched (a Constant node's value is copied as it is)."""
    import mmap

    import onnx

    def build(buf) -> onnx.ModelProto:
        out = bytearray()
        declared: list[bytes] = []
        for field, wire, key_start, value_start, stop in _fields(buf, 0, len(buf)):
            if field == 7 and wire == 2:  # ModelProto.graph
                graph = _graph_skeleton(buf, value_start, stop, declared)
                out += _encode_varint((7 << 3) | 2) + _encode_varint(len(graph)) + graph
            else:
                out += buf[key_start:stop]
        model = onnx.ModelProto.FromString(bytes(out))
        _declare(model.graph, [onnx.TensorProto.FromString(h) for h in declared])
        return model

    if isinstance(source, (bytes, bytearray, memoryview)):
        return build(memoryview(source))
    with open(source, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return build(buf)


def _itemsize(elem_type: int) -> int | None:
    """Bytes per element of an ONNX tensor type (4-bit types: 1, as unpacked); None for strings."""
    from onnx import TensorProto as T

    sizes = {T.FLOAT: 4, T.UINT8: 1, T.INT8: 1, T.UINT16: 2, T.INT16: 2, T.INT32: 4, T.INT64: 8, T.BOOL: 1,
             T.FLOAT16: 2, T.DOUBLE: 8, T.UINT32: 4, T.UINT64: 8, T.COMPLEX64: 8, T.COMPLEX128: 16,
             T.BFLOAT16: 2}
    if elem_type in sizes:
        return sizes[elem_type]
    name = T.DataType.Name(elem_type) if elem_type in T.DataType.values() else ""
    return 1 if name.startswith(("FLOAT8", "FLOAT4", "INT4", "UINT4", "INT2", "UINT2")) else None


def _dtype_name(elem_type: int) -> str:
    """numpy's name of an ONNX tensor type (``float32``), else ONNX's in lower case."""
    from onnx import TensorProto as T

    names = {T.FLOAT: "float32", T.FLOAT16: "float16", T.DOUBLE: "float64", T.BFLOAT16: "bfloat16"}
    if elem_type in names:
        return names[elem_type]
    name = T.DataType.Name(elem_type).lower() if elem_type in T.DataType.values() else str(elem_type)
    return "bool" if name == "bool" else name


def _subgraph_names(node) -> set[str]:
    """Every name a node's subgraphs (If/Loop/Scan bodies, at any depth) read."""
    names: set[str] = set()
    for attr in node.attribute:
        for graph in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            for inner in graph.node:
                names.update(n for n in inner.input if n)
                names |= _subgraph_names(inner)
    return names


class RunEstimator:
    """Estimates what running one verification case needs (a :class:`~flashnorm_onnx.verify.sizing.RunEstimate`),
    from the model's graph alone (no tensor data: see :func:`model_skeleton`).

    For given input shapes, the graph inputs take them (symbolic dims replaced) and ONNX shape
    inference (with data propagation, so that Shape -> Gather -> Concat -> Reshape chains are
    followed) gives each value's shape. The run is then walked in the graph's (topological) node
    order: the inputs stay alive, each node's outputs are allocated, and a value is freed after its
    last reader unless it is a graph output. ``peak`` is the most bytes alive at once (what ONNX
    Runtime's allocation planner roughly needs; it may need less by reusing buffers in place).
    ``total`` adds the graph outputs again (the input model's, held while the output model runs)
    and :data:`COMPARE_BYTES_PER_ELEMENT` for the largest floating output.

    Not counted: initializers and Constant outputs (the model's own data; whether a model's
    weights fit is decided elsewhere), and any value whose shape inference leaves unknown
    (contrib ops, data-dependent sizes): the estimate is then too low, never a cause to refuse.
    Only the input model is estimated; the output computes the same function with the same shapes."""

    def __init__(self, model):
        import onnx

        base = onnx.ModelProto()
        base.CopyFrom(model)
        graph = base.graph
        heavy = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        if heavy:  # a proto loaded without its external data: declare those, as model_skeleton does
            names = {t.name for t in heavy}
            kept = [t for t in graph.initializer if t.name not in names]
            del graph.initializer[:]
            graph.initializer.extend(kept)
            _declare(graph, heavy)
        del graph.value_info[:]  # an exporter's symbolic shapes: inferred again for each case
        for vi in graph.output:
            if vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")
        self.model = base
        self._cache: dict[tuple, RunEstimate | None] = {}

    @classmethod
    def for_model(cls, source: str | Path | bytes) -> "RunEstimator | None":
        """For a model file (or its bytes); None when its graph cannot be read without the data."""
        try:
            return cls(model_skeleton(source))
        except Exception as e:  # the estimate is a bound, not a gate: an unreadable file fails elsewhere
            logger.debug("no verification memory estimate: %s", e)
            return None

    def __call__(self, shapes: dict[str, list[int]]) -> RunEstimate | None:
        key = tuple(sorted((name, tuple(int(d) for d in shape)) for name, shape in shapes.items()))
        if key not in self._cache:
            try:
                self._cache[key] = self._estimate(dict(key))
            except Exception as e:  # shape inference gave up: nothing known, nothing refused
                logger.debug("no verification memory estimate: %s", e)
                self._cache[key] = None
        return self._cache[key]

    def _estimate(self, shapes: dict[str, tuple]) -> RunEstimate | None:
        """The estimate for these input shapes (None when no value's size is known)."""
        import math

        model = self._with_shapes(shapes)
        known = _known_values(model)
        graph = model.graph
        outputs = {o.name for o in graph.output}
        peak, largest = _walk_run(list(graph.node), known, shapes, outputs)
        out_bytes = sum(known[n][0] for n in outputs if n in known)
        floating = ("float32", "float16", "float64", "bfloat16")
        compare = max((math.prod(known[n][1]) for n in outputs if n in known and known[n][2] in floating), default=0)
        for n in outputs:
            if n in known:
                largest = max(largest, (known[n][0], n))
        if not largest[1]:
            return None
        nbytes, name = largest
        return RunEstimate(total=peak + out_bytes + COMPARE_BYTES_PER_ELEMENT * compare, peak=peak,
                           outputs=out_bytes, name=name, shape=known[name][1], dtype=known[name][2], nbytes=nbytes)

    def _with_shapes(self, shapes: dict[str, tuple]):
        """A copy of the skeleton whose graph inputs named in ``shapes`` have those fixed shapes."""
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        for vi in model.graph.input:
            if vi.name in shapes and vi.type.HasField("tensor_type"):
                shape = vi.type.tensor_type.shape
                shape.ClearField("dim")
                for d in shapes[vi.name]:
                    shape.dim.add().dim_value = int(d)
        return model


def _known_values(model) -> dict[str, tuple[int, list[int], str]]:
    """Name -> (bytes, shape, dtype) of every value whose shape ONNX shape inference (with data
    propagation) fixes in ``model``."""
    import math

    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True).graph
    known: dict[str, tuple[int, list[int], str]] = {}  # name -> bytes, shape, dtype
    for vi in list(inferred.input) + list(inferred.value_info) + list(inferred.output):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        tensor = vi.type.tensor_type
        size = _itemsize(tensor.elem_type)
        dims = tensor.shape.dim
        if size is None or not all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
            continue
        shape = [int(d.dim_value) for d in dims]
        known[vi.name] = (math.prod(shape) * size, shape, _dtype_name(tensor.elem_type))
    return known


def _last_reads(nodes: list) -> tuple[list[set[str]], dict[str, int]]:
    """The names each node reads (its subgraphs' too), and the index of each name's last reader."""
    last_use: dict[str, int] = {}
    reads: list[set[str]] = []
    for i, node in enumerate(nodes):
        names = {n for n in node.input if n} | _subgraph_names(node)
        reads.append(names)
        for n in names:
            last_use[n] = i
    return reads, last_use


def _walk_run(nodes: list, known: dict, shapes: dict, outputs: set[str]) -> tuple[int, tuple[int, str]]:
    """The run walked in node order (see :class:`RunEstimator`): the most bytes alive at once, and
    the largest (bytes, name) of the inputs and the values allocated."""
    feeds = [name for name in shapes if name in known]
    largest = max(((known[n][0], n) for n in feeds), default=(0, ""))
    live = peak = sum(known[n][0] for n in feeds)
    reads, last_use = _last_reads(nodes)
    allocated: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            for n in node.output:
                if n and n in known and n not in allocated and n not in shapes:
                    allocated[n] = known[n][0]
                    live += known[n][0]
                    largest = max(largest, (known[n][0], n))
        peak = max(peak, live)
        for n in reads[i] | set(node.output):
            if n in allocated and n not in outputs and last_use.get(n, i) <= i:
                live -= allocated.pop(n)
    return peak, largest
