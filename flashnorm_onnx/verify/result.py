"""The record every check returns: its method, verdict, compared outputs and cases; and how
several checks combine into one verdict."""

from __future__ import annotations

import dataclasses
from typing import Any

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
    case_inputs: dict[str, dict[str, list[int]]] = dataclasses.field(default_factory=dict)
    """The inputs' shapes of each case that ran, by case name (what its line is printed from)."""
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
        from flashnorm_onnx.verify.case_text import case_line

        for case in self.cases:
            # inputs grouped by name and shape (a KV cache: 2 inputs per layer) to fit a terminal
            name = case.partition(": ")[0]
            shapes = self.case_inputs.get(name)
            ran = shapes is not None and case == case_line(name, shapes, width=len(case))  # not a note about it
            out.append(f"  case: {case_line(name, shapes) if ran else case}")
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

def failed_entry(case: str, name: str) -> dict:
    """A comparison entry for something that could not be compared (it counts as a failure)."""
    return {"case": case, "name": name, "max_abs": float("inf"), "max_rel": float("inf"), "argmax_agreement": None,
            "ok": False, "rtol": 0.0, "dtype": "", "shape": []}

def combine(checks: list[VerificationResult]) -> VerificationResult:
    """One result from several checks: passed when all passed."""
    out = VerificationResult(method="+".join(c.method for c in checks), passed=all(c.passed for c in checks))
    for c in checks:
        out.outputs += c.outputs
        out.cases += c.cases
        out.case_inputs.update(c.case_inputs)
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
