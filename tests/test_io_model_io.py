"""Bad input and faults, through the CLI in a subprocess.

Every case: a documented non-zero exit code, one line on stderr naming the problem, no
traceback, no output file (nor any staging leftovers), the input's files byte-identical.
"""

from __future__ import annotations

import hashlib
import re
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.graphs import save, set_location
from tests.helpers import BAD_INPUT, rms_model, plain_model, snapshot, cli, assert_clean_error, refused, BAD_OUTPUT


# -- models --------------------------------------------------------------------------------------


# -- helpers -------------------------------------------------------------------------------------


# -- bad input -----------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    refused(tmp_path, tmp_path / "nope.onnx", BAD_INPUT, "nope.onnx", "no such file")
    refused(tmp_path, tmp_path / "nope.onnx", BAD_INPUT, "no such file", command="inspect")


def test_empty_file(tmp_path):
    src = tmp_path / "empty.onnx"
    src.touch()
    refused(tmp_path, src, BAD_INPUT, "empty")


@pytest.mark.parametrize("content", [b"hello, this is not a model\n" * 10, bytes(range(256)) * 8,
                                     b"\x08\x07" + b"\xff" * 100])
def test_not_onnx(tmp_path, content):
    src = tmp_path / "junk.onnx"
    src.write_bytes(content)
    refused(tmp_path, src, BAD_INPUT, "not a valid ONNX model")


def test_folder_is_not_a_model(tmp_path):
    (tmp_path / "d").mkdir()
    refused(tmp_path, tmp_path / "d", BAD_INPUT, "no .onnx model")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated_file(tmp_path, fraction):
    full = rms_model().SerializeToString()
    src = tmp_path / "cut.onnx"
    src.write_bytes(full[: int(len(full) * fraction)])
    refused(tmp_path, src, BAD_INPUT, "cut.onnx")


def test_external_data_missing(tmp_path):
    src = save(rms_model(), tmp_path / "m" / "model.onnx", external=True)
    (src.parent / "model.onnx.data").unlink()
    refused(tmp_path, src, BAD_INPUT, "model.onnx.data", "missing")


def test_external_data_shorter_than_declared(tmp_path):
    src = save(rms_model(), tmp_path / "m" / "model.onnx", external=True)
    data = src.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-17])
    refused(tmp_path, src, BAD_INPUT, "shorter than declared")


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "sub/../../outside.data"])
def test_external_data_outside_the_folder(tmp_path, location):
    model = rms_model()
    src = save(model, tmp_path / "m" / "model.onnx", external=True)
    (tmp_path / "outside.data").write_bytes((src.parent / "model.onnx.data").read_bytes())
    set_location(src, location)
    refused(tmp_path, src, BAD_INPUT, "outside the model's folder")
    refused(tmp_path, src, BAD_INPUT, "outside the model's folder", command="inspect")


def test_symlinked_data_outside_the_folder(tmp_path):
    src = save(rms_model(), tmp_path / "m" / "model.onnx", external=True)
    data = src.parent / "model.onnx.data"
    data.rename(tmp_path / "elsewhere.data")
    data.symlink_to(tmp_path / "elsewhere.data")
    refused(tmp_path, src, BAD_INPUT, "outside the model's folder")


def test_over_protobuf_limit_without_external_data(tmp_path):
    src = tmp_path / "huge.onnx"
    with open(src, "wb") as f:
        f.truncate(2**31 + 4096)  # sparse: no disk used
    refused(tmp_path, src, BAD_INPUT, "2 GB protobuf limit", "external data")


# -- bad output ----------------------------------------------------------------------------------


def test_output_equal_to_input(tmp_path):
    src = save(rms_model(), tmp_path / "m" / "model.onnx")
    before = snapshot(tmp_path)
    err = assert_clean_error(cli("optimize", src, "-o", src), BAD_OUTPUT, "overwrite the input model", "--in-place")
    assert snapshot(tmp_path) == before
    # the same file by another spelling
    other = src.parent / "." / ".." / "m" / "model.onnx"
    assert_clean_error(cli("optimize", src, "-o", other), BAD_OUTPUT, "overwrite the input model")
    assert snapshot(tmp_path) == before
    assert err


def test_output_equal_to_input_data_file(tmp_path):
    src = save(rms_model(), tmp_path / "m" / "model.onnx", external=True)
    before = snapshot(tmp_path)
    data = src.parent / "model.onnx.data"
    assert_clean_error(cli("optimize", src, "-o", data), BAD_OUTPUT, "external data")
    assert snapshot(tmp_path) == before
    # an output whose own data file (NAME.data) would be the input's data file
    (src.parent / "other.onnx.data").write_bytes(data.read_bytes())
    set_location(src, "other.onnx.data")
    before = snapshot(tmp_path)
    assert_clean_error(cli("optimize", src, "-o", src.parent / "other.onnx"), BAD_OUTPUT, "external data")
    assert snapshot(tmp_path) == before


def test_in_place_writes_atomically(tmp_path):
    src = save(rms_model(), tmp_path / "m" / "model.onnx", external=True)
    old = onnx.load(str(src))
    proc = cli("optimize", src, "--in-place")
    assert proc.returncode == 0, proc.stderr
    assert "PASSED" in proc.stdout
    new = onnx.load(str(src))
    assert "already weightless" in cli("inspect", src).stdout
    assert old.SerializeToString() != new.SerializeToString()
    # the new data went under a fresh name (the old pair stayed loadable until the model was renamed),
    # and the replaced data file was removed after the commit
    names = sorted(p.name for p in src.parent.iterdir())
    assert len(names) == 2 and names[0] == "model.onnx", names
    assert re.fullmatch(r"model\.onnx\.[0-9a-f]{8}\.data", names[1]), names
    # -o with another path and --in-place together is refused
    before = snapshot(tmp_path)
    assert_clean_error(cli("optimize", src, "-o", tmp_path / "x.onnx", "--in-place"), BAD_OUTPUT, "--in-place")
    assert snapshot(tmp_path) == before


def test_output_folder_missing_is_created(tmp_path):
    src = save(rms_model(), tmp_path / "m" / "model.onnx", external=True)
    before = snapshot(src.parent)
    out = tmp_path / "a" / "b" / "c" / "out.onnx"
    proc = cli("optimize", src, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and (out.parent / "out.onnx.data").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.onnx", "out.onnx.data"]
    assert snapshot(src.parent) == before


def test_output_folder_is_a_file(tmp_path):
    src = save(rms_model(), tmp_path / "m" / "model.onnx")
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    assert_clean_error(cli("optimize", src, "-o", tmp_path / "afile" / "out.onnx"), BAD_OUTPUT, "not a folder")
    assert_clean_error(cli("optimize", src, "-o", tmp_path / "afile" / "deeper" / "out.onnx"), BAD_OUTPUT,
                       "not a folder")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("external", [False, True])
def test_disk_full_during_write(tmp_path, external):
    """RLIMIT_FSIZE makes the write fail with EFBIG mid-file (Python ignores SIGXFSZ)."""
    src = save(rms_model(k=256, n=512), tmp_path / "m" / "model.onnx", external=external)
    limit = 256 * 1024  # the output is ~1 MB; the input is only read

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = snapshot(tmp_path)
    err = assert_clean_error(cli("optimize", src, "-o", tmp_path / "out" / "o.onnx", preexec_fn=cap), BAD_OUTPUT,
                             "writing the output failed", "nothing was written")
    assert snapshot(tmp_path) == before, err  # no partial file, no staging folder, no new folder


# -- --debug, nothing to fold ----------------------------------------------------------------------


def test_debug_shows_the_traceback(tmp_path):
    src = tmp_path / "junk.onnx"
    src.write_bytes(b"garbage" * 10)
    proc = cli("--debug", "optimize", src)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "InputModelError" in proc.stderr


@pytest.mark.parametrize("builder", ["plain", "weightless"])
def test_nothing_to_fold(tmp_path, builder):
    model = plain_model() if builder == "plain" else rms_model(scale=np.ones(16))
    src = save(model, tmp_path / "m" / "model.onnx")
    out = tmp_path / "out" / "o.onnx"
    before, inputs = snapshot(tmp_path), snapshot(src.parent)
    proc = cli("optimize", src, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to fold" in proc.stdout
    assert "Traceback" not in proc.stderr
    if builder == "plain":
        assert "no normalization" in proc.stdout
    assert snapshot(tmp_path) == before
    forced = cli("optimize", src, "-o", out, "--force-write")
    assert forced.returncode == 0, forced.stderr
    assert out.is_file()
    assert snapshot(src.parent) == inputs


# -- corrupt but parseable files -------------------------------------------------------------------


def _corrupt(tmp_path: Path, edit) -> Path:
    proto = rms_model()
    edit(proto)
    src = tmp_path / "m" / "model.onnx"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(proto.SerializeToString())
    return src


def test_tensor_bytes_do_not_match_its_shape(tmp_path):
    def edit(p):
        g = next(t for t in p.graph.initializer if t.name == "g")
        g.raw_data = g.raw_data[:-4]
    refused(tmp_path, _corrupt(tmp_path, edit), BAD_INPUT, "tensor 'g'", "needs 64")


def test_external_length_does_not_match_the_shape(tmp_path):
    src = save(rms_model(), tmp_path / "m" / "model.onnx", external=True)
    proto = onnx.load(str(src), load_external_data=False)
    for e in proto.graph.initializer[-1].external_data:
        if e.key == "length":
            e.value = "8"
    src.write_bytes(proto.SerializeToString())
    refused(tmp_path, src, BAD_INPUT, "declares 8 bytes")


def test_node_with_too_few_inputs(tmp_path):
    def edit(p):
        node = next(n for n in p.graph.node if n.op_type == "Mul")
        del node.input[1]
    refused(tmp_path, _corrupt(tmp_path, edit), BAD_INPUT, "Mul node", "1 input")


def test_unknown_or_mistyped_attribute(tmp_path):
    def edit(p):
        next(n for n in p.graph.node if n.op_type == "ReduceMean").attribute[0].name = "keepdimz"
    refused(tmp_path, _corrupt(tmp_path, edit), BAD_INPUT, "unknown attribute 'keepdimz'")


def test_name_not_utf8(tmp_path):
    full = rms_model().SerializeToString()
    src = tmp_path / "m" / "model.onnx"
    src.parent.mkdir()
    src.write_bytes(full.replace(b"mse", b"m\xffe"))
    refused(tmp_path, src, BAD_INPUT, "not valid UTF-8")


def test_random_corruption_is_never_an_internal_error(tmp_path, capsys):
    """Flipped bytes: a clean error (3, or 6 when ORT cannot run the input), or a verified fold."""
    import random

    from flashnorm_onnx import cli as cli_module

    full = rms_model().SerializeToString()
    rnd = random.Random(0)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    codes = []
    for _ in range(150):
        data = bytearray(full)
        for _ in range(rnd.randint(1, 3)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        src.write_bytes(bytes(data))
        code = cli_module.main(["optimize", str(src), "-o", str(out), "-q"])
        err = capsys.readouterr().err.strip()
        assert code in (0, 3, 6), err
        assert "Traceback" not in err and len(err.splitlines()) <= 1, err
        if code != 0:
            assert not out.exists()
        out.unlink(missing_ok=True)
        codes.append(code)
    assert codes.count(3) > 10


def test_report_path_refused_before_any_work(tmp_path):
    src = save(rms_model(), tmp_path / "m" / "model.onnx")
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    out = tmp_path / "out" / "o.onnx"
    assert_clean_error(cli("optimize", src, "-o", out, "--report", tmp_path / "afile" / "r.json"), BAD_OUTPUT,
                       "not a folder")
    assert_clean_error(cli("optimize", src, "-o", out, "--report", src), BAD_OUTPUT, "overwrite the input")
    assert_clean_error(cli("inspect", src, "--report", tmp_path / "afile" / "r.json"), BAD_OUTPUT, "report")
    assert snapshot(tmp_path) == before


def test_disk_full_during_in_place_write_keeps_the_input(tmp_path):
    src = save(rms_model(k=256, n=512), tmp_path / "m" / "model.onnx", external=True)
    limit = 256 * 1024

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = snapshot(tmp_path)
    assert_clean_error(cli("optimize", src, "--in-place", preexec_fn=cap), BAD_OUTPUT, "writing the output failed")
    assert snapshot(tmp_path) == before
