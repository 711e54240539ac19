"""A/A false-claim rate of ``flashnorm-onnx profile``: a model timed against itself.

``python -m benchmarks.run_aa`` runs ``flashnorm-onnx profile M --baseline M`` (two sessions of
the same file, through the real command line, one process per run) many times, counts the runs
whose verdict claims a difference, and writes ``benchmarks/RESULTS_aa.md`` with an exact
(Clopper-Pearson) binomial 95% interval for the rate, plus ``benchmarks/results/aa_runs.json``
(one line per run: verdict, B/A, interval, pairs, what stopped it, other load). Every run's full
report, with all samples, stays under ``build/aa/``.

Configurations (``--configs``):

* ``tiny``: the tiny Llama fixture (``models.fixtures.build("llama_dynamo")``, about 1.5 ms a run
  here), prefill 1x128, default settings (target 2%, budget 120 s, minimum 32 pairs);
* ``smollm2``: SmolLM2-135M's dynamo export (``models.smollm2.export("dynamo")``, real weights),
  prefill 1x32, ``--budget 20`` (the issue's A/A runs used 1x128 and ``--budget 20``; 1x32 keeps a
  run near 30 s on a loaded 2-core VM).

Runs of the configurations are interleaved (so that the machine's changing load falls on all of
them) until each has its count, or ``--max-minutes`` has passed; results are written after every
run, so an interrupted measurement keeps what it has.

Also (``--replay``, on by default): the recorded sequences replayed through the old stopping rule
and interval (i.i.d. bootstrap of the median of per-pair ratios, first look at 10 pairs, a look
every ~10% more pairs): how often the old method would have claimed a difference on the same
runs, where the recorded sequence was long enough for it to decide (the new rule's runs are
usually longer than the old rule's). The budget is replayed on the sum of the recorded run times.

``--synthetic`` adds the false-claim rates of the old and new methods on the simulated machines of
``tests/test_profile_stats.py`` (400 seeds each), and the power at a true 15% difference.

Run it with ``nice`` on a shared machine (``--nice`` prefixes each profile run with ``nice -n 10``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "aa"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS_aa.md"
RUNS_JSON = Path(__file__).resolve().parent / "results" / "aa_runs.json"


def _tiny() -> Path:
    from models import fixtures

    return Path(fixtures.build("llama_dynamo"))


def _smollm2() -> Path:
    from models import smollm2

    return Path(smollm2.export("dynamo"))


CONFIGS = {
    "tiny": {"model": _tiny, "args": ["--shape", "p=1x128"], "budget": 120.0,
             "describe": "tiny Llama fixture (llama_dynamo), prefill 1x128, default settings"},
    "smollm2": {"model": _smollm2, "args": ["--shape", "p=1x32", "--budget", "20"], "budget": 20.0,
                "describe": "SmolLM2-135M dynamo export, prefill 1x32, --budget 20"},
}


#: the measurement before the last fixes, kept for the record (its per-run lines are in
#: results/aa_runs_seeded_order.json)
EARLIER = """## Before: a fixed unit order and creation order

The same command, 2026-12-03 13:21-13:51 (load average 4-11 on the 2 cores), on the method as it is
now except that the order of the units was drawn from `--seed` (so the same in every run with the
default seed), A's session was always created and warmed up first, and Python's garbage collector
ran while timing: 6 claims in 112 runs (5.4% [2.0%, 11.3%]), all six "B faster"; B/A averaged
0.977 over the 89 tiny-Llama runs (standard error 0.7%, 65% of them below 1) and 0.984 over the 23
SmolLM2 runs (0.6%, 70% below 1): a bias towards B that no interval computed within one run can
see. Now the unit order and the creation order are drawn afresh in every run and the collector is
off while timing; the table of B/A by the session created first (above) shows where most of that
bias came from: the session created first runs about 1.5% slower. Per-run lines:
[`results/aa_runs_seeded_order.json`](results/aa_runs_seeded_order.json)."""


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials (bisection on the binomial tail)."""
    if n == 0:
        return 0.0, 1.0
    alpha = 1 - confidence

    def tail_ge(p: float) -> float:  # P(X >= k)
        return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))

    def tail_le(p: float) -> float:  # P(X <= k)
        return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(0, k + 1))

    def solve(f, target: float, increasing: bool) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if (f(mid) < target) == increasing:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(tail_ge, alpha / 2, increasing=True)
    upper = 1.0 if k == n else solve(tail_le, alpha / 2, increasing=False)
    return lower, upper


def profile_once(config: str, model: Path, index: int, use_nice: bool) -> dict:
    """One ``flashnorm-onnx profile M --baseline M`` run; its summary line."""
    BUILD.mkdir(parents=True, exist_ok=True)
    report_path = BUILD / f"{config}_{index:04d}.json"
    cmd = [sys.executable, "-m", "flashnorm_onnx.cli", "profile", str(model), "--baseline", str(model),
           *CONFIGS[config]["args"], "--no-progress", "--json", str(report_path)]
    niceness = os.nice(0)
    if use_nice:
        cmd = ["nice", "-n", "10", *cmd]
        niceness = min(19, niceness + 10)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        return {"config": config, "index": index, "error": (proc.stderr or proc.stdout).strip()[-500:],
                "seconds": round(seconds, 1), "nice": niceness}
    report = json.loads(report_path.read_text())
    (r,) = report["results"]
    ratio = r["ratio"]
    return {"config": config, "index": index, "verdict": ratio["verdict"], "ratio": round(ratio["median"], 5),
            "ci95": [round(v, 5) for v in ratio["ci95"]], "half_width": round(ratio["half_width"], 5),
            "pairs": r["pairs"], "stopped": r["stopped"], "seconds": round(seconds, 1),
            "other_cores_busy": r["load"]["other_cores_busy"], "load_before": r["load"]["load_before"],
            "competed": r["load"]["competed"], "nice": niceness, "created_first": r.get("created_first"),
            "report": str(report_path.relative_to(ROOT))}


def _old_ratio(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    r = b / a
    idx = np.random.default_rng(seed).integers(0, r.size, size=(resamples, r.size))
    lo, hi = np.percentile(np.median(r[idx], axis=1), [2.5, 97.5])
    return {"half_width": (hi - lo) / 2 / float(np.median(r)), "claims": not lo <= 1.0 <= hi}


def old_rule_replay(a: list[float], b: list[float], budget_s: float, target: float = 0.02,
                    min_runs: int = 10, max_runs: int = 1000) -> bool | None:
    """The old stopping rule and interval on a recorded sequence: True/False (claims a difference
    or not), None when the sequence ends before the old rule would have stopped."""
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    elapsed = np.cumsum(a_arr + b_arr)
    look = min_runs
    for n in range(1, min(a_arr.size, max_runs) + 1):
        if n < look:
            continue
        r = _old_ratio(a_arr[:n], b_arr[:n])
        if r["half_width"] <= target or elapsed[n - 1] >= budget_s or n == max_runs:
            return r["claims"]
        look = n + max(2, n // 10)
    if a_arr.size >= max_runs:  # the old loop ended at max_runs and reported what it had
        return _old_ratio(a_arr[:max_runs], b_arr[:max_runs])["claims"]
    return None


def replay(run: dict) -> bool | None:
    report = json.loads((ROOT / run["report"]).read_text())
    (r,) = report["results"]
    a = [v / 1e3 for v in r["A"]["samples_ms"]]
    b = [v / 1e3 for v in r["B"]["samples_ms"]]
    return old_rule_replay(a, b, CONFIGS[run["config"]]["budget"])


def synthetic(seeds: int = 400) -> list[dict]:
    """Old and new false-claim rates on the simulated machines of tests/test_profile_stats.py."""
    sys.path.insert(0, str(ROOT))
    import tests.test_profile_stats as sim

    rows = []
    for name, machine in (("random machines", None), ("correlated", sim.CORRELATED),
                          ("overloaded", sim.OVERLOADED)):
        new = sum(sim.run_rule(s, machine=machine).ratio["verdict"] != "no significant difference"
                  for s in range(seeds))
        old = sum(sim.old_rule(s, machine=machine)["claims"] for s in range(seeds))
        rows.append({"machine": name, "seeds": seeds, "new_claims": new, "old_claims": old})
    for ratio in (1 / 1.15, 1.15):
        verdict = "B faster" if ratio < 1 else "B slower"
        found = sum(sim.run_rule(10_000 + s, ratio).ratio["verdict"] == verdict for s in range(seeds // 2))
        rows.append({"machine": f"random machines, true B/A {ratio:.3f}", "seeds": seeds // 2, "new_found": found})
    return rows


def _created_first(run: dict) -> str | None:
    if run.get("created_first"):
        return run["created_first"]
    path = ROOT / run.get("report", "")
    if run.get("report") and path.exists():
        return json.loads(path.read_text())["results"][0].get("created_first")
    return None


def _creation_order_lines(ok: list[dict], configs: list[str]) -> list[str]:
    """B/A by which session was created first (the report's ``created_first``)."""
    rows = []
    for config in configs:
        for first in ("A", "B"):
            logs = np.log([r["ratio"] for r in ok if r["config"] == config and _created_first(r) == first])
            if logs.size > 1:
                rows.append(f"| {CONFIGS[config]['describe']} | {first} | {logs.size} | {np.exp(logs.mean()):.3f} "
                            f"({100 * logs.std(ddof=1) / np.sqrt(logs.size):.1f}%) |")
    if not rows:
        return []
    return ["", "## B/A by the session created first", "",
            "Which session is created first is drawn in every run; B/A averaged over the runs of each kind "
            "(geometric mean, standard error in parentheses).", "",
            "| configuration | created first | runs | B/A |", "|---|---|---|---|", *rows]


def _pct(k: int, n: int) -> str:
    lo, hi = clopper_pearson(k, n)
    return f"{k}/{n} = {100 * k / n:.1f}% [{100 * lo:.1f}%, {100 * hi:.1f}%]" if n else "-"


def write_results(runs: list[dict], args, started: float, synthetic_rows: list[dict] | None,
                  final: bool = False, minutes: float | None = None) -> None:
    RUNS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RUNS_JSON.write_text("[\n" + ",\n".join(json.dumps(r) for r in runs) + "\n]\n")
    ok = [r for r in runs if "verdict" in r]
    lines = ["# A/A false-claim rate of `flashnorm-onnx profile`", "",
             "A model timed against itself (`profile M --baseline M`: two sessions of the same file) "
             "should claim a difference at most 1 time in 10 (issue 24; nominal 1 in 20).", "",
             f"Command: `{args.command or ' '.join(['python -m benchmarks.run_aa'] + sys.argv[1:])}` "
             f"({time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, "
             f"{minutes if minutes is not None else (time.time() - started) / 60:.0f} min of runs). Each run is one "
             "`python -m flashnorm_onnx.cli profile M --baseline M ... --no-progress --json ...` process, "
             f"at niceness {_niceness(runs)}.", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{platform.system()} {platform.release()}; onnxruntime {_ort_version()}. "
             "**Shared:** other engineers' test suites and builds ran on the same 2 cores during the "
             "measurement (see the load columns), a harsher setting than an idle machine.", "",
             "| configuration | runs | claims (95% interval) | B faster | B slower | B/A: mean (s.e.), below 1 | "
             "half-width (median) | pairs (median) | stopped by target / budget / max | other work (median cores) | "
             "load avg at start (median) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    total_k = total_n = 0
    for config in args.configs:
        rs = [r for r in ok if r["config"] == config]
        if not rs:
            continue
        k = sum(r["verdict"] != "no significant difference" for r in rs)
        total_k += k
        total_n += len(rs)
        stops = [r["stopped"].split()[0] for r in rs]
        busy = [r["other_cores_busy"] for r in rs if r["other_cores_busy"] is not None]
        load = [r["load_before"][0] for r in rs if r["load_before"]]
        logs = np.log([r["ratio"] for r in rs])
        se = logs.std(ddof=1) / np.sqrt(logs.size) if logs.size > 1 else float("nan")
        lines.append(f"| {CONFIGS[config]['describe']} | {len(rs)} | {_pct(k, len(rs))} | "
                     f"{sum(r['verdict'] == 'B faster' for r in rs)} | {sum(r['verdict'] == 'B slower' for r in rs)} | "
                     f"{np.exp(logs.mean()):.3f} ({100 * se:.1f}%), {100 * (logs < 0).mean():.0f}% | "
                     f"{100 * np.median([r['half_width'] for r in rs]):.1f}% | "
                     f"{int(np.median([r['pairs'] for r in rs]))} | {stops.count('interval')} / {stops.count('time')} / "
                     f"{stops.count('max')} | {np.median(busy) if busy else float('nan'):.2f} | "
                     f"{np.median(load) if load else float('nan'):.2f} |")
    if total_n:
        lines.append(f"| **all** | {total_n} | **{_pct(total_k, total_n)}** | | | | | | | | |")
    lines += _creation_order_lines(ok, args.configs)
    errors = [r for r in runs if "error" in r]
    if errors:
        lines += ["", f"{len(errors)} runs failed (not counted): " + "; ".join(e["error"][-120:] for e in errors[:3])]
    if args.replay and ok and final:  # replayed once, at the end (it costs CPU while measuring)
        lines += ["", "## The old method on the same runs", "",
                  "Each recorded sequence replayed through the old stopping rule and interval (i.i.d. "
                  "percentile bootstrap of the median of per-pair ratios; first look at 10 pairs, then "
                  "every ~10% more; budget replayed on the recorded run times). Where the recording "
                  "ended before the old rule would have stopped, the run is left out.", "",
                  "| configuration | decided | old method's claims (95% interval) |", "|---|---|---|"]
        for config in args.configs:
            decided = [v for v in (replay(r) for r in ok if r["config"] == config) if v is not None]
            if decided:
                lines.append(f"| {CONFIGS[config]['describe']} | {len(decided)} | {_pct(sum(decided), len(decided))} |")
    if synthetic_rows:
        lines += ["", "## Simulated machines (`tests/test_profile_stats.py`)", "",
                  "The real stopping rule (`measure.time_pairs`, default settings) on simulated A/A "
                  "sequences through a fake runner; the old method reproduced in the test file.",
                  "",
                  "| machine | seeds | new method: claims | old method: claims |", "|---|---|---|---|"]
        for row in synthetic_rows:
            if "new_claims" in row:
                lines.append(f"| {row['machine']} | {row['seeds']} | {_pct(row['new_claims'], row['seeds'])} | "
                             f"{_pct(row['old_claims'], row['seeds'])} |")
        lines += ["", "| power: machine | seeds | true difference found |", "|---|---|---|"]
        for row in synthetic_rows:
            if "new_found" in row:
                lines.append(f"| {row['machine']} | {row['seeds']} | {row['new_found']}/{row['seeds']} |")
    lines += ["", "Per-run lines: [`results/aa_runs.json`](results/aa_runs.json); full reports with every "
              "sample under `build/aa/` (not committed).", "", EARLIER, ""]
    RESULTS_MD.write_text("\n".join(lines))


def _niceness(runs: list[dict]) -> str:
    levels = sorted({r["nice"] for r in runs if "nice" in r})
    return ", ".join(str(v) for v in levels) if levels else "?"


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "smollm2"], choices=sorted(CONFIGS))
    p.add_argument("--runs", nargs="+", type=int, default=[100, 25],
                   help="runs per configuration, in the order of --configs (default 100 25)")
    p.add_argument("--max-minutes", type=float, default=30.0, help="stop starting runs after this long")
    p.add_argument("--nice", action="store_true", help="run each profile under nice -n 10")
    p.add_argument("--no-replay", dest="replay", action="store_false",
                   help="do not replay the old method on the recorded runs")
    p.add_argument("--synthetic", action="store_true", help="add the simulated machines' rates (about 1 min)")
    p.add_argument("--from-json", action="store_true",
                   help=f"measure nothing: rewrite {RESULTS_MD.name} from {RUNS_JSON.name} (and build/aa/)")
    p.add_argument("--command", help="with --from-json: the command that measured the runs, for the text")
    p.add_argument("--started", help="with --from-json: when the measurement started (YYYY-mm-dd HH:MM)")
    args = p.parse_args(argv)
    if args.from_json:
        runs = json.loads(RUNS_JSON.read_text())
        started = (time.mktime(time.strptime(args.started, "%Y-%m-%d %H:%M")) if args.started
                   else RUNS_JSON.stat().st_mtime)
        write_results(runs, args, started, synthetic() if args.synthetic else None, final=True,
                      minutes=sum(r["seconds"] for r in runs) / 60)
        print(f"wrote {RESULTS_MD}")
        return 0
    if len(args.runs) != len(args.configs):
        p.error("give one --runs count per configuration")
    started = time.time()
    models = {}
    for config in args.configs:
        try:
            models[config] = CONFIGS[config]["model"]()
        except Exception as e:  # a model that cannot be built here is left out, and said so
            print(f"skipping {config}: {e}", file=sys.stderr)
    wanted = {c: n for c, n in zip(args.configs, args.runs) if c in models}
    # interleave: at each step run the configuration furthest behind its share
    done = {c: 0 for c in wanted}
    runs: list[dict] = []
    while any(done[c] < wanted[c] for c in wanted) and time.time() - started < 60 * args.max_minutes:
        config = min((c for c in wanted if done[c] < wanted[c]), key=lambda c: done[c] / wanted[c])
        run = profile_once(config, models[config], done[config], args.nice)
        done[config] += 1
        runs.append(run)
        print(json.dumps(run), flush=True)
        write_results(runs, args, started, None)
    synthetic_rows = synthetic() if args.synthetic else None  # after the measurement: it loads the CPU
    write_results(runs, args, started, synthetic_rows, final=True)
    print(f"wrote {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
