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

Cross-form comparisons (``--cross``, default ``for-ort@optimum_past/genai`` and
``for-ort@dynamo/genai``): B and A are ``VARIANT@FORM`` (a bare form is its export), so the
baseline can be another export of the same weights -- the genai builder's fp32 model, the anchor:
the fastest ONNX Runtime form there is. Each model gets inputs for its own signature (the genai
model has no position ids and names its cache's head dimension ``kv_cache_dim``; the optimum
export has position ids; the dynamo export has no cache). Decode shapes are timed only when both
models have KV-cache inputs; the others are noted as skipped.
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
CROSS = ("for-ort@optimum_past/genai", "for-ort@dynamo/genai")
"""Cross-form comparisons B/A, each side ``VARIANT@FORM`` or a bare form (its export): the anchor
(A) is the genai builder's fp32 model of the same weights."""
VARIANTS = ("export", "fold", "for-ort", "ort-opt", "onnxscript", "no-norm")


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


VARIANT_DIRS = {"fold": "fold", "for-ort": "for-ort", "ort-opt": "ortopt", "onnxscript": "onnxscript",
                "no-norm": "nonorm"}
"""Where each variant of an export is built, under ``build/bench/<family>/<form>/``."""


def variant(name: str, src: Path, work: Path, dims: dict[str, int]) -> Path:
    if name == "export":
        return src
    target = work / VARIANT_DIRS[name] / "model.onnx"
    if name in ("fold", "for-ort"):
        path, summary = folded_variant(src, target, dims, for_ort=name == "for-ort")
        print(f"[bench] {name}: {summary}", flush=True)
        return path
    if name == "ort-opt":
        return ort_optimizer_variant(src, target)
    if name == "onnxscript":
        return onnxscript_variant(src, target)
    if name == "no-norm":
        return no_norm_variant(src, target)[0]
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


def parse_side(text: str) -> tuple[str, str]:
    """``VARIANT@FORM`` -> (variant, form); a bare ``FORM`` is its export."""
    variant_name, _, form = text.strip().rpartition("@")
    variant_name = variant_name or "export"
    if variant_name not in VARIANTS:
        raise ValueError(f"unknown variant {variant_name!r} in {text!r}; one of {', '.join(VARIANTS)}")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r} in {text!r}; one of {', '.join(FORMS)}")
    return variant_name, form


def parse_cross(text: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """``B/A`` of two sides (:func:`parse_side`) -> ((variant, form) of B, (variant, form) of A)."""
    b, sep, a = text.partition("/")
    if not sep or not a.strip() or not b.strip():
        raise ValueError(f"a cross comparison is B/A, e.g. for-ort@optimum_past/genai, not {text!r}")
    return parse_side(b), parse_side(a)


def side_label(variant_name: str, form: str) -> str:
    return form if variant_name == "export" and form == "genai" else f"{variant_name}@{form}"


def input_specs(path: Path) -> list:
    """The graph inputs of ``path`` as the input generator sees them (no weights read)."""
    from onnx import helper as onnx_helper

    import numpy as np

    from flashnorm_onnx.verify.inputs import InputSpec

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]
        specs.append(InputSpec(i.name, np.dtype(onnx_helper.tensor_dtype_to_np_dtype(t.elem_type)), shape))
    return specs


def shapes_for_both(a: Path, b: Path, shapes: list) -> tuple[list, list[str]]:
    """The shapes both models can be timed on, and the names of those they cannot: a decode step
    (past > 0) needs KV-cache inputs in both (profile checks only A's, and would feed a model
    without a cache a plain 1-token prefill)."""
    from flashnorm_onnx.verify.inputs import has_past

    both_past = has_past(input_specs(a)) and has_past(input_specs(b))
    kept = [c for c in shapes if not c.past or both_past]
    return kept, [c.name for c in shapes if c.past and not both_past]


class Bench:
    """One benchmark run: the variants built so far, the rows and notes of the table."""

    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.prefix = "" if Path(args.output) == RESULTS_MD else Path(args.output).stem + "_"
        self.started = time.time()
        self.load_start = _loadavg()
        self.sources: dict[tuple[str, str], Path | None] = {}
        self.built: dict[tuple[str, str, str], Path] = {}

    def source(self, family: str, form: str) -> Path | None:
        key = (family, form)
        if key not in self.sources:
            try:
                self.sources[key] = source_model(family, form)
            except Exception as e:
                msg = _first(e)
                self.notes.append(f"{family}/{form}: not built ({msg})")
                print(f"[bench] {family}/{form}: not built: {msg}", flush=True)
                self.sources[key] = None
        return self.sources[key]

    def variant(self, family: str, form: str, name: str) -> Path:
        """``name`` of ``family``/``form``, built once per run. A variant left in build/bench by an
        earlier run is reused (it may come from older code: ``--rebuild`` builds it anew), with a
        note giving when it was built."""
        key = (family, form, name)
        if key not in self.built:
            src = self.sources[(family, form)]
            work = BUILD / family / form
            folder = work / VARIANT_DIRS[name] if name != "export" else None
            if folder is not None and self.args.rebuild and folder.exists():
                import shutil

                shutil.rmtree(folder)
            if folder is not None and (folder / "model.onnx").exists():
                built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime((folder / "model.onnx").stat().st_mtime))
                self.notes.append(f"{family}/{form} {name}: reused from build/bench (built {built}; "
                                  "--rebuild builds it anew)")
            self.built[key] = variant(name, src, work, genai_dims(src))
        return self.built[key]

    def measure(self, family: str, form: str, comparison: str, a: Path, b: Path, shapes: list,
                dims: dict[str, int], providers: list[str], out_name: str, label: str) -> None:
        args = self.args
        t0 = time.time()
        try:
            rep = profile(a, b, shapes=shapes, providers=tuple(providers), runs=args.runs, warmup=args.warmup,
                          target=args.target / 100, budget_s=args.budget, progress=not args.no_progress, dims=dims,
                          skip_failing=True, threads=args.threads, rounds=args.rounds)
        except Exception as e:
            self.notes.append(f"{label} {comparison}: not measured ({_first(e)})")
            print(f"[bench] {label} {comparison}: not measured: {_first(e)}", flush=True)
            return
        rep["benchmark"] = {"family": family, "form": form, "comparison": comparison}
        for sk in rep["skipped"]:
            reason = sk["reason"] if len(sk["reason"]) < 260 else sk["reason"][:90] + " ... " + sk["reason"][-160:]
            self.notes.append(f"{label} {comparison} {sk['shape']}: skipped ({reason})")
        self.notes.extend(f"{label} {comparison}: {n}" for n in rep["notes"])
        for r in rep["results"]:  # keep the JSON readable: samples stay, rounded
            for k in ("A", "B"):
                r[k]["samples_ms"] = [round(v, 4) for v in r[k]["samples_ms"]]
        (RESULTS_DIR / f"{self.prefix}{out_name}.json").write_text(json.dumps(rep, indent=1))
        self.method = rep["settings"].get("estimator")
        for r in rep["results"]:
            load = r.get("load") or {}
            self.rows.append({
                "family": family, "form": form, "comparison": comparison, "shape": r["shape"],
                "dims": f"{r['batch']}x{r['sequence']}" + (f" past {r['past']}" if r["past"] else ""),
                "provider": r["provider"], "A_ms": r["A"]["median_ms"], "B_ms": r["B"]["median_ms"],
                "ratio": r["ratio"].get("estimate", r["ratio"].get("median")), "lo": r["ratio"]["ci95"][0],
                "hi": r["ratio"]["ci95"][1], "verdict": r["ratio"]["verdict"], "pairs": r["pairs"],
                "stopped": r["stopped"], "load_before": (load.get("load_before") or [None])[0],
                "other_cores_busy": load.get("other_cores_busy")})
            print(f"[bench] {label} {comparison} {r['shape']} {r['provider']}: "
                  f"{self.rows[-1]['ratio']:.3f} [{r['ratio']['ci95'][0]:.3f}, {r['ratio']['ci95'][1]:.3f}] "
                  f"{r['pairs']} pairs ({time.time() - t0:.0f}s)", flush=True)
        write_results(self)

    def within(self, family: str, form: str, comparisons: list[str], shapes: list) -> None:
        """B/A variants of one export."""
        label = f"{family}/{form}"
        src = self.source(family, form)
        if src is None:
            return
        dims = genai_dims(src)
        providers = ["cpu"] + (["cuda"] if self.args.cuda and cuda_works(src) else [])
        full = form in self.args.full_forms.split(",")
        for comparison in comparisons if full else [c for c in comparisons if c in CORE]:
            b_name, a_name = comparison.split("/")
            if form == "ort_opt" and "ort-opt" in (a_name, b_name):
                continue  # the export is already the ORT optimizer's output
            try:
                a, b = (self.variant(family, form, v) for v in (a_name, b_name))
            except Exception as e:
                self.notes.append(f"{label} {comparison}: variant not built ({_first(e)})")
                print(f"[bench] {label} {comparison}: variant not built: {_first(e)}", flush=True)
                continue
            self.measure(family, form, comparison, a, b, shapes, dims, providers,
                         f"{family}_{form}_{comparison.replace('/', '_vs_')}", label)

    def cross(self, family: str, spec: str, shapes: list) -> None:
        """B of one export against A of another (the anchor), on the shapes both can run."""
        (b_var, b_form), (a_var, a_form) = parse_cross(spec)
        comparison = f"{side_label(b_var, b_form)} / {side_label(a_var, a_form)}"
        label = f"{family}/cross"
        if self.source(family, a_form) is None or self.source(family, b_form) is None:
            self.notes.append(f"{label} {comparison}: not measured (an export is not built)")
            return
        try:
            a, b = self.variant(family, a_form, a_var), self.variant(family, b_form, b_var)
        except Exception as e:
            self.notes.append(f"{label} {comparison}: variant not built ({_first(e)})")
            print(f"[bench] {label} {comparison}: variant not built: {_first(e)}", flush=True)
            return
        kept, skipped = shapes_for_both(a, b, shapes)
        if skipped:
            self.notes.append(f"{label} {comparison}: {', '.join(skipped)} not timed (decode needs KV-cache "
                              f"inputs in both models; {b_form if has_no_past(b) else a_form} has none)")
        if not kept:
            return
        dims = {**genai_dims(self.sources[(family, b_form)]), **genai_dims(self.sources[(family, a_form)])}
        providers = ["cpu"] + (["cuda"] if self.args.cuda and cuda_works(a) and cuda_works(b) else [])
        out = f"{family}_cross_{b_var}_{b_form}_vs_{a_var}_{a_form}"
        self.measure(family, "cross", comparison, a, b, kept, dims, providers, out, label)


def has_no_past(path: Path) -> bool:
    from flashnorm_onnx.verify.inputs import has_past

    return not has_past(input_specs(path))


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in __import__("os").getloadavg()]
    except OSError:
        return None


def run(args) -> int:
    families = [f.strip() for f in args.models.split(",") if f.strip()]
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    shapes = [parse_shape(s) for s in args.shapes]
    comparisons = [c.strip() for c in args.comparisons.split(",") if c.strip()]
    cross = [c.strip() for c in args.cross.split(",") if c.strip()]
    for c in cross:
        parse_cross(c)  # a bad spec fails before anything is built
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    print(f"[bench] load average at start: {bench.load_start}", flush=True)
    for family in families:
        for form in forms:
            bench.within(family, form, comparisons, shapes)
        for spec in cross:
            bench.cross(family, spec, shapes)
    write_results(bench)
    return 0


def write_results(bench: Bench) -> None:
    args, rows, notes = bench.args, bench.rows, bench.notes
    m = machine()
    method = getattr(bench, "method", None) or "B/A with a bootstrap 95% interval"
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
        f"pool, {args.rounds} round{'s' if args.rounds > 1 else ''} per shape on fresh session pairs (created in "
        f"alternating order), {args.warmup} warm-up runs each, then interleaved pairs (A B / B A alternating); IO binding; "
        f"B/A: {method}. Pairs run until the "
        f"interval's half-width is within {args.target:g}% or {args.budget:g} s per shape"
        + (f" (fixed {args.runs} pairs)" if args.runs else "") + ". Ratio < 1: B is faster.",
        f"- Load average (1, 5, 15 min) at the start: {bench.load_start}; `load` column: the 1-minute load "
        "average before each shape / the cores other processes kept busy while it was measured.",
        f"- Total wall time {time.time() - bench.started:.0f} s, finished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "- Variants: `export` = the export itself; `fold` = `flashnorm-onnx optimize`; `for-ort` = "
        "`flashnorm-onnx optimize --for-ort` (exact ORT fusions, then the fold); `ort-opt` = ORT's transformers "
        "optimizer (gpt2, opt_level 0); `onnxscript` = onnxscript's `optimize_for_ort` as shipped (its GQA "
        "fusion ignores the attention mask: a reference point, not an equivalent model); `no-norm` = every "
        "norm replaced by identity (wrong function; the lower bound of what removing norm work could save). "
        "Form `cross`: B and A are `VARIANT@FORM` of two exports of the same weights; `genai` = the genai "
        "builder's fp32 model (the anchor).",
        "",
        "| model | form | B / A | shape | provider | A median ms | B median ms | B/A | 95% CI | verdict | pairs | load |",
        "|---|---|---|---|---|---:|---:|---:|---|---|---:|---|",
    ]
    for r in rows:
        load = (f"{r['load_before']:.2f} / {r['other_cores_busy']:.2f}"
                if r.get("load_before") is not None and r.get("other_cores_busy") is not None else "")
        lines.append(f"| {r['family']} | {r['form']} | {r['comparison']} | {r['shape']} ({r['dims']}) | {r['provider']} | "
                     f"{r['A_ms']:.3f} | {r['B_ms']:.3f} | {r['ratio']:.3f} | [{r['lo']:.3f}, {r['hi']:.3f}] | {r['verdict']} | "
                     f"{r['pairs']} | {load} |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in _compact(notes)]
    out = Path(args.output)
    out.write_text("\n".join(lines) + "\n")
    stem = "summary" if out == RESULTS_MD else out.stem + "_summary"
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps({"machine": m, "load_start": bench.load_start, "rows": rows,
                                                          "notes": notes}, indent=1))


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
    p.add_argument("--cross", default=",".join(CROSS),
                   help="cross-form B/A pairs, each side VARIANT@FORM or a bare FORM (its export); '' for none "
                        "(default: " + ", ".join(CROSS) + ")")
    p.add_argument("--full-forms", default="dynamo",
                   help="forms that get every comparison; the others get " + ", ".join(CORE))
    p.add_argument("--runs", type=int, help="a fixed number of pairs per round (default: adaptive)")
    p.add_argument("--rounds", type=int, default=4,
                   help="fresh session pairs per shape (profile's --rounds; default 4)")
    p.add_argument("--target", type=float, default=3.0, help="interval half-width to reach, percent (default 3)")
    p.add_argument("--budget", type=float, default=90.0, help="seconds per shape at most (default 90)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: ORT's, one per physical core)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rebuild", action="store_true",
                   help="build every variant anew (default: reuse what build/bench holds from earlier runs)")
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
