"""Tiny random-weight models of the families the built-in configs name, each from its own transformers config
class, with the features that make a family differ (Gemma 2's soft-capping and sliding window, Phi-3's fused qkv,
Qwen3's q/k norms, the experts of Mixtral, Qwen2-MoE (beside its shared expert) and Qwen3-MoE). Small enough that a
test builds them in a second."""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from xtune.testing.tiny import VOCAB_MULTIPLE, build_tokenizer, generation_config

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)  # fmt: skip

FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 8},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 8, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "query_pre_attn_scalar": 16},
    "gemma3_text": {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16},
    "phi3": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64, "decoder_sparse_step": 1},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "decoder_sparse_step": 1},
    "cohere2": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"], "logit_scale": 0.5},
    "glm": {"head_dim": 16},
}  # fmt: skip
"""model_type -> what differs from COMMON. Sliding windows are short (8) so that test samples cross them. Cohere's
logits are scaled by 0.5, not Command-R's 0.0625: that leaves a 64-wide random model's logits too flat for LoRA
to fit anything (its loss fell 7.9 -> 7.5 in 30 steps)."""


def build_family_model(model_type: str, seed: int = 0, vocab_size: int = COMMON["vocab_size"]) -> PreTrainedModel:
    """A tiny causal LM of `model_type` with deterministic weights, in fp32, eval mode."""
    config = AutoConfig.for_model(model_type, **(COMMON | FAMILIES[model_type] | {"vocab_size": vocab_size}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.dim() > 1:
                    parameter.normal_(0.0, 0.1)
    return model.eval()


def save_family_model(
    model_type: str, folder: str | Path, tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0
) -> Path:
    """A model folder in Hugging Face layout: the tiny `model_type` model, sized for `tokenizer` (default: the tiny
    byte-level BPE of `xtune.testing.tiny`), with that tokenizer and a generation config that stops at `<|im_end|>`."""
    tokenizer = tokenizer or build_tokenizer()
    vocab_size = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    folder = Path(folder)
    build_family_model(model_type, seed, vocab_size).save_pretrained(folder)
    generation_config(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
