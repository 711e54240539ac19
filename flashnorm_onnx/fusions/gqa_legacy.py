"""Grouped-query attention of a legacy (TorchScript) / optimum with-past export as ONNX Runtime's
``GroupQueryAttention``, exact for every valid mask.

The dynamo rule (:mod:`flashnorm_onnx.fusions.gqa`) rides on onnxscript's pattern, written for
dynamo graphs. The legacy exporter writes the same attention with other nodes, and ORT's
transformers optimizer (which ``--for-ort`` runs on such graphs first) fuses only its rotary. This
rule matches the attention by what its nodes compute, starting from each ``Softmax``:

* pattern: ``Softmax(Add(scores, bias))`` (either order), optionally followed by the
  ``Where(IsNaN(p), 0, p)`` guard, read by ``MatMul(p, v_rep)`` and then
  ``Reshape(Transpose(., [0, 2, 1, 3]))`` to [B, S, N*H]; ``scores = MatMul(q, k_rep^T)`` with
  scalar ``Mul`` / ``Div`` scales anywhere on either side (their product is the scale);
  ``k_rep`` / ``v_rep``: ``repeat_kv`` (``Reshape(Expand(Unsqueeze(x, 2)))``) or nothing, over
  ``Concat(past, new, axis=2)`` whose ``past`` is a graph input;
* check (each refusal is logged with its reason): head counts from the past's static shape and
  the query's width; the bias depends on the attention only through the keys' length (the
  ``mask[..., :key.shape[-2]]`` slice; that length is rewired to ``past + S`` from shapes); the
  bias blocks every key the kernel's causal limit blocks (its subgraph run alone in ORT on probe
  inputs: :func:`flashnorm_onnx.fusions.gqa._mask_is_causal`);
* rewrite: ``GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k = T - 1 for every row,
  total_sequence_length = T, attention_bias = the bias)``, T = past + S from shapes, ``scale`` the
  export's, ``do_rotary=0`` (the export's rotary stays: on Q/K in [B, S, N*H] where ORT's
  ``RotaryEmbedding`` is found, else the rotated [B, N, S, H] values transposed back); its
  present outputs replace the export's ``Concat`` (same layout and length: past + S). T,
  ``seqlens_k`` and the ``If`` condition are computed once per model (:class:`_Lengths`), so the
  layers' masks become one computation (merged by common subexpression elimination).

Two differences, both where nothing is compared: a query row whose every key is masked (a left
pad) gets 0 in the export (the NaN guard) and an average of the values here; the bias is clamped to
the lowest float so that such a row stays finite in every kernel. And ORT's CPU kernel refuses a
multi-token step on a cache at batch > 1 ("batch_size must be 1 when sequence_length > 1 and past
context is given"), so each node sits in an ``If``: that case runs the same attention decomposed
(:func:`_decomposed`), every other case the fused node.

Where the kernel's own rotary computes the export's (:mod:`flashnorm_onnx.fusions.gqa_rotary`), a
second node applies it itself from the position ids, in an outer ``If`` taken wherever that holds;
the rotary-outside node above (with its ``If``) is then the other branch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from flashnorm_onnx.fusions.gqa import (
    SAME_SHAPE,
    _mask_is_causal,
    last_dim,
    ort_honours_attention_bias,
    scalar_value,
    value_dtype,
    value_rank,
)
from flashnorm_onnx.fusions.gqa_rotary import ort_rotary_reads_position_ids, positions_condition, rotary_pair

logger = logging.getLogger(__name__)

_I64 = ir.DataType.INT64
_NO_SCORES = "the scores are not a scaled MatMul(q, k^T)"


@dataclass
class _Match:
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


def fuse_gqa_legacy(model: ir.Model) -> tuple[int, list[str]]:
    """Apply the rule to ``model`` in place; how many attentions became ``GroupQueryAttention``,
    and one line per refused ``Softmax`` saying why."""
    if not ort_honours_attention_bias():
        return 0, ["GroupQueryAttention not used: this onnxruntime ignores its attention_bias input"]
    graph, fused, refusals, shared = model.graph, 0, [], _Lengths()
    for softmax in [n for n in graph if n.op_type == "Softmax" and n.domain == ""]:
        match = _match(softmax)
        why = match if isinstance(match, str) else _check_and_rewrite(model, match, shared)
        if why:
            refusals.append(f"{softmax.name}: {why}")
            logger.info("GroupQueryAttention not fused at %s: %s", softmax.name, why)
        else:
            fused += 1
    if fused:
        graph.sort()
        import onnx_ir.passes.common as common_passes

        common_passes.RemoveUnusedNodesPass()(model)
        # the layers' masks now read one length: their copies (Slice, Where, Max) become one
        common_passes.CommonSubexpressionEliminationPass()(model)
        model.opset_imports.setdefault("com.microsoft", 1)
    return fused, refusals


# -- match -------------------------------------------------------------------------------------------


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


def _match(softmax: ir.Node) -> _Match | str:
    """The attention around ``softmax`` (see the module docstring), or why it is not one."""
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return "not an attention's Softmax (its axis is not the keys' axis, -1 or 3, of [B, N, S, T])"
    nodes: set = {id(softmax)}
    probs = softmax.outputs[0]
    readers = [u.node for u in probs.uses()]
    if len(readers) == 2 and {n.op_type for n in readers} == {"IsNaN", "Where"}:  # the NaN guard
        where = next(n for n in readers if n.op_type == "Where")
        isnan = next(n for n in readers if n.op_type == "IsNaN")
        if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs or \
                scalar_value(where.inputs[1]) != 0.0:
            return "the Softmax is followed by a Where that is not the guard Where(IsNaN(p), 0, p)"
        nodes.update(id(n) for n in readers)
        probs = where.outputs[0]
        readers = [u.node for u in probs.uses()]
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
    q, k_new, past_key, present_key, scale, lengths = scored
    v_lengths: dict = {}
    values = _cache(_strip_repeat_kv(pv.inputs[1], nodes, v_lengths), nodes, v_lengths)
    if isinstance(values, str):
        return values
    past_value, v_new, present_value = values
    return _Match(softmax=softmax, out=out, q=q, k_new=k_new, v_new=v_new, past_key=past_key,
                  past_value=past_value, present_key=present_key, present_value=present_value, bias=bias,
                  scale=scale, key_lengths={**lengths, **v_lengths}, nodes=nodes)


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
    y = _dim_of(concat.inputs[0], 0)
    return (last is not None and last_ok(last.numpy().reshape(-1).tolist()) and y is not None
            and _dim_of(concat.inputs[1], 1) is y)


def _scores(scores: ir.Value, nodes: set):
    """(q, k_new, past_key, present_key, scale, key lengths) of ``scores`` = scaled MatMul(q, k^T)."""
    found: set = set()
    source, scale, _ = _strip_scales(scores, found)
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
    return q, k_new, past_key, present_key, scale * q_scale * k_scale, lengths


# -- check and rewrite -------------------------------------------------------------------------------


class _Nodes:
    """New nodes, each output named ``<prefix>/<n>`` (unique in the graph and its subgraphs)."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self._n = prefix, [], 0

    def __call__(self, op_type: str, inputs, num_outputs: int = 1, domain: str = "", **attributes):
        node = ir.node(op_type, inputs, attributes, domain=domain, num_outputs=num_outputs,
                       name=f"{self.prefix}/{op_type}_{self._n}")
        for out in node.outputs:
            out.name = f"{self.prefix}/{op_type}_{self._n}_{out.index()}"
        self._n += 1
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else node.outputs

    def const(self, values, dtype=_I64) -> ir.Value:
        return self("Constant", [], value=ir.tensor(np.array(values, dtype=dtype.numpy())))


def _heads(m: _Match) -> tuple[int, int, int] | str:
    """(N, KV, H): KV and H from the past's static shape, N from the query's width."""
    kv, head = (m.past_key.shape[1], m.past_key.shape[3]) if m.past_key.shape and m.past_key.shape.rank() == 4 \
        else (None, None)
    if not isinstance(kv, int) or not isinstance(head, int):
        return "the past's head count or head size is not static"
    width = _querylast_dim(m.q)
    heads = width // head if width is not None else (m.q.shape[1] if m.q.shape and m.q.shape.rank() == 4
                                                     else None)
    if not isinstance(heads, int):
        return "the query's head count is unknown"
    if heads % kv or head % 8:
        return f"{heads} query heads over {kv} KV heads of size {head}: not a GroupQueryAttention shape"
    if value_dtype(m.bias) != m.past_key.dtype or value_dtype(m.q) != m.past_key.dtype:
        return "the mask, query and cache dtypes differ (or are unknown)"
    return heads, kv, head


def _querylast_dim(q: ir.Value) -> int | None:
    """N*H of the query [B, N, S, H]: the width of the projection it was split from, found up
    through its rotary, the [0, 2, 1, 3] Transpose and same-shape nodes (a per-head norm) to the
    Reshape."""
    for _ in range(8):
        node = q.producer()
        if node is None:
            return None
        if node.op_type == "Reshape":
            return last_dim(node.inputs[0])
        if not (node.op_type in SAME_SHAPE or node.op_type == "Transpose" and
                list(node.attributes.get_ints("perm", [])) == [0, 2, 1, 3]):
            return None
        q = node.inputs[0]
    return None


def _bsd_source(value: ir.Value, head: int) -> ir.Value | None:
    """x when ``value`` = ``Transpose(Reshape(x [B, S, ...], [B, S, n, head]), [0, 2, 1, 3])``, with
    B and S copied (0 in a constant shape, or read from x's shape, or from the input of x's MatMul):
    then ``Reshape(x, [0, 0, -1])`` is ``value`` in [B, S, n*head]."""
    transpose = value.producer()
    if transpose is None or transpose.op_type != "Transpose" or \
            list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    reshape = transpose.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    x, target = reshape.inputs[0], reshape.inputs[1]
    const = ir.convenience.get_const_tensor(target)
    if const is not None:
        dims = const.numpy().reshape(-1).tolist()
        return x if len(dims) == 4 and dims[:2] == [0, 0] and dims[3] == head else None
    concat = target.producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 4:
        return None
    last = ir.convenience.get_const_tensor(concat.inputs[3])
    if last is None or last.numpy().reshape(-1).tolist() != [head]:
        return None
    sources = {id(x)}
    if x.producer() is not None and x.producer().op_type == "MatMul":
        sources.add(id(x.producer().inputs[0]))  # a projection keeps the leading dims
    for axis in (0, 1):
        shape = _dim_of(concat.inputs[axis], axis)
        if shape is None or id(shape) not in sources:
            return None
    return x


def _dim_of(value: ir.Value, axis: int) -> ir.Value | None:
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


def _flat(new: _Nodes, x: ir.Value) -> ir.Value:
    """x as [B, S, -1] (x itself where its rank is known to be 3)."""
    if value_rank(x) == 3:
        return x
    return new("Reshape", [x, new.const([0, 0, -1])])


def _bsd(new: _Nodes, value: ir.Value, heads: int, head: int) -> ir.Value:
    """``value`` [B, n, S, head] as [B, S, n*head]: the 3-D input of its Reshape/Transpose where
    there is one (a ``RotaryEmbedding`` between them is applied to the 3-D input instead, with
    ``num_heads``: the same result, bitwise), else ``Reshape(Transpose(value))``."""
    node = value.producer()
    if node is not None and node.op_type == "RotaryEmbedding" and node.domain == "com.microsoft" and \
            not node.attributes.get_int("is_packed_batching", 0):
        source = _bsd_source(node.inputs[0], head)
        if source is not None:
            attributes = {k: a.value for k, a in node.attributes.items()}
            attributes["num_heads"] = heads
            return new("RotaryEmbedding", [_flat(new, source), *node.inputs[1:]], domain="com.microsoft",
                       **attributes)
    source = _bsd_source(value, head)
    if source is not None:
        return _flat(new, source)
    return new("Reshape", [new("Transpose", [value], perm=[0, 2, 1, 3]), new.const([0, 0, heads * head])])


def _lengths_in_bias(m: _Match) -> list[tuple[ir.Value, int]] | str:
    """The values in the bias's computation that read the keys' length T (``Gather(Shape(k), T's
    axis)``, or ``Shape(k, start, end)`` of that axis), each with its rank (0 or 1); a reason where
    the bias depends on the attention otherwise."""
    inner = {id(m.q), id(m.k_new), id(m.v_new)} | set(m.key_lengths)
    stack, seen, found = [m.bias], set(), []
    while stack:
        value = stack.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        node = value.producer()
        if id(value) in inner or (node is not None and id(node) in m.nodes):
            return "the mask depends on the attention's queries, keys or values"
        if node is None:
            continue
        if len(seen) > 4000:
            return "the mask's computation is too large to follow"
        length = _key_length(node, m.key_lengths)
        if length is not None:
            if length < 0:
                return "the mask reads the keys' shape other than their length"
            found.append((value, length))
            continue
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return "a subgraph in the mask's computation"
        stack.extend(node.inputs)
    return found


def _key_length(node: ir.Node, key_lengths: dict) -> int | None:
    """For a node reading the shape of a key/value in the attention: the rank of its output when it
    is exactly their length T, -1 when it is something else; None for other nodes."""
    shape = node if node.op_type == "Shape" else (
        node.inputs[0].producer() if node.op_type == "Gather" and node.inputs[0] is not None else None)
    if shape is None or shape.op_type != "Shape" or id(shape.inputs[0]) not in key_lengths:
        return None
    _, axis, rank = key_lengths[id(shape.inputs[0])]
    start = shape.attributes.get_int("start", 0) % rank
    end = shape.attributes.get_int("end", rank)
    end = end % rank if end < 0 else min(end, rank)
    if node is shape:
        return 1 if (start, end) == (axis, axis + 1) else -1
    index = ir.convenience.get_const_tensor(node.inputs[1])
    if index is None or index.size != 1 or node.attributes.get_int("axis", 0) != 0:
        return -1
    i = int(index.numpy().reshape(-1)[0])
    return index.numpy().ndim if start + (i % (end - start)) == axis else -1


class _Lengths:
    """T = past + S (int64 [1] and scalar), ``seqlens_k`` = T - 1 per row, ``total_sequence_length``
    = T (int32) and the ``If`` condition (batch > 1, S > 1, past > 0), from shapes, computed once for
    the model from the first fused layer's query and past: the layers of a decoder share one cache
    (every past input has the same length; the export's own mask is built from the first layer's).
    Computed per layer they cost about a dozen small nodes each, a few percent of a decode step."""

    def __init__(self):
        self.values: dict[str, ir.Value] = {}
        self.inside: dict[int, ir.Value] = {}  # per position-ids value: the rotary-inside condition

    def rotary_inside(self, new: _Nodes, positions: ir.Value) -> ir.Value:
        """bool [1]: the node with the rotary inside computes the export's function on this step
        (not the refused case, and :func:`~flashnorm_onnx.fusions.gqa_rotary.positions_condition`)."""
        if id(positions) not in self.inside:
            t = self.values
            self.inside[id(positions)] = new("And", [new("Not", [t["cond"]]),
                                                     positions_condition(new, positions, t["past_len"])])
        return self.inside[id(positions)]

    def of(self, new: _Nodes, q: ir.Value, past_key: ir.Value) -> dict[str, ir.Value]:
        if self.values:
            return self.values
        q.type, q.shape = q.type or past_key.type, q.shape or ir.Shape([None] * 3)  # GQA reads [B, S, D]
        past_len = new("Shape", [past_key], start=2, end=3)
        seq, batch = new("Shape", [q], start=1, end=2), new("Shape", [q], start=0, end=1)
        total = new("Add", [past_len, seq])
        total_scalar = new("Squeeze", [total])
        one, zero = new.const([1]), new.const([0])
        multi = new("And", [new("Greater", [batch, one]), new("Greater", [seq, one])])
        self.values = {
            "past_len": past_len, "total": total, "total_scalar": total_scalar,
            "seqlens": new("Cast", [new("Expand", [new("Sub", [total, one]), batch])], to=ir.DataType.INT32),
            "total_i32": new("Cast", [total_scalar], to=ir.DataType.INT32),
            "cond": new("And", [multi, new("Greater", [past_len, zero])]),
        }
        return self.values


def _check_and_rewrite(model: ir.Model, m: _Match, shared: _Lengths) -> str | None:
    """None once ``m`` is replaced (see the module docstring), else why it was left as it is."""
    heads = _heads(m)
    if isinstance(heads, str):
        return heads
    num_heads, kv_heads, head = heads
    lengths = _lengths_in_bias(m)
    if isinstance(lengths, str):
        return lengths
    for value, rank in lengths:
        value.shape = value.shape or ir.Shape([1] * rank)
    why = _mask_is_causal(model, m.bias, m.past_key, lengths=[v for v, _ in lengths])
    if why:
        return why
    new = _Nodes(f"{m.softmax.name or m.out.name}/gqa")
    inside = _rotary_inside(new, m, head)
    # with the rotary inside, the rotated Q and K are needed only off the fast path: made in that branch
    outside = _Nodes(f"{new.prefix}/outside") if inside else new
    q, k, v = (_bsd(outside, m.q, num_heads, head), _bsd(outside, m.k_new, kv_heads, head),
               _bsd(new, m.v_new, kv_heads, head))
    t = shared.of(new, v, m.past_key)
    for value, rank in lengths:  # the mask's key length, from shapes (the keys now come out of the node)
        ir.convenience.replace_all_uses_with(value, t["total_scalar"] if rank == 0 else t["total"])
    dtype = m.past_key.dtype
    bias = new("Max", [m.bias, new.const([np.finfo(dtype.numpy()).min], dtype)])
    gqa = dict(num_outputs=3, domain="com.microsoft", num_heads=num_heads, kv_num_heads=kv_heads, scale=m.scale)
    fused = _Nodes(f"{new.prefix}/fused")
    attention = (q, k, v, m.past_key, m.past_value)
    fused("GroupQueryAttention", [*attention, t["seqlens"], t["total_i32"], None, None, None, bias], do_rotary=0, **gqa)
    plain = _Nodes(f"{new.prefix}/decomposed")
    branches = [_branch(plain, _decomposed(plain, *attention, bias, num_heads, kv_heads, head, m.scale), dtype),
                _branch(fused, fused.nodes[-1].outputs, dtype)]
    outs = _typed(outside("If", [t["cond"]], num_outputs=3, then_branch=branches[0], else_branch=branches[1]),
                  dtype, num_heads, kv_heads, head)
    if inside:
        rotary, q_source, k_source = inside
        fast = _Nodes(f"{new.prefix}/rotary_inside")
        fast("GroupQueryAttention", [q_source, k_source, v, m.past_key, m.past_value, t["seqlens"], t["total_i32"],
                                     rotary.cos, rotary.sin, rotary.positions, bias],
             do_rotary=1, rotary_interleaved=rotary.interleaved, **gqa)
        outs = _typed(new("If", [shared.rotary_inside(new, rotary.positions)], num_outputs=3,
                          then_branch=_branch(fast, fast.nodes[-1].outputs, dtype),
                          else_branch=_branch(outside, outs, dtype)),
                      dtype, num_heads, kv_heads, head)
    model.graph.insert_before(m.out.producer(), new.nodes)
    for old, out in zip((m.out, m.present_key, m.present_value), outs):
        _replace(model.graph, old, out)
    return None


def _rotary_inside(new: _Nodes, m: _Match, head: int) -> tuple | None:
    """(the rotary pair, Q and K before it in [B, S, n*H]) where the node can apply the rotary itself
    (:mod:`~flashnorm_onnx.fusions.gqa_rotary`); else None, with the reason logged."""
    if not ort_rotary_reads_position_ids():
        return None
    rotary = rotary_pair(m.q, m.k_new, head)
    sources = () if isinstance(rotary, str) else \
        [_bsd_source(x.producer().inputs[0], head) for x in (m.q, m.k_new)]
    if isinstance(rotary, str) or None in sources:
        logger.info("rotary kept outside GroupQueryAttention at %s: %s", m.softmax.name,
                    rotary if isinstance(rotary, str) else "Q or K is not a reshape of a [B, S, n*H] value")
        return None
    return rotary, _flat(new, sources[0]), _flat(new, sources[1])


def _typed(outs, dtype: ir.DataType, heads: int, kv_heads: int, head: int):
    for out, shape in zip(outs, ([None, None, heads * head], [None, kv_heads, None, head],
                                 [None, kv_heads, None, head])):
        out.dtype, out.shape = dtype, ir.Shape(shape)
    return outs


def _branch(nodes: _Nodes, outputs, dtype: ir.DataType) -> ir.Graph:
    """A branch of ``nodes`` whose outputs (the attention's output and present key/value) are of
    the cache's ``dtype`` (float16 in a float16 export)."""
    for out in outputs:
        out.dtype = dtype if out.dtype is None else out.dtype
    return ir.Graph([], list(outputs), nodes=nodes.nodes, name=nodes.prefix)


def _replace(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old``, and its place and name among the graph outputs, to ``new``."""
    name, is_output = old.name, any(o is old for o in graph.outputs)
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if is_output:
        old.name, new.name = f"{name}_unfused", name
        new.shape = old.shape


def _decomposed(new: _Nodes, q, k, v, past_key, past_value, bias, heads: int, kv_heads: int, head: int,
                scale: float):
    """The attention the node computes, in plain operators: (output [B, S, N*H], present key, value)."""
    def split(x, n):  # [B, S, n*H] -> [B, n, S, H]
        return new("Transpose", [new("Reshape", [x, new.const([0, 0, n, head])])], perm=[0, 2, 1, 3])

    def repeat(x):  # [B, KV, T, H] -> [B, N, T, H]
        if heads == kv_heads:
            return x
        x = new("Expand", [new("Unsqueeze", [x, new.const([2])]), new.const([1, 1, heads // kv_heads, 1, 1])])
        return new("Reshape", [x, new.const([0, heads, -1, head])])

    present_key = new("Concat", [past_key, split(k, kv_heads)], axis=2)
    present_value = new("Concat", [past_value, split(v, kv_heads)], axis=2)
    scores = new("MatMul", [split(q, heads), new("Transpose", [repeat(present_key)], perm=[0, 1, 3, 2])])
    scores = new("Add", [new("Mul", [scores, new.const(scale, past_key.dtype)]), bias])
    out = new("MatMul", [new("Softmax", [scores], axis=-1), repeat(present_value)])
    out = new("Reshape", [new("Transpose", [out], perm=[0, 2, 1, 3]), new.const([0, 0, heads * head])])
    return out, present_key, present_value
