"""The reward stage (`stage = "reward"`): a reward model trained on preference pairs, in the same loop as SFT and DPO.

Each answer's reward r is the score head (`xtune.models.reward`) at the answer's last token that is not padding: the
last position of its segment in a packed row, its row's last non-pad token unpacked, which is where transformers'
sequence classifiers read it. The loss is Bradley-Terry's -log s(r_chosen - r_rejected - margin), a mean over the
step's pairs, with Llama 2's margin where the pairs carry one (`RewardObjective.margins`), else 0; the metrics are TRL's
names for the rewards, summed over the pairs as `xtune.engine.preference.preference_metrics` sums them.
"""

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from xtune.config.schema import Config
from xtune.data.encode import IGNORE_INDEX
from xtune.engine.loss import PLAIN_HEAD_MODELS, kept_logits
from xtune.engine.preference import bradley_terry_loss, reward_penalty
from xtune.engine.sequence_parallel import SequenceParallel, group_max, group_sum, own_part
from xtune.errors import ConfigError
from xtune.models.lora import prepare_trainable
from xtune.models.reward import SCORE_HEAD, with_score_head


def answer_rewards(
    model, batch: dict, answer_ids: torch.Tensor, pad_token_id: int, autocast=nullcontext(),
    sp: SequenceParallel = SequenceParallel(),
) -> torch.Tensor:  # fmt: skip
    """Each answer's reward [answers], fp32: `answer_ids` [rows, tokens] says which answer each position belongs to
    (as `xtune.data.pairs` collates pairs, packed or not), -1 on padding. Every position of the answers goes through
    the head (one output column: cheap), and each answer's last non-pad one is picked on the device, without a
    host sync. A sample always holds its prompt's tokens, so an answer has a non-pad token. `sp`: `batch` is this
    rank's shard of the row, `answer_ids` the whole row's; an answer's last token is on one rank of the group, whose
    score every rank gets (a differentiable sum over the group, 0 from the others)."""
    device = batch["input_ids"].device
    count = int(answer_ids.max()) + 1
    answer_ids, start = own_part(answer_ids, sp)
    keep = answer_ids >= 0
    flat = keep.flatten().nonzero().squeeze(1)
    answers = answer_ids.flatten()[flat].to(device, non_blocking=True)
    flat = flat.to(device, non_blocking=True)
    _, scores = kept_logits(model, batch, keep, flat, autocast)
    tokens = batch["input_ids"].flatten().index_select(0, flat)
    positions = torch.arange(flat.numel(), device=device)
    candidates = torch.where(tokens != pad_token_id, positions, -1)
    last = torch.full((count,), -1, device=device).scatter_reduce_(0, answers, candidates, "amax")
    if sp.size == 1:
        return scores[last, 0].float()
    # -1 (no token of the answer here) picks the appended entries: no score, no position
    here = torch.cat([scores[:, 0].float(), scores.new_zeros(1, dtype=torch.float32)])[last]
    where = torch.cat([flat + start, flat.new_full((1,), -1)])[last]
    owner = (where == group_max(where, sp)) & (where >= 0)
    return group_sum(torch.where(owner, here, 0.0), sp)


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's reward metrics, summed over the pairs (divide by the pair count to log them)."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/margins": (chosen - rejected).sum(),
        "rewards/accuracies": (chosen > rejected).float().sum(),
    }


@dataclass
class RewardObjective:
    """What the reward stage changes in the loop, in the shape of `PreferenceObjective`: a loss summed over a
    micro-batch's pairs, their count, and the metric sums since `take_metrics`. `margins`: each pair's margin
    [pairs], by the batches' `group_ids` (the pairs' places in the training data); None: every margin 0."""

    pad_token_id: int
    margins: torch.Tensor | None = None
    loss: str = "ranking"
    """`ranking` or `focal` (Config.reward_loss)."""
    penalty: str = "none"
    """`none`, `log_barrier` or `L2` on both rewards of a pair (Config.reward_penalty), times `penalty_weight`."""
    penalty_weight: float = 0.0
    sequence_parallel: SequenceParallel = SequenceParallel()
    """Each row split over a group of ranks: every rank of it computes the whole loss and takes 1/N of it (as
    `xtune.engine.preference.PreferenceObjective` does)."""
    reference: object = None
    """A reward model has no reference model (nothing to precompute)."""
    metrics: dict = field(default_factory=dict)

    def count(self, batch: dict) -> torch.Tensor:
        """The pairs in a micro-batch; none in a rank's stand-in part (`rank_batch`: every label ignored). Sequence
        parallel: counted on the group's first rank (every rank of it holds the same pairs)."""
        counted = _trains(batch["labels"]) and self.sequence_parallel.rank == 0
        return torch.tensor(len(batch["group_ids"]) if counted else 0)

    def begin_step(self, batches: list[dict], device, autocast=nullcontext(), ranks=None) -> None:
        """Nothing is computed over a whole step before its micro-batches."""

    def loss_sum(self, model, batch: dict, labels: torch.Tensor, autocast=nullcontext()) -> torch.Tensor:
        """The summed per-pair losses of the micro-batch (`batch` without its labels, which stay on the host)."""
        group_ids, answer_ids = batch["group_ids"], batch["answer_ids"]
        batch = {key: value for key, value in batch.items() if key not in NOT_MODEL_INPUTS}
        rewards = answer_rewards(model, batch, answer_ids, self.pad_token_id, autocast, self.sequence_parallel)
        chosen, rejected = rewards[0::2], rewards[1::2]
        margins = None
        if self.margins is not None:
            margins = self.margins[group_ids].to(rewards.device, non_blocking=True)  # group_ids stay on the host
        losses = bradley_terry_loss(chosen, rejected, margins, focal=self.loss == "focal")
        if self.penalty != "none":
            penalties = reward_penalty(chosen, self.penalty) + reward_penalty(rejected, self.penalty)
            losses = losses + self.penalty_weight * penalties
        if not _trains(labels):  # a stand-in part runs forward and backward with every rank, and weighs nothing
            return losses.sum() * 0
        first = float(self.sequence_parallel.rank == 0)  # the group's ranks hold the same pairs: summed once
        for name, value in reward_metrics(chosen, rejected).items():
            self.metrics[name] = self.metrics.get(name, 0) + value * first
        return losses.sum() / self.sequence_parallel.size

    def take_metrics(self) -> dict[str, torch.Tensor]:
        taken, self.metrics = self.metrics, {}
        return taken

    def step_metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """The step's metrics from their sums over its pairs (of every rank): means per pair."""
        return {name: value / count for name, value in sums.items()}


NOT_MODEL_INPUTS = ("group_ids", "answer_ids", "kl", "desirable")
"""What a preference batch carries beside the model's inputs."""


def _trains(labels: torch.Tensor) -> bool:
    return bool((labels != IGNORE_INDEX).any())


def reward_setup(model, config: Config, pad_token_id: int, margins: list[float] | None = None):
    """(the model to train, its objective) for `stage = "reward"`: the causal LM's output head swapped for a new
    score head, made trainable as the config says (under LoRA/QLoRA the head trains in full, in the adapter's
    `modules_to_save`, so checkpoints hold it and a resume restores it), and the Bradley-Terry objective, with each
    pair's margin (`DataReport.margins`) where the data gives them."""
    if config.evaluation_inputs:
        raise ConfigError(
            "stage = 'reward' trains a model that scores answers and does not generate them: set "
            "evaluation_inputs = [] (`xtune reward score` scores held-out pairs)."
        )
    model_type = getattr(model.config, "model_type", None)
    if model_type not in PLAIN_HEAD_MODELS:
        raise ConfigError(
            f"stage = 'reward' trains models whose logits are their output head's as it is, which transformers' "
            f"sequence classifiers then compute alike: {', '.join(sorted(PLAIN_HEAD_MODELS))} (InternLM2 loads as "
            f"llama); not {model_type!r} yet (its logits are soft-capped or scaled after the head, or its modelling "
            "is remote code)."
        )
    model = with_score_head(model, config.seed)
    if SCORE_HEAD not in config.modules_to_save:
        config = config.model_copy(update={"modules_to_save": [*config.modules_to_save, SCORE_HEAD]})
    objective = RewardObjective(pad_token_id, torch.tensor(margins) if margins else None, config.reward_loss,
                                config.reward_penalty, config.reward_penalty_weight)  # fmt: skip
    return prepare_trainable(model, config), objective
