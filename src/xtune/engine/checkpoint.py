"""Checkpoints that never look complete unless they are: written aside, then renamed into place."""

import functools
import hashlib
import hmac
import json
import os
import random
import re
import secrets
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from xtune.errors import CheckpointError
from xtune.models.publish import generation_config_of, save_tokenizer, write_generation_config
from xtune.paths import file_sha256, share_as_umask_allows, write_failure, xtune_home

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


def keep_config_file(config_file: Path, run_dir: Path) -> None:
    """The config file as it was, in the run folder, and under its name in the work folder (a link to that copy),
    where XTuner writes it: `xtuner train cfg.py --work-dir DIR` leaves `DIR/cfg.py`, which its tutorials pass to
    `pth_to_hf`. Anything else of that name in the work folder (the user's own file or link) is left alone."""
    copy = run_dir / config_file.name
    shutil.copy2(config_file, copy)
    _link_from_work_dir(run_dir.parent / config_file.name, Path(run_dir.name) / copy.name)


def save_checkpoint(
    model,
    tokenizer,
    run_dir: Path,
    step: int,
    meta: dict,
    write_extra: Callable[[Path], None] | None = None,
    state_dict: dict | None = None,
    clear: bool = True,
) -> Path:
    """Write `run_dir/checkpoint-<step>/` atomically: a model (or PEFT adapter), tokenizer, meta, and
    whatever `write_extra(folder)` adds (the training state). `clear=False` keeps what other ranks
    already wrote into the partial folder (DeepSpeed's state)."""
    final, partial = run_dir / f"checkpoint-{step}", partial_checkpoint(run_dir, step)
    if clear:
        shutil.rmtree(partial, ignore_errors=True)
    try:
        options = {"state_dict": state_dict} if state_dict else {}
        model.save_pretrained(partial, safe_serialization=True, **options, **peft_save_options(model))
        save_tokenizer(tokenizer, partial, meta.get("prompt_template"))
        if (generation := generation_config_of(model)) is not None:
            write_generation_config(partial, generation, tokenizer, meta.get("prompt_template"))
        (partial / RUN_META).write_text(json.dumps({**meta, "step": step}, indent=2))
        if write_extra is not None:
            write_extra(partial)
        share_as_umask_allows(partial)
        write_manifest(partial)
        for folder in (partial, *(p for p in partial.rglob("*") if p.is_dir())):  # their entries, i.e. the files' names
            _fsync_folder(folder)
    except (OSError, SafetensorError) as error:  # e.g. the disk is full
        shutil.rmtree(partial, ignore_errors=True)
        kept = ""
        if previous := complete_checkpoints(run_dir):
            kept = f"; nothing earlier is lost: {previous[-1].name} is intact and --resume auto continues from it"
        raise CheckpointError(f"could not write {final.name} in {run_dir}: {write_failure(error)}{kept}.") from error
    if final.exists():
        raise FileExistsError(f"{final} already exists; refusing to overwrite it.")
    os.replace(partial, final)
    _fsync_folder(run_dir)  # the rename itself
    return final


def run_folders(work_dir: str | Path) -> list[Path]:
    """The run folders in `work_dir`, oldest first (they are named by their start time); not the `iter_N.pth` links
    beside them."""
    work_dir = Path(work_dir)
    found = [path for path in work_dir.iterdir() if path.is_dir() and not path.is_symlink()] if work_dir.is_dir() else []
    return sorted(found, key=lambda path: path.name)


def name_as_xtuner(checkpoint: Path, micro_batches: int) -> None:
    """`WORK_DIR/iter_<micro_batches>.pth`, a link to `checkpoint` (in a run folder of WORK_DIR): the name XTuner gives
    the checkpoint after that many iterations, so that its tutorials' commands and `pretrained_pth` find it. A
    link of xtune's of that name is moved to the newer run; anything else of that name (XTuner's own checkpoint, a
    link of the user's) is left alone."""
    target = Path(checkpoint.parent.name) / checkpoint.name
    _link_from_work_dir(checkpoint.parent.parent / f"iter_{micro_batches}.pth", target)


_OURS = re.compile(r"[^/]+/(checkpoint-\d+|[^/]+\.(py|yaml|yml))")
"""What a link xtune put in a work folder points at: `RUN/checkpoint-N`, or `RUN/<config file>`."""


def _is_ours(link: Path) -> bool:
    return link.is_symlink() and bool(_OURS.fullmatch(os.readlink(link))) and (link.parent / os.readlink(link)).parent.parent == link.parent


def _link_from_work_dir(link: Path, target: Path) -> None:
    """`link` (in a work folder) pointing at `target` (relative, inside one of its run folders), replaced atomically;
    a file or folder of that name, or a link not made by xtune, is left as it is."""
    if (link.exists() or link.is_symlink()) and not _is_ours(link):
        return
    draft = link.with_name(f".{link.name}.{os.getpid()}.link")
    draft.unlink(missing_ok=True)
    draft.symlink_to(target, target_is_directory=(link.parent / target).is_dir())
    os.replace(draft, link)


def _unlink_xtuner_names(work_dir: Path) -> None:
    """xtune's `iter_N.pth` links whose checkpoint has been deleted."""
    for link in work_dir.glob("iter_*.pth"):
        if _is_ours(link) and not link.exists():
            link.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


MANIFEST = "manifest.json"
"""sha256 of every file of a checkpoint, written last: a file truncated or edited later is found."""


def write_manifest(folder: Path) -> None:
    """Hash every file of `folder` into its manifest. Each file is on disk (fsynced) before the manifest is
    written, and the manifest before this returns, so a checkpoint renamed into place afterwards is whole."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = {str(p.relative_to(folder)): file_sha256(p, fsync=True) for p in files}
    with (folder / MANIFEST).open("w") as manifest:
        manifest.write(json.dumps({"sha256": digests, "hmac": _signature(digests)}, indent=1))
        manifest.flush()
        os.fsync(manifest.fileno())


def verify_checkpoint(folder: Path) -> None:
    """Every file the manifest lists is there with its size and hash unchanged. A checkpoint without a manifest
    (from before manifests, or whose manifest was deleted) is accepted when its safetensors and JSON files read."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        _check_readable(folder)
        return
    try:
        digests = json.loads(manifest.read_text())["sha256"]
        entries = list(digests.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(
            f"{manifest} is not a manifest xtune wrote (unreadable JSON, or no 'sha256' table): the checkpoint is "
            "damaged; use an earlier checkpoint."
        ) from None
    for name, digest in entries:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint (it is in {MANIFEST}); the checkpoint is damaged.")
        if file_sha256(path) != digest:
            raise CheckpointError(
                f"{path} differs from what was saved (sha256 mismatch with {MANIFEST}): truncated or edited; use an "
                "earlier checkpoint."
            )


def _check_readable(folder: Path) -> None:
    """What can be checked without a manifest: a safetensors file cut short fails to open (its header no longer
    covers the file), and a JSON file cut short fails to parse."""
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".json") and p.is_file()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_bytes())
            else:
                with safe_open(path, framework="pt"):
                    pass
        except (SafetensorError, ValueError, RecursionError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(
                f"{path} cannot be read ({reason}): it is cut short or damaged, and the checkpoint has no {MANIFEST} "
                "to check its other files against; use an earlier checkpoint."
            ) from None


def written_here(folder: Path, under: str = "") -> bool:
    """Whether xtune on this machine (with this $XTUNE_HOME) wrote the checkpoint: its manifest carries the HMAC of
    its hashes under this machine's key, and lists every file under `under`. The manifest's hashes alone show
    integrity, not origin: anyone can write a manifest for files of their own."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        digests, signature = manifest["sha256"], manifest["hmac"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(signature, str) or not hmac.compare_digest(signature, _signature(digests)):
        return False
    listed = {str(path.relative_to(folder)) for path in (folder / under).rglob("*") if path.is_file()}
    return listed <= set(digests)


KEY_FILE = "checkpoint.key"
"""In $XTUNE_HOME: the secret this machine's checkpoints are signed with (mode 0600, made on first use)."""


def _signature(digests: dict) -> str:
    key = _machine_key(xtune_home() / KEY_FILE)
    return hmac.new(key, json.dumps(digests, sort_keys=True).encode(), hashlib.sha256).hexdigest()


@functools.cache
def _machine_key(path: Path) -> bytes:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{KEY_FILE}.{os.getpid()}")
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(32))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(draft, path)  # whole or not at all; another process that made one first wins
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_bytes()


LOCK_FILE = ".xtune.lock"
"""In a run folder: locked (flock) by the process training in it; the lock goes with the process, even at kill -9."""


def lock_run(run_dir: Path):
    """Lock `run_dir` for the process that trains in it, for as long as the returned file stays open; a second
    process (two `--resume auto` at once) is refused by name instead of training over the first."""
    import fcntl

    handle = (run_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise CheckpointError(
            f"{run_dir} is being trained by {holder} right now; wait for it to end (or stop it) before resuming it."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}")
    handle.flush()
    return handle


def lock_holder(run_dir: Path) -> tuple[int, str] | None:
    """(pid, node) of the process training in `run_dir` now, as its lock file names them; None when no process
    holds the lock (a lock file left behind names a process that may since be another program)."""
    import fcntl

    try:
        handle = (run_dir / LOCK_FILE).open("r")
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken: lock_run's LOCK_EX is not held
        except BlockingIOError:
            match = re.fullmatch(r"pid (\d+) on (\S+)", handle.read().strip())
            return (int(match.group(1)), match.group(2)) if match else None
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def partial_checkpoint(run_dir: Path, step: int) -> Path:
    """Where checkpoint-<step> is written before it is renamed into place."""
    return run_dir / f".checkpoint-{step}.partial"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in step order (partial ones are never named checkpoint-N)."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def step_of(checkpoint: Path) -> int:
    """N of a `checkpoint-N` folder (-1 for a folder named otherwise)."""
    match = _CHECKPOINT.match(Path(checkpoint).name)
    return int(match.group(1)) if match else -1


def prune_checkpoints(run_dir: Path, keep: int, best: int | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond the newest `keep` (-1 keeps all), but never checkpoint-<best>;
    returns the deleted."""
    for leftover in run_dir.glob(".checkpoint-*.deleting"):  # from a prune that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    checkpoints = complete_checkpoints(run_dir)
    if keep < 0 or len(checkpoints) <= keep:
        return []
    doomed = [path for path in checkpoints[: len(checkpoints) - keep] if step_of(path) != best]
    for path in doomed:  # renamed first: a kill mid-delete leaves a hidden folder, never a half checkpoint-N
        aside = path.with_name(f".{path.name}.deleting")
        os.replace(path, aside)
        shutil.rmtree(aside)
    _unlink_xtuner_names(run_dir.parent)
    return doomed


BEST = "best.json"
"""In a run folder with save_best: which checkpoint has the lowest validation loss, and that loss."""


def write_best(run_dir: Path, step: int, eval_loss: float) -> None:
    """best.json, written aside and renamed: a kill meanwhile leaves the previous one whole."""
    draft = run_dir / f".{BEST}.partial"
    draft.write_text(json.dumps({"checkpoint": f"checkpoint-{step}", "step": step, "eval_loss": eval_loss}) + "\n")
    os.replace(draft, run_dir / BEST)


def peft_save_options(model) -> dict:
    """peft decides whether an adapter must carry the embedding layers (a grown vocabulary) by reading the base's
    config, from the Hub when `base_model_name_or_path` (what the user named) is no local folder: a network call at
    every save. xtune tells it instead, from the base's local config: saved when the vocabulary was grown."""
    configs = getattr(model, "peft_config", None)
    if not configs or not hasattr(model, "get_input_embeddings"):
        return {}
    from xtune.errors import XtuneError
    from xtune.models.load import read_config, resolve_model_path

    try:
        vocab = read_config(resolve_model_path(next(iter(configs.values())).base_model_name_or_path)).get("vocab_size")
    except (XtuneError, OSError, TypeError):
        return {}  # peft's own check then
    embeddings = model.get_input_embeddings()
    if not isinstance(embeddings, torch.nn.Embedding):  # a vision encoder's patch embedding: no vocabulary to grow
        return {"save_embedding_layers": False}
    return {} if vocab is None else {"save_embedding_layers": embeddings.num_embeddings != vocab}


def read_run_meta(path: Path) -> dict:
    meta = Path(path) / RUN_META
    return json.loads(meta.read_text()) if meta.is_file() else {}


TRAINING_STATE = "training_state.safetensors"
TRAINING_STATE_META = "training_state.json"


def write_training_state(folder: Path, optimizer_state: dict | None, scheduler, scaler, progress: dict) -> None:
    """Optimizer state (whole, as `optimizer.state_dict()` or FSDP's full one), scheduler, grad scaler,
    RNG states and data position, in safetensors + JSON (no pickle). Without an optimizer state and
    scheduler (DeepSpeed keeps its own), RNG states and data position only."""
    tensors: dict[str, torch.Tensor] = {}
    optimizer_state = _tensors_aside(optimizer_state, "optimizer", tensors) if optimizer_state else None
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{device}"] = state
    meta = {
        "progress": progress,
        "optimizer": optimizer_state,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"} if scheduler else None,
        "scaler": scaler.state_dict() if scaler else {},
        "rng_python": random.getstate(),
    }
    save_file(tensors, folder / TRAINING_STATE)
    (folder / TRAINING_STATE_META).write_text(json.dumps(meta))


def read_training_state(folder: Path, scheduler, scaler) -> tuple[dict, dict | None]:
    """Restores the scheduler, scaler and RNG states `write_training_state` wrote (None skips one);
    returns its progress and optimizer state for the caller to load."""
    missing = [name for name in (TRAINING_STATE, TRAINING_STATE_META) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder} has no {missing[0]}: it cannot be resumed (was it saved by xtune train?).")
    tensors = load_file(folder / TRAINING_STATE)
    meta = json.loads((folder / TRAINING_STATE_META).read_text())
    optimizer_state = None
    if meta["optimizer"] is not None:
        optimizer_state = _tensors_back(meta["optimizer"], tensors)
        optimizer_state["state"] = {  # torch numbers parameters; FSDP's full state names them
            int(key) if key.isdigit() else key: value for key, value in optimizer_state["state"].items()
        }
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(meta["scheduler"]["base_lrs"])})
    if meta["scaler"] and scaler is not None:
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = meta["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    return meta["progress"], optimizer_state


_TENSOR = "__tensor__:"


def _tensors_aside(value, path: str, tensors: dict[str, torch.Tensor], seen: dict | None = None):
    """`value` with every tensor moved into `tensors` (keyed by its path) and left as a reference, so the
    rest is JSON: this holds torch's and bitsandbytes' nested optimizer states alike. A tensor met twice (8-bit
    AdamW's quantization maps are one tensor for every parameter) is saved once and referenced from each place;
    one that only shares memory with another is copied (safetensors refuses shared memory)."""
    seen = {} if seen is None else seen
    if torch.is_tensor(value):
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        view = (storage, tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if view in seen:
            return _TENSOR + seen[view]
        if any(key[0] == storage for key in seen):
            tensor = tensor.clone()
        seen[(tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)] = path
        tensors[path] = tensor
        return _TENSOR + path
    if isinstance(value, dict):
        return {str(key): _tensors_aside(item, f"{path}.{key}", tensors, seen) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tensors_aside(item, f"{path}.{index}", tensors, seen) for index, item in enumerate(value)]
    return value


def _tensors_back(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, str) and value.startswith(_TENSOR):
        return tensors[value.removeprefix(_TENSOR)]
    if isinstance(value, dict):
        return {key: _tensors_back(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [_tensors_back(item, tensors) for item in value]
    return value


def find_resume_checkpoint(work_dir: str | Path, resume: str) -> Path | None:
    """`auto`: the newest complete checkpoint with a training state in any run under `work_dir`, or None
    when there is none yet (a job script can always pass --resume auto); otherwise the checkpoint folder
    `resume` names. The checkpoint's files are checked against its manifest."""
    if resume != "auto":
        path = Path(resume)
        path = path.resolve() if path.is_symlink() else path  # WORK_DIR/iter_N.pth, XTuner's name: the run's own folder
        if not (path / TRAINING_STATE).is_file():
            raise CheckpointError(f"--resume {resume}: not a complete checkpoint folder (no {TRAINING_STATE}).")
        verify_checkpoint(path)
        return path
    work_dir = Path(work_dir)
    for run in reversed(run_folders(work_dir)):
        resumable = [c for c in complete_checkpoints(run) if (c / TRAINING_STATE).is_file()]
        if resumable:
            verify_checkpoint(resumable[-1])
            return resumable[-1]
    return None
