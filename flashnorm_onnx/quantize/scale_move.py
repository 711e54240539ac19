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

And through attention (:func:`find_attention_pairs`, :func:`move_attention_scale`): attention is
linear in V per head, so ``W_v``'s columns take 1/s and ``W_o``'s rows s, each row of ``W_o`` with
the s of the v channel it multiplies (grouped-query attention: several query heads read one kv
head). That mapping is tracked from the graph's declared shapes through the layout ops between v
and o; where it cannot be, the move is refused with the reason.
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


class _SecondLinear:
    """A pair's second linear ``down``: the value it reads and its weight."""

    down: ir.Node

    @property
    def output(self) -> ir.Value:
        """The value ``down`` reads."""
        return self.down.inputs[0]

    @property
    def weights(self) -> list[ir.Value]:
        return [self.down.inputs[1]]


@dataclasses.dataclass
class PairSite(_SecondLinear):
    """A linear ``down`` whose input is ``Mul(other, up(x))``: s moves from up's columns to down's rows."""

    name: str
    up: ir.Node
    mul: ir.Node
    down: ir.Node


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


# -- v_proj -> o_proj: the scale moved through attention ------------------------------------------

#: ops a value may pass between v_proj and o_proj (besides the attention MatMul itself)
_LAYOUT_OPS = ("Reshape", "Transpose", "Unsqueeze", "Expand", "Identity")


@dataclasses.dataclass
class AttentionPairSite(_SecondLinear):
    """``o`` reads ``attention(P, V)`` with ``V`` = ``v(x)`` reshaped into heads: each row k of
    ``W_o`` multiplies the v channel ``channel_of_row[k]`` (grouped-query attention: one kv head
    feeds several query heads, so several rows share one channel). A scale s on ``W_v``'s columns
    (1/s) is undone on ``W_o``'s rows (s), tied over the rows that read one channel."""

    name: str
    up: ir.Node
    down: ir.Node
    channel_of_row: np.ndarray
    """[K_o]: the column of W_v each row of W_o multiplies (proved from the graph's shapes)."""

    @property
    def channels(self) -> int:
        return int(self.up.inputs[1].const_value.shape[-1])

    def tie(self, per_row: np.ndarray) -> np.ndarray:
        """A per-row statistic averaged over the rows that read one v channel, given back per row
        (so that a scale made from it is one value per v channel)."""
        per_row = np.asarray(per_row, np.float64)
        sums = np.bincount(self.channel_of_row, weights=per_row, minlength=self.channels)
        counts = np.bincount(self.channel_of_row, minlength=self.channels)
        return (sums / np.maximum(counts, 1))[self.channel_of_row]

    def up_scale(self, s_rows: np.ndarray) -> np.ndarray:
        """The per-channel scale of W_v's columns for a tied per-row scale of W_o's rows."""
        s_rows = np.asarray(s_rows, np.float64)
        s = np.ones(self.channels)
        s[self.channel_of_row] = s_rows
        if not np.array_equal(s[self.channel_of_row], s_rows):
            raise ValueError(f"{self.name}: the scale is not one value per v channel")
        return s


def _static_dims(value: ir.Value) -> list[int | str] | None:
    """The value's shape as ints (static) and names (symbolic); None when unknown or a dim unnamed."""
    shape = value.shape
    if shape is None:
        return None
    out: list[int | str] = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        elif getattr(d, "value", None) is not None:
            out.append(d.value if isinstance(d.value, int) else str(d.value))
        else:
            return None
    return out


def _free_mask(dims: list[int | str]) -> list[bool]:
    return [isinstance(d, str) for d in dims]


def _idx_shape(dims: list[int | str]) -> tuple[int, ...]:
    return tuple(1 if isinstance(d, str) else int(d) for d in dims)


def _const_ints(value: ir.Value | None) -> list[int] | None:
    if value is None:
        return None
    array = const_array(value)
    return None if array is None else [int(a) for a in np.asarray(array).ravel()]


def _layout_step(node: ir.Node, idx: np.ndarray, dims_in: list, dims_out: list) -> tuple[np.ndarray | None, str]:
    """The channel index array after ``node`` (free, symbolic axes of size 1 in it), or None and why."""
    free_in, free_out = _free_mask(dims_in), _free_mask(dims_out)
    op = node.op_type
    if op == "Identity":
        return idx, ""
    if op == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        if perm is None or sorted(perm) != list(range(idx.ndim)):
            return None, "a Transpose without its permutation"
        return np.transpose(idx, perm), ""
    if op == "Unsqueeze":
        axes = _const_ints(node.inputs[1]) if len(node.inputs) > 1 else node.attributes.get_ints("axes", None)
        if axes is None:
            return None, "an Unsqueeze with computed axes"
        rank = idx.ndim + len(axes)
        out = idx
        for a in sorted(a % rank for a in axes):
            out = np.expand_dims(out, a)
        return out, ""
    if op == "Expand":
        if len(dims_out) != idx.ndim or any(fi != fo for fi, fo in zip(free_in, free_out)):
            return None, "an Expand that changes the rank or the symbolic axes"
        target = _idx_shape(dims_out)
        try:
            return np.broadcast_to(idx, target), ""  # a size-1 axis repeated: the same channel in each copy
        except ValueError:
            return None, "an Expand that does not broadcast"
    if op == "Reshape":
        # only a contiguous run of static axes may be regrouped; the symbolic axes stay as they are
        sym_in = [d for d in dims_in if isinstance(d, str)]
        sym_out = [d for d in dims_out if isinstance(d, str)]
        if sym_in != sym_out:
            return None, "a Reshape that changes the symbolic axes"
        i = 0
        while i < min(len(dims_in), len(dims_out)) and dims_in[i] == dims_out[i]:
            i += 1
        j = 0
        while (j < min(len(dims_in), len(dims_out)) - i and dims_in[len(dims_in) - 1 - j] ==
               dims_out[len(dims_out) - 1 - j]):
            j += 1
        run_in, run_out = dims_in[i:len(dims_in) - j], dims_out[i:len(dims_out) - j]
        if any(isinstance(d, str) for d in run_in + run_out) or int(np.prod(run_in, dtype=np.int64)) != int(
                np.prod(run_out, dtype=np.int64)):
            return None, "a Reshape that mixes channels with a symbolic axis"
        return idx.reshape(_idx_shape(dims_out)), ""
    return None, f"{op} '{node.name}' between v and o"


def find_attention_pairs(model: ir.Model) -> tuple[list[AttentionPairSite], list[tuple[str, str]]]:
    """(sites, [(name, why not)]): every int4 MatMul ``v`` whose output reaches an int4 MatMul ``o``
    only through layout ops (Reshape, Transpose, Unsqueeze, Expand) and the attention product
    ``MatMul(P, V)`` (V its second input, its contracted axis symbolic), every value on the way read
    once; the channel each row of ``W_o`` multiplies is tracked through the shapes the graph declares
    (the heads' split, the kv heads' repetition for grouped-query attention, their concatenation).
    Refusals are given for chains that reach an attention product and then cannot be proved."""
    sites, refused = [], []
    for up in model.graph:
        w_up = quantizable_weight(up)
        if w_up is None or len(list(w_up.uses())) != 1 or w_up.const_value.shape[-2] < 1:
            continue
        channels = int(w_up.const_value.shape[-1])
        value = up.outputs[0]
        dims = _static_dims(value)
        if dims is None or dims[-1] != channels or any(isinstance(d, int) for d in dims[:-1]):
            continue
        idx = np.arange(channels).reshape(_idx_shape(dims))
        through_attention, why, site = False, "", None
        name = up.name or w_up.name
        while True:
            users = list(value.uses())
            if value.is_graph_output() or len(users) != 1:
                why = "a value between v and o has another reader"
                break
            node, index = users[0].node, users[0].idx
            if node.domain not in ("", "ai.onnx"):
                why = f"{node.op_type} '{node.name}' between v and o"
                break
            out_dims = _static_dims(node.outputs[0]) if node.outputs else None
            if node.op_type == "MatMul" and index == 0:
                w_down = quantizable_weight(node)
                flat = idx.ravel()
                if not through_attention:
                    break  # a linear after v without attention between: not this move
                if w_down is None or len(list(w_down.uses())) != 1:
                    why = f"'{node.name}' after the attention is not an int4 MatMul with its own weight"
                elif any(d != 1 for d in idx.shape[:-1]) or flat.size != int(w_down.const_value.shape[-2]):
                    why = f"'{node.name}' reads channels along more than its last axis"
                elif np.unique(flat).size != channels:
                    why = f"'{node.name}' does not read every v channel"
                else:
                    site = AttentionPairSite(f"{name} -> {node.name or w_down.name}", up, node, flat.astype(np.int64))
                break
            if out_dims is None:
                why = f"{node.op_type} '{node.name}': output shape not declared"
                break
            if node.op_type == "MatMul" and index == 1:  # attention: out = P @ V, linear in V per column
                if idx.ndim < 2 or idx.shape[-2] != 1 or len(out_dims) != idx.ndim or not isinstance(out_dims[-2], str):
                    why = f"'{node.name}': the attention product contracts a channel axis"
                    break
                through_attention = True
                value = node.outputs[0]
                continue
            if index != 0 or node.op_type not in _LAYOUT_OPS:
                why = f"{node.op_type} '{node.name}' between v and o"
                break
            idx, why = _layout_step(node, idx, _static_dims(value), out_dims)
            if idx is None:
                break
            value = node.outputs[0]
        if site is not None:
            sites.append(site)
        elif through_attention and why:
            refused.append((name, f"no v -> o scale move: {why}"))
    return sites, refused


def move_attention_scale(pair: AttentionPairSite, s_rows: np.ndarray) -> None:
    """W_v -> W_v diag(1/s_v), W_o -> diag(s_rows) W_o, s_rows = s_v[channel_of_row] (both in place)."""
    s_v = pair.up_scale(s_rows)
    w_up, w_down = pair.up.inputs[1], pair.down.inputs[1]
    w_up.const_value = _scaled_lazy(w_up.const_value, s_v, w_up.name, rows=False)
    w_down.const_value = _scaled_lazy(w_down.const_value, np.asarray(s_rows, np.float64), w_down.name)
