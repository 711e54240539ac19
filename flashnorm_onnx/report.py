"""The report a user reads: the fold's decisions (``passes.decisions``), its verification, notes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from flashnorm_onnx.passes.decisions import ConsumerRecord, FoldDecisions, NormDecision, Status, fmt_bytes  # noqa: F401

#: What each verification method establishes, printed under its verdict (README: "Verification").
PROVES = {
    "onnxruntime": "the whole output model computes the input's outputs on the generated inputs",
    "subgraph": "each rewritten norm and each of its linears, cut out of the written file and run in ONNX Runtime, "
                "equals the input's (y_in == y_out*g + beta, z_in(d*g + beta) == z_out(d)), and is wired the same",
    "algebraic": "each folded tensor as written equals diag(g)·B (arithmetic only; the graph is not run)",
    "onnxruntime-quantized": "the int4 output model, run on the generated inputs, stays close to the float "
                             "input model (relative error, cosine similarity, argmax agreement of logits)",
    "plan": "the output is the input plus the fold's plan: every other node, initializer, graph input and output, "
            "opset, function and metadata entry is the input's, and every tensor the fold wrote and every weightless "
            "norm is read only by the linears it declares (or a Shape)",
    "structure": "each folded norm is weightless in the output and read by its linears; moved LayerNorm biases "
                 "equal beta @ B",
}


@dataclasses.dataclass
class VerificationResult:
    method: str
    """'onnxruntime' (both models run on generated inputs), 'algebraic' (each folded tensor
    checked on random vectors) or 'skipped'."""
    passed: bool
    tolerance: float = 0.0
    outputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    cases: list[str] = dataclasses.field(default_factory=list)
    message: str = ""
    details: list[str] = dataclasses.field(default_factory=list)
    """What a check counted (the plan-diff's nodes, initializers and readers), one line each."""

    def lines(self) -> list[str]:
        if self.method == "skipped":
            return [f"verification: skipped ({self.message})" if self.message else "verification: skipped"]
        verdict = "PASSED" if self.passed else "FAILED"
        out = [f"verification ({self.method}): {verdict}" + (f" - {self.message}" if self.message else "")]
        for part in self.method.split("+"):
            if part in PROVES:
                out.append(f"  checks ({part}): {PROVES[part]}")
        from flashnorm_onnx.inputs import summarize_case

        for case in self.cases:
            # inputs grouped by name and shape (a KV cache: 2 inputs per layer) to fit a terminal
            out.append(f"  case: {summarize_case(case)}")
        out += [f"  {line}" for line in self.details]
        shown = self.outputs
        if len(shown) > 8:
            # logits first, then the worst of the rest
            key = lambda o: (0 if "logit" in o["name"].lower() else 1, -o["max_rel"])  # noqa: E731
            shown = sorted(shown, key=key)[:6]
        for o in shown:
            if "cosine" in o:  # a quantized model against the float one
                s = f"  {o['case']:<10s} {o['name']:<28s} rel err {o['rel_err']:.3e}  cosine {o['cosine']:.4f}"
            else:
                s = (
                    f"  {o['case']:<10s} {o['name']:<28s} max|abs err| {o['max_abs']:.3e}  "
                    f"max rel err {o['max_rel']:.3e}"
                )
            if o.get("argmax_agreement") is not None:
                s += f"  argmax agree {100 * o['argmax_agreement']:.1f}%"
            out.append(s)
        if len(shown) < len(self.outputs):
            ok = sum(o["ok"] for o in self.outputs)
            out.append(f"  ... {len(self.outputs) - len(shown)} more outputs ({ok}/{len(self.outputs)} within tolerance)")
        return out


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
            from flashnorm_onnx.fusions import describe

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
