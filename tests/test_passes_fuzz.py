"""Differential fuzzing: random transformer-like graphs, folded, checked in ONNX Runtime.

Each example is one normalization (form, dtype, epsilon, axis, rank, scale and bias drawn at
random) read by one to three linear layers (MatMul, Transpose(W), Gemm, Cast -> MatMul, a
shared weight, a weight tied to an embedding Gather, MatMul + bias) plus optional extra
readers: a non-linear reader, the norm as a graph output, a Shape reader, a weight that is a
graph input. For every example:

* the pass never crashes; every norm is folded, skipped (with a reason) or already weightless;
* a norm built to be non-foldable is skipped;
* the folded model computes the same function as the input in ORT, on independent inputs;
* ``flashnorm_onnx.optimize`` (which verifies in ORT itself) succeeds and leaves the input's
  files byte-identical.

Examples: ``FLASHNORM_FUZZ_EXAMPLES`` (default 300; ``make fuzz`` runs 2000). With
``FLASHNORM_FUZZ_STATS=path.jsonl`` every example appends one line of outcome (for
``benchmarks/fuzz_report.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import flashnorm_onnx  # noqa: E402
from flashnorm_onnx.passes import FlashNormFoldPass  # noqa: E402

EXAMPLES = int(os.environ.get("FLASHNORM_FUZZ_EXAMPLES", "300"))
STATS = os.environ.get("FLASHNORM_FUZZ_STATS")

RMS_FORMS = ["chain_recip", "chain_div", "chain_pow_neg_half", "chain_mulxx", "rmsnorm23", "sln", "skip_sln"]
LN_FORMS = ["layernorm", "ln_chain", "skip_ln"]
FORMS = RMS_FORMS + LN_FORMS
CONSUMERS = ["matmul", "matmul_t", "gemm", "gemm_tb", "cast_matmul", "matmul_castw", "shared", "tied", "matmul_bias"]
#: second_norm: another norm (scale "g2") reads the first reader's weight too
EXTRAS = ["nonlinear", "graph_output", "shape", "weight_input", "second_norm"]
#: extras that make the norm non-foldable
BLOCKING = {"nonlinear", "graph_output", "weight_input"}
VOCAB = 11


@dataclasses.dataclass
class Spec:
    form: str
    fp16: bool
    eps: float
    rank: int
    last_axis: bool  # normalize over the last axis (else over axis -2: never folded)
    positive_axis: bool  # write the axis as rank-1 rather than -1
    k: int
    consumers: list[str]
    extras: list[str]
    scale: str  # random | ones | signed (negative and zero entries)
    bias: str  # random | zeros (LayerNorm only)
    external: bool
    seed: int

    @property
    def low_precision(self) -> bool:
        """16-bit floats somewhere: the fold rounds to them, so compare with 16-bit tolerance."""
        return self.fp16 or bool({"cast_matmul", "matmul_castw"} & set(self.consumers))

    @property
    def blocking(self) -> bool:
        return bool(BLOCKING & set(self.extras))


@st.composite
def specs(draw) -> Spec:
    form = draw(st.sampled_from(FORMS))
    consumers = draw(st.lists(st.sampled_from(CONSUMERS), min_size=1, max_size=3, unique=True))
    gemm = any(c.startswith("gemm") for c in consumers)
    # Gemm reads rank 2; ORT's Skip*LayerNormalization kernels take rank 2 or 3
    rank = 2 if gemm else draw(st.integers(2, 3 if form.startswith("skip") else 4))
    decomposed = form.startswith("chain") or form == "ln_chain"
    # a decomposed chain may reduce over axis -2 instead (never folded)
    last_axis = draw(st.sampled_from([True, True, True, False])) if decomposed and rank >= 3 else True
    return Spec(
        form=form,
        fp16=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-12, 1e-6, 1e-5, 1e-2])),
        rank=rank,
        last_axis=last_axis,
        positive_axis=draw(st.booleans()),
        k=draw(st.sampled_from([4, 8, 16, 32])),
        consumers=consumers,
        extras=draw(st.lists(st.sampled_from(EXTRAS), max_size=2, unique=True)),
        scale=draw(st.sampled_from(["random", "random", "random", "ones", "signed"])),
        bias=draw(st.sampled_from(["random", "zeros"])),
        external=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(spec: Spec) -> onnx.ModelProto:
    rng = np.random.default_rng(spec.seed)
    k = spec.k
    fdt = TensorProto.FLOAT16 if spec.fp16 else TensorProto.FLOAT
    npdt = np.float16 if spec.fp16 else np.float32
    lead = [2, 3, 2][: spec.rank - 1]
    x_shape = ["batch", *lead[1:], k]
    inputs = [helper.make_tensor_value_info("x", fdt, x_shape)]
    outputs: list[onnx.ValueInfoProto] = []
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    opset = 18
    domains = [helper.make_opsetid("", opset)]
    axis = (spec.rank - 1 if spec.positive_axis else -1) if spec.last_axis else -2

    def init(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    if spec.scale == "ones":
        g = np.ones(k)
    elif spec.scale == "signed":
        g = rng.uniform(-1.5, 1.5, size=k)
        g[rng.integers(0, k)] = 0.0
    else:
        g = rng.uniform(0.5, 1.5, size=k)
    beta = np.zeros(k) if spec.bias == "zeros" else rng.standard_normal(k) * 0.5
    init("g", g.astype(npdt))
    layer = spec.form in LN_FORMS

    if spec.form.startswith("chain") or spec.form == "ln_chain":
        # decomposed: computed in float32 (behind Casts when the model is float16)
        src = "x"
        if spec.fp16:
            nodes.append(helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
            src = "xf"
        init("two", np.array(2.0, np.float32))
        init("eps", np.array(spec.eps, np.float32))
        init("axes", np.array([axis], np.int64))
        if layer:
            nodes += [helper.make_node("ReduceMean", [src, "axes"], ["mu"], keepdims=1),
                      helper.make_node("Sub", [src, "mu"], ["d"])]
            centered = "d"
        else:
            centered = src
        if spec.form == "chain_mulxx":
            nodes.append(helper.make_node("Mul", [centered, centered], ["sq"]))
        else:
            nodes.append(helper.make_node("Pow", [centered, "two"], ["sq"]))
        nodes += [helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
                  helper.make_node("Add", ["ms", "eps"], ["mse"])]
        if spec.form == "chain_pow_neg_half":
            init("mhalf", np.array(-0.5, np.float32))
            nodes += [helper.make_node("Pow", ["mse", "mhalf"], ["inv"]),
                      helper.make_node("Mul", ["inv", centered], ["nf"])]
        elif spec.form in ("chain_div", "chain_mulxx", "ln_chain"):
            nodes += [helper.make_node("Sqrt", ["mse"], ["rms"]),
                      helper.make_node("Div", [centered, "rms"], ["nf"])]
        else:
            nodes += [helper.make_node("Sqrt", ["mse"], ["rms"]),
                      helper.make_node("Reciprocal", ["rms"], ["inv"]),
                      helper.make_node("Mul", [centered, "inv"], ["nf"])]
        n = "nf"
        if spec.fp16:
            nodes.append(helper.make_node("Cast", ["nf"], ["n"], to=fdt))
            n = "n"
        if layer:
            init("beta", beta.astype(npdt))
            nodes += [helper.make_node("Mul", [n, "g"], ["gn"]), helper.make_node("Add", ["gn", "beta"], ["y"])]
        else:
            nodes.append(helper.make_node("Mul", ["g", n] if spec.seed % 2 else [n, "g"], ["y"]))
    elif spec.form == "rmsnorm23":
        opset = 23
        nodes.append(helper.make_node("RMSNormalization", ["x", "g"], ["y"], axis=axis, epsilon=spec.eps))
    elif spec.form == "sln":
        nodes.append(helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["y"], axis=axis,
                                      epsilon=spec.eps))
    elif spec.form == "layernorm":
        ins = ["x", "g"]
        if spec.bias == "random" or spec.seed % 3:
            ins.append(init("beta", beta.astype(npdt)))
        nodes.append(helper.make_node("LayerNormalization", ins, ["y"], axis=axis, epsilon=spec.eps))
    elif spec.form in ("skip_sln", "skip_ln"):
        domains.append(helper.make_opsetid("com.microsoft", 1))
        inputs.append(helper.make_tensor_value_info("skip", fdt, x_shape))
        ins = ["x", "skip", "g"]
        if spec.form == "skip_ln":
            ins.append(init("beta", beta.astype(npdt)))
        op = "SkipSimplifiedLayerNormalization" if spec.form == "skip_sln" else "SkipLayerNormalization"
        nodes.append(helper.make_node(op, ins, ["y", "", "", "resid"], domain="com.microsoft", epsilon=spec.eps))
        outputs.append(helper.make_tensor_value_info("resid", fdt, None))
    else:
        raise ValueError(spec.form)

    for i, kind in enumerate(spec.consumers):
        n_out = 4 + 3 * i
        w = (rng.standard_normal((k, n_out)) / np.sqrt(k)).astype(npdt)
        out = f"out{i}"
        out_dt = fdt
        if kind == "matmul":
            nodes.append(helper.make_node("MatMul", ["y", init(f"w{i}", w)], [out]))
        elif kind == "matmul_t":
            nodes += [helper.make_node("Transpose", [init(f"w{i}", np.ascontiguousarray(w.T))], [f"w{i}_t"],
                                       perm=[1, 0]),
                      helper.make_node("MatMul", ["y", f"w{i}_t"], [out])]
        elif kind == "matmul_bias":
            nodes += [helper.make_node("MatMul", ["y", init(f"w{i}", w)], [f"mm{i}"]),
                      helper.make_node("Add", [f"mm{i}", init(f"c{i}", rng.standard_normal(n_out).astype(npdt))],
                                       [out])]
        elif kind == "gemm":
            nodes.append(helper.make_node("Gemm", ["y", init(f"w{i}", w),
                                                   init(f"c{i}", rng.standard_normal(n_out).astype(npdt))],
                                          [out], alpha=0.5, beta=2.0))
        elif kind == "gemm_tb":
            nodes.append(helper.make_node("Gemm", ["y", init(f"w{i}", np.ascontiguousarray(w.T))], [out], transB=1))
        elif kind == "cast_matmul":  # Cast between the norm and the MatMul
            other, other_np = (TensorProto.FLOAT, np.float32) if spec.fp16 else (TensorProto.FLOAT16, np.float16)
            nodes += [helper.make_node("Cast", ["y"], [f"yc{i}"], to=other),
                      helper.make_node("MatMul", [f"yc{i}", init(f"w{i}", w.astype(other_np))], [out])]
            out_dt = other
        elif kind == "matmul_castw":  # a Cast on the weight
            other_np = np.float32 if spec.fp16 else np.float16
            nodes += [helper.make_node("Cast", [init(f"w{i}", w.astype(other_np))], [f"w{i}_c"], to=fdt),
                      helper.make_node("MatMul", ["y", f"w{i}_c"], [out])]
        elif kind == "shared":  # two readers of one weight
            init(f"w{i}", w)
            nodes += [helper.make_node("MatMul", ["y", f"w{i}"], [out]),
                      helper.make_node("MatMul", ["y", f"w{i}"], [out + "b"])]
            outputs.append(helper.make_tensor_value_info(out + "b", fdt, None))
        elif kind == "tied":  # lm_head tied to the embedding
            init("emb", rng.standard_normal((VOCAB, k)).astype(npdt))
            inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]))
            nodes += [helper.make_node("Gather", ["emb", "ids"], ["embedded"]),
                      helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0]),
                      helper.make_node("MatMul", ["y", "emb_t"], [out])]
            outputs.append(helper.make_tensor_value_info("embedded", fdt, None))
        outputs.append(helper.make_tensor_value_info(out, out_dt, None))
    if "nonlinear" in spec.extras:
        nodes.append(helper.make_node("Relu", ["y"], ["relu"]))
        outputs.append(helper.make_tensor_value_info("relu", fdt, None))
    if "graph_output" in spec.extras:
        outputs.append(helper.make_tensor_value_info("y", fdt, None))
    if "shape" in spec.extras:
        nodes.append(helper.make_node("Shape", ["y"], ["y_shape"]))
        outputs.append(helper.make_tensor_value_info("y_shape", TensorProto.INT64, None))
    if "second_norm" in spec.extras and spec.consumers[0] not in ("cast_matmul", "matmul_castw"):
        # a second norm whose reader shares the first reader's weight
        first = spec.consumers[0]
        w = "emb" if first == "tied" else "w0"
        inputs.append(helper.make_tensor_value_info("x2", fdt, x_shape))
        init("g2", rng.uniform(0.5, 1.5, size=k).astype(npdt))
        nodes.append(helper.make_node("SimplifiedLayerNormalization", ["x2", "g2"], ["y2"], axis=-1, epsilon=1e-6))
        if first in ("matmul_t", "gemm_tb", "tied"):
            nodes.append(helper.make_node("Transpose", [w], ["w_second"], perm=[1, 0]))
            w = "w_second"
        nodes.append(helper.make_node("MatMul", ["y2", w], ["second_out"]))
        outputs.append(helper.make_tensor_value_info("second_out", fdt, None))
    if "weight_input" in spec.extras:
        first = next(t for t in inits if t.name in ("w0", "emb"))
        inputs.append(helper.make_tensor_value_info(first.name, first.data_type, list(first.dims)))
    graph = helper.make_graph(nodes, "fuzz", inputs, outputs, inits)
    domains[0] = helper.make_opsetid("", opset)
    return helper.make_model(graph, opset_imports=domains, ir_version=10)


def feeds_for(spec: Spec, model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    init_names = {i.name for i in model.graph.initializer}
    feeds = {}
    batch = int(rng.integers(1, 4))
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        t = vi.type.tensor_type
        shape = [d.dim_value if d.dim_value else batch for d in t.shape.dim]
        if t.elem_type == TensorProto.INT64:
            feeds[vi.name] = rng.integers(0, VOCAB, size=shape).astype(np.int64)
        else:
            feeds[vi.name] = (rng.standard_normal(shape) * rng.uniform(0.1, 10)).astype(
                np.float16 if t.elem_type == TensorProto.FLOAT16 else np.float32)
    return feeds


def run(model: onnx.ModelProto | str, feeds) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_same(a: list[np.ndarray], b: list[np.ndarray], fp16: bool, names: list[str]) -> float:
    worst = 0.0
    for name, x, y in zip(names, a, b):
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if x.dtype.kind not in "f":
            assert np.array_equal(x, y), name
            continue
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        assert np.array_equal(np.isfinite(x64), np.isfinite(y64)), name
        finite = np.isfinite(x64)
        scale = float(np.abs(x64[finite]).max()) if finite.any() else 0.0
        err = float(np.abs(x64 - y64)[finite].max()) if finite.any() else 0.0
        rtol, atol = (2e-2, 2e-3) if (fp16 or x.dtype == np.float16) else (1e-4, 1e-5)
        assert err <= atol + rtol * scale, f"{name}: max|err| {err:.3e} vs scale {scale:.3e}"
        worst = max(worst, err / scale if scale else err)
    return worst


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def check(spec: Spec) -> dict:
    model = build(spec)
    with tempfile.TemporaryDirectory(prefix="flashnorm-fuzz-") as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        src = folder / "model.onnx"
        if spec.external:
            onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=64)
        else:
            onnx.save_model(model, str(src))
        before = hashes(folder)

        # 1. the pass, on its own
        ir_model = ir.load(str(src))
        result = FlashNormFoldPass()(ir_model)
        decisions = [d for d in result.report.decisions if d.name != "g2"]
        for d in decisions:
            assert d.status in {"folded", "skipped", "already-weightless"}, d
            if d.status == "skipped":
                assert d.reason.strip(), d
        if spec.last_axis:
            assert len(decisions) == 1, [d.line() for d in decisions]
        assert len(decisions) <= 1
        status = decisions[0].status if decisions else "not found"
        if spec.blocking:
            assert status != "folded", (spec.extras, decisions[0].line())
        assert result.modified == any(d.status == "folded" for d in result.report.decisions)
        # the function: independent inputs, ORT
        folded_path = Path(tmp) / "folded.onnx"
        ir.save(ir_model, str(folded_path), external_data="folded.onnx.data" if spec.external else None)
        names = [o.name for o in model.graph.output]
        worst = 0.0
        for seed in (spec.seed + 1, spec.seed + 2):
            feeds = feeds_for(spec, model, seed)
            worst = max(worst, assert_same(run(str(src), feeds), run(str(folded_path), feeds), spec.low_precision, names))
        assert hashes(folder) == before

        # 2. the public API (verifies in ORT itself)
        out = Path(tmp) / "out" / "model.onnx"
        report = flashnorm_onnx.optimize(src, out)
        assert [d.status for d in report.decisions] == [d.status for d in result.report.decisions]
        assert report.verification is not None and report.verification.passed, report.text()
        assert out.exists() == result.modified
        if out.exists():
            worst = max(worst, assert_same(run(str(src), feeds), run(str(out), feeds), spec.low_precision, names))
        assert hashes(folder) == before
    outcome = {"spec": dataclasses.asdict(spec), "status": status,
               "reason": decisions[0].reason if decisions else "", "max_rel_err": worst}
    if STATS:
        with open(STATS, "a") as f:
            f.write(json.dumps(outcome) + "\n")
    return outcome


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("FLASHNORM_FUZZ_RANDOM"),
          suppress_health_check=[HealthCheck.too_slow], database=None)
@given(specs())
def test_fold_is_equal_or_skipped(spec):
    check(spec)


@pytest.mark.parametrize("extra", sorted(BLOCKING))
@pytest.mark.parametrize("form", FORMS)
def test_blocking_reader_is_always_skipped(form, extra):
    spec = Spec(form=form, fp16=False, eps=1e-6, rank=3, last_axis=True, positive_axis=False, k=8,
                consumers=["matmul", "matmul_t"], extras=[extra], scale="random", bias="random",
                external=False, seed=7)
    outcome = check(spec)
    assert outcome["status"] == "skipped" and outcome["reason"]
