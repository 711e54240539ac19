"""What the fold's plan says it changed, by names in the input and output files: each rewritten
norm, each linear reading it, and every tensor written (with the scale folded into it). The
plan-diff (:mod:`flashnorm_onnx.verify.plan`) holds the output to it, and only to it."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class NormEdit:
    name: str
    inputs: list[str]
    before: str
    after: str
    g: np.ndarray | None = None


@dataclasses.dataclass
class LinearEdit:
    norm: str
    data: str
    linear_before: str
    linear_after: str
    result_before: str
    result_after: str


@dataclasses.dataclass
class Declaration:
    """What the plan says it changed, by names in the two files."""

    norms: list[NormEdit]
    linears: list[LinearEdit]
    written: dict[str, str]
    """tensor name in the output -> the input constant it was computed from ("": a new bias)."""
    scales: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """written weight -> the scale folded into it (each linear must read its own norm's)."""


def declaration(result) -> Declaration:
    """The declaration of a ``FlashNormPassResult`` (its sites and the tensors it wrote)."""
    norms, linears = [], []
    for site in result.sites:
        norms.append(NormEdit(site.norm, list(site.inputs), site.output_before, site.output_after_name, site.g))
        for r in site.readers:
            linears.append(LinearEdit(site.norm, r.data, r.linear_before, r.linear_after,
                                      r.result_before, r.result_after_name))
    return Declaration(norms, linears, dict(result.written), dict(getattr(result, "scales", {}) or {}))
