"""``flashnorm-onnx export`` with the encoder-decoder tasks (issues 12 and 23).

Tiny random-weight T5, BART and Whisper checkpoints (models/seq2seq.py, random norm scales) go
through optimum's exporter with ``text2text-generation(-with-past)`` and
``automatic-speech-recognition(-with-past)``. Asserted: the export succeeds and writes what optimum
writes, the merged decoder included; every ``.onnx`` of OUTDIR is a model of the report, folded
and verified in ONNX Runtime; the fold counts, model by model, with what cannot fold and why; the
merged decoder folds in both branches what the plain decoders fold, writing each weight once; and
OUTDIR computes what the unfolded export computes: ONNX Runtime sessions of encoder, decoder and
decoder-with-past on the same inputs, and ``ORTModelForSeq2SeqLM`` / ``ORTModelForSpeechSeq2Seq``
loading OUTDIR (the merged decoder, their default, then ``use_merged=False``) and ``generate``
giving the unfolded export's greedy tokens and scores.

The unfolded reference is the same optimum export (``flashnorm_onnx.pipeline.export._export_optimum``,
the call ``export`` makes) written to a second folder. Each export of these tiny models takes a
few seconds (each test well under 20 s on 2 cores), so none is marked slow; the tests skip only
when optimum-onnx, transformers or torch is not installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flashnorm_onnx import cli as cli
from flashnorm_onnx.pipeline.export import SEQ2SEQ_TASKS, TASKS, _export_optimum, export

ENCODER, DECODER, WITH_PAST = "encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"
MERGED = "decoder_model_merged.onnx"


def require(*dists: str) -> None:
    """Skip when a package the export needs is not installed, and only then."""
    for dist in dists:
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{dist} is not installed")


# -- without exporting -----------------------------------------------------------------------------


def in_process(capsys, *args) -> subprocess.CompletedProcess:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.mark.parametrize("task", SEQ2SEQ_TASKS)
def test_dynamo_refuses_encoder_decoder_tasks_in_one_line_before_anything_is_written(task, capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    out = tmp_path / "out"
    proc = in_process(capsys, "export", ckpt, "-o", out, "--exporter", "dynamo", "--task", task)
    assert proc.returncode == 8, proc.stderr
    assert proc.stderr.strip() == (f"flashnorm-onnx: error: --exporter dynamo does not export encoder-decoder "
                                   f"models (--task {task}): use --exporter optimum")
    assert not out.exists()


def test_export_help_lists_the_encoder_decoder_tasks():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    text = re.sub(r"-\s+", "-", " ".join(sub.choices["export"].format_help().split()))  # argparse wraps at "-"
    for task in TASKS:
        assert task in text, task
    for name in (ENCODER, DECODER, WITH_PAST, "ORTModelForSeq2SeqLM", "ORTModelForSpeechSeq2Seq"):
        assert name in text, name
    for task in SEQ2SEQ_TASKS:
        assert parser.parse_args(["export", "x", "-o", "y", "--task", task]).task == task


# -- exports -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        require("optimum-onnx", "transformers", "torch")
        if family not in cache:
            from models.seq2seq import checkpoint

            cache[family] = checkpoint(family, tmp_path_factory.mktemp(family) / "ckpt")
        return cache[family]

    return get


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    """(family, task) -> (OUTDIR, the report returned, the report JSON written), exported once."""
    cache: dict[tuple[str, str], tuple] = {}

    def get(family: str, task: str):
        if (family, task) not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{task}") / "out"
            report = export(str(checkpoints(family)), out, exporter="optimum", task=task)
            cache[family, task] = out, report, json.loads((out / "flashnorm_report.json").read_text())
        return cache[family, task]

    return get


@pytest.fixture(scope="module")
def unfolded(checkpoints, tmp_path_factory):
    """family -> the same optimum export (with past), not folded."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            task = "text2text-generation-with-past" if family == "t5" else "automatic-speech-recognition-with-past"
            out = tmp_path_factory.mktemp(f"{family}-unfolded")
            _export_optimum(checkpoints(family), out, task, "fp32", None)
            cache[family] = out
        return cache[family]

    return get


def norms(report_json: dict, model: str, status: str) -> list[dict]:
    return [n for n in report_json["models"][model]["norms"] if n["status"] == status]


def assert_every_model_folded_and_verified(out: Path, report_json: dict, expected: set[str]) -> None:
    """Every .onnx in OUTDIR is one of the report's models, each changed by the fold and checked by
    running it against the unfolded model in ONNX Runtime; no staging left."""
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*.onnx")}
    assert on_disk == set(report_json["models"]) == expected, (on_disk, set(report_json["models"]))
    for rel, model in report_json["models"].items():
        assert model["summary"]["folded"] > 0, (rel, model["summary"])
        verification = model["verification"]
        assert verification["method"] == "onnxruntime+plan" and verification["passed"], (rel, verification)
        assert verification["cases"], rel
    assert report_json["verification"]["passed"]
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # the staging folder went


def assert_merged_decoder_folded_once(report_json: dict, output_layer: str) -> None:
    """The merged decoder folds every norm of both branches (7 each), and writes each weight once:
    the two branches read one set of weights with equal scales, so the merged file adds what the
    plain decoder adds (one untied copy of the tied output layer), not twice that."""
    merged, plain = report_json["models"][MERGED], report_json["models"][DECODER]
    assert merged["summary"]["folded"] == 14 and not norms(report_json, MERGED, "skipped"), merged["summary"]
    branches = {n["name"].split("@", 1)[0] for n in merged["norms"]}
    assert branches == {"then_branch", "else_branch"}, branches
    finals = [n for n in merged["norms"] if output_layer in " ".join(n["feeds"])]
    assert len(finals) == 2 and all(n["status"] == "folded" for n in finals), finals
    assert merged["summary"]["bytes_added_by_untying"] == plain["summary"]["bytes_added_by_untying"] > 0, (merged["summary"], plain["summary"])
    shared = [c for n in merged["norms"] for c in n["consumers"] if c["action"].startswith("shared")]
    assert len(shared) == sum(len(n["consumers"]) for n in merged["norms"]) // 2, shared


def assert_loaded_decoder(model, use_merged: bool | None) -> None:
    """optimum loads the merged decoder by default, the two decoders with use_merged=False."""
    if use_merged is False:
        assert model.decoder_with_past is not None and not model.decoder.is_merged
    else:
        assert model.decoder_with_past is None and model.decoder.is_merged
        assert Path(model.decoder.path).name == MERGED


def assert_same_generation(model_class, folder: Path, reference: Path, new_tokens: int, **inputs) -> None:
    """optimum's loader on ``folder`` and on ``reference``, with the merged decoder (its default) and
    then the two decoders (use_merged=False): greedy generation gives the same tokens and scores."""
    import torch

    def generate(where: Path, use_merged: bool | None):
        model = model_class.from_pretrained(str(where), provider="CPUExecutionProvider", use_cache=True,
                                            use_merged=use_merged)
        assert_loaded_decoder(model, use_merged)
        result = model.generate(**{k: torch.tensor(v) for k, v in inputs.items()}, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                                output_scores=True)
        return result.sequences.tolist(), np.stack([s.numpy() for s in result.scores])

    for use_merged in (None, False):
        tokens, scores = generate(folder, use_merged)
        ref_tokens, ref_scores = generate(reference, use_merged)
        assert tokens == ref_tokens, use_merged
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)


def ort_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_chain(folder: Path, encoder_feeds: dict, decoder_ids: np.ndarray, next_ids: np.ndarray,
              encoder_mask: np.ndarray | None) -> dict[str, dict[str, np.ndarray]]:
    """Encoder, then the decoder on its output, then the decoder with past on the decoder's cache:
    every output of the three models, by model and name."""
    results: dict[str, dict[str, np.ndarray]] = {}

    def run(rel: str, feeds: dict) -> dict[str, np.ndarray]:
        sess = ort_session(folder / rel)
        names = {i.name for i in sess.get_inputs()}
        missing = names - set(feeds)
        assert not missing, (rel, missing)
        outputs = sess.run(None, {k: v for k, v in feeds.items() if k in names})
        results[rel] = dict(zip([o.name for o in sess.get_outputs()], outputs))
        return results[rel]

    hidden = run(ENCODER, encoder_feeds)["last_hidden_state"]
    common = {"encoder_hidden_states": hidden}
    if encoder_mask is not None:
        common["encoder_attention_mask"] = encoder_mask
    decoded = run(DECODER, {**common, "input_ids": decoder_ids})
    past = {name.replace("present", "past_key_values"): value for name, value in decoded.items()
            if name.startswith("present")}
    run(WITH_PAST, {**common, **past, "input_ids": next_ids})
    return results


def assert_same_outputs(folded: dict, reference: dict, rtol: float, atol: float) -> None:
    assert folded.keys() == reference.keys()
    for rel in reference:
        assert folded[rel].keys() == reference[rel].keys(), rel
        for name, expected in reference[rel].items():
            np.testing.assert_allclose(folded[rel][name], expected, rtol=rtol, atol=atol, err_msg=f"{rel}: {name}")


def test_a_task_the_model_does_not_have_is_the_exporter_error_and_leaves_no_staging(checkpoints, capsys, tmp_path):
    out = tmp_path / "out"
    proc = in_process(capsys, "export", checkpoints("t5"), "-o", out, "--task", "automatic-speech-recognition")
    assert proc.returncode == 8, proc.stderr
    [line] = proc.stderr.strip().splitlines()[1:]  # after the "exporting ..." status line
    assert line.startswith("flashnorm-onnx: error: optimum export of ") and "automatic-speech-recognition" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not list(out.iterdir())


# -- T5 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["text2text-generation-with-past", "text2text-generation"])
def test_t5_export_folds_and_verifies_every_model(task, exports):
    out, report, report_json = exports("t5", task)
    expected = {ENCODER, DECODER} | ({WITH_PAST, MERGED} if task.endswith("-with-past") else set())
    assert_every_model_folded_and_verified(out, report_json, expected)
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).exists(), name
    models = report_json["models"]
    # encoder: 2 layers x (self-attention norm -> q/k/v, feed-forward norm -> wi) fold; the final
    # norm cannot: its output is the encoder's graph output (last_hidden_state), which the
    # decoder's cross-attention k/v projections read in another model
    assert models[ENCODER]["summary"]["folded"] == 4
    [final] = norms(report_json, ENCODER, "skipped")
    assert "graph output" in final["reason"], final
    # decoder: 2 layers x (self-attention, cross-attention -> q, feed-forward) + the final norm,
    # which reaches the tied output layer through T5's scalar Mul by d_model**-0.5: all fold
    for rel in expected - {ENCODER, MERGED}:
        assert models[rel]["summary"]["folded"] == 7, (rel, models[rel]["summary"])
        assert not norms(report_json, rel, "skipped"), rel
        [final] = [n for n in models[rel]["norms"] if n["name"] == "decoder.final_layer_norm.weight"]
        assert final["status"] == "folded" and [f for f in final["feeds"] if "/lm_head/" in f], final
    if MERGED in expected:
        assert_merged_decoder_folded_once(report_json, "/lm_head/")
    assert report.folded == sum(m["summary"]["folded"] for m in models.values())
    assert report_json["notes"][-1].startswith(f"exported with optimum ({task}, fp32) from ")


def test_t5_outdir_computes_what_the_unfolded_export_computes(exports, unfolded):
    out, _, _ = exports("t5", "text2text-generation-with-past")
    reference = unfolded("t5")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 128, size=(2, 7)).astype(np.int64)
    mask = np.ones((2, 7), dtype=np.int64)
    mask[1, 5:] = 0  # a padded row
    decoder_ids = np.concatenate([np.zeros((2, 1), np.int64), rng.integers(3, 128, size=(2, 3))], axis=1)
    next_ids = rng.integers(3, 128, size=(2, 1)).astype(np.int64)
    args = ({"input_ids": ids, "attention_mask": mask}, decoder_ids, next_ids, mask)
    folded, expected = run_chain(out, *args), run_chain(reference, *args)
    assert_same_outputs(folded, expected, rtol=1e-4, atol=1e-5)

    # optimum's loader on OUTDIR as a whole: greedy generation gives the unfolded export's tokens
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    assert_same_generation(ORTModelForSeq2SeqLM, out, reference, 12, input_ids=ids, attention_mask=mask)


# -- Whisper ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["automatic-speech-recognition-with-past", "automatic-speech-recognition"])
def test_whisper_export_folds_and_verifies_every_model(task, exports):
    out, report, report_json = exports("whisper", task)
    expected = {ENCODER, DECODER} | ({WITH_PAST, MERGED} if task.endswith("-with-past") else set())
    assert_every_model_folded_and_verified(out, report_json, expected)
    for name in ("config.json", "generation_config.json", "preprocessor_config.json"):
        assert (out / name).exists(), name
    models = report_json["models"]
    # encoder: 2 layers x (self-attention LayerNorm -> q/k/v, final_layer_norm -> fc1) fold (the
    # LayerNorm bias moves into the projections' biases); the encoder's last layer_norm cannot:
    # it is the encoder's graph output
    assert models[ENCODER]["summary"]["folded"] == 4
    [final] = norms(report_json, ENCODER, "skipped")
    assert "graph output" in final["reason"], final
    # decoder: 2 layers x (self-attention, cross-attention -> q, fc1) + the final layer_norm into
    # the output projection (proj_out)
    for rel in expected - {ENCODER, MERGED}:
        assert models[rel]["summary"]["folded"] == 7, (rel, models[rel]["summary"])
        assert not norms(report_json, rel, "skipped"), rel
        [final] = [n for n in models[rel]["norms"] if n["name"] == "model.decoder.layer_norm.weight"]
        assert final["status"] == "folded" and [f for f in final["feeds"] if "/proj_out/" in f], final
    if MERGED in expected:
        assert_merged_decoder_folded_once(report_json, "/proj_out/")
    assert report.folded == sum(m["summary"]["folded"] for m in models.values())


def test_whisper_outdir_computes_what_the_unfolded_export_computes(checkpoints, exports, unfolded):
    out, _, _ = exports("whisper", "automatic-speech-recognition-with-past")
    reference = unfolded("whisper")
    from transformers import WhisperFeatureExtractor

    # log-mel features of two synthetic waveforms (a chirp and noise), padded to 30 s by the extractor
    extractor = WhisperFeatureExtractor.from_pretrained(str(out))
    t = np.arange(16000, dtype=np.float32) / 16000
    waves = [np.sin(2 * np.pi * (200 + 300 * t) * t).astype(np.float32),
             np.random.default_rng(1).standard_normal(24000).astype(np.float32) * 0.1]
    features = extractor(waves, sampling_rate=16000, return_tensors="np").input_features
    assert features.shape == (2, 80, 3000)
    rng = np.random.default_rng(0)
    decoder_ids = np.concatenate([np.ones((2, 1), np.int64), rng.integers(3, 128, size=(2, 3))], axis=1)
    next_ids = rng.integers(3, 128, size=(2, 1)).astype(np.int64)
    args = ({"input_features": features.astype(np.float32)}, decoder_ids, next_ids, None)
    folded, expected = run_chain(out, *args), run_chain(reference, *args)
    assert_same_outputs(folded, expected, rtol=1e-4, atol=1e-5)

    # optimum's loader on OUTDIR: the same greedy tokens and scores as the unfolded export
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq

    assert_same_generation(ORTModelForSpeechSeq2Seq, out, reference, 8, input_features=features)


# -- BART (post-LN) --------------------------------------------------------------------------------


def test_bart_merged_decoder_folds_what_the_decoders_fold_and_generates_the_same_tokens(exports, checkpoints,
                                                                                       tmp_path_factory):
    """BART is post-LN: every norm but the decoder's last feeds the next residual and is skipped,
    with the reason; the last folds into the output layer. The merged decoder decides in each
    branch what the plain decoders decide, writes each tensor once, and optimum's loader on
    OUTDIR (merged by default, then the two decoders) generates the unfolded export's tokens."""
    out, report, report_json = exports("bart", "text2text-generation-with-past")
    assert_every_model_folded_and_verified_or_said(out, report_json)
    models = report_json["models"]
    def readers(feeds: list[str]) -> list[str]:  # the linears, without their weights' names (merging renames them)
        return [re.sub(r"\[.*\]$", "", f) for f in feeds]

    plain = [(n["status"], readers(n["feeds"])) for n in models[DECODER]["norms"]]
    assert [s for s, _ in plain] == ["skipped"] * 6 + ["folded"], plain
    assert all("post-LN" in n["reason"] for n in models[DECODER]["norms"][:6])
    merged = models[MERGED]["norms"]
    for branch in ("else_branch", "then_branch"):
        mine = [(n["status"], readers(n["feeds"])) for n in merged if n["name"].startswith(branch + "@")]
        assert mine == plain, (branch, mine)
    for key in ("bytes_rewritten", "bytes_added_by_untying", "tensors_written"):
        assert models[MERGED]["summary"][key] == models[DECODER]["summary"][key], key
    assert "folded nothing in encoder_model.onnx (5 norms skipped)" in report.summary_line()

    reference = tmp_path_factory.mktemp("bart-unfolded")
    _export_optimum(checkpoints("bart"), reference, "text2text-generation-with-past", "fp32", None)
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    ids = np.random.default_rng(0).integers(4, 128, size=(2, 6)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, 4:] = 0
    assert_same_generation(ORTModelForSeq2SeqLM, out, reference, 8, input_ids=ids, attention_mask=mask)


def assert_every_model_folded_and_verified_or_said(out: Path, report_json: dict) -> None:
    """Every model of OUTDIR verified in ONNX Runtime; one that folded nothing says so in a note."""
    assert {p.name for p in out.glob("*.onnx")} == set(report_json["models"]) == {ENCODER, DECODER, WITH_PAST, MERGED}
    for rel, model in report_json["models"].items():
        assert model["verification"]["passed"], rel
        if model["summary"]["folded"] == 0:
            assert any("nothing to fold" in note for note in model["notes"]), (rel, model["notes"])
