"""Find normalizations in a graph, in every form real exporters write them.

A match describes *what the node computes*, not how an exporter named it:

RMSNorm      y = x / sqrt(mean(x^2, axis=-1) + eps) * g
LayerNorm    y = (x - mean(x)) / sqrt(var(x) + eps) * g + beta

Recognised forms (see ``shared/notes/onnx-forms.md``):

* decomposed RMS chains: ``Pow(x,2)`` or ``Mul(x,x)`` -> ``ReduceMean`` (last axis, axes as an
  attribute or an input) -> ``Add(eps)`` -> ``Sqrt`` -> ``Reciprocal`` / ``Div(1, .)`` ->
  ``Mul(x, .)``, or ``Div(x, sqrt)``, or ``Pow(., -0.5)``; optionally wrapped in
  ``Cast(FLOAT)`` ... ``Cast(FLOAT16/BFLOAT16)``; then ``Mul(g, .)`` with g a constant, possibly
  behind a Cast. Operands of every commutative op in either order.
* decomposed LayerNorm chains: ``Sub(x, ReduceMean(x))`` -> square -> ``ReduceMean`` ->
  ``Add(eps)`` -> ``Sqrt`` -> ``Div(d, .)`` (or ``Mul(d, Reciprocal)``) -> ``Mul(g)`` -> ``Add(beta)``.
* fused: ``RMSNormalization`` (opset 23), ``SimplifiedLayerNormalization`` (ORT, ai.onnx
  domain), ``com.microsoft.SkipSimplifiedLayerNormalization``, ``LayerNormalization``,
  ``com.microsoft.SkipLayerNormalization``.

A match may carry ``problem``: the node is a normalization but one the fold must not touch
(e.g. it normalizes over an axis other than the last); the pass reports it as skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from flashnorm_onnx.passes.graph_utils import (
    MS_DOMAIN,
    ONNX_DOMAINS,
    attr,
    const_array,
    const_scalar,
    const_tensor,
    is_op,
    other_input,
    rank_of,
    small_const_array,
)

NormKind = Literal["rms", "layer"]

FORM_RMS_CHAIN = "RMSNorm chain"
FORM_LN_CHAIN = "LayerNorm chain"


@dataclasses.dataclass
class NormMatch:
    """One normalization found in the graph."""

    kind: NormKind
    form: str
    anchor: ir.Node
    """The node whose output carries the scaled result: the scale Mul (or bias Add) of a
    chain, or the fused op."""
    output: ir.Value
    """The value every consumer of the norm reads (output 0 of a fused op)."""
    scale_input: ir.Value
    """The value the norm multiplies by (an input of ``anchor`` or of the scale Mul)."""
    scale_source: ir.Value
    """The constant behind ``scale_input`` (through Casts)."""
    epsilon: float
    bias_input: ir.Value | None = None
    bias_source: ir.Value | None = None
    scale_node: ir.Node | None = None
    """Decomposed chains: the Mul(g, .) node."""
    bias_node: ir.Node | None = None
    """Decomposed LayerNorm chains: the Add(beta) node."""
    normalized: ir.Value | None = None
    """Decomposed chains: the weightless normalized value (input of the scale Mul)."""
    chain_input: ir.Value | None = None
    """Decomposed chains: the value the statistics are computed on (after a pre-Cast)."""
    outer_input: ir.Value | None = None
    """Decomposed chains: the value before a pre-Cast (== chain_input without one)."""
    pre_cast: ir.Node | None = None
    post_cast: ir.Node | None = None
    compute_dtype: ir.DataType | None = None
    inv_std: str | None = None
    """Decomposed chains: how ``1/sqrt(var + eps)`` is written -- ``"reciprocal"``
    (``Mul(x, Reciprocal(Sqrt))``), ``"div"`` (``Mul(x, Div(1, Sqrt))``), ``"pow"``
    (``Mul(x, Pow(., -0.5))``) or ``"div_sqrt"`` (``Div(x, Sqrt)``). Only descriptive (the
    fixtures' form names); the fold treats them alike."""
    problem: str | None = None

    @property
    def name(self) -> str:
        """The scale's name when only this norm reads it (``model.layers.0.input_layernorm.weight``);
        else the norm's node (or output) name. After a fold every weightless norm reads one
        shared ones constant, whose name says nothing about which norm it is."""
        if self.scale_source.name and sum(1 for _ in self.scale_source.uses()) <= 1:
            return self.scale_source.name
        return self.anchor.name or self.output.name or self.scale_source.name or self.form

    def scale_array(self) -> np.ndarray:
        return const_array(self.scale_source)

    def bias_array(self) -> np.ndarray | None:
        if self.bias_source is None:
            return None
        return const_array(self.bias_source)


def strip_casts(value: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """Follow Cast/Identity producers back to their source."""
    casts = []
    while True:
        producer = value.producer()
        if producer is not None and producer.domain in ONNX_DOMAINS and producer.op_type in ("Cast", "Identity"):
            casts.append(producer)
            value = producer.inputs[0]
        else:
            return value, casts


def _const_behind_casts(value: ir.Value | None) -> ir.Value | None:
    if value is None:
        return None
    source, _ = strip_casts(value)
    if const_tensor(source) is None:
        return None
    return source


# -- fused forms -----------------------------------------------------------------------------

_FUSED = {
    # op_type: (domains, kind, scale index, bias index or None, default epsilon)
    "RMSNormalization": (ONNX_DOMAINS, "rms", 1, None, 1e-5),
    "SimplifiedLayerNormalization": (ONNX_DOMAINS + (MS_DOMAIN,), "rms", 1, None, 1e-5),
    "SkipSimplifiedLayerNormalization": ((MS_DOMAIN,), "rms", 2, None, 1e-12),
    "LayerNormalization": (ONNX_DOMAINS + (MS_DOMAIN,), "layer", 1, 2, 1e-5),
    "SkipLayerNormalization": ((MS_DOMAIN,), "layer", 2, 3, 1e-12),
    # ORT's BERT embedding + LayerNorm: gamma = input 5, beta = input 6
    "EmbedLayerNormalization": ((MS_DOMAIN,), "layer", 5, 6, 1e-12),
}


#: The fused norm ops of the catalogue (the profiler's "normalization" group asks this).
FUSED_NORM_OPS = frozenset(_FUSED)


def match_fused(node: ir.Node) -> NormMatch | None:
    spec = _FUSED.get(node.op_type)
    if spec is None or node.domain not in spec[0]:
        return None
    _, kind, scale_idx, bias_idx, default_eps = spec
    if len(node.inputs) <= scale_idx or node.inputs[scale_idx] is None:
        return None
    scale_input = node.inputs[scale_idx]
    bias_input = None
    if bias_idx is not None and len(node.inputs) > bias_idx:
        bias_input = node.inputs[bias_idx]
    match = NormMatch(
        kind=kind,
        form=node.op_type if node.domain in ONNX_DOMAINS else f"{node.domain}.{node.op_type}",
        anchor=node,
        output=node.outputs[0],
        scale_input=scale_input,
        scale_source=scale_input,
        bias_input=bias_input,
        epsilon=float(attr(node, "epsilon", default_eps)),
    )
    source = _const_behind_casts(scale_input)
    if source is None:
        match.problem = "its scale is not a constant (a graph input or computed at run time)"
        return match
    match.scale_source = source
    if bias_input is not None:
        bias_source = _const_behind_casts(bias_input)
        if bias_source is None:
            match.problem = "its bias is not a constant"
            return match
        match.bias_source = bias_source
    axis = attr(node, "axis", -1)
    rank = rank_of(node.inputs[0])
    if node.op_type.startswith("Skip") or node.op_type == "EmbedLayerNormalization":
        axis = -1  # these ORT ops always normalize the last axis
    if axis != -1 and not (rank is not None and axis == rank - 1):
        match.problem = f"it normalizes from axis {axis}, not over the last axis only"
        return match
    scale = const_array(source)
    if scale.ndim > 1 and any(d != 1 for d in scale.shape[:-1]):
        match.problem = f"its scale has shape {list(scale.shape)}, not a per-channel vector"
    return match


# -- decomposed chains -----------------------------------------------------------------------


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    if value is None:
        return None
    node = value.producer()
    if is_op(node, op_type):
        return node
    return None


def _reduce_axes(node: ir.Node) -> list[int] | None:
    axes = attr(node, "axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        array = small_const_array(node.inputs[1])
        if array is None:
            return None
        axes = array.reshape(-1).tolist()
    if axes is None:
        return []  # reduce over all axes
    return [int(a) for a in axes]


def _is_square_of(node: ir.Node | None, x: ir.Value) -> bool:
    if node is None or node.domain not in ONNX_DOMAINS:
        return False
    if node.op_type == "Pow":
        return node.inputs[0] is x and const_scalar(node.inputs[1]) == 2.0
    if node.op_type == "Mul":
        return node.inputs[0] is x and node.inputs[1] is x
    return False


def _mean_over_last_axis(reduce: ir.Node, x: ir.Value) -> str | None:
    """None if ``reduce`` is a keepdims mean over the last axis of x, else the problem."""
    if attr(reduce, "keepdims", 1) != 1:
        return "its ReduceMean drops the reduced axis"
    axes = _reduce_axes(reduce)
    if axes is None:
        return "its ReduceMean axes are computed at run time"
    rank = rank_of(x)
    if len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1)):
        return None
    return f"it reduces over axes {axes}, not over the last axis only"


def _match_inv_std(value: ir.Value) -> tuple[ir.Value, str] | None:
    """value == 1/sqrt(a) (Reciprocal(Sqrt), Div(1, Sqrt), Pow(a, -0.5)) -> (a, style)."""
    node = value.producer()
    if node is None or node.domain not in ONNX_DOMAINS:
        return None
    if node.op_type == "Reciprocal":
        sqrt = _producer(node.inputs[0], "Sqrt")
        return (sqrt.inputs[0], "reciprocal") if sqrt else None
    if node.op_type == "Div" and const_scalar(node.inputs[0]) == 1.0:
        sqrt = _producer(node.inputs[1], "Sqrt")
        return (sqrt.inputs[0], "div") if sqrt else None
    if node.op_type == "Pow" and const_scalar(node.inputs[1]) == -0.5:
        return node.inputs[0], "pow"
    return None


def _match_variance_plus_eps(a: ir.Value, centered: ir.Value) -> tuple[float, ir.Node] | None:
    """a == ReduceMean(centered^2) + eps -> (eps, reduce node)."""
    add = _producer(a, "Add")
    if add is None:
        return None
    for mean_val, eps_val in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        eps = const_scalar(eps_val)
        reduce = _producer(mean_val, "ReduceMean")
        if eps is None or reduce is None:
            continue
        if _is_square_of(reduce.inputs[0].producer(), centered):
            return eps, reduce
    return None


def _match_normalized(value: ir.Value) -> tuple[ir.Value, float, ir.Node, str] | None:
    """value == c / sqrt(mean(c^2) + eps) -> (c, eps, the ReduceMean, how 1/sqrt is written)."""
    node = value.producer()
    if node is None or node.domain not in ONNX_DOMAINS:
        return None
    candidates: list[tuple[ir.Value, ir.Value]] = []
    if node.op_type == "Mul":
        candidates = [(node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])]
        for c, r in candidates:
            inv = _match_inv_std(r)
            if inv is None:
                continue
            found = _match_variance_plus_eps(inv[0], c)
            if found:
                return c, found[0], found[1], inv[1]
    elif node.op_type == "Div":
        c, s = node.inputs[0], node.inputs[1]
        sqrt = _producer(s, "Sqrt")
        if sqrt is not None:
            found = _match_variance_plus_eps(sqrt.inputs[0], c)
            if found:
                return c, found[0], found[1], "div_sqrt"
    return None


def _match_scale_mul(mul: ir.Node):
    """Yield (scale operand, scale constant source, other operand) for Mul(g, .)."""
    if not is_op(mul, "Mul") or len(mul.inputs) != 2:
        return
    for g, other in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        source = _const_behind_casts(g)
        if source is not None and other is not None and const_tensor(other) is None:
            yield g, source, other


def _dtype_of_cast(node: ir.Node | None) -> ir.DataType | None:
    if node is None:
        return None
    to = attr(node, "to", None)
    return ir.DataType(to) if to is not None else None


def match_rms_chain(mul: ir.Node) -> NormMatch | None:
    for g, source, normalized in _match_scale_mul(mul):
        post_cast = _producer(normalized, "Cast")
        core = post_cast.inputs[0] if post_cast else normalized
        found = _match_normalized(core)
        if found is None:
            continue
        x, eps, reduce, inv_std = found
        if _producer(x, "Sub") is not None and _centering_of(x) is not None:
            continue  # that is a LayerNorm chain without its bias Add
        pre_cast = _producer(x, "Cast")
        match = NormMatch(
            kind="rms",
            form=FORM_RMS_CHAIN,
            anchor=mul,
            output=mul.outputs[0],
            scale_input=g,
            scale_source=source,
            epsilon=eps,
            scale_node=mul,
            normalized=normalized,
            chain_input=x,
            outer_input=pre_cast.inputs[0] if pre_cast else x,
            pre_cast=pre_cast,
            post_cast=post_cast,
            compute_dtype=_dtype_of_cast(pre_cast) or x.dtype or const_tensor(source).dtype,
            inv_std=inv_std,
        )
        match.problem = _mean_over_last_axis(reduce, x) or _scale_shape_problem(source)
        return match
    return None


def _centering_of(d: ir.Value) -> ir.Value | None:
    """d == x - ReduceMean(x) (last axis) -> x."""
    sub = _producer(d, "Sub")
    if sub is None:
        return None
    x = sub.inputs[0]
    mean = _producer(sub.inputs[1], "ReduceMean")
    if mean is None or mean.inputs[0] is not x:
        return None
    return x


def match_layernorm_chain(node: ir.Node) -> NormMatch | None:
    """``Add(Mul(normalized, g), beta)`` or ``Mul(normalized, g)`` over a centered input."""
    bias_node = None
    bias_input = bias_source = None
    mul = node
    if is_op(node, "Add"):
        for b, other in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            source = _const_behind_casts(b)
            producer = other.producer() if other is not None else None
            if source is not None and is_op(producer, "Mul"):
                bias_node, bias_input, bias_source, mul = node, b, source, producer
                break
        else:
            return None
    for g, source, normalized in _match_scale_mul(mul):
        post_cast = _producer(normalized, "Cast")
        core = post_cast.inputs[0] if post_cast else normalized
        found = _match_normalized(core)
        if found is None:
            continue
        d, eps, reduce, inv_std = found
        x = _centering_of(d)
        if x is None:
            continue
        if bias_node is None and any(
            is_op(u.node, "Add") and _const_behind_casts(other_input(u.node, mul.outputs[0])) is not None
            for u in mul.outputs[0].uses()
        ):
            return None  # matched from its bias Add instead
        pre_cast = _producer(x, "Cast")
        anchor = bias_node or mul
        match = NormMatch(
            kind="layer",
            form=FORM_LN_CHAIN,
            anchor=anchor,
            output=anchor.outputs[0],
            scale_input=g,
            scale_source=source,
            bias_input=bias_input,
            bias_source=bias_source,
            epsilon=eps,
            scale_node=mul,
            bias_node=bias_node,
            normalized=normalized,
            chain_input=x,
            outer_input=pre_cast.inputs[0] if pre_cast else x,
            pre_cast=pre_cast,
            post_cast=post_cast,
            compute_dtype=_dtype_of_cast(pre_cast) or x.dtype or const_tensor(source).dtype,
            inv_std=inv_std,
        )
        centering_mean = _producer(d, "Sub").inputs[1].producer()
        match.problem = (
            _mean_over_last_axis(centering_mean, x)
            or _mean_over_last_axis(reduce, x)
            or _scale_shape_problem(source)
        )
        return match
    return None


def _scale_shape_problem(source: ir.Value) -> str | None:
    tensor = const_tensor(source)
    shape = list(tensor.shape.numpy()) if tensor is not None else []
    if len(shape) > 1 and any(d != 1 for d in shape[:-1]):
        return f"its scale has shape {shape}, not a per-channel vector"
    if tensor is not None and not tensor.dtype.is_floating_point():
        return f"its scale has dtype {tensor.dtype.name}"
    return None


def norm_nodes(match: NormMatch, limit: int = 32) -> list[ir.Node]:
    """Every node that computes ``match``: the fused op, or a chain from its (pre-Cast) input to
    its anchor -- statistics, normalization, scale and bias, and Casts of its constants. What
    the profiler counts as normalization time."""
    if match.chain_input is None:
        return [match.anchor]
    stop = {id(match.chain_input), id(match.outer_input)}
    nodes: list[ir.Node] = [] if match.pre_cast is None else [match.pre_cast]
    seen: set[int] = {id(n) for n in nodes}
    frontier = [match.anchor] + ([match.post_cast] if match.post_cast is not None else [])
    while frontier and len(nodes) < limit:
        node = frontier.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        for value in node.inputs:
            if value is None or id(value) in stop or value.is_graph_input():
                continue
            producer = value.producer()
            if producer is not None and id(producer) not in seen:
                frontier.append(producer)
    return nodes


def find_norms(graph: ir.Graph) -> list[NormMatch]:
    """All normalizations of the main graph, in topological order."""
    matches: list[NormMatch] = []
    claimed: set[int] = set()
    for node in graph:
        match = match_fused(node)
        if match is None:
            match = match_layernorm_chain(node) if node.op_type in ("Add", "Mul") else None
        if match is None and node.op_type == "Mul":
            match = match_rms_chain(node)
        if match is None:
            continue
        if match.scale_node is not None and id(match.scale_node) in claimed:
            continue
        if match.scale_node is not None:
            claimed.add(id(match.scale_node))
        matches.append(match)
    return matches
