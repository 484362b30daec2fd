"""Export a run's checkpoint from the browser: `xtune convert pth_to_hf | merge | gguf | ollama` as functions, each in
a thread of its own whose console output is its progress; and the results `xtune eval` left under work_dirs/eval."""

import importlib.util
import io
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

from xtune.engine.checkpoint import read_run_meta
from xtune.errors import XtuneError
from xtune.webui.files import Roots

KINDS = ("pth_to_hf", "merge", "gguf", "ollama")


def available() -> dict[str, bool]:
    """GGUF needs the `gguf` package (llama.cpp's writer); the others only xtune."""
    gguf = importlib.util.find_spec("gguf") is not None
    return {"pth_to_hf": True, "merge": True, "gguf": gguf, "ollama": gguf}


class _Lines(io.StringIO):
    """A console's output, readable while it is being written."""


@dataclass
class ExportJob:
    id: str
    kind: str
    command: str
    """The same export as a command line."""
    output: str
    status: str = "running"
    error: str | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    buffer: _Lines = field(default_factory=_Lines, repr=False)

    def view(self) -> dict:
        shown = {k: v for k, v in asdict(self).items() if k != "buffer"}
        return shown | {"progress": self.buffer.getvalue()[-8000:]}


class Exports:
    def __init__(self, roots: Roots):
        self.roots = roots
        self.jobs: dict[str, ExportJob] = {}

    def start(self, kind: str, checkpoint: str, output: str, options: dict | None = None) -> ExportJob:
        """Start one export of a checkpoint (or, for `ollama`, of a .gguf file) into `output`, a new path in the
        roots."""
        options = options or {}
        if kind not in KINDS:
            raise XtuneError(f"unknown export {kind!r}; one of {', '.join(KINDS)}.")
        if not available()[kind]:
            raise XtuneError(f"{kind} needs the gguf package: pip install -c constraints.txt gguf.")
        source = self.roots.inside(checkpoint)
        target = self.roots.inside(output)
        if target.exists() and kind != "ollama":
            raise XtuneError(f"{self.roots.shown(target)} already exists; choose a new folder or file.")
        job_id = f"{kind}-{time.strftime('%H%M%S')}-{len(self.jobs)}"
        work, command = self._plan(kind, source, target, options)
        job = ExportJob(job_id, kind, command, self.roots.shown(target))
        console = Console(file=job.buffer, width=120, force_terminal=False, soft_wrap=True)

        def run():
            try:
                written = work(console)
                console.print(f"written: {self.roots.shown(written)}")
                job.output, job.status = self.roots.shown(written), "done"
            except Exception as error:
                job.status, job.error = "failed", f"{type(error).__name__}: {error}"
            job.ended = time.time()

        self.jobs[job_id] = job
        threading.Thread(target=run, daemon=True).start()
        return job

    def _plan(self, kind: str, source: Path, target: Path, options: dict):
        shown = self.roots.shown
        meta = read_run_meta(source) if source.is_dir() else {}
        base = meta.get("llm_name_or_path")
        if kind == "pth_to_hf":
            from xtune.convert.pth_to_hf import pth_to_hf

            config = source.parent / "config.json"
            return (lambda console: pth_to_hf(str(config), source, target, console=console),
                    f"xtune convert pth_to_hf {shown(config)} {shown(source)} {shown(target)}")  # fmt: skip
        if kind == "merge":
            from xtune.convert.merge import merge

            if base is None or not (source / "adapter_config.json").is_file():
                raise XtuneError(f"{shown(source)}: merge takes a LoRA checkpoint (adapter_config.json and xtune_run.json).")
            return (lambda console: merge(base, source, target, console=console),
                    f"xtune convert merge {base} {shown(source)} {shown(target)}")  # fmt: skip
        if kind == "gguf":
            from xtune.convert.gguf import convert_gguf

            outtype = options.get("outtype", "f16")
            if (source / "adapter_config.json").is_file():
                return (lambda console: convert_gguf(base, target, source, outtype, console=console),
                        f"xtune convert gguf {base} {shown(target)} --adapter {shown(source)} --outtype {outtype}")  # fmt: skip
            return (lambda console: convert_gguf(str(source), target, None, outtype, console=console),
                    f"xtune convert gguf {shown(source)} {shown(target)} --outtype {outtype}")  # fmt: skip
        from xtune.convert.ollama import write_modelfile

        return (lambda console: write_modelfile(source), f"xtune convert ollama {shown(source)}")

    def view(self) -> list[dict]:
        return [job.view() for job in reversed(self.jobs.values())]


def eval_results(roots: Roots) -> list[dict]:
    """Every results.json `xtune eval` wrote under the roots' work_dirs/, newest first."""
    found = []
    for root in roots.folders:
        for path in (root / "work_dirs").glob("**/results.json") if (root / "work_dirs").is_dir() else []:
            try:
                found.append({"path": roots.shown(path), "results": json.loads(path.read_text())})
            except (OSError, ValueError):
                continue
    return sorted(found, key=lambda item: item["path"], reverse=True)
