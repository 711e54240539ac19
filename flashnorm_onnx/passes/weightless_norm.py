"""Make a normalization weightless once its scale (and bias) live in the linear layers.

ONNX Runtime's fused norm kernels all require a scale input, so "weightless" is expressed as
scale = ones (and bias = zeros or absent). A decomposed chain becomes one fused op —
``SimplifiedLayerNormalization`` (ORT's op in the ai.onnx domain) below opset 23,
``RMSNormalization`` from opset 23, ``LayerNormalization`` from opset 17 — because ORT's own
session fusion does not recognise every exporter's chain (dynamo's ``Reciprocal`` form runs as
~7 kernels). With ``keep_structure`` the chain stays and only its scale/bias change.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from flashnorm_onnx.passes.graph_utils import const_tensor, unique_name
from flashnorm_onnx.passes.norm_patterns import NormMatch


class ConstantPool:
    """New constant initializers (ones / zeros), one per (value, dtype, shape)."""

    def __init__(self, graph: ir.Graph, names: set[str]):
        self.graph = graph
        self.names = names
        self._cache: dict[tuple, ir.Value] = {}

    def unique(self, base: str) -> str:
        return unique_name(self.graph, base, self.names)

    def add(self, base: str, array: np.ndarray) -> ir.Value:
        name = self.unique(base)
        tensor = ir.Tensor(array, name=name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def filled(self, fill: float, dtype: ir.DataType, shape: tuple[int, ...], hint: str) -> ir.Value:
        key = (fill, dtype, tuple(shape))
        if key not in self._cache:
            array = np.full(shape, fill, dtype=dtype.numpy())
            base = f"flashnorm.{'ones' if fill == 1 else 'zeros'}_{hint}"
            self._cache[key] = self.add(base, array)
        return self._cache[key]


def _input_dtype(value: ir.Value, fallback: ir.DataType) -> ir.DataType:
    if value.dtype is not None:
        return value.dtype
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast":
        to = producer.attributes.get("to")
        if to is not None:
            return ir.DataType(to.value)
    tensor = const_tensor(value)
    if tensor is not None:
        return tensor.dtype
    return fallback


def _scale_shape(match: NormMatch) -> tuple[int, ...]:
    return tuple(const_tensor(match.scale_source).shape.numpy())


def make_weightless(
    match: NormMatch,
    graph: ir.Graph,
    pool: ConstantPool,
    opset: int,
    keep_structure: bool,
) -> str:
    """Rewrite the norm so its scale is one and its bias zero. Returns what it became."""
    scale_dtype = _input_dtype(match.scale_input, const_tensor(match.scale_source).dtype)
    shape = _scale_shape(match)
    channels = shape[-1] if shape else 1
    hint = f"{scale_dtype.name.lower()}_{channels}"
    if match.scale_node is None:  # a fused op: swap its inputs
        node = match.anchor
        index = list(node.inputs).index(match.scale_input)
        node.replace_input_with(index, pool.filled(1.0, scale_dtype, shape, hint))
        if match.bias_input is not None:
            bias_index = list(node.inputs).index(match.bias_input)
            if node.op_type == "LayerNormalization" and bias_index == len(node.inputs) - 1:
                node.resize_inputs(bias_index)
            else:
                bias_dtype = _input_dtype(match.bias_input, scale_dtype)
                bias_shape = tuple(const_tensor(match.bias_source).shape.numpy())
                node.replace_input_with(bias_index, pool.filled(0.0, bias_dtype, bias_shape, hint))
        return f"{match.form} with scale = ones"

    fused = None if keep_structure else _fused_replacement(match, graph, pool, opset)
    if fused is not None:
        return fused
    # Keep the chain: the scale Mul multiplies by ones, the bias Add goes away.
    index = list(match.scale_node.inputs).index(match.scale_input)
    match.scale_node.replace_input_with(index, pool.filled(1.0, scale_dtype, shape, hint))
    if match.bias_node is not None:
        match.bias_node.outputs[0].replace_all_uses_with(match.scale_node.outputs[0])
    return "the same chain with scale = ones"


def _fused_replacement(match: NormMatch, graph: ir.Graph, pool: ConstantPool, opset: int) -> str | None:
    if match.kind == "rms":
        op = "RMSNormalization" if opset >= 23 else "SimplifiedLayerNormalization"
    else:
        if opset < 17:
            return None
        op = "LayerNormalization"
    x = match.chain_input
    x_dtype = match.compute_dtype
    after_cast = match.post_cast.attributes["to"].value if match.post_cast is not None else None
    # fp16 chains computed in fp32 (Cast up, ..., Cast back): run the fused op on the fp16
    # input directly; its stash_type=1 keeps the fp32 statistics.
    if (
        match.pre_cast is not None
        and match.outer_input.dtype == ir.DataType.FLOAT16
        and after_cast is not None
        and ir.DataType(after_cast) == ir.DataType.FLOAT16
    ):
        x, x_dtype, after_cast = match.outer_input, ir.DataType.FLOAT16, None
    if x_dtype is None:
        return None
    scale_shape = _scale_shape(match)
    channels = scale_shape[-1] if scale_shape else None
    if channels is None or channels == 1:
        # A scalar scale gives no channel count for a ones vector; keep the chain.
        return None
    ones = pool.filled(1.0, x_dtype, (channels,), f"{x_dtype.name.lower()}_{channels}")
    out_name = pool.unique(f"{match.output.name or 'norm'}.weightless")
    attributes = {"axis": ir.AttrInt64("axis", -1), "epsilon": ir.AttrFloat32("epsilon", match.epsilon)}
    attributes["stash_type"] = ir.AttrInt64("stash_type", 1)
    norm = ir.Node("", op, [x, ones], attributes=list(attributes.values()), num_outputs=1,
                   name=pool.unique(f"{match.scale_source.name or op}/flashnorm"))  # named after the scale it had
    norm.outputs[0].name = out_name
    norm.outputs[0].type = ir.TensorType(x_dtype)
    norm.outputs[0].shape = match.output.shape
    nodes = [norm]
    result = norm.outputs[0]
    if after_cast is not None and ir.DataType(after_cast) != x_dtype:
        cast = ir.Node("", "Cast", [result], attributes=[ir.AttrInt64("to", int(after_cast))],
                       name=pool.unique("flashnorm/Cast"))
        cast.outputs[0].name = pool.unique(f"{out_name}.cast")
        cast.outputs[0].type = ir.TensorType(ir.DataType(after_cast))
        cast.outputs[0].shape = match.output.shape
        nodes.append(cast)
        result = cast.outputs[0]
    graph.insert_after(match.anchor, nodes)
    match.output.replace_all_uses_with(result)
    return op + (" + Cast" if len(nodes) > 1 else "") + " with scale = ones"
