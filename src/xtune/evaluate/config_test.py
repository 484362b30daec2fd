"""`xtune test CONFIG --checkpoint CKPT` (XTuner's `test` verb): a trained checkpoint scored on its config's own
validation data (`val_data_path`, or the `val_split` held out of its training data), as training computes the
validation loss, and its answers to the config's `evaluation_inputs`. Benchmarks are `xtune eval`'s."""

from contextlib import nullcontext
from pathlib import Path

import torch

from xtune.config.schema import Config
from xtune.convert.folder import find_checkpoint
from xtune.data.dataset import config_template, prepare_samples, split_validation
from xtune.data.encode import pad_token_id
from xtune.data.formats import Conversation, Turn
from xtune.data.loader import collate
from xtune.data.packing import collate_packed, pack
from xtune.engine.checkpoint import read_run_meta
from xtune.engine.validation import validation_loss, validation_plan
from xtune.errors import ConfigError
from xtune.infer.chat import load_chat_model
from xtune.infer.generate import GenerationOptions, generate_replies
from xtune.models.attention import use_varlen_attention


def score_checkpoint(config: Config, checkpoint: str | Path, device: str = "auto", dtype: str = "auto") -> dict:
    """{"checkpoint", "eval_loss", "eval_perplexity", "eval_trained_tokens", "answers": [{input, output}]}:
    the checkpoint (a LoRA or full one, a run folder or a work_dir: its newest) on the config's validation data."""
    if config.val_data_path is None and config.val_split is None:
        raise ConfigError("xtune test scores a checkpoint on its config's validation data, and this config has none: "
                          "set val_data_path (or val_split = 0.05), or score benchmarks with `xtune eval`.")  # fmt: skip
    if config.stage != "sft" or config.visual_encoder_name_or_path is not None:
        raise ConfigError(f"xtune test scores language-model SFT runs; for stage = '{config.stage}' or a LLaVA model "
                          "use `xtune reward score` or `xtune mmbench`.")  # fmt: skip
    folder = find_checkpoint(checkpoint)
    whole = (folder / "config.json").is_file()  # a full fine-tune's checkpoint is a model folder
    bits = {"4bit": 4, "8bit": 8, None: None}[read_run_meta(folder).get("quantization")]
    model, tokenizer = load_chat_model(str(folder) if whole else config.llm_name_or_path, None if whole else str(folder),
                                       None if whole else bits, device, dtype, config.trust_remote_code)  # fmt: skip
    samples, report = prepare_samples(config, tokenizer)
    _, _, validation = split_validation(config, tokenizer, samples, report)
    pad = pad_token_id(tokenizer)
    if config.pack_to_max_length:
        use_varlen_attention(model)
        items, collate_fn = pack(validation, config.max_length, pad), collate_packed
    else:
        items, collate_fn = validation, lambda batch: collate(batch, pad)
    batches = (collate_fn([items[index] for index in indices]) for indices in validation_plan(items, config.batch_size))
    parameter = next(model.parameters())
    low_precision = parameter.dtype in (torch.bfloat16, torch.float16)
    autocast = torch.autocast(parameter.device.type, dtype=parameter.dtype) if low_precision else nullcontext()
    numbers = validation_loss(model, batches, parameter.device, autocast)
    model.eval()
    answers = []
    if config.evaluation_inputs:
        system = (Turn("system", config.SYSTEM),) if config.SYSTEM else ()
        conversations = [Conversation((*system, Turn("user", text))) for text in config.evaluation_inputs]
        options = GenerationOptions(max_new_tokens=config.evaluation_max_new_tokens)
        replies = generate_replies(model, tokenizer, config_template(config), conversations, options)
        answers = [{"input": text, "output": reply} for text, reply in zip(config.evaluation_inputs, replies)]
    return {"checkpoint": str(folder), **numbers, "answers": answers}
