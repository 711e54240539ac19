"""Names across a model's scopes: the main graph and its subgraphs (If branches, Loop/Scan bodies).

A subgraph may read any value of its enclosing graphs (its *outer scope*), and two sibling
subgraphs may define the same names: optimum's merged decoder has two If branches that each
compute ``logits`` and most of their 500 values under the same names. So a name alone does not
say which value it is; a name *with its scope* does. A scope is written as a prefix, made of one
step per nesting level::

    ""                                   the main graph
    "then_branch@logits/"                the then-branch of the If whose first output is 'logits'
    "then_branch@logits/body@h.3/"       a Loop body inside that branch

and a value's qualified name is the prefix of the graph that defines it, then its name. The
owner's first output names the step because it is unique in its own scope and the fold never
renames it, so the same prefix denotes the same subgraph in a model and in its folded output.
Both the pass (on onnx-ir) and the plan-diff check (on protos, :func:`proto_scopes`) name values
this way, so the plan's declaration and the check read the same names.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir


def step(prefix: str, attribute: str, owner_output: str) -> str:
    """The prefix of the subgraph in ``attribute`` of the node whose first output is ``owner_output``."""
    return f"{prefix}{attribute}@{owner_output}/"


def _owner_key(node) -> str:
    """What names a subgraph's owner: its first output (its name when it has none)."""
    outputs = [o for o in node.outputs if o is not None and o.name] if hasattr(node, "outputs") else []
    return outputs[0].name if outputs else (node.name or node.op_type)


def subgraphs_of(node: ir.Node) -> Iterator[tuple[str, ir.Graph]]:
    """(attribute name, graph) for each subgraph a node owns (GRAPHS attributes numbered)."""
    for name, a in node.attributes.items():
        if a.type == ir.AttributeType.GRAPH:
            yield name, a.value
        elif a.type == ir.AttributeType.GRAPHS:
            for k, g in enumerate(a.value):
                yield f"{name}[{k}]", g


class Scopes:
    """The prefix of every graph of a model (main graph and nested subgraphs)."""

    def __init__(self, graph: ir.Graph):
        self.main = graph
        self.prefixes: dict[int, str] = {}
        self.graphs: list[tuple[str, ir.Graph]] = []
        self._walk(graph, "")

    def _walk(self, graph: ir.Graph, prefix: str) -> None:
        self.prefixes[id(graph)] = prefix
        self.graphs.append((prefix, graph))
        for node in graph:
            for attribute, sub in subgraphs_of(node):
                self._walk(sub, step(prefix, attribute, _owner_key(node)))

    def prefix(self, graph: ir.Graph | None) -> str:
        return self.prefixes.get(id(graph), "") if graph is not None else ""

    def name(self, value: ir.Value | None) -> str:
        """``value``'s qualified name ("" when it has no name)."""
        if value is None or not value.name:
            return ""
        return self.prefix(value.graph) + value.name


#: onnx.AttributeProto.GRAPH / GRAPHS (this package imports only onnx-ir and numpy)
_GRAPH, _GRAPHS = 5, 10


def proto_scopes(graph) -> Iterator[tuple[str, object, str]]:
    """(prefix, GraphProto, parent prefix or None) for a GraphProto and its nested subgraphs, the
    same prefixes :class:`Scopes` gives the onnx-ir graphs of the same model."""
    stack = [("", graph, None)]
    while stack:
        prefix, g, parent = stack.pop(0)
        yield prefix, g, parent
        for node in g.node:
            key = next((o for o in node.output if o), node.name or node.op_type)
            for a in node.attribute:
                if a.type == _GRAPH:
                    stack.append((step(prefix, a.name, key), a.g, prefix))
                elif a.type == _GRAPHS:
                    for k, sub in enumerate(a.graphs):
                        stack.append((step(prefix, f"{a.name}[{k}]", key), sub, prefix))
