"""Variable-length attention for packed rows, registered with transformers' attention interface.

A packed batch is one row of concatenated samples; `cu_seq_lens_q` holds the sample boundaries
(cumulative lengths, starting at 0). Attention runs causally inside each sample and never across:
on CUDA through PyTorch's flash-attention varlen kernel (`torch.nn.attention.varlen.varlen_attn`),
elsewhere through SDPA on each sample's block. Without boundaries it is plain SDPA, so generation and
unpacked batches go through the same function.
"""

import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from xtune.errors import ConfigError

VARLEN = "xtune_varlen"

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None


def _kernel_takes(argument: str) -> bool:
    return varlen_attn is not None and argument in inspect.signature(varlen_attn).parameters


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query: (1, heads, tokens, head_dim), key/value: (1, kv_heads, tokens, head_dim) ->
    (1, tokens, heads, head_dim), as transformers' attention functions return.

    A family's `softcap` (Gemma 2's tanh cap on the scores) and `sliding_window` (Gemma 2's, Mistral's local
    layers) are honoured: SDPA knows neither, so those blocks are computed as the math says (`_capped_attention`)."""
    softcap, window = kwargs.pop("softcap", None), kwargs.pop("sliding_window", None)
    if cu_seq_lens_q is None:
        if softcap is not None:  # the mask (padding, causal, window) was built by SDPA's mask function
            return _capped_attention(query, key, value, attention_mask, scaling, softcap, None, dropout, module), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one row of concatenated samples (batch size 1)")
    enable_gqa = query.shape[1] != key.shape[1]
    longest = max_length_q if max_length_q is not None else int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    if softcap is not None or (window is not None and longest > window):
        bounds = cu_seq_lens_q.tolist()
        blocks = [
            _capped_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, scaling, softcap, window,
                              dropout, module)  # fmt: skip
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        return torch.cat(blocks, dim=1).contiguous(), None
    if query.is_cuda and varlen_attn is not None and dropout == 0.0:
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        cu = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
        # torch 2.10/2.11's kernel takes is_causal and wants as many key/value heads as query heads
        options = {"scale": scaling, **({"window_size": (-1, 0)} if _kernel_takes("window_size") else {"is_causal": True})}
        if enable_gqa and _kernel_takes("enable_gqa"):
            options["enable_gqa"] = True
        elif enable_gqa:
            repeats = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        out = varlen_attn(q, k, v, cu, cu, max_length_q, max_length_q, **options)
        return out.unsqueeze(0), None
    bounds = cu_seq_lens_q.tolist()
    blocks = [
        F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            dropout_p=dropout if module.training else 0.0, is_causal=True, scale=scaling, enable_gqa=enable_gqa,
        )  # fmt: skip
        for start, end in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(blocks, dim=2).transpose(1, 2).contiguous(), None


def _capped_attention(query, key, value, mask, scaling, softcap, window, dropout, module) -> torch.Tensor:
    """Causal attention with scores capped at `softcap` (softcap * tanh(scores / softcap)) and, with `window`, each
    token seeing itself and the window - 1 before it; `mask`, when given, is the model's own (bool or additive).
    (batch, heads, tokens, head_dim) in, (batch, tokens, heads, head_dim) out."""
    if key.shape[1] != query.shape[1]:
        repeats = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        position = torch.arange(query.shape[2], device=query.device)
        distance = position[:, None] - position[None, :]
        mask = (distance >= 0) & (distance < window if window is not None else True)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask[..., : key.shape[2]].float()
    probabilities = torch.softmax(scores, dim=-1).to(query.dtype)
    probabilities = F.dropout(probabilities, p=dropout, training=module.training)
    return torch.matmul(probabilities, value).transpose(1, 2)


def register_varlen_attention() -> str:
    """Registers the function (and SDPA's mask builder for the unpacked case); returns its name."""
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)
    return VARLEN


def use_varlen_attention(model) -> None:
    """Switch a transformers model to the packed-aware attention. A model whose attention does not go through
    transformers' attention interface (Bloom, Falcon, GPT-Neo, remote code) keeps its own, and transformers only
    logs that: its attention would cross a packed row's sample boundaries, so it is refused."""
    name = register_varlen_attention()
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ConfigError(
            f"pack_to_max_length = True: {type(model).__name__} computes attention in its own code, not through "
            "transformers' attention interface, so the samples packed into a row would attend to each other; set "
            "pack_to_max_length = False (padded batches) for this model."
        )
