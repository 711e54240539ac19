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

import logging
from typing import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from flashnorm_onnx.passes import fold_math, provenance
from flashnorm_onnx.passes.graph_utils import const_tensor, copy_type, node_label, opset_version, release_tensor
from flashnorm_onnx.passes.linear_consumers import LinearUse, find_linear_uses, is_linear_reader, output_scale
from flashnorm_onnx.passes.norm_patterns import NormMatch, find_norms, strip_casts
from flashnorm_onnx.passes.scopes import Scopes
from flashnorm_onnx.passes.weightless_norm import ConstantPool, make_weightless
from flashnorm_onnx.passes.decisions import ConsumerRecord, FoldDecisions, NormDecision
from flashnorm_onnx.passes.fold_plan import (Applied, BiasWrite, NormPlan, WeightWrite, new_bias_dtype,
                                             partners_by_weight, scale_key, share_writes)
from flashnorm_onnx.passes.fold_result import FlashNormPassResult, FoldRecord, ReaderSite, RewriteSite

logger = logging.getLogger(__name__)

#: Why a norm found in a model-local function is not folded.
_IN_FUNCTION = ("inside model-local function '{name}': the fold does not rewrite function bodies "
                "(their weights come from each call; inline the functions first, e.g. with "
                "onnx_ir.passes.common.InlinePass)")


def _function_name(function: ir.Function) -> str:
    return f"{function.domain}::{function.name}" if function.domain else function.name


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
        """One plan per normalization, wherever it is: the main graph, every subgraph (If branches,
        Loop/Scan bodies, nested) and model-local functions; reads the model, writes nothing.

        Each norm is first screened alone; then the weights are planned together (:meth:`_plan_jointly`),
        because a weight read by several norms' linears (the two branches of a merged decoder) is
        written once when their scales are equal. (The part that reads weights, the overflow check,
        is here: progress is reported per norm.)"""
        scopes = Scopes(model.graph)
        found: list[tuple[NormMatch, str]] = []
        for prefix, graph in scopes.graphs:
            found += [(m, prefix) for m in find_norms(graph)]
        for function in model.functions.values():
            for m in find_norms(function):
                m.problem = m.problem or _IN_FUNCTION.format(name=_function_name(function))
                found.append((m, f"{_function_name(function)}/"))
        plans = [self._screen(index, match, prefix) for index, (match, prefix) in enumerate(found)]
        self._plan_jointly(plans, scopes)
        if self.progress:
            for index in range(len(plans)):
                self.progress(index + 1, len(plans))
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
        scopes = Scopes(graph)
        report = FoldDecisions()
        applied = Applied()
        for plan in plans:
            if plan.folds:
                self._apply(plan, scopes, pool, opset, applied)
            logger.info("%s", plan.decision.line().replace("\n", " |"))
            report.decisions.append(plan.decision)
        modified = report.folded > 0
        if modified:
            common_passes.RemoveUnusedNodesPass()(model)
            _ensure_opset(model)
            provenance.record(model, report)  # survives a PassManager, tells a folded model apart
        return FlashNormPassResult(model, modified=modified, report=report, folds=applied.folds, sites=applied.sites,
                                   written=applied.written, scales=applied.scales)

    # -- one norm ------------------------------------------------------------------------------

    def _screen(self, index: int, match: NormMatch, prefix: str = "") -> NormPlan:
        """What can be decided for one norm alone: it is skipped (with the reason), already
        weightless, or a candidate whose readers are all linears of the right width."""
        decision = NormDecision(index=index, name=prefix + match.name, kind=match.kind, form=match.form,
                                status="skipped")
        plan = NormPlan(match, decision, prefix=prefix)
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
        if (index, decision.name) in self.refused:  # found by the write of an earlier run (defer_overflow)
            decision.reason = self.refused[(index, decision.name)]
            return plan
        plan.candidate = True
        plan.g, plan.beta, plan.uses = g, beta, analysis.uses
        return plan

    def _plan_jointly(self, plans: list[NormPlan], scopes: Scopes) -> None:
        """Plan the writes of every candidate together, until no candidate is refused.

        A weight is written in place when each of its readers is a linear of a candidate whose
        scale equals this norm's by value (read along the same axis): the two branches of a merged
        decoder read one weight, and folding it once serves both. Otherwise each distinct scale
        gets one untied copy, shared by the readers of that scale. A candidate refused here
        (--no-untie, a bias, an overflow) is no longer a partner, so the rest are planned again."""
        overflow: dict[tuple, str | None] = {}
        while True:
            candidates = [p for p in plans if p.candidate]
            partners = partners_by_weight(candidates)
            refused = False
            for plan in candidates:
                refusal = self._finish(plan, partners, overflow, scopes)
                if refusal:
                    plan.candidate, plan.decision.reason = False, refusal
                    refused = True
            if not refused:
                break
        share_writes([p for p in plans if p.candidate])
        for plan in plans:
            if plan.candidate:
                plan.decision.status = "folded"
                plan.site = _site_before(plan.match, plan.g, plan.beta, plan.uses, scopes)
                self._record_writes(plan.decision, plan.writes, plan.biases)

    def _finish(self, plan: NormPlan, partners: dict, overflow: dict, scopes: Scopes) -> str | None:
        """The writes and biases of one candidate, or why it cannot fold."""
        writes, refusal = self._plan_writes(plan, partners)
        if refusal:
            return refusal
        biases, refusal = self._plan_biases(plan.beta, plan.uses)
        if refusal:
            return refusal
        for write in writes:  # each (weight, axis, scale) read once, however many readers share it
            key = (id(write.source), write.k_axis, write.g_key)
            if key not in overflow:
                overflow[key] = (self._check_overflow(write, plan.g), write.deferred_check)
            refusal, write.deferred_check = overflow[key]
            if refusal:
                return refusal
        plan.writes, plan.biases = writes, biases
        return None

    def _check_overflow(self, write: WeightWrite, g: np.ndarray) -> str | None:
        """Every g*w representable in the weight's dtype? Weights in external data are left to the
        streamed write, which reads them anyway (``defer_overflow``); the others are read block by
        block here, nothing mapped whole."""
        tensor = const_tensor(write.source)
        if self.defer_overflow and _deferrable(tensor):
            write.deferred_check = True  # checked on the blocks the write reads
            return None
        try:
            fold_math.check_tensor(tensor, g, write.k_axis)
        except fold_math.FoldRefused as e:
            return f"folding into '{write.source.name}' is not representable: {e}"
        finally:
            release_tensor(tensor)
        return None

    def _record_writes(self, decision: NormDecision, writes: list[WeightWrite], biases: list[BiasWrite]) -> None:
        """What the decision reports the fold will write: each reader's action, tensors and bytes
        (a tensor another reader, of this norm or of another, writes first is counted there)."""
        for write in writes:
            nbytes = _nbytes(const_tensor(write.source))
            if not write.first:
                action = "shared in place" if write.in_place else "shared copy"
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
            if not bias.first:
                continue
            added, rewritten = self._bias_bytes(bias)
            decision.bytes_added += added
            decision.bytes_rewritten += rewritten
            decision.tensors_written += 1

    def _apply(self, plan: NormPlan, scopes: Scopes, pool: ConstantPool, opset: int, applied: "Applied") -> None:
        """Write one folding plan: the weights, the biases, the weightless norm (in its own graph)."""
        match, decision, g = plan.match, plan.decision, plan.g
        for write in plan.writes:
            self._apply_weight(write, g, pool, (decision.index, decision.name), applied, scopes)
        for bias in plan.biases:
            self._apply_bias(bias, pool, applied, scopes)
        readers_of_output = [(u.node, u.idx) for u in match.output.uses()]
        decision.rewritten_as = make_weightless(match, match.anchor.graph, pool, opset, self.keep_structure)
        site = plan.site
        if site is not None:
            node, idx = readers_of_output[0]
            site.output_after = node.inputs[idx]
            site.output_after_name = scopes.name(site.output_after)
            for reader, use in zip(site.readers, plan.uses):
                reader.result_after = _linear_result(use)
                reader.result_after_name = scopes.name(reader.result_after)
                reader.linear_after = scopes.name(use.node.outputs[0])
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

    def _plan_writes(self, plan: NormPlan, partners: dict[int, list[tuple[NormPlan, LinearUse]]]
                     ) -> tuple[list[WeightWrite], str | None]:
        """Decide, for every weight, whether it can be written in place: when all its readers are
        linears of candidates with this norm's scale (``partners``: every candidate's linears, by
        weight), reading it along one axis."""
        g_key = scale_key(plan.g)
        by_source: dict[int, list[LinearUse]] = {}
        for use in plan.uses:
            by_source.setdefault(id(use.weight.source), []).append(use)
        writes: list[WeightWrite] = []
        for group in by_source.values():
            source = group[0].weight.source
            same = [u for q, u in partners.get(id(source), []) if scale_key(q.g) == g_key]
            ours: set[int] = set()
            for use in same:
                ours.add(id(use.node))
                ours.update(id(n) for n in use.weight.nodes)
            outside = _outside_readers(source, ours)
            same_axis = len({u.weight.k_axis for u in same}) == 1
            exclusive = not outside and same_axis and not source.is_graph_output()
            if not exclusive and not self.untie:
                who = ", ".join(outside) if outside else "readers that index it differently"
                return [], (
                    f"weight '{source.name}' is also read by {who}; untying it (a new tensor) "
                    "is disabled by --no-untie"
                )
            for use in group:
                writes.append(WeightWrite(use, source, use.weight.k_axis, in_place=exclusive, g_key=g_key))
        return writes, None

    def _plan_biases(self, beta: np.ndarray | None, uses: list[LinearUse]) -> tuple[list[BiasWrite], str | None]:
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
            out.append(BiasWrite(use, delta))
        return out, None

    # -- writing -------------------------------------------------------------------------------

    def _apply_weight(self, write: WeightWrite, g: np.ndarray, pool: ConstantPool, key: tuple[int, str],
                      applied: "Applied", scopes: Scopes) -> None:
        source = write.source
        done = applied.done.get(write.key)
        if done is None:
            original = const_tensor(source)
            folded = fold_math.FoldedTensor(original, g, write.k_axis, name=source.name,
                                            check_for=(key, source.name or "") if write.deferred_check else None)
            applied.folds.append(FoldRecord(source.name or "", original, folded, np.array(g), write.k_axis))
            if write.in_place and source.is_initializer():
                source.const_value = folded
                done = source
                applied.written[scopes.name(source)] = scopes.name(source)
            else:  # a new initializer: an untied copy, or in place of a Constant node's output
                done = _new_initializer(pool, f"{source.name or 'weight'}.flashnorm", folded, source)
                applied.written[scopes.name(done)] = scopes.name(source)
                if write.in_place:
                    source.replace_all_uses_with(done)
            applied.scales[scopes.name(done)] = np.array(g)
            applied.done[write.key] = done
        if write.in_place:
            return  # every reader reads the rewritten tensor
        # Untie: a private copy of the Transpose/Cast path to this reader, from the new tensor.
        node = write.use.node
        value = _clone_path(write.use.weight.nodes, done, node.graph, node, pool)
        node.replace_input_with(1, value)

    @staticmethod
    def _bias_bytes(bias: BiasWrite) -> tuple[int, int]:
        """(bytes added, bytes rewritten) that :meth:`_apply_bias` will write, read off the model."""
        use = bias.use
        if use.bias_source is not None and (use.bias_add is not None or use.node.op_type == "Gemm"):
            original = const_tensor(use.bias_source)
            shape = np.broadcast_shapes(tuple(original.shape.numpy()), bias.delta.shape)
            nbytes = int(np.prod(shape, dtype=np.int64)) * original.dtype.itemsize
            if bias.in_place and shape == tuple(original.shape.numpy()):
                return 0, nbytes
            return nbytes, 0
        return int(bias.delta.size) * new_bias_dtype(use).itemsize, 0

    def _apply_bias(self, bias: BiasWrite, pool: ConstantPool, applied: "Applied", scopes: Scopes) -> None:
        """Add beta @ B to the linear's bias (one tensor per share key, see :func:`share_writes`)."""
        use = bias.use
        node = use.node
        graph = node.graph
        if use.bias_source is not None and (use.bias_add is not None or node.op_type == "Gemm"):
            source = use.bias_source
            reader = use.bias_add if node.op_type != "Gemm" else node
            new = applied.done.get(bias.key)
            if new is None:
                original = const_tensor(source)
                beta_attr = 1.0
                if node.op_type == "Gemm":
                    beta_attr = float(node.attributes["beta"].value) if "beta" in node.attributes else 1.0
                array = original.numpy()
                work = np.broadcast_to(array.astype(np.float64), np.broadcast_shapes(array.shape, bias.delta.shape))
                new_array = (work + bias.delta / beta_attr).astype(array.dtype)
                tensor = ir.Tensor(new_array, name=source.name)
                if bias.in_place and new_array.shape == array.shape:
                    source.const_value = tensor
                    new = source
                    applied.written[scopes.name(source)] = scopes.name(source)
                else:
                    new = _new_initializer(pool, f"{source.name or 'bias'}.flashnorm", tensor, None)
                    applied.written[scopes.name(new)] = scopes.name(source)
                applied.done[bias.key] = new
            if new is source:
                return
            # a bias behind a Cast: the new constant keeps the stored dtype and gets its own Cast
            value = _clone_path(use.bias_path, new, graph, reader, pool)
            index = 2 if node.op_type == "Gemm" else list(reader.inputs).index(
                use.bias_path[-1].outputs[0] if use.bias_path else source
            )
            reader.replace_input_with(index, value)
            return
        # No bias yet: MatMul -> Add(new bias), or Gemm gets C.
        new = applied.done.get(bias.key)
        if new is None:
            tensor = ir.Tensor(bias.delta.astype(new_bias_dtype(use).numpy()))
            new = _new_initializer(pool, f"{node.name or 'linear'}.flashnorm_bias", tensor, None)
            applied.written[scopes.name(new)] = ""
            applied.done[bias.key] = new
        if node.op_type == "Gemm":
            node.resize_inputs(3)
            node.replace_input_with(2, new)
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            return
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


def _linear_result(use: LinearUse) -> ir.Value:
    """The linear's result after its bias: the existing or inserted bias Add, else its output."""
    if use.bias_add is not None and use.bias_add is not use.node:
        return use.bias_add.outputs[0]
    return use.node.outputs[0]


def _site_before(match: NormMatch, g: np.ndarray, beta: np.ndarray | None, uses: list[LinearUse],
                 scopes: Scopes) -> RewriteSite | None:
    """Names, taken before any rewrite, of what verify_subgraph re-runs (None: values without
    names). Qualified by their scope (:mod:`~flashnorm_onnx.passes.scopes`): "" in the main graph."""
    if match.scale_node is not None:
        inputs = [match.outer_input]
    else:  # a fused op: its activation inputs (x, skip), not its constants
        inputs = [v for v in match.anchor.inputs if v is not None and const_tensor(strip_casts(v)[0]) is None]
    readers = []
    for use in uses:
        result = _linear_result(use)
        readers.append(ReaderSite(op=use.node.op_type, data=scopes.name(use.node.inputs[0]),
                                  result_before=scopes.name(result), result_after=result,
                                  weight=scopes.name(use.weight.source), k_axis=use.weight.k_axis,
                                  linear_before=scopes.name(use.node.outputs[0])))
    extra = [scopes.name(o) for o in match.anchor.outputs[1:] if o.name and o.uses()] if match.scale_node is None else []
    names = [scopes.name(v) for v in inputs] + [match.output.name] + [r.data for r in readers] \
        + [r.result_before for r in readers]
    if not all(names):
        return None
    return RewriteSite(norm=scopes.prefix(match.anchor.graph) + match.name, inputs=[scopes.name(v) for v in inputs],
                       output_before=scopes.name(match.output), output_after=match.output, g=np.array(g),
                       beta=None if beta is None else np.array(beta), readers=readers, extra_outputs=extra,
                       scope=scopes.prefix(match.anchor.graph))


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


def _outside_readers(source: ir.Value, ours: set[int]) -> list[str]:
    """Readers of ``source`` (and of the Transpose/Cast path values) that are not this fold
    (``ours``: its linears and their weight paths), in any graph that can see it."""
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
