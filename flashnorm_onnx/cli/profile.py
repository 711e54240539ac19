"""``flashnorm-onnx profile``: latency of a folded model against its input, interleaved."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flashnorm_onnx.errors import FlashNormError

# flashnorm_onnx.profile.sessions.DEFAULT_MIN_RUNS (not imported: the CLI imports the profiler only
# when it runs; tests/test_profile_stats.py checks that the two agree)
DEFAULT_MIN_RUNS = 32
DEFAULT_ROUNDS = 4  # flashnorm_onnx.profile.sessions.DEFAULT_ROUNDS

DESCRIPTION = """\
Time MODEL (B, usually MODEL.flashnorm.onnx) against --baseline (A) in one process: after
warm-up the two run interleaved in pairs (A B + B A or B A + A B, at random) so that drift
hits both, on one intra-op thread pool shared by both sessions (with a pool each, the idle
session's spinning threads take the cores of the one being timed). Per shape and provider:
median, p90, p99 latency, tokens/s, and B/A with a 95% interval ('no significant difference'
when it holds 1). B/A is the 25%-trimmed mean of the per-pair ratios (in logs); its interval
is a t interval whose standard error comes from a circular block bootstrap over ABBA units
(two neighbouring pairs, A B then B A), so that correlated neighbouring pairs and the order
within a pair are accounted for. By default at least --min-runs pairs run; then the interval
is checked at pair counts growing 1.5x (32, 48, 72, ...), and timing stops when its
half-width is within --target (2%), or after --budget seconds per shape pass; the output
says which stopped it. Two sessions of one file differ in speed by a few percent (with their
order of creation), which no interval from one session pair can see: a model timed against
itself then claimed a difference in 10 of 12 runs on a quiet machine. So each shape is timed in
--rounds rounds (4), each on a fresh pair of sessions created in the opposite order to the round
before, and B/A and its interval come from the rounds (t on rounds - 1 degrees of freedom; the
budget, minimum and maximum are shared among them, and a round stops at target x sqrt(rounds)):
0 false claims in 20 such runs (docs/profile.md). Other processes' CPU use while
measuring is reported, with a warning when it competed. Inputs are generated as optimize's
verification does; a shape with past=N times one step on a KV cache of N tokens (models with
cache inputs only). Inputs, outputs and the cache are bound on the device (IO binding).
"""

EXAMPLES = """\
examples:
  flashnorm-onnx profile model.flashnorm.onnx --baseline model.onnx
  flashnorm-onnx profile model.flashnorm.onnx --baseline model.onnx --shape prefill=1x512 \\
      --shape decode=1x1,past=1024 --target 1 --budget 300 --ops --json prof.json --plot prof.png
  flashnorm-onnx profile model.flashnorm.onnx --baseline model.onnx --threads 1 --runs 100
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
    p.add_argument("--runs", type=int, help="a fixed number of interleaved pairs per round (default: adaptive, "
                   "see --target and --budget); under 32 in all the interval is rough, under 6 a round has none")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                   help=f"fresh session pairs per shape (default {DEFAULT_ROUNDS}): two sessions of one file differ in "
                   "speed by a few percent, so B/A and its interval come from rounds on new sessions, created in "
                   "alternating order; 1 = one session pair (faster; its interval cannot see that difference)")
    p.add_argument("--target", type=float, default=2.0, metavar="PCT",
                   help="stop when the 95%% interval of B/A is within +-PCT%% of it (default 2)")
    p.add_argument("--budget", type=float, default=120.0, metavar="SECONDS",
                   help="stop a shape after this long even if the target is not met (default 120)")
    p.add_argument("--min-runs", type=int, default=DEFAULT_MIN_RUNS,
                   help=f"pairs before the first stopping check (default {DEFAULT_MIN_RUNS}: the false-claim rate "
                   "was measured with it; fewer make false claims likelier)")
    p.add_argument("--max-runs", type=int, default=1000, help="most pairs per shape (default 1000)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up runs of each model per shape (default 5)")
    p.add_argument("--ops", action="store_true", help="also profile op types with ORT's profiler and compare by group")
    p.add_argument("--ops-runs", type=int, help="runs per model under the profiler (default min(runs, 10))")
    p.add_argument("--json", metavar="PATH", help="write the full report (all samples) as JSON")
    p.add_argument("--plot", metavar="PNG", help="write a PNG of the latency distributions and the op groups")
    p.add_argument("--cuda-graph", action="store_true", help="capture a CUDA graph (CUDA provider only)")
    p.add_argument("--fallback-cpu", action="store_true",
                   help="when the CUDA provider cannot load, measure on CPU instead of failing")
    p.add_argument("--threads", type=int, help="intra-op threads of the shared pool (default: ORT's choice, one "
                   "per physical core); --threads 1 gives the steadiest CPU numbers")
    p.add_argument("--dim", action="append", metavar="NAME=VALUE", help="value for a symbolic input dimension")
    p.add_argument("--seed", type=int, default=0, help="seed for generated inputs and the bootstrap")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)
    return p


def run(args) -> int:
    """Check the options, measure, print the tables, write the JSON and plot asked for."""
    from flashnorm_onnx.cli.common import parse_dims
    from flashnorm_onnx.profile import profile

    shapes, providers = _checked(args)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    report = profile(
        args.baseline, args.model, shapes=shapes, providers=providers, runs=args.runs, warmup=args.warmup,
        ops=args.ops, ops_runs=args.ops_runs, cuda_graph=args.cuda_graph, fallback_cpu=args.fallback_cpu,
        threads=args.threads, dims=parse_dims(args.dim), seed=args.seed, progress=not args.no_progress, log=log,
        target=args.target / 100, budget_s=args.budget, min_runs=args.min_runs, max_runs=args.max_runs,
        rounds=args.rounds,
    )
    report["command"] = ["flashnorm-onnx"] + sys.argv[1:] if sys.argv and "flashnorm" in sys.argv[0] else None
    _print(report, args)
    _write(report, args)
    return 0


def _checked(args):
    """(shapes, providers) from the options; a bad value is one line (exit 2) before anything runs."""
    from flashnorm_onnx.profile import parse_shape

    try:
        shapes = [parse_shape(s) for s in args.shape] if args.shape else None
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if args.runs is not None and args.runs < 2:
        raise argparse.ArgumentTypeError("--runs must be at least 2")
    if args.rounds < 1:
        raise argparse.ArgumentTypeError("--rounds must be at least 1")
    if not (0 < args.target < 100):
        raise argparse.ArgumentTypeError("--target is a percentage between 0 and 100, e.g. 2")
    if not (args.budget > 0):
        raise argparse.ArgumentTypeError("--budget must be a positive number of seconds")
    if args.min_runs < 2 or args.max_runs < args.min_runs:
        raise argparse.ArgumentTypeError("need 2 <= --min-runs <= --max-runs")
    if args.threads is not None and args.threads < 1:
        raise argparse.ArgumentTypeError("--threads must be at least 1")
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
    return shapes, providers


def _print(report: dict, args) -> None:
    """The models, the machine, how long it measured, then the latency and op tables."""
    from flashnorm_onnx.profile import latency_table, ops_table

    m = report["machine"]
    print(f"A (baseline): {report['models']['A']['path']}")
    print(f"B:            {report['models']['B']['path']}")
    gpu = m.get("gpu")
    print(f"machine: {m['processor']}, {m['cpu_count']} cores; onnxruntime {m['onnxruntime']}; "
          f"providers used: {', '.join(m['session_providers'])}"
          + (f"; GPU {gpu['name']}, driver {gpu['driver']}" if gpu else ""))
    threading = report["settings"]["threading"]
    print(f"threads: {threading['intra_op_threads']}, {threading['pool']}")
    length = (f"{args.runs} interleaved pairs per round" if args.runs else
              f"interleaved pairs until the interval is within +-{args.target:g}% or {args.budget:g} s per shape")
    length = f"{args.rounds} round{'s' if args.rounds > 1 else ''} on fresh session pairs, {length}"
    print(f"{length}, after {args.warmup} warm-up runs each; B/A < 1 means B is faster\n")
    for note in report["notes"]:
        print(f"note: {note}")
    if report["results"]:
        print(latency_table(report["results"]))
    for skip in report["skipped"]:
        print(f"skipped {skip['shape']} ({skip['provider']}): {skip['reason']}")
    for entry in report["ops"]:
        print()
        print(ops_table(entry))


def _write(report: dict, args) -> None:
    """``--json`` and ``--plot``."""
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {path}")
    if args.plot:
        from flashnorm_onnx.profile import write_plot

        print(f"wrote {write_plot(report, args.plot)}")
