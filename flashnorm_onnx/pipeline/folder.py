"""Folder mode: every ONNX model of a model folder folded and verified, its companions copied.

An optimum export holds several models side by side (``encoder_model.onnx``,
``decoder_model.onnx``, ``decoder_with_past_model.onnx``), an onnxruntime-genai folder one or
several (vision / speech / embedding models of multimodal folders), beside the files the runtime
reads (``genai_config.json``, ``config.json``, tokenizer files). ``optimize IN_DIR -o OUT_DIR``
writes OUT_DIR so that the runtime loads it exactly as it loaded IN_DIR::

    refuse bad paths (before any work) -> find every model and companion -> check every model
        -> fold + stage + verify each model (nothing visible yet)
        -> copy the companions -> publish the models one by one (report written before the last)

If any model fails (verification or an error), every staged model is abandoned and nothing
is published. Companion rules (see :func:`_scan`): links are never followed out of the folder
nor into a linked folder (a link inside the folder is recreated as a link); special files,
hidden names, the models themselves and the input's external data are not copied; a file that
looks like external data but that no model references (a stale ``model.onnx.data`` beside
optimum's ``model.onnx_data``) is not copied either, and no companion may overwrite a file
the run writes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable

from flashnorm_onnx.io import model_io
from flashnorm_onnx.io import publish
from flashnorm_onnx.errors import first_line, FlashNormError, InputModelError, OutputPathError, VerificationFailed
from flashnorm_onnx.pipeline.options import FoldOptions
from flashnorm_onnx.pipeline.report import FolderReport, FoldReport

logger = logging.getLogger(__name__)

#: Keep the parsed protobuf of a checked model until it is folded only when it is this small;
#: larger ones are parsed again when their turn comes (so N models are not all held in memory).
KEEP_PROTO_BYTES = 64 << 20


@dataclasses.dataclass
class _Plan:
    """What a scan of the input folder found (paths relative to the folder, POSIX style)."""

    models: list[str] = dataclasses.field(default_factory=list)
    dirs: list[str] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)
    links: list[str] = dataclasses.field(default_factory=list)
    specials: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    hidden: list[str] = dataclasses.field(default_factory=list)


def _scan(root: Path) -> _Plan:
    """Walk ``root`` without following any link: a linked folder is listed as a link, not entered."""
    plan = _Plan()

    def walk(rel_dir: str) -> None:
        here = root / rel_dir if rel_dir else root
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise InputModelError(f"{here}: cannot read the folder ({first_line(e)})") from None
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            if e.name.startswith("."):
                plan.hidden.append(rel)
            elif e.is_symlink():
                plan.links.append(rel)
            elif e.is_dir(follow_symlinks=False):
                plan.dirs.append(rel)
                walk(rel)
            elif e.is_file(follow_symlinks=False):
                (plan.models if e.name.endswith(".onnx") else plan.files).append(rel)
            else:
                try:
                    mode = e.stat(follow_symlinks=False).st_mode
                except OSError:
                    mode = 0
                plan.specials.append((rel, model_io.file_kind(mode)))

    walk("")
    return plan


def looks_like_data(name: str) -> bool:
    """A name external data files have (``model.onnx.data``, optimum's ``model.onnx_data``,
    ``NAME.<8 hex>.data``)."""
    return name.endswith((".data", "_data"))


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


# -- the folder run ------------------------------------------------------------------------------


def optimize_folder(folder: Path, output: str | os.PathLike | None, options: FoldOptions, *,
                    report_path: str | os.PathLike | None = None) -> FolderReport:
    """Fold and verify every ``*.onnx`` model of ``folder`` into the folder ``output``; copy the
    companions; publish only when every model verified. See the module docstring.

    ``force_write`` is implied: a model with nothing to fold is written too (re-serialized, same
    function), because the runtime needs every model of the folder. The stages of each model are
    those of one model file (:func:`~flashnorm_onnx.pipeline.model.optimize_file`), its output left
    staged; then one publish for the whole folder."""
    options = options.replace(force_write=True)  # always on in folder mode
    folder = Path(folder)
    root = folder.resolve()
    out_dir = _check_output_folder(folder, root, output)
    plan, infos, targets = _check_models(folder, out_dir)  # before anything is written
    report = FolderReport(model=str(folder), output=str(out_dir))
    companions = _plan_companions(folder, root, out_dir, plan, infos, targets, report.notes)
    report_file = _check_report(report_path, folder, root, out_dir, infos, targets, companions)
    staged: list[tuple[str, FoldReport]] = []
    copied = _Copied()
    try:
        for rel in plan.models:  # fold, stage and verify each model; nothing is visible yet
            staged.append((rel, _fold_one(rel, infos[rel], targets[rel], options, report, report_file)))
        # every model verified: companions first, then the models, the report before the last one
        _copy_companions(folder, out_dir, companions, copied)
        if copied.files or copied.links:
            report.notes.append(f"copied {len(copied.files)} companion file(s)"
                                + (f" and {len(copied.links)} link(s)" if copied.links else "") + f" into {out_dir}")
    except BaseException:
        copied.undo()
        for _, r in reversed(staged):
            r.staged.abandon()
            r.staged = None
        raise
    _publish(staged, targets, report, report_file, copied)
    return report


def _check_models(folder: Path, out_dir: Path) -> tuple["_Plan", dict[str, model_io.InputInfo], dict[str, Path]]:
    """What the folder holds, every model checked as an input and its output path as an output."""
    plan = _scan(folder)
    if plan.hidden:
        logger.debug("hidden names skipped: %s", ", ".join(plan.hidden))
    if not plan.models:
        raise InputModelError(f"{folder}: folder holds no .onnx model")
    infos: dict[str, model_io.InputInfo] = {}
    targets: dict[str, Path] = {}
    for rel in plan.models:
        info = model_io.check_input(folder / rel)
        if info.proto_bytes > KEEP_PROTO_BYTES:
            info.proto = None  # parsed again when folded
        infos[rel] = info
        _no_link_below(out_dir, out_dir / rel)
        targets[rel] = model_io.check_output(out_dir / rel, info)
    return plan, infos, targets


def _fold_one(rel: str, info: model_io.InputInfo, target: Path, options: FoldOptions, report: FolderReport,
              report_file: Path | None) -> FoldReport:
    """One model of the folder through its stages, its verified output left staged; a failure is
    recorded in the folder's report (written) before it is raised."""
    from flashnorm_onnx.pipeline.model import optimize_file

    logger.info("folding %s", rel)
    out_dir = report.output
    try:
        model_report = optimize_file(info, target, options.replace(progress=_progress_for(options.progress, rel)),
                                     publish_output=False, report_path=None)
    except VerificationFailed as e:
        if e.report is not None:
            report.models[rel] = e.report
        report.notes.append(f"verification failed in {rel}: nothing written to {out_dir}")
        _write_report(report, report_file)
        raise VerificationFailed(f"{rel}: {e}", report=report) from e
    except FlashNormError as e:
        report.notes.append(f"{rel}: {e}; nothing written to {out_dir}")
        _write_report(report, report_file)
        raise
    report.models[rel] = model_report
    if model_report.folded == 0 and not model_report.quantization:
        model_report.notes.append(
            "nothing to fold: written anyway, re-serialized (the runtime needs every model of the folder)")
    return model_report


def _check_output_folder(folder: Path, root: Path, output) -> Path:
    if output is None:
        raise OutputPathError(f"{folder}: the input is a folder: name an output folder with -o")
    out_dir = Path(output)
    if os.path.lexists(out_dir) and not out_dir.exists():
        raise OutputPathError(f"{out_dir}: the output folder is a broken link; remove it or choose another")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputPathError(f"{out_dir}: the input is a folder, so the output must be a folder (it is a file)")
    model_io.check_folder_can_exist(out_dir.parent, "the output folder")
    resolved = out_dir.resolve()
    if resolved == root:
        raise OutputPathError(f"{out_dir}: the output folder is the input folder; choose another")
    if root in resolved.parents:
        raise OutputPathError(f"{out_dir}: the output folder is inside the input folder; choose another")
    if resolved in root.parents:
        raise OutputPathError(f"{out_dir}: the input folder is inside the output folder; choose another")
    return out_dir


def _no_link_below(out_dir: Path, path: Path) -> None:
    """Refuse writing through a link that already exists inside the output folder."""
    rel = path.relative_to(out_dir)
    current = out_dir
    for part in rel.parts[:-1]:
        current = current / part
        if current.is_symlink():
            raise OutputPathError(f"{current}: is a link inside the output folder; refusing to write through it")


@dataclasses.dataclass
class _Companions:
    dirs: list[str]
    files: list[str]
    links: dict[str, str]
    """Link path -> the link text to create."""

    def dests(self, out_dir: Path) -> set[Path]:
        return {out_dir / rel for rel in (*self.files, *self.links)}


def _plan_companions(folder: Path, root: Path, out_dir: Path, plan: _Plan, infos: dict[str, model_io.InputInfo],
                     targets: dict[str, Path], notes: list[str]) -> _Companions:
    """Decide, before any work, what is copied into the output folder (and note what is not)."""
    data_rels, data_files = _input_data(folder, infos)

    def writes(rel: str) -> bool:
        """The run writes out_dir/rel itself: a model, a model's data file, a staging folder."""
        dest_dir, name = os.path.dirname(rel), os.path.basename(rel)
        for target_rel, target in targets.items():
            if rel == target_rel:
                return True
            if os.path.dirname(target_rel) == dest_dir and (
                    publish.data_name_pattern(target.name).fullmatch(name)
                    or publish.staging_pattern(target.name).fullmatch(name)):
                return True
        return False

    files = _companion_files(folder, plan, data_rels, data_files, writes, notes)
    for rel, kind in plan.specials:
        notes.append(f"not copied: {rel} is {kind}, not a regular file")
    present = {"."} | set(plan.dirs) | set(files) | set(plan.models)
    links = _companion_links(folder, root, plan, present, data_rels, data_files, writes, notes)
    companions = _Companions(dirs=list(plan.dirs), files=files, links=links)
    _check_destinations(out_dir, companions)
    return companions


def _input_data(folder: Path, infos: dict[str, model_io.InputInfo]) -> tuple[set[str], set[Path]]:
    """The input's external data: by the name models give it, and by the file it resolves to."""
    data_rels: set[str] = set()
    data_files: set[Path] = set()
    for rel, info in infos.items():
        base = os.path.dirname(rel)
        data_files |= info.data_files
        data_rels |= {os.path.normpath(os.path.join(base, loc))
                      for loc in publish.external_locations(folder / rel)}
    return data_rels, data_files


def _companion_files(folder: Path, plan: _Plan, data_rels: set[str], data_files: set[Path], writes,
                     notes: list[str]) -> list[str]:
    """The regular files copied: not the input's data, nothing that looks like stale data, nothing
    the run writes itself."""
    files: list[str] = []
    for rel in plan.files:
        path = folder / rel
        if rel in data_rels or path.resolve() in data_files:
            continue  # the input's external data: each written model gets its own
        if looks_like_data(rel):
            notes.append(f"not copied: {rel} is no model's external data (stale?)")
            continue
        if writes(rel):
            notes.append(f"not copied: {rel} would overwrite a file this run writes")
            continue
        if not os.access(path, os.R_OK):
            raise InputModelError(f"{path}: cannot read this file of the model folder (permission denied)")
        files.append(rel)
    return files


def _companion_links(folder: Path, root: Path, plan: _Plan, present: set[str], data_rels: set[str],
                     data_files: set[Path], writes, notes: list[str]) -> dict[str, str]:
    """The links recreated (relative, inside the folder) and the text of each: never followed out
    of the folder, never to a model's data or to something not copied."""
    links: dict[str, str] = {}
    for rel in plan.links:
        path = folder / rel
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError):
            notes.append(f"not copied: {rel} is a link that does not resolve (a loop?)")
            continue
        if not _inside(resolved, root):
            notes.append(f"not copied: {rel} is a link to outside the folder")
            continue
        if not os.path.lexists(resolved):
            notes.append(f"not copied: {rel} is a broken link")
            continue
        target_rel = resolved.relative_to(root).as_posix() if resolved != root else "."
        if resolved in data_files or target_rel in data_rels:
            notes.append(f"not copied: {rel} is a link to a model's external data")
            continue
        if target_rel not in present:
            notes.append(f"not copied: {rel} is a link to {target_rel}, which is not copied")
            continue
        if writes(rel):
            notes.append(f"not copied: {rel} would overwrite a file this run writes")
            continue
        parent = os.path.dirname(rel) or "."
        text = os.readlink(path)
        if os.path.isabs(text) or os.path.normpath(os.path.join(parent, text)) != target_rel:
            text = os.path.relpath(target_rel, parent)  # the same target, by a path inside the folder
        links[rel] = text
    return links


def _check_destinations(out_dir: Path, companions: _Companions) -> None:
    """Each companion's place in the output folder must take it: refused before any work."""
    for rel in companions.dirs:
        dest = out_dir / rel
        _no_link_below(out_dir, dest)
        if dest.is_symlink() or (os.path.lexists(dest) and not dest.is_dir()):
            raise OutputPathError(f"{dest}: exists and is not a folder, or is a link (the input's {rel} is a folder)")
    for rel in (*companions.files, *companions.links):
        dest = out_dir / rel
        _no_link_below(out_dir, dest)
        if os.path.lexists(dest) and not dest.is_symlink():
            mode = os.lstat(dest).st_mode
            if stat.S_ISDIR(mode):
                raise OutputPathError(f"{dest}: exists and is a folder (the input's {rel} is not)")
            if not stat.S_ISREG(mode):
                raise OutputPathError(
                    f"{dest}: exists and is {model_io.file_kind(mode)}; remove it or choose another output")


def _check_report(report_path, folder: Path, root: Path, out_dir: Path, infos: dict[str, model_io.InputInfo],
                  targets: dict[str, Path], companions: _Companions) -> Path | None:
    if report_path is None:
        return None
    top = [rel for rel in infos if "/" not in rel]
    info = infos[top[0] if top else next(iter(infos))]
    reserved = set(targets.values()) | companions.dests(out_dir)
    p = model_io.check_report_path(report_path, info, output_folder=out_dir, reserved=reserved)
    for rel, other in infos.items():  # each model's own files: its input, its data, its output and data names
        model_io.check_report_path(report_path, other, output=targets[rel])
    resolved = p.resolve()
    out = out_dir.resolve()
    if _inside(resolved.parent, out) and os.path.lexists(folder / resolved.relative_to(out)):
        raise OutputPathError(f"{p}: the report would overwrite a file this run writes into {out_dir}; "
                              "choose another --report path")
    if _inside(resolved.parent, root) and os.path.lexists(resolved):
        raise OutputPathError(f"{p}: the report would overwrite a file of the input folder; "
                              "choose another --report path")
    return p


def _progress_for(progress, rel: str):
    if progress is None:
        return None
    labels = {"fold": f"folding norms ({rel})", "write": f"writing tensors ({rel})"}
    return lambda stage, done, total: progress(labels.get(stage, f"{stage} ({rel})"), done, total)


def _write_report(report: FolderReport, path: Path | None) -> None:
    if path is not None:
        model_io.write_report(report, path)


# -- copying -------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Copied:
    """What the companion copy created, to remove again when nothing is published."""

    dirs: list[Path] = dataclasses.field(default_factory=list)
    files: list[Path] = dataclasses.field(default_factory=list)
    links: list[Path] = dataclasses.field(default_factory=list)
    new: list[Path] = dataclasses.field(default_factory=list)

    def undo(self) -> None:
        for path in self.new:
            try:
                path.unlink()
            except OSError:
                pass
        for folder in reversed(self.dirs):  # deepest last created, removed first
            try:
                folder.rmdir()
            except OSError:
                pass


def _copy_companions(folder: Path, out_dir: Path, companions: _Companions, copied: _Copied) -> None:
    """Copy files (each atomically: a temporary name in the destination folder, then os.replace)
    and recreate links; folders are created as needed."""
    try:
        for rel in companions.dirs:
            dest = out_dir / rel
            if not dest.is_dir():
                dest.mkdir(parents=True)
                copied.dirs.append(dest)
        for rel in companions.files:
            dest = out_dir / rel
            new = not os.path.lexists(dest)
            _atomic(dest, lambda tmp, src=folder / rel: _copy_file(src, tmp))
            copied.files.append(dest)
            if new:
                copied.new.append(dest)
        for rel, text in companions.links.items():
            dest = out_dir / rel
            new = not os.path.lexists(dest)
            _atomic(dest, lambda tmp, text=text: os.symlink(text, tmp))
            copied.links.append(dest)
            if new:
                copied.new.append(dest)
    except OSError as e:
        raise OutputPathError(f"{out_dir}: copying the folder's other files failed ({first_line(e)}); "
                              "nothing published") from e


def _copy_file(src: Path, tmp: Path) -> None:
    shutil.copyfile(src, tmp, follow_symlinks=False)
    shutil.copystat(src, tmp, follow_symlinks=False)
    publish.fsync_path(tmp)


def _atomic(dest: Path, make: Callable[[Path], None]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.copy.tmp")
    try:
        make(tmp)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# -- publishing ----------------------------------------------------------------------------------


def _publish(staged: list[tuple[str, FoldReport]], targets: dict[str, Path], report: FolderReport,
             report_file: Path | None, copied: _Copied) -> None:
    """Commit each staged model in order. The report is written under the first commit (a report
    that cannot be written publishes nothing) and again, complete, under the last one, before its
    model becomes visible."""
    done: list[str] = []
    try:
        for i, (rel, model_report) in enumerate(staged):
            last = i == len(staged) - 1

            def before_publish(paths: list[Path], rel=rel, model_report=model_report, first=(i == 0), last=last):
                model_report.output = str(targets[rel])
                model_report.notes.append("wrote " + ", ".join(str(p) for p in paths))
                if first or last:
                    _write_report(report, report_file)

            model_report.staged.commit(before_publish)
            model_report.staged = None
            done.append(rel)
    except BaseException as e:
        left = [rel for rel, _ in staged if rel not in done]
        if not done:
            copied.undo()  # nothing published: the companions go too
        for rel, model_report in reversed(staged):  # the first staged created the output folder
            if model_report.staged is not None:
                model_report.staged.abandon()
                model_report.staged = None
        if done and isinstance(e, FlashNormError):
            raise type(e)(f"{e}; the output folder is incomplete: published {', '.join(done)}, "
                          f"not {', '.join(left)}") from e
        raise
