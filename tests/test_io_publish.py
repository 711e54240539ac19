"""Publishing: one commit point, whatever happens, and no file of a run targets another.

The invariant (README, "Reliability"): at every instant the destination (and the input, with
``--in-place``) loads as exactly the old model with its old data or exactly the new one with its
new data. Checked by killing a subprocess at every step of a commit, by making ``os.replace``
fail, and by concurrent runs on one destination.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from flashnorm_onnx.pipeline import api
from flashnorm_onnx import cli as cli_module
from flashnorm_onnx.io import model_io
from flashnorm_onnx.io import publish
from tests.graphs import save, set_location
from tests.helpers import BAD_OUTPUT, assert_clean_error, cli, rms_model, snapshot

STEPS = ["locked", "cleaned", "reported", "synced", "data published", "model published", "old data removed"]

CRASHER = (
    "import os, sys\n"
    "from flashnorm_onnx.io import publish\n"
    "target = sys.argv[1]\n"
    "def hook(name):\n"
    "    if name == target:\n"
    "        os._exit(137)\n"
    "publish._step = hook\n"
    "from flashnorm_onnx.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)

X = np.random.default_rng(7).standard_normal((2, 3, 16)).astype(np.float32)


def outputs(path: Path) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": X})


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(a, b))


def crash_at(step: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CRASHER, step, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


def run(*args) -> subprocess.CompletedProcess:
    """The CLI in this process (the runs that are not killed: faster than a subprocess)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_module.main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture()
def two_models(tmp_path):
    """Two inputs computing different functions; the first is already published at out/model.onnx."""
    a = save(rms_model(seed=0), tmp_path / "a" / "model.onnx", external=True)
    b = save(rms_model(seed=1), tmp_path / "b" / "model.onnx", external=True)
    out = tmp_path / "out" / "model.onnx"
    assert run("optimize", a, "-o", out).returncode == 0
    old, new = outputs(a), outputs(b)
    assert not same(old, new)
    return a, b, out, old, new


@pytest.mark.parametrize("step", STEPS)
def test_killed_at_every_step_leaves_old_or_new(two_models, step):
    a, b, out, old, new = two_models
    before_inputs = snapshot(b.parent)
    proc = crash_at(step, "optimize", b, "-o", out, "--report", out.parent.parent / "r.json")
    assert proc.returncode == 137, proc.stderr
    got = outputs(out)  # loads: never a model without its data
    published = STEPS.index(step) >= STEPS.index("model published")
    assert same(got, new if published else old), step
    assert snapshot(b.parent) == before_inputs
    # the next run on the destination cleans what the killed one left, and publishes one pair
    proc = run("optimize", b, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert same(outputs(out), new)
    left = files(out.parent)
    assert len(left) == 2 and "model.onnx" in left, left  # the model and its one data file: no leftovers
    assert publish.data_name_pattern("model.onnx").fullmatch(next(n for n in left if n != "model.onnx"))


@pytest.mark.parametrize("step", STEPS)
def test_in_place_killed_at_every_step_keeps_a_working_input(tmp_path, step):
    src = save(rms_model(seed=3), tmp_path / "m" / "model.onnx", external=True)
    expected = outputs(src)
    proc = crash_at(step, "optimize", src, "--in-place")
    assert proc.returncode == 137, proc.stderr
    assert same(outputs(src), expected)  # old pair or new pair: both compute the input's function
    proc = run("optimize", src, "--in-place")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert same(outputs(src), expected)
    assert len(files(src.parent)) == 2, files(src.parent)


def test_replace_failing_publishes_nothing(two_models, monkeypatch, capsys):
    a, b, out, old, new = two_models
    before = snapshot(out.parent)
    real = os.replace

    def failing(src, dst, *args, **kwargs):
        if Path(dst) == out:
            raise PermissionError(1, "Operation not permitted")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    code = cli_module.main(["optimize", str(b), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == BAD_OUTPUT and "could not move the output into place" in err
    assert snapshot(out.parent) == before  # no new data file left beside the old model
    assert same(outputs(out), old)


def test_concurrent_runs_end_with_one_complete_pair(tmp_path):
    srcs = [save(rms_model(seed=s), tmp_path / f"in{s}" / "model.onnx", external=True) for s in range(3)]
    out = tmp_path / "out" / "model.onnx"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "flashnorm_onnx.cli", "optimize", str(s), "-o", str(out), "-q"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for s in srcs]
    for p in procs:
        p.wait(timeout=120)
        assert p.returncode == 0, p.stderr.read()
    got = outputs(out)
    assert sum(same(got, outputs(s)) for s in srcs) == 1
    assert len(files(out.parent)) == 2, files(out.parent)


def test_second_run_gets_a_fresh_data_name_and_removes_the_old(two_models):
    a, b, out, old, new = two_models
    first = [n for n in files(out.parent) if n != "model.onnx"]
    assert first == ["model.onnx.data"]
    assert run("optimize", b, "-o", out).returncode == 0
    second = [n for n in files(out.parent) if n != "model.onnx"]
    assert len(second) == 1 and second != first
    assert publish.external_locations(out) == set(second)


# -- nothing a run writes targets another file of the same run -----------------------------------------


def test_report_naming_the_output_or_its_data_is_refused(tmp_path):
    src = save(rms_model(), tmp_path / "m" / "model.onnx", external=True)
    out = tmp_path / "out" / "o.onnx"
    before = snapshot(tmp_path)
    for report in (out, out.parent / "o.onnx.data", out.parent / "o.onnx.0123abcd.data", src.parent / "model.onnx.data"):
        assert_clean_error(cli("optimize", src, "-o", out, "--report", report), BAD_OUTPUT, "report would overwrite")
    assert snapshot(tmp_path) == before


def test_report_failure_publishes_nothing(tmp_path, monkeypatch, capsys):
    src = save(rms_model(), tmp_path / "m" / "model.onnx", external=True)
    out = tmp_path / "out" / "o.onnx"

    def fail(report, path):
        raise model_io.OutputPathError(f"{path}: cannot write the report (disk full)")

    monkeypatch.setattr(model_io, "write_report", fail)
    code = cli_module.main(["optimize", str(src), "-o", str(out), "--report", str(tmp_path / "r.json")])
    assert code == BAD_OUTPUT, capsys.readouterr()
    assert not out.parent.exists() or files(out.parent) == []


@pytest.mark.parametrize("kind", ["fifo", "chardev", "broken_link"])
def test_output_or_report_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    src = save(rms_model(), tmp_path / "m" / "model.onnx")
    special = tmp_path / "special.onnx"
    if kind == "fifo":
        os.mkfifo(special)
    elif kind == "chardev":
        special = Path("/dev/null")
    else:
        special.symlink_to(tmp_path / "nowhere")
    before = snapshot(tmp_path)
    assert_clean_error(cli("optimize", src, "-o", special), BAD_OUTPUT, "not a regular file" if kind != "broken_link"
                       else "broken link")
    assert_clean_error(cli("optimize", src, "-o", tmp_path / "o.onnx", "--report", special), BAD_OUTPUT)
    assert snapshot(tmp_path) == before
    if kind == "chardev":
        assert Path("/dev/null").is_char_device()


def test_leftover_staging_of_a_live_run_is_kept(tmp_path):
    """Cleanup removes a dead run's staging folder but never a live one's (it holds a lock)."""
    out = tmp_path / "out" / "model.onnx"
    staged = publish.stage(out, external=False)
    old = out.parent / ".model.onnx.deadbeef.tmp"
    old.mkdir()
    os.utime(staged.staging, (0, 0))
    os.utime(old, (0, 0))
    publish.clean_leftovers(out.parent, out.name)
    assert staged.staging.exists() and not old.exists()
    staged.abandon()
    assert not out.parent.exists()


def test_api_report_before_publish(tmp_path):
    """The report names the published files and exists once the output does."""
    src = save(rms_model(), tmp_path / "m" / "model.onnx", external=True)
    out = tmp_path / "o.onnx"
    report = api.optimize(src, out, report_path=tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert report.verification.passed and saved["output"] == str(out)
    wrote = next(n for n in saved["notes"] if n.startswith("wrote "))
    assert wrote == f"wrote {out.parent / 'o.onnx.data'}, {out}"  # the data file the model names, then the model
    assert publish.external_locations(out) == {"o.onnx.data"}
    assert same(outputs(out), outputs(src))


def test_report_naming_the_replaced_models_data_is_refused(two_models):
    """Until the commit the destination loads the old model: its data file must not become the report."""
    a, b, out, old, new = two_models
    data = out.parent / next(iter(publish.external_locations(out)))
    renamed = out.parent / "weights.bin"  # a data name this tool would not give
    os.rename(data, renamed)
    set_location(out, "weights.bin")
    before = snapshot(out.parent)
    assert_clean_error(cli("optimize", b, "-o", out, "--report", renamed), BAD_OUTPUT, "external data")
    assert snapshot(out.parent) == before
    assert same(outputs(out), old)
