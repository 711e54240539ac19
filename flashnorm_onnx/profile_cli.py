"""``flashnorm-onnx profile``: latency of a folded model against its input, interleaved."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flashnorm_onnx.errors import FlashNormError

DESCRIPTION = """\
Time MODEL (B, usually MODEL.flashnorm.onnx) against --baseline (A) in one process: after
warm-up the two run interleaved (A B, B A, ...) so that drift hits both. Per shape and
provider: median, p90, p99 latency, tokens/s, and the ratio B/A with a bootstrap 95%
interval ('no significant difference' when it holds 1). Inputs are generated as optimize's
verification does; a shape with past=N times one step on a KV cache of N tokens (models
with cache inputs only). Inputs, outputs and the cache are bound on the device (IO binding).
"""

EXAMPLES = """\
examples:
  flashnorm-onnx profile model.flashnorm.onnx --baseline model.onnx
  flashnorm-onnx profile model.flashnorm.onnx --baseline model.onnx --shape prefill=1x512 \\
      --shape decode=1x1,past=1024 --runs 100 --ops --json prof.json --plot prof.png
  flashnorm-onnx profile model.flashnorm.onnx --baseline model.onnx --provider cuda --cuda-graph

exit codes: 0 ok, 2 bad arguments, 3 bad model, 6 a model does not run on generated inputs,
7 requested provider unavailable (CUDA on a machine without it; --fallback-cpu measures on CPU)
"""


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile",
        help="latency of a model against a baseline (interleaved, with confidence intervals)",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="the model to measure (B), e.g. model.flashnorm.onnx")
    p.add_argument("--baseline", required=True, metavar="MODEL", help="the reference model (A), e.g. model.onnx")
    p.add_argument("--provider", action="append", choices=("cpu", "cuda"),
                   help="execution provider; repeat for both (default: cpu)")
    p.add_argument("--shape", action="append", metavar="NAME=BxT[,past=N]",
                   help="a shape to time, e.g. prefill=1x512 or decode=1x1,past=1024 (repeatable; "
                   "default: prefill=1x128 and decode=1x1,past=256)")
    p.add_argument("--runs", type=int, default=50, help="measured runs of each model per shape (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up runs of each model per shape (default 5)")
    p.add_argument("--ops", action="store_true", help="also profile op types with ORT's profiler and compare by group")
    p.add_argument("--ops-runs", type=int, help="runs per model under the profiler (default min(runs, 10))")
    p.add_argument("--json", metavar="PATH", help="write the full report (all samples) as JSON")
    p.add_argument("--plot", metavar="PNG", help="write a PNG of the latency distributions and the op groups")
    p.add_argument("--cuda-graph", action="store_true", help="capture a CUDA graph (CUDA provider only)")
    p.add_argument("--fallback-cpu", action="store_true",
                   help="when the CUDA provider cannot load, measure on CPU instead of failing")
    p.add_argument("--threads", type=int, help="intra-op threads (default: ORT's choice, all cores)")
    p.add_argument("--dim", action="append", metavar="NAME=VALUE", help="value for a symbolic input dimension")
    p.add_argument("--seed", type=int, default=0, help="seed for generated inputs and the bootstrap")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)
    return p


def run(args) -> int:
    from flashnorm_onnx.cli import _dims
    from flashnorm_onnx.profiling import latency_table, ops_table, parse_shape, profile, write_plot

    try:
        shapes = [parse_shape(s) for s in args.shape] if args.shape else None
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if args.runs < 2:
        raise argparse.ArgumentTypeError("--runs must be at least 2")
    if args.warmup < 0:
        raise argparse.ArgumentTypeError("--warmup must be >= 0")
    names = [s.name for s in shapes or []]
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError("--shape names must be distinct")
    providers = tuple(dict.fromkeys(args.provider or ["cpu"]))
    if args.cuda_graph and "cuda" not in providers:
        raise argparse.ArgumentTypeError("--cuda-graph needs --provider cuda")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise FlashNormError("--plot needs matplotlib: pip install 'flashnorm-onnx[plot]'") from None

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    report = profile(
        args.baseline,
        args.model,
        shapes=shapes,
        providers=providers,
        runs=args.runs,
        warmup=args.warmup,
        ops=args.ops,
        ops_runs=args.ops_runs,
        cuda_graph=args.cuda_graph,
        fallback_cpu=args.fallback_cpu,
        threads=args.threads,
        dims=_dims(args.dim),
        seed=args.seed,
        progress=not args.no_progress,
        log=log,
    )
    report["command"] = ["flashnorm-onnx"] + sys.argv[1:] if sys.argv and "flashnorm" in sys.argv[0] else None
    m = report["machine"]
    print(f"A (baseline): {report['models']['A']['path']}")
    print(f"B:            {report['models']['B']['path']}")
    gpu = m.get("gpu")
    print(f"machine: {m['processor']}, {m['cpu_count']} cores; onnxruntime {m['onnxruntime']}; "
          f"providers used: {', '.join(m['session_providers'])}"
          + (f"; GPU {gpu['name']}, driver {gpu['driver']}" if gpu else ""))
    print(f"{args.runs} interleaved runs per model after {args.warmup} warm-up; B/A < 1 means B is faster\n")
    for note in report["notes"]:
        print(f"note: {note}")
    if report["results"]:
        print(latency_table(report["results"]))
    for skip in report["skipped"]:
        print(f"skipped {skip['shape']} ({skip['provider']}): {skip['reason']}")
    for entry in report["ops"]:
        print()
        print(ops_table(entry))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {path}")
    if args.plot:
        print(f"wrote {write_plot(report, args.plot)}")
    return 0
