"""Small hand-built ONNX graphs with one normalization in a chosen form and chosen readers.

They reproduce, node for node, the forms catalogued in shared/notes/onnx-forms.md, so each
form and each consumer kind is tested in isolation and fast; whole exported models are in
models/fixtures.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

K = 16
EPS = 1e-6

LN_FORMS = ["layernorm", "layernorm_nobias", "ln_chain", "skip_ln"]
RMS_FORMS = ["dynamo", "legacy", "legacy17", "fp16_chain", "mulxx_div", "pow_neg_half", "rmsnorm23", "sln", "skip_sln"]


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def build(
    form: str = "dynamo",
    consumers: tuple[str, ...] = ("matmul", "matmul"),
    extra: tuple[str, ...] = (),
    seed: int = 0,
    scale: np.ndarray | None = None,
    k: int = K,
) -> onnx.ModelProto:
    """One norm over x[batch, seq, k] (x[batch, k] for Gemm readers) and its readers.

    consumers: "matmul" (W [k, n]), "matmul_t" (Transpose(W [n, k])), "gemm", "gemm_tb",
    "fused_matmul" / "fused_matmul_tb" (com.microsoft.FusedMatMul, alpha 0.75, transB 0 / 1),
    "fused_matmul_ta" (FusedMatMul with transA=1 over 5 tokens: refused),
    "scaled_matmul" (Mul(y, constant scalar) -> MatMul), "vector_mul_matmul" (Mul by a [k] vector),
    "moe" (Reshape to rows -> router MatMul, and Unsqueeze -> Gather(axis 1) of rows -> expert MatMul),
    "cast_matmul" (Cast(y) -> MatMul), "matmul_castw" (MatMul(y, Cast(W fp16))),
    "tied" (Transpose(E) also read by a Gather embedding), "shared" (two readers, one W).
    extra: "residual" (y also feeds Add(y, x)), "graph_output" (y is an output), "shape"
    (Shape(y) is an output), "weight_input" (first weight is a graph input).
    """
    rng = np.random.default_rng(seed)
    fp16 = form == "fp16_chain"
    gemm = any(c.startswith("gemm") for c in consumers)
    xdt = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    npdt = np.float16 if fp16 else np.float32
    x_shape = ["batch", k] if gemm else ["batch", "seq", k]
    nodes, inits, inputs, outputs = [], [], [helper.make_tensor_value_info("x", xdt, x_shape)], []
    g = scale if scale is not None else rng.uniform(0.5, 1.5, size=k)
    opset = {"legacy17": 17, "rmsnorm23": 23}.get(form, 18)
    ms_opset = False

    def const(name, value, dtype=np.float32):
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype=dtype), name + "_t")))

    if form in ("dynamo", "mulxx_div", "pow_neg_half"):
        inits += [_init("g", g.astype(np.float32)), _init("eps", np.array(EPS, np.float32)),
                  _init("two", np.array(2.0, np.float32)), _init("axes", np.array([-1], np.int64))]
        if form == "mulxx_div":
            nodes.append(helper.make_node("Mul", ["x", "x"], ["sq"]))
        else:
            nodes.append(helper.make_node("Pow", ["x", "two"], ["sq"]))
        nodes += [helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
                  helper.make_node("Add", ["ms", "eps"], ["mse"])]
        if form == "dynamo":
            nodes += [helper.make_node("Sqrt", ["mse"], ["rms"]), helper.make_node("Reciprocal", ["rms"], ["inv"]),
                      helper.make_node("Mul", ["x", "inv"], ["n"])]
        elif form == "mulxx_div":
            nodes += [helper.make_node("Sqrt", ["mse"], ["rms"]), helper.make_node("Div", ["x", "rms"], ["n"])]
        else:
            inits.append(_init("mhalf", np.array(-0.5, np.float32)))
            nodes += [helper.make_node("Pow", ["mse", "mhalf"], ["inv"]), helper.make_node("Mul", ["inv", "x"], ["n"])]
        nodes.append(helper.make_node("Mul", ["n", "g"] if form == "mulxx_div" else ["g", "n"], ["y"]))
    elif form in ("legacy", "legacy17", "fp16_chain"):
        inits.append(_init("g", g.astype(npdt)))
        nodes.append(helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
        const("two", 2.0)
        nodes.append(helper.make_node("Pow", ["xf", "two"], ["sq"]))
        if form == "legacy17":
            nodes.append(helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1))
        else:
            const("axes", [-1], np.int64)
            nodes.append(helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1))
        const("eps", EPS)
        const("one", 1.0)
        nodes += [helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"]),
                  helper.make_node("Div", ["one", "rms"], ["inv"]), helper.make_node("Mul", ["xf", "inv"], ["nf"]),
                  helper.make_node("Cast", ["nf"], ["n"], to=xdt), helper.make_node("Mul", ["g", "n"], ["y"])]
    elif form == "rmsnorm23":
        inits.append(_init("g", g.astype(np.float32)))
        nodes.append(helper.make_node("RMSNormalization", ["x", "g"], ["y"], axis=-1, epsilon=EPS))
    elif form == "sln":
        inits.append(_init("g", g.astype(np.float32)))
        nodes.append(helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["y"], axis=-1, epsilon=EPS))
    elif form == "skip_sln":
        ms_opset = True
        inputs.append(helper.make_tensor_value_info("skip", xdt, x_shape))
        inits.append(_init("g", g.astype(np.float32)))
        nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "g"], ["y", "", "", "resid"],
                                      domain="com.microsoft", epsilon=EPS))
        outputs.append(helper.make_tensor_value_info("resid", xdt, None))
    elif form in ("layernorm", "layernorm_nobias"):
        opset = max(opset, 17)
        beta = rng.standard_normal(k).astype(np.float32) * 0.5
        inits += [_init("g", g.astype(np.float32)), _init("beta", beta)]
        ins = ["x", "g"] + (["beta"] if form == "layernorm" else [])
        nodes.append(helper.make_node("LayerNormalization", ins, ["y"], axis=-1, epsilon=EPS))
    elif form == "ln_chain":
        beta = rng.standard_normal(k).astype(np.float32) * 0.5
        inits += [_init("g", g.astype(np.float32)), _init("beta", beta), _init("eps", np.array(EPS, np.float32)),
                  _init("two", np.array(2.0, np.float32)), _init("axes", np.array([-1], np.int64))]
        nodes += [helper.make_node("ReduceMean", ["x", "axes"], ["mu"], keepdims=1),
                  helper.make_node("Sub", ["x", "mu"], ["d"]),
                  helper.make_node("Pow", ["d", "two"], ["sq"]),
                  helper.make_node("ReduceMean", ["sq", "axes"], ["var"], keepdims=1),
                  helper.make_node("Add", ["var", "eps"], ["vare"]),
                  helper.make_node("Sqrt", ["vare"], ["std"]),
                  helper.make_node("Div", ["d", "std"], ["n"]),
                  helper.make_node("Mul", ["n", "g"], ["gn"]),
                  helper.make_node("Add", ["gn", "beta"], ["y"])]
    elif form == "skip_ln":
        ms_opset = True
        beta = rng.standard_normal(k).astype(np.float32) * 0.5
        inputs.append(helper.make_tensor_value_info("skip", xdt, x_shape))
        inits += [_init("g", g.astype(np.float32)), _init("beta", beta)]
        nodes.append(helper.make_node("SkipLayerNormalization", ["x", "skip", "g", "beta"], ["y", "", "", "resid"],
                                      domain="com.microsoft", epsilon=EPS))
        outputs.append(helper.make_tensor_value_info("resid", xdt, None))
    else:
        raise ValueError(form)

    y = "y"
    for i, kind in enumerate(consumers):
        n_out = 8 + 4 * i
        w = (rng.standard_normal((k, n_out)) / np.sqrt(k)).astype(npdt)
        out = f"out{i}"
        if kind == "matmul":
            inits.append(_init(f"w{i}", w))
            nodes.append(helper.make_node("MatMul", [y, f"w{i}"], [out]))
        elif kind == "matmul_t":
            inits.append(_init(f"w{i}", np.ascontiguousarray(w.T)))
            nodes += [helper.make_node("Transpose", [f"w{i}"], [f"w{i}_t"], perm=[1, 0]),
                      helper.make_node("MatMul", [y, f"w{i}_t"], [out])]
        elif kind == "matmul_bias":
            inits += [_init(f"w{i}", w), _init(f"c{i}", rng.standard_normal(n_out).astype(npdt))]
            nodes += [helper.make_node("MatMul", [y, f"w{i}"], [f"mm{i}"]),
                      helper.make_node("Add", [f"mm{i}", f"c{i}"], [out])]
        elif kind == "attention":  # com.microsoft.Attention with packed qkv weights [k, 3k]
            ms_opset = True
            inits += [_init(f"w{i}", (rng.standard_normal((k, 3 * k)) / np.sqrt(k)).astype(npdt)),
                      _init(f"c{i}", rng.standard_normal(3 * k).astype(npdt))]
            nodes.append(helper.make_node("Attention", [y, f"w{i}", f"c{i}"], [out], domain="com.microsoft",
                                          num_heads=2))
        elif kind == "gemm":
            inits += [_init(f"w{i}", w), _init(f"c{i}", rng.standard_normal(n_out).astype(npdt))]
            nodes.append(helper.make_node("Gemm", [y, f"w{i}", f"c{i}"], [out], alpha=0.5, beta=2.0))
        elif kind == "gemm_tb":
            inits.append(_init(f"w{i}", np.ascontiguousarray(w.T)))
            nodes.append(helper.make_node("Gemm", [y, f"w{i}"], [out], transB=1))
        elif kind in ("fused_matmul", "fused_matmul_tb"):  # com.microsoft.FusedMatMul, alpha != 1
            ms_opset = True
            tb = kind == "fused_matmul_tb"
            inits.append(_init(f"w{i}", np.ascontiguousarray(w.T) if tb else w))
            nodes.append(helper.make_node("FusedMatMul", [y, f"w{i}"], [out], domain="com.microsoft",
                                          alpha=0.75, transB=int(tb)))
        elif kind == "fused_matmul_ta":  # y^T @ W: mixes tokens, not channels (W is [seq=5, n])
            ms_opset = True
            inits.append(_init(f"w{i}", (rng.standard_normal((5, n_out)) / np.sqrt(5)).astype(npdt)))
            nodes.append(helper.make_node("FusedMatMul", [y, f"w{i}"], [out], domain="com.microsoft", transA=1))
        elif kind == "moe":  # Mixtral (legacy export): router on the rows, one expert on selected rows
            inits += [_init(f"shape{i}", np.array([-1, k], np.int64)), _init(f"axes{i}", np.array([0], np.int64)),
                      _init(f"rows{i}", np.array([0, 2, 1], np.int64)), _init(f"router{i}", w[:, :4].copy()),
                      _init(f"w{i}", w)]
            nodes += [helper.make_node("Reshape", [y, f"shape{i}"], [f"flat{i}"]),
                      helper.make_node("MatMul", [f"flat{i}", f"router{i}"], [f"logits{i}"]),
                      helper.make_node("Unsqueeze", [f"flat{i}", f"axes{i}"], [f"u{i}"]),
                      helper.make_node("Gather", [f"u{i}", f"rows{i}"], [f"sel{i}"], axis=1),
                      helper.make_node("Reshape", [f"sel{i}", f"shape{i}"], [f"rows_{i}"]),
                      helper.make_node("MatMul", [f"rows_{i}", f"w{i}"], [out])]
            outputs.append(helper.make_tensor_value_info(f"logits{i}", xdt, None))
        elif kind == "scaled_matmul":  # T5: Mul(y, d_model**-0.5) -> MatMul
            inits += [_init(f"w{i}", w), _init(f"s{i}", np.array(k ** -0.5, dtype=npdt))]
            nodes += [helper.make_node("Mul", [y, f"s{i}"], [f"ys{i}"]),
                      helper.make_node("MatMul", [f"ys{i}", f"w{i}"], [out])]
        elif kind == "vector_mul_matmul":  # Mul by a per-channel vector: not a scalar, refused
            inits += [_init(f"w{i}", w), _init(f"s{i}", rng.uniform(0.5, 1.5, k).astype(npdt))]
            nodes += [helper.make_node("Mul", [y, f"s{i}"], [f"ys{i}"]),
                      helper.make_node("MatMul", [f"ys{i}", f"w{i}"], [out])]
        elif kind == "cast_matmul":
            inits.append(_init(f"w{i}", w.astype(np.float16)))
            nodes += [helper.make_node("Cast", [y], [f"y16_{i}"], to=TensorProto.FLOAT16),
                      helper.make_node("MatMul", [f"y16_{i}", f"w{i}"], [out])]
        elif kind == "matmul_castw":
            inits.append(_init(f"w{i}", w.astype(np.float16)))
            nodes += [helper.make_node("Cast", [f"w{i}"], [f"w{i}_f"], to=xdt),
                      helper.make_node("MatMul", [y, f"w{i}_f"], [out])]
        elif kind == "tied":
            vocab = 10
            inits.append(_init("emb", (rng.standard_normal((vocab, k))).astype(npdt)))
            inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]))
            nodes += [helper.make_node("Gather", ["emb", "ids"], ["embedded"]),
                      helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0]),
                      helper.make_node("MatMul", [y, "emb_t"], [out])]
            outputs.append(helper.make_tensor_value_info("embedded", xdt, None))
        elif kind == "shared":
            inits.append(_init("w_shared", w))
            nodes += [helper.make_node("MatMul", [y, "w_shared"], [out]),
                      helper.make_node("MatMul", [y, "w_shared"], [out + "b"])]
            outputs.append(helper.make_tensor_value_info(out + "b", xdt, None))
        else:
            raise ValueError(kind)
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT16 if kind == "cast_matmul" else xdt, None))
    if "residual" in extra:
        nodes.append(helper.make_node("Add", [y, "x"], ["resid_out"]))
        outputs.append(helper.make_tensor_value_info("resid_out", xdt, None))
    if "graph_output" in extra:
        outputs.append(helper.make_tensor_value_info(y, xdt, None))
    if "shape" in extra:
        nodes.append(helper.make_node("Shape", [y], ["y_shape"]))
        outputs.append(helper.make_tensor_value_info("y_shape", TensorProto.INT64, None))
    if "weight_input" in extra:
        w0 = next(i for i in inits if i.name == "w0")
        inputs.append(helper.make_tensor_value_info("w0", w0.data_type, list(w0.dims)))
    graph = helper.make_graph(nodes, f"norm_{form}", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset)]
    if ms_opset:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10, producer_name="flashnorm-tests")
    return model


def feeds_for(model: onnx.ModelProto, seed: int = 1, batch: int = 2, seq: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    init_names = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        t = vi.type.tensor_type
        shape = [d.dim_value if d.dim_value else (batch if d.dim_param == "batch" else seq) for d in t.shape.dim]
        if t.elem_type == TensorProto.INT64:
            feeds[vi.name] = rng.integers(0, 10, size=shape).astype(np.int64)
        else:
            dtype = np.float16 if t.elem_type == TensorProto.FLOAT16 else np.float32
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run(model_or_path, feeds) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def save(model: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    """Write a test model, its tensors (over 64 bytes) in one external data file if asked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=64)
    else:
        onnx.save_model(model, str(path))
    return path


def set_location(path: Path, location: str) -> None:
    """Point every external tensor of the model file at ``location`` (the data is not moved)."""
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    Path(path).write_bytes(proto.SerializeToString())


def tied_decoder(k: int = 16, vocab: int = 32, seed: int = 0) -> onnx.ModelProto:
    """A one-layer decoder with a tied embedding, as dynamo writes one: ``Gather(E, ids)`` ->
    RMSNorm(g1) -> q = MatMul(Wq) -> residual Add(h, MatMul(q, Wo)) -> RMSNorm(g2) ->
    logits = MatMul(., Transpose(E)). ``Wo`` and the residual are outside any fold; ``E`` is
    read by the embedding and, transposed, by the lm_head."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("E", (rng.standard_normal((vocab, k))).astype(np.float32)),
        _init("Wq", (rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32)),
        _init("Wo", (rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32)),
        _init("eps", np.array(EPS, np.float32)), _init("two", np.array(2.0, np.float32)),
        _init("axes", np.array([-1], np.int64)),
    ]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"], name="embed")]

    def rms(x: str, out: str, tag: str) -> None:
        inits.append(_init(f"g{tag}", rng.uniform(0.5, 1.5, size=k).astype(np.float32)))
        nodes.extend([
            helper.make_node("Pow", [x, "two"], [f"sq{tag}"]),
            helper.make_node("ReduceMean", [f"sq{tag}", "axes"], [f"ms{tag}"], keepdims=1),
            helper.make_node("Add", [f"ms{tag}", "eps"], [f"mse{tag}"]),
            helper.make_node("Sqrt", [f"mse{tag}"], [f"rms{tag}"]),
            helper.make_node("Reciprocal", [f"rms{tag}"], [f"inv{tag}"]),
            helper.make_node("Mul", [x, f"inv{tag}"], [f"n{tag}"]),
            helper.make_node("Mul", [f"g{tag}", f"n{tag}"], [out]),
        ])

    rms("h", "y1", "1")
    nodes += [helper.make_node("MatMul", ["y1", "Wq"], ["q"], name="q_proj"),
              helper.make_node("MatMul", ["q", "Wo"], ["o"], name="o_proj"),
              helper.make_node("Add", ["h", "o"], ["h2"], name="residual")]
    rms("h2", "y2", "2")
    nodes += [helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0], name="lm_head_t"),
              helper.make_node("MatMul", ["y2", "Et"], ["logits"], name="lm_head")]
    graph = helper.make_graph(
        nodes, "tied_decoder", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
