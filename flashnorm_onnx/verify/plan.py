"""Plan-diff: the written output is the input plus the fold's plan, and nothing else.

The other checks look at what the fold meant to change (each rewritten norm, each folded linear,
each folded tensor). This one proves that nothing else changed, so that, taken together, they are
the whole-model equality at any model size. It compares the two files (ONNX protos read without
their tensor data) against the plan's declaration (:func:`~flashnorm_onnx.verify.declaration.declaration`: the rewrite sites and the
tensors written, ``FlashNormPassResult.sites`` / ``.written``). It never asks the pass's own
analysis (``norm_patterns``, ``linear_consumers``): a bug there cannot also blind it.

1. **The model**: IR version, opset imports (the default domain may be added where there was
   none), producer, model-local functions, metadata (except the provenance entry), graph inputs
   and outputs are the input's.
2. **Nodes**: every node of the output is

   * the input's node with the same outputs: same op, domain, attributes and inputs (a value the
     plan renamed, a weightless norm's output or a linear's result after a new bias ``Add``, read
     as its input name); or
   * a declared linear: the input's linear node with the same op and attributes and the same data
     input; every other input (weight, bias) comes through the same ``Cast``/``Transpose``/
     ``Reshape`` path as in the input from the same constant, or from a tensor the plan wrote
     *from that constant*; its bias ``Add``, kept or new, likewise; or
   * inside a declared norm's rewrite: between the norm's activation inputs and the value its
     readers read, reading nothing but those inputs and constants.

   Anything else (a node edited, rewired, added) fails, and is named. A declared linear that
   reads a folded weight reads one folded with its own norm's scale (the plan's ``scales``): two
   norms may share a folded tensor (the branches of a merged decoder) only with equal scales.
3. **Initializers**: every initializer the plan does not name is the input's, byte for byte. One
   the streamed writer copied from an external data file is checked by what it copied and from
   where (the input's own location of that same tensor, and the output's reference to where it
   was written), not read back. A new initializer the plan does not name may only be read inside a
   rewritten norm (its ones / zeros).
4. **Readers of what changed**: every tensor the fold wrote (in place or as an untied copy), every
   weightless norm's output and a linear's result before its moved bias has all of its readers in
   the output enumerated, through ``Cast``/``Transpose``/``Reshape`` paths (and, for a norm's
   output, the channel-preserving ops the fold looks through), into subgraphs and into
   function calls. Each must be a declared linear at the input the plan declared (whose function
   the subgraph check runs and whose tensor the algebraic check reads back), or a ``Shape``. Any
   other reader (an embedding ``Gather`` of a tied weight, a graph output, another norm, a
   function call) fails, and is named.

Subgraphs (If branches, Loop/Scan bodies) are flattened into one list of nodes, each value under
its name qualified by its scope (:mod:`~flashnorm_onnx.passes.scopes`): sibling branches reuse
names, and a branch reading an outer weight is one of that weight's readers like any other.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto

from flashnorm_onnx.passes.scopes import proto_scopes, step
from flashnorm_onnx.verify.declaration import Declaration, LinearEdit, NormEdit
from flashnorm_onnx.verify.proto_equal import copied_from_input, same_node, tensor_equal
from flashnorm_onnx.verify.result import VerificationResult

#: The metadata_props key the fold writes (passes/provenance.py); the one model entry allowed to change.
PROVENANCE_KEY = "flashnorm_onnx"

#: Ops a written weight may pass through on its way to the linear that reads it.
WEIGHT_PATH_OPS = frozenset({"Cast", "Transpose", "Reshape", "Identity"})
#: Ops a weightless norm's output may pass through on its way to its linears: each keeps the
#: channel axis, so a per-channel scale commutes with it (the subgraph check runs from the value
#: the linear reads). A Mul / Div here is by a constant scalar.
NORM_PATH_OPS = frozenset({"Cast", "Identity", "Reshape", "Slice", "Gather", "Transpose", "Unsqueeze", "Squeeze",
                           "Mul", "Div"})
#: Readers that see only a value's shape.
SHAPE_OPS = frozenset({"Shape", "Size"})

_ONNX_DOMAINS = ("", "ai.onnx")
_MAX_REGION = 64


class _Graph:
    """One file's graphs, flattened: the main graph's nodes and those of every subgraph (If
    branches, Loop/Scan bodies, nested), each value under its qualified name (the prefix of the
    graph that defines it, :mod:`~flashnorm_onnx.passes.scopes`), so sibling branches that reuse
    names stay apart and a branch reading an outer weight is one of that weight's readers. A node
    that owns subgraphs keeps, in place of each, its signature (inputs with types, outputs); the
    subgraph's nodes are checked as nodes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.model = onnx.load(str(path), load_external_data=False)
        self.nodes: list[onnx.NodeProto] = []
        self.scope_of: list[str] = []
        self.inits: dict[str, TensorProto] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        """Qualified outputs of the main graph and of every subgraph."""
        scopes = list(proto_scopes(self.model.graph))
        self._defined: dict[str, set[str]] = {}
        self._parents: dict[str, str | None] = {}
        for prefix, g, parent in scopes:
            self._parents[prefix] = parent
            self._defined[prefix] = ({v.name for v in g.input} | {t.name for t in g.initializer}
                                     | {t.values.name for t in g.sparse_initializer}
                                     | {o for n in g.node for o in n.output if o})
        for prefix, g, _ in scopes:
            self.inits.update((prefix + t.name, t) for t in g.initializer)
            self.inputs += [prefix + v.name for v in g.input]
            self.outputs += [self.qualify(v.name, prefix) for v in g.output]
            for node in g.node:
                flat = onnx.NodeProto()
                flat.CopyFrom(node)
                flat.input[:] = [self.qualify(x, prefix) if x else "" for x in node.input]
                flat.output[:] = [prefix + x if x else "" for x in node.output]
                key = next((o for o in node.output if o), node.name or node.op_type)
                for attribute in flat.attribute:
                    self._signature(attribute, prefix, key)
                self.nodes.append(flat)
                self.scope_of.append(prefix)
        self.producer: dict[str, int] = {}
        self.readers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for k, node in enumerate(self.nodes):
            for o in node.output:
                if o:
                    self.producer[o] = k
            for i, x in enumerate(node.input):
                if x:
                    self.readers[x].append((k, i))

    def qualify(self, name: str, prefix: str) -> str:
        """The qualified name of ``name`` read in the graph of ``prefix`` (the innermost graph
        that defines it; unchanged when none does, which the dangling check names)."""
        scope: str | None = prefix
        while scope is not None:
            if name in self._defined[scope]:
                return scope + name
            scope = self._parents[scope]
        return name

    def _signature(self, attribute: AttributeProto, prefix: str, key: str) -> None:
        """Replace a subgraph attribute by its signature (its nodes are flattened beside it)."""
        if attribute.type == AttributeProto.GRAPH:
            graphs = [(step(prefix, attribute.name, key), attribute.g)]
        elif attribute.type == AttributeProto.GRAPHS:
            graphs = [(step(prefix, f"{attribute.name}[{k}]", key), g) for k, g in enumerate(attribute.graphs)]
        else:
            return
        parts = []
        for sub, g in graphs:
            ins = [f"{v.name}:{_type_key(v.type)}" for v in g.input]
            outs = [self.qualify(v.name, sub) for v in g.output]
            parts.append(f"subgraph {sub} inputs {ins} outputs {outs}")
        name = attribute.name
        attribute.Clear()
        attribute.name = name
        attribute.type = AttributeProto.STRING
        attribute.s = "; ".join(parts).encode()

    def label(self, k: int) -> str:
        node = self.nodes[k]
        name = self.scope_of[k] + node.name if node.name else node.output[0]  # outputs are qualified
        return f"{node.op_type} '{name}'"

    def constant_source(self, name: str) -> str | None:
        """``name`` itself if it is an initializer or a Constant node's output, else None."""
        if name in self.inits:
            return name
        k = self.producer.get(name)
        if k is not None and self.nodes[k].op_type == "Constant" and self.nodes[k].domain in _ONNX_DOMAINS:
            return name
        return None

    def trace(self, name: str) -> tuple[list[int], str | None]:
        """The path of ops (WEIGHT_PATH_OPS, through their data input) from a constant to ``name``,
        and that constant (None: no constant at the end of such a path)."""
        path: list[int] = []
        while self.constant_source(name) is None:
            k = self.producer.get(name)
            if k is None or self.nodes[k].op_type not in WEIGHT_PATH_OPS or len(path) > 16:
                return path, None
            path.append(k)
            name = self.nodes[k].input[0]
        return path, name


# -- the check -----------------------------------------------------------------------------------


class _Problems:
    def __init__(self):
        self.items: list[tuple[str, str]] = []

    def add(self, name: str, message: str) -> None:
        self.items.append((name, message))


def check_plan(reference: str | os.PathLike, output: str | os.PathLike, declared: Declaration,
               copied: dict | None = None) -> VerificationResult:
    """The output file equals the reference file plus ``declared`` (see the module docstring).

    ``copied``: the streamed writer's record of the tensors it copied unchanged
    (``tensor_io.save_with_external_data``)."""
    a, b = _Graph(Path(reference)), _Graph(Path(output))
    problems = _Problems()
    _check_model(a.model, b.model, problems)

    rename = _renames(declared)
    accounted: set[int] = set()
    linear_of: dict[int, LinearEdit] = {}  # linear node -> its declaration
    bias_add_of: dict[int, LinearEdit] = {}
    for edit in declared.linears:
        _check_linear(a, b, edit, declared.written, rename, accounted, linear_of, bias_add_of, problems)
    region: dict[int, str] = {}  # node -> the norm whose rewrite it is part of
    for norm in declared.norms:
        _norm_region(b, norm, region, problems)
    accounted |= set(region)
    _check_region_nodes(a, b, region, problems)
    kept = _check_other_nodes(a, b, accounted, rename, problems)
    _check_scales(b, declared, problems)

    new_constants = _check_initializers(a, b, declared.written, copied or {}, region, problems)
    readers = _check_readers(b, declared, linear_of, bias_add_of, region, problems)
    _check_dangling(b, problems)
    return _plan_result(b, declared, copied, kept, new_constants, readers, problems)


def _renames(declared: Declaration) -> dict[str, str]:
    """Output name -> input name of the values the plan renamed: each weightless norm's output,
    each linear's result after a new bias Add."""
    rename = {n.after: n.before for n in declared.norms if n.after}
    rename.update({x.result_after: x.result_before for x in declared.linears if x.result_after})
    return rename


def _check_region_nodes(a: _Graph, b: _Graph, region: dict[int, str], problems: _Problems) -> None:
    """A node of the input kept in a norm's rewrite has only its constants swapped (a new scale,
    bias, or one dropped); any other difference is a problem."""
    for k, norm_name in region.items():
        node = b.nodes[k]
        j = a.producer.get(node.output[0]) if node.output and node.output[0] else None
        if j is not None and list(a.nodes[j].output) == list(node.output):
            why = _region_node_difference(a, b, a.nodes[j], node)
            if why:
                problems.add(node.output[0], f"{b.label(k)} in the rewrite of norm '{norm_name}' {why}")


def _region_node_difference(a: _Graph, b: _Graph, node_a: onnx.NodeProto, node_b: onnx.NodeProto) -> str | None:
    """Why ``node_b`` (in a norm's rewrite) is not ``node_a`` with constants swapped; None when it is."""
    why = same_node(node_a, node_b, {}, inputs=False)
    ins_a, ins_b = list(node_a.input), list(node_b.input)
    for i, x in enumerate(ins_a):
        y = ins_b[i] if i < len(ins_b) else ""
        # the same input, or a constant (its scale, bias) swapped for a new one or dropped
        if not (y == x or a.constant_source(x) is not None and (not y or y in b.inits and y not in a.inits)):
            why = why or f"reads '{y}' in the output, '{x}' in the input"
    if len(ins_b) > len(ins_a):
        why = why or f"reads {ins_b} in the output, {ins_a} in the input"
    return why


def _check_other_nodes(a: _Graph, b: _Graph, accounted: set[int], rename: dict[str, str],
                       problems: _Problems) -> int:
    """Every output node the plan does not account for is the input's node of the same outputs,
    unchanged (renamed values read as their input names); returns how many are."""
    kept = 0
    for k, node in enumerate(b.nodes):
        if k in accounted:
            continue
        key = next((o for o in node.output if o), None)
        j = a.producer.get(rename.get(key, key)) if key else None
        if j is None or list(a.nodes[j].output) != list(node.output):
            problems.add(key or node.op_type, f"{b.label(k)} is not in the input, and not part of the plan")
            continue
        why = same_node(a.nodes[j], node, rename, bases=(a.path.parent, b.path.parent))
        if why:
            problems.add(key, f"{b.label(k)} {why}; the plan does not change it")
        else:
            kept += 1
    return kept


def _plan_result(b: _Graph, declared: Declaration, copied: dict | None, kept: int, new_constants: int,
                 readers: int, problems: _Problems) -> VerificationResult:
    """The check's result: passed when there is no problem, with what it counted, the first 20
    problems as entries and the first one as its message."""
    from flashnorm_onnx.verify.result import failed_entry

    result = VerificationResult(method="plan", passed=not problems.items)
    copies = sum(1 for name in (copied or {}) if name in b.inits and name not in declared.written)
    result.details.append(
        f"plan: {kept} nodes as in the input, {len(declared.norms)} rewritten norms, {len(declared.linears)} declared "
        f"linears; {len(b.inits) - len(declared.written) - new_constants} initializers the input's "
        f"({copies} checked by what the writer copied and from where); {len(declared.written)} written tensors "
        f"and {len(declared.norms)} weightless norms with {readers} readers, each a declared linear or a Shape")
    for name, message in problems.items[:20]:
        result.outputs.append({**failed_entry("plan", name), "reason": message})
    if problems.items:
        first = problems.items[0][1]
        more = len(problems.items) - 1
        result.message = first + (f" (and {more} more difference(s) from the plan)" if more else "")
    return result


def _check_model(a: onnx.ModelProto, b: onnx.ModelProto, problems: _Problems) -> None:
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if getattr(a, field) != getattr(b, field):
            problems.add(field, f"the model's {field} changed ({getattr(a, field)!r} -> {getattr(b, field)!r})")
    ops_a = {o.domain or "": o.version for o in a.opset_import}
    ops_b = {o.domain or "": o.version for o in b.opset_import}
    if "" not in ops_a and "ai.onnx" not in ops_a:
        ops_b.pop("", None)  # the fold may import the default domain for the fused norms it adds
    if ops_a != ops_b:
        problems.add("opset_import", f"the opset imports changed ({ops_a} -> {ops_b})")
    meta_a = {p.key: p.value for p in a.metadata_props if p.key != PROVENANCE_KEY}
    meta_b = {p.key: p.value for p in b.metadata_props if p.key != PROVENANCE_KEY}
    if meta_a != meta_b:
        lost = sorted(set(meta_a) ^ set(meta_b) | {k for k in meta_a if meta_b.get(k, meta_a[k]) != meta_a[k]})
        problems.add("metadata_props", f"the model's metadata changed ({', '.join(lost)})")
    funcs_a = {(f.domain, f.name, f.overload): f for f in a.functions}
    funcs_b = {(f.domain, f.name, f.overload): f for f in b.functions}
    if funcs_a.keys() != funcs_b.keys():
        problems.add("functions", f"the model-local functions changed ({sorted(funcs_a)} -> {sorted(funcs_b)})")
    else:
        for key, f in funcs_a.items():
            g = funcs_b[key]
            same = (list(f.input) == list(g.input) and list(f.output) == list(g.output)
                    and list(f.attribute) == list(g.attribute) and len(f.node) == len(g.node)
                    and all(list(x.output) == list(y.output) and same_node(x, y, {}) is None
                            for x, y in zip(f.node, g.node)))
            if not same:
                problems.add(key[1], f"model-local function '{key[1]}' changed")
    for what, xs, ys in (("input", a.graph.input, b.graph.input), ("output", a.graph.output, b.graph.output)):
        names_a, names_b = [v.name for v in xs], [v.name for v in ys]
        if names_a != names_b:
            problems.add(what, f"the graph {what}s changed ({names_a} -> {names_b})")
            continue
        for x, y in zip(xs, ys):
            if _type_key(x.type) != _type_key(y.type):
                problems.add(x.name, f"graph {what} '{x.name}' changed type or shape")


def _type_key(t: onnx.TypeProto):
    if t.HasField("tensor_type"):
        tt = t.tensor_type
        dims = None if not tt.HasField("shape") else tuple(
            d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in tt.shape.dim)
        return "tensor", tt.elem_type, dims
    return t.SerializeToString(deterministic=True)


def _check_linear(a: _Graph, b: _Graph, edit: LinearEdit, written: dict[str, str], rename: dict[str, str],
                  accounted: set[int], linear_of: dict, bias_add_of: dict, problems: _Problems) -> None:
    """A declared linear: the input's linear, reading its weight (and bias) from what the plan wrote."""
    name = edit.result_before
    lb, pb = b.producer.get(edit.linear_after), b.producer.get(edit.result_after)
    la, pa = a.producer.get(edit.linear_before), a.producer.get(edit.result_before)
    if lb is None and pb is None and la is not None and not b.readers.get(edit.result_after) \
            and edit.result_after not in b.outputs:
        return  # dead in the input (nothing reads its result): removed with the unused nodes
    if None in (lb, pb, la, pa):
        problems.add(name, f"the linear '{name}' that the plan declares is not in the output or the input")
        return
    accounted.update({lb, pb})
    linear_of[lb] = edit
    node_a, node_b = a.nodes[la], b.nodes[lb]
    if node_b.op_type == "Gemm" and len(node_a.input) < 3 <= len(node_b.input):
        # a Gemm given a bias C (the moved LayerNorm bias) reads it with beta = 1
        beta = [x for x in node_b.attribute if x.name == "beta"]
        node_b = onnx.NodeProto()
        node_b.CopyFrom(b.nodes[lb])
        if beta and beta[0].f == 1.0 and "beta" not in {x.name for x in node_a.attribute}:
            node_b.attribute.remove(next(x for x in node_b.attribute if x.name == "beta"))
    why = same_node(node_a, node_b, rename, inputs=False)
    if why:
        problems.add(name, f"the linear {b.label(lb)} {why}")
        return
    data = rename.get(b.nodes[lb].input[0], b.nodes[lb].input[0])
    if data != a.nodes[la].input[0] or data != edit.data:
        problems.add(name, f"the linear {b.label(lb)} reads '{b.nodes[lb].input[0]}', not the value its "
                           f"input reads ('{a.nodes[la].input[0]}')")
    ins_a, ins_b = list(a.nodes[la].input), list(b.nodes[lb].input)
    for i in range(1, max(len(ins_a), len(ins_b))):
        x = ins_a[i] if i < len(ins_a) else ""
        y = ins_b[i] if i < len(ins_b) else ""
        _same_constant_input(a, b, x, y, written, accounted, f"input {i} of the linear {b.label(lb)}", problems)
    if pb == lb:
        if pa != la:
            problems.add(name, f"the linear {b.label(lb)} lost the bias Add {a.label(pa)}")
        return
    bias_add_of[pb] = edit
    add_b = b.nodes[pb]
    if add_b.op_type != "Add" or edit.linear_after not in add_b.input or len(add_b.input) != 2:
        problems.add(name, f"{b.label(pb)} is not the Add of the linear's bias")
        return
    y = add_b.input[1 - list(add_b.input).index(edit.linear_after)]
    x = ""
    if pa != la:
        add_a = a.nodes[pa]
        if add_a.op_type != "Add" or edit.linear_before not in add_a.input:
            problems.add(name, f"{a.label(pa)} in the input is not the Add of the linear's bias")
            return
        x = add_a.input[1 - list(add_a.input).index(edit.linear_before)]
    _same_constant_input(a, b, x, y, written, accounted, f"the bias of {b.label(lb)}", problems)


def _same_constant_input(a: _Graph, b: _Graph, x: str, y: str, written: dict[str, str], accounted: set[int],
                         what: str, problems: _Problems) -> None:
    """Input ``y`` (output file) stands for input ``x`` (input file): the same value, or the same
    path of ops from a tensor the plan wrote from the constant at the end of ``x``'s path ("" for
    an input that had none: a new bias, which must be a tensor the plan wrote from nothing)."""
    if x == y and y not in written:
        return  # the same value (a constant's bytes are the initializer check's)
    path_b, source_b = b.trace(y) if y else ([], None)
    path_a, source_a = a.trace(x) if x else ([], "")
    if source_b is None or source_a is None:
        if x != y:
            problems.add(y or what, f"{what} reads '{y}' in the output, '{x}' in the input")
        return
    for ka, kb in zip(path_a, path_b):
        why = same_node(a.nodes[ka], b.nodes[kb], {}, inputs=False)
        if why:
            problems.add(y, f"{what}: its path {b.label(kb)} {why}")
            return
        for i in range(1, max(len(a.nodes[ka].input), len(b.nodes[kb].input))):  # e.g. Reshape's shape
            xi = a.nodes[ka].input[i] if i < len(a.nodes[ka].input) else ""
            yi = b.nodes[kb].input[i] if i < len(b.nodes[kb].input) else ""
            if xi != yi and not (xi in a.inits and yi in b.inits and tensor_equal(a.inits[xi], None, b.inits[yi], None)):
                problems.add(y, f"{what}: its path {b.label(kb)} reads '{yi}', not '{xi}'")
                return
    if len(path_a) != len(path_b):
        problems.add(y, f"{what}: the path from its constant has {len(path_b)} ops in the output, {len(path_a)} "
                        "in the input")
        return
    accounted.update(path_b)
    if source_b in written:
        if written[source_b] != source_a:
            problems.add(source_b, f"{what} reads '{source_b}', which the plan wrote from "
                                   f"'{written[source_b] or 'nothing'}', not from '{source_a or 'nothing'}'")
    elif source_b != source_a:
        problems.add(source_b, f"{what} reads '{source_b}' in the output, '{source_a}' in the input")


def _check_scales(b: _Graph, declared: Declaration, problems: _Problems) -> None:
    """Each declared linear reads, where it reads a folded weight, one folded with its own norm's
    scale: two norms whose linears share a weight (the branches of a merged decoder) may share one
    folded tensor only when their scales are equal."""
    scale_of = {n.name: n.g for n in declared.norms}
    for edit in declared.linears:
        k = b.producer.get(edit.linear_after)
        g = scale_of.get(edit.norm)
        if k is None or g is None:
            continue
        for x in list(b.nodes[k].input)[1:]:
            _, source = b.trace(x) if x else ([], None)
            folded = declared.scales.get(source) if source else None
            if folded is None:
                continue
            same = np.shape(folded) == np.shape(g) and np.array_equal(np.asarray(folded, np.float64),
                                                                      np.asarray(g, np.float64))
            if not same:
                problems.add(source, f"the linear {b.label(k)} of norm '{edit.norm}' reads '{source}', which "
                                     "the plan folded with another norm's scale")


def _norm_region(b: _Graph, norm: NormEdit, region: dict[int, str], problems: _Problems) -> None:
    """The nodes that compute a rewritten norm in the output: from its activation inputs to the
    value its readers read, reading nothing else but constants."""
    stack, seen = [norm.after], set()
    while stack:
        name = stack.pop()
        if name in seen or name in norm.inputs or name in b.inits:
            continue
        seen.add(name)
        k = b.producer.get(name)
        if k is None:
            problems.add(name, f"the rewritten norm '{norm.name}' reads '{name}', which is not one of its "
                               f"inputs {norm.inputs}")
            continue
        if k in region:
            continue
        region[k] = norm.name
        if len([r for r in region.values() if r == norm.name]) > _MAX_REGION:
            problems.add(norm.after, f"the rewritten norm '{norm.name}' does not lead back to its inputs "
                                     f"{norm.inputs} within {_MAX_REGION} nodes")
            return
        node = b.nodes[k]
        stack.extend(x for x in node.input if x)


def _check_initializers(a: _Graph, b: _Graph, written: dict[str, str], copied: dict, region: dict[int, str],
                        problems: _Problems) -> int:
    """Every initializer the plan does not name is the input's; returns how many are new (ones / zeros)."""
    base_a, base_b = a.path.parent, b.path.parent
    new = 0
    for name in written:
        if name not in b.inits and (b.readers.get(name) or name in b.producer):
            problems.add(name, f"tensor '{name}', which the plan wrote, is not an initializer of the output")
    for name, t in b.inits.items():
        if name in written:
            continue
        if name not in a.inits:
            new += 1
            outside = [k for k, _ in b.readers.get(name, []) if k not in region]
            if outside or name in b.outputs or a.constant_source(name) is not None:
                problems.add(name, f"initializer '{name}' is new, and not a tensor the plan wrote"
                             + (f" (read by {b.label(outside[0])})" if outside else ""))
            continue
        entry = copied.get(name)
        same = (copied_from_input(a.inits[name], base_a, t, base_b, entry) if entry is not None
                else tensor_equal(a.inits[name], base_a, t, base_b))
        if not same:
            problems.add(name, f"initializer '{name}' differs from the input's, and the plan does not write it")
    return new


def _check_readers(b: _Graph, declared: Declaration, linear_of: dict, bias_add_of: dict, region: dict[int, str],
                   problems: _Problems) -> int:
    """Every value whose meaning the fold changed is read only by its declared linears (or a Shape)."""
    count = 0
    roots: list[tuple[str, str, str]] = [(name, "weight", f"tensor '{name}', which the fold wrote,")
                                         for name in declared.written]
    roots += [(n.after, "norm:" + n.name, f"the weightless norm '{n.name}' ('{n.after}')") for n in declared.norms
              if n.after]
    roots += [(x.linear_after, "prebias", f"the linear result '{x.linear_after}' before its bias")
              for x in declared.linears if x.linear_after != x.result_after]
    for root, kind, what in roots:
        stack, seen = [root], set()
        while stack:
            value = stack.pop()
            if value in seen:
                continue
            seen.add(value)
            if value in b.outputs:
                problems.add(value, f"{what} is a graph output ('{value}')")
            for k, i in b.readers.get(value, []):
                node = b.nodes[k]
                count += 1
                if node.op_type in SHAPE_OPS:
                    continue
                elif kind == "weight" and i >= 1 and k in linear_of:
                    continue  # the linear's weight/bias: _check_linear traced it to its declared source
                elif kind == "weight" and k in bias_add_of:
                    continue
                elif kind == "prebias" and k in bias_add_of and bias_add_of[k].linear_after == root:
                    continue
                elif kind.startswith("norm:") and i == 0 and k in linear_of and linear_of[k].norm == kind[5:]:
                    continue
                elif kind.startswith("norm:") and k in region and region[k] == kind[5:]:
                    continue  # the norm's own rewrite (its Cast back to the input's dtype)
                elif kind == "weight" and node.op_type in WEIGHT_PATH_OPS and i == 0 or (
                        kind.startswith("norm:") and node.op_type in NORM_PATH_OPS and _channel_preserving(b, k, i)):
                    stack.extend(o for o in node.output if o)
                else:
                    problems.add(value, f"{what} is also read by {b.label(k)}, which is not a linear the plan "
                                        "declares and checks")
    return count


def _channel_preserving(b: _Graph, k: int, index: int) -> bool:
    """A norm's value read at input ``index`` of node ``k`` comes out with each channel scaled alike:
    its data input, and for a Mul / Div a constant scalar on the other side."""
    node = b.nodes[k]
    if node.op_type in ("Mul", "Div"):
        other = node.input[1 - index] if len(node.input) == 2 and index in (0, 1) else ""
        if node.op_type == "Div" and index != 0:
            return False
        if b.constant_source(other) is None:
            return False
        if other in b.inits:
            return int(np.prod(b.inits[other].dims, dtype=np.int64)) <= 1
        value = next((x.t for x in b.nodes[b.producer[other]].attribute if x.name == "value"), None)
        return value is not None and int(np.prod(value.dims, dtype=np.int64)) <= 1
    return index == 0


def _check_dangling(b: _Graph, problems: _Problems) -> None:
    defined = set(b.inputs) | set(b.inits) | set(b.producer)
    for name in list(b.readers) + b.outputs:
        if name not in defined:
            problems.add(name, f"the output reads '{name}', which nothing in it defines")
