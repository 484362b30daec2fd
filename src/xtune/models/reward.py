"""A reward model: the language model with a linear `score` head (hidden_size -> 1, no bias) on its last hidden
state, read at an answer's last token, as transformers builds its `*ForSequenceClassification` models.

In training the score head takes the place of the causal LM's output head (`lm_head`): the forward is the model's
own, so LoRA (where the head trains in full, as peft's `modules_to_save` for SEQ_CLS), packing, DDP/FSDP/DeepSpeed,
checkpoints and resume apply unchanged, and the [vocab, hidden] output matrix is not held at all. Exported, the same
modules are transformers' `AutoModelForSequenceClassification` with num_labels = 1: the backbone, and `score.weight`
the head's weight.
"""

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from xtune.data.encode import pad_token_id
from xtune.engine.checkpoint import TRAINING_STATE, read_run_meta
from xtune.errors import CheckpointError
from xtune.models.load import load_model, load_tokenizer, resolve_model_path
from xtune.models.lora import attach_adapter, fit_embeddings

SCORE_HEAD = "lm_head"
"""Where the score head sits while training: the causal LM's output head (a name for `modules_to_save`)."""


def with_score_head(model: PreTrainedModel, seed: int = 0) -> PreTrainedModel:
    """`model` (a causal LM) with its output head swapped for a new score head in fp32, initialised as transformers
    initialises a classifier's (`_init_weights`: N(0, initializer_range)), drawn from `seed` without moving the
    global random state (the LoRA weights drawn next are those of the same seed in any stage)."""
    head = model.get_output_embeddings()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        score = torch.nn.Linear(head.in_features, 1, bias=False)
        model._init_weights(score)
    model.set_output_embeddings(score.to(head.weight.device))
    for config in (model.config, model.config.get_text_config()):
        config.tie_word_embeddings = False  # the head is no longer the embedding matrix: never tie it back
    return model


def sequence_classifier(model: PreTrainedModel, pad_id: int) -> PreTrainedModel:
    """A causal LM with a (trained) score head as transformers' `AutoModelForSequenceClassification`, num_labels = 1
    and `pad_token_id` set (it reads each row's reward at its last token that is not `pad_id`): the same modules,
    not a copy. InternLM2, loaded in the Llama layout, becomes LlamaForSequenceClassification."""
    config = copy.deepcopy(model.config)
    config.num_labels = 1
    config.pad_token_id = pad_id
    config.architectures = None  # save_pretrained writes the class's own name
    try:
        with torch.device("meta"):
            classifier = AutoModelForSequenceClassification.from_config(config)
    except ValueError as error:
        raise CheckpointError(
            f"transformers has no sequence classification model for model_type {config.model_type!r} "
            f"({str(error).splitlines()[0]}); a reward model of this family cannot be written as one."
        ) from None
    setattr(classifier, classifier.base_model_prefix, getattr(model, model.base_model_prefix))
    classifier.score = model.get_output_embeddings()
    return classifier.to(model.dtype).eval()


def is_reward_checkpoint(folder: Path) -> bool:
    return read_run_meta(folder).get("stage") == "reward"


def load_reward_checkpoint(
    checkpoint: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, object]:
    """(the reward model of a reward run's checkpoint as a sequence classifier, its tokenizer): a LoRA/QLoRA
    checkpoint merged into its base (a 4/8-bit base dequantized, as `xtune convert merge` does), a full one's
    weights loaded into the base's architecture."""
    checkpoint = Path(checkpoint)
    meta = read_run_meta(checkpoint)
    base = meta.get("llm_name_or_path")
    if meta.get("stage") != "reward" or base is None:
        raise CheckpointError(f"{checkpoint} is not a checkpoint of a reward run (its xtune_run.json says no "
                              "stage = 'reward' and base model).")  # fmt: skip
    tokenizer = load_tokenizer(checkpoint)
    quantization = meta.get("quantization")
    adapter = (checkpoint / "adapter_config.json").is_file()
    model = load_model(resolve_model_path(base), dtype=dtype, quantization=quantization if adapter else None,
                       device=device)  # fmt: skip
    if adapter and quantization:
        model = model.dequantize()
    fit_embeddings(model, tokenizer)
    with_score_head(model)
    if adapter:
        model = attach_adapter(model, checkpoint, base).merge_and_unload()
    else:
        state = {}
        for file in sorted(checkpoint.glob("*.safetensors")):
            if file.name != TRAINING_STATE:
                state.update(load_file(file, device=str(device)))
        missing = model.load_state_dict(state, strict=False).missing_keys
        if missing:
            raise CheckpointError(
                f"{checkpoint} lacks {len(missing)} of the reward model's weights, e.g. {missing[0]!r}."
            )
    return sequence_classifier(model.to(dtype), pad_token_id(tokenizer)), tokenizer
