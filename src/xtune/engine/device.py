"""Which device and compute precision a run uses."""

from functools import cache
from pathlib import Path

import torch

from xtune.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    """`auto` (cuda if there is one, else cpu), `cpu`, `cuda` or `cuda:N`; anything else, or a GPU that is not
    there, is a ConfigError naming the key."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device = {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA devices" if torch.cuda.is_available() else "no CUDA device"
        raise ConfigError(f"device = {name!r}, but this machine has {found}; use device = 'auto' or 'cpu'.")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device = {name!r}: xtune trains on cpu or cuda; use auto, cpu, cuda or cuda:N.")
    return device


@cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (`avx2`, `avx512f`, `avx512_bf16`, `amx_bf16`, ...);
    none where there is no /proc/cpuinfo."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return frozenset()
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):  # x86, Arm
            return frozenset(value.split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run several times faster than fp32 on such CPUs. Without them bf16 is
    emulated, far slower than fp32 (0.8 GFLOP/s against 71 measured on an AVX2-only CPU)."""
    return not cpu_flags().isdisjoint({"avx512_bf16", "amx_bf16"})


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 where the device runs it fast, else fp16 on GPUs and fp32 on CPUs."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
