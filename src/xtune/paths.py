"""Where xtune keeps what it builds on its own (tiny models and datasets, caches)."""

import hashlib
import os
from pathlib import Path


def xtune_home() -> Path:
    """`$XTUNE_HOME`, else `~/.cache/xtune`."""
    return Path(os.environ.get("XTUNE_HOME") or Path.home() / ".cache" / "xtune")


def file_sha256(path: Path, fsync: bool = False) -> str:
    """The hex sha256 of a file's bytes, read a MiB at a time; `fsync`: the file is also made durable while
    it is open (one read of each file for both)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        if fsync:
            os.fsync(handle.fileno())
    return digest.hexdigest()
