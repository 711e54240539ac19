"""Chooses, from calibration statistics, each norm's scale placement and each int4 block's clip ratio.

A per-channel scale s between a norm and the linears that read it can sit anywhere: with the
norm's output X = norm(x) * g, ``g -> g/s`` and ``W -> diag(s) W`` compute the same function in
float. int4 does not: block-wise round-to-nearest of diag(s) W loses precision where s is small.
s = 1 is quantize-first, s = g is fold-first (the norm becomes weightless).

**Scale.** For each norm, s is chosen from a small family: ``s = m^alpha`` normalised (geometric
midpoint of its range at 1, as AWQ does), m = mean|X| per channel (= mean|x_hat| * |g|), alpha on
:data:`ALPHAS` (alpha = 0 is s = 1), plus the fold's s = g itself. Each candidate is quantized
(with the clip search below) and judged by the **output error of the norm's readers** on the
calibration rows R of X::

    E(s) = sum over readers j of || R W_j - (R / s) Q(diag(s) W_j) ||^2 / rows

Candidates s = 1 and s = g are also judged unclipped: those are exactly the int4 models that
quantize-first and fold-first write, so the chosen objective is never above either.

**Clipping.** For every quantized weight (also those no norm precedes, such as o_proj and
down_proj), each block (column n, block b of input channels) takes the ratio c from
:data:`CLIPS` (1.0 first: ties keep the unclipped block) minimising the error of that block
weighted by the second moment of its input channels, ``sum_k E[x_k^2] (W[k,n] - Q_c(W)[k,n])^2``:
the part of the output error that does not depend on correlations between channels. Given the
block second moments C_b = E[x_b x_b^T] (``moments``), the whole of the block's output error,
``d^T C_b d`` with d the block's rounding error in column n, is minimised instead (AWQ's auto_clip
objective in block form; off by default in :mod:`~flashnorm_onnx.quantize.activation_aware`: it was
not better on held-out text). Quantizing with ratio c means clipping the block to c times its own
range and rounding it with ORT's kernel (:func:`~flashnorm_onnx.quantize.int4.clip_blocks`).

The objective can be computed from the calibration rows or, given ``second_moment`` C = E[x x^T]
over every calibration token, as ``sum_j trace(D_j^T C D_j)`` (the same number without a row cap).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flashnorm_onnx.quantize.int4 import QuantSpec, clip_blocks, dequantize, quantize_weight

#: alpha grid of the scale family (0: s = 1, quantize-first).
ALPHAS = tuple(round(0.1 * i, 1) for i in range(10))
#: clip ratios tried per block (1.0 first: on a tie the block stays unclipped).
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8)
#: the smallest mean|X| a channel is given in s = m^alpha, relative to the largest (a channel that
#: is always zero would otherwise get s = 0).
M_FLOOR = 1e-5


@dataclasses.dataclass
class Candidate:
    """One scale placement tried for a norm, and its calibration objective."""

    label: str
    """``alpha=0.3``, ``fold (s=g)``; with ``, unclipped`` when the clip search was not applied."""
    s: np.ndarray
    objective: float
    clips: list[np.ndarray] | None
    """Per reader, the per-block clip ratios [blocks, N] (None: unclipped)."""


@dataclasses.dataclass
class NormChoice:
    """What the search chose for one norm, with the two orders it replaces as references."""

    name: str
    chosen: Candidate
    rtn: float
    """Objective of quantize-first (s = 1, round-to-nearest): the int4 model the default writes."""
    fold: float | None
    """Objective of fold-first (s = g, round-to-nearest); None when g has a zero."""
    tried: list[tuple[str, float]]

    @property
    def alpha(self) -> str:
        return self.chosen.label


def rtn_dequantized(weight: np.ndarray, spec: QuantSpec, clip=None) -> np.ndarray:
    """The float weight ``MatMulNBits`` multiplies by after quantizing ``weight`` [K, N] (clipped
    per block by ``clip`` first when given) with ORT's kernel."""
    w = weight if clip is None else clip_blocks(weight, clip, spec.block_size, spec.symmetric)
    packed, scales, zp = quantize_weight(np.ascontiguousarray(w), spec)
    k, n = weight.shape
    return dequantize(packed, scales, None if spec.symmetric else zp, k, n, spec.block_size, np.float32)


def _block_errors(weight: np.ndarray, back: np.ndarray, channel_weight: np.ndarray, block: int) -> np.ndarray:
    """[blocks, N]: sum over the block's rows of channel_weight[k] * (weight - back)^2."""
    k, n = weight.shape
    d = np.asarray(weight, np.float32) - back
    d *= d
    d *= np.asarray(channel_weight, np.float32)[:, None]
    blocks = -(-k // block)
    if blocks * block != k:
        d = np.pad(d, ((0, blocks * block - k), (0, 0)))
    return d.reshape(blocks, block, n).sum(axis=1)


def _block_output_errors(weight: np.ndarray, back: np.ndarray, moments: np.ndarray, block: int) -> np.ndarray:
    """[blocks, N]: d^T C_b d for each block b and column n, d = (weight - back) over the block's rows,
    C_b = ``moments[b]`` the second-moment matrix of the block's input channels: the block's share of
    the column's output error E[(x . d)^2] (correlations inside the block included)."""
    k, n = weight.shape
    d = np.asarray(weight, np.float32) - back
    blocks = moments.shape[0]
    if blocks * block != k:
        d = np.pad(d, ((0, blocks * block - k), (0, 0)))
    d = d.reshape(blocks, block, n)
    return np.einsum("bkn,bkn->bn", d, np.matmul(moments, d))


def moved_moments(moments: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The block second moments of X / s, given those of X ([blocks, B, B]; s padded with ones)."""
    blocks, block, _ = moments.shape
    inv = np.ones(blocks * block)
    inv[:s.size] = 1.0 / np.asarray(s, np.float64)
    inv = inv.reshape(blocks, block)
    return moments * inv[:, :, None] * inv[:, None, :]


def choose_clips(weight: np.ndarray, channel_weight: np.ndarray, spec: QuantSpec,
                 clips=CLIPS, unclipped: list | None = None,
                 moments: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ratios [blocks, N], dequantized weight [K, N]): each block's clip ratio from ``clips``
    minimising its error weighted by ``channel_weight`` (E[x^2] of the input channels), or, given
    ``moments`` (the input's block second-moment matrices [blocks, B, B]), its output error d^T C_b d.
    ``unclipped``: a list that receives the plain round-to-nearest weight (ratio 1.0)."""
    weight = np.asarray(weight, dtype=np.float32)
    k, n = weight.shape
    if moments is not None:
        moments = np.ascontiguousarray(moments, dtype=np.float32)
    backs, errors = [], []
    for c in clips:
        back = rtn_dequantized(weight, spec, None if c == 1.0 else c)
        if c == 1.0 and unclipped is not None:
            unclipped.append(back)
        backs.append(back)
        if moments is not None:
            errors.append(_block_output_errors(weight, back, moments, spec.block_size))
        else:
            errors.append(_block_errors(weight, back, channel_weight, spec.block_size))
    best = np.argmin(np.stack(errors), axis=0)  # first minimum: 1.0 wins ties
    ratios = np.asarray(clips, dtype=np.float32)[best]
    pick = np.repeat(best, spec.block_size, axis=0)[:k]
    back = np.choose(pick, backs) if len(backs) > 1 else backs[0]
    return ratios, back


def output_error(rows: np.ndarray, weights: list[np.ndarray], backs: list[np.ndarray], s: np.ndarray,
                 second_moment: np.ndarray | None = None) -> float:
    """sum_j ||R W_j - (R / s) back_j||^2 / rows: the readers' output error on the calibration rows;
    given ``second_moment`` C = E[x x^T] (over every calibration token), the same as
    sum_j trace(D_j^T C D_j) without the rows."""
    if second_moment is None and rows.shape[0] == 0:
        return 0.0
    total = 0.0
    inv = (1.0 / s.astype(np.float64)).astype(np.float32)
    c = None if second_moment is None else np.asarray(second_moment, np.float32)
    for w, back in zip(weights, backs):
        delta = np.asarray(w, np.float32) - back * inv[:, None]  # the error in the unscaled frame
        if c is not None:
            total += float(np.einsum("kn,kn->", delta, c @ delta, dtype=np.float64))
            continue
        y = rows @ delta
        total += float(np.einsum("ij,ij->", y, y, dtype=np.float64)) / rows.shape[0]
    return total


def scale_family(mean_abs: np.ndarray, g: np.ndarray | None, alphas=ALPHAS) -> list[tuple[str, np.ndarray]]:
    """The candidate scales: ``m^alpha`` normalised, for each alpha, then the fold's ``s = g``
    (left out when g is None -- a scale between two linears -- or has a zero or a non-finite value)."""
    m = np.asarray(mean_abs, dtype=np.float64)
    m = np.maximum(m, max(float(m.max()), 1e-30) * M_FLOOR)
    out = []
    for a in alphas:
        if a == 0:
            out.append(("alpha=0", np.ones_like(m)))
            continue
        s = m ** a
        s /= np.sqrt(s.max() * s.min())
        out.append((f"alpha={a:g}", s))
    if g is None:  # between two linears: no norm scale to fold
        return out
    g64 = np.asarray(g, dtype=np.float64)
    if np.all(np.isfinite(g64)) and np.all(g64 != 0):
        out.append(("fold (s=g)", g64))
    return out


def scaled(weight: np.ndarray, s: np.ndarray) -> np.ndarray:
    """diag(s) W in the weight's dtype, computed in float64 and rounded once (as the fold does)."""
    return (np.asarray(s, np.float64)[:, None] * np.asarray(weight, np.float64)).astype(weight.dtype)


def choose_scale(name: str, weights: list[np.ndarray], g: np.ndarray, mean_abs: np.ndarray, mean_sq: np.ndarray,
                 rows: np.ndarray, spec: QuantSpec, alphas=ALPHAS, clips=CLIPS,
                 moments: np.ndarray | None = None, second_moment: np.ndarray | None = None) -> NormChoice:
    """The scale placement (and its readers' clip ratios) minimising :func:`output_error`.

    ``weights``: the norm's readers' weights [K, N_j] as they are in the model; ``g`` the norm's
    scale, ``mean_abs``/``mean_sq`` the per-channel statistics of the norm's output X, ``rows``
    calibration rows of X [R, K], ``moments`` (optional) the block second moments of X
    [blocks, B, B] for the clip search (:func:`choose_clips`), ``second_moment`` (optional) E[x x^T]
    over every calibration token, which the objective then uses in place of the rows."""
    rows = np.asarray(rows, dtype=np.float32)
    tried: list[tuple[str, float]] = []
    candidates: list[Candidate] = []
    rtn = fold = None
    for label, s in scale_family(mean_abs, g, alphas):
        moved = [scaled(w, s) for w in weights]
        reference = label in ("alpha=0", "fold (s=g)")
        unclipped: list = []
        if len(clips) > 1:
            channel = np.asarray(mean_sq, np.float64) / (np.asarray(s, np.float64) ** 2)
            mom = None if moments is None else moved_moments(moments, s)
            chosen = [choose_clips(w, channel, spec, clips, unclipped if reference else None, mom) for w in moved]
            e = output_error(rows, weights, [b for _, b in chosen], s, second_moment)
            candidates.append(Candidate(label, s, e, [r for r, _ in chosen]))
            tried.append((label, e))
        if reference:  # exactly what quantize-first / fold-first write
            backs = unclipped if len(unclipped) == len(moved) else [rtn_dequantized(w, spec) for w in moved]
            e = output_error(rows, weights, backs, s, second_moment)
            candidates.insert(0 if label == "alpha=0" else len(candidates),
                              Candidate(label + ", unclipped", s, e, None))
            tried.append((label + ", unclipped", e))
            if label == "alpha=0":
                rtn = e
            else:
                fold = e
    best = min(candidates, key=lambda c: c.objective)  # first minimum: alpha=0 unclipped wins ties
    return NormChoice(name=name, chosen=best, rtn=rtn, fold=fold, tried=tried)


def clip_summary(clips: dict[str, np.ndarray], total_blocks: int) -> dict:
    """How many blocks were clipped, at which ratios (the report's clip statistics)."""
    values = np.concatenate([c.ravel() for c in clips.values()]) if clips else np.zeros(0)
    hist = {f"{r:g}": int(np.sum(np.isclose(values, r))) for r in CLIPS if r != 1.0}
    clipped = int(np.sum(values < 1.0))
    return {"blocks": int(total_blocks), "clipped": clipped,
            "clipped_share": (clipped / total_blocks) if total_blocks else 0.0,
            "mean_ratio_of_clipped": float(values[values < 1.0].mean()) if clipped else 1.0,
            "by_ratio": hist}
