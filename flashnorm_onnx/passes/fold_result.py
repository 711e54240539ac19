"""What :class:`~flashnorm_onnx.passes.flashnorm_fold.FlashNormFoldPass` returns: the decisions,
the weights it produced (to re-check their algebra), the sites where each folded norm's function
can be re-run alone, and the declaration of every tensor it wrote -- what the verification holds
the output to (:mod:`flashnorm_onnx.verify`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from flashnorm_onnx.passes.decisions import FoldDecisions


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
    result_after_name: str = ""
    """``result_after``'s qualified name, taken when it was written."""


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
    scope: str = ""
    """The graph the norm is in, as a prefix (:mod:`~flashnorm_onnx.passes.scopes`); every name
    here is qualified the same way (values of an outer graph by the outer graph's prefix)."""
    output_after_name: str = ""
    """``output_after``'s qualified name, taken when it was written."""


@dataclasses.dataclass
class FlashNormPassResult(ir.passes.PassResult):
    report: FoldDecisions = dataclasses.field(default_factory=FoldDecisions)
    folds: list[FoldRecord] = dataclasses.field(default_factory=list)
    sites: list[RewriteSite] = dataclasses.field(default_factory=list)
    written: dict[str, str] = dataclasses.field(default_factory=dict)
    """Every tensor the fold wrote, by its name in the output -> the name of the constant it was
    computed from in the input ("" for a new LayerNorm bias). The same name on both sides: written
    in place. What the plan-diff check (verify_plan) holds the output to."""
    scales: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """Every weight the fold wrote (by its name in the output) -> the scale g folded into it: the
    plan-diff check holds each linear to reading a weight folded with its own norm's scale, and
    the algebraic check reads each tensor back against this g."""
