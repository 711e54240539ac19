"""Measuring a pair of models on one shape: warm-up, interleaved pairs, the stopping rule, the result record."""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from flashnorm_onnx.errors import VerificationUnavailable, first_line
from flashnorm_onnx.verify.inputs import Case, make_feeds
from flashnorm_onnx.profile.load import LoadMonitor
from flashnorm_onnx.profile.runner import Runner
from flashnorm_onnx.profile.sessions import Settings
from flashnorm_onnx.profile.stats import bootstrap_ratio, summarize


@dataclasses.dataclass
class ModelInfo:
    label: str
    path: Path
    session: object = None
    specs: list = dataclasses.field(default_factory=list)
    created: int = 0  # 0 for the session created first (see sessions.creation_order)


def feeds_for(info: ModelInfo, case: Case, vocab: dict[str, int], dims: dict[str, int] | None, seed: int) -> dict:
    """Generated inputs for one model: the sizes a runtime config beside it states (genai's
    ``kv_cache_dim``, HF's ``head_dim``: each model its own), then ``dims`` (``--dim``) over them."""
    from flashnorm_onnx.verify.inputs import dims_from_configs

    return make_feeds(info.specs, case, dims={**dims_from_configs(info.path), **(dims or {})}, vocab=vocab, seed=seed)


def measure_pair(
    a: ModelInfo,
    b: ModelInfo,
    case: Case,
    settings: Settings,
    vocab: dict[str, int],
    dims: dict[str, int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Interleaved timing of A and B on one shape. Returns the result record."""
    order = [m.label for m in sorted((a, b), key=lambda m: m.created)]  # as the sessions were created
    runners = {label: _runner(a if label == "A" else b, case, settings, vocab, dims) for label in order}
    ra, rb = runners["A"], runners["B"]
    for _ in range(settings.warmup):
        for label in order:
            runners[label].run()
    monitor = LoadMonitor()
    times = time_pairs(ra.run, rb.run, settings, progress)
    load = monitor.finish()
    tokens = case.batch * case.sequence
    return {
        "shape": case.name,
        "batch": case.batch,
        "sequence": case.sequence,
        "past": case.past,
        "tokens": tokens,
        "provider": settings.provider,
        "A": summarize(np.array(times.a), tokens),
        "B": summarize(np.array(times.b), tokens),
        "ratio": times.ratio,
        "pairs": len(times.a),
        "stopped": times.stopped,
        "created_first": order[0],
        "first": times.first,
        "seconds": round(time.perf_counter() - times.start, 3),
        "load": load,
    }


def _runner(info: ModelInfo, case: Case, settings: Settings, vocab: dict[str, int],
            dims: dict[str, int] | None) -> Runner:
    """A model's :class:`Runner` on generated inputs; VerificationUnavailable when it does not run on them."""
    feeds = feeds_for(info, case, vocab, dims, settings.seed)
    try:
        return Runner(info.session, feeds, settings, info.path)
    except Exception as e:
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
        raise VerificationUnavailable(
            f"model {info.label} ({info.path}) does not run on generated inputs for {case.describe()} "
            f"({shapes}): {first_line(e)}; set sizes with --dim NAME=VALUE"
        ) from e


#: the stopping rule looks at the interval only at pair counts that grow by this factor (from
#: min_runs): a few looks instead of one every few pairs (see :func:`checkpoints`)
CHECK_GROWTH = 1.5
#: how often the progress callback is called while timing (seconds)
PROGRESS_EVERY_S = 1.0


def checkpoints(min_runs: int, max_runs: int, growth: float | None = None) -> list[int]:
    """The pair counts at which the stopping rule looks at the interval: min_runs, then each about
    ``growth`` times the last, all even (whole ABBA units), up to max_runs.

    Stopping as soon as a freshly computed interval is narrow enough, every few pairs, makes a
    false claim more likely: a narrow interval tends to come with a chance cluster of pairs away
    from the truth, and with many looks one of them gets through. Geometric looks (1.5x: 10 looks
    from 32 to 1000 pairs) keep their number small while the interval shrinks by about 1/sqrt(1.5)
    between looks; the A/A rate with this rule is tested in ``tests/test_profile_stats.py``.
    """
    growth = CHECK_GROWTH if growth is None else growth
    looks = []
    n = float(max(2, min_runs))
    while True:
        k = min(int(math.ceil(n / 2)) * 2, max_runs)
        if not looks or k > looks[-1]:
            looks.append(k)
        if k >= max_runs:
            return looks
        n *= growth


@dataclasses.dataclass
class PairTimes:
    """What :func:`time_pairs` measured: the times of A and B (seconds, pair by pair), what stopped
    it, when the first pair started, the ratio record the report gives (the same computation the
    stopping rule looked at), and which model ran first in each pair ("A" or "B")."""

    a: list[float]
    b: list[float]
    stopped: str
    start: float
    ratio: dict
    first: str = ""


def time_pairs(run_a: Callable[[], float], run_b: Callable[[], float], settings: Settings,
               progress: Callable[[int], None] | None = None,
               clock: Callable[[], float] = time.perf_counter,
               order: np.random.Generator | None = None) -> PairTimes:
    """Pairs until the stopping rule, in units of two: A B then B A, or B A then A B, chosen at
    random per unit. Both orders come equally often in every unit, so an order effect cancels.
    The random choice keeps interference that recurs every few runs (on a loaded 2-core VM here,
    other processes' timeslices stalled every 3rd or 4th run) from locking onto one model, as it
    did with the fixed A B B A A B B A ... cycle of period 4; and it is drawn afresh in every
    process (``order``: a generator, fresh entropy by default; the tests pass a seeded one), so
    that whatever recurs at the same place in every run (the interval computed at a look) does
    not favour the same model every time. Python's garbage collector is off while timing (as in
    ``timeit``): its pauses come after a fixed count of allocations, at the same pairs in every
    run of the same code.

    ``run_a`` / ``run_b`` run a model once and return its time in seconds (a :class:`Runner`'s
    ``run``, or a list of simulated times in the tests); ``clock`` is the time budget's clock.

    Stopping rule (adaptive, ``settings.runs`` None): at least ``min_runs`` pairs; at each of the
    :func:`checkpoints`, stop if the interval's half-width is within ``target``; after every unit
    (even pair count) from ``min_runs`` on, stop when the time budget is spent; at most
    ``max_runs`` pairs. With ``settings.runs``, exactly that many pairs. The returned ratio is the
    interval the last look computed when that look stopped it, else one computed on all pairs (an
    odd last pair left out, see :func:`~flashnorm_onnx.profile.stats.unit_log_ratios`).
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _time_pairs(run_a, run_b, settings, progress, clock,
                           order if order is not None else np.random.default_rng())
    finally:
        if gc_was_enabled:
            gc.enable()


def _time_pairs(run_a: Callable[[], float], run_b: Callable[[], float], settings: Settings,
                progress: Callable[[int], None] | None, clock: Callable[[], float],
                order: np.random.Generator) -> PairTimes:
    """:func:`time_pairs`' loop."""
    ta: list[float] = []
    tb: list[float] = []
    first: list[str] = []  # which model ran first in each pair, "A" or "B"
    fixed = settings.runs is not None
    limit = settings.runs if fixed else max(settings.max_runs, settings.min_runs)
    looks = [] if fixed else checkpoints(settings.min_runs, limit)
    start = clock()
    stopped = None
    notes: list[str] = []
    ratio = None
    reported, reported_at = 0, start
    while len(ta) < limit:
        if len(ta) % 2 == 0:  # a new unit: A B then B A, or B A then A B, at random
            a_first = bool(order.random() < 0.5)
        else:
            a_first = first[-1] == "B"
        if a_first:
            ta.append(run_a())
            tb.append(run_b())
        else:
            tb.append(run_b())
            ta.append(run_a())
        first.append("A" if a_first else "B")
        n = len(ta)
        if progress and (clock() - reported_at >= PROGRESS_EVERY_S or n == limit):
            # rarely: the update goes through a pipe to the parent process, which wakes up on the
            # same cores (once per pair, it did so just before the first run of every pair)
            progress(n - reported)
            reported, reported_at = n, clock()
        if fixed:
            continue
        if n in looks:
            # the interval the report gives: the line that says why it stopped and the report's
            # interval are one computation (500 resamples here once let them disagree, 38.9% vs 52.8%)
            ratio = bootstrap_ratio(np.array(ta), np.array(tb), seed=settings.seed)
            if ratio["half_width"] <= settings.target:
                stopped = (f"interval half-width {100 * ratio['half_width']:.1f}% <= target "
                           f"{100 * settings.target:g}% (look {looks.index(n) + 1} of {len(looks)})")
                break
        elapsed = clock() - start
        if n % 2 == 0 and n >= settings.min_runs and elapsed >= settings.budget_s:
            stopped = f"time budget {settings.budget_s:g} s"
            if elapsed > 1.25 * settings.budget_s:
                notes.append(f"took {elapsed:.0f} s: the minimum of {settings.min_runs} pairs comes first")
            break
    if progress and reported < len(ta):
        progress(len(ta) - reported)
    if ratio is None or ratio["pairs"] != len(ta) - len(ta) % 2:
        ratio = bootstrap_ratio(np.array(ta), np.array(tb), seed=settings.seed)
    if stopped is None:
        stopped = f"fixed number of pairs ({settings.runs})" if fixed else f"max pairs ({limit})"
    if not stopped.startswith(("interval", "fixed")):
        relation = "<=" if ratio["half_width"] <= settings.target else ">"
        notes.append(f"half-width {100 * ratio['half_width']:.1f}% {relation} target {100 * settings.target:g}%")
    if notes:
        stopped += f" ({'; '.join(notes)})"
    return PairTimes(ta, tb, stopped, start, ratio, "".join(first))
