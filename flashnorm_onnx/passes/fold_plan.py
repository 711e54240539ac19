"""The fold's plan: per norm, what the analysis decided and what the apply step will write
(:class:`NormPlan`: weights in place or as untied copies, biases), and the joint decisions across
norms -- which norms' linears share a weight, and which writes produce one tensor (a weight folded
with equal scales by two norms, as in the branches of a merged decoder, is written once)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from flashnorm_onnx.passes.decisions import NormDecision
from flashnorm_onnx.passes.fold_result import FoldRecord, RewriteSite
from flashnorm_onnx.passes.linear_consumers import LinearUse
from flashnorm_onnx.passes.norm_patterns import NormMatch


@dataclasses.dataclass
class Applied:
    """What :meth:`FlashNormFoldPass.apply` wrote, gathered for its result (the pass keeps nothing)."""

    folds: list[FoldRecord] = dataclasses.field(default_factory=list)
    sites: list[RewriteSite] = dataclasses.field(default_factory=list)
    written: dict[str, str] = dataclasses.field(default_factory=dict)
    scales: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    done: dict[tuple, ir.Value] = dataclasses.field(default_factory=dict)
    """Tensors already written, by their share key: a later write of the same key reads them."""


@dataclasses.dataclass
class WeightWrite:
    """One tensor the fold produces: in place of a constant, or as a new untied copy."""

    use: LinearUse
    source: ir.Value
    k_axis: int
    in_place: bool
    g_key: bytes = b""
    #: the overflow check is left to the write, which reads the weight anyway (``defer_overflow``)
    deferred_check: bool = False
    first: bool = True
    """The first write of its tensor (in the whole plan); the others read what it wrote."""

    @property
    def key(self) -> tuple:
        """Writes of one key produce one tensor: the weight in place, or one copy per scale."""
        return ("in place", id(self.source)) if self.in_place else ("copy", id(self.source), self.k_axis, self.g_key)


@dataclasses.dataclass
class BiasWrite:
    use: LinearUse
    delta: np.ndarray  # beta @ B, float64, shape [N]
    in_place: bool = False
    first: bool = True

    @property
    def key(self) -> tuple:
        """Writes of one key produce one tensor: a bias moved into the same constant by the same
        amount, or a new bias of the same values beside the same weight."""
        use = self.use
        if use.bias_source is not None and (use.bias_add is not None or use.node.op_type == "Gemm"):
            return ("bias", id(use.bias_source), self.delta.tobytes())
        return ("new bias", id(use.weight.source), new_bias_dtype(use).name, self.delta.tobytes())


@dataclasses.dataclass
class NormPlan:
    """What the analysis decided for one norm, and, when it is to be folded, what the apply step
    writes: the weights (in place or untied copies), the biases, and the names the subgraph
    check re-runs. Made without touching the model."""

    match: NormMatch
    decision: NormDecision
    prefix: str = ""
    """The scope of the norm (see :mod:`~flashnorm_onnx.passes.scopes`): "" in the main graph."""
    candidate: bool = False
    g: np.ndarray | None = None
    beta: np.ndarray | None = None
    uses: list[LinearUse] = dataclasses.field(default_factory=list)
    writes: list[WeightWrite] = dataclasses.field(default_factory=list)
    biases: list[BiasWrite] = dataclasses.field(default_factory=list)
    site: RewriteSite | None = None

    @property
    def folds(self) -> bool:
        return self.decision.status == "folded"


def scale_key(g: np.ndarray | None) -> bytes:
    """A scale by value: equal keys fold a weight into the same tensor."""
    if g is None:
        return b""
    g = np.asarray(g, dtype=np.float64)
    return repr(g.shape).encode() + g.tobytes()


def partners_by_weight(candidates: list[NormPlan]) -> dict[int, list[tuple[NormPlan, LinearUse]]]:
    """Every candidate's linear readers, by the weight constant they read."""
    by_source: dict[int, list[tuple[NormPlan, LinearUse]]] = {}
    for plan in candidates:
        for use in plan.uses:
            by_source.setdefault(id(use.weight.source), []).append((plan, use))
    return by_source


def share_writes(plans: list[NormPlan]) -> None:
    """Mark, across the whole plan, the first write of each tensor (the others read it), and which
    biases are rewritten in place: those whose every reader is a linear moving the same beta @ B
    into it (the two branches of a merged decoder share one bias)."""
    seen: set[tuple] = set()
    for plan in plans:
        for write in plan.writes:
            write.first = write.key not in seen
            seen.add(write.key)
    readers: dict[tuple, set[int]] = {}
    keys_of_source: dict[int, set[tuple]] = {}
    for plan in plans:
        for bias in plan.biases:
            use = bias.use
            if use.bias_source is None:
                continue
            reader = use.bias_add if use.node.op_type != "Gemm" else use.node
            if reader is None:
                continue
            readers.setdefault(bias.key, set()).add(id(reader))
            keys_of_source.setdefault(id(use.bias_source), set()).add(bias.key)
    seen = set()
    for plan in plans:
        for bias in plan.biases:
            source = bias.use.bias_source
            bias.first = bias.key not in seen
            seen.add(bias.key)
            if source is None or bias.use.bias_path or source.is_graph_output() or not source.is_initializer():
                continue
            bias.in_place = (len(keys_of_source.get(id(source), ())) == 1
                             and all(id(u.node) in readers.get(bias.key, ()) for u in source.uses()))


def new_bias_dtype(use: LinearUse) -> ir.DataType:
    """The dtype of a bias created for a linear that had none: its output's, when known, else
    that of its weight after the weight path's Casts."""
    node = use.node
    dtype = node.outputs[0].dtype or use.weight.tensor.dtype
    if node.outputs[0].dtype is None:
        casts = [n for n in use.weight.nodes if n.op_type == "Cast"]
        if casts:
            dtype = ir.DataType(casts[-1].attributes["to"].value)
    return dtype
