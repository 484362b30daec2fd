"""`xtune convert merge BASE ADAPTER SAVE_DIR`: a LoRA adapter folded into its base, saved as a standalone model."""

from pathlib import Path

from rich.console import Console

from xtune.convert.folder import new_folder, save_dtype, write_meta
from xtune.convert.xtuner import check_xtuner_checkpoint, is_xtuner_checkpoint, xtuner_config_beside
from xtune.data.encode import pad_token_id
from xtune.models.publish import generation_config_of, save_tokenizer, write_generation_config
from xtune.engine.checkpoint import read_run_meta
from xtune.engine.device import resolve_device
from xtune.errors import CheckpointError
from xtune.models.internlm2 import is_internlm2, save_internlm2
from xtune.models.load import load_model, load_tokenizer, read_config, resolve_model_path
from xtune.models.lora import attach_adapter, fit_embeddings
from xtune.models.reward import sequence_classifier, with_score_head


def merge(
    base: str,
    adapter: str | Path,
    save_dir: str | Path,
    max_shard_size: str = "2GB",
    device: str = "cpu",
    fp32: bool = False,
    keep_layout: bool = False,
    prompt_template: str | None = None,
    console: Console | None = None,
    config: str | None = None,
) -> Path:
    """Merge `adapter` into `base` and write SAVE_DIR: weights (sharded safetensors; the base's dtype, or fp32),
    the tokenizer the adapter was trained with, its chat template in tokenizer_config.json, and xtune_run.json.

    An adapter trained on a 4/8-bit base (QLoRA) is merged into that base dequantized, i.e. into the very
    weights it was trained against. An InternLM2 base is saved in the Llama layout (loads in any transformers
    without remote code) unless `keep_layout`."""
    console = console or Console(stderr=True)
    adapter = Path(adapter)
    if is_xtuner_checkpoint(adapter):  # checked before anything loads
        check_xtuner_checkpoint(adapter, "ADAPTER")
        return _merge_xtuner_checkpoint(base, adapter, save_dir, config, max_shard_size, device, fp32, keep_layout,
                                        prompt_template, console)  # fmt: skip
    if not adapter.is_dir():
        raise CheckpointError(f"ADAPTER {str(adapter)!r}: no such adapter folder.")
    base_path = resolve_model_path(base)
    meta = read_run_meta(adapter)
    quantization = meta.get("quantization")
    base_config = read_config(base_path)
    if keep_layout and is_internlm2(base_config) and meta.get("stage") == "reward":
        raise CheckpointError(
            "--keep-layout: a reward model is written as transformers' LlamaForSequenceClassification, which loads "
            "without remote code; InternLM2's own code has no such class. Leave out --keep-layout."
        )
    dtype = save_dtype(base_config.get("dtype") or base_config.get("torch_dtype"), fp32)
    torch_device = resolve_device(device)
    tokenizer = load_tokenizer(adapter if (adapter / "tokenizer_config.json").is_file() else base_path)

    if quantization:
        console.print(
            f"the adapter was trained on a {quantization} base: loading the base that way and dequantizing it, "
            f"so the adapter is merged into the weights it was trained against (saved as {dtype})"
        )
        model = load_model(base_path, dtype=dtype, quantization=quantization, device=torch_device).dequantize()
    else:
        model = load_model(base_path, dtype=dtype, device=torch_device)
    fit_embeddings(model, tokenizer)
    reward = meta.get("stage") == "reward"  # a reward run's adapter holds its score head in the output head's place
    if reward:
        with_score_head(model)
    merged = attach_adapter(model, adapter, base).merge_and_unload().to(dtype)
    if reward:
        merged = sequence_classifier(merged, pad_token_id(tokenizer))

    template = prompt_template or meta.get("prompt_template")
    with new_folder(save_dir) as folder:
        if keep_layout and is_internlm2(base_config):
            save_internlm2(merged, folder, max_shard_size=max_shard_size)
        else:
            merged.save_pretrained(folder, max_shard_size=max_shard_size)
        save_tokenizer(tokenizer, folder, template)
        if not reward:  # a reward model scores, it does not generate
            write_generation_config(folder, generation_config_of(merged), tokenizer, template)
        write_meta(folder, {**meta, "method": "merged", "quantization": None, "merged_from": {"base": str(base), "adapter": str(adapter)}, "prompt_template": template})  # fmt: skip
    console.print(f"merged {f'reward model ({type(merged).__name__})' if reward else 'model'} written to {save_dir}")
    return Path(save_dir)


def _merge_xtuner_checkpoint(base, pth: Path, save_dir, config, max_shard_size, device, fp32, keep_layout, prompt_template,
                             console) -> Path:  # fmt: skip
    """XTuner's iter_N.pth holds the LoRA factors; their alpha is in the config it was trained with: `config`, or the
    one XTuner keeps in the work_dir beside the checkpoint. Converted (pth_to_hf) into a scratch folder, then merged."""
    import tempfile

    from xtune.convert.pth_to_hf import pth_to_hf

    config = config or xtuner_config_beside(pth)
    if config is None:
        raise CheckpointError(
            f"{pth} is an XTuner checkpoint: it holds the LoRA factors, and their alpha is in the config it was trained "
            f"with, which is not beside it (XTuner keeps it in the work_dir); pass it with --config CFG."
        )
    scratch = Path(save_dir).absolute().parent
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".xtune-merge-", dir=scratch) as folder:
        converted = pth_to_hf(str(config), pth, Path(folder) / "adapter", fp32=True, console=console)
        if not (converted / "adapter_config.json").is_file():
            raise CheckpointError(f"{pth} holds no LLM LoRA adapter (full weights or LLaVA parts): `xtune convert "
                                  "pth_to_hf` writes what it holds, with nothing to merge.")  # fmt: skip
        return merge(base, converted, save_dir, max_shard_size, device, fp32, keep_layout, prompt_template, console)


def merge_visual_encoder(base: str, adapter: str | Path, save_dir: str | Path, max_shard_size: str = "2GB", fp32: bool = False, console: Console | None = None) -> Path:
    """XTuner's `merge --is-clip`: a LoRA adapter on a CLIP (or SigLIP) vision encoder folded into it, saved with
    its image processor. ADAPTER is the adapter folder, or a LLaVA output holding visual_encoder_adapter/."""
    import torch
    from transformers import AutoImageProcessor

    from xtune.models.llava import ENCODER_ADAPTER, load_visual_encoder

    console = console or Console(stderr=True)
    adapter = Path(adapter)
    if is_xtuner_checkpoint(adapter):
        check_xtuner_checkpoint(adapter, "ADAPTER")
        raise CheckpointError(f"{adapter} is an XTuner checkpoint; convert it first with `xtune convert pth_to_hf CONFIG PTH DIR`, then merge DIR/{ENCODER_ADAPTER}.")  # fmt: skip
    adapter = adapter / ENCODER_ADAPTER if (adapter / ENCODER_ADAPTER).is_dir() else adapter
    if not adapter.is_dir():
        raise CheckpointError(f"ADAPTER {str(adapter)!r}: no such adapter folder.")
    base_path = resolve_model_path(base)
    base_config = read_config(base_path)
    dtype = save_dtype(base_config.get("dtype") or base_config.get("torch_dtype"), fp32)
    encoder = load_visual_encoder(base_path, torch.float32)
    merged = attach_adapter(encoder, adapter, base).merge_and_unload().to(dtype)
    with new_folder(save_dir) as folder:
        merged.save_pretrained(folder, max_shard_size=max_shard_size)
        AutoImageProcessor.from_pretrained(base_path).save_pretrained(folder)
    console.print(f"merged vision encoder ({type(merged).__name__}) written to {save_dir} ({dtype})")
    return Path(save_dir)
