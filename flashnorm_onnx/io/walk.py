"""Every tensor a model holds, wherever it is: in a proto (what the input checks and the publisher
read) and in node attributes of a loaded model (what the writer carries)."""

from __future__ import annotations

import onnx
import onnx_ir as ir


def all_tensors(proto: onnx.ModelProto):
    """Every TensorProto of the model: initializers, sparse initializers' values and indices,
    tensor attributes (TENSOR, TENSORS, SPARSE_TENSOR(S)), subgraphs, model-local functions'
    nodes and the training_info graphs included."""
    def sparse(s):
        yield s.values
        yield s.indices

    def nodes(node_list):
        for node in node_list:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors
                elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield from sparse(a.sparse_tensor)
                elif a.type == onnx.AttributeProto.SPARSE_TENSORS:
                    for s in a.sparse_tensors:
                        yield from sparse(s)
                elif a.type == onnx.AttributeProto.GRAPH:
                    yield from walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        yield from walk(g)

    def walk(graph):
        yield from graph.initializer
        for s in graph.sparse_initializer:
            yield from sparse(s)
        yield from nodes(graph.node)

    yield from walk(proto.graph)
    for function in proto.functions:
        yield from nodes(function.node)
    for info in proto.training_info:
        for graph in (info.initialization, info.algorithm):
            yield from walk(graph)


def attribute_tensors(model: ir.Model):
    """``(node, attribute name, index or None, tensor)`` for each tensor held by a node attribute
    (TENSOR, or one entry of TENSORS): a Constant's ``value`` and the like, in the graph, its
    subgraphs and the model-local functions."""
    for graph in (model.graph, *model.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for name, attr in node.attributes.items():
                if attr.is_ref() or attr.value is None:
                    continue
                if attr.type == ir.AttributeType.TENSOR:
                    yield node, name, None, attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    for i, t in enumerate(attr.value):
                        yield node, name, i, t
