"""Measuring a pair of models on one shape: warm-up, interleaved A B / B A pairs, the result record."""

from __future__ import annotations

import dataclasses
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


def feeds_for(specs, case: Case, vocab: dict[str, int], dims: dict[str, int] | None, seed: int) -> dict:
    return make_feeds(specs, case, dims=dims, vocab=vocab, seed=seed)


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
    ra = _runner(a, case, settings, vocab, dims)
    rb = _runner(b, case, settings, vocab, dims)
    for _ in range(settings.warmup):
        ra.run()
        rb.run()
    monitor = LoadMonitor()
    ta, tb, stopped, start = _time_pairs(ra, rb, settings, progress)
    load = monitor.finish()
    tokens = case.batch * case.sequence
    ta_arr, tb_arr = np.array(ta), np.array(tb)
    return {
        "shape": case.name,
        "batch": case.batch,
        "sequence": case.sequence,
        "past": case.past,
        "tokens": tokens,
        "provider": settings.provider,
        "A": summarize(ta_arr, tokens),
        "B": summarize(tb_arr, tokens),
        "ratio": bootstrap_ratio(ta_arr, tb_arr, seed=settings.seed),
        "pairs": len(ta),
        "stopped": stopped,
        "seconds": round(time.perf_counter() - start, 3),
        "load": load,
    }


def _runner(info: ModelInfo, case: Case, settings: Settings, vocab: dict[str, int],
            dims: dict[str, int] | None) -> Runner:
    """A model's :class:`Runner` on generated inputs; VerificationUnavailable when it does not run on them."""
    feeds = feeds_for(info.specs, case, vocab, dims, settings.seed)
    try:
        return Runner(info.session, feeds, settings, info.path)
    except Exception as e:
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
        raise VerificationUnavailable(
            f"model {info.label} ({info.path}) does not run on generated inputs for {case.describe()} "
            f"({shapes}): {first_line(e)}; set sizes with --dim NAME=VALUE"
        ) from e


def _time_pairs(ra: Runner, rb: Runner, settings: Settings,
                progress: Callable[[int], None] | None) -> tuple[list[float], list[float], str, float]:
    """Pairs in alternating order (A B, B A, ...) until the stopping rule; returns the times of A
    and of B, what stopped it, and when the first pair started (``time.perf_counter()``)."""
    ta: list[float] = []
    tb: list[float] = []
    fixed = settings.runs is not None
    limit = settings.runs if fixed else max(settings.max_runs, settings.min_runs)
    start = time.perf_counter()
    next_check = settings.min_runs
    stopped = f"fixed number of pairs ({settings.runs})" if fixed else f"max pairs ({limit})"
    while len(ta) < limit:
        if len(ta) % 2 == 0:
            ta.append(ra.run())
            tb.append(rb.run())
        else:
            tb.append(rb.run())
            ta.append(ra.run())
        if progress:
            progress(1)
        n = len(ta)
        if fixed or n < next_check:
            continue
        elapsed = time.perf_counter() - start
        # the same bootstrap as the reported ratio: the line that says why it stopped and the interval
        # the report gives are one computation (500 resamples here once let them disagree, 38.9% vs 52.8%)
        ratio = bootstrap_ratio(np.array(ta), np.array(tb), seed=settings.seed)
        if ratio["half_width"] <= settings.target:
            stopped = f"interval half-width {100 * ratio['half_width']:.1f}% <= target {100 * settings.target:g}%"
            break
        if elapsed >= settings.budget_s:
            stopped = (f"time budget {settings.budget_s:g} s (half-width {100 * ratio['half_width']:.1f}% > "
                       f"target {100 * settings.target:g}%)")
            break
        next_check = n + max(2, n // 10)  # the bootstrap costs little against a run; check often
    return ta, tb, stopped, start
