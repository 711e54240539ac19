"""The rotary inside ``GroupQueryAttention``, read from the model's own position ids (``--for-ort``).

An export that ORT's transformers optimizer fused rotates Q and K with two ``RotaryEmbedding``
nodes before the attention. ``GroupQueryAttention`` can do it itself (``do_rotary=1``, with the same
``cos_cache`` / ``sin_cache`` and a ``position_ids`` input), which is what the onnxruntime-genai
builder's models do: two nodes fewer per layer, and Q, K and V can then arrive packed in one tensor
straight from one MatMul (:func:`pack_split_inputs`).

What the kernel computes with them (ORT 1.31 CPU; probed at run time, :func:`ort_rotary_reads_position_ids`):

* on a step with a cache (``past > 0``: decode, or a multi-token step at batch 1) it rotates every
  (row, token) at its own ``position_ids[b, s]``: bit for bit ``RotaryEmbedding(x, position_ids)``;
* on a first prompt (no cache) it reads only ``position_ids[0, 0]`` and rotates token ``s`` of
  every row at ``position_ids[0, 0] + s``. For a batch whose rows start at different positions (a
  left-padded batch, positions ``cumsum(mask) - 1``) the logits are still right (a rotary is
  relative) but the keys written to the cache are not the export's, and the next step's are wrong.

So the node with the rotary inside runs only where that equals the export: ``past > 0``, or every
row's positions are ``position_ids[0, 0] + arange(S)`` (:func:`positions_condition`, computed once
per model); elsewhere the rotary stays outside, as before. Matched by what the nodes compute: Q and K
each out of a ``RotaryEmbedding`` of the same positions and caches, neither partial nor scaled.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)


@dataclass
class Rotary:
    """The ``RotaryEmbedding`` pair on Q and K: what ``GroupQueryAttention`` needs to do it itself."""

    positions: ir.Value  # [B, S] int64
    cos: ir.Value  # [max positions, H / 2]
    sin: ir.Value
    interleaved: int


def rotary_pair(q: ir.Value, k: ir.Value, head: int) -> Rotary | str:
    """The rotary that made ``q`` and ``k`` (each the output of a ``RotaryEmbedding``), if the
    attention node can apply it itself; else why not."""
    rq, rk = q.producer(), k.producer()
    if rq is None or rk is None or any(n.op_type != "RotaryEmbedding" or n.domain != "com.microsoft"
                                       for n in (rq, rk)):
        return "Q and K are not each the output of a RotaryEmbedding"
    if len(rq.inputs) < 4 or len(rk.inputs) < 4 or any(a is not b for a, b in zip(rq.inputs[1:4], rk.inputs[1:4])):
        return "Q and K are rotated at different positions or with different caches"
    positions, cos, sin = rq.inputs[1:4]
    if head % 16:
        return f"head size {head}: the kernel's rotary wants a multiple of 16"
    for node in (rq, rk):
        attrs = node.attributes
        if attrs.get_int("is_packed_batching", 0) or attrs.get_float("scale", 1.0) != 1.0:
            return "a packed-batching or scaled rotary"
        if attrs.get_int("rotary_embedding_dim", 0) not in (0, head):
            return "a partial rotary (rotary_embedding_dim below the head size)"
    if rq.attributes.get_int("interleaved", 0) != rk.attributes.get_int("interleaved", 0):
        return "Q and K interleave their rotary differently"
    if positions is None or positions.dtype != ir.DataType.INT64 or positions.shape is None or \
            positions.shape.rank() != 2:
        return "the position ids are not an int64 [B, S] tensor"
    if cos is None or cos.shape is None or cos.shape.rank() != 2 or cos.shape[1] != head // 2:
        return "the rotary's cos cache is not [positions, head size / 2]"
    return Rotary(positions, cos, sin, rq.attributes.get_int("interleaved", 0))


def positions_condition(new, positions: ir.Value, past_len: ir.Value) -> ir.Value:
    """bool [1]: the kernel's rotary equals ``RotaryEmbedding(x, positions)`` on this step:
    ``past > 0``, or ``positions[b, s] == positions[0, 0] + s`` for every row and token."""
    first = new("Slice", [positions, new.const([0, 0]), new.const([1, 1]), new.const([0, 1])])  # [1, 1]
    seq = new("Squeeze", [new("Shape", [positions], start=1, end=2)])
    steps = new("Range", [new.const(0, ir.DataType.INT64), seq, new.const(1, ir.DataType.INT64)])
    same = new("Equal", [positions, new("Add", [first, steps])])
    every = new("ReduceMin", [new("Cast", [same], to=ir.DataType.INT64)], keepdims=0)
    aligned = new("Equal", [new("Reshape", [every, new.const([1])]), new.const([1])])
    return new("Or", [new("Greater", [past_len, new.const([0])]), aligned])


@functools.lru_cache(maxsize=1)
def ort_rotary_reads_position_ids() -> bool:
    """Does this onnxruntime's ``GroupQueryAttention`` rotate at ``position_ids`` on a cached step,
    and at ``position_ids[0, 0] + s`` on a first prompt (what :func:`positions_condition` assumes)?
    Two probes against ``RotaryEmbedding``: a decode step at batch 2 whose rows sit at positions 5
    and 2 on a cache of 3, and a 3-token prompt starting at position 4. Any other behaviour (or
    an ORT without the input): the rotary stays outside."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        heads, head = 1, 16  # with do_rotary the kernel wants a head size that is a multiple of 16
        f, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
        names = ["q", "k", "v", "pk", "pv", "sk", "tot", "pos", "cos", "sin"]
        types = [f, f, f, f, f, i32, i32, i64, f, f]
        attention = dict(domain="com.microsoft", num_heads=heads, kv_num_heads=heads)
        inside = [helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sk", "tot", "cos", "sin", "pos"],
                                   ["o", "ok", "ov"], do_rotary=1, **attention)]
        outside = [helper.make_node("RotaryEmbedding", [x, "pos", "cos", "sin"], [x + "r"], domain="com.microsoft",
                                    num_heads=heads) for x in ("q", "k")]
        outside.append(helper.make_node("GroupQueryAttention", ["qr", "kr", "v", "pk", "pv", "sk", "tot"],
                                        ["o", "ok", "ov"], **attention))

        def session(nodes):
            graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info(n, t, None)
                                                       for n, t in zip(names, types)],
                                      [helper.make_tensor_value_info(n, f, None) for n in ("o", "ok", "ov")])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                            helper.make_opsetid("com.microsoft", 1)], ir_version=10)
            return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

        a, b = session(outside), session(inside)
        rng = np.random.default_rng(0)
        angles = np.arange(16)[:, None] / (10000 ** (np.arange(0, head, 2) / head))[None]
        trig = {"cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32)}

        def agree(batch, seq, past, positions, prompt_positions):
            feeds = {x: rng.standard_normal((batch, seq, head)).astype(np.float32) for x in ("q", "k", "v")}
            feeds.update({x: rng.standard_normal((batch, heads, past, head)).astype(np.float32) for x in ("pk", "pv")})
            feeds.update(trig, sk=np.full([batch], past + seq - 1, np.int32), tot=np.array(past + seq, np.int32))
            want = a.run(None, {**feeds, "pos": np.array(prompt_positions, np.int64)})
            got = b.run(None, {**feeds, "pos": np.array(positions, np.int64)})
            return all(np.allclose(x, y, atol=1e-5) for x, y in zip(want, got))

        return (agree(2, 1, 3, [[5], [2]], [[5], [2]])  # cached step: every row at its own position
                and agree(1, 3, 0, [[4, 9, 9]], [[4, 5, 6]]))  # first prompt: positions[0, 0] + s
    except Exception as e:  # noqa: BLE001 - an ORT without the op or the input: the rotary stays outside
        logger.debug("GroupQueryAttention rotary probe failed: %s", e)
        return False


def pack_split_inputs(model: ir.Model) -> int:
    """``GroupQueryAttention(q, k, v, ...)`` whose q, k, v are the three outputs, in order, of one
    ``Split`` on the last axis of x (:func:`flashnorm_onnx.fusions.packing.pack_linears` packs the
    projections so) -> ``GroupQueryAttention(x, '', '', ...)``, its packed-QKV form: the kernel
    reads the three from x as the Split would give them. Only with the rotary inside (an outside
    rotary sits between the Split and the node). Returns how many nodes now read x."""
    done = 0
    for node in gqa_nodes(model):
        if len(node.inputs) < 3:
            continue
        q, k, v = node.inputs[:3]
        split = q.producer() if q is not None else None
        if split is None or split.op_type != "Split" or len(split.outputs) != 3 or \
                any(x is not out for x, out in zip((q, k, v), split.outputs)):
            continue
        shape = split.inputs[0].shape or q.shape
        axis = split.attributes.get_int("axis", 0)
        if axis != -1 and (shape is None or axis != shape.rank() - 1):
            continue
        node.replace_input_with(0, split.inputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        done += 1
    return done


def gqa_nodes(model: ir.Model):
    """Every ``com.microsoft.GroupQueryAttention`` node of ``model``, subgraphs included."""
    return [node for graph in [model.graph, *model.graph.subgraphs()] for node in graph
            if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft"]


def count_rotary_inside(model: ir.Model) -> int:
    """How many ``GroupQueryAttention`` nodes (subgraphs included) apply the rotary themselves."""
    return sum(1 for node in gqa_nodes(model) if node.attributes.get_int("do_rotary", 0))
