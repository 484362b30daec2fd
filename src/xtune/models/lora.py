"""Adapters through peft: which weights train."""

from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from xtune.config.schema import Config
from xtune.engine.checkpoint import verify_checkpoint
from xtune.errors import CheckpointError, ConfigError


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


def prepare_trainable(model: PreTrainedModel, config: Config, others_train: bool = False) -> PreTrainedModel | PeftModel:
    """LoRA adapters on a frozen base, every weight trainable for full fine-tuning, or with
    `freeze_llm` only the `modules_to_save` (saved as a whole model). `others_train`: parts beside the LLM
    train (LLaVA's projector), so a wholly frozen LLM is fine."""
    if config.freeze_llm and others_train and not config.modules_to_save:
        return model.requires_grad_(False)
    if config.freeze_llm:
        model.requires_grad_(False)
        chosen = [(name, module) for name, module in model.named_modules() if _named_in(name, config.modules_to_save)]
        missing = set(config.modules_to_save) - {name.rsplit(".", 1)[-1] for name, _ in chosen}
        if not config.modules_to_save or missing:
            problem = f"the model has no module named {sorted(missing)[0]!r}" if missing else "modules_to_save is empty"
            raise ConfigError(
                f"freeze_llm = True trains only modules_to_save, but {problem}; name the modules to train, "
                "e.g. modules_to_save = ['embed_tokens', 'lm_head']."
            )
        for _, module in chosen:
            module.float().requires_grad_(True)  # trained weights in fp32; autocast computes in low precision
        return model
    if config.method == "full":
        model.requires_grad_(True)
        return model
    return get_peft_model(model, lora_config(config))


def _named_in(name: str, short_names: list[str]) -> bool:
    return bool(name) and name.rsplit(".", 1)[-1] in short_names


def saves_whole_model(config: Config) -> bool:
    """Whether checkpoints hold the whole model (full fine-tuning, freeze_llm) rather than an adapter."""
    return config.method == "full" or config.freeze_llm


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


def attach_adapter(model: PreTrainedModel, adapter: str | Path, base: str | Path) -> PeftModel:
    """The model with the LoRA adapter folder `adapter` loaded on it; an adapter made for another base (its
    shapes do not fit) or a folder that is not an adapter is a clear error, not a stack trace."""
    adapter = Path(adapter)
    if adapter.name.endswith(".partial"):
        raise CheckpointError(f"{adapter} is a checkpoint whose save was interrupted; use a complete checkpoint-<step>.")
    if not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(f"{adapter} has no adapter_config.json: it is not a LoRA adapter (a checkpoint-<step> of a LoRA run is).")
    if not (adapter / "adapter_model.safetensors").is_file():
        if (adapter / "adapter_model.bin").is_file():
            raise CheckpointError(
                f"{adapter} holds its weights as adapter_model.bin, a pickle, which can run code when loaded; xtune "
                "reads safetensors only. Convert it where you trust it: PeftModel.from_pretrained(...).save_pretrained(DIR)."
            )
        raise CheckpointError(f"{adapter} has no adapter_model.safetensors: the adapter folder is incomplete.")
    verify_checkpoint(adapter)
    try:
        return PeftModel.from_pretrained(model, adapter)
    except RuntimeError as error:
        mismatch = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), None)
        if mismatch is None:
            raise
        raise CheckpointError(
            f"the adapter {adapter} does not fit the base model {base} ({mismatch.rstrip('.')}); "
            "was it trained on another model? Pass the base it was trained on."
        ) from None
