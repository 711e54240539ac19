"""LayerNorm: scale and bias folded into the following linears (FlashNorm section 2)."""

from __future__ import annotations

import numpy as np
import pytest

from tests import graphs
from tests.helpers import assert_same, fold


@pytest.mark.parametrize("form", graphs.LN_FORMS)
@pytest.mark.parametrize("consumers", [("matmul",), ("matmul_bias", "matmul"), ("matmul_t",)])
def test_layernorm_forms_fold_scale_and_bias(form, consumers):
    model = graphs.build(form, consumers=consumers)
    out, report = fold(model)
    assert [d.status for d in report.decisions] == ["folded"], report.text()
    assert_same(model, out, rtol=1e-5, atol=1e-5)
    # the norm is weightless: no bias, scale ones
    for node in out.graph.node:
        if node.op_type in ("LayerNormalization", "SkipLayerNormalization"):
            inits = {i.name: i for i in out.graph.initializer}
            from onnx import numpy_helper

            assert np.all(numpy_helper.to_array(inits[node.input[2 if node.op_type.startswith("Skip") else 1]]) == 1)
            if node.op_type == "LayerNormalization":
                assert len(node.input) == 2
            else:
                assert np.all(numpy_helper.to_array(inits[node.input[3]]) == 0)


@pytest.mark.parametrize("consumers", [("gemm",), ("gemm_tb",)])
def test_layernorm_into_gemm(consumers):
    model = graphs.build("layernorm", consumers=consumers)
    out, report = fold(model)
    assert report.folded == 1
    assert_same(model, out, rtol=1e-5, atol=1e-5)


def test_matmul_without_bias_gets_one():
    model = graphs.build("layernorm", consumers=("matmul",))
    out, _ = fold(model)
    assert sum(n.op_type == "Add" for n in out.graph.node) == 1


def test_layernorm_without_bias_adds_no_add():
    model = graphs.build("layernorm_nobias", consumers=("matmul",))
    out, _ = fold(model)
    assert not any(n.op_type == "Add" for n in out.graph.node)


def test_post_ln_residual_is_skipped_and_says_so():
    model = graphs.build("layernorm", consumers=("matmul_bias",), extra=("residual",))
    out, report = fold(model)
    (d,) = report.decisions
    assert d.status == "skipped"
    assert "feeds the residual stream" in d.reason and "post-LN" in d.reason
    assert_same(model, out, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["layernorm", "skip_ln", "sln"])
def test_fold_into_ort_attention_packed_qkv(form):
    model = graphs.build(form, consumers=("attention",))
    out, report = fold(model)
    assert report.folded == 1, report.text()
    assert_same(model, out, rtol=1e-4, atol=1e-4)
