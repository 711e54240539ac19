"""Latency matrix: the fold and fold + ORT fusions against what users would otherwise ship.

``make bench`` runs ``python -m benchmarks.run_latency`` and writes ``benchmarks/RESULTS.md``
and one JSON report per comparison under ``benchmarks/results/``.

Models: a tiny Llama (models.fixtures, random weights) and SmolLM2-135M-Instruct (real weights,
models.smollm2), in the export forms dynamo (default opset), dynamo opset 23, legacy
TorchScript, optimum with KV cache, ORT transformers optimizer, genai builder (fp32). For each
export X the variants are:

* ``export``: X itself;
* ``fold``: ``flashnorm-onnx optimize X``;
* ``for-ort``: ``flashnorm-onnx optimize --for-ort X`` (exact ORT fusions, then the fold);
* ``ort-opt``: ORT's transformers optimizer on X (model_type gpt2, opt_level 0), what such a
  user runs today;
* ``onnxscript``: onnxscript's ``optimize_for_ort`` on X, as shipped (with its GQA fusion,
  which ignores the attention mask: a reference point, not an equivalent model);
* ``no-norm``: X with every norm replaced by identity (a WRONG function: the lower bound of
  what removing norm work could save).

Comparisons (B vs A): fold/export, for-ort/export, for-ort/ort-opt for every form; also
for-ort/fold, onnxscript/export, no-norm/export for ``--full-forms`` (default dynamo). Shapes: prefill 1x1, 1x128, 1x512
and decode 1 token on 256 and 1024 past where the export has a cache. Each shape runs pairs
until the interval's half-width is within ``--target`` (default 3%) or ``--budget`` seconds.
CPU always; CUDA too when a CUDA provider loads.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import onnx
from onnx import helper

from benchmarks._chains import norm_chain_nodes
from flashnorm_onnx.profile import parse_shape, profile

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"

FORMS = ("dynamo", "dynamo_opset23", "legacy", "optimum_past", "ort_opt", "genai")
TINY = {
    "dynamo": "llama_dynamo",
    "dynamo_opset23": "llama_dynamo_opset23",
    "legacy": "llama_legacy",
    "optimum_past": "llama_optimum_past",
    "ort_opt": "llama_ort_opt",
    "genai": "llama_genai_fp32",
}
SHAPES = ("prefill1=1x1", "prefill128=1x128", "prefill512=1x512", "decode256=1x1,past=256",
          "decode1024=1x1,past=1024")
COMPARISONS = ("fold/export", "for-ort/export", "for-ort/ort-opt", "for-ort/fold", "onnxscript/export",
               "no-norm/export")
CORE = ("fold/export", "for-ort/export", "for-ort/ort-opt")
"""What every form gets; ``--full-forms`` get all of COMPARISONS."""


def source_model(family: str, form: str) -> Path:
    if family == "tiny":
        from models import fixtures

        return Path(fixtures.build(TINY[form]))
    from models import smollm2

    return Path(smollm2.export(form))


# --------------------------------------------------------------------------- variants


def _save(model: onnx.ModelProto, target: Path, external: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    data = target.with_name(target.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
    else:
        onnx.save(model, str(target))
    return target


def _dead_code(graph: onnx.GraphProto) -> None:
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output) or not node.output:
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # subgraph inputs (If/Loop) use outer names
                for g in list(attr.g.node if attr.HasField("g") else []):
                    needed.update(g.input)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    inits = [t for t in graph.initializer if t.name in used or t.name in {o.name for o in graph.output}]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def no_norm_variant(source: Path, target: Path) -> tuple[Path, int]:
    """``source`` with every RMSNorm/LayerNorm replaced by identity (Skip forms: by the add)."""
    if target.exists():
        return target, -1
    model = onnx.load(str(source))
    graph = model.graph
    count = 0
    new_nodes = []
    chains = {end: x for x, _names, end in norm_chain_nodes(graph)}
    for node in graph.node:
        if node.op_type in ("SimplifiedLayerNormalization", "RMSNormalization", "LayerNormalization"):
            new_nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name + "_nonorm"))
            count += 1
        elif node.op_type in ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization"):
            out0 = node.output[0] or node.name + "_nonorm_sum"
            new_nodes.append(helper.make_node("Add", [node.input[0], node.input[1]], [out0], name=node.name + "_nonorm"))
            if len(node.output) > 3 and node.output[3]:
                new_nodes.append(helper.make_node("Identity", [out0], [node.output[3]], name=node.name + "_nonorm_sum"))
            count += 1
        elif node.output and node.output[0] in chains:
            new_nodes.append(helper.make_node("Identity", [chains[node.output[0]]], [node.output[0]],
                                              name=node.name + "_nonorm"))
            count += 1
        else:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    _dead_code(graph)
    big = sum(t.ByteSize() for t in graph.initializer) > 200 * 2**20
    return _save(model, target, external=big), count


def ort_optimizer_variant(source: Path, target: Path) -> Path:
    """ORT's transformers optimizer (model_type gpt2, opt_level 0) on ``source``."""
    if target.exists():
        return target
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(source), model_type="gpt2", num_heads=0, hidden_size=0, opt_level=0)
    target.parent.mkdir(parents=True, exist_ok=True)
    big = source.stat().st_size > 200 * 2**20 or source.with_name(source.name + ".data").exists() or any(
        source.parent.glob("*.data"))
    opt.save_model_to_file(str(target), use_external_data_format=big, all_tensors_to_one_file=True)
    return target


def genai_dims(source: Path) -> dict[str, int]:
    """onnxruntime-genai names the cache's head dimension 'kv_cache_dim', which the input
    generator would read as a cache length: give its value from genai_config.json."""
    config = source.parent / "genai_config.json"
    if not config.exists():
        return {}
    decoder = json.loads(config.read_text()).get("model", {}).get("decoder", {})
    return {"kv_cache_dim": int(decoder["head_size"])} if "head_size" in decoder else {}


def folded_variant(source: Path, target: Path, dims: dict[str, int], for_ort: bool = False) -> tuple[Path, str]:
    from flashnorm_onnx.pipeline.api import optimize

    if target.exists():
        return target, "cached"
    report = optimize(source, target, force_write=True, dims=dims, for_ort=for_ort)
    return target, report.summary_line() + (f"; {report.fusions}" if for_ort else "")


def onnxscript_variant(source: Path, target: Path) -> Path:
    """onnxscript's ``optimize_for_ort`` on ``source``, as shipped."""
    if target.exists():
        return target
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(source))
    model, _counts = optimize_for_ort(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(target), external_data=target.name + ".data")
    return target


def variant(name: str, src: Path, work: Path, dims: dict[str, int]) -> Path:
    if name == "export":
        return src
    if name in ("fold", "for-ort"):
        path, summary = folded_variant(src, work / name / "model.onnx", dims, for_ort=name == "for-ort")
        print(f"[bench] {name}: {summary}", flush=True)
        return path
    if name == "ort-opt":
        return ort_optimizer_variant(src, work / "ortopt" / "model.onnx")
    if name == "onnxscript":
        return onnxscript_variant(src, work / "onnxscript" / "model.onnx")
    if name == "no-norm":
        return no_norm_variant(src, work / "nonorm" / "model.onnx")[0]
    raise ValueError(name)


# --------------------------------------------------------------------------- matrix


def machine() -> dict:
    import onnxruntime as ort

    from flashnorm_onnx.profile import cuda_available_reason, gpu_info
    from flashnorm_onnx.profile.machine import _cpu_name

    return {
        "cpu": _cpu_name(),
        "cores": __import__("os").cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "cuda": cuda_available_reason() or "listed",
        "gpu": gpu_info(),
    }


def cuda_works(model: Path) -> bool:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    ort.set_default_logger_severity(4)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        s = ort.InferenceSession(str(model), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception:
        return False
    return "CUDAExecutionProvider" in s.get_providers()


def run(args) -> int:
    families = [f.strip() for f in args.models.split(",") if f.strip()]
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    shapes = [parse_shape(s) for s in args.shapes]
    comparisons = [c.strip() for c in args.comparisons.split(",") if c.strip()]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    rows, notes = [], []
    prefix = "" if args.output == RESULTS_MD else Path(args.output).stem + "_"
    started = time.time()
    for family in families:
        for form in forms:
            label = f"{family}/{form}"
            try:
                src = source_model(family, form)
            except Exception as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                notes.append(f"{label}: not built ({msg[:200]})")
                print(f"[bench] {label}: not built: {msg[:200]}", flush=True)
                continue
            work = BUILD / family / form
            dims = genai_dims(src)
            providers = ["cpu"] + (["cuda"] if args.cuda and cuda_works(src) else [])
            paths: dict[str, Path] = {}
            full = form in args.full_forms.split(",")
            for comparison in comparisons if full else [c for c in comparisons if c in CORE]:
                b_name, a_name = comparison.split("/")
                if form == "ort_opt" and "ort-opt" in (a_name, b_name):
                    continue  # the export is already the ORT optimizer's output
                try:
                    for v in (a_name, b_name):
                        if v not in paths:
                            paths[v] = variant(v, src, work, dims)
                except Exception as e:
                    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                    notes.append(f"{label} {comparison}: variant not built ({msg})")
                    print(f"[bench] {label} {comparison}: variant not built: {msg}", flush=True)
                    continue
                t0 = time.time()
                try:
                    rep = profile(paths[a_name], paths[b_name], shapes=shapes, providers=tuple(providers),
                                  runs=args.runs, warmup=args.warmup, target=args.target / 100,
                                  budget_s=args.budget, progress=not args.no_progress, dims=dims,
                                  skip_failing=True, threads=args.threads)
                except Exception as e:
                    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                    notes.append(f"{label} {comparison}: not measured ({msg})")
                    print(f"[bench] {label} {comparison}: not measured: {msg}", flush=True)
                    continue
                rep["benchmark"] = {"family": family, "form": form, "comparison": comparison}
                out = RESULTS_DIR / f"{prefix}{family}_{form}_{comparison.replace('/', '_vs_')}.json"
                for sk in rep["skipped"]:
                    reason = sk["reason"] if len(sk["reason"]) < 260 else sk["reason"][:90] + " ... " + sk["reason"][-160:]
                    notes.append(f"{label} {comparison} {sk['shape']}: skipped ({reason})")
                notes += [f"{label} {comparison}: {n}" for n in rep["notes"]]
                for r in rep["results"]:  # keep the JSON readable: samples stay, rounded
                    for k in ("A", "B"):
                        r[k]["samples_ms"] = [round(v, 4) for v in r[k]["samples_ms"]]
                out.write_text(json.dumps(rep, indent=1))
                for r in rep["results"]:
                    rows.append({"family": family, "form": form, "comparison": comparison, "shape": r["shape"],
                                 "dims": f"{r['batch']}x{r['sequence']}" + (f" past {r['past']}" if r["past"] else ""),
                                 "provider": r["provider"], "A_ms": r["A"]["median_ms"], "B_ms": r["B"]["median_ms"],
                                 "ratio": r["ratio"]["median"], "lo": r["ratio"]["ci95"][0],
                                 "hi": r["ratio"]["ci95"][1], "verdict": r["ratio"]["verdict"], "pairs": r["pairs"],
                                 "stopped": r["stopped"]})
                    print(f"[bench] {label} {comparison} {r['shape']} {r['provider']}: "
                          f"{r['ratio']['median']:.3f} [{r['ratio']['ci95'][0]:.3f}, {r['ratio']['ci95'][1]:.3f}] "
                          f"{r['pairs']} pairs ({time.time() - t0:.0f}s)", flush=True)
                write_results(rows, notes, args, started)
    write_results(rows, notes, args, started)
    return 0


def write_results(rows: list[dict], notes: list[str], args, started: float) -> None:
    m = machine()
    lines = [
        "# Latency benchmarks",
        "",
        "Written by `make bench` (`python -m benchmarks.run_latency "
        + " ".join(sys.argv[1:]) + "`). Raw reports (every sample): `benchmarks/results/*.json`.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}; GPU: {m['gpu']['name'] + ' driver ' + m['gpu']['driver'] if m['gpu'] else 'none'}.",
        f"- CUDA: {'measured' if any(r['provider'] == 'cuda' for r in rows) else 'not measured: ' + ('no GPU on this machine (the CUDA provider does not load)' if m['cuda'] == 'listed' else m['cuda'])}.",
        f"- Method: `flashnorm_onnx.profile.profile` -- A and B in one process on one shared intra-op thread "
        f"pool, {args.warmup} warm-up runs each, then interleaved pairs (A B / B A alternating); IO binding; "
        "B/A = median of the per-pair ratios with a paired-bootstrap 95% interval. Pairs run until the "
        f"interval's half-width is within {args.target:g}% or {args.budget:g} s per shape"
        + (f" (fixed {args.runs} pairs)" if args.runs else "") + ". Ratio < 1: B is faster.",
        f"- Total wall time {time.time() - started:.0f} s, finished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "- Variants: `export` = the export itself; `fold` = `flashnorm-onnx optimize`; `for-ort` = "
        "`flashnorm-onnx optimize --for-ort` (exact ORT fusions, then the fold); `ort-opt` = ORT's transformers "
        "optimizer (gpt2, opt_level 0); `onnxscript` = onnxscript's `optimize_for_ort` as shipped (its GQA "
        "fusion ignores the attention mask: a reference point, not an equivalent model); `no-norm` = every "
        "norm replaced by identity (wrong function; the lower bound of what removing norm work could save).",
        "",
        "| model | form | B / A | shape | provider | A median ms | B median ms | B/A | 95% CI | verdict | pairs |",
        "|---|---|---|---|---|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['family']} | {r['form']} | {r['comparison']} | {r['shape']} ({r['dims']}) | {r['provider']} | "
                     f"{r['A_ms']:.3f} | {r['B_ms']:.3f} | {r['ratio']:.3f} | [{r['lo']:.3f}, {r['hi']:.3f}] | {r['verdict']} | "
                     f"{r['pairs']} |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in _compact(notes)]
    out = Path(args.output)
    out.write_text("\n".join(lines) + "\n")
    stem = "summary" if out == RESULTS_MD else out.stem + "_summary"
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps({"machine": m, "rows": rows, "notes": notes}, indent=1))


def _compact(notes: list[str]) -> list[str]:
    """One line for all 'no KV cache' skips; the others as they are."""
    no_cache = sorted({n.split(" ")[0] for n in notes if "no KV-cache inputs" in n})
    rest = [n for n in notes if "no KV-cache inputs" not in n]
    out = []
    if no_cache:
        out.append(f"decode not timed for exports without KV-cache inputs: {', '.join(no_cache)}")
    return out + rest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--shape", dest="shapes", action="append", help="override the shapes (NAME=BxT[,past=N])")
    p.add_argument("--comparisons", default=",".join(COMPARISONS), help="B/A pairs of variants")
    p.add_argument("--full-forms", default="dynamo",
                   help="forms that get every comparison; the others get " + ", ".join(CORE))
    p.add_argument("--runs", type=int, help="a fixed number of pairs per shape (default: adaptive)")
    p.add_argument("--target", type=float, default=3.0, help="interval half-width to reach, percent (default 3)")
    p.add_argument("--budget", type=float, default=90.0, help="seconds per shape at most (default 90)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: ORT's, one per physical core)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny model only, few pairs")
    p.add_argument("--no-cuda", dest="cuda", action="store_false", help="CPU only even when CUDA works")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--output", type=Path, default=RESULTS_MD, help="the Markdown table to write (default RESULTS.md)")
    args = p.parse_args(argv)
    args.shapes = args.shapes or list(SHAPES)
    if args.quick:
        args.models, args.runs = "tiny", 10
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
