"""The training loss: next-token cross-entropy summed over the trained positions, and only those.

Only positions whose next token is trained go through the output head (`logits_to_keep` takes positions or
a boolean mask in transformers 5): prompts, system turns and padding get no logits at all. Where the head is a plain
`nn.Linear` on an unsharded model, `FusedHead` goes further: the model hands back the kept hidden states,
and `linear_cross_entropy` computes logits, loss and both gradients chunk by chunk in the forward pass, so
the [tokens, vocab] logits never exist whole (InternLM2's vocab is 92,544: 2,048 tokens of fp32 logits are
0.76 GB, their gradient as much again) and nothing is recomputed.

MoE models add their router's load-balancing loss (`router_aux_coefficient`): Switch Transformer's
`num_experts * sum_e f_e * P_e` over every layer, a mean over a forward's tokens, as the family computes it
(`output_router_logits`). A micro-batch's sum holds `coef * aux_loss * its trained positions`, so the step's loss is
the mean cross-entropy plus `coef` times the micro-batches' aux losses weighted by their trained positions: for one
micro-batch exactly the model's own `model(..., labels=labels, output_router_logits=True).loss`, which a Hugging Face
Trainer reports (xtune logs it too), and independent of the number of micro-batches and processes (HF's Trainer adds
`coef * aux_loss` once per micro-batch, so its weight grows with both). The tokens counted: an unpacked batch's
`attention_mask` leaves its padding out, as the model does. A packed row has no padding mask, and its padding
segment (one id at consecutive positions, routed alike) would count: at 2% / 5% padding it moved the router's
gradient from aux_loss by 16% / 39% (tiny Mixtral; 8% / 20% Qwen3-MoE). So a packed row's aux_loss is recomputed
over its samples' tokens (`router_aux_loss`): what the unpacked batch of the same samples gives.
"""

import inspect
import sys
from contextlib import contextmanager, nullcontext
from functools import lru_cache

import torch
import torch.nn.functional as F

from xtune.data.encode import IGNORE_INDEX
from xtune.errors import ConfigError, TrainingError

LOGITS_PER_CHUNK = 1 << 25
"""Logit elements per chunk of `linear_cross_entropy` (128 MiB in fp32): 362 tokens of a 92,544 vocab,
a whole 2,048-token row of a small one."""


PLAIN_HEAD_MODELS = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3"}
"""Model types (InternLM2 loads as llama) whose logits are the head's output as it is: no soft-capping (Gemma 2)
or scaling (Cohere, Granite) after it, which the fused loss would apply to hidden states instead."""


SHIFTED = "labels_are_next_tokens"
"""In a batch: its `labels` are each position's next-token label already (a sequence-parallel shard's: the shift
was made on the whole row, `xtune.engine.sequence_parallel.shard`)."""


def pop_labels(batch: dict) -> tuple[torch.Tensor, bool]:
    """The batch's labels, taken out of it (the model is not given them), and whether they are shifted already."""
    return batch.pop("labels"), bool(batch.pop(SHIFTED, False))


def next_token_targets(labels: torch.Tensor, shifted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): keep[b, i] is whether position i's next token is trained; targets are those next
    tokens, in the order `hidden_states[keep]` lists the kept positions."""
    next_labels = labels if shifted else F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = next_labels != IGNORE_INDEX
    return keep, next_labels[keep]


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, with both gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, chunk):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, targets.numel(), chunk):
                h, t = hidden[start : start + chunk].to(compute_dtype), targets[start : start + chunk]
                logits = (h @ w.T).float()  # rounded to the compute dtype first, as the head's own output is
                log_z = torch.logsumexp(logits, dim=-1)
                loss += (log_z - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                grad = logits.sub_(log_z[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(t.numel(), device=t.device), t] -= 1
                grad = grad.to(compute_dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk] = grad @ w
                if grad_weight is not None:
                    grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (  # scaled in fp32: an fp16 loss scale (65,536) is past fp16's range
            (grad_hidden.float() * grad_loss).to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None,
            None, None, None,
        )  # fmt: skip


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None):
    """`F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")` for hidden (tokens, dim)
    and weight (vocab, dim), the linear layer in the autocast dtype when autocast is on (as the head runs),
    without holding the whole logits."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    chunk = chunk or max(1, LOGITS_PER_CHUNK // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, chunk)


class FusedHead:
    """Computes the loss from the model's head weight: while `hidden_states()` is entered the head passes its
    input through (its module and state dict stay as they are), and `loss_sum` applies the weight."""

    def __init__(self, head: torch.nn.Linear):
        self.head = head

    @classmethod
    def of(cls, model) -> "FusedHead | None":
        """The fused head for `model` (a causal LM, a peft model around one, or LLaVA's), or None where the
        head is not a plain linear layer (LoRA on the head, `modules_to_save`, a bias, a quantized head) or the
        model changes the logits after it (not in PLAIN_HEAD_MODELS)."""
        language_model = getattr(model, "llm", model)
        if getattr(getattr(language_model, "config", None), "model_type", None) not in PLAIN_HEAD_MODELS:
            return None
        head = language_model.get_output_embeddings()
        if type(head) is not torch.nn.Linear or head.bias is not None:
            return None
        return cls(head)

    @contextmanager
    def hidden_states(self):
        self.head.forward = _pass_through
        try:
            yield
        finally:
            del self.head.forward

    def loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(hidden, self.head.weight, targets)


def _pass_through(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def router_aux_coefficient(model, configured: float | None) -> float:
    """The weight of the router's load-balancing loss in the training loss: `configured` (the config's
    `router_aux_loss_coef`), or where that is None the model's own `router_aux_loss_coef` (an MoE family's config:
    Mixtral, Qwen2/3-MoE, OLMoE, ...), whether or not its config sets `output_router_logits`; 0 for a model whose
    family computes none (dense models; DeepSeek-V2 and V3 as transformers writes them)."""
    language_model = _language_model(model)
    config = getattr(language_model, "config", None)
    own = getattr(config, "router_aux_loss_coef", None)
    computes = own is not None and _family_computes_router_loss(type(language_model))  # Llama 4 has the key, no loss
    if configured is None:
        return float(own or 0.0) if computes else 0.0
    if configured and not computes:
        model_type = getattr(config, "model_type", "this model")
        raise ConfigError(
            f"router_aux_loss_coef = {configured}: {model_type} computes no router load-balancing loss in transformers "
            "(only MoE families whose modelling defines one do); leave router_aux_loss_coef unset or 0."
        )
    return float(configured)


@lru_cache
def _family_computes_router_loss(model_class: type) -> bool:
    """Whether the model's transformers module (or an ancestor class's, for FSDP's subclass) defines a
    `load_balancing_loss_func`, as the MoE families that add a router loss do."""
    return any(hasattr(sys.modules.get(cls.__module__), "load_balancing_loss_func") for cls in model_class.__mro__)


def next_token_loss_sum(
    model, batch: dict, labels: torch.Tensor, autocast=nullcontext(), fused: FusedHead | None = None,
    router_aux_loss_coef: float = 0.0, shifted: bool = False,
):  # fmt: skip
    """Forward `batch` through `model` and return the summed next-token cross-entropy of its trained positions, plus
    `router_aux_loss_coef * aux_loss * trained positions` with a coefficient (MoE models: see the module's note).
    `labels` may stay on the CPU: the kept positions are then found there, and no host sync waits on the device
    (the positions go over as indices; only an unpacked batch, with the fused loss off, masks on the device)."""
    keep, targets = next_token_targets(labels, shifted)
    device = batch["input_ids"].device
    flat = keep.flatten().nonzero().squeeze(1).to(device, non_blocking=True)  # kept positions of [batch x tokens]
    num_trained = targets.numel()
    targets = targets.to(device, non_blocking=True)
    router = {"output_router_logits": True} if router_aux_loss_coef else {}
    if fused is not None:
        with autocast:  # the head's matmul in the autocast dtype, as the head itself would run it
            with fused.hidden_states():  # the hidden states are small: no need to cut them inside the model
                output = model(**batch, use_cache=False, **router)
            loss = fused.loss_sum(_at(output.logits, flat), targets)
    else:
        output, logits = kept_logits(model, batch, keep, flat, autocast, **router)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    if not router or not num_trained:  # a rank's stand-in part weighs nothing (and a packed one's statistics are 0/0)
        return loss
    with autocast:  # the router's softmax in the precision the model's own aux_loss has
        aux_loss = router_aux_loss(model, output, batch, flat)
    return loss + router_aux_loss_coef * num_trained * aux_loss.float()


def kept_logits(model, batch: dict, keep: torch.Tensor, flat: torch.Tensor, autocast=nullcontext(), **options):
    """(the model's output, its logits at the kept positions [kept, vocab] in `flat`'s order): only those go through
    the head where the model takes `logits_to_keep` (one row, packed: its positions; several: the `keep` mask)."""
    if takes_logits_to_keep(model):
        options["logits_to_keep"] = flat if keep.shape[0] == 1 else keep.to(flat.device, non_blocking=True)
    with autocast:
        output = model(**batch, use_cache=False, **options)
    logits = output.logits
    kept = logits[0] if keep.shape[0] == 1 else logits
    return output, kept if "logits_to_keep" in options else _at(logits, flat)


def router_aux_loss(model, output, batch: dict, flat: torch.Tensor) -> torch.Tensor:
    """The forward's router load-balancing loss: the model's own `aux_loss`, or for a packed row the family's own
    `load_balancing_loss_func` over the tokens of its samples (its segments with a trained position, `flat`), so
    that its padding segment stays out as an unpacked batch's padding does. A family whose function takes other
    arguments counts the padding segment too."""
    if getattr(output, "aux_loss", None) is None:
        raise TrainingError(
            "router_aux_loss_coef is set, but the model returned no aux_loss with output_router_logits=True; "
            "set router_aux_loss_coef = 0 for this model."
        )
    language_model = _language_model(model)
    function = _load_balancing_loss_func(type(language_model))
    experts, top_k = getattr(language_model, "num_experts", None), getattr(language_model, "num_experts_per_tok", None)
    if "cu_seq_lens_q" not in batch or function is None or experts is None or top_k is None:
        return output.aux_loss
    bounds = batch["cu_seq_lens_q"]
    positions = torch.arange(batch["input_ids"].shape[1], device=bounds.device, dtype=bounds.dtype)
    segment = torch.searchsorted(bounds[1:].contiguous(), positions, right=True)  # each token's sample
    trained = torch.zeros(bounds.numel() - 1, device=bounds.device).index_add_(
        0, segment[flat.to(bounds.device)], torch.ones(flat.numel(), device=bounds.device)
    )
    return function(output.router_logits, experts, top_k, (trained[segment] > 0)[None])


LOAD_BALANCING_ARGUMENTS = ["gate_logits", "num_experts", "top_k", "attention_mask"]


@lru_cache
def _load_balancing_loss_func(model_class: type):
    """The `load_balancing_loss_func` of the model class's family (its transformers module, or an ancestor's for
    FSDP's subclass), where it takes LOAD_BALANCING_ARGUMENTS; else None."""
    for cls in model_class.__mro__:
        function = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if function is not None:
            return function if list(inspect.signature(function).parameters) == LOAD_BALANCING_ARGUMENTS else None
    return None


def _at(output: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """[batch, tokens, ...] -> the rows of the flat positions `flat`."""
    return output.flatten(0, 1).index_select(0, flat)


def _language_model(model):
    """The language model inside DDP and DeepSpeed wrappers, LLaVA and peft."""
    for attribute in ("module", "llm"):
        model = getattr(model, attribute, model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def takes_logits_to_keep(model) -> bool:
    """Whether the language model's forward takes `logits_to_keep` (transformers' own models do; a model's
    remote code may not)."""
    return _forward_takes_logits_to_keep(type(_language_model(model)))


@lru_cache
def _forward_takes_logits_to_keep(model_class: type) -> bool:  # once per class, not per micro-batch
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters
