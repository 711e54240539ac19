"""Is a parsed ``onnx.ModelProto`` well formed, before onnx-ir or ONNX Runtime sees it? Each check
returns the first problem in words (or None): names that are not UTF-8, a node whose arity or
attributes its schema does not allow, a sparse tensor (onnx-ir cannot carry one), a value written
twice, a read of a value nothing writes, a cycle -- in the main graph, every subgraph and every
function. :func:`flashnorm_onnx.io.model_io.check_input` turns them into one-line errors."""

from __future__ import annotations

import onnx


def _node_label(node: onnx.NodeProto) -> str:
    if node.name:
        return f"{node.op_type} node '{node.name}'"
    return f"{node.op_type} node writing '{node.output[0]}'" if node.output else f"a {node.op_type} node"


def _sub_graphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def first_sparse_tensor(proto: onnx.ModelProto) -> str | None:
    """A sparse initializer or sparse tensor attribute (onnx-ir, which writes the output, drops
    the first and cannot read the second)."""
    def nodes(node_list, where):
        for node in node_list:
            for a in node.attribute:
                if a.type in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS):
                    return (f"{_node_label(node)}{where} has a sparse tensor attribute '{a.name}': sparse tensors "
                            "are not supported (give it a dense value)")
            for g in _sub_graphs(node):
                found = walk(g)
                if found:
                    return found
        return None

    def walk(graph):
        if len(graph.sparse_initializer):
            s = graph.sparse_initializer[0]
            name = s.values.name or s.indices.name
            return (f"sparse initializer '{name}': sparse initializers are not supported (the output would "
                    "lose it); convert it to a dense initializer")
        return nodes(graph.node, "")

    found = walk(proto.graph)
    for function in proto.functions:
        found = found or nodes(function.node, f" in function '{function.name}'")
    return found


def first_graph_problem(proto: onnx.ModelProto) -> str | None:
    """A value written twice (by two nodes, or by a node and a graph input or initializer), or a
    cycle among the nodes, in the main graph, a subgraph or a model-local function. Names only:
    no tensor data is read."""
    found = _first_problem_in(proto.graph.node, [v.name for v in proto.graph.input],
                              [t.name for t in proto.graph.initializer], "")
    for function in proto.functions:
        found = found or _first_problem_in(function.node, list(function.input), [], f" of function '{function.name}'")
    return found


def _first_problem_in(node_list, inputs, initializers, where: str) -> str | None:
    """:func:`first_graph_problem` for one graph's nodes (``where`` names the graph in the
    message), then for their subgraphs."""
    producer, problem = _producers(node_list, inputs, initializers, where)
    if problem is not None:
        return problem
    readers, preds = _edges(node_list, producer)
    problem = _first_cycle(node_list, readers, preds, where)
    if problem is not None:
        return problem
    for node in node_list:
        for g in _sub_graphs(node):
            found = _first_problem_in(g.node, [v.name for v in g.input], [t.name for t in g.initializer],
                                      f" in subgraph '{g.name}'" if g.name else " in a subgraph")
            if found:
                return found
    return None


def _producers(node_list, inputs, initializers, where: str) -> tuple[dict[str, int], str | None]:
    """Who writes each value: the node's index, -1 for a graph input, -2 for an initializer; and
    the first value written twice, as a message (None when there is none)."""
    producer: dict[str, int] = {}
    for name in inputs:
        producer.setdefault(name, -1)
    for name in initializers:
        producer.setdefault(name, -2)
    for i, node in enumerate(node_list):
        for out in node.output:
            if not out:
                continue
            k = producer.get(out)
            if k is None:
                producer[out] = i
            elif k >= 0:
                return producer, (f"not a valid ONNX model: value '{out}'{where} is written by two nodes "
                                  f"({_node_label(node_list[k])} and {_node_label(node)})")
            else:
                what = "a graph input" if k == -1 else "an initializer"
                return producer, (f"not a valid ONNX model: {_node_label(node)}{where} writes '{out}', which is "
                                  f"also {what}")
    return producer, None


def _edges(node_list, producer: dict[str, int]) -> tuple[list[set[int]], list[set[int]]]:
    """The nodes' dependencies, by index: each node's readers and its predecessors (a node reads
    another's output directly or from inside one of its subgraphs)."""
    readers: list[set[int]] = [set() for _ in node_list]
    preds: list[set[int]] = [set() for _ in node_list]
    for j, node in enumerate(node_list):
        names = set(node.input) | _outer_reads(node)
        for name in names:
            i = producer.get(name, -1) if name else -1
            if i >= 0:
                readers[i].add(j)
                preds[j].add(i)
    return readers, preds


def _first_cycle(node_list, readers: list[set[int]], preds: list[set[int]], where: str) -> str | None:
    """A cycle among the nodes, as a message naming a node on it (None when they sort)."""
    indegree = [len(p) for p in preds]
    ready = [j for j, d in enumerate(indegree) if d == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for j in readers[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                ready.append(j)
    if done == len(node_list):
        return None
    # follow unresolved predecessors back until one repeats: that node is on a cycle
    j = next(k for k, d in enumerate(indegree) if d > 0)
    seen: list[int] = []
    while j not in seen:
        seen.append(j)
        j = next(i for i in preds[j] if indegree[i] > 0)
    cycle = seen[seen.index(j):]
    others = ", ".join(f"'{node_list[k].name or node_list[k].output[0]}'" for k in cycle[1:4])
    return (f"not a valid ONNX model: the graph{where} has a cycle: {_node_label(node_list[j])} depends "
            f"on its own output" + (f" (through {others})" if others else ""))


def _outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (recursively) read from the scopes around it."""
    refs: set[str] = set()
    for g in _sub_graphs(node):
        defined = {v.name for v in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            defined.update(n.output)
        for n in g.node:
            refs.update(x for x in n.input if x and x not in defined)
            refs.update(x for x in _outer_reads(n) if x not in defined)
        refs.update(v.name for v in g.output if v.name not in defined)
    return refs


def first_undecodable_name(proto: onnx.ModelProto) -> str | None:
    """Protobuf hands back ``bytes`` for a string field that is not valid UTF-8: find one.

    Walks every message except tensor payloads (only a tensor's name and external data entries
    are strings that matter)."""
    from google.protobuf.descriptor import FieldDescriptor

    string, message = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE
    stack: list = [proto]
    while stack:
        msg = stack.pop()
        if isinstance(msg, onnx.TensorProto):
            values = [("name", msg.name), ("doc_string", msg.doc_string)]
            values += [("external_data", v) for e in msg.external_data for v in (e.key, e.value)]
            for field, value in values:
                if not isinstance(value, str):
                    return f"a tensor's {field}"
            continue
        for field, value in msg.ListFields():
            repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
            if field.type == string:
                if any(not isinstance(v, str) for v in (value if repeated else [value])):
                    return f"a {type(msg).__name__.replace('Proto', '')} {field.name}"
            elif field.type == message:
                stack.extend(value if repeated else [value])
    return None


#: Attributes of ONNX Runtime's fused norms (not in onnx.defs) that the fold reads.
_ATTRIBUTE_TYPES = {
    (op, name): kind
    for op in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization")
    for name, kind in (("epsilon", onnx.AttributeProto.FLOAT), ("axis", onnx.AttributeProto.INT))
}


def first_bad_arity(proto: onnx.ModelProto) -> str | None:
    """A standard-domain node with fewer or more inputs/outputs than its schema allows."""
    versions = {o.domain or "": o.version for o in proto.opset_import}
    version = versions.get("", versions.get("ai.onnx"))
    if version is None:
        return None
    schemas: dict[str, object] = {}

    def walk(graph):
        for node in graph.node:
            for a in node.attribute:
                expected = _ATTRIBUTE_TYPES.get((node.op_type, a.name))
                if a.type == onnx.AttributeProto.UNDEFINED or (expected is not None and a.type != expected):
                    return f"{node.op_type} node '{node.name}' has attribute '{a.name}' of the wrong type"
            if node.domain in ("", "ai.onnx"):
                if node.op_type not in schemas:
                    try:
                        schemas[node.op_type] = onnx.defs.get_schema(node.op_type, version, "")
                    except Exception:  # unknown op or version: ONNX Runtime will say
                        schemas[node.op_type] = None
                schema = schemas[node.op_type]
                if schema is not None:
                    n_in, n_out = len(node.input), len(node.output)
                    label = node.name or (f"-> {node.output[0]}" if node.output else "")
                    if not schema.min_input <= n_in <= schema.max_input:
                        return f"{node.op_type} node '{label}' has {n_in} input(s)"
                    if not schema.min_output <= n_out <= schema.max_output:
                        return f"{node.op_type} node '{label}' has {n_out} output(s)"
                    for a in node.attribute:
                        if a.name not in schema.attributes:
                            return f"{node.op_type} node '{label}' has an unknown attribute '{a.name}'"
                        if int(a.type) != int(schema.attributes[a.name].type.value):
                            return f"{node.op_type} node '{label}' has attribute '{a.name}' of the wrong type"
            for a in node.attribute:
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    found = walk(g)
                    if found:
                        return found
        return None

    return walk(proto.graph)
