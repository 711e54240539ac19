"""The Python API: ``optimize`` and ``inspect``.

The data flow, end to end::

    check input -> load (lazy) -> find norms and their readers -> decide -> fold
        -> write to a staging folder -> verify in ONNX Runtime -> move into place

Nothing is written next to the input unless verification passed.
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
    result = FlashNormFoldPass(untie=untie, keep_structure=keep_structure)(ir_model)
    report = result.report
    report.model = str(info.path)
    return report


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
    progress: Callable[[str, int, int], None] | None = None,
) -> FoldReport:
    """Fold every foldable normalization of ``model`` and write the result to ``output``.

    ``verify_mode``: "auto" (ONNX Runtime comparison when both models fit comfortably in
    memory, else the algebraic check of every folded tensor), "onnxruntime" or "algebraic".

    Returns the report. Raises :class:`~flashnorm_onnx.errors.FlashNormError` subclasses for
    bad input, unwritable output and failed verification (nothing is written then).
    """
    info = model_io.check_input(model)
    model_io.check_report_path(report_path, info)
    folder_mode = Path(model).is_dir() and not in_place
    if folder_mode:
        # A model folder (onnxruntime-genai builder, optimum): the output is a folder too.
        if output is None:
            raise model_io.OutputPathError("the input is a folder: name an output folder with -o")
        out_dir = Path(output)
        if out_dir.exists() and not out_dir.is_dir():
            raise model_io.OutputPathError(f"{out_dir}: the input is a folder, so the output must be a folder")
        if out_dir.resolve() == info.path.parent.resolve():
            raise model_io.OutputPathError(f"{out_dir}: output folder is the input folder; choose another")
        target = model_io.check_output(out_dir / info.path.name, info)
    elif in_place:
        target = model_io.check_output(output or info.path, info, in_place=True)
    else:
        target = model_io.check_output(output or model_io.default_output_path(info.path), info)
    ir_model = model_io.load(info)
    vocab = vocab_sizes(ir_model)
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
    result = fold(ir_model)
    report = result.report
    report.model = str(info.path)
    if not result.modified and not force_write:
        if not report.decisions:
            report.notes.append("no normalization found in the model")
        report.notes.append("nothing to fold: no output written (use --force-write to write it anyway)")
        report.verification = VerificationResult(method="skipped", passed=True, message="nothing changed")
        _write_report(report, report_path)
        return report

    external = model_io.wants_external_data(info, info.tensor_bytes)
    staged = model_io.write_atomic(
        ir_model, target, external, progress=(lambda i, n: progress("write", i, n)) if progress else None
    )
    try:
        if not verify:
            report.verification = VerificationResult(method="skipped", passed=True, message="--no-verify")
        elif not result.modified:
            report.verification = VerificationResult(method="skipped", passed=True, message="nothing changed")
        elif verify_mode == "algebraic" or (verify_mode == "auto" and not _fits_in_memory(info)):
            from flashnorm_onnx.verify_algebraic import check_folds

            report.verification = check_folds(result.folds, staged.model_path)
            if verify_mode == "auto":
                report.verification.message = (
                    "the model is too large to run twice in memory: checked each folded tensor's algebra "
                    "instead of an ONNX Runtime comparison"
                ) + (f"; {report.verification.message}" if report.verification.message else "")
        else:
            from flashnorm_onnx.verify import compare_models

            all_dims = {**dims_from_configs(info.path), **(dims or {})}
            report.verification = compare_models(
                info.path, staged.model_path, dims=all_dims, vocab=vocab, rtol=rtol
            )
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
        written = staged.commit()
    except BaseException:
        staged.abandon()
        raise
    finally:
        staged.discard()
    if folder_mode:
        written += _copy_companions(info, target.parent)
    report.output = str(target)
    report.notes.append("wrote " + ", ".join(str(p) for p in written))
    _write_report(report, report_path)
    return report


def _has_16bit_floats(model) -> bool:
    low = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
    graph = model.graph
    values = list(graph.inputs) + list(graph.outputs) + list(graph.initializers.values())
    return any(v.dtype in low for v in values) or any(
        n.op_type == "Cast" and n.attributes.get("to") is not None and n.attributes["to"].value in low
        for n in graph
    )


def _copy_companions(info: model_io.InputInfo, out_dir: Path) -> list[Path]:
    """Copy what a runtime needs beside the model (genai_config.json, tokenizer, config)."""
    import shutil

    skip = {info.path.resolve(), *info.data_files}
    copied = []
    for item in sorted(info.path.parent.iterdir()):
        if item.resolve() in skip or item.name.startswith(".") or item.suffix == ".onnx":
            continue
        dest = out_dir / item.name
        if item.is_dir():
            shutil.copytree(item, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dest)
        copied.append(dest)
    return copied


def _fits_in_memory(info: model_io.InputInfo) -> bool:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return True
    return 2 * info.tensor_bytes < VERIFY_MEMORY_FRACTION * total


def _write_report(report: FoldReport, path: str | os.PathLike | None) -> None:
    if path is not None:
        model_io.write_report(report, path)
