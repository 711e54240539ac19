"""What the tests share: small models, running the CLI (in-process and in a subprocess),
snapshots of a folder, clean-error assertions, memory measured in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from flashnorm_onnx import cli as cli_module
from flashnorm_onnx.passes import FlashNormFoldPass
from flashnorm_onnx.verify import policy

from tests import graphs
from tests.graphs import save

BAD_OUTPUT = 4


def with_output(model: onnx.ModelProto, nodes, name: str) -> onnx.ModelProto:
    """``model`` with ``nodes`` added and ``name`` (float) made a graph output."""
    model.graph.node.extend(nodes)
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return model


def write(proto: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    return path


def external(array: np.ndarray, name: str, location: str, folder: Path | None = None) -> onnx.TensorProto:
    """A tensor whose data is in ``location`` (written into ``folder`` when given)."""
    t = numpy_helper.from_array(array, name)
    raw = t.raw_data
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / location).write_bytes(raw)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        e = t.external_data.add()
        e.key, e.value = key, value
    return t


def constant_model(folder: Path, reader: str) -> onnx.ModelProto:
    """rms_model plus a Constant whose value is in const.bin beside the model, read by an Add
    (q + c) or as the weight of a third MatMul (y @ c)."""
    rng = np.random.default_rng(3)
    model = rms_model()
    if reader == "add":
        value = rng.standard_normal(8).astype(np.float32)
        nodes = [helper.make_node("Constant", [], ["c"], name="ext_c",
                                  value=external(value, "c_t", "const.bin", folder)),
                 helper.make_node("Add", ["q", "c"], ["extra"])]
    else:
        value = (rng.standard_normal((16, 8)) / 4).astype(np.float32)
        nodes = [helper.make_node("Constant", [], ["c"], name="ext_c",
                                  value=external(value, "c_t", "const.bin", folder)),
                 helper.make_node("MatMul", ["y", "c"], ["extra"])]
    return with_output(model, nodes, "extra")


def cli_measured(*args) -> tuple[subprocess.CompletedProcess, float, int]:
    """cli() that also returns the wall time and the CLI process's own peak RSS in bytes.

    Measured in a small wrapper process: a child forked straight from pytest would start with
    pytest's resident set (Linux carries it into the child's ru_maxrss across exec)."""
    wrapper = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.monotonic()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr, 'seconds': time.monotonic() - t,"
        " 'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "flashnorm_onnx.cli", *map(str, args)]
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env,
                          check=True, timeout=300)
    r = json.loads(proc.stdout)
    return subprocess.CompletedProcess(cmd, r["rc"], r["out"], r["err"]), r["seconds"], r["rss"]


def in_process(capsys, *args) -> subprocess.CompletedProcess:
    """The CLI's main() in this process (fast, and monkeypatch reaches it)."""
    code = cli_module.main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


MB = 1 << 20


def peak_rss_of(cmd: list[str]) -> tuple[int, subprocess.CompletedProcess]:
    wrapper = (
        "import resource, subprocess, sys, json\n"
        f"p = subprocess.run({cmd!r}, capture_output=True, text=True)\n"
        "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr,"
        " 'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    return result["rss"], subprocess.CompletedProcess(cmd, result["rc"], result["out"], result["err"])


def fold(model: onnx.ModelProto, **kwargs):
    ir_model = ir.serde.deserialize_model(model)
    result = FlashNormFoldPass(**kwargs)(ir_model)
    return ir.serde.serialize_model(result.model), result.report


def assert_same(a: onnx.ModelProto, b: onnx.ModelProto, rtol=1e-5, atol=1e-5, seed=1):
    feeds = graphs.feeds_for(a, seed=seed)
    for x, y in zip(graphs.run(a, feeds), graphs.run(b, feeds)):
        np.testing.assert_allclose(y.astype(np.float64), x.astype(np.float64), rtol=rtol, atol=atol)


def run_mode(mode: str, src, out, monkeypatch, capsys) -> tuple[int, str]:
    args = ["optimize", str(src), "-o", str(out)]
    if mode == "auto-large":
        monkeypatch.setattr(policy, "VERIFY_MEMORY_FRACTION", 1e-12)  # every model is "too large" to run whole
    elif mode == "subgraph-sampled":  # what the subgraph check does with large weights, on every weight
        from flashnorm_onnx.verify import subgraph as verify_subgraph

        monkeypatch.setattr(verify_subgraph, "SAMPLE_BYTES", 0)
        monkeypatch.setattr(verify_subgraph, "SAMPLE_COLUMNS", 4)
        args += ["--verify", "subgraph"]
    else:
        args += ["--verify", mode]
    code = cli_module.main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


BAD_INPUT = 3


def rms_model(k: int = 16, n: int = 8, seed: int = 0, scale: np.ndarray | None = None) -> onnx.ModelProto:
    """Decomposed RMSNorm (Pow->ReduceMean->Add->Sqrt->Reciprocal->Mul->Mul(g)) feeding two MatMuls."""
    rng = np.random.default_rng(seed)
    g = rng.uniform(0.5, 1.5, size=k).astype(np.float32) if scale is None else scale.astype(np.float32)
    inits = [
        numpy_helper.from_array(g, "g"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), "wq"),
        numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), "wk"),
    ]
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["nrm"]),
        helper.make_node("Mul", ["nrm", "g"], ["y"]),
        helper.make_node("MatMul", ["y", "wq"], ["q"]),
        helper.make_node("MatMul", ["y", "wk"], ["kk"]),
    ]
    graph = helper.make_graph(
        nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k])],
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("kk", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def plain_model() -> onnx.ModelProto:
    """No normalization at all: x @ W."""
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder (hidden staging folders included) and its hash."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(folder)) + "/"] = "dir"
    return out


def cli(*args, preexec_fn=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "flashnorm_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, preexec_fn=preexec_fn, env=env, timeout=120)


def assert_clean_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(err.splitlines()) == 1, proc.stderr
    assert err.startswith("flashnorm-onnx: error:"), err
    for w in words:
        assert w.lower() in err.lower(), (w, err)
    return err


def refused(tmp_path: Path, src: Path, code: int, *words: str, extra=(), command: str = "optimize") -> str:
    """Run optimize (and inspect) on src; assert a clean error and that nothing changed on disk."""
    before = snapshot(tmp_path)
    out = tmp_path / "out" / "model.onnx"
    args = [command, src, *(["-o", out] if command == "optimize" else []), *extra]
    err = assert_clean_error(cli(*args), code, *words)
    assert snapshot(tmp_path) == before
    return err


def swap_int4_nibbles(monkeypatch) -> None:
    """A mutation: every int4 weight's codes written with the two nibbles of each byte swapped."""
    from flashnorm_onnx.quantize import int4 as q

    original = q.quantize_weight

    def swapped(weight, spec):
        packed, scales, zp = original(weight, spec)
        return ((packed << 4) | (packed >> 4)).astype(np.uint8), scales, zp

    monkeypatch.setattr(q, "quantize_weight", swapped)
