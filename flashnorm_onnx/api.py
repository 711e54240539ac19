"""The Python API: ``optimize`` and ``inspect``.

The data flow, end to end::

    check input and output paths -> load (lazy) -> [--for-ort: onnxscript's ORT fusions]
        -> find norms and their readers -> decide -> fold
        -> write to a hidden staging folder -> verify (ONNX Runtime, whole or piece by piece)
        -> write the report -> publish (one commit point, see publish.py)

Nothing becomes visible unless verification passed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from flashnorm_onnx import model_io
from flashnorm_onnx.checker import check_model
from flashnorm_onnx.errors import VerificationFailed
from flashnorm_onnx.inputs import dims_from_configs, vocab_sizes
from flashnorm_onnx.passes import FlashNormFoldPass
from flashnorm_onnx.passes.fold_math import DeferredFoldRefused
from flashnorm_onnx.report import FoldReport, VerificationResult

logger = logging.getLogger(__name__)

#: Run ORT verification only when both models fit comfortably in memory.
VERIFY_MEMORY_FRACTION = 0.25


def inspect(model: str | os.PathLike, *, untie: bool = True, keep_structure: bool = False) -> FoldReport:
    """Analyse a model: what would be folded and what skipped, and why. Writes nothing."""
    info = model_io.check_input(model)
    ir_model = model_io.load(info)
    restore = infer_shapes(ir_model)
    fold = FlashNormFoldPass(untie=untie, keep_structure=keep_structure)
    report = FoldReport(decisions=fold.report_of(fold.analyse(ir_model)).decisions)  # the model is not touched
    restore()
    report.model = str(info.path)
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


def optimize(
    model: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    untie: bool = True,
    keep_structure: bool = False,
    verify: bool = True,
    verify_mode: str = "auto",
    dims: dict[str, int] | None = None,
    rtol: float | None = None,
    report_path: str | os.PathLike | None = None,
    in_place: bool = False,
    force_write: bool = False,
    verify_timeout: float | None = 600.0,
    progress: Callable[[str, int, int], None] | None = None,
    for_ort: bool = False,
    quantize=None,
    quantize_order: str | None = None,
    requantize: bool = False,
):
    """Fold every foldable normalization of ``model`` and write the result to ``output``.

    ``quantize``: a :class:`~flashnorm_onnx.quantize.QuantSpec`: the output is int4
    (``MatMulNBits``), quantized from the float model in the order ``quantize_order`` (see
    :data:`QUANTIZE_ORDERS`; None: the default, :data:`DEFAULT_QUANTIZE_ORDER`). ``requantize``:
    the input is an int4 model; its norms are folded into the dequantized weights, which are
    quantized again as their nodes were (not exact: the added error is reported).

    ``for_ort``: first apply onnxscript's ONNX Runtime fusions (RMSNorm, skip-RMSNorm, rotary,
    attention, FusedMatMul; see :mod:`flashnorm_onnx.fusions`), then fold the fused graph. The
    output then needs ONNX Runtime (it uses com.microsoft operators) and is checked as a whole
    against the input in ONNX Runtime.

    ``verify_mode`` (see :data:`VERIFY_MODES`): "auto" (the whole-model ONNX Runtime comparison
    when both models fit comfortably in memory, else the subgraph check plus the algebraic one),
    "onnxruntime", "subgraph" or "algebraic".

    ``model`` may be a folder (an optimum export, an onnxruntime-genai folder): every ``*.onnx``
    in it is folded and verified into the output folder, companions copied; the result is then
    a :class:`~flashnorm_onnx.folder.FolderReport`.

    Returns the report. Raises :class:`~flashnorm_onnx.errors.FlashNormError` subclasses for
    bad input, unwritable output and failed verification (nothing is published then).
    """
    if verify_mode not in VERIFY_MODES:
        raise ValueError(f"verify_mode must be one of {', '.join(VERIFY_MODES)}")
    if quantize is not None and requantize:
        raise ValueError("quantize and requantize exclude each other")
    if quantize_order is None:
        quantize_order = DEFAULT_QUANTIZE_ORDER
    if quantize_order not in QUANTIZE_ORDERS:
        raise ValueError(f"quantize_order must be one of {', '.join(QUANTIZE_ORDERS)}")
    model_io.check_dims(dims)
    options = dict(untie=untie, keep_structure=keep_structure, verify=verify, verify_mode=verify_mode, dims=dims,
                   rtol=rtol, force_write=force_write, verify_timeout=verify_timeout, progress=progress,
                   for_ort=for_ort, quantize=quantize, quantize_order=quantize_order, requantize=requantize)
    if Path(model).is_dir() and not in_place:
        from flashnorm_onnx.folder import optimize_folder

        return optimize_folder(Path(model), output, report_path=report_path, **options)
    info = model_io.check_input(model)
    if in_place:
        target = model_io.check_output(output or info.path, info, in_place=True)
    else:
        target = model_io.check_output(output or model_io.default_output_path(info.path), info)
    model_io.check_report_path(report_path, info, output=target)
    return optimize_file(info, target, report_path=report_path, **options)


#: ``--verify`` choices: what each proves is in the README ("What verification proves").
VERIFY_MODES = ("auto", "onnxruntime", "subgraph", "algebraic")

#: ``--quantize-order``: "fold-first" folds g into the float weights, then quantizes them;
#: "quantize-first" quantizes the weights as exported, then folds only the norms whose readers
#: stayed float (the int4 ones keep g in their norm, which costs nothing at run time).
QUANTIZE_ORDERS = ("quantize-first", "fold-first")
#: Measured on SmolLM2-135M (benchmarks/RESULTS_int4.md): see the README's int4 section.
DEFAULT_QUANTIZE_ORDER = "quantize-first"


def optimize_file(
    info: model_io.InputInfo,
    target: Path,
    *,
    quantize=None,
    quantize_order: str = DEFAULT_QUANTIZE_ORDER,
    report_path: str | os.PathLike | None = None,
    publish_output: bool = True,
    **options,
) -> FoldReport:
    """One checked input model to one checked output path (see :func:`fold_file`); with
    ``quantize``, the output is the int4 model (see :func:`quantize_file`)."""
    if quantize is None:
        return fold_file(info, target, report_path=report_path, publish_output=publish_output, **options)
    return quantize_file(info, target, quantize, quantize_order, report_path=report_path,
                         publish_output=publish_output, **options)


def quantize_file(
    info: model_io.InputInfo,
    target: Path,
    spec,
    order: str,
    *,
    report_path: str | os.PathLike | None = None,
    publish_output: bool = True,
    **options,
) -> FoldReport:
    """``--quantize``: fold and quantize in ``order`` (see :data:`QUANTIZE_ORDERS`), each step
    staged and checked, then the int4 output checked against the float input with measures
    that fit quantization. Tensors stream: one weight in memory at a time."""
    from flashnorm_onnx.quantize import quantize_model

    options = {**options, "force_write": True}
    if options.get("requantize"):
        raise ValueError("quantize and requantize exclude each other")
    external = model_io.wants_external_data(info, info.tensor_bytes)
    progress = options.get("progress")
    write_progress = (lambda i, n: progress("write", i, n)) if progress else None
    intermediate = None
    try:
        if order == "fold-first":
            report = fold_file(info, target, publish_output=False, **options)
            intermediate = report.staged
            model = model_io.load(model_io.check_input(intermediate.model_path))
            stats = quantize_model(model, spec)
            staged = model_io.write_atomic(model, target, external, progress=write_progress)
            del model
        else:
            model = model_io.load(info)
            stats = quantize_model(model, spec)
            intermediate = model_io.write_atomic(model, target, external, progress=write_progress)
            del model
            report = fold_file(model_io.check_input(intermediate.model_path), target, publish_output=False, **options)
            report.model = str(info.path)
            staged = report.staged
            report.notes = [n for n in report.notes if not n.startswith("nothing to fold")]
        intermediate.abandon()
        intermediate = None
    except BaseException:
        if intermediate is not None:
            intermediate.abandon()
        raise
    report.staged = None
    try:
        summary = f"{stats.quantized} MatMul(s) to MatMulNBits"
        reason = ("fold-first: g folded into the float weights, then quantized" if order == "fold-first" else
                  "quantize-first: weights quantized as exported; norms read by int4 linears keep their scale "
                  "(folding g first measured worse at int4, README 'int4'), float readers folded")
        report.quantization = dict(mode="quantize", order=order, spec=spec.describe(), summary=summary, reason=reason,
                                   quantized=stats.quantized, left_float=stats.left_float,
                                   weight_errors=dict(stats.weight_errors))
        _check_int4_weights(report, stats, report_path)
        if not stats.quantized:
            report.notes.append("no MatMul with a constant float weight of 16 rows or more: nothing quantized")
        if order == "quantize-first":
            for d in report.decisions:
                if d.status == "skipped" and "MatMulNBits" in d.reason:
                    d.reason = ("kept its scale: read by int4 MatMulNBits (quantize-first keeps g in the norm, "
                                "where it costs nothing; --quantize-order fold-first folds it before quantizing)")
        if options.get("verify", True):
            report.quant_verification = _verify_quantized(info, staged.model_path, options)
            if not report.quant_verification.passed:
                report.notes.append("the quantized model failed its check: no output written")
                _write_report(report, report_path)
                raise VerificationFailed(
                    f"the int4 model failed its check: {report.quant_verification.message}; no output written",
                    report=report)
        return _publish(report, staged, target, report_path, publish_output)
    except BaseException:
        staged.abandon()
        raise


def _check_int4_weights(report: FoldReport, stats, report_path) -> None:
    """Every int4 weight written must be a round-to-nearest of the float weight it stands for,
    within one step of its block (:func:`~flashnorm_onnx.quantize.step_ratio`), measured while
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
        _write_report(report, report_path)
        raise VerificationFailed(
            f"int4 weight '{worst}' differs from the float weight it replaces by {stats.step_ratios[worst]:.2f} "
            f"quantization steps (at most 1 expected; {len(bad)} weight(s) in all); no output written",
            report=report)
    if stats.step_ratios:
        report.notes.append(f"int4 weights: each of the {len(stats.step_ratios)} written is within one "
                            "quantization step of the float weight it replaces")


def _verify_quantized(info: model_io.InputInfo, output: Path, options: dict) -> VerificationResult:
    """The quantized output against the float (or, ``--requantize``, int4) input, run whole in
    ONNX Runtime with quantization's measures; too large to run whole: skipped, with a note."""
    if not _fits_in_memory(info):
        return VerificationResult(method="skipped", passed=True, message=(
            "the model is too large to run twice in memory: per-weight quantization errors above"))
    from flashnorm_onnx.verify import compare_models

    dims = {**dims_from_configs(info.path), **(options.get("dims") or {})}
    vocab = options["vocab"] if "vocab" in options else vocab_sizes(model_io.load(info))
    return compare_models(info.path, output, dims=dims, vocab=vocab,
                          timeout=options.get("verify_timeout"), quantized=True)


def _publish(report: FoldReport, staged, target: Path, report_path, publish_output: bool) -> FoldReport:
    if not publish_output:
        report.staged = staged
        return report

    def before_publish(paths: list[Path]) -> None:
        report.output = str(target)
        report.notes.append("wrote " + ", ".join(str(p) for p in paths))
        _write_report(report, report_path)

    staged.commit(before_publish)
    return report


def fold_file(
    info: model_io.InputInfo,
    target: Path,
    *,
    untie: bool = True,
    keep_structure: bool = False,
    verify: bool = True,
    verify_mode: str = "auto",
    dims: dict[str, int] | None = None,
    rtol: float | None = None,
    report_path: str | os.PathLike | None = None,
    force_write: bool = False,
    verify_timeout: float | None = 600.0,
    progress: Callable[[str, int, int], None] | None = None,
    publish_output: bool = True,
    for_ort: bool = False,
    requantize: bool = False,
) -> FoldReport:
    """One checked input model to one checked output path: load -> fold -> stage -> verify -> publish.

    ``requantize``: 4-bit ``MatMulNBits`` are dequantized for the fold, and the ones whose weight
    it rewrote quantized again with their own spec; the check is then quantization's measures
    against the int4 input.

    With ``publish_output=False`` the verified output stays staged: the report's ``staged``
    attribute holds it, for the caller to ``commit()`` or ``abandon()``."""
    refused: dict[tuple[int, str], str] = {}  # norms whose fold the write found not representable
    while True:
        try:
            ir_model = model_io.load(info)
            vocab = vocab_sizes(ir_model)
            fusions = None
            dequantized = None
            if requantize:
                from flashnorm_onnx.quantize import dequantize_for_fold

                if for_ort:
                    raise ValueError("--requantize and --for-ort exclude each other")
                dequantized = dequantize_for_fold(ir_model)
            if for_ort:
                ir_model, fusions, fusion_note = _fuse(info, ir_model, verify, verify_mode)
            if rtol is None and _has_16bit_floats(ir_model):
                # 16-bit floats anywhere: a norm computed in 16 bits rounds g * norm(x) to 16 bits and the
                # folded model does not; a 16-bit weight (behind a Cast) rounds g * W to 16 bits. Either moves
                # even a float32 output by 16-bit rounding error, so compare with the 16-bit tolerance.
                from flashnorm_onnx.verify import TOLERANCES

                rtol = TOLERANCES["float16"][0]

            fold = FlashNormFoldPass(
                untie=untie,
                keep_structure=keep_structure,
                progress=(lambda i, n: progress("fold", i, n)) if progress else None,
                defer_overflow=True,  # weights in external data: checked as the write reads them
                refused=refused,
            )
            restore = infer_shapes(ir_model)
            result = fold(ir_model)
            restore()
            report = FoldReport(decisions=result.report.decisions, model=str(info.path))
            report.notes += [f"not carried into the output: {what}" for what in info.dropped]
            if dequantized is not None:
                _requantize(ir_model, dequantized, report, result)
            if for_ort:
                if not fusion_note:
                    from flashnorm_onnx.fusions import FusionFailed, fuse_after_fold, merge

                    try:
                        fusions = merge(fusions, fuse_after_fold(ir_model))
                    except FusionFailed as e:  # the graph may be half rewritten: nothing of this run is kept
                        from flashnorm_onnx.errors import FlashNormError

                        raise FlashNormError(f"ORT fusions after the fold failed ({e}); rerun without --for-ort") from e
                    if not fusions:
                        # nothing fused (e.g. the genai builder's graph): fold the model as loaded, not the
                        # one onnxscript's clean-up rewrote, so the output is the plain fold's, node for node
                        ir_model = model_io.load(info)
                        result = fold(ir_model)
                        report = FoldReport(decisions=result.report.decisions, model=str(info.path))
                report.fusions = fusions
                if fusion_note:
                    report.notes.append(fusion_note)
            modified = result.modified or bool(fusions)
            if not modified and not force_write:
                if not report.decisions:
                    report.notes.append("no normalization found in the model")
                report.notes.append("nothing to fold: no output written (use --force-write to write it anyway)")
                from flashnorm_onnx import publish

                if publish.clean(target):
                    report.notes.append(f"removed the leftovers of an interrupted run at {target}")
                report.verification = VerificationResult(method="skipped", passed=True, message="nothing changed")
                _write_report(report, report_path)
                return report

            external = model_io.wants_external_data(info, info.tensor_bytes)
            # the check that will run: the whole-model ones read the output back (worth keeping it in
            # the page cache); the subgraph check takes the folded weights' sampled columns as written
            check = None if not (verify and modified) else (
                "quantized" if dequantized is not None else "onnxruntime" if fusions
                else _verify_mode_for(verify_mode, info))
            kept = {} if check and "subgraph" in check else None
            read_back = check in ("quantized", "onnxruntime")
            copied: dict = {}  # what the streamed writer copied unchanged, and from where (the plan-diff check)
            staged = model_io.write_atomic(
                ir_model, target, external, progress=(lambda i, n: progress("write", i, n)) if progress else None,
                keep_samples=kept, read_back=read_back, copied=copied,
            )
        except DeferredFoldRefused as e:
            # the overflow check rode on the write (each weight read once) and found g*w beyond the
            # weight's dtype: the staged output is gone; plan again with that norm skipped
            if e.key in refused:
                raise
            refused[e.key] = e.reason
            continue
        break
    if refused:
        report.notes.append(f"{len(refused)} norm(s) found not representable while writing (the overflow check "
                            "reads each weight as it is written): written again without folding them")
    del ir_model  # the staged file is what gets verified and published
    try:
        if dequantized is not None:
            _check_int4_weights(report, getattr(report, "requantize_stats", None), report_path)
        if not verify:
            report.verification = VerificationResult(method="skipped", passed=True, message="--no-verify")
        elif not modified:
            report.verification = VerificationResult(method="skipped", passed=True, message="nothing changed")
        elif dequantized is not None:
            report.verification = _verify_quantized(info, staged.model_path,
                                                    dict(dims=dims, verify_timeout=verify_timeout, vocab=vocab))
        else:
            report.verification = _verify("onnxruntime" if fusions else verify_mode, info, staged.model_path,
                                          result, dims, vocab, rtol, verify_timeout, kept)
            if not fusions:
                # the output is the input plus the plan, and nothing else (--for-ort rewrites more than
                # the plan: there the whole-model run is the check)
                from flashnorm_onnx.verify_plan import check_plan, declaration

                plan_check = check_plan(info.path, staged.model_path, declaration(result), copied)
                report.verification = with_plan(report.verification, plan_check)
        problem = check_model(staged.model_path)
        if problem is not None:
            if check_model(info.path) is None:
                report.verification = VerificationResult(
                    method="onnx.checker", passed=False, message=f"the output fails onnx.checker: {problem}"
                )
            else:
                report.notes.append(f"onnx.checker rejects the input model too ({problem}); not a new problem")
        else:
            report.notes.append("onnx.checker: output passes")
        if report.verification is not None and not report.verification.passed:
            report.notes.append("verification failed: no output written")
            _write_report(report, report_path)
            raise VerificationFailed(
                f"verification failed: {report.verification.message}; no output written", report=report
            )
        return _publish(report, staged, target, report_path, publish_output)
    except BaseException:
        staged.abandon()
        raise


def _requantize(model: ir.Model, dequantized, report: FoldReport, result) -> None:
    """``--requantize`` after the fold: quantize the folded weights again (see :mod:`quantize`)."""
    from flashnorm_onnx.quantize import RequantizeInconsistent, requantize_after_fold

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


def _fuse(info: model_io.InputInfo, model: ir.Model, verify: bool, verify_mode: str):
    """``--for-ort``: (model, fusions applied, note). A failure reloads the model, unfused."""
    from flashnorm_onnx.errors import VerificationUnavailable
    from flashnorm_onnx.fusions import (
        FusionFailed,
        fuse_for_ort,
        fuse_light,
        new_ops,
        ort_transformers_optimizer,
        written_by_dynamo,
    )

    if verify and verify_mode in ("subgraph", "algebraic"):
        raise VerificationUnavailable(
            f"--for-ort rewrites more than the norms, which --verify {verify_mode} cannot see; "
            "use --verify onnxruntime (the default for models that fit in memory)")
    if verify and verify_mode == "auto" and not _fits_in_memory(info):
        raise VerificationUnavailable(
            "--for-ort is checked by running both whole models in ONNX Runtime, and this model is too "
            "large for that here; fold without --for-ort (checked piece by piece), or --no-verify")
    if not written_by_dynamo(model):
        # the legacy exporter, optimum, the genai builder: ORT's transformers optimizer knows those
        try:
            optimized = ort_transformers_optimizer(info.path)
            counts = {f"ort_transformers_optimizer:{op}": n for op, n in new_ops(model, optimized).items()}
            return optimized, {**counts, **fuse_light(optimized)}, ""
        except FusionFailed as e:
            note = f"ORT's transformers optimizer failed ({e}); used onnxscript's fusions"
            model = model_io.load(info)
    else:
        note = ""
    try:
        fused, counts = fuse_for_ort(model)
    except FusionFailed as e:
        return model_io.load(info), {}, f"ORT fusions failed ({e}); folded without them"
    return fused, counts, note


def _verify_mode_for(mode: str, info: model_io.InputInfo) -> str:
    """The check ``mode`` runs for this input: ``auto`` picks by size (see :data:`VERIFY_MODES`)."""
    if mode == "auto":
        return "onnxruntime" if _fits_in_memory(info) else "subgraph+algebraic"
    return mode


def _verify(mode: str, info: model_io.InputInfo, output: Path, result, dims, vocab, rtol, timeout,
            kept: dict | None = None) -> VerificationResult:
    """Run the requested check (``kept``: the sampled columns the writer kept, for the subgraph check)."""
    mode = _verify_mode_for(mode, info)
    if mode == "onnxruntime":
        from flashnorm_onnx.verify import compare_models

        all_dims = {**dims_from_configs(info.path), **(dims or {})}
        return compare_models(info.path, output, dims=all_dims, vocab=vocab, rtol=rtol, timeout=timeout)
    checks = []
    if "subgraph" in mode and len(result.sites) < result.report.folded:
        from flashnorm_onnx.errors import VerificationUnavailable

        raise VerificationUnavailable(
            f"{result.report.folded - len(result.sites)} folded norm(s) read or write values without names, "
            "which the subgraph check cannot find in the files; use --verify onnxruntime"
        )
    from flashnorm_onnx.verify_subgraph import ModelFile

    reference, written = ModelFile(info.path), ModelFile(output, kept)  # parsed once for every check below
    if "subgraph" in mode:
        from flashnorm_onnx.verify_subgraph import check_sites

        checks.append(check_sites(result.sites, reference, written, rtol=rtol, timeout=timeout))
    if "algebraic" in mode:
        from flashnorm_onnx.verify_algebraic import check_folds, check_structure

        checks.append(check_folds(result.folds, written))
        checks.append(check_structure(result.sites, reference, written))
    verification = checks[0] if len(checks) == 1 else combine(checks)
    if mode == "subgraph+algebraic":
        verification.message = (
            "the model is too large to run twice in memory: ran every rewritten norm and linear "
            "in ONNX Runtime against the input's, and checked each folded tensor's algebra"
        ) + (f"; {verification.message}" if verification.message else "")
    return verification


def combine(checks: list[VerificationResult]) -> VerificationResult:
    """One result from several checks: passed when all passed."""
    out = VerificationResult(method="+".join(c.method for c in checks), passed=all(c.passed for c in checks))
    for c in checks:
        out.outputs += c.outputs
        out.cases += c.cases
        out.tolerance = max(out.tolerance, c.tolerance)
    out.message = "; ".join(f"{c.method}: {c.message}" for c in checks if c.message and not c.passed)
    return out


def with_plan(verification: VerificationResult, plan: VerificationResult) -> VerificationResult:
    """``verification`` (``method+plan``) with the plan-diff check's verdict, failures and counts."""
    verification.method += "+" + plan.method
    verification.outputs += plan.outputs
    verification.details += plan.details
    if not plan.passed:
        others = verification.message if not verification.passed else ""
        verification.passed = False
        verification.message = "; ".join(m for m in (f"{plan.method}: {plan.message}", others) if m)
    return verification


def _has_16bit_floats(model) -> bool:
    low = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
    graph = model.graph
    values = list(graph.inputs) + list(graph.outputs) + list(graph.initializers.values())
    return any(v.dtype in low for v in values) or any(
        n.op_type == "Cast" and n.attributes.get("to") is not None and n.attributes["to"].value in low
        for n in graph
    )


def _fits_in_memory(info: model_io.InputInfo) -> bool:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return True
    return 2 * info.tensor_bytes < VERIFY_MEMORY_FRACTION * total


def _write_report(report: FoldReport, path: str | os.PathLike | None) -> None:
    if path is not None:
        model_io.write_report(report, path)
