"""The report a user reads: the fold's decisions (``passes.decisions``), its verification, notes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from flashnorm_onnx.passes.decisions import ConsumerRecord, FoldDecisions, NormDecision, Status, fmt_bytes  # noqa: F401 - the report's records
from flashnorm_onnx.verify.result import VerificationResult

@dataclasses.dataclass
class FoldReport(FoldDecisions):
    """The fold's decisions with what the run made of them: verification, notes, output."""

    model: str = ""
    output: str = ""
    verification: VerificationResult | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    fusions: dict[str, int] | None = None
    """``--for-ort``: onnxscript's ORT fusions applied before the fold, by name (None: not asked)."""
    quantization: dict[str, Any] | None = None
    """``--quantize`` / ``--requantize``: what was quantized, how, and the per-weight errors."""
    quant_verification: VerificationResult | None = None
    """``--quantize`` / ``--requantize``: the quantized output against the input, measured as
    quantization error (``verification`` stays the fold's own check)."""
    staged: Any = dataclasses.field(default=None, repr=False, compare=False)
    """The verified output while it is still staged (``publish_output=False``): the caller commits
    or abandons it. Not part of the JSON report."""
    requantize_stats: Any = dataclasses.field(default=None, repr=False, compare=False)
    """``--requantize``: the per-weight measures of the weights quantized again."""

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "output": self.output,
            "summary": self.summary(),
            "ort_fusions": self.fusions,
            "quantization": self.quantization,
            "quantized_verification": dataclasses.asdict(self.quant_verification) if self.quant_verification else None,
            "norms": [dataclasses.asdict(d) for d in self.decisions],
            "verification": dataclasses.asdict(self.verification) if self.verification else None,
            "notes": self.notes,
        }

    def write_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")

    def text(self, planned: bool = False) -> str:
        lines = [d.line(planned) for d in self.decisions]
        if self.fusions is not None:
            from flashnorm_onnx.fusions.ort import describe

            lines.append(describe(self.fusions))
        lines.append(self.summary_line(planned))
        # "wrote ..." last: the output is published only after the verification passed
        wrote = [n for n in self.notes if n.startswith("wrote ")]
        lines += [n for n in self.notes if not n.startswith("wrote ")]
        if self.verification is not None:
            lines += self.verification.lines()
        if self.quantization is not None:
            lines += quantization_lines(self.quantization)
        if self.quant_verification is not None:
            lines += self.quant_verification.lines()
        lines += wrote
        return "\n".join(lines)


def quantization_lines(q: dict[str, Any]) -> list[str]:
    """The report's lines on ``--quantize`` / ``--requantize`` (``q``: FoldReport.quantization)."""
    lines = [f"quantization ({q['mode']}): {q['spec']}; {q['summary']}"]
    if q.get("reason"):
        lines.append(f"  {q['reason']}")
    errors = q.get("weight_errors") or {}
    if errors:
        worst = max(errors, key=errors.get)
        mean = sum(errors.values()) / len(errors)
        lines.append(f"  weight error ||W_int4 - W|| / ||W||: mean {mean:.3e}, worst {errors[worst]:.3e} ({worst})")
    if q.get("left_float"):
        names = q["left_float"]
        lines.append(f"  left in float ({len(names)}): " + ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))
    return lines
