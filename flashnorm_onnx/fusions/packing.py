"""Pack the linears that read one value into one MatMul and a Split (``--for-ort``).

After the fold, the Q, K and V projections of a layer read the same weightless norm output, and so
do the gate and up projections of its MLP. Three (or two) MatMuls of one activation by weights
``W_i [K, N_i]`` are one MatMul by their concatenation along the output axis::

    x @ [W_1 | W_2 | W_3]  =  [x @ W_1 | x @ W_2 | x @ W_3]        Split(axis=-1, [N_1, N_2, N_3])

which is what onnxruntime-genai's builder writes (its ``qkv_proj`` and ``gate_up_proj``): one
larger GEMM reads the activation once and keeps the cores busier on small batches. Each output
column is the same dot product as before, so the function is unchanged (the summation order
inside a column may differ with the kernel's blocking: rounding, not a different function).

Packed only where it cannot cost memory: each weight a 2-D constant of one dtype, read by this
MatMul alone (a tied or shared weight is left as it is, never copied), the MatMuls reading the
same value as their first input. The unpacked weights then have no reader and go away.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from flashnorm_onnx.fusions.gqa_rotary import gqa_nodes
from flashnorm_onnx.passes.graph_utils import opset_version, unique_name


def pack_linears(model: ir.Model, attention_only: bool = False) -> int:
    """Pack every group of 2+ MatMuls reading one value (see the module docstring), in every
    graph of ``model``; returns how many groups were packed. ``attention_only``: only the Q, K and
    V projections that a ``GroupQueryAttention`` reads as its first three inputs (packed in that
    order), which the node can then read as one packed tensor
    (:func:`flashnorm_onnx.fusions.gqa_rotary.pack_split_inputs`)."""
    if opset_version(model) < 13:  # Split's sizes as an input
        return 0
    packed = 0
    taken: set[str] = set()
    names = lambda base: unique_name(model.graph, base, taken)  # noqa: E731 - every graph's names
    attention = _attention_inputs(model) if attention_only else None
    for graph in [model.graph, *model.graph.subgraphs()]:
        for value in _values(graph):
            group = _group(value)
            if attention is not None:
                group = _as_attention_inputs(group, attention)
            if len(group) >= 2:
                _pack(model.graph, graph, value, group, names)
                packed += 1
    return packed


def _attention_inputs(model: ir.Model) -> list[tuple[ir.Value, ...]]:
    """(q, k, v) of every ``GroupQueryAttention`` that reads them separately, subgraphs included."""
    return [tuple(node.inputs[:3]) for node in gqa_nodes(model)
            if len(node.inputs) >= 3 and all(x is not None for x in node.inputs[:3])]


def _as_attention_inputs(group: list[ir.Node], attention: list[tuple[ir.Value, ...]]) -> list[ir.Node]:
    """``group``'s MatMuls in (q, k, v) order when their outputs are exactly one attention's
    (q, k, v); else none."""
    by_output = {id(n.outputs[0]): n for n in group}
    for qkv in attention:
        if len(group) == 3 and {id(x) for x in qkv} == set(by_output):
            return [by_output[id(x)] for x in qkv]
    return []


def _values(graph: ir.Graph) -> list[ir.Value]:
    values = list(graph.inputs)
    for node in graph:
        values.extend(node.outputs)
    return values


def _weight(node: ir.Node) -> ir.Value | None:
    """The MatMul's weight when it is a 2-D float constant only this MatMul reads."""
    if len(node.inputs) != 2 or node.inputs[1] is None:
        return None
    w = node.inputs[1]
    tensor = w.const_value
    if tensor is None or w.is_graph_input() or w.is_graph_output() or len(tensor.shape) != 2:
        return None
    if not tensor.dtype.is_floating_point() or len(list(w.uses())) != 1:
        return None
    return w


def _group(value: ir.Value) -> list[ir.Node]:
    """The MatMuls of one graph reading ``value`` as input 0 with packable weights of one dtype and K."""
    found: list[ir.Node] = []
    for use in value.uses():
        node = use.node
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or use.idx != 0:
            continue
        if node.graph is not value.graph and value.graph is not None:
            continue
        w = _weight(node)
        if w is None:
            continue
        if found:
            first = found[0].inputs[1].const_value
            if w.const_value.dtype != first.dtype or w.const_value.shape[0] != first.shape[0]:
                continue
        found.append(node)
    return found


def _pack(main: ir.Graph, graph: ir.Graph, value: ir.Value, group: list[ir.Node], names) -> None:
    """One MatMul by the concatenated weights (a new initializer of the main graph, which every
    subgraph can read) and a Split whose outputs take the old MatMuls' names and readers."""
    weights = [n.inputs[1] for n in group]
    arrays = [w.const_value.numpy() for w in weights]
    widths = [a.shape[1] for a in arrays]
    name = names(f"{weights[0].name or 'linear'}.packed")
    packed = ir.Value(name=name, const_value=ir.Tensor(np.ascontiguousarray(np.concatenate(arrays, axis=1)), name=name),
                      shape=ir.Shape([arrays[0].shape[0], sum(widths)]), type=ir.TensorType(weights[0].const_value.dtype))
    main.register_initializer(packed)
    sizes_name = names(f"{name}.split")
    sizes = ir.Value(name=sizes_name, const_value=ir.tensor(np.array(widths, dtype=np.int64), name=sizes_name))
    main.register_initializer(sizes)
    order = {id(n): k for k, n in enumerate(graph)}
    first = min(group, key=lambda n: order[id(n)])
    matmul = ir.Node("", "MatMul", [value, packed], num_outputs=1, name=names(f"{first.name or 'MatMul'}/packed"))
    matmul.outputs[0].name = names(f"{name}.out")
    split = ir.Node("", "Split", [matmul.outputs[0], sizes], attributes=[ir.AttrInt64("axis", -1)],
                    num_outputs=len(group), name=names(f"{first.name or 'MatMul'}/packed_split"))
    graph.insert_before(first, [matmul, split])
    for node, out in zip(group, split.outputs):
        old = node.outputs[0]
        new_name = old.name
        old.name = names(f"{old.name}.unpacked")
        out.name = new_name
        out.type, out.shape = old.type, old.shape
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
    for w in weights:
        if w.is_initializer() and not list(w.uses()):
            w.graph.initializers.pop(w.name, None)
