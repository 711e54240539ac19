"""What reads a norm's output, and whether each reader is a linear layer the fold can absorb.

The fold is exact only when *every* reader of the normalized value is a linear map with a
constant weight whose input rows are indexed by the norm's channels:

* ``MatMul(y, B)`` with ``B`` a constant ``[K, N]``;
* ``MatMul(y, Transpose(W, perm=[1, 0]))`` and ``Cast``\\ s of a constant on the way;
* ``Gemm(y, B, C)`` with ``transA=0`` and ``transB`` 0 or 1 (``alpha`` is a scalar: it
  commutes with the per-channel scale);
* ``com.microsoft.FusedMatMul(y, B)`` (what onnxscript's ORT fusions make of ``MatMul`` with a
  transposed weight): ``transA=0``, no batch transposes, ``transB`` 0 or 1, any ``alpha``;
* ``Einsum(y, B)`` written as a linear map: ``"...k,kn->...n"``, ``"bsk,nk->bsn"`` (see
  :func:`einsum_linear`: the equation must contract exactly y's last axis, the norm's channels,
  with one axis of a constant rank-2 weight, and keep every other axis of y, in any order,
  before the weight's other axis, which comes last);
* any of these behind a ``Cast`` of ``y``.

Each kind of linear is a :class:`LinearRule` (:data:`LINEAR_RULES`): a pattern, a check that
says why a matching node refuses the fold, and the use the pass rewrites.

Between the norm and the linear, ops that keep the channel axis (Cast, Identity, a Reshape that
keeps the last dimension, Slice/Gather of rows, a Transpose that keeps the last axis last, an
Unsqueeze that adds leading axes: a mixture of experts selects each expert's rows so) and a
``Mul``/``Div`` by a constant scalar are looked through. ``Shape`` readers only read the shape
and never block the fold. Anything else — a residual
``Add``, RoPE, attention, a graph output, a quantized ``MatMulNBits``, a weight that is a graph
input — blocks it, and :func:`find_linear_uses` says which reader and why.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from flashnorm_onnx.passes.graph_utils import (
    ONNX_DOMAINS,
    attr,
    const_tensor,
    is_op,
    node_label,
    other_input,
    rank_of,
    small_const_array,
)


LINEAR_READERS = ("MatMul", "Gemm", "FusedMatMul", "Einsum")
"""Op types of the linear readers a fold rewrites (Attention's fused QKV aside)."""


def is_linear_reader(node: ir.Node | None) -> bool:
    return node is not None and node.op_type in LINEAR_READERS and (
        node.domain in ONNX_DOMAINS if node.op_type != "FusedMatMul" else node.domain == "com.microsoft")


def weight_k_axis(node: ir.Node) -> int:
    """Axis of a linear reader's second input indexed by the norm's channels (before any
    Transpose on the way to the constant): 1 when the op transposes it (``transB=1``), and for
    an ``Einsum`` the position of the contracted subscript in the weight's term."""
    if node.op_type == "Einsum":
        parsed = einsum_linear(node)
        return parsed if isinstance(parsed, int) else 0
    if node.op_type in ("Gemm", "FusedMatMul") and attr(node, "transB", 0):
        return 1
    return 0


def _einsum_terms(equation: str) -> list[list[str]] | None:
    """``"bsk, nk -> bsn"`` -> ``[["b","s","k"], ["n","k"], ["b","s","n"]]`` (``"..."`` one
    token); None if the equation is not explicit (no ``->``) or not well-formed."""
    equation = equation.replace(" ", "")
    if equation.count("->") != 1:
        return None
    lhs, rhs = equation.split("->")
    terms = []
    for text in [*lhs.split(","), rhs]:
        tokens: list[str] = []
        i = 0
        while i < len(text):
            if text.startswith("...", i):
                tokens.append("...")
                i += 3
            elif text[i].isascii() and text[i].isalpha():
                tokens.append(text[i])
                i += 1
            else:
                return None
        if tokens.count("...") > 1:
            return None
        terms.append(tokens)
    return terms


def einsum_linear(node: ir.Node) -> int | str:
    """Whether ``Einsum(y, W)`` is the linear map ``y @ W`` over y's last axis: the axis of W
    the norm's channels index (0 for ``"...k,kn->...n"``, 1 for ``"bsk,nk->bsn"``), or why not.

    With ``k`` the subscript of y's last axis (the norm's channels; every op the analysis looks
    through keeps them last) and ``n`` W's other one, ``out[..., n] = sum_k y[..., k] W[k, n]``,
    so ``(y * g) @ W == y @ (g[:, None] * W)``: the fold scales W along k, as for a MatMul.
    Refused, each with its reason:

    * an implicit output (no ``->``) or more or fewer than two operands;
    * y's last axis not a single subscript (``"..."`` last), or repeated in y (a diagonal);
    * W not exactly two distinct subscripts (a batched or multi-head weight, ``"bsk,khd->bshd"``;
      the fold writes [K, N] matrices only), or k not among them: the channels are not
      contracted with W, e.g. ``"bsk,nd->bsknd"`` (an outer product) or ``"bsk,sn->bkn"``
      (another axis of y is contracted, and the channels stay in the output);
    * k in the output (channels kept, not contracted: ``"bsk,kn->bskn"``);
    * n also a subscript of y (W's other axis ties to an axis of y: not a matrix product);
    * another axis of y summed away (``"bsk,kn->bn"``: exact for the weights, but a moved
      LayerNorm bias would be added once per summed position), or repeated in the output;
    * n not the output's last axis: a LayerNorm bias moved into the linear is added as a
      vector over the last axis (``"bsk,kn->bns"`` is refused).

    The last two would be exact for a norm without a bias (an RMSNorm): this analysis does not
    know the norm's bias, so it refuses them for every norm.
    """
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return f"it has {len(node.inputs)} operands, not (input, weight)"
    equation = attr(node, "equation", None)
    if isinstance(equation, bytes):
        equation = equation.decode()
    terms = _einsum_terms(equation) if isinstance(equation, str) else None
    if terms is None or len(terms) != 3:
        return f"its equation {equation!r} is not an explicit two-operand equation (a, b -> out)"
    y, w, out = terms
    if not y or y[-1] == "...":
        return f"its equation {equation!r} does not name the input's last axis"
    k = y[-1]
    if y.count(k) != 1:
        return f"its equation {equation!r} repeats the channel subscript '{k}' in the input (a diagonal)"
    if len(w) != 2 or "..." in w or w[0] == w[1]:
        return f"its equation {equation!r} does not read the weight as a [K, N] matrix"
    if k not in w:
        return f"its equation {equation!r} does not contract the norm's channels '{k}' with the weight"
    if k in out:
        return f"its equation {equation!r} keeps the norm's channels '{k}' in its output"
    n = w[1 - w.index(k)]
    if n in y:
        return f"its equation {equation!r} ties the weight's axis '{n}' to an axis of the input"
    if not out or out[-1] != n:
        return f"its equation {equation!r} does not put the weight's axis '{n}' last in its output"
    rest = y[:-1]
    if sorted(out[:-1]) != sorted(rest) or len(set(rest)) != len(rest):
        return (f"its equation {equation!r} does not keep every other axis of the input "
                "(it sums or repeats one)")
    return w.index(k)


def output_scale(node: ir.Node | None) -> float:
    """The scalar a linear reader multiplies its product by (``alpha`` of Gemm / FusedMatMul)."""
    if node is not None and node.op_type in ("Gemm", "FusedMatMul"):
        return float(attr(node, "alpha", 1.0))
    return 1.0


@dataclasses.dataclass
class WeightPath:
    """A constant weight and the Transpose/Cast nodes between it and its linear reader."""

    source: ir.Value
    nodes: list[ir.Node]
    """From the constant toward the consumer."""
    k_axis: int
    """Axis of the constant indexed by the norm's channels (0: rows of [K, N]; 1: columns of
    a PyTorch-layout [N, K] weight)."""

    @property
    def tensor(self) -> ir.TensorProtocol:
        return const_tensor(self.source)


@dataclasses.dataclass
class LinearUse:
    node: ir.Node
    """The MatMul or Gemm."""
    weight: WeightPath
    bias_add: ir.Node | None = None
    """MatMul followed by Add(constant): the Add (used to fold a LayerNorm bias)."""
    bias_source: ir.Value | None = None
    bias_path: list[ir.Node] = dataclasses.field(default_factory=list)
    scaled: bool = False
    """A constant scalar Mul/Div lies between the norm and this reader (it commutes with the
    per-channel scale, but would scale a moved LayerNorm bias too)."""

    @property
    def description(self) -> str:
        return f"{node_label(self.node)}[{self.weight.source.name}]"


@dataclasses.dataclass
class ConsumerAnalysis:
    uses: list[LinearUse]
    refusals: list[str]
    shape_readers: int
    residual: bool = False
    """A refusal is an elementwise Add/Sub with another activation: the residual stream."""


def trace_weight(value: ir.Value, k_axis: int) -> WeightPath | str:
    """The constant behind a linear's weight input (through Transpose/Cast/Identity), or why not."""
    nodes: list[ir.Node] = []
    while True:
        if value.is_graph_input():
            return f"its weight '{value.name}' is a graph input"
        if const_tensor(value) is not None:
            break
        producer = value.producer()
        if producer is None:
            return f"its weight '{value.name}' is not a constant"
        if is_op(producer, "Transpose"):
            perm = attr(producer, "perm", None)
            if perm is not None and list(perm) != [1, 0]:
                return f"its weight passes through Transpose(perm={list(perm)})"
            k_axis = 1 - k_axis
        elif not (is_op(producer, "Cast") or is_op(producer, "Identity")):
            return f"its weight is computed at run time by {node_label(producer)}"
        nodes.insert(0, producer)
        value = producer.inputs[0]
    tensor = const_tensor(value)
    if len(tensor.shape) != 2:
        return f"its weight '{value.name}' has rank {len(tensor.shape)}, not a [K, N] matrix"
    if not tensor.dtype.is_floating_point():
        return f"its weight '{value.name}' has dtype {tensor.dtype.name}, not a float type"
    return WeightPath(source=value, nodes=nodes, k_axis=k_axis)


def _bias_after(matmul: ir.Node) -> tuple[ir.Node, ir.Value, list[ir.Node]] | None:
    """MatMul -> Add(constant) where the Add is the MatMul's only reader."""
    out = matmul.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if not is_op(add, "Add"):
        return None
    bias = other_input(add, out)
    if bias is None:
        return None
    path: list[ir.Node] = []
    value = bias
    while const_tensor(value) is None:
        producer = value.producer()
        if producer is None or value.is_graph_input() or not (
            is_op(producer, "Cast") or is_op(producer, "Identity")
        ):
            return None
        path.insert(0, producer)
        value = producer.inputs[0]
    if value.is_graph_input():
        return None
    return add, value, path


def _describe_refusal(node: ir.Node, index: int, value: ir.Value) -> tuple[str, bool]:
    label = node_label(node)
    if node.op_type == "MatMulNBits":
        return (
            f"feeds {label}: a block-quantized weight cannot take an exact fold "
            "(optimize the float model with --quantize int4, or fold into this one with --requantize, not exact)",
            False,
        )
    if node.op_type in LINEAR_READERS and index != 0:
        return f"feeds {label} as its second operand", False
    if node.op_type in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization") and index in (0, 1):
        return f"feeds the residual stream ({label})", True
    if node.op_type in ("Add", "Sub") and node.domain in ONNX_DOMAINS:
        other = other_input(node, value)
        if other is not None and const_tensor(other) is None:
            return f"feeds the residual stream ({label})", True
    return f"feeds {label} (input {index}), which is not a linear layer", False


def _last_dim(value: ir.Value) -> int | None:
    if value.shape is None or len(value.shape) == 0:
        return None
    dim = value.shape[-1]
    return dim if isinstance(dim, int) else None


_SHAPE_KEEPING = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
                  "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "Cast", "Identity")


def _same_last_dim(src: ir.Value, x: ir.Value) -> bool:
    """src's last dimension is x's: src is x, or x is a norm (or Cast) of src."""
    if src is x:
        return True
    producer = x.producer()
    return producer is not None and producer.op_type in _SHAPE_KEEPING and producer.inputs[0] is src


def _shape_ends_with_last_dim_of(shape: ir.Value, x: ir.Value, depth: int = 8) -> bool:
    """``shape`` is a computed shape whose last element is ``x.shape[-1]``:
    Concat(..., Unsqueeze(Gather(Shape(x), -1))) or with Slice(Shape(x), -1) / Shape(x, start=-1)."""
    value = shape
    for _ in range(depth):
        node = value.producer() if value is not None else None
        if node is None:
            return False
        if is_op(node, "Concat"):
            value = node.inputs[-1]
        elif node.op_type in ("Unsqueeze", "Squeeze", "Cast", "Reshape", "Identity") and node.domain in ONNX_DOMAINS:
            value = node.inputs[0]
        elif is_op(node, "Gather") or is_op(node, "Slice"):
            src = node.inputs[0].producer()
            if not is_op(src, "Shape") or not _same_last_dim(src.inputs[0], x) or attr(src, "start", 0) != 0:
                return False
            index = small_const_array(node.inputs[1])
            if index is None or index.size != 1:
                return False
            i = int(index.reshape(-1)[0])
            rank = rank_of(x)
            if is_op(node, "Slice"):
                ends = small_const_array(node.inputs[2]) if len(node.inputs) > 2 else None
                if ends is None or (int(ends.reshape(-1)[0]) < (rank or 0) and int(ends.reshape(-1)[0]) < 2**31):
                    return False
            return i == -1 or (rank is not None and i == rank - 1)
        elif is_op(node, "Shape"):
            return _same_last_dim(node.inputs[0], x) and attr(node, "start", 0) == -1 and attr(node, "end", None) is None
        else:
            return False
    return False


def _keeps_channels(node: ir.Node, index: int, channels: int | None) -> bool:
    """Ops that move or select whole rows and leave the last (channel) axis intact commute
    with a per-channel scale: Slice/Gather on another axis, a Reshape that keeps the last
    dimension, a Transpose that keeps the last axis last."""
    if index != 0:
        return False
    if is_op(node, "Identity"):
        return True
    rank = rank_of(node.inputs[0])
    if is_op(node, "Slice"):
        axes = small_const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if axes is None or rank is None:
            return False
        return all(int(a) % rank != rank - 1 for a in axes.reshape(-1))
    if is_op(node, "Gather"):
        axis = int(attr(node, "axis", 0))
        return rank is not None and axis % rank != rank - 1
    if is_op(node, "Reshape"):
        if channels is None or channels <= 1:
            return False
        shape = small_const_array(node.inputs[1])
        if shape is not None and shape.size > 0 and int(shape.reshape(-1)[-1]) == channels:
            return True
        # a run-time shape: x.view(-1, x.size(-1)) keeps the channels
        if _shape_ends_with_last_dim_of(node.inputs[1], node.inputs[0]):
            return True
        # otherwise trust inferred shapes whose last dims are K
        return _last_dim(node.inputs[0]) == channels and _last_dim(node.outputs[0]) == channels
    if is_op(node, "Transpose"):
        perm = attr(node, "perm", None)
        return perm is not None and rank is not None and perm[-1] in (-1, rank - 1)
    if is_op(node, "Unsqueeze"):
        # MoE routing: hidden_states[None, top_x] -> Unsqueeze(axis 0) -> Gather of rows
        axes = small_const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
            else (np.array(attr(node, "axes", None)) if attr(node, "axes", None) is not None else None)
        if axes is None or rank is None:
            return False
        out_rank = rank + axes.size
        return all(int(a) % out_rank != out_rank - 1 for a in axes.reshape(-1))
    return False


def _constant_scalar_factor(node: ir.Node, index: int) -> bool:
    """``Mul(y, c)`` / ``Mul(c, y)`` / ``Div(y, c)`` with ``c`` a constant of one element: a
    scalar commutes with the per-channel scale (T5 scales the decoder output by d_model**-0.5
    before its tied output layer)."""
    if node.domain not in ONNX_DOMAINS or node.op_type not in ("Mul", "Div") or len(node.inputs) != 2:
        return False
    if node.op_type == "Div" and index != 0:
        return False
    other = node.inputs[1 - index]
    if other is None or other.is_graph_input():
        return False
    array = small_const_array(other)
    return array is not None and array.size == 1 and array.dtype.kind == "f" and bool(np.isfinite(array).all()) \
        and float(array.reshape(-1)[0]) != 0.0


def find_linear_uses(value: ir.Value, channels: int | None = None) -> ConsumerAnalysis:
    """Every reader of ``value``; ``channels`` is the norm's channel count when known."""
    result = ConsumerAnalysis(uses=[], refusals=[], shape_readers=0)
    if value.is_graph_output():
        result.refusals.append(f"its output '{value.name}' is a graph output")
    for use in value.uses():
        node, index = use.node, use.idx
        if node.graph is not None and node.graph is not value.graph and value.graph is not None:
            result.refusals.append(f"is read inside a subgraph ({node_label(node)})")
            continue
        if is_op(node, "Shape") or is_op(node, "Size"):
            result.shape_readers += 1
            continue
        scalar = _constant_scalar_factor(node, index)
        if (is_op(node, "Cast") and index == 0) or scalar or _keeps_channels(node, index, channels):
            inner = find_linear_uses(node.outputs[0], channels)
            if scalar:
                for inner_use in inner.uses:
                    inner_use.scaled = True
            result.uses += inner.uses
            result.refusals += inner.refusals
            result.shape_readers += inner.shape_readers
            result.residual |= inner.residual
            continue
        rule = next((r for r in LINEAR_RULES if r.matches(node, index)), None)
        if rule is not None:
            found = rule.check(node) or rule.use(node)
            if isinstance(found, str):
                result.refusals.append(f"feeds {node_label(node)} {found}")
            else:
                result.uses.append(found)
            continue
        reason, residual = _describe_refusal(node, index, value)
        result.refusals.append(reason)
        result.residual |= residual
    return result


# -- the linear readers: one rule each (its pattern, a check that says why it refuses, the use) ----


class LinearRule:
    """One kind of linear reader of a norm's output, in the style of onnxscript's rewrite rules:
    :meth:`matches` is the pattern (which node, read at which input), :meth:`check` says why a
    matching node cannot take the fold (None: it can), and :meth:`use` finds what the fold
    rewrites, its weight traced to a constant and its bias (a reason instead when it cannot).
    The rewrite itself is the pass's, the same for every rule (B* = diag(g) B; c* = c + beta B)."""

    name = ""

    def matches(self, node: ir.Node, index: int) -> bool:
        raise NotImplementedError

    def check(self, node: ir.Node) -> str | None:
        return None

    def use(self, node: ir.Node) -> "LinearUse | str":
        raise NotImplementedError


class MatMulRule(LinearRule):
    """``MatMul(y, B)``, ``Einsum`` written as a linear map, ``com.microsoft.FusedMatMul(y, B)``;
    a bias ``Add`` after it moves with the fold."""

    name = "MatMul"

    def matches(self, node: ir.Node, index: int) -> bool:
        return index == 0 and (is_op(node, "MatMul") or is_op(node, "Einsum")
                               or (node.op_type == "FusedMatMul" and node.domain == "com.microsoft"))

    def check(self, node: ir.Node) -> str | None:
        if node.op_type == "FusedMatMul":
            flags = [a for a in ("transA", "transBatchA", "transBatchB") if attr(node, a, 0)]
            if flags:
                return f"with {'='.join(flags)}=1"
        if node.op_type == "Einsum":
            parsed = einsum_linear(node)
            if isinstance(parsed, str):
                return f"but {parsed}"
        return None

    def use(self, node: ir.Node) -> "LinearUse | str":
        traced = trace_weight(node.inputs[1], weight_k_axis(node))
        if isinstance(traced, str):
            return f"but {traced}"
        found = LinearUse(node=node, weight=traced)
        bias = _bias_after(node)
        if bias is not None:
            found.bias_add, found.bias_source, found.bias_path = bias
        return found


class GemmRule(LinearRule):
    """``Gemm(y, B, C)`` with ``transA=0`` (``transB`` 0 or 1); a constant C takes a moved bias."""

    name = "Gemm"

    def matches(self, node: ir.Node, index: int) -> bool:
        return index == 0 and is_op(node, "Gemm")

    def check(self, node: ir.Node) -> str | None:
        return "with transA=1" if attr(node, "transA", 0) != 0 else None

    def use(self, node: ir.Node) -> "LinearUse | str":
        traced = trace_weight(node.inputs[1], 1 if attr(node, "transB", 0) else 0)
        if isinstance(traced, str):
            return f"but {traced}"
        found = LinearUse(node=node, weight=traced)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = node.inputs[2]
            path: list[ir.Node] = []
            while const_tensor(c) is None and c.producer() is not None and (
                is_op(c.producer(), "Cast") or is_op(c.producer(), "Identity")
            ):
                path.insert(0, c.producer())
                c = c.producer().inputs[0]
            if const_tensor(c) is None or c.is_graph_input():
                # Only a LayerNorm bias needs C; record that it is not constant.
                found.bias_source = None
                found.bias_path = []
                found.bias_add = node  # marks "has a non-constant C"
            else:
                found.bias_source, found.bias_path = c, path
        return found


class AttentionRule(LinearRule):
    """ORT's fused ``com.microsoft.Attention``: input @ weights[K, 3H] + bias, a linear on the norm."""

    name = "Attention"

    def matches(self, node: ir.Node, index: int) -> bool:
        return index == 0 and node.op_type == "Attention" and node.domain == "com.microsoft"

    def use(self, node: ir.Node) -> "LinearUse | str":
        traced = trace_weight(node.inputs[1], 0) if len(node.inputs) > 1 and node.inputs[1] is not None \
            else "it has no weights input"
        if isinstance(traced, str):
            return f"but {traced}"
        found = LinearUse(node=node, weight=traced)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and const_tensor(bias) is not None and not bias.is_graph_input():
            found.bias_add, found.bias_source = node, bias
        return found


#: The linear readers the fold absorbs, asked in this order.
LINEAR_RULES: tuple[LinearRule, ...] = (MatMulRule(), GemmRule(), AttentionRule())
