"""Is this node, attribute or tensor of the output file the input file's, bit for bit? For the
plan-diff (:mod:`flashnorm_onnx.verify.plan`), on protos read without their tensor data: tensors
are compared in blocks where they lie (inline or in external data), never read whole."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto

_ONNX_DOMAINS = ("", "ai.onnx")
_CHUNK = 16 << 20


def same_node(a: onnx.NodeProto, b: onnx.NodeProto, rename: dict[str, str], inputs: bool = True,
               bases: tuple[Path | None, Path | None] = (None, None)) -> str | None:
    """Why node ``b`` (output file) is not node ``a`` (input file); None when it is. ``bases``: the
    two files' folders, where a tensor attribute's external data is read."""
    if a.op_type != b.op_type or (a.domain or "") not in _equivalent(b.domain or ""):
        return f"is {b.domain + '.' if b.domain else ''}{b.op_type} in the output, {a.op_type} in the input"
    attrs_a = {x.name: x for x in a.attribute}
    attrs_b = {x.name: x for x in b.attribute}
    if attrs_a.keys() != attrs_b.keys():
        return f"has attributes {sorted(attrs_b)} in the output, {sorted(attrs_a)} in the input"
    for key, x in attrs_a.items():
        if not _same_attribute(x, attrs_b[key], bases):
            return f"has another value of attribute '{key}'"
    if inputs:
        got = [rename.get(x, x) for x in b.input]
        while got and not got[-1]:
            got.pop()
        want = list(a.input)
        while want and not want[-1]:
            want.pop()
        if got != want:
            return f"reads {got} in the output, {want} in the input"
    return None


def _equivalent(domain: str) -> tuple[str, ...]:
    return _ONNX_DOMAINS if domain in _ONNX_DOMAINS else (domain,)


def _same_attribute(a: AttributeProto, b: AttributeProto, bases=(None, None)) -> bool:
    if a.type != b.type:
        return False
    if a.type == AttributeProto.TENSOR:  # a Constant's value, maybe in external data
        return tensor_equal(a.t, bases[0], b.t, bases[1])
    x, y = AttributeProto(), AttributeProto()
    x.CopyFrom(a)
    y.CopyFrom(b)
    x.ClearField("doc_string")
    y.ClearField("doc_string")
    return x.SerializeToString(deterministic=True) == y.SerializeToString(deterministic=True)


# -- tensors -------------------------------------------------------------------------------------


def _location(t: TensorProto, base: Path | None) -> tuple[str, int, int | None] | None:
    if t.data_location != TensorProto.EXTERNAL or base is None:
        return None
    entries = {e.key: e.value for e in t.external_data}
    length = int(entries["length"]) if "length" in entries else None
    return os.path.realpath(base / entries.get("location", "")), int(entries.get("offset", 0) or 0), length


def _raw(t: TensorProto, base: Path | None) -> tuple[str, int, int] | bytes | None:
    """Where a tensor's raw little-endian bytes are: (file, offset, length), the bytes, or None
    (stored in typed fields)."""
    where = _location(t, base)
    if where is not None:
        path, offset, length = where
        if length is None:
            length = os.path.getsize(path) - offset
        return path, offset, length
    if t.HasField("raw_data"):
        return t.raw_data
    has_typed = any(len(getattr(t, f)) for f in ("float_data", "int32_data", "string_data", "int64_data",
                                                  "double_data", "uint64_data"))
    return None if has_typed else b""


def _read(source, start: int, n: int) -> bytes:
    if isinstance(source, bytes):
        return source[start: start + n]
    path, offset, _ = source
    with open(path, "rb") as f:
        f.seek(offset + start)
        return f.read(n)


def tensor_equal(a: TensorProto, base_a: Path | None, b: TensorProto, base_b: Path | None) -> bool:
    """Same dtype, dims and values, bit for bit (external data read in blocks, never whole)."""
    if a.data_type != b.data_type or list(a.dims) != list(b.dims):
        return False
    ra, rb = _raw(a, base_a), _raw(b, base_b)
    if ra is not None and rb is not None:
        na = len(ra) if isinstance(ra, bytes) else ra[2]
        nb = len(rb) if isinstance(rb, bytes) else rb[2]
        if na != nb:
            return False
        return all(_read(ra, k, min(_CHUNK, na - k)) == _read(rb, k, min(_CHUNK, na - k))
                   for k in range(0, na, _CHUNK))
    xa = onnx.numpy_helper.to_array(a, str(base_a or ""))
    xb = onnx.numpy_helper.to_array(b, str(base_b or ""))
    if xa.dtype == object or xb.dtype == object:
        return xa.shape == xb.shape and list(xa.ravel()) == list(xb.ravel())
    return xa.shape == xb.shape and xa.tobytes() == np.ascontiguousarray(xb).astype(xa.dtype).tobytes()


def copied_from_input(t_in: TensorProto, base_in: Path, t_out: TensorProto, base_out: Path, entry) -> bool:
    """The writer's record ``(source, offset, bytes, data file, offset there)`` for this tensor says
    it copied the input's own bytes of this same tensor to where the output's reference points."""
    src, src_offset, nbytes, data_path, dst_offset = entry
    if t_in.data_type != t_out.data_type or list(t_in.dims) != list(t_out.dims):
        return False
    where_in, where_out = _location(t_in, base_in), _location(t_out, base_out)
    if where_in is None or where_out is None:
        return False
    length_in = where_in[2] if where_in[2] is not None else nbytes
    return (where_in[0] == os.path.realpath(src) and where_in[1] == src_offset and length_in == nbytes
            and where_out[0] == os.path.realpath(data_path) and where_out[1] == dst_offset
            and (where_out[2] is None or where_out[2] == nbytes))
