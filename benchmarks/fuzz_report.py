"""Run the long differential-fuzzing campaign and write benchmarks/RESULTS_fuzz.md.

    FLASHNORM_FUZZ_EXAMPLES=2000 python -m benchmarks.fuzz_report     # what `make fuzz` runs

Runs tests/test_passes_fuzz.py with a fresh random seed (FLASHNORM_FUZZ_RANDOM=1), collects one
outcome per example (FLASHNORM_FUZZ_STATS) and summarises them. Exits with pytest's status.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS_fuzz.md"


def _reason_class(reason: str) -> str:
    if "graph output" in reason:
        return "norm output is a graph output"
    if "graph input" in reason:
        return "weight is a graph input"
    if "not a linear layer" in reason:
        return "non-linear reader"
    if "last axis" in reason:
        return "not over the last axis"
    return reason[:80]


def main() -> int:
    examples = int(os.environ.get("FLASHNORM_FUZZ_EXAMPLES", "2000"))
    with tempfile.TemporaryDirectory(prefix="flashnorm-fuzz-") as tmp:
        stats = Path(tmp) / "stats.jsonl"
        env = dict(os.environ, FLASHNORM_FUZZ_EXAMPLES=str(examples), FLASHNORM_FUZZ_STATS=str(stats),
                   FLASHNORM_FUZZ_RANDOM="1")
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "tests/test_passes_fuzz.py", "-p", "no:cacheprovider"],
            cwd=ROOT, env=env, capture_output=True, text=True,
        )
        elapsed = time.perf_counter() - start
        sys.stdout.write(proc.stdout[-4000:])
        sys.stderr.write(proc.stderr[-4000:])
        rows = [json.loads(line) for line in stats.read_text().splitlines()] if stats.exists() else []

    import hypothesis
    import onnx
    import onnx_ir
    import onnxruntime

    status = collections.Counter(r["status"] for r in rows)
    by_form: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rows:
        by_form[r["spec"]["form"] + (" fp16" if r["spec"]["fp16"] else " fp32")][r["status"]] += 1
    reasons = collections.Counter(_reason_class(r["reason"]) for r in rows if r["status"] == "skipped")
    blocking = [r for r in rows if {"nonlinear", "graph_output", "weight_input"} & set(r["spec"]["extras"])]
    folded = [r for r in rows if r["status"] == "folded"]
    worst32 = max((r["max_rel_err"] for r in folded if not _low(r)), default=0.0)
    worst16 = max((r["max_rel_err"] for r in folded if _low(r)), default=0.0)
    tail = [line for line in proc.stdout.strip().splitlines() if line.strip()][-1:] or ["(no output)"]

    lines = [
        "# Differential fuzzing: results of the last `make fuzz`",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- examples requested: {examples} (FLASHNORM_FUZZ_EXAMPLES), random seed; "
        f"examples checked: {len(rows)} (including the fixed blocking-reader cases)",
        f"- result: **{'PASSED' if proc.returncode == 0 else 'FAILED'}** — pytest: `{tail[0]}`",
        f"- wall time: {elapsed:.0f} s",
        f"- versions: python {platform.python_version()}, onnx {onnx.__version__}, onnx-ir {onnx_ir.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, hypothesis {hypothesis.__version__}",
        "",
        "Each example: one random normalization (form, float32/float16, epsilon, axis, rank 2-4, scale "
        "random / ones / signed with a zero, LayerNorm bias random / zero) read by 1-3 linear layers "
        "(MatMul, Transpose(W), Gemm with alpha/beta, Gemm transB, Cast -> MatMul, MatMul(Cast(W)), shared "
        "weight, tied embedding, MatMul + bias), with up to two extras (non-linear reader, norm output as "
        "graph output, Shape reader, weight as graph input, a second norm sharing the weight); inline or "
        "external data. Checked: the pass never crashes, every norm is folded / skipped with a reason / "
        "already weightless, non-foldable norms are skipped, the folded model equals the input in "
        "ONNX Runtime on independent inputs, `flashnorm_onnx.optimize` verifies and writes only when "
        "something was folded, the input's files are byte-identical afterwards.",
        "",
        "| outcome | examples |",
        "|---|---:|",
        *(f"| {k} | {v} |" for k, v in sorted(status.items())),
        "",
        f"Built to be non-foldable (non-linear reader, graph output, weight input): {len(blocking)}, "
        f"of which folded: {sum(1 for r in blocking if r['status'] == 'folded')}.",
        "",
        f"Worst relative error of a folded model (max|a-b| / max|a| over all outputs): "
        f"{worst32:.2e} in float32-only models, {worst16:.2e} in models with 16-bit floats.",
        "",
        "| skip reason | examples |",
        "|---|---:|",
        *(f"| {k} | {v} |" for k, v in reasons.most_common()),
        "",
        "| form, dtype | folded | skipped | already weightless |",
        "|---|---:|---:|---:|",
        *(f"| {k} | {c['folded']} | {c['skipped']} | {c['already-weightless']} |" for k, c in sorted(by_form.items())),
        "",
    ]
    if proc.returncode != 0:
        lines += ["## Failure", "", "```", proc.stdout[-3000:], "```", ""]
    RESULTS.write_text("\n".join(lines))
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return proc.returncode


def _low(row: dict) -> bool:
    spec = row["spec"]
    return spec["fp16"] or bool({"cast_matmul", "matmul_castw"} & set(spec["consumers"]))


if __name__ == "__main__":
    sys.exit(main())
