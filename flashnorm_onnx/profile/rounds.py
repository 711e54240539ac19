"""Rounds: one shape timed on several fresh pairs of sessions, and the ratio taken over them.

Two sessions of one file, created one after the other in one process, run at different speeds
(a few percent on this project's 2-core VM; each session created later ran faster than the one
before: docs/profile.md). That session effect is fixed for as long as the sessions live, so the
interval computed from the pairs of one session pair cannot see it: a model timed against itself
claimed a difference in 10 of 12 runs on a quiet machine. So each shape is timed in
``settings.rounds`` rounds, each on a fresh pair of sessions created in the opposite order to the
round before (the first round's order at random), and B/A with its interval comes from the
rounds (:func:`~flashnorm_onnx.profile.stats.rounds_ratio`): their spread holds the session effect.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections import Counter
from typing import Callable

import numpy as np

from flashnorm_onnx.profile.measure import ModelInfo, measure_pair
from flashnorm_onnx.profile.sessions import Settings
from flashnorm_onnx.profile.stats import rounds_ratio, summarize
from flashnorm_onnx.verify.inputs import Case


#: a CPU session holds about its model's weights once (prepacked); with margin for the arenas
SESSION_BYTES_PER_WEIGHT_BYTE = 1.5


def rounds_that_fit(settings: Settings, weight_bytes: int, available: int | None) -> tuple[Settings, str | None]:
    """``settings`` with one round, and why, when a second pair of CPU sessions (A and B,
    ``weight_bytes`` together) would not fit beside the first in ``available`` bytes (a round
    after the first opens its pair while the first stays open for the other shapes)."""
    if settings.rounds <= 1 or settings.provider != "cpu" or available is None:
        return settings, None
    need = 2 * SESSION_BYTES_PER_WEIGHT_BYTE * weight_bytes
    if need <= 0.9 * available:
        return settings, None
    note = (f"timed on one session pair, not in {settings.rounds} rounds: two pairs of sessions would need about "
            f"{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB is available; the interval cannot see the speed "
            "difference between two sessions of one file (a few percent): read a difference under 5% as unresolved")
    return dataclasses.replace(settings, rounds=1), note


def round_settings(settings: Settings) -> Settings:
    """One round's share: ``runs`` pairs (when fixed) in each round; otherwise the budget, the
    minimum (at least 8 pairs) and the maximum divided among the rounds, and a round stops once its
    own interval is within ``target`` * sqrt(rounds) (the rounds' mean is that much tighter)."""
    rounds = settings.rounds
    if settings.runs is not None or rounds == 1:
        return settings
    least = max(8, 2 * math.ceil(settings.min_runs / rounds / 2))
    return dataclasses.replace(settings, budget_s=settings.budget_s / rounds, min_runs=least,
                               max_runs=max(least, settings.max_runs // rounds),
                               target=settings.target * math.sqrt(rounds))


def measure_rounds(first: list[ModelInfo], case: Case, settings: Settings, vocab: dict[str, int],
                   dims: dict[str, int] | None, reopen: Callable[[tuple[str, str]], list[ModelInfo]],
                   progress: Callable[[int], None] | None = None) -> dict:
    """Time A against B on ``case`` in rounds (see the module docstring). ``first``: the open
    [A, B] pair, used for round 1; ``reopen(order)`` opens a fresh [A, B] pair, the sessions created
    in ``order``. Every round after the first runs on its own pair, closed when the round ends. The
    time budget counts the whole: no new round starts once it is spent (at least 2 rounds run)."""
    per = round_settings(settings)
    start = time.perf_counter()
    results = []
    pair = first
    order = tuple(m.label for m in sorted(first, key=lambda m: m.created))
    for k in range(settings.rounds):
        if k:
            order = order[::-1]
            pair = reopen(order)
        try:
            results.append(measure_pair(pair[0], pair[1], case, per, vocab, dims, progress))
        finally:
            if k:
                del pair
                gc.collect()
        if k >= 1 and settings.runs is None and time.perf_counter() - start >= settings.budget_s:
            break
    return combine(results)


def combine(results: list[dict]) -> dict:
    """One result record from the rounds' records: samples pooled, the ratio over the rounds."""
    if len(results) == 1:
        return {**results[0], "rounds": [_round_entry(results[0])]}
    first = results[0]
    ratio = rounds_ratio([r["ratio"] for r in results])
    loads = [r["load"] for r in results]
    busy = [x["other_cores_busy"] for x in loads if x.get("other_cores_busy") is not None]
    return {
        **{k: first[k] for k in ("shape", "batch", "sequence", "past", "tokens", "provider")},
        **{label: summarize(np.concatenate([r[label]["samples_ms"] for r in results]) / 1e3, first["tokens"])
           for label in "AB"},
        "ratio": ratio,
        "pairs": sum(r["pairs"] for r in results),
        "stopped": f"{len(results)} rounds on fresh session pairs, stopped by " + ", ".join(
            f"{why} x{n}" for why, n in Counter(_why(r["stopped"]) for r in results).items()),
        "created_first": first["created_first"],
        "first": "".join(r["first"] for r in results),
        "seconds": round(sum(r["seconds"] for r in results), 3),
        "load": {**loads[-1], "competed": any(x.get("competed") for x in loads),
                 "other_cores_busy": max(busy) if busy else None, "load_before": loads[0].get("load_before")},
        "rounds": [_round_entry(r) for r in results],
    }


def _why(stopped: str) -> str:
    for start, why in (("interval", "their interval"), ("time budget", "the time budget"),
                       ("fixed", "a fixed count"), ("max pairs", "max pairs")):
        if stopped.startswith(start):
            return why
    return stopped


def _round_entry(result: dict) -> dict:
    return {"pairs": result["pairs"], "created_first": result["created_first"],
            "estimate": result["ratio"]["estimate"], "ci95": result["ratio"]["ci95"], "stopped": result["stopped"]}
