"""Match the attention that a legacy or optimum export writes, for :mod:`gqa_legacy`.

``match_attention(softmax)`` walks out from a ``Softmax`` by what the nodes compute: the scores a scaled
``MatMul(q, k^T)`` plus a bias (scales, a ``repeat_kv`` expansion and the key cache's ``Concat``
stripped), the output ``MatMul(probabilities, v)`` merged back to [B, S, heads * head]; it returns
the pieces (a :class:`Match`) or why the attention is not one it can rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from flashnorm_onnx.fusions.gqa import scalar_value

_NO_SCORES = "the scores are not a scaled MatMul(q, k^T)"


@dataclass
class Match:
    softmax: ir.Node
    out: ir.Value  # the attention's [B, S, N*H] output (the Reshape after the Transpose)
    q: ir.Value  # [B, N, S, H], rotated, unscaled
    k_new: ir.Value  # [B, KV, S, H], rotated
    v_new: ir.Value
    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value
    present_value: ir.Value
    bias: ir.Value
    scale: float
    # values between a cache Concat and its MatMul, with the axis of their length T and their rank
    key_lengths: dict[int, tuple[ir.Value, int, int]] = field(default_factory=dict)
    nodes: set = field(default_factory=set)  # the matched nodes (by id)
    # the scores were cast to float32 for the softmax and the probabilities back (an fp16 export
    # of an eager attention that upcasts its softmax): the bias is then float32
    upcast: bool = False


def _strip_scales(value: ir.Value, nodes: set, lengths: dict | None = None):
    """``value`` past scalar Mul/Div (and, with ``lengths``, one [0, 1, 3, 2] Transpose); returns
    (source, scale, transposed)."""
    scale, transposed = 1.0, False
    while (node := value.producer()) is not None:
        if lengths is not None:
            lengths[id(value)] = (value, 2 if transposed else 3, 4)  # walking up: T last until the Transpose
        if node.op_type == "Mul" and node.domain == "" and (c := scalar_value(node.inputs[1])) is not None:
            scale, value = scale * c, node.inputs[0]
        elif node.op_type == "Mul" and node.domain == "" and (c := scalar_value(node.inputs[0])) is not None:
            scale, value = scale * c, node.inputs[1]
        elif node.op_type == "Div" and node.domain == "" and (c := scalar_value(node.inputs[1])) is not None:
            scale, value = scale / c, node.inputs[0]
        elif (lengths is not None and not transposed and node.op_type == "Transpose"
              and list(node.attributes.get_ints("perm", [])) == [0, 1, 3, 2]):
            transposed, value = True, node.inputs[0]
        else:
            break
        nodes.add(id(node))
    return value, scale, transposed


def _strip_repeat_kv(value: ir.Value, nodes: set, lengths: dict) -> ir.Value:
    """``Reshape(Expand(Unsqueeze(x, [2]), .), .)`` -> x (``repeat_kv``); else ``value``."""
    reshape = value.producer()
    if reshape is None or reshape.op_type != "Reshape":
        return value
    expand = reshape.inputs[0].producer()
    if expand is None or expand.op_type != "Expand":
        return value
    unsqueeze = expand.inputs[0].producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.inputs) < 2:
        return value
    axes = ir.convenience.get_const_tensor(unsqueeze.inputs[1])
    if axes is None or axes.numpy().reshape(-1).tolist() != [2]:
        return value
    lengths[id(value)] = (value, 2, 4)
    lengths[id(expand.outputs[0])] = (expand.outputs[0], 3, 5)
    lengths[id(unsqueeze.outputs[0])] = (unsqueeze.outputs[0], 3, 5)
    nodes.update({id(reshape), id(expand), id(unsqueeze)})
    return unsqueeze.inputs[0]


def _cache(value: ir.Value, nodes: set, lengths: dict):
    """(past, new, the Concat's output) of ``Concat(past, new, axis=2)`` with ``past`` a graph
    input; else a reason."""
    node = value.producer()
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2:
        return "the keys/values are not Concat(past, new)"
    if node.attributes.get_int("axis", 0) not in (2, -2):
        return "the cache Concat is not on the sequence axis"
    past, new = node.inputs
    if past is None or not past.is_graph_input():
        return "the cache Concat does not read a past graph input"
    lengths[id(value)] = (value, 2, 4)
    nodes.add(id(node))
    return past, new, value


def match_attention(softmax: ir.Node) -> Match | str:
    """The attention around ``softmax`` (see the module docstring), or why it is not one."""
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return "not an attention's Softmax (its axis is not the keys' axis, -1 or 3, of [B, N, S, T])"
    nodes: set = {id(softmax)}
    probs = softmax.outputs[0]
    readers = [u.node for u in probs.uses()]
    # Cast(p) back to the activations' dtype, before or after the guard
    downcast, probs, readers = _through_cast(probs, readers, nodes)
    if len(readers) == 2 and {n.op_type for n in readers} == {"IsNaN", "Where"}:  # the NaN guard
        where = next(n for n in readers if n.op_type == "Where")
        isnan = next(n for n in readers if n.op_type == "IsNaN")
        if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs or \
                scalar_value(where.inputs[1]) != 0.0:
            return "the Softmax is followed by a Where that is not the guard Where(IsNaN(p), 0, p)"
        nodes.update(id(n) for n in readers)
        probs = where.outputs[0]
        readers = [u.node for u in probs.uses()]
    if downcast is None:
        downcast, probs, readers = _through_cast(probs, readers, nodes)
    if len(readers) != 1 or readers[0].op_type != "MatMul" or readers[0].inputs[0] is not probs:
        return "the probabilities are not read by one MatMul(p, v)"
    pv = readers[0]
    nodes.add(id(pv))
    out = _output(pv, nodes)
    if isinstance(out, str):
        return out
    add = softmax.inputs[0].producer()
    if add is None or add.op_type != "Add":
        return "the Softmax does not read Add(scores, mask)"
    nodes.add(id(add))
    reasons = []
    for scores, bias in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        scored = _scores(scores, nodes)
        if not isinstance(scored, str):
            break
        reasons.append(scored)
    if isinstance(scored, str):  # the side that was a MatMul says more
        return next((r for r in reasons if r != _NO_SCORES), _NO_SCORES)
    q, k_new, past_key, present_key, scale, lengths, upcast = scored
    if upcast != (downcast is not None):
        return "the scores are cast for the softmax but the probabilities are not cast back (or the reverse)"
    v_lengths: dict = {}
    values = _cache(_strip_repeat_kv(pv.inputs[1], nodes, v_lengths), nodes, v_lengths)
    if isinstance(values, str):
        return values
    past_value, v_new, present_value = values
    return Match(softmax=softmax, out=out, q=q, k_new=k_new, v_new=v_new, past_key=past_key,
                  past_value=past_value, present_key=present_key, present_value=present_value, bias=bias,
                  scale=scale, key_lengths={**lengths, **v_lengths}, nodes=nodes, upcast=upcast)


def _output(pv: ir.Node, nodes: set) -> ir.Value | str:
    uses = list(pv.outputs[0].uses())
    transpose = uses[0].node if len(uses) == 1 else None
    if transpose is None or transpose.op_type != "Transpose" or \
            list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return "the attention output is not Transpose(., [0, 2, 1, 3])"
    uses = list(transpose.outputs[0].uses())
    reshape = uses[0].node if len(uses) == 1 else None
    if reshape is None or reshape.op_type != "Reshape":
        return "the attention output is not reshaped to [B, S, N*H]"
    if not _merges_heads(reshape.inputs[1]):
        return "the attention output's Reshape is not the merge of its heads to [B, S, N*H]"
    nodes.update({id(transpose), id(reshape)})
    return reshape.outputs[0]


def _merges_heads(target: ir.Value) -> bool:
    """Is a Reshape of [B, S, N, H] to ``target`` the merge to [B, S, N*H]: a constant [0, 0, -1 or
    a width], or ``Concat(dim 0 of y, dim 1 of y, -1 or a width)`` (the legacy exporter's)."""
    def last_ok(values) -> bool:
        return len(values) == 1 and (values[0] == -1 or values[0] > 0)

    const = ir.convenience.get_const_tensor(target)
    if const is not None:
        dims = const.numpy().reshape(-1).tolist()
        return len(dims) == 3 and dims[:2] == [0, 0] and last_ok(dims[2:])
    concat = target.producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 3:
        return False
    last = ir.convenience.get_const_tensor(concat.inputs[2])
    y = dim_of(concat.inputs[0], 0)
    return (last is not None and last_ok(last.numpy().reshape(-1).tolist()) and y is not None
            and dim_of(concat.inputs[1], 1) is y)


def _scores(scores: ir.Value, nodes: set):
    """(q, k_new, past_key, present_key, scale, key lengths) of ``scores`` = scaled MatMul(q, k^T)."""
    found: set = set()
    source, scale, _ = _strip_scales(scores, found)
    upcast = source.producer() if _is_cast(source.producer(), ir.DataType.FLOAT) else None
    if upcast is not None:  # Cast(scores) to float32 for the softmax
        found.add(id(upcast))
        source, more, _ = _strip_scales(upcast.inputs[0], found)
        scale *= more
    matmul = source.producer()
    if matmul is None or matmul.op_type != "MatMul":
        return _NO_SCORES
    found.add(id(matmul))
    q, q_scale, _ = _strip_scales(matmul.inputs[0], found)
    lengths: dict = {}
    k, k_scale, transposed = _strip_scales(matmul.inputs[1], found, lengths)
    if not transposed:
        return "the keys are not transposed [0, 1, 3, 2] into the scores' MatMul"
    cached = _cache(_strip_repeat_kv(k, found, lengths), found, lengths)
    if isinstance(cached, str):
        return cached
    nodes.update(found)
    past_key, k_new, present_key = cached
    return q, k_new, past_key, present_key, scale * q_scale * k_scale, lengths, upcast is not None


def _through_cast(probs: ir.Value, readers: list, nodes: set) -> tuple[ir.Node | None, ir.Value, list]:
    """(the Cast, its output, its readers) where ``probs``' one reader is a float Cast; else
    (None, ``probs``, ``readers``)."""
    if len(readers) != 1 or not _is_cast(readers[0]):
        return None, probs, readers
    nodes.add(id(readers[0]))
    out = readers[0].outputs[0]
    return readers[0], out, [u.node for u in out.uses()]


def _is_cast(node: ir.Node | None, to: ir.DataType | None = None) -> bool:
    """A ``Cast`` between float types (to ``to`` where given)."""
    floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    if node is None or node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
        return False
    target = node.attributes.get_int("to", 0)
    return target in floats and (to is None or target == to)



def dim_of(value: ir.Value, axis: int) -> ir.Value | None:
    """y when ``value`` = ``Unsqueeze(Gather(Shape(y), axis), 0)``."""
    unsqueeze = value.producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return None
    gather = unsqueeze.inputs[0].producer()
    if gather is None or gather.op_type != "Gather" or gather.attributes.get_int("axis", 0) != 0:
        return None
    index = ir.convenience.get_const_tensor(gather.inputs[1])
    shape = gather.inputs[0].producer()
    if index is None or index.numpy().reshape(-1).tolist() != [axis] or shape is None or \
            shape.op_type != "Shape" or shape.attributes:
        return None
    return shape.inputs[0]
