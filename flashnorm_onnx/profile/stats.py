"""Statistics of the timed pairs: per-model summaries and the B/A ratio with its interval.

The interval (see :func:`bootstrap_ratio`) has to hold up on what a busy machine produces:
drift, level shifts, runs of slow pairs (neighbouring pairs are correlated), an order effect
within a pair, and stalls (on this project's loaded 2-core VM, up to a quarter of the runs).
Its false-claim rate on a model against itself is tested on synthetic sequences with all of
these (``tests/test_profile_stats.py``) and measured on real models (``benchmarks/run_aa.py``).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
#: the share of the pair log ratios the estimate drops at each end (stalls, a neighbour's burst)
TRIM = 0.25
#: fewer ABBA units (2 pairs each) than this give no interval (0 to infinity, no claim)
MIN_UNITS = 3
ESTIMATOR = ("25%-trimmed mean of per-pair log ratios; circular block bootstrap over ABBA units (two "
             "neighbouring pairs, A B then B A) for its standard error; t interval on (blocks - 1) "
             "degrees of freedom")


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


def unit_log_ratios(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """log(b_i / a_i) of each pair, as an (m, 2) array of ABBA units: row j holds pairs 2j (A B)
    and 2j+1 (B A). An odd last pair is left out (it would unbalance the two orders).

    Resampling whole units keeps the two orders balanced in every resample, so an order effect
    (a run that follows the other model's run slower or faster: about 5% on a loaded 2-core VM
    here) cancels as it does in the estimate, instead of widening the interval.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    m = min(a.size, b.size) // 2
    d = np.log(b[:2 * m]) - np.log(a[:2 * m])
    return d.reshape(m, 2)


def block_length(units: int) -> int:
    """Block length of the bootstrap, in units: about units^(1/3) (the usual order for a block
    bootstrap of a location statistic), so blocks grow as pairs accumulate while their number
    grows too (32 pairs: 16 units in blocks of 3; 200 pairs: 100 units in blocks of 5), and at
    least 3 blocks."""
    return max(1, min(int(round(units ** (1 / 3))), units // 3))


def t_quantile(p: float, dof: float) -> float:
    """Student's t quantile (Cornish-Fisher expansion, Abramowitz & Stegun 26.7.5; within 1% of the
    exact value for dof >= 2, which is all it is used for)."""
    z = NormalDist().inv_cdf(p)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    v = max(float(dof), 2.0)
    return z + g1 / v + g2 / v ** 2 + g3 / v ** 3 + g4 / v ** 4


def trim_count(count: int) -> int:
    """How many of ``count`` sorted values the trimmed mean drops at each end."""
    return int(math.floor(TRIM * count))


def trimmed_mean(values: np.ndarray) -> float:
    """The mean of the middle values, :data:`TRIM` of them dropped at each end."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    g = trim_count(v.size)
    return float(v[g:v.size - g].mean())


def block_bootstrap_estimates(units: np.ndarray, block: int, resamples: int,
                              rng: np.random.Generator) -> np.ndarray:
    """The trimmed mean of ``resamples`` circular-block-bootstrap resamples of the units: each
    resample is ceil(m / block) runs of ``block`` neighbouring units (wrapping around the end)
    from random starts, cut to m units, so neighbours' correlation stays within a block."""
    m = units.shape[0]
    count = -(-m // block)
    starts = rng.integers(0, m, size=(resamples, count))
    idx = (starts[:, :, None] + np.arange(block)) % m
    idx = idx.reshape(resamples, count * block)[:, :m]
    values = units[idx].reshape(resamples, 2 * m)
    g = trim_count(2 * m)
    return np.sort(values, axis=1)[:, g:2 * m - g].mean(axis=1)


def bootstrap_ratio(a: np.ndarray, b: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """B/A with a 95% interval that holds up under drift, correlated neighbouring pairs and stalls.

    ``a[i]`` and ``b[i]`` are the two runs of pair i (adjacent in time; pairs 2j and 2j+1 ran in
    opposite orders; an odd last pair is left out, and ``pairs`` in the record counts the pairs used).

    * Estimate (the record's ``estimate``, and ``median`` as the first version named it): exp of the
      25%-trimmed mean of the per-pair log ratios, the mean of their middle half. Stalls fall in the trimmed
      quarters (on the loaded VM here, a quarter of the runs stalled at 2-10x; an average over
      several runs, such as a whole ABBA unit's, is hit far more often than one pair); on clean
      noise it wastes less than the median, and its bootstrap is smooth.
    * Standard error: circular block bootstrap over ABBA units (:func:`unit_log_ratios`) in blocks
      of about m^(1/3) neighbouring units (:func:`block_length`): slow changes and runs of slow
      pairs stay inside a block instead of being treated as independent draws, which made the old
      i.i.d. bootstrap over pairs too narrow.
    * Interval: estimate +- t * SE in log space, t on (blocks - 1) degrees of freedom, the SE
      scaled by sqrt(k / (k - 1)) for k blocks (the bootstrap's variance divides by k). The
      bootstrap sees only k independent pieces of the sequence: at 32 pairs (16 units, 5.3 blocks
      of 3) t is 2.69 and the scale 1.11, where the i.i.d. bootstrap's percentiles amount to
      about 1.96. (Percentiles of the bootstrap read correspondingly far out in its tails were
      too short: over a few blocks its tails are thinner than t's; 8% false claims at a fixed 24
      pairs on the simulated machines, against 5-6% for this.)
    * Verdict: "no significant difference" when the interval holds 1.
    """
    u = unit_log_ratios(a, b)
    m = u.shape[0]
    if m < MIN_UNITS:  # too few to say anything: the interval is everything
        point = float(np.exp(trimmed_mean(u))) if m else 1.0
        return {"median": point, "estimate": point, "ci95": [0.0, math.inf], "half_width": math.inf,
                "verdict": "no significant difference", "estimator": ESTIMATOR, "resamples": 0, "pairs": 2 * m,
                "units": m, "block": 0, "t": math.inf, "se_log": math.inf}
    center = trimmed_mean(u)
    point = float(np.exp(center))
    block = block_length(m)
    k = m / block
    estimates = block_bootstrap_estimates(u, block, resamples, np.random.default_rng(seed))
    se = float(np.std(estimates, ddof=1)) * math.sqrt(k / (k - 1))
    t = t_quantile(1 - (1 - CONFIDENCE) / 2, k - 1)
    lo, hi = math.exp(center - t * se), math.exp(center + t * se)
    verdict = verdict_of(lo, hi)
    return {"median": point, "estimate": point, "ci95": [lo, hi], "half_width": half_width(point, lo, hi),
            "verdict": verdict,
            "estimator": ESTIMATOR, "resamples": resamples, "pairs": 2 * m, "units": m, "block": block,
            "t": round(t, 4), "se_log": se}


def verdict_of(lo: float, hi: float) -> str:
    """"no significant difference" when the interval [lo, hi] holds 1; else which model is faster."""
    if lo <= 1.0 <= hi:
        return "no significant difference"
    return "B faster" if hi < 1.0 else "B slower"


def half_width(point: float, lo: float, hi: float) -> float:
    """The interval's half-width relative to the estimate (0.02 = +-2%)."""
    return (hi - lo) / 2 / point if point > 0 else float("inf")


def rounds_ratio(per: list[dict]) -> dict:
    """B/A over several rounds, each timed on a fresh pair of sessions (``per``: each round's
    :func:`bootstrap_ratio` record).

    Two sessions of one file differ in speed by a few percent, with their order of creation
    (docs/profile.md): a session effect that stays fixed through a round, so no interval computed
    within one round can see it. Each round's estimate is :func:`bootstrap_ratio`'s (its 25%-trimmed
    mean of log ratios); the combined estimate is their mean (in logs), its standard error the
    larger of the spread between rounds (which holds the session effect) and the rounds' own
    bootstrap errors averaged, and the interval a t interval on (rounds - 1) degrees of freedom.
    One round: that round's own interval (the session effect then is not in it)."""
    if len(per) == 1:
        return {**per[0], "rounds": 1, "round_estimates": [per[0]["estimate"]]}
    centers = np.log([r["estimate"] for r in per])
    count = len(per)
    center = float(centers.mean())
    between = float(centers.std(ddof=1)) / math.sqrt(count)
    within = math.sqrt(sum(r["se_log"] ** 2 for r in per)) / count
    se = max(between, within)
    t = t_quantile(1 - (1 - CONFIDENCE) / 2, count - 1)
    point = math.exp(center)
    lo, hi = (math.exp(center - t * se), math.exp(center + t * se)) if math.isfinite(se) else (0.0, math.inf)
    verdict = verdict_of(lo, hi)
    return {"median": point, "estimate": point, "ci95": [lo, hi], "half_width": half_width(point, lo, hi),
            "verdict": verdict, "estimator": ROUNDS_ESTIMATOR, "resamples": per[0]["resamples"],
            "pairs": sum(r["pairs"] for r in per), "units": sum(r["units"] for r in per), "block": 0,
            "t": round(t, 4), "se_log": se, "rounds": count, "round_estimates": [r["estimate"] for r in per]}


ROUNDS_ESTIMATOR = ("mean over rounds (each on a fresh pair of sessions) of each round's 25%-trimmed mean of "
                    "per-pair log ratios; standard error the larger of the spread between rounds and the rounds' "
                    "block-bootstrap errors; t interval on (rounds - 1) degrees of freedom")
