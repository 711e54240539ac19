"""The decomposed RMSNorm/LayerNorm chains of an onnx graph, for the benchmarks' 'no norm' variants."""

from __future__ import annotations


def norm_chain_nodes(graph) -> list[tuple[str, list[str], str]]:
    """Decomposed RMSNorm/LayerNorm chains in an onnx GraphProto.

    Returns (input name, node names, output name) per chain: Pow(x, 2) -> ReduceMean -> Add(eps)
    -> Sqrt -> Reciprocal | Div(1, .) -> Mul(x, .) [-> Cast] [-> Mul(scale, .)], with a leading
    Cast(x) when the chain starts with one. Also used to build 'no norm' variants.
    """
    consumers: dict[str, list] = {}
    producer: dict[str, object] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node
    const_names = {t.name for t in graph.initializer}
    const_names |= {n.output[0] for n in graph.node if n.op_type == "Constant"}

    def only(name: str, ops: set[str]):
        users = [n for n in consumers.get(name, []) if n.op_type in ops]
        return users[0] if len(users) == 1 else None

    chains = []
    for pow_node in graph.node:
        if pow_node.op_type != "Pow":
            continue
        x = pow_node.input[0]
        names = [pow_node.name]
        node = only(pow_node.output[0], {"ReduceMean"})
        if node is None:
            continue
        names.append(node.name)
        node = only(node.output[0], {"Add"})
        if node is None:
            continue
        names.append(node.name)
        node = only(node.output[0], {"Sqrt"})
        if node is None:
            continue
        names.append(node.name)
        inv = only(node.output[0], {"Reciprocal", "Div"})
        if inv is None:
            continue
        names.append(inv.name)
        if inv.op_type == "Div" and inv.input[0] not in const_names:
            # Div(x, sqrt): the division is the normalization itself
            mul = inv
            names.pop()
        else:
            mul = only(inv.output[0], {"Mul"})
        if mul is None:
            continue
        if mul is not inv:
            names.append(mul.name)
        end = mul.output[0]
        nxt = only(end, {"Cast"})
        if nxt is not None and len(consumers.get(end, [])) == 1:
            names.append(nxt.name)
            end = nxt.output[0]
        nxt = only(end, {"Mul"})
        if nxt is not None and len(consumers.get(end, [])) == 1:
            other = [i for i in nxt.input if i != end]
            if other and (other[0] in const_names or other[0] in producer and
                          producer[other[0]].op_type in ("Cast", "Constant")):
                names.append(nxt.name)
                end = nxt.output[0]
        src = producer.get(x)
        if src is not None and src.op_type == "Cast":
            names.insert(0, src.name)
        chains.append((x, names, end))
    return chains
