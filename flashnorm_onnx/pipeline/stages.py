"""One model file through the named stages: load -> fold (analyse + apply) -> write -> verify -> publish.

:func:`fold_file` reads as that list. Each stage is a function with typed inputs and outputs; the
check that runs is chosen once (:func:`~flashnorm_onnx.verify.policy.check_for`) and tells the
writer what to keep for it. Nothing becomes visible unless the check passed (one commit point,
see :mod:`flashnorm_onnx.io.publish`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from flashnorm_onnx.errors import FlashNormError, VerificationFailed, VerificationUnavailable
from flashnorm_onnx.io import model_io, publish
from flashnorm_onnx.io.checker import check_model
from flashnorm_onnx.passes import FlashNormFoldPass, FlashNormPassResult
from flashnorm_onnx.passes.fold_math import DeferredFoldRefused
from flashnorm_onnx.pipeline.options import FoldOptions
from flashnorm_onnx.pipeline.report import FoldReport
from flashnorm_onnx.verify import policy
from flashnorm_onnx.verify.inputs import dims_from_configs, vocab_sizes
from flashnorm_onnx.verify.result import VerificationResult, combine, with_plan

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Loaded:
    """The input model in memory (external tensors stay mapped), ready for the fold."""

    model: ir.Model
    vocab: dict[str, int]
    """Embedding sizes, for token ids the verification generates within range."""
    rtol: float | None
    """The tolerance the verification uses (the 16-bit one when the model computes in 16 bits)."""
    dequantized: list | None = None
    """``--requantize``: the MatMulNBits weights dequantized for the fold."""
    fusions: dict[str, int] | None = None
    """``--for-ort``: the fusions applied before the fold."""
    fusion_note: str = ""
    """``--for-ort``: why the fusions failed (the model was folded without them)."""
    fusion_refusals: list[str] = dataclasses.field(default_factory=list)
    """``--for-ort``: one line per attention a rule saw and left as it was, with the reason."""


@dataclasses.dataclass
class Folded:
    """The model with the fold's plans applied, and what the fold did."""

    model: ir.Model
    result: FlashNormPassResult
    report: FoldReport
    fusions: dict[str, int] | None
    modified: bool
    requantized: bool
    """``--requantize``: the output is checked by quantization's measures."""
    vocab: dict[str, int]
    rtol: float | None


@dataclasses.dataclass
class Written:
    """The output in its hidden staging folder, and what the writer kept for the check."""

    staged: publish.StagedOutput
    check: str | None
    kept: dict | None
    """The folded weights' sampled columns, for the subgraph check."""
    copied: dict
    """The tensors copied unchanged, and from where, for the plan-diff check."""


def fold_file(info: model_io.InputInfo, target: Path, options: FoldOptions, *,
              report_path: str | os.PathLike | None = None, publish_output: bool = True) -> FoldReport:
    """One checked input model to one checked output path, stage by stage.

    A weight found, while it is written, to overflow its dtype once folded (each weight is read once,
    by the writer) is refused: the run plans again, from loading, with that norm skipped. With
    ``publish_output=False`` the verified output stays staged in ``report.staged``."""
    refused: dict[tuple[int, str], str] = {}
    while True:
        folded = fold(load(info, options), info, options, refused)
        if not folded.modified and not options.force_write:
            return nothing_to_fold(folded.report, target, report_path)
        try:
            written = write(folded, info, target, options)
        except DeferredFoldRefused as e:
            if e.key in refused:
                raise
            refused[e.key] = e.reason
            continue
        break
    report = folded.report
    if refused:
        report.notes.append(f"{len(refused)} norm(s) found not representable while writing (the overflow check "
                            "reads each weight as it is written): written again without folding them")
    result, vocab, rtol = folded.result, folded.vocab, folded.rtol
    del folded  # the staged file is what gets verified and published
    try:
        if report.requantize_stats is not None:
            check_int4_weights(report, report.requantize_stats, report_path)
        report.verification = verify(info, written, result, report, options, vocab, rtol)
        check_onnx(report, info, written.staged.model_path)
        fail_unless_passed(report, report_path)
        return publish_report(report, written.staged, target, report_path, publish_output)
    except BaseException:
        written.staged.abandon()
        raise


# -- load ----------------------------------------------------------------------------------------


def load(info: model_io.InputInfo, options: FoldOptions) -> Loaded:
    """The input model, and what the later stages need of it before the fold rewrites it."""
    model = model_io.load(info)
    loaded = Loaded(model=model, vocab=vocab_sizes(model), rtol=options.rtol)
    if options.requantize:
        from flashnorm_onnx.quantize.int4 import dequantize_for_fold

        if options.for_ort:
            raise ValueError("--requantize and --for-ort exclude each other")
        loaded.dequantized = dequantize_for_fold(model)
    if options.for_ort:
        loaded.model, loaded.fusions, loaded.fusion_note = _fuse(info, model, options, loaded.fusion_refusals)
    if loaded.rtol is None and _has_16bit_floats(loaded.model):
        # 16-bit floats anywhere: a norm computed in 16 bits rounds g * norm(x) to 16 bits and the
        # folded model does not; a 16-bit weight (behind a Cast) rounds g * W to 16 bits. Either moves
        # even a float32 output by 16-bit rounding error, so compare with the 16-bit tolerance.
        from flashnorm_onnx.verify.tolerances import TOLERANCES

        loaded.rtol = TOLERANCES["float16"][0]
    return loaded


def _fuse(info: model_io.InputInfo, model: ir.Model, options: FoldOptions, refusals: list[str]):
    """``--for-ort``: (model, fusions applied, note); ``refusals`` gets the reasons of attentions left
    unfused. A failure reloads the model, unfused."""
    from flashnorm_onnx.fusions.ort import (
        FusionFailed,
        fuse_for_ort,
        fuse_light,
        new_ops,
        ort_transformers_optimizer,
        written_by_dynamo,
    )

    if options.verify and options.verify_mode in ("subgraph", "algebraic"):
        raise VerificationUnavailable(
            f"--for-ort rewrites more than the norms, which --verify {options.verify_mode} cannot see; "
            "use --verify onnxruntime (the default for models that fit in memory)")
    if options.verify and options.verify_mode == "auto" and not policy.fits_in_memory(info.tensor_bytes):
        raise VerificationUnavailable(
            "--for-ort is checked by running both whole models in ONNX Runtime, and this model is too "
            "large for that here; fold without --for-ort (checked piece by piece), or --no-verify")
    note = ""
    if not written_by_dynamo(model):
        # the legacy exporter, optimum, the genai builder: ORT's transformers optimizer knows those
        try:
            optimized = ort_transformers_optimizer(info.path)
            counts = {f"ort_transformers_optimizer:{op}": n for op, n in new_ops(model, optimized).items()}
            return optimized, {**counts, **fuse_light(optimized, refusals)}, ""
        except FusionFailed as e:
            note = f"ORT's transformers optimizer failed ({e}); used onnxscript's fusions"
            model = model_io.load(info)
    try:
        fused, counts = fuse_for_ort(model)
    except FusionFailed as e:
        return model_io.load(info), {}, f"ORT fusions failed ({e}); folded without them"
    return fused, counts, note


def refusal_notes(refusals: list[str]) -> list[str]:
    """``NAME: reason`` lines as one note per reason: how many attentions, the first one named."""
    by_reason: dict[str, list[str]] = {}
    notes = []
    for line in refusals:
        if line.startswith("GroupQueryAttention "):  # about the whole model, not one Softmax
            notes.append(line)
            continue
        name, _, why = line.partition(": ")
        by_reason.setdefault(why or name, []).append(name)
    return notes + [f"GroupQueryAttention not used at {len(names)} Softmax node{'s' if len(names) > 1 else ''} "
            f"({names[0]}{', ...' if len(names) > 1 else ''}): {why}" for why, names in by_reason.items()]


def _has_16bit_floats(model: ir.Model) -> bool:
    low = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
    graph = model.graph
    values = list(graph.inputs) + list(graph.outputs) + list(graph.initializers.values())
    return any(v.dtype in low for v in values) or any(
        n.op_type == "Cast" and n.attributes.get("to") is not None and n.attributes["to"].value in low
        for n in graph
    )


# -- fold: analyse, then apply -------------------------------------------------------------------


def fold(loaded: Loaded, info: model_io.InputInfo, options: FoldOptions,
         refused: dict[tuple[int, str], str]) -> Folded:
    """Analyse every norm (a plan each, on the unmodified graph), then apply the plans."""
    fold_pass = FlashNormFoldPass(
        untie=options.untie, keep_structure=options.keep_structure, progress=options.progress_of("fold"),
        defer_overflow=True,  # weights in external data: checked as the write reads them
        refused=refused,
    )
    model = loaded.model
    restore = infer_shapes(model)
    result = fold_pass.apply(model, fold_pass.analyse(model))
    restore()
    report = _report_of(result, info, loaded)
    if loaded.dequantized is not None:
        _requantize(model, loaded.dequantized, report, result)
    fusions = loaded.fusions
    if options.for_ort and not loaded.fusion_note:
        from flashnorm_onnx.fusions.ort import FusionFailed, fuse_after_fold, merge

        try:
            fusions = merge(fusions, fuse_after_fold(model))
            if options.pack_linears != "none":
                from flashnorm_onnx.fusions.gqa_rotary import pack_split_inputs
                from flashnorm_onnx.fusions.packing import pack_linears

                packed = {"packed_linears": pack_linears(model, attention_only=options.pack_linears == "attention")}
                packed["group_query_attention_packed_qkv"] = pack_split_inputs(model)
                fusions = merge(fusions, {k: n for k, n in packed.items() if n})
            if fusions:
                from flashnorm_onnx.fusions.sink import sink_into_branches

                moved = sink_into_branches(model)  # and removes what nothing reads now
                fusions = merge(fusions, {"moved_into_if_branches": moved} if moved else {})
        except FusionFailed as e:  # the graph may be half rewritten: nothing of this run is kept
            raise FlashNormError(f"ORT fusions after the fold failed ({e}); rerun without --for-ort") from e
        if not fusions:
            # nothing fused (e.g. the genai builder's graph): fold the model as loaded, not the one
            # onnxscript's clean-up rewrote, so the output is the plain fold's, node for node
            model = model_io.load(info)
            result = fold_pass(model)
            report = _report_of(result, info, loaded)
    if options.for_ort:
        report.fusions = fusions
        if loaded.fusion_note:
            report.notes.append(loaded.fusion_note)
        report.notes += refusal_notes(loaded.fusion_refusals)
    return Folded(model=model, result=result, report=report, fusions=fusions,
                  modified=result.modified or bool(fusions), requantized=loaded.dequantized is not None,
                  vocab=loaded.vocab, rtol=loaded.rtol)


def _report_of(result: FlashNormPassResult, info: model_io.InputInfo, loaded: Loaded) -> FoldReport:
    report = FoldReport(decisions=result.report.decisions, model=str(info.path))
    report.notes += [f"not carried into the output: {what}" for what in info.dropped]
    return report


def infer_shapes(model: ir.Model) -> Callable[[], None]:
    """ONNX shape inference (with data propagation) to inform the fold's decisions; returns a
    function that puts every pre-existing value's shape and type back as it was, so the output
    carries the input's own value_info.

    Legacy, optimum and ORT-optimizer graphs have no ``value_info``: without it a ``Reshape`` whose
    target is computed from ``Shape`` (GPT-2's final norm) or a ``Gather`` of the CLS row has no
    known rank, and the fold must refuse them. The inference runs on the graph without its
    initializers' data (onnx-ir's ShapeInferencePass), so it costs no memory; where it fails, the
    model is left as it was."""
    import onnx_ir.passes.common as common_passes

    saved = [(v, v.shape, v.type) for g in model.graphs() for v in ir.convenience.create_value_mapping(g).values()]
    # a graph output the fold gives to a new node (a bias Add) keeps the type the input declared
    declared = {v.name: (v.shape, v.type) for v in model.graph.outputs}
    level = logging.getLogger("onnx_ir").level
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # its "left unchanged" warning is ours to judge
    try:
        common_passes.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    except Exception:  # noqa: BLE001 - decisions then use the shapes the file has
        logger.debug("shape inference failed", exc_info=True)
    finally:
        logging.getLogger("onnx_ir").setLevel(level)

    def restore() -> None:
        for value, shape, type_ in saved:
            value.type, value.shape = type_, shape
        for value in model.graph.outputs:
            if value.name in declared:
                value.shape, value.type = declared[value.name]

    return restore


def _requantize(model: ir.Model, dequantized, report: FoldReport, result: FlashNormPassResult) -> None:
    """``--requantize`` after the fold: quantize the folded weights again (see :mod:`quantize.int4`)."""
    from flashnorm_onnx.quantize.int4 import RequantizeInconsistent, requantize_after_fold

    try:
        stats = requantize_after_fold(model, dequantized, folded_weights=[f.name for f in result.folds])
    except RequantizeInconsistent as e:
        raise VerificationFailed(f"--requantize: {e}; no output written", report=report) from e
    report.requantize_stats = stats
    specs = sorted({item.spec.describe() for item in dequantized})
    report.quantization = dict(
        mode="requantize", order="", spec="; ".join(specs) or "no 4-bit MatMulNBits found",
        summary=f"{stats.requantized} folded weight(s) quantized again, {stats.restored} MatMulNBits untouched",
        reason="not exact: each folded weight is rounded to int4 again; its added error is below",
        quantized=stats.requantized, left_float=stats.left_float, weight_errors=stats.weight_errors)
    if stats.untied:
        report.notes.append(f"--requantize: {len(stats.untied)} old int4 weight(s) kept beside their folded copy for "
                            f"their other readers (untied): {', '.join(stats.untied)}")
    if not dequantized:
        report.notes.append("--requantize: the model has no 4-bit MatMulNBits; folded as a float model")


def nothing_to_fold(report: FoldReport, target: Path, report_path) -> FoldReport:
    """Nothing changed and no ``--force-write``: no output, and the leftovers of an interrupted run go."""
    if not report.decisions:
        report.notes.append("no normalization found in the model")
    report.notes.append("nothing to fold: no output written (use --force-write to write it anyway)")
    if publish.clean(target):
        report.notes.append(f"removed the leftovers of an interrupted run at {target}")
    report.verification = VerificationResult(method="skipped", passed=True, message="nothing changed")
    write_report(report, report_path)
    return report


# -- write ---------------------------------------------------------------------------------------


def write(folded: Folded, info: model_io.InputInfo, target: Path, options: FoldOptions) -> Written:
    """The output into a hidden staging folder; the check chosen here tells the writer what to keep."""
    check = None
    if options.verify and folded.modified:
        check = policy.check_for(options.verify_mode, info.tensor_bytes, fused=bool(folded.fusions),
                                 requantized=folded.requantized)
    from flashnorm_onnx.verify.subgraph import sample_window

    kept = {} if policy.keeps_samples(check) else None
    copied: dict = {}
    staged = model_io.write_atomic(
        folded.model, target, model_io.wants_external_data(info, info.tensor_bytes),
        progress=options.progress_of("write"), keep_samples=kept, read_back=policy.reads_back(check),
        copied=copied, sample_window=sample_window,
    )
    return Written(staged=staged, check=check, kept=kept, copied=copied)


# -- verify --------------------------------------------------------------------------------------


def verify(info: model_io.InputInfo, written: Written, result: FlashNormPassResult, report: FoldReport,
           options: FoldOptions, vocab: dict[str, int], rtol: float | None) -> VerificationResult:
    """The check :func:`write` chose, and the plan-diff check beside it."""
    if not options.verify:
        return VerificationResult(method="skipped", passed=True, message="--no-verify")
    if written.check is None:
        return VerificationResult(method="skipped", passed=True, message="nothing changed")
    output = written.staged.model_path
    if written.check == "quantized":
        return verify_quantized(info, output, options, vocab)
    if written.check == "onnxruntime":
        from flashnorm_onnx.verify.whole import compare_models

        dims = {**dims_from_configs(info.path), **(options.dims or {})}
        verification = compare_models(info.path, output, dims=dims, vocab=vocab, rtol=rtol,
                                      timeout=options.verify_timeout)
    else:
        verification = _pieces(written.check, info, written, result, rtol, options.verify_timeout)
    if policy.plan_diff_applies(fused=bool(report.fusions), requantized=False):
        # the output is the input plus the plan, and nothing else
        from flashnorm_onnx.verify.declaration import declaration
        from flashnorm_onnx.verify.plan import check_plan

        verification = with_plan(verification, check_plan(info.path, output, declaration(result), written.copied))
    return verification


def _pieces(check: str, info: model_io.InputInfo, written: Written, result: FlashNormPassResult,
            rtol: float | None, timeout: float | None) -> VerificationResult:
    """The subgraph and/or algebraic checks, on the two files."""
    if "subgraph" in check and len(result.sites) < result.report.folded:
        raise VerificationUnavailable(
            f"{result.report.folded - len(result.sites)} folded norm(s) read or write values without names, "
            "which the subgraph check cannot find in the files; use --verify onnxruntime"
        )
    from flashnorm_onnx.verify.subgraph import ModelFile

    reference, output = ModelFile(info.path), ModelFile(written.staged.model_path, written.kept)  # parsed once
    checks = []
    if "subgraph" in check:
        from flashnorm_onnx.verify.subgraph import check_sites

        checks.append(check_sites(result.sites, reference, output, rtol=rtol, timeout=timeout))
    if "algebraic" in check:
        from flashnorm_onnx.verify.algebraic import check_folds, check_structure

        checks.append(check_folds(result.folds, output))
        checks.append(check_structure(result.sites, reference, output))
    verification = checks[0] if len(checks) == 1 else combine(checks)
    if check == "subgraph+algebraic":
        verification.message = (
            "the model is too large to run twice in memory: ran every rewritten norm and linear "
            "in ONNX Runtime against the input's, and checked each folded tensor's algebra"
        ) + (f"; {verification.message}" if verification.message else "")
    return verification


def verify_quantized(info: model_io.InputInfo, output: Path, options: FoldOptions,
                     vocab: dict[str, int]) -> VerificationResult:
    """The quantized output against the float (or, ``--requantize``, int4) input, run whole in
    ONNX Runtime with quantization's measures; too large to run whole: skipped, with a note."""
    if not policy.fits_in_memory(info.tensor_bytes):
        return VerificationResult(method="skipped", passed=True, message=(
            "the model is too large to run twice in memory: per-weight quantization errors above"))
    from flashnorm_onnx.verify.whole import compare_models

    dims = {**dims_from_configs(info.path), **(options.dims or {})}
    return compare_models(info.path, output, dims=dims, vocab=vocab, timeout=options.verify_timeout, quantized=True)


def check_int4_weights(report: FoldReport, stats, report_path) -> None:
    """Every int4 weight written must be a round-to-nearest of the float weight it stands for,
    within one step of its block (:func:`~flashnorm_onnx.quantize.int4.step_ratio`), measured while
    it was written. This, not the whole-model run, is what proves the quantization: an int4
    model's outputs differ from the float model's by design."""
    if stats is None:
        return
    bad = stats.bad_weights()
    if report.quantization is not None:
        report.quantization["max_step_ratio"] = max(stats.step_ratios.values(), default=0.0)
    if bad:
        worst = max(bad, key=lambda n: stats.step_ratios[n])
        report.notes.append("an int4 weight is not a quantization of its float weight: no output written")
        write_report(report, report_path)
        raise VerificationFailed(
            f"int4 weight '{worst}' differs from the float weight it replaces by {stats.step_ratios[worst]:.2f} "
            f"quantization steps (at most 1 expected; {len(bad)} weight(s) in all); no output written",
            report=report)
    if stats.step_ratios:
        report.notes.append(f"int4 weights: each of the {len(stats.step_ratios)} written is within one "
                            "quantization step of the float weight it replaces")


def check_onnx(report: FoldReport, info: model_io.InputInfo, output: Path) -> None:
    """``onnx.checker`` on the output: a new problem fails the run, one the input has too is noted."""
    problem = check_model(output)
    if problem is None:
        report.notes.append("onnx.checker: output passes")
    elif check_model(info.path) is None:
        report.verification = VerificationResult(
            method="onnx.checker", passed=False, message=f"the output fails onnx.checker: {problem}")
    else:
        report.notes.append(f"onnx.checker rejects the input model too ({problem}); not a new problem")


def fail_unless_passed(report: FoldReport, report_path) -> None:
    if report.verification is not None and not report.verification.passed:
        report.notes.append("verification failed: no output written")
        write_report(report, report_path)
        raise VerificationFailed(f"verification failed: {report.verification.message}; no output written",
                                 report=report)


# -- publish -------------------------------------------------------------------------------------


def publish_report(report: FoldReport, staged, target: Path, report_path, publish_output: bool) -> FoldReport:
    """Write the report, then make the output visible (or leave it staged for the caller)."""
    if not publish_output:
        report.staged = staged
        return report

    def before_publish(paths: list[Path]) -> None:
        report.output = str(target)
        report.notes.append("wrote " + ", ".join(str(p) for p in paths))
        write_report(report, report_path)

    staged.commit(before_publish)
    return report


def write_report(report: FoldReport, path: str | os.PathLike | None) -> None:
    if path is not None:
        model_io.write_report(report, path)
