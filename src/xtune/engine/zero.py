"""DeepSpeed ZeRO through DeepSpeed's own engine.

A run names a shipped JSON (`deepspeed_zero1`, `deepspeed_zero2`, `deepspeed_zero2_offload`,
`deepspeed_zero3`, `deepspeed_zero3_offload`) or a path to its own. As in the Hugging Face Trainer,
`"auto"` values are filled from the xtune config, so batch size, accumulation, clipping and precision
are said once; a number that contradicts the config is an error, not a silent winner.
"""

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from xtune.config.schema import Config
from xtune.engine.checkpoint import KEY_FILE, MANIFEST, written_here
from xtune.errors import CheckpointError, ConfigError
from xtune.paths import xtune_home

SHIPPED = Path(__file__).parent / "deepspeed_configs"
STATE_FOLDER = "deepspeed"
"""Inside a checkpoint: DeepSpeed's own (per-rank, partitioned) optimizer and scheduler state."""
_TAG = "state"


def shipped_names() -> list[str]:
    return sorted(path.stem for path in SHIPPED.glob("*.json"))


def find_deepspeed_config(name_or_path: str) -> Path:
    """A shipped config by name (`deepspeed_zero2` or `zero2`) or a JSON file."""
    for name in (name_or_path, f"deepspeed_{name_or_path}"):
        if (SHIPPED / f"{name}.json").is_file():
            return SHIPPED / f"{name}.json"
    path = Path(name_or_path)
    if path.is_file():
        return path
    raise ConfigError(
        f"deepspeed = {name_or_path!r}: no such file and not a shipped config; use one of {', '.join(shipped_names())} "
        "or the path of a DeepSpeed JSON file."
    )


def _filled(config: Config, world: int, dtype: torch.dtype) -> dict[str, tuple[object, str]]:
    """DeepSpeed key -> (value the xtune config implies, the config key a user would change)."""
    return {
        "train_micro_batch_size_per_gpu": (config.batch_size, "batch_size"),
        "gradient_accumulation_steps": (config.accumulative_counts, "accumulative_counts"),
        "train_batch_size": (config.batch_size * config.accumulative_counts * world, "batch_size"),
        "gradient_clipping": (config.max_norm if config.max_norm is not None else 0.0, "max_norm"),
        "fp16.enabled": (dtype == torch.float16, "dtype"),
        "bf16.enabled": (dtype == torch.bfloat16, "dtype"),
    }


def deepspeed_config(config: Config, world: int, dtype: torch.dtype) -> dict:
    """The DeepSpeed config dict for this run: the named JSON with its "auto" values filled in."""
    path = find_deepspeed_config(config.deepspeed)
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}: not valid JSON ({error.msg}).") from None
    for block in ("optimizer", "scheduler"):
        if block in settings:
            raise ConfigError(
                f"{path}: remove the {block!r} block; xtune builds the optimizer and the warmup + cosine schedule "
                "from the config (optim_type, lr, betas, weight_decay, warmup_ratio, lr_min_ratio)."
            )
    for dotted, (wanted, key) in _filled(config, world, dtype).items():
        *parents, leaf = dotted.split(".")
        holder = settings
        for parent in parents:
            holder = holder.setdefault(parent, {})
        value = holder.get(leaf, "auto")
        if value == "auto":
            holder[leaf] = wanted
        elif value != wanted:
            raise ConfigError(
                f"{path}: {dotted} = {value!r}, but the xtune config implies {wanted!r}; write \"auto\" there "
                f"(xtune fills it in) or change {key} in the config."
            )
    if zero_stage(settings) == 3 and config.visual_encoder_name_or_path is not None:
        raise ConfigError(f"{path}: ZeRO stage 3 is not wired for LLaVA models yet; use deepspeed_zero2.")
    if zero_stage(settings) == 3 and config.quantization is not None:
        raise ConfigError(
            f"{path}: ZeRO stage 3 cannot partition a {config.quantization} quantized base; use deepspeed_zero2 for QLoRA."
        )
    return settings


def zero_stage(settings: dict) -> int:
    return int(settings.get("zero_optimization", {}).get("stage", 0))


def initialize(model, optimizer, scheduler, settings: dict):
    """DeepSpeed's engine around the model; it owns the optimizer and steps the scheduler."""
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(
            "deepspeed is set but DeepSpeed is not installed: pip install --no-build-isolation 'xtune[deepspeed]'."
        ) from None
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=settings)
    return engine


@contextmanager
def launcher_variables(active: bool):
    """DeepSpeed reads LOCAL_RANK throughout a run; one process started without a launcher has none.
    Set while the run lasts, then removed, so that processes started later do not think they run
    under torchrun."""
    single = active and "LOCAL_RANK" not in os.environ
    if single:
        os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if single:
            os.environ.pop("LOCAL_RANK", None)


def gathered_state_dict(engine) -> dict | None:
    """Under ZeRO-3 the whole 16-bit state dict, gathered on rank 0 (a collective); else None, since
    every rank holds the whole model."""
    if engine.zero_optimization_stage() != 3:
        return None
    return engine._zero3_consolidated_16bit_state_dict()


def save_state(engine, folder: Path) -> None:
    """Every rank writes its partition of the optimizer state into `folder`/deepspeed (a collective)."""
    engine.save_checkpoint(str(folder / STATE_FOLDER), tag=_TAG, save_latest=False, exclude_frozen_parameters=True)


def check_trusted(checkpoint: Path, trust_checkpoint: bool) -> None:
    """DeepSpeed's state is torch pickles, which run code when loaded: they are read only from a checkpoint that
    xtune on this machine wrote (its signed manifest), or when the user says they trust it."""
    if trust_checkpoint or written_here(checkpoint, under=STATE_FOLDER):
        return
    raise CheckpointError(
        f"{checkpoint}: its DeepSpeed state ({STATE_FOLDER}/) is pickles, which can run code when loaded, and this "
        f"checkpoint was not written by xtune on this machine (its {MANIFEST} is not signed with the key in "
        f"{xtune_home() / KEY_FILE}). If you trust where it came from, resume with --trust-checkpoint."
    )


def load_state(engine, checkpoint: Path) -> None:
    if not (checkpoint / STATE_FOLDER / _TAG).is_dir():
        raise CheckpointError(
            f"{checkpoint} has no DeepSpeed state ({STATE_FOLDER}/{_TAG}/): it was not saved by a DeepSpeed run; "
            "resume it without deepspeed."
        )
    load_path, _ = engine.load_checkpoint(str(checkpoint / STATE_FOLDER), tag=_TAG, load_module_strict=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load its state from {checkpoint / STATE_FOLDER}.")
