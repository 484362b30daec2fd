"""One rank of a sequence-parallel forward and backward, started N times (gloo, CPU) by
tests/engine/test_sequence_parallel.py: `python sequence_parallel_worker.py SPEC OUT`.

SPEC (a torch file) holds a packed row (`collate_packed`'s keys) and the sequence_parallel_size. The rank loads the
tiny InternLM2 model in fp32 with the packed-aware attention in its Ulysses form, runs its shard of the row through
the next-token loss, backpropagates, and sums the gradients over the ranks (each rank's loss is its share of the
row's); OUT gets this rank's loss sum, trained-token count, shard and the summed gradients."""

import sys

import torch
import torch.distributed as dist

from xtune.engine import sequence_parallel
from xtune.engine.distributed import Ranks
from xtune.engine.loss import next_token_loss_sum, next_token_targets, pop_labels
from xtune.models.attention import use_varlen_attention
from xtune.models.load import load_model, resolve_model_path


def main(spec_path: str, out_path: str) -> None:
    spec = torch.load(spec_path, weights_only=False)
    dist.init_process_group("gloo")
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), dist.get_rank())
    sp = sequence_parallel.setup(ranks, spec["size"])
    model = load_model(resolve_model_path("xtune-tiny/internlm2-chat"), dtype=torch.float32)
    use_varlen_attention(model)
    sequence_parallel.use_ulysses(model, sp)
    batch = sequence_parallel.shard(spec["row"], sp.size, sp.rank)
    shard = {key: batch[key] for key in ("input_ids", "labels", "position_ids")}
    labels, shifted = pop_labels(batch)
    loss = next_token_loss_sum(model, batch, labels, shifted=shifted)
    loss.backward()
    grads = summed_gradients(model)
    trained = next_token_targets(labels, shifted)[1].numel()
    torch.save({"loss": loss.detach(), "trained": trained, "shard": shard, "grads": grads}, out_path)
    dist.destroy_process_group()


def summed_gradients(model) -> dict[str, torch.Tensor]:
    """Each parameter's gradient summed over the ranks (zeros where a rank made none)."""
    grads = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
        dist.all_reduce(grad)
        grads[name] = grad
    return grads


if __name__ == "__main__":
    main(*sys.argv[1:])
