"""Where xtune keeps what it builds on its own (tiny models and datasets, caches)."""

import os
from pathlib import Path


def xtune_home() -> Path:
    """`$XTUNE_HOME`, else `~/.cache/xtune`."""
    return Path(os.environ.get("XTUNE_HOME") or Path.home() / ".cache" / "xtune")
