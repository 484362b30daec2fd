"""Validation during training: the next-token loss of held-out samples, without gradients, between steps.

The loss is the sum of the negative log-likelihoods of every trained token of the validation set over their count,
both summed over the ranks (not a mean of batch means), so batching, packing and the number of processes leave it
as it is; the perplexity is its exp. An MoE router's load-balancing term is left out: it is no likelihood. The model
runs in eval mode (no dropout) and draws no random number, so training goes on exactly as without validation.
"""

import math
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from xtune.engine.distributed import Ranks, all_sum
from xtune.engine.loss import FusedHead, next_token_loss_sum, next_token_targets, pop_labels


def validation_plan(items: Sequence, global_batch: int) -> list[list[int]]:
    """Indices of each global batch of validation items (samples or packed rows), longest first: less padding, and
    the same batches at every evaluation."""
    order = sorted(range(len(items)), key=lambda index: -len(items[index].input_ids))
    return [order[start : start + global_batch] for start in range(0, len(order), global_batch)]


def validation_loss(
    model, batches: Iterable[dict], device, autocast=nullcontext(), ranks: Ranks = Ranks(),
    fused: FusedHead | None = None,
) -> dict[str, float]:  # fmt: skip
    """`eval_loss` (mean over every trained token of `batches`, this rank's share of each, on all ranks),
    `eval_perplexity` and `eval_trained_tokens`, in eval mode, restoring train mode afterwards."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    trained = torch.zeros((), dtype=torch.float64, device=device)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            batch = dict(batch)
            labels, shifted = pop_labels(batch)
            batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
            loss_sum += next_token_loss_sum(model, batch, labels, autocast, fused, shifted=shifted).double()
            trained += next_token_targets(labels, shifted)[1].numel()
    model.train()
    loss_sum, trained = all_sum(torch.stack([loss_sum, trained]), ranks).tolist()
    loss = loss_sum / trained
    return {"eval_loss": loss, "eval_perplexity": perplexity(loss), "eval_trained_tokens": int(trained)}


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@dataclass
class BestEval:
    """The lowest validation loss so far, at which step, and how many evaluations since have not gone below it:
    part of a checkpoint's training state, so that a resumed run keeps, prunes and stops as the uninterrupted one."""

    step: int | None = None
    loss: float | None = None
    evals_since: int = 0

    def update(self, step: int, loss: float) -> bool:
        """Count an evaluation; whether it is the new best (a NaN never is)."""
        if loss < (math.inf if self.loss is None else self.loss):
            self.step, self.loss, self.evals_since = step, loss, 0
            return True
        self.evals_since += 1
        return False

    def out_of_patience(self, patience: int | None) -> bool:
        return patience is not None and self.evals_since >= patience

    def state(self) -> dict:
        return {"best_eval": asdict(self)}
