"""The whole-model check on padded masks and on both branches of a merged decoder (issues 23, 24).

* padded cases: a model with an attention mask gets a batch with a left-padded row, a
  right-padded row and a row of one real token, and with a KV cache a decode step on a padded
  cache; outputs are compared only where the mask keeps the position;
* mutation tests: a model that ignores its mask (its readers rewired to ones of the same shape)
  passes every unpadded case and fails the padded ones, through ``compare_models`` and through
  ``flashnorm-onnx optimize`` (a broken fold, and a broken ``--for-ort`` fusion, which the plan-diff
  check does not see); the unbroken pipelines pass;
* merged decoders: a bool ``use_cache_branch`` choosing between two branches of an ``If`` is fed
  False (no past, empty past inputs, as optimum feeds them) and True (a past): a candidate that
  differs in either branch alone fails; one real optimum export of a tiny T5 (seconds).
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from flashnorm_onnx import cli as cli
from flashnorm_onnx.errors import VerificationFailed
from flashnorm_onnx.passes import flashnorm_fold
from flashnorm_onnx.verify.inputs import Case, default_cases, make_feeds, specs_from_session
from flashnorm_onnx.verify.whole import compare_models, kept_positions, make_session

# -- a model that ignores its attention mask ---------------------------------------------------------


def ignore_mask(graph: ir.Graph) -> int:
    """Rewires every reader of the graph's attention mask input to ones of the same shape and type
    (Shape -> ConstantOfShape), as a fusion that drops the mask would; returns the readers rewired."""
    mask = next(v for v in graph.inputs if "mask" in v.name)
    uses = list(mask.uses())
    shape = ir.node("Shape", [mask], name="mutation_mask_shape")
    one = ir.tensor(np.ones(1, dtype=mask.dtype.numpy()))
    ones = ir.node("ConstantOfShape", [shape.outputs[0]], {"value": one}, name="mutation_ones")
    ones.outputs[0].name = "mutation_ones_mask"
    graph.insert_before(graph.node(0), [shape, ones])
    for use in uses:
        use.node.replace_input_with(use.idx, ones.outputs[0])
    return len(uses)


def mask_ignored(src, dst):
    model = ir.load(str(src))
    assert ignore_mask(model.graph) > 0
    ir.save(model, str(dst))
    return dst


def failing_cases(result) -> set[str]:
    return {o["case"] for o in result.outputs if not o["ok"]}


@pytest.mark.parametrize("fixture, unpadded, padded", [
    ("llama_dynamo", {"run1", "run2"}, {"padded"}),
    ("llama_optimum_past", {"prefill", "decode"}, {"padded", "padded-decode"}),
])
def test_a_model_that_ignores_its_mask_fails_only_the_padded_cases(build_fixture, tmp_path, fixture, unpadded,
                                                                   padded):
    src = build_fixture(fixture)
    assert compare_models(src, src).passed
    result = compare_models(src, mask_ignored(src, tmp_path / "broken.onnx"))
    assert not result.passed
    assert failing_cases(result) == padded, result.lines()  # masks of ones alone would not see it
    assert {o["case"] for o in result.outputs} == unpadded | padded
    assert "logits" in result.message


def test_padded_case_lines_say_which_positions_were_compared(build_fixture):
    src = build_fixture("llama_optimum_past")
    result = compare_models(src, src)
    lines = result.lines()
    assert "  case: padded: attention_mask[3, 7] rows left-padded by 3, right-padded by 3, 1 real token; " \
           "compared at its 9/21 kept positions" in lines, lines
    assert "  case: padded-decode: attention_mask[2, 7] (past 6) rows left-padded by 3, unpadded; " \
           "compared at its 11/14 kept positions" in lines, lines
    assert all(len(line) <= 8 + 120 for line in lines if line.startswith("  case: ")), lines
    entries = {(o["case"], o["name"]): o for o in result.outputs}
    assert entries["padded", "logits"]["kept"] == [9 * 512, 21 * 512]  # [3, 7, 512] at 9 positions
    assert entries["padded", "present.0.key"]["kept"] == [9 * 2 * 16, 21 * 2 * 16]  # [3, 2, 7, 16]
    assert entries["padded-decode", "present.0.key"]["kept"] == [11 * 2 * 16, 14 * 2 * 16]
    assert "kept" not in entries["padded-decode", "logits"]  # [2, 1, 512]: the new token, never padded
    assert "kept" not in entries["prefill", "logits"]


def test_padded_feeds_are_what_generate_feeds(build_fixture):
    """position_ids of the padded rows are Hugging Face's for that mask (cumsum - 1, padded: 1); the
    export given them computes, at the kept positions of a left-padded row, what it computes for
    the same tokens unpadded."""
    src = build_fixture("llama_optimum")
    session = make_session(src)
    specs = specs_from_session(session)
    feeds = make_feeds(specs, Case("padded", batch=3, sequence=7, rows=("left", "right", "one")))
    mask = feeds["attention_mask"]
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1]]
    assert feeds["position_ids"].tolist() == [[1, 1, 1, 0, 1, 2, 3], [0, 1, 2, 3, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]]
    padded = session.run(None, feeds)[0]
    alone = session.run(None, {"input_ids": feeds["input_ids"][:1, 3:], "attention_mask": np.ones((1, 4), np.int64),
                               "position_ids": np.arange(4)[None]})[0]
    np.testing.assert_allclose(padded[0, 3:], alone[0], rtol=1e-4, atol=1e-4)


def test_kept_positions_by_axis():
    rows = np.array([[0, 1, 1], [1, 1, 0]], bool)
    keep = kept_positions((2, 3, 5), rows)  # logits [batch, seq, vocab]: every vocab entry of a kept position
    assert keep.shape == (2, 3) and keep.tolist() == rows.tolist()
    keep = kept_positions((2, 4, 3, 8), rows)  # present [batch, heads, total, head_dim]
    assert keep.shape == (2, 4, 3) and keep[:, 1].tolist() == rows.tolist()
    keep = kept_positions((2, 4, 3, 3), rows)  # attention weights [batch, heads, query, key]: both axes
    assert keep.shape == (2, 4, 3, 3) and keep[1, 0].tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
    assert kept_positions((2, 8), rows) is None  # pooled: no position axis, compared in full
    assert kept_positions((3, 3, 8), rows) is None  # not the batch
    decode = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool)  # past 3, 3 new tokens
    keep = kept_positions((2, 3, 5), decode, past=3)  # the new tokens: the last 3 positions
    assert keep.tolist() == [[True] * 3] * 2
    assert kept_positions((2, 6, 5), decode, past=3).tolist() == decode.tolist()


# -- through optimize: a broken fold, a broken --for-ort fusion ---------------------------------------


def _fold_drops_the_mask(monkeypatch):
    real = flashnorm_fold.FlashNormFoldPass.apply

    def apply(self, model, plans):
        result = real(self, model, plans)
        ignore_mask(model.graph)
        return result

    monkeypatch.setattr(flashnorm_fold.FlashNormFoldPass, "apply", apply)


def _fusion_drops_the_mask(monkeypatch):
    from flashnorm_onnx.fusions import ort

    real = ort.fuse_after_fold

    def fuse_after_fold(model):
        counts = real(model)
        ignore_mask(model.graph)
        return {**counts, "mutation_mask_dropped": 1}

    monkeypatch.setattr(ort, "fuse_after_fold", fuse_after_fold)


@pytest.mark.parametrize("broken, extra", [
    (None, ["--verify", "onnxruntime"]),
    (_fold_drops_the_mask, ["--verify", "onnxruntime"]),
    (None, ["--for-ort"]),
    (_fusion_drops_the_mask, ["--for-ort"]),  # no plan-diff check: the whole-model run alone sees it
])
def test_optimize_fails_a_pass_that_drops_the_mask(build_fixture, tmp_path, monkeypatch, capsys, broken, extra):
    src = build_fixture("llama_dynamo")
    out = tmp_path / "out" / "model.onnx"
    if broken is not None:
        broken(monkeypatch)
    code = cli.main(["optimize", str(src), "-o", str(out), *extra])
    text = "".join(capsys.readouterr())
    if broken is None:
        assert code == 0 and "PASSED" in text and out.is_file(), text
        assert "case: padded: attention_mask[3, 7] rows left-padded by 3" in text, text
        return
    assert code == 5 and "FAILED" in text and not out.exists(), text
    assert "output 'logits' differs" in text, text  # the whole-model comparison, not only the plan-diff
    assert "padded     logits" in text, text


def test_the_failing_cases_of_a_fusion_that_drops_the_mask(build_fixture, tmp_path, monkeypatch):
    import flashnorm_onnx

    _fusion_drops_the_mask(monkeypatch)
    with pytest.raises(VerificationFailed) as failed:
        flashnorm_onnx.optimize(build_fixture("llama_optimum_past"), tmp_path / "o.onnx", for_ort=True)
    verification = failed.value.report.verification
    assert verification.method == "onnxruntime"
    assert failing_cases(verification) == {"padded", "padded-decode"}


# -- merged decoders: both branches --------------------------------------------------------------------


def merged_decoder(flag: str = "use_cache_branch", past: bool = True) -> onnx.ModelProto:
    """A merged-decoder-like model: If(flag) with-past branch: Gather(E, ids) @ A + mean of the past
    keys; else (no past): Gather(E, ids) @ B. Weights E, A, B are outer-scope initializers read by
    the branches, as in optimum's merged decoders."""
    rng = np.random.default_rng(0)
    shape = ["batch_size", "sequence_length", 8]
    vector = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    with_past = [helper.make_node("Gather", ["E", "input_ids"], ["h1"]),
                 helper.make_node("MatMul", ["h1", "A"], ["m1"])]
    if past:
        with_past += [helper.make_node("ReduceMean", ["past_key_values.0.key"], ["pm"], keepdims=0),
                      helper.make_node("Add", ["m1", "pm"], ["y1"])]
    else:
        with_past.append(helper.make_node("Identity", ["m1"], ["y1"]))
    no_past = [helper.make_node("Gather", ["E", "input_ids"], ["h0"]),
               helper.make_node("MatMul", ["h0", "B"], ["y0"])]
    then_branch = helper.make_graph(with_past, "with_past", [], [vector("y1")])
    else_branch = helper.make_graph(no_past, "no_past", [], [vector("y0")])
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    if past:
        inputs.append(helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT,
                                                    ["batch_size", 2, "past_sequence_length", 4]))
    inputs.append(helper.make_tensor_value_info(flag, TensorProto.BOOL, [1]))
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "E"),
             numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "A"),
             numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "B")]
    cond = helper.make_node("Squeeze", [flag], ["cond"])
    node = helper.make_node("If", ["cond"], ["logits"], then_branch=then_branch, else_branch=else_branch)
    graph = helper.make_graph([cond, node], "merged", inputs, [vector("logits")], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def change_branch(model: onnx.ModelProto, branch: str, factor: float = 1.01) -> onnx.ModelProto:
    """The model with one branch's output multiplied by ``factor`` (the other branch untouched)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = next(n for n in out.graph.node if n.op_type == "If")
    attr = next(a for a in node.attribute if a.name == branch)
    result = attr.g.output[0].name
    attr.g.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), "mutation_factor"))
    attr.g.node.append(helper.make_node("Mul", [result, "mutation_factor"], ["mutation_out"]))
    attr.g.output[0].name = "mutation_out"
    return out


def _save(model: onnx.ModelProto, path):
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def test_a_merged_decoder_runs_both_branches(tmp_path):
    src = _save(merged_decoder(), tmp_path / "merged.onnx")
    result = compare_models(src, src)
    assert result.passed
    assert "prefill: fed use_cache_branch=False (the no-past branch; past inputs empty, as optimum feeds them)" \
        in result.cases, result.cases
    assert "decode: fed use_cache_branch=True (the with-past branch)" in result.cases, result.cases
    assert result.case_inputs["prefill"]["past_key_values.0.key"] == [1, 2, 0, 4]
    for branch, case in (("else_branch", "prefill"), ("then_branch", "decode")):
        changed = _save(change_branch(merged_decoder(), branch), tmp_path / f"{branch}.onnx")
        result = compare_models(src, changed)
        assert not result.passed, branch
        assert failing_cases(result) == {case}, (branch, result.lines())


@pytest.mark.parametrize("flag", ["use_cache_branch", "use_past_branch", "with_past"])
def test_a_branch_flag_is_recognised_by_its_name_and_type(tmp_path, flag):
    src = _save(merged_decoder(flag), tmp_path / "merged.onnx")
    changed = _save(change_branch(merged_decoder(flag), "else_branch"), tmp_path / "changed.onnx")
    assert not compare_models(src, changed).passed
    specs = specs_from_session(make_session(src))
    feeds = [make_feeds(specs, case)[flag].tolist() for case in default_cases(specs)]
    assert feeds == [[False], [True]]


def test_a_branch_flag_without_past_inputs_still_takes_both_values(tmp_path):
    src = _save(merged_decoder(past=False), tmp_path / "merged.onnx")
    result = compare_models(src, src)
    assert result.passed
    assert [c for c in result.cases if "fed" in c] == ["run1: fed use_cache_branch=False",
                                                      "run2: fed use_cache_branch=True"]
    changed = _save(change_branch(merged_decoder(past=False), "then_branch"), tmp_path / "changed.onnx")
    assert failing_cases(compare_models(src, changed)) == {"run2"}


def _require(*dists: str) -> None:
    for dist in dists:
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{dist} is not installed")


@pytest.fixture(scope="module")
def t5_export(tmp_path_factory):
    """optimum's text2text-generation-with-past export of the tiny T5 (models/seq2seq.py): encoder,
    decoder, decoder with past and the merged decoder."""
    _require("optimum-onnx", "transformers", "torch")
    from optimum.exporters.onnx import main_export

    from models.seq2seq import checkpoint

    root = tmp_path_factory.mktemp("t5")
    main_export(str(checkpoint("t5", root / "ckpt")), str(root / "out"), task="text2text-generation-with-past")
    return root / "out"


def test_optimums_merged_t5_decoder_takes_both_branches(t5_export, tmp_path):
    merged = t5_export / "decoder_model_merged.onnx"
    result = compare_models(merged, merged)
    assert result.passed
    assert [c for c in result.cases if " fed " in c] == [
        "prefill: fed use_cache_branch=False (the no-past branch; past inputs empty, as optimum feeds them)",
        "decode: fed use_cache_branch=True (the with-past branch)"]
    prefill, decode = result.case_inputs["prefill"], result.case_inputs["decode"]
    # as optimum feeds the first step: every past input empty, the decoder's and the encoder's
    assert {s[2] for n, s in prefill.items() if n.startswith("past_key_values")} == {0}
    # a step with a past: the encoder's keys, its mask and its states of the same length
    assert decode["past_key_values.0.encoder.key"][2] == decode["encoder_attention_mask"][1] \
        == decode["encoder_hidden_states"][1]
    # the no-past branch fed so computes what decoder_model.onnx computes on the same inputs
    session = make_session(merged)
    specs = specs_from_session(session)
    feeds = make_feeds(specs, default_cases(specs)[0])
    plain = make_session(t5_export / "decoder_model.onnx")
    names = [i.name for i in plain.get_inputs()]
    np.testing.assert_allclose(session.run(["logits"], feeds)[0],
                               plain.run(["logits"], {n: feeds[n] for n in names})[0], rtol=1e-5, atol=1e-5)
    for branch, case in (("else_branch", "prefill"), ("then_branch", "decode")):
        model = onnx.load(str(merged))
        changed = tmp_path / f"{branch}.onnx"
        onnx.save(change_branch(model, branch), str(changed))
        assert failing_cases(compare_models(merged, changed)) == {case}, branch


def test_a_padded_case_the_input_model_does_not_run_on_is_left_out_with_a_line(tmp_path):
    """A model that fails on any zero in its mask (a Reshape to [min(mask), -1], allowzero): the
    padded case is tried at batch 3, then at batch 1, then left out, said so; the others decide.
    A padded case asked for (``cases=``) is an error, as any other."""
    from flashnorm_onnx.errors import VerificationUnavailable

    nodes = [helper.make_node("Cast", ["attention_mask"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMin", ["attention_mask"], ["lo"], keepdims=0),
             helper.make_node("Reshape", ["lo", "one"], ["lo1"]),
             helper.make_node("Concat", ["lo1", "minus_one"], ["shape"], axis=0),
             helper.make_node("Reshape", ["f", "shape"], ["out"], allowzero=1)]
    graph = helper.make_graph(
        nodes, "strict", [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, None])],
        [numpy_helper.from_array(np.array([1], np.int64), "one"),
         numpy_helper.from_array(np.array([-1], np.int64), "minus_one")])
    src = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9),
                tmp_path / "strict.onnx")
    result = compare_models(src, src)
    assert result.passed
    assert set(result.case_inputs) == {"run1", "run2"}
    line = result.cases[0]  # tried at batch 3 and at batch 1 first
    assert line.startswith("padded: not run: the input model does not run on it ([ONNXRuntimeError]"), line
    assert len(line) < 160, line
    with pytest.raises(VerificationUnavailable, match="does not run on generated inputs"):
        compare_models(src, src, cases=[Case("mine", batch=2, sequence=4, rows=("left",))])  # asked for: an error
