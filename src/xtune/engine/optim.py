"""AdamW with linear warmup then cosine decay to a floor (XTuner's LinearLR + CosineAnnealingLR)."""

import math

import torch

from xtune.config.schema import Config
from xtune.errors import ConfigError


def build_optimizer(parameters, config: Config, device: torch.device) -> torch.optim.Optimizer:
    options = dict(lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.optim_type == "adamw":
        return torch.optim.AdamW(parameters, fused=device.type in ("cuda", "cpu"), **options)
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"optim_type = {config.optim_type!r} needs bitsandbytes: pip install 'xtune[bnb]'.") from None
    if config.optim_type == "adamw_8bit":
        return bitsandbytes.optim.AdamW8bit(parameters, **options)
    return bitsandbytes.optim.PagedAdamW8bit(parameters, **options)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(optimizer, config: Config, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup_steps = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, config.lr_min_ratio)
    )
