"""The folders the web UI may read and write: those it was started with (`--root`), nothing outside them.

Every path a request names goes through `inside`: resolved (links and `..` followed) and refused unless it lies in
one of the roots, so a file picker cannot be walked out of them.
"""

from dataclasses import dataclass
from pathlib import Path

from xtune.errors import XtuneError


class OutsideRoots(XtuneError):
    """A path outside the folders the web UI was started with."""


@dataclass(frozen=True)
class Roots:
    folders: tuple[Path, ...]

    @classmethod
    def of(cls, folders) -> "Roots":
        resolved = tuple(Path(folder).expanduser().resolve() for folder in folders)
        missing = [str(folder) for folder in resolved if not folder.is_dir()]
        if missing:
            raise XtuneError(f"--root {missing[0]}: no such folder.")
        return cls(resolved)

    @property
    def main(self) -> Path:
        """The first root: where runs (work_dirs/) and the configs the form writes (configs/) go."""
        return self.folders[0]

    def inside(self, path: str | Path) -> Path:
        """`path` (absolute, or relative to the first root) resolved, if it lies inside a root."""
        candidate = Path(path).expanduser()
        resolved = (candidate if candidate.is_absolute() else self.main / candidate).resolve()
        if any(resolved == root or resolved.is_relative_to(root) for root in self.folders):
            return resolved
        raise OutsideRoots(f"{path}: outside the folders this web UI serves ({', '.join(map(str, self.folders))}).")

    def shown(self, path: Path) -> str:
        """A path as the UI shows it: relative to the first root when inside it."""
        path = Path(path).resolve()
        return str(path.relative_to(self.main)) if path.is_relative_to(self.main) else str(path)

    def listing(self, path: str | Path = "") -> dict:
        """The folders and files of a folder inside the roots (hidden ones left out), for the file picker."""
        folder = self.inside(path or self.main)
        if not folder.is_dir():
            raise XtuneError(f"{path}: not a folder.")
        entries = []
        for entry in sorted(folder.iterdir(), key=lambda p: (not p.is_dir(), p.name.lower())):
            if entry.name.startswith("."):
                continue
            try:
                target = self.inside(entry)
            except OutsideRoots:  # a link out of the roots is not offered
                continue
            entries.append({"name": entry.name, "path": self.shown(target), "folder": target.is_dir()})
        parent = folder.parent if folder not in self.folders else None
        return {"path": self.shown(folder), "parent": None if parent is None else self.shown(parent),
                "roots": [str(root) for root in self.folders], "entries": entries}  # fmt: skip
