"""``flashnorm-onnx profile`` on a tiny Llama (CPU, few runs). No timing assertions."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from benchmarks._chains import norm_chain_nodes
from flashnorm_onnx.cli import main
from flashnorm_onnx.profile import GROUPS, bootstrap_ratio, parse_shape

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("profile")
    from models import fixtures

    source = Path(fixtures.build("llama_dynamo"))
    folded = tmp / "tiny.flashnorm.onnx"
    assert main(["optimize", str(source), "-o", str(folded), "-q", "--force-write"]) == 0
    return source, folded


@pytest.fixture(scope="module")
def report(pair, tmp_path_factory):
    source, folded = pair
    out = tmp_path_factory.mktemp("profile-out")
    rc = main(["profile", str(folded), "--baseline", str(source), "--shape", "prefill=1x16",
               "--shape", "decode=1x1,past=32", "--runs", "6", "--warmup", "1", "--ops", "--ops-runs", "3",
               "--json", str(out / "p.json"), "--plot", str(out / "p.png"), "--no-progress"])
    assert rc == 0
    return json.loads((out / "p.json").read_text()), out


def test_json_has_all_fields(report):
    data, _ = report
    for key in ("tool", "version", "models", "settings", "machine", "results", "skipped", "ops", "notes"):
        assert key in data
    assert data["machine"]["onnxruntime"]
    assert "CPUExecutionProvider" in data["machine"]["session_providers"]
    assert data["results"], "no shape was measured"
    for r in data["results"]:
        for key in ("shape", "batch", "sequence", "past", "tokens", "provider", "A", "B", "ratio"):
            assert key in r
        for label in ("A", "B"):
            s = r[label]
            for key in ("median_ms", "p90_ms", "p99_ms", "mean_ms", "tokens_per_s", "runs", "samples_ms"):
                assert key in s
            assert s["runs"] == 6 * 4 and len(s["samples_ms"]) == 6 * 4  # --runs per round, 4 rounds
            assert all(v > 0 and math.isfinite(v) for v in s["samples_ms"])
            assert s["median_ms"] <= s["p90_ms"] <= s["p99_ms"]
        ratio = r["ratio"]
        lo, hi = ratio["ci95"]
        assert math.isfinite(ratio["median"]) and ratio["median"] > 0
        assert 0 < lo <= hi and math.isfinite(hi)
        assert ratio["verdict"] in ("no significant difference", "B faster", "B slower")
        # each round on a fresh session pair, created in the opposite order to the round before
        rounds = r["rounds"]
        assert len(rounds) == ratio["rounds"] == 4 and all(x["pairs"] == 6 for x in rounds)
        assert [x["created_first"] for x in rounds] == [rounds[0]["created_first"], rounds[1]["created_first"]] * 2
        assert rounds[0]["created_first"] != rounds[1]["created_first"]


def test_decode_without_cache_is_skipped_with_reason(report):
    data, _ = report
    shapes = {r["shape"] for r in data["results"]}
    skipped = {s["shape"]: s["reason"] for s in data["skipped"]}
    assert "prefill" in shapes
    # the tiny dynamo export has no KV cache: decode is skipped, and says why
    assert "decode" not in shapes
    assert "KV-cache" in skipped["decode"]


def test_plot_is_a_valid_png(report):
    _, out = report
    data = (out / "p.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


def test_op_groups_add_up(report):
    data, _ = report
    assert data["ops"]
    for entry in data["ops"]:
        for label in ("A", "B"):
            prof = entry[label]
            groups = prof["by_group_ms"]
            assert set(groups) == set(GROUPS)
            assert sum(groups.values()) == pytest.approx(prof["kernel_total_ms"], rel=1e-6)
            assert sum(prof["by_op_ms"].values()) == pytest.approx(prof["kernel_total_ms"], rel=1e-6)
            assert prof["kernel_total_ms"] > 0
            # kernels run inside model_run: their sum cannot exceed the whole run by much
            assert prof["kernel_total_ms"] <= prof["run_total_ms"] * 1.05
            assert prof["kernel_total_ms"] >= 0.05 * prof["run_total_ms"]  # loose: a shared CI machine
            assert prof["profiled_runs"] == 3
        # the dynamo baseline runs its RMSNorm chains as separate kernels
        assert entry["A"]["by_group_ms"]["normalization"] > 0


def test_cuda_on_cpu_machine_is_a_clear_error(pair, capsys):
    import onnxruntime as ort

    source, folded = pair
    probe = ort.InferenceSession(str(source), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if "CUDAExecutionProvider" in probe.get_providers():
        pytest.skip("a working CUDA provider is present")
    rc = main(["profile", str(folded), "--baseline", str(source), "--provider", "cuda", "--runs", "2",
               "--warmup", "0", "--no-progress", "--shape", "p=1x4"])
    err = capsys.readouterr().err
    assert rc == 7
    assert "CUDA" in err and "--fallback-cpu" in err
    assert len(err.strip().splitlines()) == 1


def test_fallback_cpu_measures_and_says_so(pair, tmp_path):
    import onnxruntime as ort

    source, folded = pair
    probe = ort.InferenceSession(str(source), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if "CUDAExecutionProvider" in probe.get_providers():
        pytest.skip("a working CUDA provider is present")
    rc = main(["profile", str(folded), "--baseline", str(source), "--provider", "cuda", "--fallback-cpu",
               "--runs", "2", "--warmup", "0", "--no-progress", "--shape", "p=1x4", "--json", str(tmp_path / "j.json")])
    assert rc == 0
    data = json.loads((tmp_path / "j.json").read_text())
    assert data["results"][0]["provider"] == "cpu"
    assert any("fallback-cpu" in n for n in data["notes"])


@pytest.mark.parametrize("bad", ["prefill", "prefill=512", "x=1x0", "d=1x1,cache=3"])
def test_bad_shape_is_a_usage_error(pair, bad, capsys):
    source, folded = pair
    assert main(["profile", str(folded), "--baseline", str(source), "--shape", bad, "--no-progress"]) == 2


def test_parse_shape():
    case = parse_shape("decode=1x1,past=1024")
    assert (case.name, case.batch, case.sequence, case.past) == ("decode", 1, 1, 1024)
    assert parse_shape("prefill=2x512").sequence == 512


def _noisy_pairs(rng, n: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic latencies with a known B/A: slow drift shared by both runs of a pair,
    lognormal noise of 5% per run, and 5% of the runs hit by a 1.3-2x stall."""
    drift = 1.0 + 0.2 * np.sin(np.linspace(0, rng.uniform(1, 6), n)) + 0.05 * rng.standard_normal(n).cumsum() / n
    def arm(scale):
        t = scale * drift * np.exp(0.05 * rng.standard_normal(n))
        stall = rng.random(n) < 0.05
        return np.where(stall, t * rng.uniform(1.3, 2.0, n), t)
    return arm(0.030), arm(0.030 * ratio)


@pytest.mark.parametrize("ratio", [1.0, 0.93])
def test_interval_covers_the_true_ratio(ratio):
    """Over many noisy synthetic runs, the 95% interval holds the true ratio about 95% of the
    time (not much less: it would be wrong; not ~100%: it would be uselessly wide)."""
    rng = np.random.default_rng(7)
    trials, covered, widths = 300, 0, []
    for i in range(trials):
        a, b = _noisy_pairs(rng, 40, ratio)
        r = bootstrap_ratio(a, b, resamples=400, seed=i)
        lo, hi = r["ci95"]
        covered += lo <= ratio <= hi
        widths.append(r["half_width"])
    assert 0.90 <= covered / trials <= 0.99, covered / trials
    # 5% noise per run, 40 pairs: B/A to a few percent (about +-4.3%; the old i.i.d. bootstrap gave
    # +-3% and claimed too often, see tests/test_profile_stats.py)
    assert np.median(widths) < 0.05


def test_interval_is_decisive_under_shared_drift():
    """A 3% speed-up under a drift of +-20% shared by both runs of a pair: within a pair the
    drift cancels, and 200 pairs (per-run noise 5%, 5% stalls) call it nearly every time."""
    rng = np.random.default_rng(3)
    hits = 0
    for i in range(20):
        a, b = _noisy_pairs(rng, 200, 0.97)
        r = bootstrap_ratio(a, b, seed=i)
        assert r["median"] == pytest.approx(0.97, abs=0.02)
        hits += r["verdict"] == "B faster"
    assert hits >= 17


def test_adaptive_length_stops_at_the_target(pair):
    """Without --runs, pairs run until the interval is within the target; the report says so."""
    from flashnorm_onnx.profile import profile

    source, folded = pair
    rep = profile(source, source, shapes=[parse_shape("p=1x4")], warmup=1, target=0.5, min_runs=4, max_runs=200,
                  rounds=1)
    (r,) = rep["results"]
    assert r["stopped"].startswith("interval half-width") and r["ratio"]["half_width"] <= 0.5
    assert 4 <= r["pairs"] < 200 and r["A"]["runs"] == r["pairs"]
    # in rounds (the default), each round stops by its own interval, within target * sqrt(rounds)
    rep = profile(source, source, shapes=[parse_shape("p=1x4")], warmup=1, target=0.25, min_runs=4, max_runs=200)
    (r,) = rep["results"]
    assert r["stopped"] == "4 rounds on fresh session pairs, stopped by their interval x4"
    assert all(x["pairs"] >= 8 for x in r["rounds"]) and r["A"]["runs"] == r["pairs"] < 200
    rep = profile(source, folded, shapes=[parse_shape("p=1x4")], warmup=0, target=1e-6, budget_s=0.05,
                  min_runs=3, max_runs=100000)
    (r,) = rep["results"]
    assert r["stopped"].startswith("2 rounds on fresh session pairs, stopped by the time budget")
    assert r["pairs"] < 100000  # the budget counts all rounds: after the second, no new round starts
    assert set(r["load"]) >= {"load_before", "load_after", "other_cores_busy", "competed"}
    assert rep["settings"]["threading"]["pool"] == "one pool shared by both sessions"


def test_norm_chain_finder(pair):
    import onnx

    source, _ = pair
    chains = norm_chain_nodes(onnx.load(str(source), load_external_data=False).graph)
    assert len(chains) == 5  # 2 layers x 2 norms + final norm


def test_norm_time_is_what_the_catalogue_calls_a_norm():
    """--ops counts as normalization the nodes the fold's catalogue finds: every decomposed
    RMSNorm chain of the Llama export, and none of GPT-2's GELU Pow/Tanh nodes."""
    import onnx

    from flashnorm_onnx.profile.opgroups import _norm_names
    from models import fixtures

    llama = Path(fixtures.build("llama_dynamo"))
    graph = onnx.load(str(llama), load_external_data=False).graph
    names = _norm_names(llama)
    reduce_means = [n.name for n in graph.node if n.op_type == "ReduceMean"]
    assert reduce_means and set(reduce_means) <= names
    assert {n.op_type for n in graph.node if n.name in names} <= {"Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal",
                                                                    "Div", "Mul", "Cast", "Constant"}
    gpt2 = Path(fixtures.build("gpt2_dynamo"))
    graph = onnx.load(str(gpt2), load_external_data=False).graph
    names = _norm_names(gpt2)
    pows = [n for n in graph.node if n.op_type == "Pow"]
    assert pows, "the GELU of this export has a Pow"
    assert not any(n.name in names for n in pows)
    assert any(n.op_type == "LayerNormalization" and n.name in names for n in graph.node)


@pytest.mark.parametrize("past_in", [("A", "B"), ("A",), ("B",), ()])
def test_decode_is_timed_only_when_both_models_take_a_cache(past_in):
    """A decode shape fed to a model without a cache would time a 1-token prefill against a real
    decode step: skipped, naming the model, unless both models take past key/values."""
    from flashnorm_onnx.profile.measure import ModelInfo
    from flashnorm_onnx.profile.run import _cases_to_time
    from flashnorm_onnx.verify.inputs import Case, InputSpec

    def specs(with_past):
        ids = [InputSpec("input_ids", np.dtype(np.int64), ["batch", "sequence"])]
        past = [InputSpec("past_key_values.0.key", np.dtype(np.float32), ["batch", 2, "past_sequence", 8])]
        return ids + (past if with_past else [])

    models = [ModelInfo(label, Path(f"{label}.onnx"), specs=specs(label in past_in)) for label in ("A", "B")]
    report = {"skipped": []}
    settings = type("S", (), {"provider": "CPUExecutionProvider"})()
    shapes = [Case("prefill", 1, 16, 0), Case("decode", 1, 1, 32)]
    kept = [c.name for c in _cases_to_time(models, settings, shapes, report)]
    if len(past_in) == 2:
        assert kept == ["prefill", "decode"] and report["skipped"] == []
    else:
        assert kept == ["prefill"]
        (skip,) = report["skipped"]
        assert skip["shape"] == "decode" and "KV-cache" in skip["reason"]
        expected = {("A",): "model B has no", ("B",): "model A has no", (): "models A and B have no"}[past_in]
        assert skip["reason"].startswith(expected), skip["reason"]


def test_each_model_gets_the_sizes_its_own_config_states(tmp_path):
    """A genai folder's model names its cache's head size ``kv_cache_dim``, which only its
    genai_config.json states: profiling it against another model must read it from its own folder
    (without it the cache is generated 1 wide and ORT refuses it); --dim still wins."""
    from flashnorm_onnx.profile.measure import ModelInfo, feeds_for
    from flashnorm_onnx.verify.inputs import Case, InputSpec

    genai, other = tmp_path / "genai", tmp_path / "other"
    genai.mkdir()
    other.mkdir()
    (genai / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"head_size": 8}}}))
    specs = [InputSpec("past_key_values.0.key", np.dtype(np.float32), ["batch", 2, "past_sequence", "kv_cache_dim"])]
    case = Case("decode", 1, 1, 4)
    shape = lambda info, dims=None: feeds_for(info, case, {}, dims, 0)["past_key_values.0.key"].shape  # noqa: E731
    assert shape(ModelInfo("A", genai / "model.onnx", specs=specs)) == (1, 2, 4, 8)
    assert shape(ModelInfo("B", other / "model.onnx", specs=specs)) == (1, 2, 4, 1)  # no config: nothing stated
    assert shape(ModelInfo("A", genai / "model.onnx", specs=specs), {"kv_cache_dim": 16}) == (1, 2, 4, 16)


def test_subgraph_kernels_are_not_counted_twice(tmp_path):
    """ORT times an If over its whole branch and the branch's nodes again: each counts once."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from flashnorm_onnx.profile.opgroups import parse_profile

    w = helper.make_tensor("w", TensorProto.FLOAT, [256, 256], np.random.default_rng(0).random(65536).astype(
        np.float32).ravel().tolist())
    def branch(name, op):
        return helper.make_graph([helper.make_node(op, ["x", "w"] if op == "MatMul" else ["x"], [f"{name}_y"])],
                                 name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch("then", "MatMul"), else_branch=branch("else", "Relu"))],
        "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "trace")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"c": np.array(True), "x": np.ones((64, 256), np.float32)}
    for _ in range(4):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    raw = [ev for ev in json.loads(trace.read_text()) if ev.get("cat") == "Node"
           and ev["name"].endswith("_kernel_time")]
    assert {ev["args"]["op_name"] for ev in raw} == {"If", "MatMul"}  # the branch's node has its own event
    prof = parse_profile(trace, 4, set(), skip_runs=1)
    whole_if = sum(float(ev["dur"]) for ev in raw if ev["args"]["op_name"] == "If") / 4 * 1e-3
    matmul = prof["by_op_ms"]["MatMul"]
    assert matmul > 0
    # If keeps only its own time: what its raw duration holds beyond the MatMul nested in it
    assert prof["by_op_ms"]["If"] < whole_if - 0.5 * matmul
    assert prof["kernel_total_ms"] <= prof["run_total_ms"] * 1.05


def test_a_claimed_difference_under_the_session_effect_is_flagged():
    from flashnorm_onnx.profile.run import session_effect_note

    def result(shape, estimate, verdict):
        return {"shape": shape, "provider": "cpu", "ratio": {"estimate": estimate, "verdict": verdict}}

    assert session_effect_note([result("p", 0.90, "B faster"), result("d", 1.01, "no significant difference")]) is None
    note = session_effect_note([result("p", 0.97, "B faster"), result("d", 1.03, "B slower"),
                                result("x", 1.2, "B slower")])
    assert note is not None and "p (cpu), d (cpu):" in note and "x (cpu)" not in note
    rounds = result("p", 0.97, "B faster")
    rounds["ratio"]["rounds"] = 4  # the interval of 4 rounds on fresh sessions holds the session effect
    assert session_effect_note([rounds]) is None
