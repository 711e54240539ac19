"""Which check a run gets: by the mode asked for, what the run rewrote, and the model's size."""

from __future__ import annotations

import os

#: ``--verify`` choices: what each proves is in docs/verification.md.
VERIFY_MODES = ("auto", "onnxruntime", "subgraph", "algebraic")

#: Run both whole models in ONNX Runtime only when twice the weights fit in this part of memory.
VERIFY_MEMORY_FRACTION = 0.25


def fits_in_memory(tensor_bytes: int) -> bool:
    """Whether both models (``tensor_bytes`` of weights each) fit comfortably in this machine's memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return True
    return 2 * tensor_bytes < VERIFY_MEMORY_FRACTION * total


def check_for(mode: str, tensor_bytes: int, *, fused: bool = False, requantized: bool = False) -> str:
    """The check that runs on a rewritten model: ``quantized`` (``--requantize``: quantization's
    measures), ``onnxruntime`` (the whole models; always after ``--for-ort`` fusions, which rewrite
    more than the fold), or ``mode`` itself, ``auto`` choosing by size. The plan-diff check runs
    beside every one of them but ``quantized`` and the fused ``onnxruntime`` (see :func:`plan_diff_applies`)."""
    if requantized:
        return "quantized"
    if fused:
        return "onnxruntime"
    if mode == "auto":
        return "onnxruntime" if fits_in_memory(tensor_bytes) else "subgraph+algebraic"
    return mode


def plan_diff_applies(*, fused: bool, requantized: bool) -> bool:
    """The plan-diff check holds the output to the input plus the fold's plan: not after fusions or a
    requantization, which rewrite more than the plan declares (the whole-model run checks those)."""
    return not fused and not requantized


def reads_back(check: str | None) -> bool:
    """Whether the check reads the whole output back (so the writer keeps it in the page cache)."""
    return check in ("quantized", "onnxruntime")


def keeps_samples(check: str | None) -> bool:
    """Whether the subgraph check runs, taking the folded weights' sampled columns from the writer."""
    return bool(check) and "subgraph" in check
