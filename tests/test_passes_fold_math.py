"""The overflow check rides on the streamed write: each folded weight in external data is read
once, and a norm whose g*w does not fit the dtype is still skipped with the eager check's reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from flashnorm_onnx.pipeline import api
from flashnorm_onnx.pipeline.api import infer_shapes
from flashnorm_onnx.passes import FlashNormFoldPass, fold_math
from models import synthetic

NORM = "model.layers.1.post_attention_layernorm.weight"
WEIGHT = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """The tiny fp16 synthetic model, external data, with one norm whose fold into up_proj
    overflows float16 (g = 60000 against |w| = 2 somewhere in the weight)."""
    folder = tmp_path_factory.mktemp("overflow")
    src = folder / "src.onnx"
    synthetic.build(src, *synthetic.SHAPES["tiny"], dtype="float16")
    proto = onnx.load(str(src))
    for t in proto.graph.initializer:
        if t.name == NORM:
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(onnx.numpy_helper.to_array(t).shape, 60000, np.float16), NORM))
        elif t.name == WEIGHT:
            w = onnx.numpy_helper.to_array(t).copy()
            w[w.shape[0] // 2, 3] = 2.0
            t.CopyFrom(onnx.numpy_helper.from_array(w, WEIGHT))
    path = folder / "model.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path


def _eager_decisions(path):
    model = ir.serde.deserialize_model(onnx.load(str(path)))  # every tensor in memory: checked eagerly
    restore = infer_shapes(model)
    result = FlashNormFoldPass()(model)
    restore()
    return result.report.decisions


def test_overflow_found_by_the_write_skips_the_norm_as_the_eager_check_does(overflowing, tmp_path, monkeypatch):
    read_for_check = []
    real = fold_math.check_tensor
    monkeypatch.setattr(fold_math, "check_tensor",
                        lambda tensor, g, k: (read_for_check.append(tensor.name), real(tensor, g, k))[1])
    out = tmp_path / "out.onnx"
    report = api.optimize(overflowing, out)
    # no folded weight was read for the overflow check at decision time: the write checked them
    assert read_for_check == []
    monkeypatch.undo()
    eager = _eager_decisions(overflowing)
    got = {d.name: (d.status, d.reason) for d in report.decisions}
    want = {d.name: (d.status, d.reason) for d in eager}
    assert got == want
    skipped = [d for d in report.decisions if d.status == "skipped"]
    assert [d.name for d in skipped] == [NORM]
    assert "float16" in skipped[0].reason and WEIGHT in skipped[0].reason
    assert report.folded == len(report.decisions) - 1
    assert report.verification.passed, report.verification.message
    assert any("found not representable while writing" in n for n in report.notes)
    written = onnx.load(str(out))
    for t in written.graph.initializer:
        assert np.all(np.isfinite(onnx.numpy_helper.to_array(t).astype(np.float32))), t.name
    # the weight behind the skipped norm is the input's, byte for byte
    before = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(overflowing)).graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in written.graph.initializer}
    assert after[WEIGHT].tobytes() == before[WEIGHT].tobytes()
    assert after[NORM].tobytes() == before[NORM].tobytes()


def test_the_deferred_check_is_exact_on_each_block(overflowing):
    """The folded tensor's own check, fed the blocks the writer reads, refuses what the eager
    check refuses and nothing it accepts."""
    model = ir.load(str(overflowing))
    tensors = {v.name: v.const_value for v in model.graph.initializers.values()}
    g = tensors[NORM].numpy()
    for name, want_refused in ((WEIGHT, True), ("model.layers.1.mlp.gate_proj.weight", False)):
        folded = fold_math.FoldedTensor(tensors[name], g, 0, name=name, check_for=((7, NORM), name))
        buf = np.empty(1 << 16, dtype=np.uint8)
        if want_refused:
            with pytest.raises(fold_math.DeferredFoldRefused) as e:
                for _, nbytes, fill in folded.blocks(4096):  # many small blocks
                    fill(buf[:nbytes])
            assert e.value.key == (7, NORM) and "float16" in e.value.reason
            with pytest.raises(fold_math.DeferredFoldRefused):
                folded.numpy()  # the whole-tensor path checks too
        else:
            for _, nbytes, fill in folded.blocks(4096):
                fill(buf[:nbytes])
