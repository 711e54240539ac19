"""FlashNorm weight folding as an onnx-ir pass.

For a normalization ``y = norm(x) * g (+ beta)`` whose every reader is a linear layer
``y @ B (+ c)`` with a constant ``B [K, N]``::

    B*[i, :] = g[i] * B[i, :]            c* = c + beta @ B
    y @ B + c  ==  norm(x) @ B* + c*

The norm becomes weightless (scale = ones, no bias) and keeps one fused kernel in ONNX Runtime.
Exact in real arithmetic; computed in float64 (float32 weights) or float32 (16-bit weights)
and rounded once.

Rules that keep the function unchanged:

* A norm is folded only if *every* reader of its output is foldable (``Shape`` readers
  excepted); otherwise it is skipped with the reason.
* A weight tensor with any reader outside this fold (a tied embedding ``Gather``, a second
  norm's linear, a deduplicated initializer) is never written: the fold goes into a new
  tensor (``untie=True``, the default) or the norm is skipped (``untie=False``).
* A product that overflows the weight's dtype is refused.
* A norm whose scale is already all ones (and bias zero) is reported as already weightless,
  so a second run changes nothing.

Two steps, load -> find norms and readers -> decide (a plan) -> apply: :meth:`analyse`
decides for every norm on the unmodified graph and returns one :class:`NormPlan` each (the
decision, its reason, the tensors it would write), touching nothing; :meth:`apply` writes the
plans. So no decision depends on another norm's fold, and ``inspect`` runs the analysis alone.

Usage::

    result = FlashNormFoldPass()(model)       # an onnx_ir.passes.InPlacePass: analyse + apply
    result.report.decisions                   # one NormDecision per normalization
    plans = FlashNormFoldPass().analyse(model)  # what would be done; the model is unchanged
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from flashnorm_onnx.passes import fold_math, provenance
from flashnorm_onnx.passes.graph_utils import const_tensor, copy_type, node_label, opset_version, release_tensor
from flashnorm_onnx.passes.linear_consumers import LinearUse, find_linear_uses, is_linear_reader, output_scale
from flashnorm_onnx.passes.norm_patterns import NormMatch, find_norms, strip_casts
from flashnorm_onnx.passes.weightless_norm import ConstantPool, make_weightless
from flashnorm_onnx.passes.decisions import ConsumerRecord, FoldDecisions, NormDecision

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FoldRecord:
    """One weight the fold produced: enough to re-check its algebra later."""

    name: str
    original: ir.TensorProtocol
    folded: ir.TensorProtocol
    g: np.ndarray
    k_axis: int


@dataclasses.dataclass
class ReaderSite:
    """One linear reader of a folded norm: ``result = linear(data)`` (its bias add included)."""

    op: str
    data: str
    """The value the linear reads (the same value in the input and the output model)."""
    result_before: str
    """Name, in the input model, of the linear's result (after its bias Add, if any)."""
    result_after: ir.Value
    """The same result in the rewritten model (a new bias Add's output for a LayerNorm)."""
    weight: str = ""
    """The weight constant in the input model, and the axis of it the norm's channels index."""
    k_axis: int = 0
    linear_before: str = ""
    linear_after: str = ""
    """Name, in the input and in the rewritten model, of the linear node's own output (before any
    bias Add): a new bias Add on a graph output takes the output's name, and the linear's is renamed."""


@dataclasses.dataclass
class RewriteSite:
    """Where one folded norm's function can be re-run in isolation (see verify_subgraph)::

        output_before(inputs)  ==  output_after(inputs) * g + beta          (the norm)
        result_before(data * g + beta)  ==  result_after(data)             (each reader)
    """

    norm: str
    inputs: list[str]
    """The norm's activation inputs (x; and skip for Skip* norms), the same in both models."""
    output_before: str
    output_after: ir.Value
    g: np.ndarray
    beta: np.ndarray | None
    readers: list[ReaderSite]
    extra_outputs: list[str] = dataclasses.field(default_factory=list)
    """Other outputs of a fused norm (a Skip* norm's residual sum): unchanged by the fold."""


@dataclasses.dataclass
class FlashNormPassResult(ir.passes.PassResult):
    report: FoldDecisions = dataclasses.field(default_factory=FoldDecisions)
    folds: list[FoldRecord] = dataclasses.field(default_factory=list)
    sites: list[RewriteSite] = dataclasses.field(default_factory=list)
    written: dict[str, str] = dataclasses.field(default_factory=dict)
    """Every tensor the fold wrote, by its name in the output -> the name of the constant it was
    computed from in the input ("" for a new LayerNorm bias). The same name on both sides: written
    in place. What the plan-diff check (verify_plan) holds the output to."""


@dataclasses.dataclass
class _Applied:
    """What :meth:`FlashNormFoldPass.apply` wrote, gathered for its result (the pass keeps nothing)."""

    folds: list[FoldRecord] = dataclasses.field(default_factory=list)
    sites: list[RewriteSite] = dataclasses.field(default_factory=list)
    written: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _WeightWrite:
    """One tensor the fold produces: in place of a constant, or as a new untied copy."""

    use: LinearUse
    source: ir.Value
    k_axis: int
    in_place: bool
    #: the overflow check is left to the write, which reads the weight anyway (``defer_overflow``)
    deferred_check: bool = False


@dataclasses.dataclass
class _BiasWrite:
    use: LinearUse
    delta: np.ndarray  # beta @ B, float64, shape [N]


@dataclasses.dataclass
class NormPlan:
    """What the analysis decided for one norm, and, when it is to be folded, what the apply step
    writes: the weights (in place or untied copies), the biases, and the names the subgraph
    check re-runs. Made without touching the model."""

    match: NormMatch
    decision: NormDecision
    g: np.ndarray | None = None
    uses: list[LinearUse] = dataclasses.field(default_factory=list)
    writes: list[_WeightWrite] = dataclasses.field(default_factory=list)
    biases: list[_BiasWrite] = dataclasses.field(default_factory=list)
    site: RewriteSite | None = None

    @property
    def folds(self) -> bool:
        return self.decision.status == "folded"


class FlashNormFoldPass(ir.passes.InPlacePass):
    """Fold every normalization's scale (and LayerNorm bias) into the linears it feeds.

    Two steps: :meth:`analyse` decides for every norm on the model as it is and returns the plans
    (the model untouched; ``inspect`` runs only this), then :meth:`apply` writes them. Every
    decision is taken on the unmodified graph, so none depends on another norm's fold.
    """

    def __init__(
        self,
        untie: bool = True,
        keep_structure: bool = False,
        progress: Callable[[int, int], None] | None = None,
        defer_overflow: bool = False,
        refused: dict[tuple[int, str], str] | None = None,
    ):
        """``defer_overflow``: for weights in external data, leave the overflow check (is every
        g*w representable?) to the streamed write, which reads each weight anyway, instead of
        reading every folded weight once more here; a product found beyond the dtype there
        raises :class:`~flashnorm_onnx.passes.fold_math.DeferredFoldRefused` and the caller
        runs the pass again with ``refused={(norm index, norm name): reason}``, which skips that norm with
        the reason the eager check would have given."""
        super().__init__()
        self.untie = untie
        self.keep_structure = keep_structure
        self.progress = progress
        self.defer_overflow = defer_overflow
        self.refused = dict(refused or {})

    def call(self, model: ir.Model) -> FlashNormPassResult:
        plans = self.analyse(model)
        return self.apply(model, plans)

    def analyse(self, model: ir.Model) -> list[NormPlan]:
        """One plan per normalization of the main graph; reads the model, writes nothing. (The
        part that reads weights, the overflow check, is here: progress is reported per norm.)"""
        norms = find_norms(model.graph)
        plans = []
        for index, match in enumerate(norms):
            plans.append(self._decide(index, match))
            if self.progress:
                self.progress(index + 1, len(norms))
        return plans

    @staticmethod
    def report_of(plans: list[NormPlan]) -> FoldDecisions:
        """The report the plans would give (``inspect``: "would fold into")."""
        return FoldDecisions(decisions=[p.decision for p in plans])

    def apply(self, model: ir.Model, plans: list[NormPlan]) -> FlashNormPassResult:
        """Write every plan that folds (made by :meth:`analyse` on this same model)."""
        graph = model.graph
        opset = opset_version(model)
        pool = ConstantPool(graph, set())
        report = FoldDecisions()
        applied = _Applied()
        for plan in plans:
            if plan.folds:
                self._apply(plan, graph, pool, opset, applied)
            logger.info("%s", plan.decision.line().replace("\n", " |"))
            report.decisions.append(plan.decision)
        modified = report.folded > 0
        if modified:
            common_passes.RemoveUnusedNodesPass()(model)
            _ensure_opset(model)
            provenance.record(model, report)  # survives a PassManager, tells a folded model apart
        return FlashNormPassResult(model, modified=modified, report=report, folds=applied.folds, sites=applied.sites,
                                   written=applied.written)

    # -- one norm ------------------------------------------------------------------------------

    def _decide(self, index: int, match: NormMatch) -> NormPlan:
        decision = NormDecision(index=index, name=match.name, kind=match.kind, form=match.form, status="skipped")
        plan = NormPlan(match, decision)
        if match.problem:
            decision.reason = match.problem
            return plan
        g = match.scale_array()
        beta = match.bias_array()
        analysis = find_linear_uses(match.output, channels=g.size if g.size > 1 else None)
        decision.shape_readers = analysis.shape_readers
        decision.feeds = [u.description for u in analysis.uses]
        if fold_math.is_all(g, 1.0) and fold_math.is_all(beta, 0.0):
            decision.status = "already-weightless"
            return plan
        if analysis.refusals:
            decision.reason = "; ".join(dict.fromkeys(analysis.refusals))
            if analysis.residual and match.kind == "layer":
                decision.reason += " (post-LN: the normalized value is also the residual, so its scale cannot move into the linears)"
            return plan
        if not analysis.uses:
            decision.reason = "its output has no reader to fold into"
            return plan

        refusal = self._check_channels(g, beta, analysis.uses)
        if refusal:
            decision.reason = refusal
            return plan
        writes, refusal = self._plan_writes(analysis.uses)
        if refusal:
            decision.reason = refusal
            return plan
        biases, refusal = self._plan_biases(beta, analysis.uses)
        if refusal:
            decision.reason = refusal
            return plan
        if (index, match.name) in self.refused:  # found by the write of an earlier run (defer_overflow)
            decision.reason = self.refused[(index, match.name)]
            return plan
        refusal = self._check_overflow(writes, g)
        if refusal:
            decision.reason = refusal
            return plan

        decision.status = "folded"
        plan.g, plan.uses, plan.writes, plan.biases = g, analysis.uses, writes, biases
        plan.site = _site_before(match, g, beta, analysis.uses)
        self._record_writes(decision, writes, biases)
        return plan

    def _check_overflow(self, writes: list[_WeightWrite], g: np.ndarray) -> str | None:
        """Every g*w representable in the weight's dtype? Weights in external data are left to the
        streamed write, which reads them anyway (``defer_overflow``); the others are read block by
        block here, nothing mapped whole."""
        for write in writes:
            tensor = const_tensor(write.source)
            if self.defer_overflow and _deferrable(tensor):
                write.deferred_check = True  # checked on the blocks the write reads
                continue
            try:
                fold_math.check_tensor(tensor, g, write.k_axis)
            except fold_math.FoldRefused as e:
                return f"folding into '{write.source.name}' is not representable: {e}"
            finally:
                release_tensor(tensor)
        return None

    def _record_writes(self, decision: NormDecision, writes: list[_WeightWrite], biases: list[_BiasWrite]) -> None:
        """What the decision reports the fold will write: each reader's action, tensors and bytes."""
        for write in writes:
            nbytes = _nbytes(const_tensor(write.source))
            if write.in_place and any(w.in_place and w.source is write.source for w in writes[:writes.index(write)]):
                action = "shared in place"
            else:
                action = "in place" if write.in_place else "untied copy"
            decision.consumers.append(ConsumerRecord(op=write.use.node.op_type, node=write.use.node.name or "",
                                                     weight=write.source.name or "", action=action))
            if action == "untied copy":
                decision.bytes_added += nbytes
                decision.tensors_written += 1
            elif action == "in place":
                decision.bytes_rewritten += nbytes
                decision.tensors_written += 1
        for bias in biases:
            added, rewritten = self._bias_bytes(bias)
            decision.bytes_added += added
            decision.bytes_rewritten += rewritten
            decision.tensors_written += 1

    def _apply(self, plan: NormPlan, graph: ir.Graph, pool: ConstantPool, opset: int, applied: "_Applied") -> None:
        """Write one folding plan: the weights, the biases, the weightless norm."""
        match, decision, g = plan.match, plan.decision, plan.g
        done_in_place: set[int] = set()
        for write in plan.writes:
            self._apply_weight(write, g, graph, pool, done_in_place, (decision.index, decision.name), applied)
        for bias in plan.biases:
            self._apply_bias(bias, graph, pool, applied)
        readers_of_output = [(u.node, u.idx) for u in match.output.uses()]
        decision.rewritten_as = make_weightless(match, graph, pool, opset, self.keep_structure)
        site = plan.site
        if site is not None:
            node, idx = readers_of_output[0]
            site.output_after = node.inputs[idx]
            for reader, use in zip(site.readers, plan.uses):
                reader.result_after = _linear_result(use)
                reader.linear_after = use.node.outputs[0].name or ""
            applied.sites.append(site)

    @staticmethod
    def _check_channels(g: np.ndarray, beta: np.ndarray | None, uses: list[LinearUse]) -> str | None:
        channels = g.size
        if beta is not None and beta.size not in (1, channels) and channels != 1:
            return f"its bias has {beta.size} values but its scale {channels}"
        for use in uses:
            k = use.weight.tensor.shape[use.weight.k_axis]
            if channels != 1 and k != channels:
                return (
                    f"{use.description}: weight input dimension {k} does not match the norm's "
                    f"{channels} channels"
                )
        return None

    def _plan_writes(self, uses: list[LinearUse]) -> tuple[list[_WeightWrite], str | None]:
        """Decide, for every weight, whether it can be written in place."""
        ours: set[int] = set()
        for use in uses:
            ours.add(id(use.node))
            ours.update(id(n) for n in use.weight.nodes)
        by_source: dict[int, list[LinearUse]] = {}
        for use in uses:
            by_source.setdefault(id(use.weight.source), []).append(use)
        writes: list[_WeightWrite] = []
        for group in by_source.values():
            source = group[0].weight.source
            outside = _outside_readers(source, group, ours)
            same_axis = len({u.weight.k_axis for u in group}) == 1
            exclusive = not outside and same_axis and not source.is_graph_output()
            if not exclusive and not self.untie:
                who = ", ".join(outside) if outside else "readers that index it differently"
                return [], (
                    f"weight '{source.name}' is also read by {who}; untying it (a new tensor) "
                    "is disabled by --no-untie"
                )
            for use in group:
                writes.append(_WeightWrite(use, source, use.weight.k_axis, in_place=exclusive))
        return writes, None

    def _plan_biases(self, beta: np.ndarray | None, uses: list[LinearUse]) -> tuple[list[_BiasWrite], str | None]:
        if beta is None or fold_math.is_all(beta, 0.0):
            return [], None
        out = []
        for use in uses:
            if use.node.op_type == "Gemm" and use.bias_add is use.node and use.bias_source is None:
                return [], f"{use.description} has a bias computed at run time"
            if use.node.op_type == "Attention" and use.bias_source is None:
                return [], f"{use.description} has no constant bias to absorb the norm's bias"
            if use.scaled:
                return [], f"{use.description} reads the norm through a scalar Mul, which would scale the moved bias"
            weight = use.weight.tensor.numpy()
            delta = fold_math.bias_delta(weight, beta, use.weight.k_axis)
            delta = output_scale(use.node) * delta  # Gemm / FusedMatMul: alpha * (beta @ B)
            out.append(_BiasWrite(use, delta))
        return out, None

    # -- writing -------------------------------------------------------------------------------

    def _apply_weight(
        self, write: _WeightWrite, g: np.ndarray, graph: ir.Graph, pool: ConstantPool, done: set[int],
        key: tuple[int, str], applied: "_Applied",
    ) -> ConsumerRecord:
        source = write.source
        original = const_tensor(source)
        folded = fold_math.FoldedTensor(original, g, write.k_axis, name=source.name,
                                        check_for=(key, source.name or "") if write.deferred_check else None)
        if not (write.in_place and id(source) in done):
            applied.folds.append(FoldRecord(source.name or "", original, folded, np.array(g), write.k_axis))
        record = ConsumerRecord(
            op=write.use.node.op_type,
            node=write.use.node.name or "",
            weight=source.name or "",
            action="in place",
        )
        if write.in_place:
            if id(source) in done:
                record.action = "shared in place"
                return record
            done.add(id(source))
            if source.is_initializer():
                source.const_value = folded
                applied.written[source.name or ""] = source.name or ""
            else:  # output of a Constant node: replace it by an initializer
                new = _new_initializer(pool, f"{source.name or 'weight'}.flashnorm", folded, source)
                source.replace_all_uses_with(new)
                applied.written[new.name or ""] = source.name or ""
            return record
        # Untie: a new tensor, and a private copy of the Transpose/Cast path to this reader.
        record.action = "untied copy"
        new = _new_initializer(pool, f"{source.name or 'weight'}.flashnorm", folded, source)
        applied.written[new.name or ""] = source.name or ""
        value = _clone_path(write.use.weight.nodes, new, graph, write.use.node, pool)
        write.use.node.replace_input_with(1, value)
        return record

    @staticmethod
    def _bias_bytes(bias: _BiasWrite) -> tuple[int, int]:
        """(bytes added, bytes rewritten) that :meth:`_apply_bias` will write, read off the model."""
        use = bias.use
        if use.bias_source is not None and (use.bias_add is not None or use.node.op_type == "Gemm"):
            original = const_tensor(use.bias_source)
            shape = np.broadcast_shapes(tuple(original.shape.numpy()), bias.delta.shape)
            nbytes = int(np.prod(shape, dtype=np.int64)) * original.dtype.itemsize
            if _bias_exclusive(use) and use.bias_source.is_initializer() and shape == tuple(original.shape.numpy()):
                return 0, nbytes
            return nbytes, 0
        return int(bias.delta.size) * _new_bias_dtype(use).itemsize, 0

    def _apply_bias(self, bias: _BiasWrite, graph: ir.Graph, pool: ConstantPool, applied: "_Applied") -> tuple[int, int]:
        """Add beta @ B to the linear's bias. Returns (bytes added, bytes rewritten)."""
        use = bias.use
        node = use.node
        if use.bias_source is not None and (use.bias_add is not None or node.op_type == "Gemm"):
            source = use.bias_source
            original = const_tensor(source)
            reader = use.bias_add if node.op_type != "Gemm" else node
            exclusive = _bias_exclusive(use)
            beta_attr = 1.0
            if node.op_type == "Gemm":
                beta_attr = float(node.attributes["beta"].value) if "beta" in node.attributes else 1.0
            array = original.numpy()
            work = np.broadcast_to(array.astype(np.float64), np.broadcast_shapes(array.shape, bias.delta.shape))
            new_array = (work + bias.delta / beta_attr).astype(array.dtype)
            tensor = ir.Tensor(new_array, name=source.name)
            if exclusive and source.is_initializer() and new_array.shape == array.shape:
                source.const_value = tensor
                applied.written[source.name or ""] = source.name or ""
                return 0, tensor.nbytes
            new = _new_initializer(pool, f"{source.name or 'bias'}.flashnorm", tensor, None)
            applied.written[new.name or ""] = source.name or ""
            # a bias behind a Cast: the new constant keeps the stored dtype and gets its own Cast
            new = _clone_path(use.bias_path, new, graph, reader, pool)
            index = 2 if node.op_type == "Gemm" else list(reader.inputs).index(
                use.bias_path[-1].outputs[0] if use.bias_path else source
            )
            reader.replace_input_with(index, new)
            return tensor.nbytes, 0
        # No bias yet: MatMul -> Add(new bias), or Gemm gets C.
        array = bias.delta.astype(_new_bias_dtype(use).numpy())
        tensor = ir.Tensor(array)
        new = _new_initializer(pool, f"{node.name or 'linear'}.flashnorm_bias", tensor, None)
        applied.written[new.name or ""] = ""
        if node.op_type == "Gemm":
            node.resize_inputs(3)
            node.replace_input_with(2, new)
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            return tensor.nbytes, 0
        out = node.outputs[0]
        add = ir.Node("", "Add", [out, new], num_outputs=1, name=pool.unique(f"{node.name or 'MatMul'}/flashnorm_bias"))
        add.outputs[0].name = pool.unique(f"{out.name or 'linear'}.biased")
        copy_type(add.outputs[0], out)
        was_output = out.is_graph_output()
        out.replace_all_uses_with(add.outputs[0], replace_graph_outputs=True)
        add.replace_input_with(0, out)
        graph.insert_after(node, add)
        use.bias_add = add  # the linear's result is now this Add's output
        if was_output:
            # keep the graph output's name
            old_name = out.name
            out.name = pool.unique(f"{old_name}.unbiased")
            add.outputs[0].name = old_name
        return tensor.nbytes, 0


def _bias_exclusive(use: LinearUse) -> bool:
    """Whether the linear's bias constant is read by this linear only (it can be rewritten)."""
    source = use.bias_source
    return len(list(source.uses())) == 1 and not source.is_graph_output() and not use.bias_path


def _new_bias_dtype(use: LinearUse) -> ir.DataType:
    """The dtype of a bias created for a linear that had none: its output's, when known, else
    that of its weight after the weight path's Casts."""
    node = use.node
    dtype = node.outputs[0].dtype or use.weight.tensor.dtype
    if node.outputs[0].dtype is None:
        casts = [n for n in use.weight.nodes if n.op_type == "Cast"]
        if casts:
            dtype = ir.DataType(casts[-1].attributes["to"].value)
    return dtype


def _linear_result(use: LinearUse) -> ir.Value:
    """The linear's result after its bias: the existing or inserted bias Add, else its output."""
    if use.bias_add is not None and use.bias_add is not use.node:
        return use.bias_add.outputs[0]
    return use.node.outputs[0]


def _site_before(match: NormMatch, g: np.ndarray, beta: np.ndarray | None, uses: list[LinearUse]) -> RewriteSite | None:
    """Names, taken before any rewrite, of what verify_subgraph re-runs (None: values without names)."""
    if match.scale_node is not None:
        inputs = [match.outer_input]
    else:  # a fused op: its activation inputs (x, skip), not its constants
        inputs = [v for v in match.anchor.inputs if v is not None and const_tensor(strip_casts(v)[0]) is None]
    readers = []
    for use in uses:
        result = _linear_result(use)
        readers.append(ReaderSite(op=use.node.op_type, data=use.node.inputs[0].name, result_before=result.name,
                                  result_after=result, weight=use.weight.source.name or "",
                                  k_axis=use.weight.k_axis, linear_before=use.node.outputs[0].name or ""))
    extra = [o.name for o in match.anchor.outputs[1:] if o.name and o.uses()] if match.scale_node is None else []
    names = [v.name for v in inputs] + [match.output.name] + [r.data for r in readers] + [r.result_before for r in readers]
    if not all(names):
        return None
    return RewriteSite(norm=match.name, inputs=[v.name for v in inputs], output_before=match.output.name,
                       output_after=match.output, g=np.array(g), beta=None if beta is None else np.array(beta),
                       readers=readers, extra_outputs=extra)


def _clone_path(
    nodes: list[ir.Node], value: ir.Value, graph: ir.Graph, before: ir.Node, pool: ConstantPool
) -> ir.Value:
    """A private copy of a Transpose/Cast path, fed by ``value``, inserted before ``before``."""
    for node in nodes:
        clone = ir.Node(
            node.domain, node.op_type, [value], attributes=list(node.attributes.values()),
            num_outputs=1, name=pool.unique(f"{node.name or node.op_type}.flashnorm"),
        )
        clone.outputs[0].name = pool.unique(f"{node.outputs[0].name or 'w'}.flashnorm")
        copy_type(clone.outputs[0], node.outputs[0])
        graph.insert_before(before, clone)
        value = clone.outputs[0]
    return value


def _outside_readers(source: ir.Value, group: list[LinearUse], ours: set[int]) -> list[str]:
    """Readers of ``source`` (and of the Transpose/Cast path values) that are not this fold."""
    outside: list[str] = []
    frontier = [source]
    seen: set[int] = set()
    while frontier:
        value = frontier.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_graph_output():
            outside.append(f"graph output '{value.name}'")
        for use in value.uses():
            if id(use.node) not in ours:
                outside.append(node_label(use.node) + (" (tied embedding)" if use.node.op_type.startswith("Gather") else ""))
            elif not is_linear_reader(use.node):
                frontier.extend(use.node.outputs)
    return outside


def _deferrable(tensor: ir.TensorProtocol) -> bool:
    """A 2-D weight in an external data file: the streamed writer reads it block by block, so
    its overflow check can ride on that read (``defer_overflow``)."""
    from flashnorm_onnx.passes.tensor_access import external_source

    return len(tensor.shape) == 2 and external_source(tensor) is not None


def _nbytes(tensor: ir.TensorProtocol) -> int:
    return int(np.prod(tensor.shape.numpy(), dtype=np.int64)) * tensor.dtype.itemsize


def _new_initializer(pool: ConstantPool, base: str, tensor: ir.TensorProtocol, like: ir.Value | None) -> ir.Value:
    name = pool.unique(base)
    tensor.name = name
    value = ir.Value(
        name=name,
        shape=ir.Shape(tensor.shape.numpy()),
        type=ir.TensorType(tensor.dtype),
        const_value=tensor,
    )
    pool.graph.register_initializer(value)
    return value


def _ensure_opset(model: ir.Model) -> None:
    """Fused ops we add live in the default domain; make sure it is imported."""
    if "" not in model.opset_imports and "ai.onnx" not in model.opset_imports:
        model.opset_imports[""] = 17
