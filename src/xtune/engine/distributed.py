"""Several processes through torch.distributed: launched by torchrun, data-parallel through DDP.

`NPROC_PER_NODE=N xtune train CONFIG` re-runs itself under torchrun (with NNODES, NODE_RANK, ADDR and
PORT when set). Each rank reads its share of every global batch; only rank 0 logs and saves.
"""

import os
import re
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from xtune.errors import XtuneError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def torchrun_command(argv: list[str]) -> list[str] | None:
    """The torchrun command that re-runs `argv` on NPROC_PER_NODE processes, or None when not asked
    for (or already under torchrun)."""
    processes = int(os.environ.get("NPROC_PER_NODE", "1"))
    if processes <= 1 or "LOCAL_RANK" in os.environ:
        return None
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    command += [f"--nnodes={os.environ.get('NNODES', '1')}", f"--node_rank={os.environ.get('NODE_RANK', '0')}"]
    command += [f"--master_addr={os.environ.get('ADDR', '127.0.0.1')}", f"--master_port={os.environ.get('PORT', '29500')}"]
    return [*command, "-m", "xtune.cli", *argv]


def slurm_environment(environ) -> None:
    """Under `srun` (one process per task): the torch.distributed variables from Slurm's, in place.
    The first node of the job hosts the rendezvous, at PORT (default 29500)."""
    if "SLURM_PROCID" not in environ:
        raise XtuneError("--launcher slurm: SLURM_PROCID is not set; start the job with srun (one task per GPU).")
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = environ.get("SLURM_NTASKS", "1")
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    environ.setdefault("MASTER_ADDR", first_host(environ.get("SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST", "127.0.0.1"))))
    environ.setdefault("MASTER_PORT", environ.get("PORT", "29500"))


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `gpu[07-09,12],cpu1` -> `gpu07`."""
    match = re.match(r"([^,\[]+)(?:\[([^,\-\]]+))?", nodelist.strip())
    if match is None:
        raise XtuneError(f"cannot read the Slurm node list {nodelist!r}; set MASTER_ADDR to the first node's address.")
    return match.group(1) + (match.group(2) or "")


def setup(device: torch.device, group_of_one: bool = False) -> Ranks:
    """Joins the process group torchrun describes (nccl on GPUs, gloo on CPUs); one process otherwise,
    in a group of its own when `group_of_one` (DeepSpeed needs a process group even then)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world <= 1:
        if group_of_one and not dist.is_initialized():
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group(backend)
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    return ranks


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def all_sum(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    if ranks.world > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def share(value, ranks: Ranks):
    """Rank 0's `value` on every rank."""
    if ranks.world <= 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def my_share(indices: list[int], ranks: Ranks) -> tuple[list[int], bool]:
    """This rank's part of a global batch, and whether it is real: a rank left without any item gets
    the batch's first item to run with no loss, because every rank must take part in each backward."""
    part = indices[ranks.rank :: ranks.world]
    return (part, True) if part else (indices[:1], False)


def wrap(model, ranks: Ranks, strategy: str, device: torch.device):
    """The module to run forward and backward through: DDP around the model, or the model itself after
    FSDP2 sharded each decoder layer and the whole in place."""
    if ranks.world <= 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    from xtune.models.compile import decoder_layers

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def full_state_dict(model, ranks: Ranks, strategy: str) -> dict | None:
    """Under FSDP, the whole (unsharded) state dict, gathered on every rank (a collective); else None
    (save_pretrained reads the model itself)."""
    if ranks.world <= 1 or strategy != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextmanager
def gradient_sync(model, last: bool):
    """Reduce gradients across ranks only on the last micro-batch of a step, not on each one."""
    if hasattr(model, "no_sync") and not last:  # DDP
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    yield


def optimizer_state(model, optimizer, ranks: Ranks, strategy: str) -> dict:
    """The whole optimizer state: FSDP's sharded state gathered and keyed by parameter name (a
    collective), else the optimizer's own."""
    if ranks.world <= 1 or strategy != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict, ranks: Ranks, strategy: str) -> None:
    """Loads what `optimizer_state` returned; under FSDP each rank keeps its shard of it."""
    if ranks.world <= 1 or strategy != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
