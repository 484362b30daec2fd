"""Where xtune keeps what it builds on its own (tiny models and datasets, caches)."""

import errno
import hashlib
import os
import re
from pathlib import Path


def xtune_home() -> Path:
    """`$XTUNE_HOME`, else `~/.cache/xtune`."""
    return Path(os.environ.get("XTUNE_HOME") or Path.home() / ".cache" / "xtune")


def hf_home() -> Path:
    """`$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`, as huggingface_hub decides."""
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "huggingface"


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


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def write_failure(error: Exception) -> str:
    """Why a write failed, for a message: "the disk is full (No space left on device)" for ENOSPC and EDQUOT whether
    they came as an OSError or inside a SafetensorError (which keeps only the OS's text: "... (os error 28)")."""
    code = getattr(error, "errno", None)
    if code is None and (match := re.search(r"\(os error (\d+)\)", str(error))):
        code = int(match.group(1))
    text = getattr(error, "strerror", None) or (os.strerror(code) if code else str(error))
    return f"the disk is full ({text})" if code in FULL_DISK else text


def share_as_umask_allows(folder: Path) -> None:
    """Give the files under `folder` the permissions the user's umask gives new files: transformers writes
    safetensors through a private temporary file (mode 0600), so a model saved for others to read was not."""
    umask = _umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _umask() -> int:
    """The process's umask, read without setting it (setting it, even for an instant, would apply to files other
    threads create meanwhile, e.g. TensorBoard's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)  # no /proc (not Linux): the one way to read it
    os.umask(umask)
    return umask
