"""The report a user reads: the fold's decisions (``passes.decisions``), its verification, notes;
for a folder (:class:`FolderReport`), one such report per model and their totals."""

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


@dataclasses.dataclass
class FolderReport:
    """The reports of every model of a folder, usable like one :class:`FoldReport`."""

    model: str = ""
    output: str = ""
    models: dict[str, FoldReport] = dataclasses.field(default_factory=dict)
    """Relative path of each model in the folder -> its report."""
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def decisions(self) -> list[NormDecision]:
        return [d for r in self.models.values() for d in r.decisions]

    @property
    def folded(self) -> int:
        return sum(r.folded for r in self.models.values())

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.models.values())

    @property
    def already(self) -> int:
        return sum(r.already for r in self.models.values())

    @property
    def tensors_written(self) -> int:
        return sum(r.tensors_written for r in self.models.values())

    @property
    def bytes_added(self) -> int:
        return sum(r.bytes_added for r in self.models.values())

    @property
    def bytes_rewritten(self) -> int:
        return sum(r.bytes_rewritten for r in self.models.values())

    @property
    def verification(self) -> VerificationResult | None:
        """One result for the folder: passed iff every model's verification passed."""
        named = [(rel, r.verification) for rel, r in self.models.items() if r.verification is not None]
        if not named:
            return None
        if len(self.models) == 1:
            return named[0][1]
        from flashnorm_onnx.verify.result import combine

        out = combine([v for _, v in named])
        out.method = "+".join(dict.fromkeys(v.method for _, v in named))
        out.message = "; ".join(f"{rel}: {v.message}" for rel, v in named if v.message and not v.passed)
        return out

    def _totals(self) -> FoldReport:
        return FoldReport(decisions=self.decisions)

    def summary(self) -> dict[str, Any]:
        return {"models": len(self.models), **self._totals().summary()}

    def summary_line(self, planned: bool = False) -> str:
        n = len(self.models)
        line = f"{n} model{'s' if n != 1 else ''}: {self._totals().summary_line(planned)}"
        kept = self._kept_all()
        if kept and n > 1:
            line += f"; {'would fold' if planned else 'folded'} nothing in " + ", ".join(kept[:3]) \
                + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
        verification = self.verification
        if verification is not None:
            verdict = "skipped" if verification.method == "skipped" else ("PASSED" if verification.passed else "FAILED")
            line += f"; verification {verdict}"
        quantized = [r.quant_verification for r in self.models.values() if r.quant_verification is not None]
        if quantized:
            run = [v for v in quantized if v.method != "skipped"]
            verdict = "skipped" if not run else ("PASSED" if all(v.passed for v in run) else "FAILED")
            line += f"; int4 check {verdict}"
        return line

    def _kept_all(self) -> list[str]:
        """The models in which nothing was folded, each with why in a few words: so a folder's
        total never reads as if every model were folded."""
        kept = []
        for rel, r in self.models.items():
            if r.folded or r.quantization:
                continue
            if not r.decisions:
                why = "no norm found"
            elif r.skipped:
                why = f"{r.skipped} norm{'s' if r.skipped != 1 else ''} skipped"
            else:
                why = "already weightless"
            kept.append(f"{rel} ({why})")
        return kept

    def text(self, planned: bool = False) -> str:
        lines = []
        for rel, r in self.models.items():
            lines.append(f"== {rel}")
            lines.append(r.text(planned))
        if self.notes:
            lines.append(f"== folder {self.model}")
            lines += self.notes
        lines.append(self.summary_line(planned))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        verification = self.verification
        return {
            "model": self.model,
            "output": self.output,
            "summary": self.summary(),
            "models": {rel: r.to_json() for rel, r in self.models.items()},
            "verification": dataclasses.asdict(verification) if verification else None,
            "notes": self.notes,
        }

    write_json = FoldReport.write_json  # the same JSON file, of this report's to_json()


# -- what the folder holds -------------------------------------------------------------------------
