"""Publish a model file and its external data with one commit point.

A model and its data file are two files, and no file system renames two files at once. So the
new data never goes where an existing model could read it, and the model file, renamed into
place last, is the only commit::

    stage:   DEST_DIR/.flashnorm-<hash of NAME>-<random>.tmp/NAME (+ NAME.data or NAME.<id>.data)   (hidden)
    commit:  under an exclusive lock on DEST_DIR
      1. clean the leftovers of killed runs (see below)
      2. the data file gets a name no file in DEST_DIR has: NAME.data if free, else
         NAME.<8 hex>.data (the staged model's locations are rewritten to it)
      3. when DEST_DIR/NAME exists (``--in-place``, or an output written again), the staged files
         get its mode bits and, where the process may, its owner and group (the data file those of
         the replaced model's data file); a new output follows the umask. Then the report is
         written (``before_publish``); its failure publishes nothing
      4. fsync the staged files; hard-link the data into DEST_DIR (a link never replaces a
         file); fsync DEST_DIR
      5. os.replace(staged model, DEST_DIR/NAME); fsync DEST_DIR        <- the commit point
      6. remove the data files of the model that was replaced, unless some model in DEST_DIR
         still references them

Killed before step 5, DEST_DIR/NAME is the old model with its old data, untouched; killed
after it, the new model with its new data. A data file published in step 4 whose model never
followed is named like ours and referenced by no model: the next run on DEST_DIR removes it.

Leftovers: a run holds a ``flock`` on its staging folder while it lives. A staging folder nobody
holds (its run died) is removed, together with the obsolete data files its run had recorded
(step 6 not reached), and data files named ``NAME.data`` / ``NAME.<8 hex>.data`` that no model
in DEST_DIR references. Concurrent runs on one destination serialise on the folder lock: each
publishes a complete pair, the last one wins, and its step 6 removes the other's data.

Names: NAME may be any legal file name (up to NAME_MAX, 255 bytes). The staging folder's name is
short whatever NAME is; a data file name that would pass NAME_MAX is ``<NAME cut short>.<8 hex>.data``.

Signals: a stop requested by a signal handler (:func:`request_stop`; the CLI's SIGTERM handler)
publishes nothing more; one that arrives while a commit makes its files visible (the data file's
link to the end of step 6) takes effect when that commit ends, so a stop never leaves a published
data file without its model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable

import onnx

from flashnorm_onnx.errors import OutputPathError, first_line

try:  # POSIX: advisory locks; elsewhere publishing is not serialised between processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

#: A ``.new`` folder (a staging folder being created) older than this is a killed run's leftover.
STALE_AFTER_S = 60.0
OBSOLETE_LIST = ".obsolete"


def _step(name: str) -> None:
    """Called between file operations of a commit; tests replace it to inject crashes."""


#: The longest file name (bytes) the names written here may have: Linux's NAME_MAX on ext4, xfs,
#: btrfs, tmpfs and the others.
NAME_MAX = 255
_ID_DATA = len(".01234567.data")


def _bytes(name: str) -> int:
    return len(os.fsencode(name))


def _data_stem(name: str) -> str:
    """What ``NAME.<8 hex>.data`` starts with: ``name``, or ``name`` cut (on a character boundary)
    so that the data file's name stays within :data:`NAME_MAX`."""
    raw = os.fsencode(name)
    limit = NAME_MAX - _ID_DATA
    if len(raw) <= limit:
        return name
    while limit > 0 and raw[limit] & 0xC0 == 0x80:  # not inside a UTF-8 character
        limit -= 1
    return os.fsdecode(raw[:limit])


def data_name_pattern(name: str) -> re.Pattern:
    """Names of the data files this tool writes for the model file ``name``."""
    pattern = re.escape(name) + r"(\.[0-9a-f]{8})?\.data"
    stem = _data_stem(name)
    if stem != name:
        pattern = f"(?:{pattern}|{re.escape(stem)}\\.[0-9a-f]{{8}}\\.data)"
    return re.compile(pattern)


def _staging_token(name: str) -> str:
    return hashlib.sha256(os.fsencode(name)).hexdigest()[:12]


def staging_prefix(name: str) -> str:
    """The start of the hidden staging folders' names for the model file ``name``: short
    whatever ``name``'s length (a staging folder must fit NAME_MAX when ``name`` does)."""
    return f".flashnorm-{_staging_token(name)}-"


def staging_pattern(name: str) -> re.Pattern:
    """Staging folders for ``name``: ``.flashnorm-<hash>-<random>.tmp`` (``.new`` while being
    created), and the ``.NAME.<random>.tmp`` of earlier versions (so their leftovers are cleaned)."""
    return re.compile(r"(?:" + re.escape(staging_prefix(name)) + r"|\." + re.escape(name) + r"\.)[^/]+\.(tmp|new)")


# -- signals during a commit -----------------------------------------------------------------------

_publishing = 0
_stop: Callable[[], None] | None = None
#: How many model files this process has published (moved into place): a stopped run says whether
#: it had published something.
published_count = 0


def request_stop(action: Callable[[], None] | None) -> bool:
    """For a signal handler that stops the run: ``action`` (it raises) runs before any later
    commit publishes a file, and at the end of a commit that is making its files visible now
    (data file linked, model renamed over the destination, old data removed): True is returned
    then, and the handler leaves the stop to that. False: nothing is being published, the
    handler stops the run itself (should its exception be lost, no commit publishes). None
    withdraws the request (the CLI's run is over)."""
    global _stop
    _stop = action
    return bool(_publishing) and action is not None


def _check_stop() -> None:
    if _stop is not None:
        _stop()


@contextlib.contextmanager
def _uninterrupted():
    global _publishing
    _publishing += 1
    try:
        yield
    finally:
        _publishing -= 1
        if not _publishing:
            _check_stop()  # e.g. raises the CLI's stop exception, now that the commit is whole


# -- modes and owners ------------------------------------------------------------------------------


def _take_mode_and_owner(path: Path, like: os.stat_result) -> None:
    """Give ``path`` the mode bits of ``like`` and, where the process may, its owner and group."""
    if hasattr(os, "chown"):
        try:
            os.chown(path, like.st_uid, like.st_gid)
        except OSError:  # not root: keep the group at least when we belong to it
            try:
                os.chown(path, -1, like.st_gid)
            except OSError:
                pass
    os.chmod(path, stat.S_IMODE(like.st_mode))


def _replaced_stat(path: Path) -> os.stat_result | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


# -- locks -------------------------------------------------------------------------------------


class _FolderLock:
    """An exclusive ``flock`` on a folder (on its own file descriptor)."""

    def __init__(self, folder: Path, blocking: bool = True):
        self.fd = os.open(folder, os.O_RDONLY)
        self.held = True
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                self.held = False
            except OSError:  # a file system without locks: proceed unserialised
                pass

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (best effort where a file system cannot sync folders)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync folders
        pass
    finally:
        os.close(fd)


# -- what models reference -----------------------------------------------------------------------


def external_locations(model_file: Path) -> set[str]:
    """The external data locations a model file names (empty when it cannot be read)."""
    from flashnorm_onnx.io.walk import all_tensors

    try:
        proto = onnx.load_model(str(model_file), load_external_data=False)
    except Exception:  # not a model (or unreadable): it references nothing we know of
        return set()
    found = set()
    for tensor in all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    found.add(os.path.normpath(entry.value))
    return found


def referenced_files(folder: Path) -> set[str]:
    """Names (relative to ``folder``) of the data files some ``*.onnx`` model in it references."""
    names: set[str] = set()
    for model_file in folder.glob("*.onnx"):
        if model_file.is_file():
            names |= external_locations(model_file)
    return names


def _rewrite_locations(model_file: Path, old: str, new: str) -> None:
    from flashnorm_onnx.io.walk import all_tensors

    proto = onnx.load_model(str(model_file), load_external_data=False)
    for tensor in all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    model_file.write_bytes(proto.SerializeToString())


# -- staging -------------------------------------------------------------------------------------


@dataclasses.dataclass
class StagedOutput:
    """A model written into a hidden staging folder beside its destination, not yet visible."""

    staging: Path
    output: Path
    external: bool
    data_name: str
    created: list[Path] = dataclasses.field(default_factory=list)
    """Folders created for the output, deepest first (removed again when nothing is published)."""
    lock: _FolderLock | None = None

    @property
    def model_path(self) -> Path:
        return self.staging / self.output.name

    @property
    def data_path(self) -> Path:
        return self.staging / self.data_name

    def commit(self, before_publish: Callable[[list[Path]], None] | None = None) -> list[Path]:
        """Publish (see the module docstring). ``before_publish(paths)`` runs under the lock just
        before the first file becomes visible (the report is written there); if it raises,
        nothing is published. Returns the published paths."""
        folder = self.output.parent
        try:
            _check_stop()
            with _FolderLock(folder):
                _step("locked")
                clean_leftovers(folder, self.output.name)
                _step("cleaned")
                has_data = self.external and self.data_path.exists()
                if has_data:
                    final = self.data_name
                    if os.path.lexists(folder / final):
                        final = choose_data_name(folder, self.output.name)
                    if final != self.data_name:
                        _rewrite_locations(self.model_path, self.data_name, final)
                        os.rename(self.data_path, self.staging / final)
                        self.data_name = final
                written = ([folder / self.data_name] if has_data else []) + [self.output]
                old_data = external_locations(self.output) if self.output.is_file() else set()
                (self.staging / OBSOLETE_LIST).write_text("\n".join(sorted(old_data)))
                self._keep_modes(old_data, has_data)
                if before_publish is not None:
                    before_publish(written)
                _step("reported")
                for path in ([self.data_path] if has_data else []) + [self.model_path, self.staging / OBSOLETE_LIST]:
                    fsync_path(path)
                fsync_path(self.staging)
                _step("synced")
                _check_stop()
                with _uninterrupted():  # a stop signal waits for the end of this block
                    self._publish(folder, has_data, old_data)
                return written
        except OutputPathError:
            raise
        except OSError as e:
            raise OutputPathError(f"{self.output}: could not move the output into place ({first_line(e)})") from e
        finally:
            self.discard()

    def _publish(self, folder: Path, has_data: bool, old_data: set[str]) -> None:
        """Steps 4 (the data's link) to 6 of the commit."""
        global published_count
        if has_data:
            _publish_without_replacing(self.data_path, folder / self.data_name)
            fsync_path(folder)
            _step("data published")
        try:
            os.replace(self.model_path, self.output)  # the commit point
        except BaseException:
            if has_data:  # the model did not follow: its data must not stay behind
                (folder / self.data_name).unlink(missing_ok=True)
            raise
        published_count += 1
        fsync_path(folder)
        _step("model published")
        _remove_unreferenced(folder, old_data - {self.data_name})
        _step("old data removed")

    def _keep_modes(self, old_data: set[str], has_data: bool) -> None:
        """A destination that exists is replaced the way an edit in place would: the new model
        gets its mode bits (and owner and group where the process may), the new data file those
        of the data file the replaced model references (the model's when it had none). A new
        destination keeps the umask's bits the files were created with."""
        model_st = _replaced_stat(self.output)
        if model_st is None:
            return
        data_st = next(filter(None, (_replaced_stat(self.output.parent / n) for n in sorted(old_data))), model_st)
        try:
            _take_mode_and_owner(self.model_path, model_st)
            if has_data:
                _take_mode_and_owner(self.data_path, data_st)
        except OSError as e:
            raise OutputPathError(f"{self.output}: could not give the output the mode of the file it replaces "
                                  f"({first_line(e)}); nothing published") from e

    def discard(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        shutil.rmtree(self.staging, ignore_errors=True)

    def abandon(self) -> None:
        """Nothing is published: remove the staging folder and the folders created for it."""
        self.discard()
        remove_empty(self.created)


def stage(output: Path, external: bool) -> StagedOutput:
    """Create the hidden staging folder (and any missing output folders) for ``output``;
    ``external``: the model is written with an external data file."""
    parent = output.parent
    created: list[Path] = []
    missing = parent
    while not missing.exists() and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_empty(created)
        raise OutputPathError(f"{parent}: cannot create the output folder ({first_line(e)})") from e
    try:
        # created as ``.new`` (cleanup leaves those alone while young), locked, then renamed to its
        # ``.tmp`` name: a ``.tmp`` staging folder nobody holds a lock on is always a dead run's
        fresh = Path(tempfile.mkdtemp(prefix=staging_prefix(output.name), suffix=".new", dir=parent))
        lock = _FolderLock(fresh)
        staging = fresh.with_suffix(".tmp")
        os.rename(fresh, staging)
    except OSError as e:
        remove_empty(created)
        raise OutputPathError(f"{parent}: cannot write there ({first_line(e)})") from e
    return StagedOutput(staging=staging, output=output, external=external, data_name=choose_data_name(parent, output.name),
                        created=created, lock=lock)


def choose_data_name(folder: Path, name: str) -> str:
    """``NAME.data`` if no file of that name exists in ``folder``, else a fresh ``NAME.<id>.data``;
    within :data:`NAME_MAX` bytes (``NAME`` cut short before ``.<id>.data`` when it is long)."""
    candidate = f"{name}.data"
    if _bytes(candidate) <= NAME_MAX and not os.path.lexists(folder / candidate):
        return candidate
    stem = _data_stem(name)
    while True:
        candidate = f"{stem}.{secrets.token_hex(4)}.data"
        if not os.path.lexists(folder / candidate):
            return candidate


def _publish_without_replacing(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except FileExistsError:
        raise OutputPathError(f"{dest}: appeared while publishing (another program writes there); nothing published")
    except OSError:  # no hard links on this file system: rename (we hold the folder lock)
        if os.path.lexists(dest):
            raise OutputPathError(f"{dest}: appeared while publishing; nothing published") from None
        os.rename(src, dest)


# -- leftovers -----------------------------------------------------------------------------------


def clean_leftovers(folder: Path, name: str) -> list[Path]:
    """Remove what killed runs on ``folder/name`` left behind. Call with the folder lock held."""
    removed: list[Path] = []
    obsolete: set[str] = set()
    pattern = staging_pattern(name)
    now = time.time()
    for entry in folder.iterdir():
        if not pattern.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            if entry.suffix == ".new" and now - entry.stat().st_mtime < STALE_AFTER_S:
                continue  # being created (killed between mkdtemp and its rename: removed later)
            probe = _FolderLock(entry, blocking=False)
        except OSError:
            continue
        try:
            if not probe.held:
                continue  # a live run
            try:
                obsolete |= set(filter(None, (entry / OBSOLETE_LIST).read_text().splitlines()))
            except OSError:
                pass
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        finally:
            probe.release()
    ours = data_name_pattern(name)
    orphans = {p.name for p in folder.iterdir() if ours.fullmatch(p.name) and p.is_file() and not p.is_symlink()}
    removed += _remove_unreferenced(folder, obsolete | orphans)
    if removed:
        logger.info("removed leftovers of earlier runs: %s", ", ".join(map(str, removed)))
    return removed


def clean(output: Path) -> list[Path]:
    """Clean killed runs' leftovers at ``output``'s folder (a run that publishes nothing does this)."""
    folder = output.parent
    if not folder.is_dir():
        return []
    try:
        with _FolderLock(folder):
            return clean_leftovers(folder, output.name)
    except OSError:
        return []


def _remove_unreferenced(folder: Path, names: set[str]) -> list[Path]:
    names = {n for n in names if n and os.sep not in n and n not in (".", "..")}
    if not names:
        return []
    still = referenced_files(folder)
    removed = []
    for n in sorted(names - still):
        path = folder / n
        if path.is_file() and not path.is_symlink():
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break
