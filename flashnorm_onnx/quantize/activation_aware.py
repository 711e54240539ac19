"""Plans activation-aware int4 for one model: which values to calibrate, then each norm's scale and each weight's clip ratios, applied to the float model.

The steps of ``--quantize int4 --calibrate`` that touch the model (the pipeline runs them and
checks each result):

1. :func:`calibration_values`: the values whose statistics the search needs -- each movable
   norm's output (with rows kept) and the input of every int4 MatMul;
2. :func:`plan` (after :func:`~flashnorm_onnx.quantize.calibrate.collect`): for each norm the
   scale placement and its readers' clip ratios (:func:`~flashnorm_onnx.quantize.search.choose_scale`),
   the same for the scales between two linears (up -> down of a gated MLP, v -> o through attention),
   for every other int4 weight its clip ratios
   (:func:`~flashnorm_onnx.quantize.search.choose_clips`), and the scale moved in the float model
   (:func:`~flashnorm_onnx.quantize.scale_move.move_scale`).

The returned :class:`Plan` carries the clip ratios by weight name, for
:func:`~flashnorm_onnx.quantize.int4.quantize_model` on the moved model once it is written and
checked against the input.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx_ir as ir

from flashnorm_onnx.quantize import search
from flashnorm_onnx.quantize.calibrate import Calibration
from flashnorm_onnx.quantize.int4 import QuantSpec, quantizable_weight
from flashnorm_onnx.quantize.scale_move import (
    AttentionPairSite,
    PairSite,
    ScaleSite,
    find_attention_pairs,
    find_pairs,
    find_sites,
    move_attention_scale,
    move_pair_scale,
    move_scale,
)

#: clip each block by its output error with the block's input covariance (d^T C_b d, AWQ's auto_clip
#: objective in block form); False (the default): by the E[x^2]-weighted error (the diagonal of C_b).
#: On SmolLM2's held-out text the covariance was not better (b128 sym ΔNLL +0.007 [-0.007, +0.021]
#: against the diagonal); on Gemma-3-270M better at b128, worse at b32 (benchmarks/RESULTS_int4*.md):
#: a switch for the study.
CLIP_BY_COVARIANCE = False
#: move scales between v_proj and o_proj through the attention (AttentionPairSite). A switch for
#: the study's ablations.
V_TO_O = True


@dataclasses.dataclass
class Plan:
    """What the search chose, by weight name of the moved model."""

    choices: list[search.NormChoice]
    clips: dict[str, np.ndarray]
    """weight name (in the moved model) -> per-block clip ratios [blocks, N]."""
    not_moved: list[tuple[str, str]]
    """(norm, why its scale stays where it is)."""
    pair_choices: list[search.NormChoice] = dataclasses.field(default_factory=list)
    """The scales moved between two linears (up -> down of a gated MLP, v -> o through attention)."""
    pair_kinds: dict[str, str] = dataclasses.field(default_factory=dict)
    """pair name -> "up -> down" or "v -> o"."""
    seconds: float = 0.0
    blocks: int = 0
    calibration_info: dict = dataclasses.field(default_factory=dict)
    """Filled by the pipeline: the text, its tokens, the calibration's time, the float check."""

    def objective_totals(self) -> dict[str, float]:
        """The calibration objective summed over the norms: chosen, quantize-first, fold-first."""
        fold = [c.fold for c in self.choices]
        return {"chosen": float(sum(c.chosen.objective for c in self.choices)),
                "quantize_first": float(sum(c.rtn for c in self.choices)),
                "fold_first": float(sum(fold)) if all(f is not None for f in fold) else None}

    def summary(self) -> dict:
        return {
            "norms": [{"norm": c.name, "alpha": c.alpha, "objective": c.chosen.objective, "quantize_first": c.rtn,
                       "fold_first": c.fold} for c in self.choices],
            "objective_totals": self.objective_totals(),
            "pairs": [{"pair": c.name, "kind": self.pair_kinds.get(c.name, "up -> down"), "alpha": c.alpha,
                       "objective": c.chosen.objective, "rtn": c.rtn} for c in self.pair_choices],
            "pair_objective_totals": {"chosen": float(sum(c.chosen.objective for c in self.pair_choices)),
                                      "rtn": float(sum(c.rtn for c in self.pair_choices))},
            "clips": search.clip_summary(self.clips, self.blocks),
            "not_moved": [{"norm": n, "reason": r} for n, r in self.not_moved],
            "search_seconds": self.seconds,
        }


def _elem_type(value: ir.Value, fallback: ir.DataType) -> int:
    return int((value.dtype or fallback).value)


def _matmuls(model: ir.Model) -> list[tuple[ir.Node, ir.Value]]:
    out = []
    for node in model.graph:
        weight = quantizable_weight(node)
        if weight is not None and node.inputs[0] is not None and node.inputs[0].name:
            out.append((node, weight))
    return out


def calibration_values(model: ir.Model, pairs: bool = True
                       ) -> tuple[dict[str, int], set[str], list[ScaleSite | PairSite], list[tuple[str, str]]]:
    """(values to expose: name -> element type, the ones whose rows are kept, sites -- norms, then
    with ``pairs`` the up -> down pairs of gated MLPs and the v -> o pairs of attention --, norms
    (and attention pairs) not movable, with the reason)."""
    sites, others = find_sites(model)
    sites = list(sites) + (find_pairs(model) if pairs else [])
    if pairs and V_TO_O:
        attention, refused = find_attention_pairs(model)
        sites += attention
        others += refused
    values: dict[str, int] = {}
    rows: set[str] = set()
    usable = []
    for site in sites:
        if not site.output.name:
            others.append((site.name, "its output has no name to calibrate"))
            continue
        values[site.output.name] = _elem_type(site.output, site.weights[0].dtype)
        rows.add(site.output.name)
        usable.append(site)
    for node, weight in _matmuls(model):
        values.setdefault(node.inputs[0].name, _elem_type(node.inputs[0], weight.dtype))
    return values, rows, usable, others


def _weight_array(value: ir.Value) -> np.ndarray:
    w = value.const_value.numpy()
    return w.reshape(w.shape[-2], w.shape[-1])


def plan(model: ir.Model, sites: list[ScaleSite], not_moved: list[tuple[str, str]], calibration: Calibration,
         spec: QuantSpec, alphas=search.ALPHAS, clips=search.CLIPS, progress=None) -> Plan:
    """Choose every norm's scale and every int4 weight's clip ratios from ``calibration``, and move
    the scales in ``model`` (its weights become lazy diag(s) W)."""
    start = time.perf_counter()
    stats = calibration.stats
    result = Plan(choices=[], clips={}, not_moved=list(not_moved))
    site_weights: set[int] = set()
    total = len(sites) + len(_matmuls(model))
    done = 0
    for site in sites:
        x = stats[site.output.name]
        weights = [_weight_array(w) for w in site.weights]
        pair = isinstance(site, (PairSite, AttentionPairSite))
        mean_abs = site.tie(x.mean_abs) if isinstance(site, AttentionPairSite) else x.mean_abs
        moments = x.block_moments(spec.block_size) if CLIP_BY_COVARIANCE else None
        second = x.second_moment
        choice = search.choose_scale(site.name, weights, None if pair else site.g, mean_abs, x.mean_sq,
                                     x.row_matrix() if second is None else np.zeros((0, 0), np.float32), spec,
                                     alphas, clips, moments, second)
        del second
        del weights, moments
        if pair:
            if isinstance(site, AttentionPairSite):
                move_attention_scale(site, choice.chosen.s)
                result.pair_kinds[site.name] = "v -> o"
            else:
                move_pair_scale(site, choice.chosen.s)
            renamed = {w.name: w.name for w in site.weights}
            site_weights.add(id(site.down.inputs[1]))
        else:
            renamed = move_scale(model, site, choice.chosen.s)
            site_weights.update(id(node.inputs[1]) for node in site.readers)
        for weight, ratios in zip(site.weights, choice.chosen.clips or [None] * len(site.weights)):
            if ratios is not None:
                result.clips[renamed[weight.name]] = ratios
        choice.chosen.clips = None  # kept by weight name above
        (result.pair_choices if pair else result.choices).append(choice)
        done += 1
        if progress:
            progress(done, total)
    # every other int4 weight: its clip ratios, weighted by E[x^2] of the inputs that read it
    inputs: dict[int, tuple[ir.Value, np.ndarray, np.ndarray | None]] = {}
    for node, weight in _matmuls(model):
        if id(weight) in site_weights or node.inputs[0].name not in stats:
            continue
        x = stats[node.inputs[0].name]
        sq = x.mean_sq
        mom = x.block_moments(spec.block_size) if CLIP_BY_COVARIANCE else None
        if id(weight) in inputs:
            _, sq0, mom0 = inputs[id(weight)]
            inputs[id(weight)] = (weight, sq0 + sq, None if mom is None or mom0 is None else mom0 + mom)
        else:
            inputs[id(weight)] = (weight, sq, mom)
    for weight, sq, mom in inputs.values():
        if len(clips) > 1:
            ratios, _ = search.choose_clips(_weight_array(weight), sq, spec, clips, moments=mom)
            result.clips[weight.name] = ratios
        done += 1
        if progress:
            progress(done, total)
    for node, weight in _matmuls(model):
        k, n = int(weight.const_value.shape[-2]), int(weight.const_value.shape[-1])
        result.blocks += -(-k // spec.block_size) * n
    result.seconds = time.perf_counter() - start
    return result
