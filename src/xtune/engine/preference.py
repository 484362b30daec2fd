"""Preference losses, from the log-probabilities of answers: DPO and its loss types, SimPO, ORPO, KTO, and a reward
model's Bradley-Terry loss. Each function takes per-pair (or per-answer) tensors and returns per-pair losses, so a
caller sums them with the weights it needs; the formulas follow the papers and TRL's trainers, whose metric names
(`rewards/chosen`, `rewards/margins`, ...) `preference_metrics` writes.

Notation: `policy_chosen` is log pi(y_w | x), summed over the answer's tokens; `reference_*` the same under the
reference model (the adapter disabled, or a frozen copy); h = (policy_chosen - policy_rejected) - (reference_chosen
- reference_rejected), the difference of the two implicit rewards over beta.
"""

from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from xtune.engine.loss import kept_logits, next_token_targets

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "kto_pair", "bco_pair", "sppo_hard", "nca_pair")


@dataclass
class RunningMean:
    """bco_pair's delta: the mean of the batches' mean rewards so far (as TRL keeps it), a sum and a count so that
    it resumes exactly."""

    total: float = 0.0
    count: int = 0

    def update(self, values: torch.Tensor) -> float:
        self.total += float(values.detach().float().sum())
        self.count += values.numel()
        return self.total / self.count


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    delta: float = 0.0,
) -> torch.Tensor:
    """Per-pair DPO losses of `loss_type` (Rafailov et al. 2023 and its variants):

    - sigmoid: -(1 - eps) log s(beta h) - eps log s(-beta h) (eps = label_smoothing: cDPO)
    - robust: (-(1 - eps) log s(beta h) + eps log s(-beta h)) / (1 - 2 eps) (Chowdhury et al. 2024)
    - hinge: max(0, 1 - beta h) (SLiC)
    - ipo: (h - 1 / (2 beta))^2 (Azar et al. 2023), on log-probabilities averaged per token (pass those)
    - kto_pair: 1 - s(beta (c - r_kl)) and 1 - s(beta (c_kl - r)) averaged, with c, r the chosen and rejected
      log-ratios and c_kl, r_kl their batch means clamped at 0
    - bco_pair: -log s(beta c - delta) - log s(-(beta r - delta)), delta the running mean of the rewards
    - sppo_hard: (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2
    - nca_pair: -log s(beta c) - log s(-beta c) / 2 - log s(-beta r) / 2
    """
    chosen = policy_chosen - reference_chosen
    rejected = policy_rejected - reference_rejected
    h = chosen - rejected
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "robust":
        robust = -(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)
        return robust / (1 - 2 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "kto_pair":
        chosen_kl, rejected_kl = chosen.mean().clamp(min=0), rejected.mean().clamp(min=0)
        return (2 - torch.sigmoid(beta * (chosen - rejected_kl)) - torch.sigmoid(beta * (chosen_kl - rejected))) / 2
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen - delta) - F.logsigmoid(-(beta * rejected - delta))
    if loss_type == "sppo_hard":
        return (chosen - 1 / (2 * beta)) ** 2 + (rejected + 1 / (2 * beta)) ** 2
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * chosen) - 0.5 * F.logsigmoid(-beta * chosen) - 0.5 * F.logsigmoid(-beta * rejected)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; known: {', '.join(DPO_LOSS_TYPES)}")


def simpo_losses(
    mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, beta: float = 2.0, gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """SimPO (Meng et al. 2024): no reference; the answers' mean log-probabilities per token, a target margin gamma:
    -(1 - eps) log s(beta (m_w - m_l) - gamma) - eps log s(-(beta (m_w - m_l) - gamma))."""
    z = beta * (mean_chosen - mean_rejected) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def orpo_odds_ratio(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor) -> torch.Tensor:
    """ORPO's (Hong et al. 2024) log s(log odds(y_w) - log odds(y_l)), odds(y) = P(y) / (1 - P(y)) with P the mean
    per-token probability; the loss is the chosen answer's NLL minus orpo_alpha times this, per pair."""
    log_odds = (mean_chosen - mean_rejected) - (torch.log1p(-mean_chosen.exp()) - torch.log1p(-mean_rejected.exp()))
    return F.logsigmoid(log_odds)


def kto_losses(
    policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float = 0.1,
    desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """KTO (Ethayarajh et al. 2024) on unpaired answers: with r = log pi(y|x) - log pi_ref(y|x) and z0 the KL estimate
    (the batch's mean log-ratio on mismatched prompt/answer pairs, clamped at 0, never differentiated),
    desirable_weight (1 - s(beta (r - z0))) for a desirable answer, undesirable_weight (1 - s(beta (z0 - r))) else."""
    ratio = policy - reference
    z0 = kl.detach().clamp(min=0)
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio)))
    return torch.where(desirable, good, bad)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """A reward model's per-pair loss: -log s(r_w - r_l - margin) (Llama 2's margin term when given)."""
    return -F.logsigmoid(chosen - rejected - (margin if margin is not None else 0))


def preference_metrics(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor, beta: float,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """TRL's DPO metrics, summed over the pairs (divide by the pair count to log them): the implicit rewards
    beta (log pi - log pi_ref) of each answer, their margin, whether the chosen one's is higher, and the log-probs."""
    chosen = beta * (policy_chosen - reference_chosen).detach()
    rejected = beta * (policy_rejected - reference_rejected).detach()
    return {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/margins": (chosen - rejected).sum(),
        "rewards/accuracies": (chosen > rejected).float().sum(),
        "logps/chosen": policy_chosen.detach().sum(),
        "logps/rejected": policy_rejected.detach().sum(),
    }


# The preference stages in the training loop ------------------------------------------------------------------------

PREFERENCE_STAGES = ("dpo", "simpo", "orpo")
"""Stages trained on pairs; `reference_free` stages (SimPO, ORPO) need no reference model."""


@dataclass
class PreferenceObjective:
    """What a preference stage changes in the loop: its loss is a mean over the step's pairs (not its tokens), from
    the answers' log-probabilities under the policy and (DPO) the reference: the same weights with the LoRA adapter
    disabled, or a frozen copy for full fine-tuning (`reference`, a callable giving a context and a model)."""

    stage: str
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    reference_free: bool = False
    orpo_alpha: float = 0.1
    simpo_gamma: float = 0.5
    reference: object = None
    running: RunningMean = field(default_factory=RunningMean)
    metrics: dict = field(default_factory=dict)
    """Metric sums over the pairs of the micro-batches since `take_metrics`."""

    def count(self, batch: dict) -> torch.Tensor:
        """The pairs in a micro-batch (its answers come two by two)."""
        return torch.tensor((int(batch["answer_ids"].max()) + 1) // 2)

    def loss_sum(self, model, batch: dict, labels: torch.Tensor, autocast=nullcontext()) -> torch.Tensor:
        """The summed per-pair losses of the micro-batch (`batch` without its labels, which stay on the host)."""
        batch = dict(batch)
        answer_ids = batch.pop("answer_ids")
        sums, counts = answer_logps(model, batch, labels, answer_ids, autocast)
        chosen, rejected = sums[0::2], sums[1::2]
        mean_chosen, mean_rejected = chosen / counts[0::2], rejected / counts[1::2]
        if self.stage == "simpo":
            losses = simpo_losses(mean_chosen, mean_rejected, self.beta, self.simpo_gamma, self.label_smoothing)
            reference = (torch.zeros_like(chosen), torch.zeros_like(rejected))
        elif self.stage == "orpo":
            losses = -mean_chosen - self.orpo_alpha * orpo_odds_ratio(mean_chosen, mean_rejected)
            reference = (torch.zeros_like(chosen), torch.zeros_like(rejected))
        else:
            reference = self._reference_logps(batch, labels, answer_ids, autocast, counts)
            policy = (mean_chosen, mean_rejected) if self.loss_type == "ipo" else (chosen, rejected)
            delta = 0.0
            if self.loss_type == "bco_pair":
                rewards = self.beta * torch.cat([chosen - reference[0], rejected - reference[1]]).detach()
                delta = self.running.update(rewards.mean().reshape(1))
            losses = dpo_losses(*policy, *reference, self.beta, self.loss_type, self.label_smoothing, delta)
            if self.rpo_alpha:
                losses = losses + self.rpo_alpha * -mean_chosen
        for name, value in preference_metrics(chosen, rejected, *reference, self.beta).items():
            self.metrics[name] = self.metrics.get(name, 0) + value
        return losses.sum()

    def _reference_logps(self, batch, labels, answer_ids, autocast, counts):
        if self.reference_free:
            zeros = torch.zeros(len(counts) // 2, device=counts.device)
            return zeros, zeros
        context, model = self.reference()
        with torch.no_grad(), context:
            sums, _ = answer_logps(model, batch, labels, answer_ids, autocast)
        if self.loss_type == "ipo":
            sums = sums / counts
        return sums[0::2], sums[1::2]

    def take_metrics(self) -> dict[str, torch.Tensor]:
        taken, self.metrics = self.metrics, {}
        return taken


def answer_logps(model, batch: dict, labels: torch.Tensor, answer_ids: torch.Tensor, autocast=nullcontext()):
    """(sum, count) of each answer's trained-token log-probabilities: `answer_ids` [rows, tokens] says which answer
    each position belongs to (0, 1 the first pair's chosen and rejected, ...), -1 on padding. Only the trained
    positions go through the head, as in SFT."""
    keep, targets = next_token_targets(labels)
    device = batch["input_ids"].device
    flat = keep.flatten().nonzero().squeeze(1)
    answers = answer_ids.flatten()[flat].to(device, non_blocking=True)
    count = int(answer_ids.max()) + 1
    _, logits = kept_logits(model, batch, keep, flat.to(device, non_blocking=True), autocast)
    token = torch.log_softmax(logits.float(), dim=-1).gather(1, targets.to(device)[:, None]).squeeze(1)
    sums = torch.zeros(count, device=device).index_add_(0, answers, token)
    counts = torch.zeros(count, device=device).index_add_(0, answers, torch.ones_like(token))
    return sums, counts


def adapter_disabled(model):
    """The reference of a LoRA/QLoRA policy: its base weights, the adapter switched off (no second copy)."""
    return lambda: (model.disable_adapter(), model)


def frozen_copy(model):
    """The reference of a fully fine-tuned policy: a copy of its weights before training, frozen."""
    copy = deepcopy(model).eval()
    for parameter in copy.parameters():
        parameter.requires_grad_(False)
    return lambda: (nullcontext(), copy)


def preference_objective(config, model) -> PreferenceObjective | None:
    """The config's preference stage with its reference model, or None for SFT. Call before the model is wrapped
    for several processes: the reference runs on the model itself, never through DDP's bookkeeping."""
    if config.stage == "sft":
        return None
    needs_reference = config.stage == "dpo" and not config.reference_free
    reference = None
    if needs_reference:
        reference = frozen_copy(model) if config.method == "full" else adapter_disabled(model)
    return PreferenceObjective(
        stage=config.stage, beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
        rpo_alpha=config.rpo_alpha, reference_free=config.reference_free or config.stage != "dpo",
        orpo_alpha=config.orpo_alpha, simpo_gamma=config.simpo_gamma, reference=reference,
    )  # fmt: skip
