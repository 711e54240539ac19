"""Folder mode: ``optimize IN_DIR -o OUT_DIR`` folds and verifies every model of the folder and
copies what a runtime needs beside them (links never followed out of the folder).

Hand-built models, fast; the CLI runs in-process (``cli.main``) except for one subprocess run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import flashnorm_onnx
from flashnorm_onnx import cli as cli_module
from flashnorm_onnx.pipeline.report import FolderReport
from flashnorm_onnx.passes import fold_math
from tests import graphs
from tests.helpers import BAD_INPUT, BAD_OUTPUT, assert_clean_error, cli, plain_model, rms_model, snapshot

VERIFICATION_FAILED = 5


def save_optimum(model: onnx.ModelProto, path: Path) -> Path:
    """External data named the way optimum names it: ``NAME.onnx_data``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + "_data", size_threshold=64)
    return path


def main(capsys, *args) -> subprocess.CompletedProcess:
    """The CLI in this process (fast), as a CompletedProcess for assert_clean_error."""
    code = cli_module.main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def same_function(src: Path, out: Path, seed: int = 3) -> None:
    """ONNX Runtime gives the same outputs for the input model and the output model."""
    feeds = graphs.feeds_for(onnx.load(str(src), load_external_data=False), seed=seed)
    for a, b in zip(graphs.run(src, feeds), graphs.run(out, feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def no_leftovers(folder: Path) -> None:
    hidden = [p for p in folder.rglob(".*")]
    assert not hidden, hidden


@pytest.fixture
def seq2seq(tmp_path) -> Path:
    """An optimum seq2seq-like folder: three models side by side, config and tokenizer files."""
    src = tmp_path / "t5"
    save_optimum(rms_model(seed=1), src / "encoder_model.onnx")
    save_optimum(graphs.build("dynamo", consumers=("matmul", "matmul_t"), seed=2), src / "decoder_model.onnx")
    graphs.save(graphs.build("sln", seed=3), src / "decoder_with_past_model.onnx")  # inline tensors
    (src / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    (src / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "Unigram"}}))
    (src / "generation_config.json").write_text("{}")
    (src / "assets").mkdir()
    (src / "assets" / "spiece.model").write_bytes(bytes(range(256)))
    return src


# -- every model, verified each ---------------------------------------------------------------------


def test_seq2seq_folder_every_model_folded_and_verified(seq2seq, tmp_path):
    before = snapshot(seq2seq)
    out = tmp_path / "out"
    report = flashnorm_onnx.optimize(seq2seq, out)
    assert isinstance(report, FolderReport)
    models = ["decoder_model.onnx", "decoder_with_past_model.onnx", "encoder_model.onnx"]
    assert list(report.models) == models
    assert report.folded == 3 and report.skipped == 0 and len(report.decisions) == 3
    assert report.verification.passed
    for rel, r in report.models.items():
        assert r.verification.method == "onnxruntime+plan" and r.verification.passed, r.text()
        assert r.output == str(out / rel)
        same_function(seq2seq / rel, out / rel)
        assert "already weightless" in flashnorm_onnx.inspect(out / rel).text()
    # each written model has its own data file (the tool's name), and none of the input's
    assert (out / "encoder_model.onnx.data").is_file() and (out / "decoder_model.onnx.data").is_file()
    assert not (out / "encoder_model.onnx_data").exists() and not (out / "decoder_with_past_model.onnx.data").exists()
    for name in ("config.json", "tokenizer.json", "generation_config.json", "assets/spiece.model"):
        assert (out / name).read_bytes() == (seq2seq / name).read_bytes(), name
    assert snapshot(seq2seq) == before  # the input folder is byte-identical
    no_leftovers(out)
    text = report.text()
    for rel in models:
        assert f"== {rel}" in text
    assert text.splitlines()[-1].startswith("3 models: 3 norms: 3 folded") and "PASSED" in text.splitlines()[-1]
    summary = report.to_json()
    assert summary["summary"]["models"] == 3 and set(summary["models"]) == set(models)


def test_cli_prints_every_model_and_writes_the_report(seq2seq, tmp_path):
    out, report_path = tmp_path / "out", tmp_path / "out" / "flashnorm_report.json"
    proc = cli("optimize", seq2seq, "-o", out, "--report", report_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("verification (onnxruntime+plan): PASSED") == 3
    assert "== encoder_model.onnx" in proc.stdout
    data = json.loads(report_path.read_text())
    assert data["summary"]["folded"] == 3 and data["verification"]["passed"] is True
    assert all(m["output"] for m in data["models"].values())  # written before the last model was visible
    assert all(any(n.startswith("wrote ") for n in m["notes"]) for m in data["models"].values())


def test_model_with_nothing_to_fold_is_still_written(tmp_path):
    src = tmp_path / "genai"
    graphs.save(rms_model(), src / "model.onnx", external=True)
    graphs.save(plain_model(), src / "vision.onnx")
    graphs.save(rms_model(scale=np.ones(16)), src / "embedding.onnx")  # already weightless
    (src / "genai_config.json").write_text("{}")
    out = tmp_path / "out"
    report = flashnorm_onnx.optimize(src, out)
    assert report.folded == 1 and report.already == 1
    for rel in ("vision.onnx", "embedding.onnx", "model.onnx"):
        assert (out / rel).is_file(), rel
        assert onnx.load(str(out / rel)).graph.node  # loads, with its data
        same_function(src / rel, out / rel)
    assert "nothing to fold" in report.models["vision.onnx"].text()
    assert report.models["vision.onnx"].verification.method == "skipped"
    assert (out / "genai_config.json").is_file()


def test_single_model_folder_reads_like_a_fold_report(tmp_path):
    src = graphs.save(graphs.build("dynamo", consumers=("matmul", "tied")), tmp_path / "m" / "model.onnx",
                      external=True)
    (src.parent / "tokenizer.json").write_text("{}")
    report = flashnorm_onnx.optimize(src.parent, tmp_path / "out")
    assert (report.folded, report.skipped) == (1, 0)
    assert [c.action for c in report.decisions[0].consumers][-1] == "untied copy"
    assert report.bytes_added == report.models["model.onnx"].bytes_added > 0
    assert report.verification is report.models["model.onnx"].verification and report.verification.passed
    assert "folded into" in report.text() and (tmp_path / "out" / "tokenizer.json").is_file()


def test_models_in_subfolders_keep_their_place(tmp_path):
    src = tmp_path / "hf"
    graphs.save(rms_model(), src / "onnx" / "model.onnx", external=True)
    graphs.save(rms_model(seed=4), src / "onnx" / "model_fp16.onnx")
    (src / "config.json").write_text("{}")
    out = tmp_path / "out"
    report = flashnorm_onnx.optimize(src, out)
    assert list(report.models) == ["onnx/model.onnx", "onnx/model_fp16.onnx"]
    same_function(src / "onnx" / "model.onnx", out / "onnx" / "model.onnx")
    assert (out / "onnx" / "model.onnx.data").is_file() and (out / "config.json").is_file()


def test_second_run_into_the_same_output_folder(seq2seq, tmp_path):
    out = tmp_path / "out"
    flashnorm_onnx.optimize(seq2seq, out)
    names = lambda: sorted(re.sub(r"\.[0-9a-f]{8}\.data$", ".data", p.name) for p in out.iterdir())  # noqa: E731
    first = names()
    report = flashnorm_onnx.optimize(seq2seq, out)
    assert report.folded == 3
    # replaced; the new data got a fresh name (NAME.<8 hex>.data) and the old one was removed
    assert names() == first
    same_function(seq2seq / "encoder_model.onnx", out / "encoder_model.onnx")


# -- companions: links, special files, stale data ------------------------------------------------------


def test_links_are_never_followed_out_of_the_folder(tmp_path):
    src = tmp_path / "m"
    graphs.save(rms_model(), src / "model.onnx", external=True)
    outside = tmp_path / "secret_tokenizer.json"
    outside.write_text("outside")
    (src / "tokenizer.json").symlink_to(outside)
    (src / "tokenizer_config.json").write_text("{}")
    (src / "special_tokens_map.json").symlink_to("tokenizer_config.json")  # relative, inside
    (src / "abs_config.json").symlink_to(src / "tokenizer_config.json")  # absolute, inside
    (src / "sub").mkdir()
    (src / "sub" / "vocab.txt").write_text("a b c")
    (src / "sub" / "up.json").symlink_to("../tokenizer_config.json")
    (src / "linked_sub").symlink_to("sub", target_is_directory=True)
    (src / "loop").symlink_to(".", target_is_directory=True)
    (src / "outside_dir").symlink_to(tmp_path, target_is_directory=True)
    (src / "broken").symlink_to("nowhere")
    os.mkfifo(src / "pipe")
    (src / ".gitattributes").write_text("*.onnx filter=lfs")
    out = tmp_path / "out"
    start = time.monotonic()
    report = flashnorm_onnx.optimize(src, out)
    assert time.monotonic() - start < 60  # the link to "." is not walked into
    notes = "\n".join(report.notes)
    assert "not copied: tokenizer.json is a link to outside the folder" in notes
    assert "not copied: outside_dir is a link to outside the folder" in notes
    assert "not copied: pipe is a FIFO" in notes and "not copied: broken is a broken link" in notes
    assert not os.path.lexists(out / "tokenizer.json") and not os.path.lexists(out / "outside_dir")
    assert not os.path.lexists(out / "pipe") and not os.path.lexists(out / ".gitattributes")
    # links inside the folder are recreated as links, resolving inside the output folder
    assert os.readlink(out / "special_tokens_map.json") == "tokenizer_config.json"
    assert os.readlink(out / "abs_config.json") == "tokenizer_config.json"  # made relative
    assert os.readlink(out / "sub" / "up.json") == "../tokenizer_config.json"
    assert os.readlink(out / "linked_sub") == "sub" and os.readlink(out / "loop") == "."
    for link in ("special_tokens_map.json", "abs_config.json", "sub/up.json"):
        assert (out / link).resolve() == (out / "tokenizer_config.json").resolve()
    assert (out / "sub" / "vocab.txt").read_text() == "a b c"
    assert outside.read_text() == "outside"
    same_function(src / "model.onnx", out / "model.onnx")


def test_stale_data_file_is_not_copied_over_the_written_data(tmp_path):
    """optimum's model.onnx_data beside a stale model.onnx.data (the name the output's data gets)."""
    src = tmp_path / "m"
    save_optimum(rms_model(k=32, n=16), src / "model.onnx")
    (src / "model.onnx.data").write_bytes(os.urandom(4096))  # stale: no model references it
    (src / "config.json").write_text("{}")
    before = snapshot(src)
    out = tmp_path / "out"
    report = flashnorm_onnx.optimize(src, out)
    assert "not copied: model.onnx.data is no model's external data (stale?)" in report.notes
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    assert (out / "model.onnx.data").read_bytes() != (src / "model.onnx.data").read_bytes()
    same_function(src / "model.onnx", out / "model.onnx")
    assert not (out / "model.onnx_data").exists()
    assert snapshot(src) == before


# -- failures publish nothing ------------------------------------------------------------------------


def test_verification_failure_in_one_model_publishes_nothing(tmp_path, monkeypatch, capsys):
    src = tmp_path / "pair"
    save_optimum(rms_model(k=16, seed=1), src / "decoder_model.onnx")  # folded first, verifies
    save_optimum(rms_model(k=24, seed=2), src / "encoder_model.onnx")  # folded wrong
    (src / "config.json").write_text("{}")
    real = fold_math.fold_scale

    def wrong_for_k24(w, g, k, **kw):
        g = np.asarray(g)
        return real(w, g * 1.01 if g.size == 24 else g, k, **kw)

    monkeypatch.setattr(fold_math, "fold_scale", wrong_for_k24)
    before = snapshot(tmp_path)
    out, report_path = tmp_path / "out", tmp_path / "report.json"
    proc = main(capsys, "optimize", src, "-o", out, "--report", report_path)
    err = assert_clean_error(proc, VERIFICATION_FAILED, "encoder_model.onnx", "verification failed")
    assert "== decoder_model.onnx" in proc.stdout and "== encoder_model.onnx" in proc.stdout
    assert "FAILED" in proc.stdout, err
    assert not out.exists()  # nothing published, no staging folder, not even the folder
    after = snapshot(tmp_path)
    assert after.pop("report.json") and after == before
    data = json.loads(report_path.read_text())
    assert data["verification"]["passed"] is False
    assert data["models"]["decoder_model.onnx"]["verification"]["passed"] is True
    assert data["models"]["encoder_model.onnx"]["verification"]["passed"] is False


def test_a_bad_model_is_refused_before_anything_is_written(tmp_path, capsys):
    src = tmp_path / "m"
    graphs.save(rms_model(), src / "decoder_model.onnx")
    full = rms_model().SerializeToString()
    (src / "encoder_model.onnx").write_bytes(full[: len(full) // 2])
    before = snapshot(tmp_path)
    assert_clean_error(main(capsys, "optimize", src, "-o", tmp_path / "out"), BAD_INPUT, "encoder_model.onnx")
    assert snapshot(tmp_path) == before


# -- refusals ------------------------------------------------------------------------------------


def test_bad_output_folders_are_refused(tmp_path, capsys):
    src = tmp_path / "m"
    graphs.save(rms_model(), src / "model.onnx", external=True)
    (src / "config.json").write_text("{}")
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    cases = [
        (["-o", src / "sub" / "out"], "inside the input folder"),
        (["-o", src], "is the input folder"),
        (["-o", src / "." / ".." / "m"], "is the input folder"),
        (["-o", tmp_path], "input folder is inside the output folder"),
        (["-o", tmp_path / "afile"], "must be a folder"),
        (["-o", tmp_path / "afile" / "deeper"], "not a folder"),
        ([], "name an output folder with -o"),
    ]
    for extra, words in cases:
        assert_clean_error(main(capsys, "optimize", src, *extra), BAD_OUTPUT, words)
        assert snapshot(tmp_path) == before, extra
    # through a link to the input folder too
    (tmp_path / "alias").symlink_to(src, target_is_directory=True)
    before = snapshot(src)
    assert_clean_error(main(capsys, "optimize", src, "-o", tmp_path / "alias" / "out"), BAD_OUTPUT, "inside")
    assert snapshot(src) == before


def test_folder_without_a_model_is_bad_input(tmp_path, capsys):
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "loop").symlink_to(".", target_is_directory=True)  # a model behind a link is not searched
    assert_clean_error(main(capsys, "optimize", src, "-o", tmp_path / "out"), BAD_INPUT, "no .onnx model")
    assert not (tmp_path / "out").exists()


def test_report_naming_a_file_the_run_writes_is_refused(seq2seq, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    for report, words in [
        (out / "config.json", "overwrite a file this run writes"),  # a companion
        (out / "assets" / "spiece.model", "overwrite a file this run writes"),
        (out / "encoder_model.onnx", "overwrite"),
        (out / "encoder_model.onnx.data", "overwrite"),  # the data file a written model gets
        (out / "encoder_model.onnx.1a2b3c4d.data", "overwrite"),
        (seq2seq / "tokenizer.json", "overwrite a file of the input folder"),
        (seq2seq / "decoder_model.onnx_data", "input model or its data"),
        (tmp_path / "afile" / "r.json", "not a folder"),
    ]:
        assert_clean_error(main(capsys, "optimize", seq2seq, "-o", out, "--report", report), BAD_OUTPUT, words)
        assert snapshot(tmp_path) == before, report


def test_report_beside_models_in_a_subfolder_is_refused(tmp_path, capsys):
    """No model at the top of the folder: a companion there is protected all the same."""
    src = tmp_path / "hf"
    graphs.save(rms_model(), src / "onnx" / "model.onnx")
    (src / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    report = tmp_path / "out" / "config.json"
    proc = main(capsys, "optimize", src, "-o", tmp_path / "out", "--report", report)
    assert_clean_error(proc, BAD_OUTPUT, "overwrite")
    assert snapshot(tmp_path) == before


def test_existing_output_entry_of_the_wrong_kind_is_refused(seq2seq, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "config.json").mkdir(parents=True)  # a folder where the companion file goes
    before = snapshot(tmp_path)
    assert_clean_error(main(capsys, "optimize", seq2seq, "-o", out), BAD_OUTPUT, "config.json", "is a folder")
    assert snapshot(tmp_path) == before


def test_report_that_cannot_be_written_publishes_nothing(seq2seq, tmp_path, monkeypatch):
    from flashnorm_onnx.io import model_io
    from flashnorm_onnx.errors import OutputPathError

    def fail(report, path):
        raise OutputPathError(f"{path}: cannot write the report (disk full)")

    monkeypatch.setattr(model_io, "write_report", fail)
    out = tmp_path / "out"
    with pytest.raises(OutputPathError, match="cannot write the report"):
        flashnorm_onnx.optimize(seq2seq, out, report_path=tmp_path / "r.json")
    assert not out.exists()  # no model, no companion, no staging folder


def test_a_failed_commit_says_which_models_were_published(seq2seq, tmp_path, monkeypatch):
    from flashnorm_onnx.io import publish
    from flashnorm_onnx.errors import OutputPathError

    commits = []

    def step(name):
        if name == "synced":
            commits.append(name)
            if len(commits) == 2:
                raise OSError(28, "No space left on device")

    monkeypatch.setattr(publish, "_step", step)
    out = tmp_path / "out"
    with pytest.raises(OutputPathError) as err:
        flashnorm_onnx.optimize(seq2seq, out)
    message = str(err.value)
    assert "incomplete: published decoder_model.onnx, not decoder_with_past_model.onnx, encoder_model.onnx" in message
    assert (out / "decoder_model.onnx").is_file() and not (out / "encoder_model.onnx").exists()
    no_leftovers(out)  # the other staging folders are gone
