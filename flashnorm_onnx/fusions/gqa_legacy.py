"""Grouped-query attention of a legacy (TorchScript) / optimum with-past export as ONNX Runtime's
``GroupQueryAttention``, exact for every valid mask.

The dynamo rule (:mod:`flashnorm_onnx.fusions.gqa`) rides on onnxscript's pattern, written for
dynamo graphs. The legacy exporter writes the same attention with other nodes, and ORT's
transformers optimizer (which ``--for-ort`` runs on such graphs first) fuses only its rotary. This
rule matches the attention by what its nodes compute, starting from each ``Softmax``
(:mod:`flashnorm_onnx.fusions.gqa_legacy_match`):

* pattern: ``Softmax(Add(scores, bias))`` (either order), optionally followed by the
  ``Where(IsNaN(p), 0, p)`` guard, read by ``MatMul(p, v_rep)`` and then
  ``Reshape(Transpose(., [0, 2, 1, 3]))`` to [B, S, N*H]; ``scores = MatMul(q, k_rep^T)`` with
  scalar ``Mul`` / ``Div`` scales anywhere on either side (their product is the scale);
  ``k_rep`` / ``v_rep``: ``repeat_kv`` (``Reshape(Expand(Unsqueeze(x, 2)))``) or nothing, over
  ``Concat(past, new, axis=2)`` whose ``past`` is a graph input; an fp16 export's softmax in
  float32 (``Cast`` of the scores to float32 before the ``Add``, of p back after the ``Softmax``
  or its guard) is matched too, and its float32 mask is cast to the cache's dtype for the node;
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

import numpy as np
import onnx_ir as ir

from flashnorm_onnx.fusions.gqa import (
    SAME_SHAPE,
    _mask_is_causal,
    last_dim,
    ort_honours_attention_bias,
    value_dtype,
    value_rank,
)
from flashnorm_onnx.fusions.gqa_legacy_match import Match, dim_of, match_attention
from flashnorm_onnx.fusions.gqa_rotary import ort_rotary_reads_position_ids, positions_condition, rotary_pair

logger = logging.getLogger(__name__)

_I64 = ir.DataType.INT64
def fuse_gqa_legacy(model: ir.Model) -> tuple[int, list[str]]:
    """Apply the rule to ``model`` in place; how many attentions became ``GroupQueryAttention``,
    and one line per refused ``Softmax`` saying why."""
    if not ort_honours_attention_bias():
        return 0, ["GroupQueryAttention not used: this onnxruntime ignores its attention_bias input"]
    graph, fused, refusals, shared = model.graph, 0, [], _Lengths()
    for softmax in [n for n in graph if n.op_type == "Softmax" and n.domain == ""]:
        match = match_attention(softmax)
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


def _heads(m: Match) -> tuple[int, int, int] | str:
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
    mask_dtype = ir.DataType.FLOAT if m.upcast else m.past_key.dtype  # an upcast softmax adds a float32 mask
    if value_dtype(m.bias) != mask_dtype or value_dtype(m.q) != m.past_key.dtype:
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
        shape = dim_of(concat.inputs[axis], axis)
        if shape is None or id(shape) not in sources:
            return None
    return x


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


def _lengths_in_bias(m: Match) -> list[tuple[ir.Value, int]] | str:
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


def _check_and_rewrite(model: ir.Model, m: Match, shared: _Lengths) -> str | None:
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
    bias = new("Cast", [m.bias], to=int(dtype)) if m.upcast else m.bias  # a float32 mask, fp16 activations
    bias = new("Max", [bias, new.const([np.finfo(dtype.numpy()).min], dtype)])
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


def _rotary_inside(new: _Nodes, m: Match, head: int) -> tuple | None:
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
