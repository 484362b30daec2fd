"""Writing a model folder others can load: weights in sharded safetensors, the tokenizer with the chat template
the model was trained with, and xtune's run meta. Written aside, then renamed; an existing folder is never
overwritten."""

import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from xtune.engine.checkpoint import RUN_META, complete_checkpoints, run_folders, verify_checkpoint
from xtune.errors import CheckpointError, XtuneError
from xtune.paths import share_as_umask_allows

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@contextmanager
def new_folder(save_dir: str | Path):
    """Yields a partial folder beside `save_dir`, renamed to `save_dir` when the block ends without error."""
    save_dir = Path(save_dir)
    if save_dir.exists() and (not save_dir.is_dir() or any(save_dir.iterdir())):
        raise XtuneError(f"{save_dir} already exists and is not empty; choose another SAVE_DIR or remove it.")
    partial = save_dir.with_name(f".{save_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    share_as_umask_allows(partial)
    if save_dir.exists():
        save_dir.rmdir()
    os.replace(partial, save_dir)


def write_meta(folder: Path, meta: dict) -> None:
    (folder / RUN_META).write_text(json.dumps(meta, indent=2) + "\n")


def save_dtype(published: str | None, fp32: bool) -> torch.dtype:
    """fp32 on request, else the dtype the base model was published in (config.json's `dtype`; bf16 when it
    says nothing)."""
    if fp32:
        return torch.float32
    return DTYPES.get(str(published).removeprefix("torch."), torch.bfloat16)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint-<step> folder, or the newest complete one in a run folder, or in a work_dir's newest run that
    has one (runs are named by their start time). A partial folder (an interrupted save) is refused."""
    path = Path(path)
    if path.name.endswith(".partial"):
        raise CheckpointError(f"{path} is a checkpoint whose save was interrupted; use a complete checkpoint-<step>.")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder.")
    if not (path / RUN_META).is_file():
        checkpoints = complete_checkpoints(path)
        for run in reversed(run_folders(path) if not checkpoints else []):  # a --work-dir: its newest run with one
            if checkpoints := complete_checkpoints(run):
                break
        if not checkpoints:
            raise CheckpointError(f"{path} holds no complete checkpoint-<step> folder, nor a run folder with one (and is not one).")
        path = checkpoints[-1]
    verify_checkpoint(path)
    return path


def loading_error(what: str, fix: str) -> Callable[[Exception], CheckpointError]:
    def explain(error: Exception) -> CheckpointError:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return CheckpointError(f"{what}: {first}; {fix}")

    return explain
