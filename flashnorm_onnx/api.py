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
from flashnorm_onnx.report import FoldReport, VerificationResult

logger = logging.getLogger(__name__)

#: Run ORT verification only when both models fit comfortably in memory.
VERIFY_MEMORY_FRACTION = 0.25


def inspect(model: str | os.PathLike, *, untie: bool = True, keep_structure: bool = False) -> FoldReport:
    """Analyse a model: what would be folded and what skipped, and why. Writes nothing."""
    info = model_io.check_input(model)
    ir_model = model_io.load(info)
    restore = infer_shapes(ir_model)
    result = FlashNormFoldPass(untie=untie, keep_structure=keep_structure)(ir_model)
    restore()
    report = result.report
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
):
    """Fold every foldable normalization of ``model`` and write the result to ``output``.

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
    options = dict(untie=untie, keep_structure=keep_structure, verify=verify, verify_mode=verify_mode, dims=dims,
                   rtol=rtol, force_write=force_write, verify_timeout=verify_timeout, progress=progress,
                   for_ort=for_ort)
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


def optimize_file(
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
) -> FoldReport:
    """One checked input model to one checked output path: load -> fold -> stage -> verify -> publish.

    With ``publish_output=False`` the verified output stays staged: the report's ``staged``
    attribute holds it, for the caller to ``commit()`` or ``abandon()``."""
    ir_model = model_io.load(info)
    vocab = vocab_sizes(ir_model)
    fusions = None
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
    )
    restore = infer_shapes(ir_model)
    result = fold(ir_model)
    restore()
    report = result.report
    report.model = str(info.path)
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
                report = result.report
                report.model = str(info.path)
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
    staged = model_io.write_atomic(
        ir_model, target, external, progress=(lambda i, n: progress("write", i, n)) if progress else None
    )
    del ir_model  # the staged file is what gets verified and published
    try:
        if not verify:
            report.verification = VerificationResult(method="skipped", passed=True, message="--no-verify")
        elif not modified:
            report.verification = VerificationResult(method="skipped", passed=True, message="nothing changed")
        else:
            report.verification = _verify("onnxruntime" if fusions else verify_mode, info, staged.model_path,
                                          result, dims, vocab, rtol, verify_timeout)
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
        if not publish_output:
            report.staged = staged
            return report

        def before_publish(paths: list[Path]) -> None:
            report.output = str(target)
            report.notes.append("wrote " + ", ".join(str(p) for p in paths))
            _write_report(report, report_path)

        staged.commit(before_publish)
    except BaseException:
        staged.abandon()
        raise
    return report


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


def _verify(mode: str, info: model_io.InputInfo, output: Path, result, dims, vocab, rtol, timeout) -> VerificationResult:
    """Run the requested check; ``auto`` picks by size (see :data:`VERIFY_MODES`)."""
    if mode == "auto":
        mode = "onnxruntime" if _fits_in_memory(info) else "subgraph+algebraic"
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

    reference, written = ModelFile(info.path), ModelFile(output)  # parsed once for every check below
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
