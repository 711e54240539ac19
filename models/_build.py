"""What every recipe of real weights builds with: a file lock, so that concurrent processes
(pytest-xdist workers, two checkouts' test runs sharing nothing but ``build/``) build each folder
once, and a temporary folder renamed into place, so that an interrupted build leaves nothing that
looks cached."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_depth: dict[Path, int] = {}


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on the file ``path``, re-entrant within a process (a recipe's export
    builds its transformers folder under the same lock). Without POSIX locks (not Linux/macOS): no
    lock, and concurrent builds race."""
    if _depth.get(path):
        _depth[path] += 1
        try:
            yield
        finally:
            _depth[path] -= 1
        return
    try:
        import fcntl
    except ImportError:
        fcntl = None
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        _depth[path] = 1
        try:
            yield
        finally:
            _depth[path] = 0
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """An empty temporary folder beside ``target``, renamed to ``target`` if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_causal_lm(folder: Path, class_name: str, attn: str | None = None):
    """The fp32 transformers model ``class_name`` from ``folder``, without a cache, in eval mode."""
    import torch
    import transformers

    extra = {"attn_implementation": attn} if attn else {}
    model = getattr(transformers, class_name).from_pretrained(str(folder), dtype=torch.float32, **extra)
    model.config.use_cache = False
    return model.eval()
