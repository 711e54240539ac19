"""Read a dimension from the earliest value that provably has it (``--for-ort``).

``Shape(v, start=k, end=k+1)`` only needs v's dimension k, not v. Where v comes from another value
u through nodes whose output dimension k is, by what they compute, a dimension j of u, the Shape
can read u instead::

    Transpose(x, perm)          dim k  = dim perm[k] of x
    Split(x, axis=a)            dim k  = dim k of x                      (k != a)
    Reshape(x, target)          dim k  = dim k of x                      target[k] a constant 0 (allowzero=0)
                                       = dim j of u                      target[k] = Unsqueeze(Gather(Shape(u), j))
                                                                         in a Concat of one-element pieces

The value of the Shape is unchanged; what changes is which nodes must run for it. After the
attention fusions, the Q/K/V ``Split`` and the rotary's ``Reshape``/``Transpose`` are kept in the
main graph only by such shape reads (the batch and sequence lengths the GroupQueryAttention inputs
are computed from), while their data is read by one ``If`` branch alone; rerouted, they can move
into that branch (:mod:`flashnorm_onnx.fusions.sink`).
"""

from __future__ import annotations

import onnx_ir as ir

from flashnorm_onnx.passes.graph_utils import const_array, is_op


def reroute_shape_reads(graph: ir.Graph) -> int:
    """Point every one-dimension ``Shape`` of ``graph`` at the earliest value with that
    dimension (see the module docstring); returns how many were rerouted."""
    done = 0
    for node in graph:
        if not is_op(node, "Shape") or node.inputs[0] is None:
            continue
        value = node.inputs[0]
        k = _one_dim(node, value)
        if k is None:
            continue
        source, j = value, k
        while (step := _through(source, j)) is not None:
            source, j = step
        if source is value:
            continue
        node.replace_input_with(0, source)
        node.attributes.pop("start", None)
        node.attributes.pop("end", None)
        node.attributes.add(ir.AttrInt64("start", j))
        node.attributes.add(ir.AttrInt64("end", j + 1))
        done += 1
    return done


def _one_dim(node: ir.Node, value: ir.Value) -> int | None:
    """k where the Shape reads dimension k alone (non-negative); None otherwise."""
    rank = value.shape.rank() if value.shape is not None else None
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", None)
    if start < 0 or (end is not None and end < 0):
        if rank is None:
            return None
        start = start + rank if start < 0 else start
        end = end + rank if end is not None and end < 0 else end
    if end is None:
        if rank is None:
            return None
        end = rank
    return start if end == start + 1 and start >= 0 else None


def _through(value: ir.Value, k: int) -> tuple[ir.Value, int] | None:
    """(u, j) with dimension k of ``value`` equal to dimension j of u, by what ``value``'s
    producer computes; None where that is not known."""
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
        return None
    x = node.inputs[0]
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        return (x, perm[k]) if perm is not None and k < len(perm) else None
    if node.op_type == "Split":
        known = x.shape if x.shape is not None else value.shape  # Split keeps the rank
        rank = known.rank() if known is not None else None
        axis = node.attributes.get_int("axis", 0)
        if axis < 0:
            if rank is None:
                return None
            axis += rank
        return (x, k) if k != axis else None
    if node.op_type == "Reshape" and len(node.inputs) > 1 and not node.attributes.get_int("allowzero", 0):
        return _reshape_dim(x, node.inputs[1], k)
    return None


def _reshape_dim(x: ir.Value, target: ir.Value | None, k: int) -> tuple[ir.Value, int] | None:
    """Reshape's target entry k: a constant 0 (x's dim k) or ``Unsqueeze(Gather(Shape(u), j))``
    in a ``Concat`` of one-element pieces (u's dim j)."""
    entries = const_array(target)
    if entries is not None:
        entries = entries.reshape(-1)
        return (x, k) if k < len(entries) and entries[k] == 0 else None
    concat = target.producer() if target is not None else None
    if not is_op(concat, "Concat") or k >= len(concat.inputs):
        return None
    for i, piece in enumerate(concat.inputs[:k + 1]):
        values = const_array(piece)
        if values is not None:
            if values.size != 1:
                return None
            if i == k:
                return (x, k) if int(values.reshape(-1)[0]) == 0 else None
            continue
        entry = _shape_entry(piece)
        if entry is None:
            return None
        if i == k:
            return entry
    return None


def _shape_entry(piece: ir.Value | None) -> tuple[ir.Value, int] | None:
    """(u, j) where ``piece`` (one element) = Unsqueeze(Gather(Shape(u), j)), j a scalar
    constant."""
    unsqueeze = piece.producer() if piece is not None else None
    if not is_op(unsqueeze, "Unsqueeze") or unsqueeze.inputs[0] is None:
        return None
    gather = unsqueeze.inputs[0].producer()
    if not is_op(gather, "Gather") or gather.attributes.get_int("axis", 0) != 0 or len(gather.inputs) < 2:
        return None
    index = const_array(gather.inputs[1])
    if index is None or index.ndim != 0 or gather.inputs[0] is None:
        return None
    shape = gather.inputs[0].producer()
    if not is_op(shape, "Shape") or shape.inputs[0] is None:
        return None
    j, start = int(index), shape.attributes.get_int("start", 0)
    if start < 0 or j < 0 or shape.attributes.get_int("end", None) is not None:
        return None
    return shape.inputs[0], start + j
