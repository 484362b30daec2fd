"""The folders the web UI may read and write: those it was started with (`--root`), nothing outside them.

Every path a request names goes through `inside`: resolved (links and `..` followed) and refused unless it lies in
one of the roots, so a file picker cannot be walked out of them.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from xtune.errors import XtuneError


READ_KEYS = ("llm_name_or_path", "visual_encoder_name_or_path", "pretrained_pth", "deepspeed", "image_folder")
"""Config keys that name one file or folder to read (besides the data and evaluation_images)."""


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

    def check_reads(self, config) -> None:
        """Every local path a config names to read (models, data and each file a data folder holds, images,
        projector, DeepSpeed JSON) lies inside the roots, links followed. A value that names no local file is a name
        xtune resolves itself: `xtune-tiny/...`, `xtune-data/...`, a shipped DeepSpeed config, a hub id found in the
        local caches; those are read where xtune keeps them."""
        from xtune.data.sources import BUILTIN_PREFIX, TINY_PREFIX, data_files, resolve_data_path

        def local(value: str | None) -> bool:
            return bool(value) and not value.startswith((TINY_PREFIX, BUILTIN_PREFIX)) and os.path.lexists(value)

        def check(key: str, value: str, path: str | Path) -> None:
            try:
                self.inside(path)
            except OutsideRoots:
                named = "" if str(path) == value else f" holds {path}, which is"
                raise OutsideRoots(f"{key} = {value!r}{named}: outside the folders this web UI serves "
                                   f"({', '.join(map(str, self.folders))}).") from None  # fmt: skip

        named = [(key, getattr(config, key)) for key in READ_KEYS]
        named += [(f"evaluation_images[{i}]", image) for i, image in enumerate(config.evaluation_images)]
        named += [(f"datasets[{i}].image_folder", source.image_folder) for i, source in enumerate(config.datasets)]
        for key, value in named:
            if local(value):
                check(key, value, value)
        data = [("data_path", config.data_path), ("val_data_path", config.val_data_path)]
        data += [(f"datasets[{i}].path", source.path) for i, source in enumerate(config.datasets)]
        for key, value in data:
            if local(value):
                check(key, value, value)
                for path in data_files(resolve_data_path(value)):
                    check(key, value, path)

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
