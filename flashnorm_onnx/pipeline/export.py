"""From a transformers checkpoint to a folded, verified ONNX folder that runtimes load.

    export(PATH_OR_ID, OUTDIR, exporter="optimum"|"dynamo", task=..., dtype="fp32"|"fp16")

1. resolve the checkpoint: a local folder, or a hub id found in the local Hugging Face cache
   (this tool never downloads);
2. export it with optimum-onnx's exporter or torch.onnx (dynamo) into a staging folder;
3. ``optimize`` the exported model into OUTDIR (fold + ONNX Runtime verification);
4. copy the config and tokenizer files a runtime needs (optimum's ORTModel, genai) into OUTDIR
   and write ``flashnorm_report.json``.

Encoder-decoder tasks (:data:`SEQ2SEQ_TASKS`: T5, BART, Whisper ...; optimum only) export what
optimum writes: ``encoder_model.onnx``, ``decoder_model.onnx`` and, with past,
``decoder_with_past_model.onnx`` and ``decoder_model_merged.onnx`` (both decoders as the branches of
an ``If`` on ``use_cache_branch``, reading one set of weights). Step 3 is then folder mode,
``optimize(STAGING_DIR, OUTDIR)``: every model of the folder is folded and verified (nothing is
published unless all pass), the merged decoder's norms inside its branches included (a weight both
branches read is folded once, not copied), and its companions (config, generation config,
tokenizer, preprocessor) are copied. The staging folder is then a sibling of OUTDIR, not inside it
(folder mode refuses an input folder inside its output folder).

Which file runtimes load: optimum's ``ORTModelForSeq2SeqLM`` / ``ORTModelForSpeechSeq2Seq`` load
the encoder and ``decoder_model_merged.onnx`` when it is there (their default, ``use_merged=None``),
else ``decoder_model.onnx`` and ``decoder_with_past_model.onnx`` (``use_merged=False``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from flashnorm_onnx.errors import FlashNormError, InputModelError, OutputPathError
from flashnorm_onnx.pipeline.report import FoldReport

if TYPE_CHECKING:
    from flashnorm_onnx.pipeline.report import FolderReport

logger = logging.getLogger(__name__)

#: Encoder-decoder tasks (optimum's names): text-to-text (T5, BART, ...) and speech recognition
#: (Whisper, ...); -with-past adds decoder_with_past_model.onnx (the KV-cache decoder).
SEQ2SEQ_TASKS = ("text2text-generation", "text2text-generation-with-past",
                 "automatic-speech-recognition", "automatic-speech-recognition-with-past")
TASKS = ("text-generation", "text-generation-with-past", "feature-extraction", *SEQ2SEQ_TASKS)
RUNTIME_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json", "chat_template.jinja", "sentence_bert_config.json", "modules.json",
    "preprocessor_config.json", "spiece.model", "normalizer.json",
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
    return out if task in SEQ2SEQ_TASKS else out / "model.onnx"


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


def _staging_folder(outdir: Path, beside: bool) -> tempfile.TemporaryDirectory:
    """The exporter's temporary folder: inside OUTDIR, or (``beside``: folder mode refuses an input
    folder inside its output folder) a hidden sibling of it, else the system's temporary folder
    when OUTDIR's parent cannot take one."""
    if not beside:
        return tempfile.TemporaryDirectory(prefix=".flashnorm-export-", dir=outdir)
    resolved = outdir.resolve()  # "." has no name and is its own parent
    try:
        return tempfile.TemporaryDirectory(prefix=f".{resolved.name}.flashnorm-export-", dir=resolved.parent)
    except OSError:
        return tempfile.TemporaryDirectory(prefix="flashnorm-export-")


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
) -> FoldReport | FolderReport:
    say = status or (lambda msg: logger.info(msg))
    if task not in TASKS:
        raise ExportFailed(f"unknown task '{task}' (choose from {', '.join(TASKS)})")
    seq2seq = task in SEQ2SEQ_TASKS
    if seq2seq and exporter == "dynamo":
        raise ExportFailed(f"--exporter dynamo does not export encoder-decoder models (--task {task}): "
                           "use --exporter optimum")
    src = resolve_checkpoint(path_or_id)
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OutputPathError(f"{outdir}: output is not a folder (export writes a folder)")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent is a file, no permission, read-only file system
        raise OutputPathError(f"{outdir}: cannot create the output folder ({e.strerror or e})") from e
    with _staging_folder(outdir, beside=seq2seq) as tmp:
        staging = Path(tmp)
        say(f"exporting {src} with {exporter} ({task}, {dtype}) ...")
        exported = _run_exporter(exporter, src, staging, task, dtype, opset)
        say("folding and verifying ...")
        report = _fold_export(exported, src, staging, outdir, seq2seq, untie, verify)
    report.notes.append(f"exported with {exporter} ({task}, {dtype}) from {src}")
    report.write_json(outdir / "flashnorm_report.json")
    return report


def _run_exporter(exporter: str, src: Path, staging: Path, task: str, dtype: str, opset: int | None) -> Path:
    """The checkpoint exported into ``staging``; an exporter's failure is one line (exit 8)."""
    try:
        if exporter == "optimum":
            return _export_optimum(src, staging, task, dtype, opset)
        if exporter == "dynamo":
            return _export_dynamo(src, staging, task, dtype, opset)
        raise ExportFailed(f"unknown exporter '{exporter}' (optimum or dynamo)")
    except FlashNormError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportFailed(f"{exporter} export of {src} failed: {first[:300]}") from e


def _fold_export(exported: Path, src: Path, staging: Path, outdir: Path, seq2seq: bool, untie: bool,
                 verify: bool):
    """The export folded and verified into ``outdir``, with the files its runtime reads beside it."""
    from flashnorm_onnx.pipeline.api import optimize

    if seq2seq:
        # folder mode: every model of the export folded and verified, the companions copied
        report = optimize(exported, outdir, untie=untie, verify=verify, report_path=outdir / "flashnorm_report.json")
        report.model = str(src)  # the folder's heading names the checkpoint, not the staging folder
        missing = [name for name in RUNTIME_FILES if (src / name).exists() and not (outdir / name).exists()]
        for name in missing:  # what optimum did not save beside the models
            shutil.copy2(src / name, outdir / name)
        return report
    report = optimize(exported, outdir / "model.onnx", untie=untie, verify=verify,
                      report_path=outdir / "flashnorm_report.json", force_write=True)
    for name in RUNTIME_FILES:
        for candidate in (staging / name, src / name):
            if candidate.exists():
                shutil.copy2(candidate, outdir / name)
                break
    return report
