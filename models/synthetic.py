"""Llama-shaped synthetic models of any size, written tensor by tensor.

The whole model is never in memory: each initializer is generated, appended to the external
data file and dropped; the graph proto holds only offsets. The graph is a runnable stand-in
for a decoder (per layer: RMSNorm chain -> q/k/v -> a cheap mixing -> o_proj, residual;
RMSNorm chain -> gate/up -> SiLU-gate -> down, residual; final norm -> lm_head tied to the
embedding through Transpose), so every norm has the consumers of a real Llama.

    python -m models.synthetic OUT.onnx --shape llama3-8b --dtype float16
    python -m models.synthetic OUT.onnx --hidden 1024 --layers 8 --dtype float32
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

SHAPES = {
    # hidden, intermediate, layers, vocab, kv_dim
    "llama3-8b": (4096, 14336, 32, 128256, 1024),
    "llama3-1b": (2048, 8192, 16, 128256, 512),
    "tiny": (256, 688, 4, 1000, 64),
}
DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}


def estimate_bytes(hidden: int, intermediate: int, layers: int, vocab: int, kv_dim: int, dtype: str) -> int:
    itemsize = np.dtype(DTYPES[dtype][0]).itemsize
    per_layer = hidden * (hidden * 2 + kv_dim * 2) + 3 * hidden * intermediate + 2 * hidden
    return itemsize * (layers * per_layer + vocab * hidden + hidden)


def shape_for_bytes(target: int, dtype: str = "float16", hidden: int = 2048) -> tuple[int, int, int, int, int]:
    """A Llama-like shape whose weights total about ``target`` bytes."""
    intermediate, vocab, kv = int(hidden * 2.75) // 16 * 16, 32000, hidden // 4
    layers = 1
    while estimate_bytes(hidden, intermediate, layers + 1, vocab, kv, dtype) <= target:
        layers += 1
    return hidden, intermediate, layers, vocab, kv


class _Writer:
    def __init__(self, path: Path, np_dtype, seed: int):
        self.path = path
        self.data_name = path.name + ".data"
        self.file = open(path.parent / self.data_name, "wb")
        self.offset = 0
        self.np_dtype = np_dtype
        rng = np.random.default_rng(seed)
        # A pool of random values reused with random offsets: fast, and not all alike.
        self.pool = (rng.standard_normal(1 << 22) * 0.02).astype(np_dtype)
        self.rng = rng
        self.initializers: list[onnx.TensorProto] = []

    def add(self, name: str, shape: tuple[int, ...], array: np.ndarray | None = None) -> str:
        count = int(np.prod(shape))
        if array is None:
            out = np.empty(count, dtype=self.np_dtype)
            filled = 0
            while filled < count:
                start = int(self.rng.integers(0, self.pool.size // 2))
                n = min(count - filled, self.pool.size - start)
                out[filled:filled + n] = self.pool[start:start + n]
                filled += n
            array = out
        data = np.ascontiguousarray(array, dtype=self.np_dtype).tobytes()
        self.file.write(data)
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(self.np_dtype))
        tensor.dims.extend(shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.data_name), ("offset", str(self.offset)), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += len(data)
        self.initializers.append(tensor)
        return name

    def close(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def build(
    path: str | os.PathLike,
    hidden: int,
    intermediate: int,
    layers: int,
    vocab: int,
    kv_dim: int,
    dtype: str = "float16",
    seed: int = 0,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np_dtype, onnx_dtype = DTYPES[dtype]
    w = _Writer(path, np_dtype, seed)
    rng = np.random.default_rng(seed + 1)
    nodes = []
    small = [
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [-1]),
    ]

    def norm(x: str, scale: str, tag: str) -> str:
        # the torch.onnx dynamo chain in fp32, wrapped in Casts for fp16
        xf = x
        if dtype != "float32":
            nodes.append(helper.make_node("Cast", [x], [f"{tag}.xf"], to=TensorProto.FLOAT))
            xf = f"{tag}.xf"
        nodes.extend([
            helper.make_node("Pow", [xf, "two"], [f"{tag}.sq"]),
            helper.make_node("ReduceMean", [f"{tag}.sq", "axes"], [f"{tag}.ms"], keepdims=1),
            helper.make_node("Add", [f"{tag}.ms", "eps"], [f"{tag}.mse"]),
            helper.make_node("Sqrt", [f"{tag}.mse"], [f"{tag}.rms"]),
            helper.make_node("Reciprocal", [f"{tag}.rms"], [f"{tag}.inv"]),
            helper.make_node("Mul", [xf, f"{tag}.inv"], [f"{tag}.nf"]),
        ])
        n = f"{tag}.nf"
        if dtype != "float32":
            nodes.append(helper.make_node("Cast", [n], [f"{tag}.n"], to=onnx_dtype))
            n = f"{tag}.n"
        nodes.append(helper.make_node("Mul", [scale, n], [f"{tag}.out"]))
        return f"{tag}.out"

    def linear(x: str, name: str, k: int, n: int) -> str:
        w.add(name, (k, n))
        nodes.append(helper.make_node("MatMul", [x, name], [name + ".out"]))
        return name + ".out"

    emb = w.add("model.embed_tokens.weight", (vocab, hidden))
    nodes.append(helper.make_node("Gather", [emb, "input_ids"], ["h0"]))
    h = "h0"
    for i in range(layers):
        p = f"model.layers.{i}"
        w.add(f"{p}.input_layernorm.weight", (hidden,), rng.uniform(0.5, 1.5, hidden))
        x = norm(h, f"{p}.input_layernorm.weight", f"{p}.ln1")
        q = linear(x, f"{p}.self_attn.q_proj.weight", hidden, hidden)
        k = linear(x, f"{p}.self_attn.k_proj.weight", hidden, kv_dim)
        v = linear(x, f"{p}.self_attn.v_proj.weight", hidden, kv_dim)
        # a cheap stand-in for attention that keeps q, k and v live
        nodes.append(helper.make_node("Add", [k, v], [f"{p}.kv"]))
        nodes.append(helper.make_node("ReduceMean", [f"{p}.kv", "axes"], [f"{p}.kvm"], keepdims=1))
        nodes.append(helper.make_node("Add", [q, f"{p}.kvm"], [f"{p}.attn"]))
        o = linear(f"{p}.attn", f"{p}.self_attn.o_proj.weight", hidden, hidden)
        nodes.append(helper.make_node("Add", [h, o], [f"{p}.h1"]))
        w.add(f"{p}.post_attention_layernorm.weight", (hidden,), rng.uniform(0.5, 1.5, hidden))
        x2 = norm(f"{p}.h1", f"{p}.post_attention_layernorm.weight", f"{p}.ln2")
        gate = linear(x2, f"{p}.mlp.gate_proj.weight", hidden, intermediate)
        up = linear(x2, f"{p}.mlp.up_proj.weight", hidden, intermediate)
        nodes.append(helper.make_node("Sigmoid", [gate], [f"{p}.sg"]))
        nodes.append(helper.make_node("Mul", [gate, f"{p}.sg"], [f"{p}.silu"]))
        nodes.append(helper.make_node("Mul", [f"{p}.silu", up], [f"{p}.act"]))
        down = linear(f"{p}.act", f"{p}.mlp.down_proj.weight", intermediate, hidden)
        nodes.append(helper.make_node("Add", [f"{p}.h1", down], [f"{p}.h2"]))
        h = f"{p}.h2"
    w.add("model.norm.weight", (hidden,), rng.uniform(0.5, 1.5, hidden))
    xf = norm(h, "model.norm.weight", "model.norm")
    nodes.append(helper.make_node("Transpose", [emb], ["lm_head.weight_t"], perm=[1, 0]))
    nodes.append(helper.make_node("MatMul", [xf, "lm_head.weight_t"], ["logits"]))
    w.close()
    graph = helper.make_graph(
        nodes,
        "synthetic_llama",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", onnx_dtype, ["batch", "sequence", vocab])],
        w.initializers + small,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10,
                              producer_name="flashnorm-onnx models.synthetic")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--shape", choices=sorted(SHAPES))
    parser.add_argument("--gb", type=float, help="pick a Llama-like shape of about this many GB")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    args = parser.parse_args(argv)
    if args.shape:
        dims = SHAPES[args.shape]
    elif args.gb:
        dims = shape_for_bytes(int(args.gb * 2**30), args.dtype)
    else:
        dims = (args.hidden, args.intermediate or args.hidden * 3, args.layers, args.vocab, args.hidden // 4)
    out = build(args.output, *dims, dtype=args.dtype)
    print(f"{out}: hidden {dims[0]}, intermediate {dims[1]}, {dims[2]} layers, vocab {dims[3]}, "
          f"{estimate_bytes(*dims, args.dtype) / 2**30:.2f} GB {args.dtype}")


if __name__ == "__main__":
    main()
