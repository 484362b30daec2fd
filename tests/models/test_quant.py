"""4-bit (NF4, double quantization) loading through bitsandbytes, which runs on the CPU too."""

import io

import pytest
import torch
from rich.console import Console

from xtune.config.load import load_config
from xtune.engine.train import train
from xtune.models.load import load_model, resolve_model_path

bnb = pytest.importorskip("bitsandbytes")


def test_internlm2_folder_loads_in_4bit_through_a_llama_layout_copy(xtune_home):
    path = resolve_model_path("xtune-tiny/internlm2-chat")
    quantized = load_model(path, dtype=torch.bfloat16, quantization="4bit")
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert quantized.model.layers[0].self_attn.q_proj.weight.quant_state.nested  # double quantization
    copies = list((xtune_home / "llama-layout").iterdir())
    assert len(copies) == 1 and (copies[0] / "tokenizer.json").is_file()
    stamp = (copies[0] / "model.safetensors").stat().st_mtime_ns
    load_model(path, dtype=torch.bfloat16, quantization="4bit")
    assert (copies[0] / "model.safetensors").stat().st_mtime_ns == stamp  # written once, then reused

    full = load_model(path, dtype=torch.float32)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        a, b = quantized(ids).logits.float().flatten(), full(ids).logits.flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9


def test_qlora_training_loss_falls(tmp_path):
    overrides = [f"work_dir={str(tmp_path)!r}", "quantization='4bit'", "max_steps=30", "max_epochs=1"]
    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", overrides)
    result = train(config, Console(file=io.StringIO()))
    assert sum(result.losses[-5:]) / 5 < 0.7 * sum(result.losses[:5]) / 5
    assert (result.checkpoint / "adapter_model.safetensors").is_file()
