"""The input perimeter: models check_input must refuse (or carry) before any work.

Cycles, duplicate writers, sparse tensors, external data in places other than initializers
(Constant nodes, model-local functions, training_info, TENSORS attributes, sparse values),
data locations that are not regular files, a Hugging Face cache snapshot whose data file links
into ../../blobs, and --dim sizes below 1. Every refusal: one line naming the problem, a
documented exit code, no traceback, nothing written, the input untouched. The CLI runs in-process.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flashnorm_onnx import cli as cli
from flashnorm_onnx.io import model_io
from tests.graphs import save
from tests.helpers import rms_model, snapshot
from tests.helpers import write, external, constant_model, with_output

BAD_INPUT, USAGE = 3, 2


def main(capsys, *args) -> tuple[int, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err.strip()


def refused(capsys, tmp_path: Path, src: Path, code: int, *words: str, extra=(), commands=("optimize",)) -> str:
    """optimize (and the other ``commands``) refuse src with one clean line; nothing changes on disk."""
    err = ""
    for command in commands:
        before = snapshot(tmp_path)
        out = tmp_path / "out" / "model.onnx"
        args = ["-o", out, *extra] if command == "optimize" else []  # extra: optimize's options
        got, err = main(capsys, command, src, *args)
        assert got == code, (command, got, err)
        assert "Traceback" not in err, err
        assert len(err.splitlines()) == 1, err
        assert err.startswith("flashnorm-onnx: error:"), err
        for w in words:
            assert w.lower() in err.lower(), (w, err)
        assert snapshot(tmp_path) == before
        assert not (tmp_path / "out").exists()
    return err


# -- 1. cycles -----------------------------------------------------------------------------------


def cyclic_model() -> onnx.ModelProto:
    """q feeds a two-node loop: loop_a reads loop_b's output and loop_b reads loop_a's."""
    return with_output(rms_model(), [
        helper.make_node("Add", ["q", "b_out"], ["a_out"], name="loop_a"),
        helper.make_node("Relu", ["a_out"], ["b_out"], name="loop_b"),
    ], "a_out")


@pytest.mark.parametrize("extra", [["--no-verify"], []])
def test_cycle_is_refused(tmp_path, capsys, extra):
    src = write(cyclic_model(), tmp_path / "m" / "model.onnx")
    err = refused(capsys, tmp_path, src, BAD_INPUT, "cycle", extra=extra, commands=("optimize", "inspect"))
    assert "loop_a" in err or "loop_b" in err, err


def test_cycle_in_a_subgraph_is_refused(tmp_path, capsys):
    body = helper.make_graph([
        helper.make_node("Add", ["q", "d_out"], ["c_out"], name="inner_c"),
        helper.make_node("Relu", ["c_out"], ["d_out"], name="inner_d"),
    ], "then", [], [helper.make_tensor_value_info("c_out", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["q"], ["e_out"])], "else", [],
                              [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    model = rms_model()
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    with_output(model, [helper.make_node("If", ["cond"], ["r"], then_branch=body, else_branch=other)], "r")
    src = write(model, tmp_path / "m" / "model.onnx")
    err = refused(capsys, tmp_path, src, BAD_INPUT, "cycle", extra=["--no-verify"])
    assert "inner_c" in err or "inner_d" in err, err


def test_a_graph_out_of_order_without_a_cycle_is_accepted(tmp_path, capsys):
    """Only a cycle is refused: nodes listed out of topological order are not one."""
    model = rms_model()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    src = write(model, tmp_path / "m" / "model.onnx")
    info = model_io.check_input(src)
    assert info.path == src


# -- 2. sparse tensors ---------------------------------------------------------------------------


def sparse(name: str, values, indices, dims) -> onnx.SparseTensorProto:
    return helper.make_sparse_tensor(numpy_helper.from_array(np.asarray(values, np.float32), name),
                                     numpy_helper.from_array(np.asarray(indices, np.int64), name + "_idx"), dims)


def test_sparse_initializer_is_refused(tmp_path, capsys):
    model = rms_model()
    model.graph.sparse_initializer.append(sparse("sp", [1.0, 2.0], [1, 5], [8]))
    with_output(model, [helper.make_node("Add", ["q", "sp"], ["q2"])], "q2")
    src = write(model, tmp_path / "m" / "model.onnx")
    refused(capsys, tmp_path, src, BAD_INPUT, "sparse initializer", "'sp'", "not supported")


def test_sparse_constant_is_refused(tmp_path, capsys):
    model = rms_model()
    with_output(model, [helper.make_node("Constant", [], ["sp"], name="sparse_c",
                                         sparse_value=sparse("sp_v", [1.0], [3], [8])),
                        helper.make_node("Add", ["q", "sp"], ["q2"])], "q2")
    src = write(model, tmp_path / "m" / "model.onnx")
    refused(capsys, tmp_path, src, BAD_INPUT, "sparse", "sparse_c", "not supported")


# -- 3. a Constant's external data is carried ----------------------------------------------------


def function_constant_model(folder: Path) -> onnx.ModelProto:
    """rms_model plus a model-local function whose Constant's value is in fconst.bin."""
    value = np.random.default_rng(4).standard_normal(8).astype(np.float32)
    body = [helper.make_node("Constant", [], ["fc"], value=external(value, "fc_t", "fconst.bin", folder)),
            helper.make_node("Add", ["fx", "fc"], ["fy"])]
    model = rms_model()
    model.functions.append(helper.make_function("local", "AddConst", ["fx"], ["fy"], body,
                                                [helper.make_opsetid("", 18)]))
    model.opset_import.append(helper.make_opsetid("local", 1))
    return with_output(model, [helper.make_node("AddConst", ["q"], ["extra"], domain="local")], "extra")


def dangling(model_file: Path) -> list[str]:
    """External locations of the model that do not name a regular file inside its folder."""
    proto = onnx.load(str(model_file), load_external_data=False)
    base = model_file.parent.resolve()
    bad = []
    for t in model_io.all_tensors(proto):
        if t.data_location == TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}["location"]
            target = (base / loc).resolve()
            if not target.is_file() or base not in target.parents:
                bad.append(loc)
    return bad


@pytest.mark.parametrize("reader", ["add", "matmul", "function"])
@pytest.mark.parametrize("external_weights", [True, False])
def test_constant_with_external_data_is_carried(tmp_path, capsys, reader, external_weights):
    from tests.graphs import feeds_for, run

    folder = tmp_path / "m"
    model = function_constant_model(folder) if reader == "function" else constant_model(folder, reader)
    src = save(model, folder / "model.onnx", external=external_weights)
    before = snapshot(folder)
    out = tmp_path / "elsewhere" / "model.onnx"
    code, err = main(capsys, "optimize", src, "-o", out, "-q")
    assert code == 0, err
    assert snapshot(folder) == before
    assert dangling(out) == []
    assert not {"const.bin", "fconst.bin"} & {p.name for p in out.parent.iterdir()}
    feeds = feeds_for(onnx.load(str(src), load_external_data=False))
    for want, got in zip(run(src, feeds), run(out, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# -- 4. external data locations everywhere -------------------------------------------------------


def _in_function(model: onnx.ModelProto, location: str) -> None:
    body = [helper.make_node("Constant", [], ["fc"], value=external(np.ones(8, np.float32), "fc_t", location)),
            helper.make_node("Add", ["fx", "fc"], ["fy"])]
    model.functions.append(helper.make_function("local", "AddOnes", ["fx"], ["fy"], body,
                                                [helper.make_opsetid("", 18)]))
    model.opset_import.append(helper.make_opsetid("local", 1))
    with_output(model, [helper.make_node("AddOnes", ["q"], ["q2"], domain="local")], "q2")


def _in_training_info(model: onnx.ModelProto, location: str) -> None:
    info = model.training_info.add()
    info.initialization.CopyFrom(helper.make_graph(
        [], "init", [], [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [8])],
        [external(np.ones(8, np.float32), "t0", location)]))


def _in_tensors_attribute(model: onnx.ModelProto, location: str) -> None:
    node = helper.make_node("Custom", ["q"], ["q2"], domain="custom.ops")
    node.attribute.append(helper.make_attribute("tables", [external(np.ones(8, np.float32), "tab", location)]))
    model.opset_import.append(helper.make_opsetid("custom.ops", 1))
    with_output(model, [node], "q2")


def _in_sparse_values(model: onnx.ModelProto, location: str) -> None:
    values = external(np.ones(8, np.float32), "sp", location)
    s = onnx.SparseTensorProto(values=values, indices=numpy_helper.from_array(np.arange(8, dtype=np.int64), "i"),
                               dims=[8])
    node = helper.make_node("Custom", ["q"], ["q2"], domain="custom.ops")
    node.attribute.append(helper.make_attribute("table", s))
    model.opset_import.append(helper.make_opsetid("custom.ops", 1))
    with_output(model, [node], "q2")


PLACES = {"function": _in_function, "training_info": _in_training_info,
          "tensors_attribute": _in_tensors_attribute, "sparse_values": _in_sparse_values}


@pytest.mark.parametrize("location", ["../outside.data", "/etc/hostname", "sub/../../outside.data"])
@pytest.mark.parametrize("place", sorted(PLACES))
def test_external_location_outside_the_folder_anywhere(tmp_path, capsys, place, location):
    (tmp_path / "outside.data").write_bytes(np.ones(8, np.float32).tobytes())
    model = rms_model()
    PLACES[place](model, location)
    src = write(model, tmp_path / "m" / "model.onnx")
    if place == "sparse_values":  # refused as sparse first or as outside: either names the cause
        refused(capsys, tmp_path, src, BAD_INPUT, "sparse")
    else:
        refused(capsys, tmp_path, src, BAD_INPUT, "outside the model's folder", commands=("optimize", "inspect"))


def test_external_data_missing_in_a_function(tmp_path, capsys):
    model = rms_model()
    _in_function(model, "nothere.bin")
    src = write(model, tmp_path / "m" / "model.onnx")
    refused(capsys, tmp_path, src, BAD_INPUT, "nothere.bin", "missing")


def test_training_info_is_listed_as_dropped(tmp_path):
    model = rms_model()
    for _ in range(2):
        info = model.training_info.add()
        info.algorithm.CopyFrom(helper.make_graph([], "alg", [], []))
    src = write(model, tmp_path / "m" / "model.onnx")
    assert model_io.check_input(src).dropped == ["training_info (2 entries)"]
    plain = write(rms_model(), tmp_path / "p" / "model.onnx")
    assert model_io.check_input(plain).dropped == []
    import flashnorm_onnx

    report = flashnorm_onnx.optimize(src, tmp_path / "o" / "model.onnx")  # the report says what the output drops
    assert "not carried into the output: training_info (2 entries)" in report.notes, report.notes
    assert not onnx.load(str(tmp_path / "o" / "model.onnx")).training_info


# -- 5. --dim sizes below 1 ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1"])
def test_dim_below_one_is_a_usage_error(tmp_path, capsys, value):
    src = write(rms_model(), tmp_path / "m" / "model.onnx")
    err = refused(capsys, tmp_path, src, USAGE, f"--dim batch={value}", extra=["--dim", f"batch={value}"])
    assert "at least 1" in err or "negative" in err, err


@pytest.mark.parametrize("value", [0, -3])
def test_check_dims_refuses_sizes_below_one(value):
    with pytest.raises(ValueError, match="at least 1"):
        model_io.check_dims({"batch": value})
    model_io.check_dims({"batch": 1, "seq": 7})
    model_io.check_dims(None)


def test_api_refuses_dims_below_one(tmp_path):
    import flashnorm_onnx

    src = write(rms_model(), tmp_path / "m" / "model.onnx")
    with pytest.raises(ValueError, match="at least 1"):
        flashnorm_onnx.optimize(src, tmp_path / "out" / "model.onnx", dims={"batch": 0})
    assert not (tmp_path / "out").exists()


# -- 6. error lines that name the cause ----------------------------------------------------------


def _point_at(src: Path, location: str) -> None:
    proto = onnx.load(str(src), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    src.write_bytes(proto.SerializeToString())


def test_external_location_is_a_directory(tmp_path, capsys):
    src = save(rms_model(), tmp_path / "m" / "model.onnx", external=True)
    (src.parent / "weights").mkdir()
    _point_at(src, "weights")
    refused(capsys, tmp_path, src, BAD_INPUT, "'weights'", "is a directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_external_location_is_a_fifo(tmp_path, capsys):
    src = save(rms_model(), tmp_path / "m" / "model.onnx", external=True)
    os.mkfifo(src.parent / "pipe.data")
    _point_at(src, "pipe.data")
    refused(capsys, tmp_path, src, BAD_INPUT, "'pipe.data'", "is a FIFO, not a regular file")


def test_duplicate_node_outputs_name_the_value(tmp_path, capsys):
    model = rms_model()
    model.graph.node.append(helper.make_node("Relu", ["kk"], ["q"], name="second_q"))
    src = write(model, tmp_path / "m" / "model.onnx")
    refused(capsys, tmp_path, src, BAD_INPUT, "'q'", "written by two nodes", extra=["--no-verify"])


def test_node_output_shadowing_a_graph_input_is_refused(tmp_path, capsys):
    model = rms_model()
    model.graph.node.append(helper.make_node("Relu", ["kk"], ["x"], name="writes_x"))
    src = write(model, tmp_path / "m" / "model.onnx")
    refused(capsys, tmp_path, src, BAD_INPUT, "'x'", "graph input", extra=["--no-verify"])


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links here")
def test_hugging_face_cache_snapshot_says_copy_with_links_resolved(tmp_path, capsys):
    """models--org--name/snapshots/<hash>/model.onnx(.data) are relative links into ../../blobs."""
    staging = tmp_path / "staging"
    save(rms_model(), staging / "model.onnx", external=True)
    repo = tmp_path / "hub" / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for name, sha in (("model.onnx", "aaaa1111"), ("model.onnx.data", "bbbb2222")):
        (staging / name).rename(blobs / sha)
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / sha)
    refused(capsys, tmp_path, snap / "model.onnx", BAD_INPUT, "'model.onnx.data'", "symlink",
                  "outside the model's folder", "cp -rL", commands=("optimize", "inspect"))
    # the folder form of the same input (optimize on a folder is the folder mode, which lists
    # links as links; inspect resolves the folder to its model.onnx)
    refused(capsys, tmp_path, snap, BAD_INPUT, "symlink", "cp -rL", commands=("inspect",))
