"""Verification within bounds, and clean errors for odd inputs.

* generated verification inputs are capped (min(1 GiB, available memory / 8)): symbolic sizes
  are reduced to fit, model-declared sizes over the cap are refused (exit 6) before anything is
  allocated;
* a wall-clock limit per verification (``--verify-timeout``, exit 9);
* a tensor that declares a shape but holds no data, a NUL in an external data location (exit 3);
* negative ``--dim``, bad ``--rtol`` / ``--verify-timeout`` values (exit 2).

Every case: the exit code, one clean line on stderr, nothing written, the input byte-identical.
"""

from __future__ import annotations

import json
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.graphs import save
from tests.helpers import assert_clean_error, cli, refused, rms_model, snapshot
from tests.helpers import cli_measured, in_process

USAGE, BAD_INPUT, UNAVAILABLE, TIMEOUT = 2, 3, 6, 9


# -- models --------------------------------------------------------------------------------------


def static_model(shape: list[int]) -> onnx.ModelProto:
    """rms_model with a fixed (model-declared) input shape."""
    model = rms_model()
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, shape))
    return model


def loop_model() -> onnx.ModelProto:
    """rms_model whose q feeds a Loop of 10**12 iterations (body: Identity(cond), v + 1): runs forever."""
    model = rms_model()
    graph = model.graph
    shape = ["b", "s", 8]
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    graph.initializer.extend([numpy_helper.from_array(np.array(10**12, np.int64), "M"),
                              numpy_helper.from_array(np.array(True), "cond")])
    graph.node.append(helper.make_node("Loop", ["M", "cond", "q"], ["qloop"], body=body))
    graph.output[0].CopyFrom(helper.make_tensor_value_info("qloop", TensorProto.FLOAT, ["batch", "seq", 8]))
    return model


# -- input size cap --------------------------------------------------------------------------------


def test_static_input_over_the_cap_is_refused_before_allocating(tmp_path):
    # 1.5 KB model, x declared [512, 65536, 16] float32 = 2 GiB: over any cap (at most 1 GiB)
    src = tmp_path / "m" / "model.onnx"
    src.parent.mkdir()
    src.write_bytes(static_model([512, 65536, 16]).SerializeToString())
    assert src.stat().st_size < 4096
    before = snapshot(tmp_path)
    proc, elapsed, peak = cli_measured("optimize", src, "-o", tmp_path / "out" / "o.onnx")
    assert_clean_error(proc, UNAVAILABLE, "input 'x'", "[512, 65536, 16]", "2.0 GiB", "verification input cap",
                       "--no-verify")
    assert snapshot(tmp_path) == before
    assert peak < 600 * 2**20, f"peak RSS {peak / 2**20:.0f} MiB: the inputs were allocated"


def test_static_input_over_a_smaller_cap(tmp_path, capsys, monkeypatch):
    from flashnorm_onnx.verify import sizing

    monkeypatch.setattr(sizing, "verification_cap", lambda: 16 * 1024)
    src = save(static_model([4, 1000, 16]), tmp_path / "m" / "model.onnx")  # 250 KiB of input
    before = snapshot(tmp_path)
    proc = in_process(capsys, "optimize", src, "-o", tmp_path / "out" / "o.onnx")
    assert_clean_error(proc, UNAVAILABLE, "input 'x' [4, 1000, 16]", "250.0 KiB", "16.0 KiB", "--no-verify")
    assert snapshot(tmp_path) == before


def test_symbolic_sizes_are_reduced_to_fit(tmp_path, capsys, monkeypatch):
    from flashnorm_onnx.verify import sizing

    # x[batch, seq, 16] float32: the default cases are batch 2 x 8 tokens (1 KiB) and 1 x 3 (192 B)
    monkeypatch.setattr(sizing, "verification_cap", lambda: 600)
    src = save(rms_model(), tmp_path / "m" / "model.onnx")
    inputs_before = snapshot(src.parent)
    out, report = tmp_path / "out" / "o.onnx", tmp_path / "r.json"
    proc = in_process(capsys, "optimize", src, "-o", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "PASSED" in proc.stdout
    assert "input shapes reduced to fit the verification cap" in proc.stdout
    cases = json.loads(report.read_text())["verification"]["cases"]
    reduced = [c for c in cases if "reduced" in c]
    assert reduced == ["run1: input shapes reduced to fit the verification cap (0.6 KiB): sequence 8 -> 4"], cases
    assert "run1: x[2, 4, 16]" in cases and "run2: x[1, 3, 16]" in cases
    assert out.is_file() and snapshot(src.parent) == inputs_before


def test_fit_case_never_goes_below_one(monkeypatch):
    from flashnorm_onnx.verify import sizing
    from flashnorm_onnx.verify.inputs import Case, InputSpec
    from flashnorm_onnx.verify.sizing import fit_case

    specs = [InputSpec("ids", np.dtype(np.int64), ["batch", "sequence"]),
             InputSpec("past", np.dtype(np.float32), ["batch", 4, "past_sequence", 8])]
    case, note = fit_case(specs, Case("prefill", batch=4, sequence=64, past=32))
    assert note is None and case.sequence == 64  # 4 KiB: the real cap is far above
    monkeypatch.setattr(sizing, "verification_cap", lambda: 400)  # the largest of batch/sequence/past halved first
    case, note = fit_case(specs, Case("decode", batch=4, sequence=64, past=32))
    assert (case.batch, case.sequence, case.past) == (1, 2, 2), case
    assert note.endswith("(0.4 KiB): batch 4 -> 1, sequence 64 -> 2, past 32 -> 2"), note
    monkeypatch.setattr(sizing, "verification_cap", lambda: 200)
    case, _ = fit_case(specs, Case("decode", batch=4, sequence=64, past=32))
    assert (case.batch, case.sequence, case.past) == (1, 1, 1), case
    assert fit_case(specs, Case("prefill", batch=1, sequence=1, past=0)) == (Case("prefill", 1, 1, 0), None)
    monkeypatch.setattr(sizing, "verification_cap", lambda: 100)  # 1 token + 1 past: 8 + 128 bytes, cannot fit
    with pytest.raises(Exception, match="over the verification input cap"):
        fit_case(specs, Case("decode", batch=1, sequence=1, past=1))


def test_cap_is_at_most_1_gib_and_an_eighth_of_available():
    from flashnorm_onnx.verify import sizing

    available = sizing.available_memory()
    assert available is None or available > 0
    cap = sizing.verification_cap()
    assert 0 < cap <= 2**30
    if available is not None:
        assert cap <= available // 8 + 1


# -- wall-clock limit -----------------------------------------------------------------------------


def test_the_loop_model_runs_forever_until_terminated():
    """The input model itself hangs in ONNX Runtime: RunOptions.terminate is what stops it."""
    from flashnorm_onnx.errors import VerificationTimeout
    from flashnorm_onnx.verify.whole import Deadline, make_session

    session = make_session(loop_model().SerializeToString())
    feeds = {"x": np.ones((1, 2, 16), np.float32)}
    start = time.monotonic()
    with pytest.raises(VerificationTimeout, match="within 1 s"):
        Deadline(1.0).run(session, feeds)
    assert 0.9 < time.monotonic() - start < 10


def test_verify_timeout_stops_a_hanging_verification(tmp_path):
    src = save(loop_model(), tmp_path / "m" / "model.onnx")
    assert "1 foldable" in cli("inspect", src).stdout  # verification has something to check
    before = snapshot(tmp_path)
    proc, elapsed, _ = cli_measured("optimize", src, "-o", tmp_path / "out" / "o.onnx", "--verify-timeout", "2")
    assert_clean_error(proc, TIMEOUT, "verification did not finish within 2 s (--verify-timeout)",
                       "nothing written")
    assert snapshot(tmp_path) == before
    assert elapsed < 30, elapsed  # interpreter start + fold + 2 s


def test_timeout_checked_between_cases(monkeypatch):
    from flashnorm_onnx.verify import whole as verify
    from flashnorm_onnx.errors import VerificationTimeout

    deadline = verify.Deadline(5.0)
    assert verify.Deadline(0).end is None and verify.Deadline(None).end is None
    deadline.check()
    deadline.end = time.monotonic() - 1
    with pytest.raises(VerificationTimeout):
        deadline.check()
    with pytest.raises(VerificationTimeout):
        deadline.run(None, {})  # refuses to start a run past the deadline


def test_timeout_error_takes_a_message_too():
    """verify_subgraph raises VerificationTimeout(message): same class, same exit code."""
    from flashnorm_onnx.errors import VerificationTimeout

    assert VerificationTimeout("x").exit_code == VerificationTimeout.after(2).exit_code == TIMEOUT
    assert str(VerificationTimeout.after(2.5)) == (
        "verification did not finish within 2.5 s (--verify-timeout); nothing written")


# -- tensors without data, odd external data locations ----------------------------------------------


@pytest.mark.parametrize("where", ["initializer", "constant"])
def test_tensor_declaring_a_shape_without_data(tmp_path, where):
    model = rms_model()
    empty = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[1000, 1000, 300])  # 1.2 GB declared
    if where == "initializer":
        model.graph.initializer.append(empty)
    else:
        model.graph.node.insert(0, helper.make_node("Constant", [], ["big_out"], value=empty))
    src = tmp_path / "m" / "model.onnx"
    src.parent.mkdir()
    src.write_bytes(model.SerializeToString())
    assert src.stat().st_size < 2048
    before = snapshot(tmp_path)
    proc, elapsed, peak = cli_measured("optimize", src, "-o", tmp_path / "out" / "o.onnx")
    assert_clean_error(proc, BAD_INPUT, "tensor 'big' declares shape [1000, 1000, 300] but holds no data")
    assert snapshot(tmp_path) == before
    assert peak < 400 * 2**20, f"peak RSS {peak / 2**20:.0f} MiB"
    assert elapsed < 30
    refused(tmp_path, src, BAD_INPUT, "holds no data", command="inspect")


def test_scalar_and_empty_tensors_are_fine(tmp_path):
    model = rms_model()
    model.graph.initializer.append(TensorProto(name="unused_empty", data_type=TensorProto.FLOAT, dims=[0, 4]))
    src = save(model, tmp_path / "m" / "model.onnx")
    proc = cli("optimize", src, "-o", tmp_path / "out" / "o.onnx", "-q")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("location", ["model.onnx.data\x00.txt", "\x00", "x" * 5000])
def test_odd_external_data_location(tmp_path, location):
    src = save(rms_model(), tmp_path / "m" / "model.onnx", external=True)
    proto = onnx.load(str(src), load_external_data=False)
    for e in next(t for t in proto.graph.initializer if t.name == "g").external_data:
        if e.key == "location":
            e.value = location
    src.write_bytes(proto.SerializeToString())
    word = "NUL character" if "\x00" in location else "unusable external data location"
    refused(tmp_path, src, BAD_INPUT, "tensor 'g'", word)


# -- option values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("option", [
    ["--dim", "batch=-1"], ["--dim", "seq=-100"],
    ["--rtol", "-1"], ["--rtol=-1e-3"], ["--rtol", "nan"], ["--rtol", "inf"], ["--rtol=-inf"], ["--rtol", "abc"],
    ["--verify-timeout", "-1"], ["--verify-timeout", "nan"], ["--verify-timeout", "inf"],
    ["--verify-timeout", "soon"],
])
def test_bad_option_values(tmp_path, capsys, option):
    src = save(rms_model(), tmp_path / "m" / "model.onnx")
    before = snapshot(tmp_path)
    proc = in_process(capsys, "optimize", src, "-o", tmp_path / "out" / "o.onnx", *option)
    assert_clean_error(proc, USAGE, option[0].split("=")[0])
    assert snapshot(tmp_path) == before


def test_bad_option_value_through_a_subprocess(tmp_path):
    src = save(rms_model(), tmp_path / "m" / "model.onnx")
    before = snapshot(tmp_path)
    assert_clean_error(cli("optimize", src, "--rtol", "nan"), USAGE, "--rtol", "finite")
    assert_clean_error(cli("optimize", src, "--dim", "batch=-2"), USAGE, "--dim", "negative")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("rtol", ["0", "1e-3"])
def test_zero_timeout_means_no_limit_and_rtol_zero_is_allowed(tmp_path, capsys, rtol):
    src = save(rms_model(), tmp_path / "m" / "model.onnx")
    proc = in_process(capsys, "optimize", src, "-o", tmp_path / "out" / "o.onnx", "--verify-timeout", "0",
                      "--rtol", rtol, "-q")
    assert proc.returncode in (0, 5), proc.stderr  # rtol 0: exact up to atol, may fail verification
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("k_axis", [0, 1])
def test_sampled_columns_are_read_from_the_file_exactly(tmp_path, k_axis):
    """The subgraph check's sample of a large weight is read with pread (never mapped whole):
    it must equal numpy's slice of the tensor."""
    import numpy as np
    import onnx_ir as ir

    from flashnorm_onnx.verify.subgraph import _read_columns

    rng = np.random.default_rng(3)
    array = rng.standard_normal((37, 53)).astype(np.float16)
    raw = b"\0" * 24 + array.tobytes()
    (tmp_path / "w.data").write_bytes(raw)
    tensor = ir.ExternalTensor("w.data", offset=24, length=array.nbytes, dtype=ir.DataType.FLOAT16,
                               shape=ir.Shape(array.shape), name="w", base_dir=str(tmp_path))
    cols = slice(5, 5 + 7)
    got = _read_columns(tensor, array.shape, k_axis, cols)
    expected = array[:, cols] if k_axis == 0 else array[cols, :]
    assert got is not None and got.dtype == array.dtype
    np.testing.assert_array_equal(got, expected)
