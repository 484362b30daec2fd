"""Adapters through peft: which weights train."""

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from xtune.config.schema import Config


def lora_config(config: Config) -> LoraConfig:
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        use_dora=config.use_dora,
        modules_to_save=config.modules_to_save or None,
        use_rslora=config.use_rslora,
        task_type="CAUSAL_LM",
    )


def prepare_trainable(model: PreTrainedModel, config: Config) -> PreTrainedModel | PeftModel:
    """LoRA adapters on a frozen base, or every weight trainable for full fine-tuning."""
    if config.method == "full":
        model.requires_grad_(True)
        return model
    return get_peft_model(model, lora_config(config))


def fit_embeddings(model: PreTrainedModel, tokenizer) -> bool:
    """Grow the embedding and output matrices when the tokenizer has more tokens than the model
    (new special tokens); returns whether it did. New rows are initialised by transformers."""
    if len(tokenizer) <= model.get_input_embeddings().num_embeddings:
        return False
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    return True


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
