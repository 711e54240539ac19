"""Publishing at the edges: file modes and owners, names near NAME_MAX, a run stopped by SIGTERM.

- ``--in-place`` keeps the input's mode bits (and owner/group where the process may): a private
  (0600) model stays private. A new ``-o`` output follows the umask.
- An output name of up to 255 bytes is written: the hidden staging folder and the data file's
  name stay within NAME_MAX.
- SIGTERM (``timeout``, ``docker stop``) removes the run's staging folder, publishes nothing and
  exits 143 with one line.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from flashnorm_onnx import cli as cli_module
from flashnorm_onnx.io import publish
from tests.graphs import save
from tests.helpers import rms_model, snapshot

X = np.random.default_rng(11).standard_normal((2, 3, 16)).astype(np.float32)


def run(*args) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_module.main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def outputs(path: Path) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})


def data_files(model: Path) -> list[Path]:
    """The external data files the model file references."""
    return [model.parent / loc for loc in sorted(publish.external_locations(model))]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@contextlib.contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


# -- 1. modes and owners --------------------------------------------------------------------------


def test_in_place_keeps_a_private_models_mode(tmp_path):
    src = save(rms_model(seed=2), tmp_path / "m" / "model.onnx", external=True)
    (data,) = data_files(src)
    expected = outputs(src)
    os.chmod(src, 0o600)
    os.chmod(data, 0o600)
    with umask(0o022):
        proc = run("optimize", src, "--in-place")
    assert proc.returncode == 0, proc.stderr
    published = data_files(src)
    assert published and published != [data]  # a new data file was published beside the new model
    assert oct(mode(src)) == oct(0o600)
    for d in published:
        assert oct(mode(d)) == oct(0o600), d
    assert np.allclose(outputs(src)[0], expected[0], rtol=1e-5, atol=1e-6)


def test_in_place_keeps_other_mode_bits_too(tmp_path):
    """Not only 0600: the model's and its data's own bits (0640 / 0604) come back as they were."""
    src = save(rms_model(seed=4), tmp_path / "m" / "model.onnx", external=True)
    (data,) = data_files(src)
    os.chmod(src, 0o640)
    os.chmod(data, 0o604)
    with umask(0o077):
        proc = run("optimize", src, "--in-place")
    assert proc.returncode == 0, proc.stderr
    assert oct(mode(src)) == oct(0o640)
    for d in data_files(src):
        assert oct(mode(d)) == oct(0o604), d


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="changing owners needs root")
def test_in_place_keeps_owner_and_group(tmp_path):
    src = save(rms_model(seed=5), tmp_path / "m" / "model.onnx", external=True)
    (data,) = data_files(src)
    for p in (src, data):
        os.chown(p, 12345, 23456)
    proc = run("optimize", src, "--in-place")
    assert proc.returncode == 0, proc.stderr
    for p in (src, *data_files(src)):
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (12345, 23456), p


@pytest.mark.parametrize("mask, expected", [(0o077, 0o600), (0o022, 0o644)])
def test_new_output_follows_the_umask(tmp_path, mask, expected):
    src = save(rms_model(seed=6), tmp_path / "m" / "model.onnx", external=True)
    for p in (src, *data_files(src)):
        os.chmod(p, 0o600)  # the input's bits do not carry over to a new output
    out = tmp_path / "out" / "model.onnx"
    with umask(mask):
        proc = run("optimize", src, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert oct(mode(out)) == oct(expected)
    for d in data_files(out):
        assert oct(mode(d)) == oct(expected), d


def test_replacing_an_existing_output_keeps_its_mode(tmp_path):
    """An output file that exists is replaced like --in-place replaces the input: its bits stay."""
    a = save(rms_model(seed=7), tmp_path / "a" / "model.onnx", external=True)
    b = save(rms_model(seed=8), tmp_path / "b" / "model.onnx", external=True)
    out = tmp_path / "out" / "model.onnx"
    with umask(0o022):
        assert run("optimize", a, "-o", out).returncode == 0
        for p in (out, *data_files(out)):
            os.chmod(p, 0o600)
        proc = run("optimize", b, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert oct(mode(out)) == oct(0o600)
    for d in data_files(out):
        assert oct(mode(d)) == oct(0o600), d


# -- 2. names near NAME_MAX -----------------------------------------------------------------------


LONG = "a" * 240 + ".onnx"  # 245 bytes: a legal file name


def test_output_name_of_245_bytes_is_written(tmp_path):
    src = save(rms_model(seed=9), tmp_path / "m" / "model.onnx", external=True)
    out = tmp_path / "out" / LONG
    proc = run("optimize", src, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert data_files(out) and all(d.is_file() for d in data_files(out))
    expected = outputs(src)
    assert np.allclose(outputs(out)[0], expected[0], rtol=1e-5, atol=1e-6)
    # again: NAME.data is taken now, so the new data file needs another name, still within NAME_MAX
    proc = run("optimize", src, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert np.allclose(outputs(out)[0], expected[0], rtol=1e-5, atol=1e-6)
    left = sorted(p.name for p in out.parent.iterdir())
    assert len(left) == 2 and LONG in left, left  # the model and its one data file, no leftovers
    assert all(len(n.encode()) <= 255 for n in left)
    assert publish.data_name_pattern(LONG).fullmatch(next(n for n in left if n != LONG))


def test_in_place_with_a_245_byte_name(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    src = folder / LONG
    onnx.save_model(rms_model(seed=10), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.data", size_threshold=64)
    expected = outputs(src)
    for _ in range(2):
        proc = run("optimize", src, "--in-place", "--force-write")
        assert proc.returncode == 0, proc.stderr
        assert np.allclose(outputs(src)[0], expected[0], rtol=1e-5, atol=1e-6)
    assert hidden(folder) == []


@pytest.mark.parametrize("length", [250, 251, 255])
def test_output_names_up_to_255_bytes(tmp_path, length):
    """NAME.data itself goes past 255 bytes from a 251-byte NAME: the data file gets a shorter name."""
    src = save(rms_model(seed=12), tmp_path / "m" / "model.onnx", external=True)
    name = "b" * (length - 5) + ".onnx"
    out = tmp_path / "out" / name
    for _ in range(2):
        proc = run("optimize", src, "-o", out)
        assert proc.returncode == 0, proc.stderr
        assert np.allclose(outputs(out)[0], outputs(src)[0], rtol=1e-5, atol=1e-6)
    left = sorted(p.name for p in out.parent.iterdir())
    assert len(left) == 2 and name in left, left
    assert publish.data_name_pattern(name).fullmatch(next(n for n in left if n != name))


def test_staging_folder_name_is_short_and_matched(tmp_path):
    out = tmp_path / ("c" * 250 + ".onnx")
    staged = publish.stage(out, external=True)
    try:
        assert len(staged.staging.name.encode()) <= 64
        assert publish.staging_pattern(out.name).fullmatch(staged.staging.name)
        assert not publish.staging_pattern("other.onnx").fullmatch(staged.staging.name)
    finally:
        staged.abandon()
    # the long form older versions wrote is still recognised (and cleaned) as a leftover
    assert publish.staging_pattern("model.onnx").fullmatch(".model.onnx.deadbeef.tmp")


def test_dead_runs_short_staging_folder_is_cleaned(tmp_path):
    out = tmp_path / "model.onnx"
    staged = publish.stage(out, external=True)
    leftover = staged.staging
    staged.lock.release()  # its run died: nobody holds the lock
    staged.lock = None
    assert leftover.exists()
    publish.clean(out)
    assert not leftover.exists()


# -- 3. SIGTERM -----------------------------------------------------------------------------------


SLOW_VERIFY = (
    "import sys, time\n"
    "from flashnorm_onnx.pipeline import stages\n"
    "original = stages.verify\n"
    "def verify(*a, **k):\n"
    "    time.sleep(60)\n"
    "    return original(*a, **k)\n"
    "stages.verify = verify\n"
    "from flashnorm_onnx.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _staged_model(out: Path) -> bool:
    """The staged model file is written (the data before it): the run is verifying."""
    return any((out.parent / name / out.name).is_file() for name in hidden(out.parent))


def _stop_when_staged(cmd: list[str], out: Path, limit: float = 60.0) -> subprocess.CompletedProcess:
    """Start cmd, wait until it has staged out (written, not yet published), SIGTERM it, and wait
    for it to exit."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        end = time.monotonic() + limit
        while time.monotonic() < end and proc.poll() is None and not _staged_model(out):
            time.sleep(0.005)
        assert proc.poll() is None, ("the run ended before it was stopped", proc.communicate())
        assert _staged_model(out), "nothing was staged"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _assert_stopped_cleanly(proc: subprocess.CompletedProcess, out: Path, before: dict, src_folder: Path):
    assert proc.returncode == 143, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "flashnorm-onnx: stopped by SIGTERM; nothing written", proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert hidden(out.parent) == []  # the staging folder is gone
    assert not out.exists()
    assert list(out.parent.iterdir()) == []
    assert snapshot(src_folder) == before


def test_sigterm_while_verifying_removes_the_staging_folder(tmp_path):
    src = save(rms_model(seed=13), tmp_path / "m" / "model.onnx", external=True)
    before = snapshot(src.parent)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    proc = _stop_when_staged([sys.executable, "-c", SLOW_VERIFY, "optimize", str(src), "-o", str(out)], out)
    _assert_stopped_cleanly(proc, out, before, src.parent)


def test_sigterm_on_a_real_run_removes_the_staging_folder(tmp_path):
    """No patching: a model large enough that verifying it takes seconds, the installed entry point."""
    src = save(rms_model(k=1024, n=1024, seed=14), tmp_path / "m" / "model.onnx", external=True)
    before = snapshot(src.parent)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "flashnorm_onnx", "optimize", str(src), "-o", str(out),
           "--dim", "batch=8", "--dim", "seq=2048"]
    proc = _stop_when_staged(cmd, out)
    _assert_stopped_cleanly(proc, out, before, src.parent)


def test_sigterm_handler_is_restored_after_main(tmp_path):
    """main() installs its SIGTERM handler for its own run only."""
    previous = signal.getsignal(signal.SIGTERM)
    src = save(rms_model(seed=15), tmp_path / "m" / "model.onnx", external=True)
    assert run("optimize", src, "-o", tmp_path / "out" / "model.onnx").returncode == 0
    assert signal.getsignal(signal.SIGTERM) is previous


BEFORE_VISIBLE = ["locked", "cleaned", "reported", "synced"]
WHILE_VISIBLE = ["data published", "model published"]


@pytest.fixture()
def published_once(tmp_path):
    """out/model.onnx published from a; b folds to a different model."""
    a = save(rms_model(seed=16), tmp_path / "a" / "model.onnx", external=True)
    b = save(rms_model(seed=17), tmp_path / "b" / "model.onnx", external=True)
    out = tmp_path / "out" / "model.onnx"
    assert run("optimize", a, "-o", out).returncode == 0
    return a, b, out


def _sigterm_at(monkeypatch, step: str, around=None) -> None:
    """SIGTERM this process when the commit reaches ``step`` (the CLI's handler is installed)."""
    def hook(name):
        if name == step:
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
                pytest.fail("main() installed no SIGTERM handler (the signal would kill pytest)")
            (around or (lambda send: send()))(lambda: os.kill(os.getpid(), signal.SIGTERM))

    monkeypatch.setattr(publish, "_step", hook)


@pytest.mark.parametrize("step", BEFORE_VISIBLE)
def test_sigterm_before_the_commit_point_publishes_nothing(published_once, monkeypatch, step):
    a, b, out = published_once
    before = snapshot(out.parent)
    _sigterm_at(monkeypatch, step)
    proc = run("optimize", b, "-o", out)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip() == "flashnorm-onnx: stopped by SIGTERM; nothing written"
    assert snapshot(out.parent) == before  # the old pair, untouched; no staging folder left
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize("step", WHILE_VISIBLE)
def test_sigterm_while_files_become_visible_finishes_the_commit(published_once, monkeypatch, step):
    """From the data file's link on, the stop waits for the commit's end: the new pair is
    published whole and the old data removed, then the run stops (exit 143, saying so)."""
    a, b, out = published_once
    _sigterm_at(monkeypatch, step)
    proc = run("optimize", b, "-o", out)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip() == "flashnorm-onnx: stopped by SIGTERM after 1 model file(s) had been published"
    left = sorted(p.name for p in out.parent.iterdir())
    assert len(left) == 2 and "model.onnx" in left, left  # new model, its data; the old data removed
    assert np.allclose(outputs(out)[0], outputs(b)[0], rtol=1e-5, atol=1e-6)


def test_a_lost_stop_still_publishes_nothing(published_once, monkeypatch):
    """The handler's exception dropped on its way (by a callback that swallows it): the commit
    still refuses to publish."""
    a, b, out = published_once
    before = snapshot(out.parent)

    def swallowed(send):
        try:
            send()
        except BaseException:  # noqa: BLE001 - what a careless callback does
            pass

    _sigterm_at(monkeypatch, "locked", swallowed)
    proc = run("optimize", b, "-o", out)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip() == "flashnorm-onnx: stopped by SIGTERM; nothing written"
    assert snapshot(out.parent) == before


def test_a_stop_dropped_in_a_finalizer_is_raised_again(published_once, monkeypatch):
    """The handler ran inside a ``__del__`` (Python drops exceptions there): the stop is raised
    again in the run's own code, promptly, and no "Exception ignored" noise is printed."""
    a, b, out = published_once
    before = snapshot(out.parent)
    waited = []

    class Finalized:
        def __init__(self, send):
            self.send = send

        def __del__(self):
            self.send()

    def in_finalizer(send):
        obj = Finalized(send)
        del obj  # SIGTERM handled inside __del__: its Stopped is dropped
        t = time.monotonic()
        try:
            while time.monotonic() - t < 5:  # the run's own code: the stop is raised again here
                pass
        finally:
            waited.append(time.monotonic() - t)

    _sigterm_at(monkeypatch, "locked", in_finalizer)
    proc = run("optimize", b, "-o", out)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip() == "flashnorm-onnx: stopped by SIGTERM; nothing written"
    assert waited and waited[0] < 2.0, waited
    assert snapshot(out.parent) == before
