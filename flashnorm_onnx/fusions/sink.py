"""Run each node only where its result is read (``--for-ort``, after the fusions).

The fusions leave nodes whose results nothing reads (a ``Split`` of packed Q/K/V once
``GroupQueryAttention`` reads the packed tensor itself) and nodes read only inside one branch of
an ``If`` (the same ``Split`` where an ``If`` chooses between the rotary-inside node, which reads
the packed tensor, and the rotary-outside node, which reads the three parts). ONNX Runtime runs
every node of the main graph on every call, whichever branch is taken, so both cost a copy of
the activations per layer (2% of SmolLM2's prefill on the CPU).

- a one-dimension ``Shape`` reads that dimension from the earliest value that has it
  (:mod:`flashnorm_onnx.fusions.shape_source`), so that it keeps no node running for its shape;
- a node whose outputs nothing reads (and that are no graph output) is removed;
- a node of the main graph all of whose outputs are read only by nodes of one branch graph of one
  ``If`` (directly in that branch, not deeper), and by no graph output, moves into that branch,
  before its first reader. A branch sees the values of the graph around it, so the node reads
  the same inputs and computes the same values, now only when the branch runs.

Nodes with subgraphs of their own, and nodes of non-deterministic ops, stay where they are. The
main graph is walked from its end, so a chain of such nodes moves together, in order.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from flashnorm_onnx.fusions.shape_source import reroute_shape_reads

# ops whose result is not a function of their inputs: running them once less changes nothing
# here, but they are left alone so that no output's randomness moves
_RANDOM = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


def sink_into_branches(model: ir.Model) -> int:
    """Reroute shape reads, remove unread nodes, then move nodes read by one ``If`` branch only
    into it, level by level (see the module docstring). Returns how many moves were made."""
    graphs = [model.graph, *model.graph.subgraphs()]  # outer graphs first
    for graph in graphs:
        reroute_shape_reads(graph)
    common_passes.RemoveUnusedNodesPass()(model)
    owners = {id(sub): node for graph in graphs for node in graph for sub in _subgraphs(node)}
    moved = 0
    for graph in graphs:
        outputs = {id(v) for v in graph.outputs}
        for node in reversed(list(graph)):
            target = _only_branch(node, graph, outputs, owners)
            if target is None:
                continue
            branch, anchors = target
            graph.remove(node)
            branch.insert_before(next(n for n in branch if id(n) in anchors), node)
            moved += 1
    return moved


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    return [g for a in node.attributes.values() if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for g in (a.value if a.type == ir.AttributeType.GRAPHS else [a.value])]


def _only_branch(node: ir.Node, graph: ir.Graph, graph_outputs: set[int],
                 owners: dict[int, ir.Node]) -> tuple[ir.Graph, set[int]] | None:
    """(branch, anchors): the one branch graph, of an ``If`` in ``graph``, that holds every reader
    of ``node``'s outputs, and the ids of its nodes that are or hold those readers; None where
    there is none."""
    if node.op_type in _RANDOM or _subgraphs(node):
        return None
    branches, anchors = set(), set()
    for value in node.outputs:
        if id(value) in graph_outputs:
            return None
        for use in value.uses():
            top = _top(use.node, graph, owners)
            if top is None:
                return None
            branches.add(top[0])
            anchors.add(id(top[1]))
    if len(branches) != 1:
        return None
    branch = branches.pop()
    owner = owners[id(branch)]
    return (branch, anchors) if owner.op_type == "If" and owner.domain in ("", "ai.onnx") else None


def _top(reader: ir.Node, graph: ir.Graph, owners: dict[int, ir.Node]) -> tuple[ir.Graph, ir.Node] | None:
    """(the subgraph directly inside ``graph`` that holds ``reader``, the node of it that is or
    holds ``reader``); None where ``reader`` is in ``graph`` itself (or not below it)."""
    anchor, where = reader, reader.graph
    while where is not None and where is not graph:
        owner = owners.get(id(where))
        if owner is None:
            return None
        if owner.graph is graph:
            return where, anchor
        anchor, where = owner, owner.graph
    return None
