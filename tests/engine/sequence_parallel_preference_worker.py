"""One rank of a sequence-parallel preference objective, started N times (gloo, CPU) by
tests/engine/test_sequence_parallel.py: `python sequence_parallel_preference_worker.py SPEC OUT`.

SPEC (a torch file) holds a collated packed row of preference pairs (`PreferenceCollator`'s keys), the
sequence_parallel_size and the objectives to run (CASES). For each, the rank loads the tiny InternLM2 model in fp32
with the Ulysses attention (`preference_model`), runs its shard of the row through the objective's `loss_sum`,
backpropagates and sums the gradients over the ranks; OUT gets, per objective, this rank's loss and the summed
gradients. The test runs the same functions on the whole row in one process."""

import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

from xtune.engine import sequence_parallel
from xtune.engine.distributed import Ranks
from xtune.engine.loss import pop_labels
from xtune.engine.preference import PreferenceObjective
from xtune.engine.reward import RewardObjective
from xtune.models.attention import use_varlen_attention
from xtune.models.load import load_model, resolve_model_path
from xtune.models.reward import with_score_head

from tests.engine.sequence_parallel_worker import summed_gradients  # run with the repository on PYTHONPATH

CASES = ("dpo-sigmoid", "dpo-ipo", "dpo-nca_pair", "simpo", "orpo", "reward")
"""DPO's loss types with a reference forward (sigmoid: the same weights, through the Ulysses attention too) or a
table (the others), SimPO and ORPO on mean log-probabilities, and a reward model's scores."""
PAD = 0


def preference_model(case: str, sp: sequence_parallel.SequenceParallel):
    model = load_model(resolve_model_path("xtune-tiny/internlm2-chat"), dtype=torch.float32)
    use_varlen_attention(model)
    sequence_parallel.use_ulysses(model, sp)
    return with_score_head(model) if case == "reward" else model


def objective(case: str, sp: sequence_parallel.SequenceParallel, groups: int):
    stage, _, loss_type = case.partition("-")
    if stage == "reward":
        return RewardObjective(PAD, margins=torch.linspace(0, 1, groups), sequence_parallel=sp)
    if stage != "dpo":
        return PreferenceObjective(stage, beta=2.0 if stage == "simpo" else 0.1, sequence_parallel=sp)
    reference = preference_model(case, sp).eval()
    table = -40 + 10 * torch.rand(groups, 2, generator=torch.Generator().manual_seed(0))
    return PreferenceObjective(
        "dpo", loss_type=loss_type, sequence_parallel=sp, reference=lambda: (nullcontext(), reference),
        reference_table=None if loss_type == "sigmoid" else table,
    )  # fmt: skip


def main(spec_path: str, out_path: str) -> None:
    spec = torch.load(spec_path, weights_only=False)
    dist.init_process_group("gloo")
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), dist.get_rank())
    sp = sequence_parallel.setup(ranks, spec["size"])
    results = {}
    for case in CASES:
        model = preference_model(case, sp)
        batch = sequence_parallel.shard(spec["row"], sp.size, sp.rank)
        labels, _ = pop_labels(batch)
        loss = objective(case, sp, spec["groups"]).loss_sum(model, batch, labels)
        loss.backward()
        results[case] = {"loss": loss.detach(), "grads": summed_gradients(model)}
    torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
