"""Statistics of the timed pairs: per-model summaries and the B/A ratio with its bootstrap interval."""

from __future__ import annotations

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


def summarize(samples_s: np.ndarray, tokens: int) -> dict:
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    median = float(np.median(ms))
    return {
        "runs": int(ms.size),
        "median_ms": median,
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "std_ms": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        "tokens_per_s": tokens / (median / 1e3) if median > 0 else float("inf"),
        "samples_ms": [round(float(v), 6) for v in ms],
    }


def bootstrap_ratio(a: np.ndarray, b: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """B/A as the median of the per-pair ratios b_i / a_i, with a percentile-bootstrap 95% interval.

    ``a[i]`` and ``b[i]`` are the two runs of pair i (adjacent in time). Resampling whole pairs
    keeps the pairing; the median makes one slow run (a page fault, a neighbour's burst) move
    the answer by at most one rank.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = min(a.size, b.size)
    r = b[:n] / a[:n]
    point = float(np.median(r))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    ratios = np.median(r[idx], axis=1)
    lo, hi = (float(v) for v in np.percentile(ratios, [2.5, 97.5]))
    if lo <= 1.0 <= hi:
        verdict = "no significant difference"
    elif hi < 1.0:
        verdict = "B faster"
    else:
        verdict = "B slower"
    return {"median": point, "ci95": [lo, hi], "half_width": half_width(point, lo, hi), "verdict": verdict,
            "estimator": "median of per-pair ratios, paired percentile bootstrap", "resamples": resamples,
            "pairs": int(n)}


def half_width(point: float, lo: float, hi: float) -> float:
    """The interval's half-width relative to the estimate (0.02 = +-2%)."""
    return (hi - lo) / 2 / point if point > 0 else float("inf")
