"""CUDA verification and latency (run by ``benchmarks/cuda.sh`` on a machine with an NVIDIA GPU).

1. The CUDA provider must really load: a session on CUDA alone must list
   ``CUDAExecutionProvider`` (ONNX Runtime silently falls back to CPU otherwise). If not: exit 7,
   nothing written.
2. Verification on CUDA: each folded model (fp32 SmolLM2 dynamo, ``--for-ort`` too; fp16 tiny
   Llama) against its input, both on the CUDA provider (``compare_models(provider="cuda")``).
3. Latency on CUDA: ``flashnorm_onnx.profile.profile`` with IO binding (inputs, outputs and the
   KV cache on the device), without and with CUDA graphs, over the comparisons and shapes below.
4. ``benchmarks/RESULTS_cuda.md`` with the GPU, driver, ORT version and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.run_latency import BUILD, genai_dims, source_model, variant
from flashnorm_onnx.profile import gpu_info, parse_shape, profile

OUT = Path(__file__).resolve().parent / "RESULTS_cuda.md"
RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ("prefill1=1x1", "prefill128=1x128", "prefill512=1x512", "decode256=1x1,past=256",
          "decode1024=1x1,past=1024")
COMPARISONS = ("fold/export", "for-ort/export", "for-ort/ort-opt")


def cuda_loads() -> str | None:
    """None when a CUDA-only session really runs on CUDA; else why not."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
        session.run(None, {"x": np.ones(2, np.float32)})
    except Exception as e:  # noqa: BLE001
        return f"the CUDA provider failed to load: {str(e).splitlines()[0][:300]}"
    if "CUDAExecutionProvider" not in session.get_providers():
        return f"ONNX Runtime fell back to {session.get_providers()} (CUDA or cuDNN libraries missing?)"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_cuda", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models only")
    p.add_argument("--target", type=float, default=2.0, help="interval half-width, percent (default 2)")
    p.add_argument("--budget", type=float, default=60.0, help="seconds per shape at most (default 60)")
    args = p.parse_args(argv)

    reason = cuda_loads()
    if reason:
        print(f"run_cuda: {reason}; no GPU number measured, nothing written", file=sys.stderr)
        return 7
    import onnxruntime as ort

    from flashnorm_onnx.verify.whole import compare_models

    gpu = gpu_info() or {"name": "unknown", "driver": "unknown", "memory": "?"}
    family = "tiny" if args.quick else "smollm2"
    lines = ["# CUDA results", "",
             f"Written by `bash benchmarks/cuda.sh {' '.join(sys.argv[1:])}` on {gpu['name']} "
             f"({gpu['memory']}), driver {gpu['driver']}, onnxruntime {ort.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "## Verification on the CUDA provider (folded vs input, both on CUDA)", "",
             "| model | variant | passed | max rel err (worst output) |", "|---|---|---|---:|"]
    from models import fixtures

    checks = [(family, "dynamo", "fold"), (family, "dynamo", "for-ort")]
    ok = True
    for fam, form, name in checks:
        src = source_model(fam, form)
        out = variant(name, src, BUILD / fam / form, {})
        res = compare_models(src, out, provider="cuda")
        worst = max((o["max_rel"] for o in res.outputs), default=float("nan"))
        lines.append(f"| {fam} {form} fp32 | {name} | {res.passed} | {worst:.2e} |")
        ok &= res.passed
    fp16 = Path(fixtures.build("llama_dynamo_fp16"))
    fp16_out = variant("fold", fp16, BUILD / "tiny" / "dynamo_fp16", {})
    res = compare_models(fp16, fp16_out, provider="cuda", rtol=2e-2)
    worst = max((o["max_rel"] for o in res.outputs), default=float("nan"))
    lines.append(f"| tiny dynamo fp16 | fold | {res.passed} | {worst:.2e} |")
    ok &= res.passed

    lines += ["", "## Latency on CUDA (IO binding; B/A < 1: B faster)", "",
              "| form | B / A | shape | CUDA graph | A median ms | B median ms | B/A | 95% CI | pairs |",
              "|---|---|---|---|---:|---:|---:|---|---:|"]
    shapes = [parse_shape(s) for s in SHAPES]
    RESULTS.mkdir(parents=True, exist_ok=True)
    for form in ("dynamo", "optimum_past"):
        src = source_model(family, form)
        work = BUILD / family / form
        dims = genai_dims(src)
        for comparison in COMPARISONS:
            b_name, a_name = comparison.split("/")
            a, b = variant(a_name, src, work, dims), variant(b_name, src, work, dims)
            for graph in (False, True):
                try:
                    rep = profile(a, b, shapes=shapes, providers=("cuda",), cuda_graph=graph,
                                  target=args.target / 100, budget_s=args.budget, dims=dims, skip_failing=True)
                except Exception as e:  # noqa: BLE001 - e.g. a graph that CUDA graphs cannot capture
                    lines.append(f"| {form} | {comparison} | all | {'yes' if graph else 'no'} | "
                                 f"not measured: {str(e).splitlines()[0][:160]} | | | | |")
                    continue
                name = f"cuda_{family}_{form}_{comparison.replace('/', '_vs_')}{'_graph' if graph else ''}.json"
                (RESULTS / name).write_text(json.dumps(rep, indent=1))
                for r in rep["results"]:
                    shape = f"{r['shape']} ({r['batch']}x{r['sequence']}" + (f" past {r['past']})" if r["past"] else ")")
                    lines.append(f"| {form} | {comparison} | {shape} | {'yes' if graph else 'no'} | "
                                 f"{r['A']['median_ms']:.3f} | {r['B']['median_ms']:.3f} | {r['ratio']['median']:.3f} | "
                                 f"[{r['ratio']['ci95'][0]:.3f}, {r['ratio']['ci95'][1]:.3f}] | {r['pairs']} |")
                for sk in rep["skipped"]:
                    lines.append(f"| {form} | {comparison} | {sk['shape']} | {'yes' if graph else 'no'} | "
                                 f"skipped: {sk['reason'][:120]} | | | | |")
                OUT.write_text("\n".join(lines) + "\n")
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")
    return 0 if ok else 5


if __name__ == "__main__":
    sys.exit(main())
