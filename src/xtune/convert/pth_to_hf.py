"""`xtune convert pth_to_hf CONFIG CHECKPOINT SAVE_DIR`: a training checkpoint as a clean Hugging Face folder.

A checkpoint-<step> already holds its weights as PEFT or transformers safetensors (DeepSpeed and FSDP runs gather
them at save); this writes them without the training state, in the base model's dtype (or fp32), sharded, with the
tokenizer and the training chat template, ready to share, merge or load anywhere.
"""

import json
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from xtune.config.load import load_config
from xtune.convert.llava import copy_llava_parts, export_hf_llava
from xtune.convert.folder import find_checkpoint, new_folder, save_dtype, write_meta
from xtune.convert.xtuner import check_xtuner_checkpoint, is_xtuner_checkpoint, xtuner_to_hf
from xtune.data.formats import IMAGE_PLACEHOLDER
from xtune.models.publish import generation_config_of, save_tokenizer, write_generation_config
from xtune.engine.checkpoint import read_run_meta
from xtune.errors import CheckpointError
from xtune.models.load import load_tokenizer, read_config, resolve_model_path
from xtune.models.lora import published_adapter
from xtune.models.reward import load_reward_checkpoint


def pth_to_hf(
    config_path: str,
    checkpoint: str | Path,
    save_dir: str | Path,
    fp32: bool = False,
    max_shard_size: str = "2GB",
    console: Console | None = None,
    export: str | None = None,
    allow_code: bool = False,
) -> Path:
    """Write SAVE_DIR from CHECKPOINT (a checkpoint-<step> folder, or a run folder: its newest complete one): a
    PEFT adapter for LoRA runs, a whole model for full runs, the trained parts of a LLaVA run (and with
    `export="hf-llava"` a transformers LLaVA folder in SAVE_DIR/hf-llava)."""
    if export not in (None, "hf-llava"):
        raise CheckpointError(f"--export {export!r}: the one export is 'hf-llava'.")
    console = console or Console(stderr=True)
    if is_xtuner_checkpoint(checkpoint):  # XTuner's iter_N.pth (file or DeepSpeed folder): checked before anything loads
        check_xtuner_checkpoint(checkpoint, "CHECKPOINT")
        if export:
            raise CheckpointError("--export hf-llava: convert the XTuner checkpoint first, then export xtune's output.")
        config, _ = load_config(config_path, allow_code=allow_code)
        save_dir, kind = xtuner_to_hf(config, checkpoint, save_dir, fp32, max_shard_size)
        console.print(f"{kind} written to {save_dir}")
        return save_dir
    folder_in = find_checkpoint(checkpoint)  # a missing or empty path is refused before the config and models load
    config, config_file = load_config(config_path, allow_code=allow_code)
    meta = read_run_meta(folder_in)
    trained_on = meta.get("llm_name_or_path")
    if trained_on is not None and trained_on != config.llm_name_or_path:
        raise CheckpointError(
            f"{folder_in} was trained from {trained_on!r} but {config_file} names {config.llm_name_or_path!r}; "
            f"pass the run's own config (a copy is {folder_in.parent / 'config.json'})."
        )
    base_path = resolve_model_path(config.llm_name_or_path)
    base_config = read_config(base_path)
    dtype = save_dtype(base_config.get("dtype") or base_config.get("torch_dtype"), fp32)
    tokenizer = load_tokenizer(folder_in)
    template = meta.get("prompt_template") or config.prompt_template
    if export and "llava" not in meta:
        raise CheckpointError(f"--export hf-llava: {folder_in} is not from a LLaVA run.")
    with new_folder(save_dir) as folder:
        if "llava" in meta:
            kind = "LLaVA parts (" + ", ".join(copy_llava_parts(folder_in, folder, dtype)) + ")"
            if export:
                export_hf_llava(config.llm_name_or_path, config.visual_encoder_name_or_path, folder_in, folder / "hf-llava", dtype, template)
                kind += " and a transformers LLaVA model in hf-llava/"
        elif (folder_in / "adapter_config.json").is_file():
            weights, adapter_config, kind = published_adapter(folder_in, base_config, config.llm_name_or_path, meta, console)
            save_file({name: _cast(tensor, dtype) for name, tensor in weights.items()}, folder / "adapter_model.safetensors")
            (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
            write_generation_config(folder, generation_config_of(base_path), tokenizer, template)
        elif meta.get("stage") == "reward":  # a full reward run: transformers' sequence classifier
            model, _ = load_reward_checkpoint(folder_in, dtype)
            model.save_pretrained(folder, max_shard_size=max_shard_size)
            kind = f"reward model ({type(model).__name__})"
        else:
            model = AutoModelForCausalLM.from_pretrained(folder_in, dtype=dtype)
            model.save_pretrained(folder, max_shard_size=max_shard_size)
            kind = "model"
            write_generation_config(folder, generation_config_of(model), tokenizer, template)
        save_tokenizer(tokenizer, folder, template, IMAGE_PLACEHOLDER if "llava" in meta else None)
        write_meta(folder, {**meta, "converted_from": str(folder_in)})
    console.print(f"{kind} from {folder_in} written to {save_dir} ({dtype})")
    return Path(save_dir)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor
