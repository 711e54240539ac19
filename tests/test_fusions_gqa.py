"""GroupQueryAttention fed the mask (flashnorm_onnx/fusions/gqa.py, issue 24).

On the tiny Llama dynamo export (4 query heads, 2 KV heads): ``--for-ort`` writes one
``GroupQueryAttention`` per layer, and the output equals the export at every position the mask
keeps, on left- and right-padded batches; without ``attention_bias`` (onnxscript's rule drops
the mask) the verification's padded cases fail it; where ORT ignores ``attention_bias`` the
attention stays ``MultiHeadAttention``; a mask that is not causal is refused by the probe.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from flashnorm_onnx.cli import main
from flashnorm_onnx.fusions import gqa

pytest.importorskip("onnxscript")


def _llama() -> Path:
    from models import fixtures

    return Path(fixtures.build("llama_dynamo"))


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_installed_onnxruntime_honours_attention_bias():
    assert gqa.ort_honours_attention_bias()  # ORT >= 1.31 CPU; the fusion's gate


def test_gqa_equals_the_export_at_every_kept_position_on_padded_batches(tmp_path):
    source, out = _llama(), tmp_path / "m.onnx"
    report = tmp_path / "r.json"
    assert main(["optimize", str(source), "-o", str(out), "--for-ort", "--report", str(report), "-q"]) == 0
    data = json.loads(report.read_text())
    assert data["ort_fusions"]["group_query_attention"] == 2
    ops = _ops(out)
    assert ops["GroupQueryAttention"] == 2 and ops["MultiHeadAttention"] == 0 and ops["RotaryEmbedding"] == 0
    # the lengths come from the mask every layer reads: one seqlens_k and one total for all layers
    nodes = [n for n in onnx.load(str(out), load_external_data=False).graph.node if n.op_type == "GroupQueryAttention"]
    assert len({n.input[5] for n in nodes}) == 1 and len({n.input[6] for n in nodes}) == 1
    assert any(c.startswith("padded") for c in data["verification"]["cases"]), data["verification"]["cases"]
    a, b = _session(source), _session(out)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 500, (3, 9)).astype(np.int64)
    mask = np.ones((3, 9), np.int64)
    mask[0, :4] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    feeds = {"input_ids": ids, "attention_mask": mask}
    want, got = a.run(None, feeds)[0], b.run(None, feeds)[0]
    keep = mask.astype(bool)
    scale = float(np.abs(want[keep]).max())
    assert float(np.abs(want - got)[keep].max()) <= 1e-5 * scale


def test_gqa_without_the_mask_fails_verification(tmp_path, monkeypatch, capsys):
    """What onnxscript's rule does (no attention_bias): the padded cases catch it, nothing written."""
    from flashnorm_onnx.fusions import ort as ort_fusions

    real = ort_fusions.fuse_gqa

    def dropping_mask(model):
        n = real(model)
        for node in model.graph:
            if node.op_type == "GroupQueryAttention":
                assert node.inputs[10] is not None  # the rule feeds the mask as attention_bias
                node.replace_input_with(10, None)
        return n

    monkeypatch.setattr(ort_fusions, "fuse_gqa", dropping_mask)
    out = tmp_path / "m.onnx"
    code = main(["optimize", str(_llama()), "-o", str(out), "--for-ort"])
    text = capsys.readouterr()
    assert code == 5, text.out + text.err
    assert "padded" in text.out + text.err and not out.exists()


def test_no_gqa_where_onnxruntime_ignores_attention_bias(tmp_path, monkeypatch):
    monkeypatch.setattr(gqa, "ort_honours_attention_bias", lambda: False)
    out = tmp_path / "m.onnx"
    assert main(["optimize", str(_llama()), "-o", str(out), "--for-ort", "-q"]) == 0
    ops = _ops(out)
    assert ops["GroupQueryAttention"] == 0 and ops["MultiHeadAttention"] == 2


def _mask_model(causal: bool) -> ir.Model:
    """mask[b, 0, i, j] = 0 where key j is allowed for query i, else -1e9; causal (j <= i) or its
    mirror (j >= i), from the attention_mask input's length."""
    nodes = [
        helper.make_node("Shape", ["attention_mask"], ["s1"], start=1, end=2),
        helper.make_node("Squeeze", ["s1"], ["s"]),
        helper.make_node("Range", ["zero", "s", "one"], ["r"]),
        helper.make_node("Unsqueeze", ["r", "ax0"], ["row"]),
        helper.make_node("Unsqueeze", ["r", "ax1"], ["col"]),
        helper.make_node("LessOrEqual" if causal else "GreaterOrEqual", ["row", "col"], ["allowed"]),
        helper.make_node("Where", ["allowed", "zf", "neg"], ["m2"]),
        helper.make_node("Unsqueeze", ["m2", "ax01"], ["m4"]),
        helper.make_node("Shape", ["attention_mask"], ["b"], start=0, end=1),
        helper.make_node("Concat", ["b", "one1", "s1", "s1"], ["shape4"], axis=0),
        helper.make_node("Expand", ["m4", "shape4"], ["mask"]),
    ]
    inits = [onnx.numpy_helper.from_array(np.array(v, dtype=d), n) for n, v, d in (
        ("zero", 0, np.int64), ("one", 1, np.int64), ("ax0", [0], np.int64), ("ax1", [1], np.int64),
        ("ax01", [0, 1], np.int64), ("one1", [1], np.int64), ("zf", 0.0, np.float32), ("neg", -1e9, np.float32))]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                                         ["batch", "sequence"])],
                              [helper.make_tensor_value_info("mask", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return ir.serde.deserialize_model(proto)


def test_the_probe_accepts_a_causal_mask_and_refuses_one_that_sees_later_keys():
    causal = _mask_model(True)
    assert gqa._mask_is_causal(causal, causal.graph.outputs[0], None) is None
    mirror = _mask_model(False)
    why = gqa._mask_is_causal(mirror, mirror.graph.outputs[0], None)
    assert why and "later key" in why, why
