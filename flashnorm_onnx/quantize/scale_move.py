"""Moves a per-channel scale s from a norm (or a linear) into the weights of the linears that read it: g -> g/s (and beta -> beta/s), W -> diag(s) W.

The fold's own algebra with a chosen s instead of g (s = g is the fold, s = 1 changes nothing):
with the norm's output X = norm(x) * g + beta read only by ``X @ W_j``,

    (norm(x) * g/s + beta/s) @ (diag(s) W_j)  ==  X @ W_j

exact in real arithmetic; each new tensor is computed in float64 and rounded once to its dtype.
:func:`find_sites` finds the norms where s may move (every reader a ``MatMul`` whose weight
``--quantize`` turns int4, :func:`~flashnorm_onnx.quantize.int4.quantizable_weight`);
:func:`move_scale` rewrites one. A weight read outside the site is never written: the site gets
its own copy. The new weights are lazy (computed when the model is written), so memory holds one
weight at a time.

The same move between two linears: in a gated MLP, ``down(act(gate(x)) * up(x))``, the columns of
``W_up`` can take 1/s and the rows of ``W_down`` s (:func:`find_pairs`, :func:`move_pair_scale`):
``(A / s) @ (diag(s) W_down) == A @ W_down``. Scaling whole columns of ``W_up`` leaves its int4
rounding as it was (each block of a column is scaled alike), so only ``W_down``'s changes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from flashnorm_onnx.passes.graph_utils import const_array
from flashnorm_onnx.passes.linear_consumers import find_linear_uses
from flashnorm_onnx.passes.norm_patterns import NormMatch, find_norms
from flashnorm_onnx.quantize.int4 import quantizable_weight


@dataclasses.dataclass
class ScaleSite:
    """A norm whose every reader is a MatMul with an int4-quantizable weight."""

    match: NormMatch
    name: str
    g: np.ndarray
    beta: np.ndarray | None
    readers: list[ir.Node]
    weights: list[ir.Value]
    """The distinct weight values the readers multiply by (in reader order)."""

    @property
    def output(self) -> ir.Value:
        """The norm's output: the value the readers read (X)."""
        return self.match.output


def find_sites(model: ir.Model) -> tuple[list[ScaleSite], list[tuple[str, str]]]:
    """(sites, [(norm, why not)]): the norms of the main graph where a scale can move into int4
    weights, and the others with the reason."""
    sites, others = [], []
    for match in find_norms(model.graph):
        name = match.name
        if match.problem:
            others.append((name, match.problem))
            continue
        g = match.scale_array()
        if g is None or g.ndim != 1 or g.size < 2:
            others.append((name, "its scale is not one value per channel"))
            continue
        analysis = find_linear_uses(match.output, channels=g.size)
        if analysis.refusals or not analysis.uses:
            others.append((name, "; ".join(dict.fromkeys(analysis.refusals)) or "no linear reads it"))
            continue
        readers, weights, why = [], [], None
        for use in analysis.uses:
            node = use.node
            weight = quantizable_weight(node)
            if weight is None or use.weight.nodes or use.weight.source is not weight or use.weight.k_axis != 0:
                why = f"{node.op_type} '{node.name}' is not quantized to int4"
                break
            if int(weight.const_value.shape[-2]) != g.size:
                why = f"{node.name}: weight rows {weight.const_value.shape[-2]} != {g.size} channels"
                break
            readers.append(node)
            if all(w is not weight for w in weights):
                weights.append(weight)
        if why:
            others.append((name, why))
            continue
        sites.append(ScaleSite(match, name, g, match.bias_array(), readers, weights))
    return sites, others


def _scale_reader(match: NormMatch, source: ir.Value) -> tuple[ir.Node, int] | None:
    """(node, input index) reading ``source`` (the constant g or beta) on this norm's path, through
    single-use Casts; None when a node on that path is shared with something else."""
    anchors = [n for n in (match.scale_node, match.bias_node, match.anchor) if n is not None]
    for use in source.uses():
        node, value = use.node, None
        # follow single-use Cast/Identity chains from the constant to the norm
        while node.op_type in ("Cast", "Identity") and node not in anchors:
            value = node.outputs[0]
            users = list(value.uses())
            if len(users) != 1:
                node = None
                break
            node = users[0].node
        if node is not None and any(node is a for a in anchors):
            return use.node, use.idx
    return None


def _new_initializer(graph: ir.Graph, base: str, tensor: ir.TensorProtocol) -> ir.Value:
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs if v.name}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape.numpy()), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def _divided(source: ir.Value, s: np.ndarray, name: str) -> ir.Tensor:
    old = const_array(source)
    out = np.asarray(old, np.float64) / np.asarray(s, np.float64).reshape(old.shape)
    dtype = old.dtype
    if not np.all(np.isfinite(out.astype(dtype))):
        raise ValueError(f"{name}: g/s overflows {dtype}")
    return ir.Tensor(out.astype(dtype), name=name)


def _scaled_lazy(weight: ir.TensorProtocol, s: np.ndarray, name: str, rows: bool = True) -> ir.LazyTensor:
    """``weight`` [.., K, N] with its rows multiplied by ``s`` (``rows``: diag(s) W) or its columns
    divided by it (W diag(1/s)), computed in float64 when the model is written."""
    dtype = weight.dtype
    shape = weight.shape.numpy()

    def compute() -> ir.Tensor:
        w = weight.numpy()
        w2 = np.asarray(w, np.float64).reshape(shape[-2], shape[-1])
        factor = np.asarray(s, np.float64)
        out = (factor[:, None] * w2 if rows else w2 / factor[None, :]).astype(w.dtype).reshape(shape)
        return ir.Tensor(out, name=name)

    return ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(shape), name=name)


def move_scale(model: ir.Model, site: ScaleSite, s: np.ndarray, suffix: str = ".scaled") -> dict[str, str]:
    """Rewrite ``site``: its norm computes with g/s (and beta/s), each reader's weight becomes
    diag(s) W. Returns {original weight name: new weight name} (the same name where the weight
    was rewritten in place, a ``suffix`` copy where it has readers outside the site)."""
    graph = model.graph
    s = np.asarray(s, np.float64)
    match = site.match
    for source in (match.scale_source, match.bias_source):
        if source is None:
            continue
        where = _scale_reader(match, source)
        if where is None:
            raise ValueError(f"{site.name}: its scale is shared through a Cast with another node")
        node, index = where
        if source.is_initializer() and len(list(source.uses())) == 1 and not source.is_graph_output():
            source.const_value = _divided(source, s, source.name)  # only this norm reads it: in place
            continue
        new = _new_initializer(graph, (source.name or "norm_scale") + suffix, _divided(source, s, source.name or ""))
        node.replace_input_with(index, new)
    renamed = {}
    ours = {id(n) for n in site.readers}
    for weight in site.weights:
        outside = any(id(u.node) not in ours for u in weight.uses())
        if outside:
            new = _new_initializer(graph, weight.name + suffix,
                                   _scaled_lazy(weight.const_value, s, weight.name + suffix))
            for node in site.readers:
                if node.inputs[1] is weight:
                    node.replace_input_with(1, new)
            renamed[weight.name] = new.name
        else:
            weight.const_value = _scaled_lazy(weight.const_value, s, weight.name)
            renamed[weight.name] = weight.name
    return renamed


@dataclasses.dataclass
class PairSite:
    """A linear ``down`` whose input is ``Mul(other, up(x))``: s moves from up's columns to down's rows."""

    name: str
    up: ir.Node
    mul: ir.Node
    down: ir.Node

    @property
    def output(self) -> ir.Value:
        """The value ``down`` reads (A)."""
        return self.down.inputs[0]

    @property
    def weights(self) -> list[ir.Value]:
        return [self.down.inputs[1]]


def _single_use(value: ir.Value | None, node: ir.Node) -> bool:
    if value is None or value.is_graph_output():
        return False
    uses = list(value.uses())
    return len(uses) == 1 and uses[0].node is node


def find_pairs(model: ir.Model) -> list[PairSite]:
    """Every int4 MatMul ``down`` reading ``Mul(other, MatMul_up(x))`` where up's output, the Mul's
    output and both weights have no other reader and up's weight is int4-quantizable too."""
    out = []
    for down in model.graph:
        weight = quantizable_weight(down)
        if weight is None or len(list(weight.uses())) != 1:
            continue
        a = down.inputs[0]
        mul = a.producer() if a is not None else None
        if mul is None or mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or not _single_use(a, down):
            continue
        for value in mul.inputs:
            up = value.producer() if value is not None else None
            if up is None or not _single_use(value, mul):
                continue
            w_up = quantizable_weight(up)
            if w_up is None or len(list(w_up.uses())) != 1 or w_up.const_value.shape[-1] != weight.const_value.shape[-2]:
                continue
            other = mul.inputs[1] if mul.inputs[0] is value else mul.inputs[0]
            if other is None or other.const_value is not None:
                continue  # a constant factor: nothing to gate, and its shape would need checking
            out.append(PairSite(name=f"{up.name or w_up.name} -> {down.name or weight.name}", up=up, mul=mul,
                                down=down))
            break
    return out


def move_pair_scale(pair: PairSite, s: np.ndarray) -> None:
    """W_up -> W_up diag(1/s), W_down -> diag(s) W_down (both in place: :func:`find_pairs` found no
    other reader). Composes with a norm's move already applied to W_up's rows."""
    s = np.asarray(s, np.float64)
    w_up, w_down = pair.up.inputs[1], pair.down.inputs[1]
    w_up.const_value = _scaled_lazy(w_up.const_value, s, w_up.name, rows=False)
    w_down.const_value = _scaled_lazy(w_down.const_value, s, w_down.name)
