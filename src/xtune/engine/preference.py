"""Preference losses, from the log-probabilities of answers: DPO and its loss types, SimPO, ORPO, KTO, and a reward
model's Bradley-Terry loss. Each function takes per-pair (or per-answer) tensors and returns per-pair losses, so a
caller sums them with the weights it needs; the formulas follow the papers and TRL's trainers, whose metric names
(`rewards/chosen`, `rewards/margins`, ...) `preference_metrics` writes.

Notation: `policy_chosen` is log pi(y_w | x), summed over the answer's tokens; `reference_*` the same under the
reference model (the adapter disabled, or a frozen copy); h = (policy_chosen - policy_rejected) - (reference_chosen
- reference_rejected), the difference of the two implicit rewards over beta.
"""

import hashlib
import json
import os
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from xtune.data.encode import IGNORE_INDEX
from xtune.engine.distributed import all_sum
from xtune.engine.loss import kept_logits, next_token_targets
from xtune.engine.sequence_parallel import SequenceParallel, group_sum, own_positions
from xtune.paths import file_sha256, write_failure

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


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       focal: bool = False) -> torch.Tensor:  # fmt: skip
    """A reward model's per-pair loss: -log s(r_w - r_l - margin) (Llama 2's margin term when given); `focal`:
    times (1 - p)^2, p = 2 relu(s(r_w - r_l - margin) - 1/2) (InternLM2's focal ranking loss)."""
    difference = chosen - rejected - (margin if margin is not None else 0)
    losses = -F.logsigmoid(difference)
    if focal:
        losses = (1 - 2 * torch.relu(torch.sigmoid(difference) - 0.5)) ** 2 * losses
    return losses


def reward_penalty(rewards: torch.Tensor, kind: str, bound: float = 5.0, epsilon: float = 1e-3) -> torch.Tensor:
    """Each reward's penalty: InternLM2's log barrier -log(bound - r) - log(r + bound), r clamped within `epsilon`
    of the bounds (no gradient beyond them), or `L2`, r^2; `none`, 0."""
    if kind == "none":
        return torch.zeros_like(rewards)
    if kind == "L2":
        return rewards.float() ** 2
    clamped = rewards.float().clamp(-bound + epsilon, bound - epsilon)
    return -torch.log(bound - clamped) - torch.log(clamped + bound)


def preference_metrics(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor, beta: float, weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """TRL's DPO metrics, summed over the pairs (divide by the pair count to log them): the implicit rewards
    beta (log pi - log pi_ref) of each answer, their margin, whether the chosen one's is higher, and the log-probs.
    `weights`: each pair's (0 leaves a pair out)."""
    chosen = beta * (policy_chosen - reference_chosen).detach()
    rejected = beta * (policy_rejected - reference_rejected).detach()
    w = torch.ones_like(chosen) if weights is None else weights
    return {
        "rewards/chosen": (chosen * w).sum(),
        "rewards/rejected": (rejected * w).sum(),
        "rewards/margins": ((chosen - rejected) * w).sum(),
        "rewards/accuracies": ((chosen > rejected).float() * w).sum(),
        "logps/chosen": (policy_chosen.detach() * w).sum(),
        "logps/rejected": (policy_rejected.detach() * w).sum(),
    }


# The preference stages in the training loop ------------------------------------------------------------------------

PREFERENCE_STAGES = ("dpo", "simpo", "orpo", "kto")
"""Stages trained on pairs (KTO: on examples with one answer each); SimPO and ORPO need no reference model."""


@dataclass
class PreferenceObjective:
    """What a preference stage changes in the loop: its loss is a mean over the step's pairs (KTO: examples), not its
    tokens, from the answers' log-probabilities under the policy and (DPO, KTO) the reference: the same weights with
    the LoRA adapter disabled, or a frozen copy for full fine-tuning (`reference`, a callable giving a context and a
    model), or the table `precompute` filled before training (`reference_table`, [groups, 2], by `group_ids`)."""

    stage: str
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    reference_free: bool = False
    orpo_alpha: float = 0.1
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: object = None
    reference_table: torch.Tensor | None = None
    policy: object = None
    """The policy model itself (not a wrapper for several processes): KTO's KL estimate runs it without gradients."""
    running: RunningMean = field(default_factory=RunningMean)
    sequence_parallel: SequenceParallel = SequenceParallel()
    """Each row split over a group of ranks (`xtune.engine.sequence_parallel`): every rank of the group computes the
    whole objective from the answers' log-probabilities summed over the group, and takes 1/N of it as its loss."""
    kl: torch.Tensor | None = None
    """KTO: the step's KL estimate z0 (`begin_step`)."""
    metrics: dict = field(default_factory=dict)
    """Metric sums over the pairs of the micro-batches since `take_metrics`."""

    def count(self, batch: dict) -> torch.Tensor:
        """The pairs (KTO: examples) in a micro-batch; none in a rank's stand-in part, which has no trained label.
        Sequence parallel: counted on the group's first rank (every rank of it holds the same pairs)."""
        counted = bool((batch["labels"] != IGNORE_INDEX).any()) and self.sequence_parallel.rank == 0
        return torch.tensor(len(batch["group_ids"]) if counted else 0)

    def begin_step(self, batches: list[dict], device, autocast=nullcontext(), ranks=None) -> None:
        """KTO: z0, the mean log-ratio of policy and reference on the step's mismatched answers, over every micro-batch
        and rank (so that accumulation and the process count leave it as it is), without gradients."""
        if self.stage != "kto":
            return
        total, answers = torch.zeros((), device=device), torch.zeros((), device=device)
        for batch in batches:
            kl = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k not in ("labels", "answer_ids") else v
                  for k, v in batch["kl"].items()}  # fmt: skip
            labels, answer_ids = kl.pop("labels"), kl.pop("answer_ids")
            with torch.no_grad():
                policy, counts = answer_logps(self.policy, kl, labels, answer_ids, autocast, self.sequence_parallel)
            reference = self._reference_sums(kl, labels, answer_ids, autocast, batch["group_ids"], column=1)
            real = (counts > 0) * self._first
            total += ((policy - reference) * real).sum()
            answers += real.sum()
        if ranks is not None:
            total, answers = all_sum(total, ranks), all_sum(answers, ranks)
        self.kl = (total / answers.clamp(min=1)).clamp(min=0)

    def loss_sum(self, model, batch: dict, labels: torch.Tensor, autocast=nullcontext()) -> torch.Tensor:
        """The summed per-pair (per-example) losses of the micro-batch (`batch` without its labels, which stay on the
        host)."""
        batch = dict(batch)
        answer_ids, group_ids = batch.pop("answer_ids"), batch.pop("group_ids")
        batch.pop("kl", None)
        desirable = batch.pop("desirable", None)
        sums, counts = answer_logps(model, batch, labels, answer_ids, autocast, self.sequence_parallel)
        if self.stage == "kto":
            return self._kto_loss_sum(batch, labels, answer_ids, group_ids, desirable, autocast, sums, counts)
        chosen, rejected = sums[0::2], sums[1::2]
        answered = (counts[0::2] > 0) & (counts[1::2] > 0)  # a rank's stand-in part has no loss
        mean_chosen, mean_rejected = chosen / counts[0::2].clamp(min=1), rejected / counts[1::2].clamp(min=1)
        if self.stage == "simpo":
            losses = simpo_losses(mean_chosen, mean_rejected, self.beta, self.simpo_gamma, self.label_smoothing)
            reference = (torch.zeros_like(chosen), torch.zeros_like(rejected))
        elif self.stage == "orpo":
            losses = -mean_chosen - self.orpo_alpha * orpo_odds_ratio(mean_chosen, mean_rejected)
            reference = (torch.zeros_like(chosen), torch.zeros_like(rejected))
        else:
            both = self._reference_sums(batch, labels, answer_ids, autocast, group_ids)
            if self.loss_type == "ipo":
                both = both / counts.clamp(min=1)
            reference = (both[0::2], both[1::2])
            policy = (mean_chosen, mean_rejected) if self.loss_type == "ipo" else (chosen, rejected)
            delta = 0.0
            if self.loss_type == "bco_pair":
                rewards = self.beta * torch.cat([chosen - reference[0], rejected - reference[1]]).detach()
                delta = self.running.update(rewards.mean().reshape(1))
            losses = dpo_losses(*policy, *reference, self.beta, self.loss_type, self.label_smoothing, delta)
            if self.rpo_alpha:
                losses = losses + self.rpo_alpha * -mean_chosen
        real = answered.float()
        for name, value in preference_metrics(chosen, rejected, *reference, self.beta, real * self._first).items():
            self.metrics[name] = self.metrics.get(name, 0) + value
        return (losses * real).sum() / self.sequence_parallel.size

    @property
    def _first(self) -> float:
        """1 on a group's first rank, 0 on the others: what every rank of a group computes alike is summed once."""
        return float(self.sequence_parallel.rank == 0)

    def _kto_loss_sum(self, batch, labels, answer_ids, group_ids, desirable, autocast, sums, counts) -> torch.Tensor:
        reference = self._reference_sums(batch, labels, answer_ids, autocast, group_ids, column=0)
        desirable = desirable.to(sums.device, non_blocking=True)
        losses = kto_losses(sums, reference, desirable, self.kl, self.beta, self.desirable_weight,
                            self.undesirable_weight)  # fmt: skip
        real = (counts > 0).float()
        rewards = self.beta * (sums - reference).detach()
        good, bad = desirable.float() * real * self._first, (~desirable).float() * real * self._first
        for name, value in {
            "rewards/chosen": (rewards * good).sum(), "rewards/rejected": (rewards * bad).sum(),
            "logps/chosen": (sums.detach() * good).sum(), "logps/rejected": (sums.detach() * bad).sum(),
            "count/chosen": good.sum(), "count/rejected": bad.sum(), "kl": self.kl * real.sum() * self._first,
        }.items():  # fmt: skip
            self.metrics[name] = self.metrics.get(name, 0) + value
        return (losses * real).sum() / self.sequence_parallel.size

    def _reference_sums(self, batch, labels, answer_ids, autocast, group_ids, column=None) -> torch.Tensor:
        """The reference's summed log-probability of each answer of the batch, in its order: from the precomputed
        table (a pair's two columns in turn; KTO: `column` 0 its answer, 1 its mismatched one), or a forward; zeros
        where `reference_free`."""
        if self.reference_free:
            return torch.zeros(int(answer_ids.max()) + 1, device=batch["input_ids"].device)
        if self.reference_table is not None:
            rows = self.reference_table[group_ids.to(self.reference_table.device)]
            values = rows.reshape(-1) if column is None else rows[:, column]
            return values.to(batch["input_ids"].device, non_blocking=True)
        context, model = self.reference()
        with torch.no_grad(), context:
            sums, _ = answer_logps(model, batch, labels, answer_ids, autocast, self.sequence_parallel)
        return sums

    def take_metrics(self) -> dict[str, torch.Tensor]:
        taken, self.metrics = self.metrics, {}
        return taken

    def step_metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """The step's metrics from their sums over its pairs (of every rank): means per pair; KTO's rewards and
        log-probabilities means over the desirable or the undesirable examples, as TRL logs them."""
        if self.stage != "kto":
            return {name: value / count for name, value in sums.items()}
        chosen, rejected = sums["count/chosen"], sums["count/rejected"]
        metrics = {"kl": sums["kl"] / count}
        for name, n in (("chosen", chosen), ("rejected", rejected)):
            if n:
                metrics[f"rewards/{name}"] = sums[f"rewards/{name}"] / n
                metrics[f"logps/{name}"] = sums[f"logps/{name}"] / n
        if chosen and rejected:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return metrics | {"count/chosen": chosen, "count/rejected": rejected}


def precompute_reference(objective: PreferenceObjective, batches, groups: int, device, autocast=nullcontext()) -> torch.Tensor:
    """The reference's summed log-probabilities of every group's two answers (a pair's chosen and rejected; a KTO
    example's answer and its mismatched one), [groups, 2], in one pass over `batches` (collated with `group_ids`)."""
    table = torch.zeros(groups, 2)
    sp = objective.sequence_parallel  # each batch a shard of its row: every rank of a group gets the whole table
    for batch in batches:
        batch = {k: v.to(device) if torch.is_tensor(v) and k not in ("labels", "answer_ids", "group_ids") else v
                 for k, v in batch.items()}  # fmt: skip
        group_ids, labels, answer_ids = batch.pop("group_ids"), batch.pop("labels"), batch.pop("answer_ids")
        kl, _ = batch.pop("kl", None), batch.pop("desirable", None)
        context, model = objective.reference()
        with torch.no_grad(), context:
            sums, _ = answer_logps(model, batch, labels, answer_ids, autocast, sp)
            if kl is None:
                table[group_ids] = sums.float().cpu().reshape(-1, 2)
            else:
                table[group_ids, 0] = sums.float().cpu()
                kl = {k: v.to(device) if torch.is_tensor(v) and k not in ("labels", "answer_ids") else v
                      for k, v in kl.items()}  # fmt: skip
                kl_labels, kl_answers = kl.pop("labels"), kl.pop("answer_ids")
                table[group_ids, 1] = answer_logps(model, kl, kl_labels, kl_answers, autocast, sp)[0].float().cpu()
    return table


def answer_logps(
    model, batch: dict, labels: torch.Tensor, answer_ids: torch.Tensor, autocast=nullcontext(),
    sp: SequenceParallel = SequenceParallel(),
):  # fmt: skip
    """(sum, count) of each answer's trained-token log-probabilities: `answer_ids` [rows, tokens] says which answer
    each position belongs to (0, 1 the first pair's chosen and rejected, ...), -1 on padding. Only the trained
    positions go through the head, as in SFT. `sp`: `batch` is this rank's shard of the row, `labels` and `answer_ids`
    the whole row's; the sums are over the group's shards (differentiable), the same on each of its ranks."""
    count = int(answer_ids.max()) + 1
    next_labels, answer_ids, _ = own_positions(labels, answer_ids, sp)
    keep, targets = next_token_targets(next_labels, shifted=True)
    device = batch["input_ids"].device
    flat = keep.flatten().nonzero().squeeze(1)
    answers = answer_ids.flatten()[flat].to(device, non_blocking=True)
    _, logits = kept_logits(model, batch, keep, flat.to(device, non_blocking=True), autocast)
    token = torch.log_softmax(logits.float(), dim=-1).gather(1, targets.to(device)[:, None]).squeeze(1)
    sums = torch.zeros(count, device=device).index_add_(0, answers, token)
    counts = torch.zeros(count, device=device).index_add_(0, answers, torch.ones_like(token))
    return group_sum(sums, sp), group_sum(counts, sp)


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
    for several processes: the reference (and KTO's KL estimate) runs on the model itself, never through DDP's
    bookkeeping. With `precompute_reference`, the reference is the model as it is now (no frozen copy of a full
    fine-tune): fill `reference_table` with `precompute_reference` before training, then drop `reference`."""
    if config.stage in ("sft", "reward"):
        return None
    needs_reference = config.stage in ("dpo", "kto") and not config.reference_free
    reference = None
    if needs_reference:
        if config.method != "full":
            reference = adapter_disabled(model)
        else:
            reference = (lambda: (nullcontext(), model)) if config.precompute_reference else frozen_copy(model)
    return PreferenceObjective(
        stage=config.stage, beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
        rpo_alpha=config.rpo_alpha, reference_free=not needs_reference, orpo_alpha=config.orpo_alpha,
        simpo_gamma=config.simpo_gamma, desirable_weight=config.desirable_weight,
        undesirable_weight=config.undesirable_weight, reference=reference, policy=model,
    )  # fmt: skip


def cached_reference(objective: PreferenceObjective, items, collate_fn, groups: int, config, report, model_path: Path,
                     dtype, device, console) -> torch.Tensor:  # fmt: skip
    """`precompute_reference`: the reference table of the run's `groups` pairs (KTO: examples), from the file beside
    its data cache entry, or computed in one pass over `items` (`collate_fn` batching them) and written there. Its
    name covers what the numbers depend on besides the data (the entry itself): the model's files, the precision and
    device kind, quantization and packing."""
    settings = {
        "model": model_fingerprint(model_path), "dtype": str(dtype), "device": device.type,
        "quantization": config.quantization, "packed": config.pack_to_max_length, "stage": config.stage,
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(report.cache) / f"reference-{key}.safetensors"
    found = path.is_file()
    if objective.sequence_parallel.size > 1:  # every rank looks before any writes: a group reads, or computes, as one
        torch.distributed.barrier()
    if found:
        console.print(f"reference log-probabilities (precompute_reference) read from {path}")
        return load_file(path)["reference"]
    size = config.batch_size
    batches = (collate_fn([items[i] for i in range(start, min(start + size, len(items)))])
               for start in range(0, len(items), size))  # fmt: skip
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    table = precompute_reference(objective, batches, groups, device, autocast)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file({"reference": table}, partial)
        os.replace(partial, path)
    except OSError as error:  # the numbers are in hand: training goes on, the next run computes them again
        partial.unlink(missing_ok=True)
        console.print(f"[yellow]could not cache the reference log-probabilities at {path}: {write_failure(error)}")
    console.print(f"reference log-probabilities of {len(table)} {'examples' if config.stage == 'kto' else 'pairs'} "
                  f"computed before training (precompute_reference), cached at {path}")  # fmt: skip
    return table


def model_fingerprint(path: Path) -> str:
    """The sha256 of a model folder's config and weights: a weight file in the Hugging Face cache by its blob's name
    (which is its sha256), others by their bytes."""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.name == "config.json" or file.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            target = file.resolve()
            blob = target.name if file.is_symlink() and len(target.name) == 64 else None
            digest.update(f"{file.name}:{blob or file_sha256(target)}".encode())
    return digest.hexdigest()
