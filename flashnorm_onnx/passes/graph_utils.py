"""Small helpers over onnx-ir graphs: constants, attributes, uses.

A value is a *constant* only when its value cannot change at run time: an initializer that is
not also a graph input (an initializer listed as an input is a default the caller may
override), or the output of a ``Constant`` node. Everything the fold reads or writes goes
through :func:`const_tensor`.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx_ir as ir

ONNX_DOMAINS = ("", "ai.onnx")
MS_DOMAIN = "com.microsoft"


def is_op(node: ir.Node | None, op_type: str, domains: Iterable[str] = ONNX_DOMAINS) -> bool:
    return node is not None and node.op_type == op_type and node.domain in tuple(domains)


def const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor behind ``value`` if it is a true constant, else None."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if is_op(producer, "Constant"):
        attr = producer.attributes.get("value")
        if attr is not None and len(producer.attributes) == 1 and not attr.is_ref():
            # read it as it is: onnx-ir's get_const_tensor renames the node's tensor to the
            # value's name, and reading must not change the model (the analysis writes nothing)
            return attr.as_tensor()
        return ir.convenience.get_const_tensor(value)
    return None


def const_array(value: ir.Value | None) -> np.ndarray | None:
    tensor = const_tensor(value)
    if tensor is None:
        return None
    return tensor.numpy()


_SMALL = 64  # elements: statically evaluated helper constants (axes, eps, exponents)


def small_const_array(value: ir.Value | None, depth: int = 6) -> np.ndarray | None:
    """A small constant, also when an exporter computes it from constants (Reshape, Cast,
    CastLike, Unsqueeze, ... of Constant nodes), as torch.onnx does with optimize=False."""
    if value is None:
        return None
    array = const_array(value)
    if array is not None:
        return array if array.size <= _SMALL else None
    node = value.producer()
    if depth == 0 or node is None or node.domain not in ONNX_DOMAINS or value.is_graph_input():
        return None
    args = [small_const_array(v, depth - 1) if v is not None else None for v in node.inputs]
    if any(a is None for a, v in zip(args, node.inputs) if v is not None):
        return None
    op = node.op_type
    try:
        if op == "Identity":
            return args[0]
        if op == "Cast":
            return args[0].astype(ir.DataType(attr(node, "to")).numpy())
        if op == "CastLike":
            return args[0].astype(args[1].dtype)
        if op == "Reshape":
            shape = [int(d) for d in args[1].reshape(-1)]
            shape = [args[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
            return args[0].reshape(shape)
        if op in ("Unsqueeze", "Squeeze"):
            axes = attr(node, "axes", None)
            if axes is None and len(args) > 1 and args[1] is not None:
                axes = args[1].reshape(-1).tolist()
            if op == "Squeeze":
                return np.squeeze(args[0], axis=tuple(axes) if axes is not None else None)
            out = args[0]
            for a in sorted(int(a) % (out.ndim + len(axes)) for a in axes):
                out = np.expand_dims(out, a)
            return out
        if op == "Concat":
            return np.concatenate(args, axis=int(attr(node, "axis", 0)))
        if op == "Neg":
            return -args[0]
    except Exception:  # anything unusual: not a constant we understand
        return None
    return None


def const_scalar(value: ir.Value | None) -> float | None:
    """A constant holding exactly one number (any shape of size 1)."""
    array = small_const_array(value)
    if array is None or array.size != 1:
        return None
    return float(np.asarray(array, dtype=np.float64).reshape(()))


def attr(node: ir.Node, name: str, default=None):
    attribute = node.attributes.get(name)
    if attribute is None:
        return default
    return attribute.value


def other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """For a binary node with ``value`` as one operand, the other operand."""
    a, b = node.inputs[0], node.inputs[1]
    if a is value:
        return b
    if b is value:
        return a
    return None


def rank_of(value: ir.Value | None) -> int | None:
    # A Cast keeps its input's shape: look through it when the graph has no shape for its output.
    while value is not None and value.shape is None:
        producer = value.producer()
        if producer is None or producer.op_type != "Cast" or producer.domain not in ("", "ai.onnx"):
            return None
        value = producer.inputs[0]
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def node_label(node: ir.Node) -> str:
    prefix = f"{node.domain}." if node.domain not in ONNX_DOMAINS else ""
    name = f" '{node.name}'" if node.name else ""
    return f"{prefix}{node.op_type}{name}"


def unique_name(graph: ir.Graph, base: str, taken: set[str]) -> str:
    if not taken:
        for v in graph.initializers.values():
            taken.add(v.name)
        for v in graph.inputs:
            taken.add(v.name)
        for n in graph.all_nodes():
            for o in n.outputs:
                if o.name:
                    taken.add(o.name)
    name = base
    i = 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def opset_version(model: ir.Model, domain: str = "") -> int:
    return model.opset_imports.get(domain, model.opset_imports.get("ai.onnx", 1))


def copy_type(dst: ir.Value, src: ir.Value) -> None:
    """Copy type and shape information, when there is any."""
    if src.type is not None:
        dst.type = src.type
    if src.shape is not None:
        dst.shape = src.shape


def release_tensor(tensor) -> None:
    """Unmap a memory-mapped external tensor (its pages leave the resident set)."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # an array still views the mapping: it is unmapped later
            pass
