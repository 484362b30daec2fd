"""The training loss: next-token cross-entropy summed over the trained positions, and only those.

Only positions whose next token is trained go through the output head (`logits_to_keep` takes positions or
a boolean mask in transformers 5): prompts, system turns and padding get no logits at all. Where the head is a plain
`nn.Linear` on an unsharded model, `FusedHead` goes further: the model hands back the kept hidden states,
and `linear_cross_entropy` computes logits, loss and both gradients chunk by chunk in the forward pass, so
the [tokens, vocab] logits never exist whole (InternLM2's vocab is 92,544: 2,048 tokens of fp32 logits are
0.76 GB, their gradient as much again) and nothing is recomputed.
"""

import inspect
from contextlib import contextmanager, nullcontext
from functools import lru_cache

import torch
import torch.nn.functional as F

from xtune.data.encode import IGNORE_INDEX

LOGITS_PER_CHUNK = 1 << 25
"""Logit elements per chunk of `linear_cross_entropy` (128 MiB in fp32): 362 tokens of a 92,544 vocab,
a whole 2,048-token row of a small one."""


PLAIN_HEAD_MODELS = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3"}
"""Model types (InternLM2 loads as llama) whose logits are the head's output as it is: no soft-capping (Gemma 2)
or scaling (Cohere, Granite) after it, which the fused loss would apply to hidden states instead."""


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): keep[b, i] is whether position i's next token is trained; targets are those next
    tokens, in the order `hidden_states[keep]` lists the kept positions."""
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
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


def next_token_loss_sum(model, batch: dict, labels: torch.Tensor, autocast=nullcontext(), fused: FusedHead | None = None):
    """Forward `batch` through `model` and return the summed next-token cross-entropy of its trained positions.
    `labels` may stay on the CPU: the kept positions are then found there, and no host sync waits on the device
    (the positions go over as indices; only an unpacked batch, with the fused loss off, masks on the device)."""
    keep, targets = next_token_targets(labels)
    device = batch["input_ids"].device
    flat = keep.flatten().nonzero().squeeze(1).to(device, non_blocking=True)  # kept positions of [batch x tokens]
    targets = targets.to(device, non_blocking=True)
    if fused is not None:
        with autocast:  # the head's matmul in the autocast dtype, as the head itself would run it
            with fused.hidden_states():  # the hidden states are small: no need to cut them inside the model
                hidden = model(**batch, use_cache=False).logits
            return fused.loss_sum(_at(hidden, flat), targets)
    options = {}
    if takes_logits_to_keep(model):  # one row (packed): its positions; several: a mask
        options["logits_to_keep"] = flat if keep.shape[0] == 1 else keep.to(device, non_blocking=True)
    with autocast:
        logits = model(**batch, use_cache=False, **options).logits
    logits = _at(logits, flat) if not options else logits[0] if keep.shape[0] == 1 else logits
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _at(output: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """[batch, tokens, ...] -> the rows of the flat positions `flat`."""
    return output.flatten(0, 1).index_select(0, flat)


def takes_logits_to_keep(model) -> bool:
    """Whether the language model's forward takes `logits_to_keep` (transformers' own models do; a model's
    remote code may not)."""
    for attribute in ("module", "llm"):  # DDP and DeepSpeed wrappers, LLaVA
        model = getattr(model, attribute, model)
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return _forward_takes_logits_to_keep(type(model))


@lru_cache
def _forward_takes_logits_to_keep(model_class: type) -> bool:  # once per class, not per micro-batch
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters
