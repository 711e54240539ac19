"""Grouped-query attention as ONNX Runtime's ``GroupQueryAttention``, exact for every valid mask.

onnxscript's rule (``onnxscript.rewriter.ort_fusions.gqa``) matches the attention of a torch.onnx
dynamo export -- Q/K/V reshaped and transposed, ``RotaryEmbedding`` on Q and K, the cache
``Concat``, the ``repeat_kv`` Expand/Reshape, scaled dot-product attention -- and writes one
``GroupQueryAttention`` node in its place. But it takes ``seqlens_k`` from the position ids and
drops the mask: a left-padded row then attends to its padding. This rule matches the same
pattern and feeds the node so that it computes the export's function for any mask:

* ``attention_bias`` = the export's own additive mask [B, 1, S, T] (ORT adds it to the scores);
* ``seqlens_k`` = T - 1 for every row and ``total_sequence_length`` = T, both from shapes
  (T: the key length after the cache ``Concat``), never from the position ids or the mask;
  with those, the kernel's own causal limit lets query i see keys ``[0, T - S + i]``;
* so the node computes the export's scores exactly when the export's mask already blocks every
  key the causal limit blocks (``mask ⊆ causal``): checked by running the mask's subgraph in
  ONNX Runtime on probe inputs (batch 2; prefill, decode on a cache, a multi-token step on a
  cache; padded rows), see :func:`_mask_is_causal`; a mask that is not, or that cannot be run
  alone, is left to the MultiHeadAttention path, with the reason logged. (A probe is not a
  proof for every input: the whole-model check, which runs padded batches, is what proves the
  output; the probe keeps a non-causal mask from reaching it.)
* rotary: inside the node (``do_rotary=1`` with the cos/sin caches) only where the position ids
  are an in-graph ``Range`` (positions T - S + i, what the kernel computes); otherwise the
  export's ``RotaryEmbedding(position_ids)`` nodes stay and the node receives rotated Q and K.

Used only where the installed ONNX Runtime honours ``attention_bias`` in
``GroupQueryAttention`` (:func:`ort_honours_attention_bias`: a probe run once per process).

The legacy/optimum rule (:mod:`flashnorm_onnx.fusions.gqa_legacy`) shares the gate and the mask
probe (with the key length fed from shapes: ``lengths``), and uses the helpers at the end of this
module that read a value's dtype, rank or width where ORT's contrib operators stopped ONNX's shape
inference.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

#: A score at or below this (in the bias) is treated as blocked by the mask.
_BLOCKED = -1e4


@functools.lru_cache(maxsize=1)
def ort_honours_attention_bias() -> bool:
    """Does this onnxruntime's ``GroupQueryAttention`` add ``attention_bias`` to the scores? A
    two-token probe whose bias blocks key 0 for query 1: honoured iff query 1 returns value 1."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        inputs = ["q", "k", "v", "", "", "seqlens_k", "total", "", "", "", "bias"]
        node = helper.make_node("GroupQueryAttention", inputs, ["o"], domain="com.microsoft", num_heads=1,
                                kv_num_heads=1)
        f, h = TensorProto.FLOAT, 8  # the kernel wants a head size that is a multiple of 8
        graph = helper.make_graph([node], "probe", [
            helper.make_tensor_value_info("q", f, [1, 2, h]), helper.make_tensor_value_info("k", f, [1, 2, h]),
            helper.make_tensor_value_info("v", f, [1, 2, h]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
            helper.make_tensor_value_info("total", TensorProto.INT32, []),
            helper.make_tensor_value_info("bias", f, [1, 1, 2, 2])], [helper.make_tensor_value_info("o", f, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)], ir_version=10)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        zeros = np.zeros((1, 2, h), np.float32)
        v = np.stack([np.zeros(h), np.ones(h)])[None].astype(np.float32)
        bias = np.array([[[[0.0, -1e9], [-1e9, 0.0]]]], np.float32)
        [out] = session.run(None, {"q": zeros, "k": zeros, "v": v, "seqlens_k": np.array([1], np.int32),
                                   "total": np.array(2, np.int32), "bias": bias})
        return bool(np.allclose(out[0, 1], 1.0) and np.allclose(out[0, 0], 0.0))
    except Exception as e:  # noqa: BLE001 - an ORT without the op or the input: not honoured
        logger.debug("GroupQueryAttention probe failed: %s", e)
        return False


def _rule_class():
    from onnxscript.rewriter import _ir_utils, pattern
    from onnxscript.rewriter.ort_fusions import gqa as ox_gqa

    class MaskedGroupQueryAttention(ox_gqa.GroupQueryAttention):
        """onnxscript's GQA pattern; this check (mask ⊆ causal, by running it) and this rewrite
        (mask as attention_bias, lengths from shapes, rotary inside only for in-graph positions)."""

        def __init__(self):
            pattern.RewriteRuleClassBase.__init__(self, "MaskedGQA", remove_nodes=False)

        def check(self, context, query_BSD, key_BSDkv, value_BSDkv, past_key, past_value, query_BHSDh_rope,
                  key_BHkvSDh_rope, query_BSHDh, key_BSHkvDh, mask, position_ids, **kw):
            result = pattern.MatchResult()
            if any(kw.get(k) is not None for k in ("query_BSHDh_normalized", "query_BHSDh_normalized",
                                                   "key_BSHkvDh_normalized", "key_BHkvSDh_normalized")):
                return result.fail("a norm on Q/K inside the attention (not handled here)")
            num_heads = _ir_utils.get_dim(query_BSHDh, 2)
            kv_num_heads = _ir_utils.get_dim(key_BSHkvDh, 2)
            if not isinstance(num_heads, int) or not isinstance(kv_num_heads, int):
                return result.fail("head counts unknown", [query_BSHDh, key_BSHkvDh])
            q_rope, k_rope = query_BHSDh_rope.producer(), key_BHkvSDh_rope.producer()
            interleaved = q_rope.attributes.get_int("interleaved", 0)
            if interleaved != k_rope.attributes.get_int("interleaved", 0):
                return result.fail("rotary interleaving differs between Q and K", [q_rope, k_rope])
            if mask is not None and mask.dtype != query_BSD.dtype:
                return result.fail("the mask's dtype is not the query's", mask)
            why, self._batch_in_mask = _probe_mask(context.model, mask, past_key)
            if why:
                return result.fail(why, mask)
            self.num_heads, self.kv_num_heads, self._interleaved = num_heads, kv_num_heads, interleaved
            self._in_graph_positions = _in_graph_range(position_ids)
            return True

        def rewrite(self, op, query_BSD, key_BSDkv, value_BSDkv, past_key, past_value, position_ids, cos, sin,
                    mask, query_BHSDh_rope, key_BHkvSDh_rope, **_):
            i64 = ir.DataType.INT64
            # T: the mask's last axis ([B, 1, S, T] on every probe: the past's length + S); read
            # from the mask every layer shares, so the layers' length nodes are one after CSE
            total = op.Shape(mask, start=3, end=4)
            total_i32 = op.Cast(op.Squeeze(total), to=ir.DataType.INT32)
            batch = op.Shape(mask if self._batch_in_mask else query_BSD, start=0, end=1)
            one = op.Constant(value=ir.tensor([1], dtype=i64))
            seqlens_k = op.Cast(op.Expand(op.Sub(total, one), batch), to=ir.DataType.INT32)
            if self._in_graph_positions:
                q, k, cos_in, sin_in, rotary = query_BSD, key_BSDkv, cos, sin, 1
            else:  # the export's RotaryEmbedding(position_ids) stays; Q and K come back to [B, S, N*H]
                flat = op.Constant(value=ir.tensor([0, 0, -1], dtype=i64))
                q = op.Reshape(op.Transpose(query_BHSDh_rope, perm=[0, 2, 1, 3]), flat)
                k = op.Reshape(op.Transpose(key_BHkvSDh_rope, perm=[0, 2, 1, 3]), flat)
                cos_in = sin_in = None
                rotary = 0
            attributes = dict(num_heads=self.num_heads, kv_num_heads=self.kv_num_heads, do_rotary=rotary)
            if rotary:
                attributes["rotary_interleaved"] = self._interleaved
            return op.GroupQueryAttention(q, k, value_BSDkv, past_key, past_value, seqlens_k, total_i32, cos_in,
                                          sin_in, None, mask, _domain="com.microsoft", _outputs=3, **attributes)

    return MaskedGroupQueryAttention


def fuse_gqa(model: ir.Model) -> int:
    """Apply the rule to ``model`` in place (see the module docstring); returns how many attentions
    became ``GroupQueryAttention``. Nothing where ORT does not honour ``attention_bias``."""
    if not ort_honours_attention_bias():
        logger.info("GroupQueryAttention not used: this onnxruntime ignores its attention_bias input")
        return 0
    from onnxscript.rewriter import _fusion_utils, pattern

    rules = pattern.RewriteRuleSet([_rule_class().rule()])
    return _fusion_utils.apply_fusion_rules(rules)(model)


def _in_graph_range(position_ids: ir.Value | None) -> bool:
    """Position ids computed in the graph as ``Range(start, start + S)`` (through Unsqueeze /
    Expand / Cast / Reshape): what the kernel's own rotary computes. A graph input is not."""
    value = position_ids
    for _ in range(8):
        if value is None or value.is_graph_input():
            return False
        node = value.producer()
        if node is None:
            return False
        if node.op_type == "Range":
            return True
        if node.op_type not in ("Unsqueeze", "Expand", "Cast", "Reshape", "Identity"):
            return False
        value = node.inputs[0]
    return False


def _mask_is_causal(model: ir.Model, mask: ir.Value | None, past_key: ir.Value | None,
                    lengths=()) -> str | None:
    """None when the additive mask blocks every key the kernel's causal limit blocks, on every
    probe (see the module docstring); else why not (or why it could not be run alone).
    ``lengths``: values in the mask's computation that are the key length T (a scalar or [1]):
    fed past + S instead of computed."""
    return _probe_mask(model, mask, past_key, lengths)[0]


def _probe_mask(model: ir.Model, mask: ir.Value | None, past_key: ir.Value | None,
                lengths=()) -> tuple[str | None, bool]:
    """:func:`_mask_is_causal`'s answer, and whether the mask's first axis was the batch on every
    probe (not a broadcast 1): then the batch size can be read from the mask's shape."""
    if mask is None:
        return "no mask", False
    why, keeps_batch = _run_probes(model, mask, past_key, lengths)
    return why, keeps_batch and why is None


def _run_probes(model: ir.Model, mask: ir.Value, past_key: ir.Value | None, lengths) -> tuple[str | None, bool]:
    try:
        session, specs = _mask_session(model, mask, lengths)
    except Exception as e:  # noqa: BLE001 - a subgraph ORT cannot run alone: not fused
        return f"the mask cannot be computed alone ({type(e).__name__})", False
    rng = np.random.default_rng(0)
    probes = ((2, 5, 0), (1, 4, 0)) + (((2, 1, 4), (2, 3, 4)) if past_key is not None else ())
    keeps_batch = True
    for batch, seq, past in probes:  # prefill; with a cache: decode and a multi-token step on it
        feeds = _probe_feeds(specs, batch, seq, past, rng)
        feeds.update({v.name: np.full(v.shape.dims, past + seq, np.int64) for v in lengths})
        try:
            [got] = session.run(None, feeds)
        except Exception as e:  # noqa: BLE001
            return f"the mask cannot be computed alone ({type(e).__name__})", False
        total = seq + past
        if got.ndim != 4 or got.shape[-2:] != (seq, total) or got.shape[1] != 1:
            return f"the mask has shape {list(got.shape)}, not [B, 1, {seq}, {total}]", False
        keeps_batch = keeps_batch and got.shape[0] == batch
        query = np.arange(seq)[:, None] + past
        key = np.arange(total)[None, :]
        future = key > query  # what the kernel blocks whatever the bias
        blocked = np.asarray(got, np.float64) <= _BLOCKED
        if not np.all(blocked[:, :, future]):
            return "the mask lets a query see a later key (not causal)", False
    return None, keeps_batch


def _mask_session(model: ir.Model, mask: ir.Value, lengths=()):
    """An ONNX Runtime session computing ``mask`` from the graph inputs it depends on (and the
    ``lengths`` values, as inputs); the inputs it reads other than ``lengths``."""
    import onnxruntime as ort

    import onnx

    given = {id(v): v for v in lengths}
    nodes, inputs, seen = [], {}, set()
    stack = [mask]
    initializers = {}
    while stack:
        value = stack.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        if id(value) in given:
            continue
        if value.is_graph_input():
            inputs[value.name] = value
            continue
        if value.const_value is not None and value.producer() is None:
            initializers[value.name] = value
            continue
        node = value.producer()
        if node is None:
            raise ValueError(f"'{value.name}' has no producer")
        if len(nodes) > 400:
            raise ValueError("the mask's subgraph is too large")
        if node not in nodes:
            nodes.append(node)
            stack.extend(node.inputs)
            for a in node.attributes.values():
                if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                    raise ValueError("a subgraph in the mask's computation")
    order = {id(n): k for k, n in enumerate(model.graph)}
    nodes.sort(key=lambda n: order.get(id(n), 0))
    protos = [ir.serde.serialize_node(n) for n in nodes]
    length_inputs = [onnx.helper.make_tensor_value_info(v.name, onnx.TensorProto.INT64, v.shape.dims)
                     for v in lengths]
    graph = onnx.helper.make_graph(
        protos, "mask",
        [ir.serde.serialize_value(v) for v in inputs.values()] + length_inputs,
        [onnx.helper.make_tensor_value_info(mask.name, int(mask.dtype), None)],
        [ir.serde.serialize_tensor(v.const_value) for v in initializers.values()])
    for t, name in zip(graph.initializer, initializers):
        t.name = name
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=min(model.ir_version, 10))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, list(inputs.values())


def _probe_feeds(specs: list[ir.Value], batch: int, seq: int, past: int, rng) -> dict:
    """Inputs for the mask's subgraph: dims named *batch* -> batch, *past* -> past, *total* / with
    '+' -> past + seq, others -> seq; a 2-D mask input over past + current tokens whose first row
    is left-padded and whose last row (at batch > 1) has zeros before its newest token."""
    feeds = {}
    for v in specs:
        is_mask = "mask" in v.name.lower()
        dims = []
        for i, d in enumerate(v.shape or []):
            if isinstance(d, int):
                dims.append(d)
                continue
            name = str(d).lower()
            if "batch" in name or i == 0:
                dims.append(batch)
            elif "past" in name and not is_mask:
                dims.append(past)
            elif "total" in name or "+" in name or is_mask:
                dims.append(past + seq)
            else:
                dims.append(seq)
        dtype = v.dtype.numpy()
        if is_mask and len(dims) == 2:
            m = np.ones(dims, dtype=np.int64)
            if dims[1] > 2:
                m[0, : dims[1] // 2] = 0
                if dims[0] > 1:
                    m[-1, 1: dims[1] - 1] = 0
            feeds[v.name] = m.astype(dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[v.name] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[v.name] = np.zeros(dims, dtype=dtype)
    return feeds


# -- what a value is, where ONNX shape inference stopped (ORT contrib operators) -------------------


def scalar_value(value: ir.Value | None) -> float | None:
    """The float constant of one element ``value`` holds, else None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1 or not np.issubdtype(tensor.numpy().dtype, np.floating):
        return None
    return float(tensor.numpy().reshape(()))


def value_dtype(value: ir.Value | None, depth: int = 8) -> ir.DataType | None:
    """``value``'s element type, or where shape inference did not reach it, that of the first
    float input of the nodes computing it (a Cast's target)."""
    if value is None or value.dtype is not None or depth == 0:
        return None if value is None else value.dtype
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Cast":
        return ir.DataType(node.attributes.get_int("to", 0))
    for source in node.inputs[1:] if node.op_type == "Where" else node.inputs:
        dtype = value_dtype(source, depth - 1)
        if dtype is not None and dtype.is_floating_point():
            return dtype
    return None


def last_dim(x: ir.Value) -> int | None:
    """The last dimension of ``x``: from its shape, or from the weight of the MatMul (+ bias) that
    computes it (ORT's contrib norms keep ONNX's shape inference from reaching it)."""
    if x.shape is not None and x.shape.rank() and isinstance(x.shape[-1], int):
        return x.shape[-1]
    node = x.producer()
    if node is not None and node.op_type == "Add":
        node = next((i.producer() for i in node.inputs if i is not None and i.producer() is not None
                     and i.producer().op_type == "MatMul"), None)
    if node is None or node.op_type != "MatMul":
        return None
    weight = ir.convenience.get_const_tensor(node.inputs[1])
    return int(weight.shape[-1]) if weight is not None and len(weight.shape) == 2 else None


#: Operators whose first output has the shape of their first input (ORT's fused norms: output 0;
#: their Skip forms' output 3 too, the residual sum).
SAME_SHAPE = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
              "SkipLayerNormalization", "Cast", "Sigmoid", "Relu", "Gelu", "FastGelu", "QuickGelu", "Neg",
              "RotaryEmbedding", "Identity"}
ELEMENTWISE = {"Add", "Mul", "Sub", "Div"}


def value_rank(value: ir.Value, depth: int = 0, memo: dict | None = None) -> int | None:
    """``value``'s rank: its shape's, or where ORT's contrib operators kept ONNX's shape inference
    from reaching it, followed through the nodes computing it (norms, elementwise ops, a MatMul by a
    2-D weight, the embedding Gather); each value visited once."""
    memo = {} if memo is None else memo
    if value.shape is not None:
        return value.shape.rank()
    if id(value) in memo:
        return memo[id(value)]
    memo[id(value)] = None
    node = value.producer()
    if node is None or depth > 300:
        return None
    ranks = None
    if node.op_type in SAME_SHAPE and value.index() in (0, 3):
        ranks = [value_rank(node.inputs[0], depth + 1, memo)]
    elif node.op_type in ELEMENTWISE:
        ranks = [value_rank(i, depth + 1, memo) for i in node.inputs]
    elif node.op_type == "MatMul":
        weight = ir.convenience.get_const_tensor(node.inputs[1])
        if weight is not None and len(weight.shape) == 2:
            ranks = [value_rank(node.inputs[0], depth + 1, memo)]
    elif node.op_type == "Gather" and node.attributes.get_int("axis", 0) == 0:
        table = ir.convenience.get_const_tensor(node.inputs[0])
        indices = value_rank(node.inputs[1], depth + 1, memo)
        if table is not None and indices is not None:
            ranks = [len(table.shape) - 1 + indices]
    rank = max(ranks) if ranks and None not in ranks else None
    memo[id(value)] = rank
    return rank
