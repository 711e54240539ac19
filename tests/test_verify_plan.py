"""The plan-diff check (flashnorm_onnx/verify_plan.py): the output is the input plus the plan.

The mutation suite (test_verify_mutations.py) breaks the pass and runs the CLI in every mode; here the
check itself is held to each part of what it claims: model-level entries, the writer's copies,
and readers of every rewritten tensor, on hand-edited outputs of a correct fold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from flashnorm_onnx.pipeline import api
from flashnorm_onnx import cli as cli
from flashnorm_onnx.verify import plan as verify_plan
from flashnorm_onnx.verify.declaration import declaration
from flashnorm_onnx.passes import FlashNormFoldPass, flashnorm_fold
from tests import graphs
from tests.helpers import snapshot


def _folded(tmp_path: Path, model: onnx.ModelProto | None = None):
    """(input path, output path, declaration) of a correct fold of the tied decoder."""
    model = model or graphs.tied_decoder()
    model.metadata_props.add(key="source", value="test")
    src = graphs.save(model, tmp_path / "in" / "model.onnx")
    ir_model = ir.load(str(src))
    result = FlashNormFoldPass()(ir_model)
    assert result.report.folded == 2
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    ir.save(ir_model, str(out))
    return src, out, declaration(result)


def _edit(path: Path, edit) -> None:
    proto = onnx.load(str(path))
    edit(proto)
    onnx.save(proto, str(path))


def test_correct_fold_passes_and_says_what_it_checked(tmp_path):
    src, out, declared = _folded(tmp_path)
    result = verify_plan.check_plan(src, out, declared)
    assert result.passed, result.message
    assert declared.written and all(source for source in declared.written.values())  # untied copies of E, Wq
    assert "2 rewritten norms, 2 declared linears" in result.details[0]


def _node(proto, name):
    return next(n for n in proto.graph.node if n.name == name)


EDITS = {
    # what changed -> (edit of the output proto, the words the check names it by)
    "metadata entry lost": (lambda p: p.metadata_props.pop(0) if p.metadata_props[0].key == "source"
                            else p.metadata_props.pop(1), "metadata"),
    "opset changed": (lambda p: p.opset_import[0].__setattr__("version", 17), "opset imports"),
    "graph output renamed": (lambda p: p.graph.output[0].__setattr__("name", "other"), "graph outputs"),
    "attribute edited": (lambda p: next(n for n in p.graph.node if n.op_type == "Transpose")  # the untied copy's
                         .attribute[0].ints.__setitem__(slice(None), [0, 1]), "attribute 'perm'"),
    "attribute added": (lambda p: _node(p, "embed").attribute.append(onnx.helper.make_attribute("axis", 1)),
                        "has attributes"),
    "node dropped and its reader rewired": (
        lambda p: (_node(p, "residual").input.__setitem__(1, "q"), p.graph.node.remove(_node(p, "o_proj"))),
        "Add 'residual'"),
    "node added": (lambda p: p.graph.node.append(onnx.helper.make_node("Relu", ["q"], ["spare"], name="spare")),
                   "Relu 'spare' is not in the input"),
    "function added": (lambda p: p.functions.append(onnx.helper.make_function(
        "local", "f", ["a"], ["b"], [onnx.helper.make_node("Identity", ["a"], ["b"])], [])), "functions"),
    "embedding reads the untied copy": (
        lambda p: _node(p, "embed").input.__setitem__(0, next(i.name for i in p.graph.initializer
                                                              if i.name.startswith("E.flashnorm"))),
        "Gather 'embed'"),
    "a written tensor becomes a graph output": (
        lambda p: p.graph.output.append(onnx.helper.make_tensor_value_info(
            next(i.name for i in p.graph.initializer if i.name.startswith("Wq")), onnx.TensorProto.FLOAT, None)),
        "graph output"),
}


@pytest.mark.parametrize("what", list(EDITS))
def test_each_change_outside_the_plan_is_named(what, tmp_path):
    src, out, declared = _folded(tmp_path)
    edit, words = EDITS[what]
    _edit(out, edit)
    result = verify_plan.check_plan(src, out, declared)
    assert not result.passed
    assert any(words in o["reason"] for o in result.outputs), [o["reason"] for o in result.outputs]


def test_a_tensor_read_inside_a_subgraph_is_named(tmp_path):
    """A folded weight read by an If branch (an outer-scope reference) is a reader outside the plan."""
    src, out, declared = _folded(tmp_path)
    written = next(name for name, source in declared.written.items() if source == "Wq")

    def edit(p):
        branch = onnx.helper.make_graph([onnx.helper.make_node("Identity", [written], ["w_out"])], "b", [],
                                        [onnx.helper.make_tensor_value_info("w_out", onnx.TensorProto.FLOAT, None)])
        p.graph.initializer.append(onnx.numpy_helper.from_array(np.array(True), "cond"))
        p.graph.node.append(onnx.helper.make_node("If", ["cond"], ["w_any"], name="branch", then_branch=branch,
                                                  else_branch=branch))

    _edit(out, edit)
    result = verify_plan.check_plan(src, out, declared)
    assert not result.passed
    reasons = [o["reason"] for o in result.outputs]
    # what reads it is named with its scope: each branch's Identity passes it to the branch's output
    for branch in ("then_branch", "else_branch"):
        assert any(f"which the fold wrote, is a graph output ('{branch}@w_any/w_out')" in r for r in reasons), reasons


def _external_model(tmp_path: Path) -> Path:
    return graphs.save(graphs.tied_decoder(), tmp_path / "m" / "model.onnx", external=True)


def test_writer_copies_checked_by_source_not_read_back(tmp_path, monkeypatch, capsys):
    """Unchanged tensors the streamed writer copied are proved by the writer's record against the
    input's own locations: none of them is read back and compared."""
    src = _external_model(tmp_path)
    compared: list[str] = []
    real = verify_plan.tensor_equal
    monkeypatch.setattr(verify_plan, "tensor_equal",
                        lambda a, ba, b, bb: compared.append(a.name) or real(a, ba, b, bb))
    report = api.optimize(src, tmp_path / "out" / "model.onnx", verify_mode="subgraph")
    assert report.verification.passed, report.text()
    case = next(c for c in report.verification.details if "checked by what the writer copied" in c)
    copied = int(case.split("(")[1].split()[0])
    assert copied >= 2  # E and Wo: [32, 16] and [16, 16] float32, above the writer's inline size
    assert "E" not in compared and "Wo" not in compared


def test_writer_copying_the_wrong_bytes_is_caught(tmp_path, monkeypatch, capsys):
    """A tensor outside the plan pointed at another tensor's bytes: the writer copies from there,
    and its record no longer matches the input's location of that tensor (exit 5, nothing written)."""
    src = _external_model(tmp_path)
    real = flashnorm_fold.FlashNormFoldPass.apply

    def apply(self, model, plans):
        result = real(self, model, plans)
        wo = model.graph.initializers["Wo"]
        other = ir.load(str(src)).graph.initializers["Wq"].const_value  # same shape, other bytes
        wo.const_value = ir.ExternalTensor(other.location, other.offset, other.length, other.dtype,
                                           shape=other.shape, name="Wo", base_dir=other.base_dir)
        return result

    monkeypatch.setattr(flashnorm_fold.FlashNormFoldPass, "apply", apply)
    before = snapshot(tmp_path)
    code = cli.main(["optimize", str(src), "-o", str(tmp_path / "out" / "model.onnx"), "--verify", "subgraph"])
    text = capsys.readouterr()
    assert code == 5, text
    assert "initializer 'Wo' differs from the input's" in text.out + text.err
    assert snapshot(tmp_path) == before


def test_a_constant_in_external_data_is_compared_by_its_bytes(tmp_path, monkeypatch, capsys):
    """A Constant node whose value lives in external data (carried into the output's data file):
    its value outside the plan changed is named, although both attributes are only references."""
    from tests.helpers import constant_model, write

    src = write(constant_model(tmp_path / "m", "add"), tmp_path / "m" / "model.onnx")
    out = tmp_path / "out" / "model.onnx"
    assert cli.main(["optimize", str(src), "-o", str(out), "--verify", "subgraph"]) == 0  # carried, and the same
    real = flashnorm_fold.FlashNormFoldPass.apply

    def apply(self, model, plans):
        result = real(self, model, plans)
        node = next(n for n in model.graph if n.name == "ext_c")
        value = node.attributes["value"].value.numpy() + np.float32(1)
        node.attributes["value"] = ir.AttrTensor("value", ir.Tensor(value, name="c_t"))
        return result

    monkeypatch.setattr(flashnorm_fold.FlashNormFoldPass, "apply", apply)
    capsys.readouterr()
    code = cli.main(["optimize", str(src), "-o", str(tmp_path / "out2" / "model.onnx"), "--verify", "subgraph"])
    text = capsys.readouterr()
    assert code == 5 and "Constant 'ext_c' has another value of attribute 'value'" in text.out + text.err, text


def test_a_constant_in_external_data_with_other_bytes_is_named(tmp_path, monkeypatch, capsys):
    """Both Constants are references into data files; the bytes they point at are compared."""
    from tests.helpers import constant_model, write

    src = write(constant_model(tmp_path / "m", "add"), tmp_path / "m" / "model.onnx")
    real = verify_plan.check_plan

    def corrupt_then_check(reference, output, declared, copied=None):
        proto = onnx.load(str(output), load_external_data=False)
        value = next(a.t for n in proto.graph.node if n.name == "ext_c" for a in n.attribute if a.name == "value")
        assert value.data_location == onnx.TensorProto.EXTERNAL  # carried as a reference, not inlined
        where = {e.key: e.value for e in value.external_data}
        with open(Path(output).parent / where["location"], "r+b") as f:
            f.seek(int(where.get("offset", 0)))
            f.write(b"\x01\x02\x03\x04")
        return real(reference, output, declared, copied)

    monkeypatch.setattr(verify_plan, "check_plan", corrupt_then_check)
    code = cli.main(["optimize", str(src), "-o", str(tmp_path / "out" / "model.onnx"), "--verify", "subgraph"])
    text = capsys.readouterr()
    assert code == 5 and "Constant 'ext_c' has another value of attribute 'value'" in text.out + text.err, text


def _constant_weight_model() -> onnx.ModelProto:
    """The tied decoder with q_proj's weight held by a Constant node instead of an initializer."""
    model = graphs.tied_decoder()
    w = next(i for i in model.graph.initializer if i.name == "Wq")
    model.graph.initializer.remove(w)
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["Wq"], value=w, name="wq_const"))
    return model


def test_a_weight_held_by_a_constant_node_is_traced_to_it(tmp_path):
    """The fold writes the folded copy from the Constant's value; the check traces the declared
    linear's weight to that Constant and passes, and a linear rewired to another Constant (a
    weight the plan did not write) is named."""
    src, out, declared = _folded(tmp_path, _constant_weight_model())
    assert "Wq" in declared.written.values()
    result = verify_plan.check_plan(src, out, declared)
    assert result.passed, result.message

    def rewire(p):
        w = next(n for n in onnx.load(str(src)).graph.node if n.op_type == "Constant").attribute[0].t
        other = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * 2, "Wq_other")
        p.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["Wq_other"], value=other, name="other"))
        _node(p, "q_proj").input[1] = "Wq_other"

    _edit(out, rewire)
    result = verify_plan.check_plan(src, out, declared)
    assert not result.passed
    assert any("q_proj" in o["reason"] for o in result.outputs), [o["reason"] for o in result.outputs]
