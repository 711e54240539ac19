"""Generated verification inputs for image models: channels and size from the model's configs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flashnorm_onnx.verify.inputs import Case, InputSpec, dims_from_configs, make_feeds


def _vit_like(path, channels=3, patch=4):
    """pixel_values[batch_size, num_channels, height, width] -> Conv(patch) -> LayerNorm -> MatMul."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, channels, patch, patch)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["pixel_values", "w"], ["c"], strides=[patch, patch]),
             helper.make_node("Reshape", ["c", "flat"], ["f"]),
             helper.make_node("Transpose", ["f"], ["t"], perm=[0, 2, 1]),
             helper.make_node("LayerNormalization", ["t", "g", "b"], ["y"], axis=-1),
             helper.make_node("MatMul", ["y", "m"], ["out"])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0, 8, -1], np.int64), "flat"), numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "m")]
    graph = helper.make_graph(nodes, "vit", [helper.make_tensor_value_info(
        "pixel_values", TensorProto.FLOAT, ["batch_size", "num_channels", "height", "width"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
    return path


SPEC = [InputSpec("pixel_values", np.dtype(np.float32), ["batch_size", "num_channels", "height", "width"])]


@pytest.mark.parametrize("config, preprocessor, expected", [
    ({"num_channels": 1, "image_size": 32}, None, (2, 1, 32, 32)),
    ({"hidden_size": 8, "num_attention_heads": 2}, {"crop_size": {"height": 20, "width": 24}}, (2, 3, 20, 24)),
    ({"vision_config": {"num_channels": 3, "image_size": 28}}, None, (2, 3, 28, 28)),
    (None, None, (2, 3, 224, 224)),  # no config: RGB at the ImageNet size, not 8 channels
])
def test_image_inputs_take_channels_and_size_from_configs(tmp_path, config, preprocessor, expected):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    if preprocessor is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    feeds = make_feeds(SPEC, Case("run1", batch=2, sequence=8), dims=dims_from_configs(model))
    assert feeds["pixel_values"].shape == expected


def test_optimum_style_vit_verifies_with_its_config(tmp_path):
    from flashnorm_onnx.cli import main

    model = _vit_like(tmp_path / "model.onnx", channels=3)
    (tmp_path / "config.json").write_text(json.dumps({"num_channels": 3, "image_size": 16}))
    assert main(["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "-q"]) == 0
    (tmp_path / "gray").mkdir()
    gray = _vit_like(tmp_path / "gray" / "model.onnx", channels=1)
    (tmp_path / "gray" / "config.json").write_text(json.dumps({"num_channels": 1, "image_size": 12}))
    assert main(["optimize", str(gray), "-o", str(tmp_path / "gray_out.onnx"), "-q"]) == 0
