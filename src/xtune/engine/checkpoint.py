"""Checkpoints that never look complete unless they are: written aside, then renamed into place."""

import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path

RUN_META = "xtune_run.json"
"""Written into every checkpoint: what chat and convert need to use it the way it was trained."""

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def new_run_dir(work_dir: str | Path) -> Path:
    """A fresh timestamped folder inside `work_dir`; an existing one is never reused."""
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    for attempt in range(1000):
        run_dir = Path(work_dir) / (stamp if attempt == 0 else f"{stamp}_{attempt}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a new run folder in {work_dir}")


def save_checkpoint(model, tokenizer, run_dir: Path, step: int, meta: dict) -> Path:
    """Write `run_dir/checkpoint-<step>/` atomically: a model (or PEFT adapter), tokenizer and meta."""
    final = run_dir / f"checkpoint-{step}"
    partial = run_dir / f".checkpoint-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    (partial / RUN_META).write_text(json.dumps({**meta, "step": step}, indent=2))
    _fsync_tree(partial)
    if final.exists():
        raise FileExistsError(f"{final} already exists; refusing to overwrite it.")
    os.replace(partial, final)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in step order (partial ones are never named checkpoint-N)."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep` (-1 keeps all); returns the deleted."""
    checkpoints = complete_checkpoints(run_dir)
    if keep < 0 or len(checkpoints) <= keep:
        return []
    doomed = checkpoints[: len(checkpoints) - keep]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def read_run_meta(path: Path) -> dict:
    meta = Path(path) / RUN_META
    return json.loads(meta.read_text()) if meta.is_file() else {}


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
