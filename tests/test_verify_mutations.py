"""Mutation tests: a deliberately broken pass must fail every verification mode (exit 5, nothing written).

Mutations: the weightless rewrite skipped (the scale then applies twice), the scale folded twice
into the weights, a LayerNorm bias dropped instead of moved, a fold written along the wrong axis of
the weight; and what only the plan-diff check sees at scale (``verify_plan``): a tied weight
written in place (the reader analysis told there is no other reader), a node outside the plan
rewired, an initializer outside the plan changed. Modes: the whole-model ONNX Runtime comparison, the subgraph check, the algebraic
check, and ``auto`` on a model it considers too large to run (what large models get).
"""

from __future__ import annotations

import numpy as np
import pytest

from flashnorm_onnx.pipeline import api
from flashnorm_onnx.verify import policy
from flashnorm_onnx import cli as cli
from flashnorm_onnx.passes import flashnorm_fold, fold_math
from tests import graphs
from tests.graphs import save
from tests.helpers import rms_model, snapshot
from tests.helpers import run_mode as _run

MODES = ["onnxruntime", "subgraph", "subgraph-sampled", "algebraic", "auto-large"]


def _skip_weightless(monkeypatch):
    monkeypatch.setattr(flashnorm_fold, "make_weightless", lambda *a, **k: "(mutation: left as it was)")


def _scale_twice(monkeypatch):
    real = fold_math.fold_scale
    monkeypatch.setattr(fold_math, "fold_scale", lambda w, g, k, **kw: real(real(w, g, k, **kw), g, k, **kw))


def _drop_bias(monkeypatch):
    monkeypatch.setattr(fold_math, "bias_delta", lambda w, beta, k: np.zeros(w.shape[1 - k]))


def _wrong_axis(monkeypatch):
    real = fold_math.fold_scale
    monkeypatch.setattr(fold_math, "fold_scale", lambda w, g, k, **kw: real(w, g, 1 - k, **kw))


def _tied_in_place(monkeypatch):
    monkeypatch.setattr(flashnorm_fold, "_outside_readers", lambda source, ours: [])


def _after_apply(monkeypatch, edit):
    real = flashnorm_fold.FlashNormFoldPass.apply

    def apply(self, model, plans):
        result = real(self, model, plans)
        edit(model.graph)
        return result

    monkeypatch.setattr(flashnorm_fold.FlashNormFoldPass, "apply", apply)


def _rewire_outside_plan(monkeypatch):
    def edit(graph):  # the residual Add reads the projection twice instead of the embedding
        node = next(n for n in graph if n.name == "residual")
        node.replace_input_with(0, node.inputs[1])

    _after_apply(monkeypatch, edit)


def _change_initializer_outside_plan(monkeypatch):
    import onnx_ir as ir

    def edit(graph):  # o_proj's weight, which no norm reads
        value = graph.initializers["Wo"]
        value.const_value = ir.Tensor(value.const_value.numpy() * np.float32(1.5), name="Wo")

    _after_apply(monkeypatch, edit)


MUTATIONS = {"skip_weightless": _skip_weightless, "scale_twice": _scale_twice, "drop_bias": _drop_bias,
             "wrong_axis": _wrong_axis, "tied_in_place": _tied_in_place, "rewire_outside_plan": _rewire_outside_plan,
             "change_initializer_outside_plan": _change_initializer_outside_plan}
#: What the plan-diff check names for each mutation it is there for.
PLAN_DIFF_NAMES = {"tied_in_place": "Gather 'embed'", "rewire_outside_plan": "Add 'residual'",
                   "change_initializer_outside_plan": "initializer 'Wo'"}


def _model(mutation: str, tmp_path):
    if mutation == "drop_bias":  # a LayerNorm with a bias, read by a MatMul with a bias and one without
        model = graphs.build("layernorm", consumers=("matmul_bias", "matmul"))
    elif mutation in PLAN_DIFF_NAMES:  # a tied embedding, a residual and a weight outside the plan
        model = graphs.tied_decoder()
    else:  # square weights, so that a fold along the wrong axis is well-formed
        model = rms_model(k=16, n=16)
    return save(model, tmp_path / "m" / "model.onnx", external=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_broken_pass_fails_every_verification_mode(mutation, mode, tmp_path, monkeypatch, capsys):
    src = _model(mutation, tmp_path)
    out = tmp_path / "out" / "model.onnx"
    before = snapshot(tmp_path)
    MUTATIONS[mutation](monkeypatch)
    code, text = _run(mode, src, out, monkeypatch, capsys)
    assert code == 5, text
    assert "verification failed" in text and "FAILED" in text
    assert snapshot(tmp_path) == before  # nothing written, no leftovers, input untouched
    if mutation in PLAN_DIFF_NAMES:  # the plan-diff check names what changed outside the plan
        assert "plan: " in text and PLAN_DIFF_NAMES[mutation] in text, text


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_unbroken_pass_passes_every_mode(mutation, mode, tmp_path, monkeypatch, capsys):
    """The same models and modes without the mutation: the check is not failing for another reason."""
    src = _model(mutation, tmp_path)
    out = tmp_path / "out" / "model.onnx"
    code, text = _run(mode, src, out, monkeypatch, capsys)
    assert code == 0, text
    assert "PASSED" in text and out.is_file()
    if mode == "auto-large":
        assert "verification (subgraph+" in text  # large models get the executed check
    if mode == "subgraph-sampled":
        assert "ran on 4 contiguous output columns" in text
        if mutation != "drop_bias":  # rms_model's [K, N] weights: the writer keeps the output's sample
            assert "as kept from the buffers the writer wrote" in text
