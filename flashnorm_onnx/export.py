"""From a transformers checkpoint to a folded, verified ONNX folder that runtimes load.

    export(PATH_OR_ID, OUTDIR, exporter="optimum"|"dynamo", task=..., dtype="fp32"|"fp16")

1. resolve the checkpoint: a local folder, or a hub id found in the local Hugging Face cache
   (this tool never downloads);
2. export it with optimum-onnx's exporter or torch.onnx (dynamo) into a staging folder;
3. ``optimize`` the exported model into OUTDIR (fold + ONNX Runtime verification);
4. copy the config and tokenizer files a runtime needs (optimum's ORTModel, genai) into OUTDIR
   and write ``flashnorm_report.json``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from flashnorm_onnx.errors import FlashNormError, InputModelError, OutputPathError
from flashnorm_onnx.report import FoldReport

logger = logging.getLogger(__name__)

TASKS = ("text-generation", "text-generation-with-past", "feature-extraction")
RUNTIME_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json", "chat_template.jinja", "sentence_bert_config.json", "modules.json",
)


class ExportFailed(FlashNormError):
    exit_code = 8


def resolve_checkpoint(path_or_id: str) -> Path:
    p = Path(path_or_id)
    if p.exists():
        if not (p / "config.json").exists():
            raise InputModelError(f"{p}: not a transformers checkpoint folder (no config.json)")
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_id, local_files_only=True))
    except Exception:
        raise InputModelError(
            f"'{path_or_id}' is neither a local folder nor in the local Hugging Face cache, and "
            "flashnorm-onnx never downloads: pass a local checkpoint folder"
        ) from None


def exportable(model, output: str = "logits"):
    """``model`` as a module taking (input_ids, attention_mask) and returning one tensor, no cache."""
    import torch

    class Exportable(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            result = self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return getattr(result, output)

    return Exportable(model).eval()


def _export_optimum(src: Path, out: Path, task: str, dtype: str, opset: int | None) -> Path:
    from optimum.exporters.onnx import main_export

    kwargs = {"model_name_or_path": str(src), "output": str(out), "task": task, "device": "cpu",
              "local_files_only": True}
    if opset:
        kwargs["opset"] = opset
    if dtype == "fp16":
        kwargs["dtype"] = "fp16"
    main_export(**kwargs)
    return out / "model.onnx"


def _export_dynamo(src: Path, out: Path, task: str, dtype: str, opset: int | None) -> Path:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    if task == "text-generation-with-past":
        raise ExportFailed("--exporter dynamo exports without a KV cache: use --task text-generation, "
                           "or --exporter optimum for text-generation-with-past")
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    cls = AutoModelForCausalLM if task == "text-generation" else AutoModel
    model = cls.from_pretrained(str(src), dtype=torch_dtype, local_files_only=True).eval()

    ids = torch.ones((2, 8), dtype=torch.long)
    mask = torch.ones((2, 8), dtype=torch.long)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(
        exportable(model, "logits" if task == "text-generation" else "last_hidden_state"),
        (ids, mask), str(path), dynamo=True, opset_version=opset,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits" if task == "text-generation" else "last_hidden_state"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    model.config.save_pretrained(str(out))
    return path


def export(
    path_or_id: str,
    outdir: str | Path,
    *,
    exporter: str = "optimum",
    task: str = "text-generation-with-past",
    dtype: str = "fp32",
    opset: int | None = None,
    untie: bool = True,
    verify: bool = True,
    status: Callable[[str], None] | None = None,
) -> FoldReport:
    from flashnorm_onnx.api import optimize

    say = status or (lambda msg: logger.info(msg))
    if task not in TASKS:
        raise ExportFailed(f"unknown task '{task}' (choose from {', '.join(TASKS)})")
    src = resolve_checkpoint(path_or_id)
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OutputPathError(f"{outdir}: output is not a folder (export writes a folder)")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent is a file, no permission, read-only file system
        raise OutputPathError(f"{outdir}: cannot create the output folder ({e.strerror or e})") from e
    with tempfile.TemporaryDirectory(prefix=".flashnorm-export-", dir=outdir) as tmp:
        staging = Path(tmp)
        say(f"exporting {src} with {exporter} ({task}, {dtype}) ...")
        try:
            if exporter == "optimum":
                exported = _export_optimum(src, staging, task, dtype, opset)
            elif exporter == "dynamo":
                exported = _export_dynamo(src, staging, task, dtype, opset)
            else:
                raise ExportFailed(f"unknown exporter '{exporter}' (optimum or dynamo)")
        except FlashNormError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportFailed(f"{exporter} export of {src} failed: {first[:300]}") from e
        say("folding and verifying ...")
        report = optimize(exported, outdir / "model.onnx", untie=untie, verify=verify,
                          report_path=outdir / "flashnorm_report.json", force_write=True)
        for name in RUNTIME_FILES:
            for candidate in (staging / name, src / name):
                if candidate.exists():
                    shutil.copy2(candidate, outdir / name)
                    break
    report.notes.append(f"exported with {exporter} ({task}, {dtype}) from {src}")
    report.write_json(outdir / "flashnorm_report.json")
    return report
