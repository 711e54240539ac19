"""A fixed public-domain English text for perplexity: *Alice's Adventures in Wonderland*
(Lewis Carroll, 1865; the Millennium Fulcrum Edition 2.9 text from Project Gutenberg), as the
Canterbury compression corpus ships it (``alice29.txt``, 152,089 bytes).

It comes from a PyPI package: the source distribution of ``brotli==1.2.1`` carries the
Canterbury corpus under ``tests/testdata/``. The recipe downloads that sdist with pip (no build,
no install), checks the file's SHA-256, and caches it under ``build/corpus/``.

Run ``python -m models.corpus`` to fetch it and print its path.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "corpus" / "alice29.txt"
PACKAGE = "brotli==1.2.1"
MEMBER = "brotli-1.2.1/tests/testdata/alice29.txt"
SHA256 = "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0"


def alice() -> Path:
    """The text's path (downloaded once)."""
    if CACHE.exists() and _sha256(CACHE.read_bytes()) == SHA256:
        return CACHE
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "--no-build-isolation", "-d", tmp, PACKAGE], check=True)
        sdist = next(Path(tmp).glob("brotli-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            data = tar.extractfile(MEMBER).read()
    if _sha256(data) != SHA256:
        raise RuntimeError(f"{MEMBER} in {PACKAGE} does not have the expected SHA-256")
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = CACHE.with_suffix(".tmp")
    tmp_path.write_bytes(data)
    tmp_path.replace(CACHE)
    return CACHE


def alice_text() -> str:
    """The text, with the title block's and the paragraphs' layout whitespace collapsed."""
    raw = alice().read_text(encoding="latin-1")
    paragraphs = [" ".join(p.split()) for p in raw.split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


if __name__ == "__main__":
    print(alice())
