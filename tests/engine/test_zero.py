"""DeepSpeed configs: shipped names, "auto" filled from the xtune config, contradictions refused."""

import json

import pytest
import torch
from pydantic import ValidationError

from xtune.config.schema import Config
from xtune.engine.zero import deepspeed_config, find_deepspeed_config, shipped_names, zero_stage
from xtune.errors import ConfigError


def config(**values) -> Config:
    return Config(**{"llm_name_or_path": "m", "data_path": "d", "batch_size": 4, "accumulative_counts": 8, "max_norm": 0.5, **values})


def test_shipped_configs_and_short_names():
    assert shipped_names() == [
        "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3", "deepspeed_zero3_offload"
    ]  # fmt: skip
    assert find_deepspeed_config("zero2") == find_deepspeed_config("deepspeed_zero2")
    with pytest.raises(ConfigError, match="deepspeed_zero1, deepspeed_zero2"):
        find_deepspeed_config("zero4")


@pytest.mark.parametrize("name", ["deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3", "deepspeed_zero3_offload"])
def test_auto_values_come_from_the_config(name):
    settings = deepspeed_config(config(deepspeed=name), world=8, dtype=torch.bfloat16)
    assert settings["train_micro_batch_size_per_gpu"] == 4
    assert settings["gradient_accumulation_steps"] == 8
    assert settings["train_batch_size"] == 4 * 8 * 8
    assert settings["gradient_clipping"] == 0.5
    assert settings["bf16"]["enabled"] is True and settings["fp16"]["enabled"] is False
    assert zero_stage(settings) == int(name[len("deepspeed_zero")])
    assert "auto" not in json.dumps(settings)
    if name.endswith("offload"):
        assert settings["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_fp16_and_no_clipping():
    settings = deepspeed_config(config(deepspeed="zero2", max_norm=None), world=1, dtype=torch.float16)
    assert settings["fp16"]["enabled"] is True and settings["bf16"]["enabled"] is False
    assert settings["gradient_clipping"] == 0.0


def test_a_number_that_contradicts_the_config_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"ds.json: train_micro_batch_size_per_gpu = 16, but .* implies 4.*batch_size"):
        deepspeed_config(config(deepspeed=str(path)), world=1, dtype=torch.float32)
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    assert deepspeed_config(config(deepspeed=str(path)), world=2, dtype=torch.float32)["train_batch_size"] == 64


def test_optimizer_blocks_broken_json_and_zero3_qlora_are_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match="remove the 'optimizer' block"):
        deepspeed_config(config(deepspeed=str(path)), world=1, dtype=torch.float32)
    path.write_text('{\n  "zero_optimization": {"stage": 2},\n  oops\n}')
    with pytest.raises(ConfigError, match=r"ds.json:3: not valid JSON"):
        deepspeed_config(config(deepspeed=str(path)), world=1, dtype=torch.float32)
    with pytest.raises(ConfigError, match="use deepspeed_zero2 for QLoRA"):
        deepspeed_config(config(deepspeed="zero3", quantization="4bit"), world=1, dtype=torch.bfloat16)
    with pytest.raises(ValidationError, match="choose one"):
        config(deepspeed="zero2", strategy="fsdp")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero1", "zero2_offload", "zero3_offload"])  # zero2 and zero3: test_distributed
def test_one_process_deepspeed_run_saves_its_state_and_leaves_no_launcher_variables(tmp_path, monkeypatch, name):
    pytest.importorskip("deepspeed")
    import io
    import os

    from rich.console import Console

    from xtune.config.load import load_config
    from xtune.engine.train import train

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    resolved, _ = load_config(
        "tiny_internlm2_chat_lora_antonyms",
        [f"work_dir={str(tmp_path)!r}", f"deepspeed={name!r}", "max_steps=2", "batch_size=4", "accumulative_counts=1",
         "evaluation_inputs=[]"],
    )  # fmt: skip
    result = train(resolved, Console(file=io.StringIO()))
    assert (result.checkpoint / "deepspeed" / "state").is_dir()
    assert (result.checkpoint / "adapter_model.safetensors").is_file()
    assert "LOCAL_RANK" not in os.environ  # a later NPROC_PER_NODE launch must not think it is under torchrun
    assert len(result.losses) == 2
