"""pth_to_hf: a training checkpoint (LoRA, full, DeepSpeed) as a clean Hugging Face folder."""

import io
import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.convert.shipped import as_parts, assert_generate_stops_at_end_of_turn, assert_parts_render_as_strings, two_rounds

from xtune.config.load import load_config
from xtune.convert.pth_to_hf import pth_to_hf
from xtune.engine.train import train
from xtune.errors import CheckpointError
from xtune.models.load import load_model, resolve_model_path
from xtune.models.lora import attach_adapter

INPUT = torch.tensor([[1, 300, 301, 302, 400, 500, 7, 8]])
SHORT = ["max_steps=2", "save_steps=1", "accumulative_counts=1", "evaluation_inputs=[]", "dtype='fp32'", "save_total_limit=-1"]


def short_run(tmp_path_factory, name):
    work_dir = tmp_path_factory.mktemp(name)
    config, _ = load_config(name, [f"work_dir={str(work_dir)!r}", *SHORT])
    return train(config, Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return short_run(tmp_path_factory, "tiny_internlm2_chat_lora_antonyms")


def test_a_lora_checkpoint_becomes_a_peft_adapter_without_training_state(tmp_path, lora_run):
    out = pth_to_hf("tiny_internlm2_chat_lora_antonyms", lora_run.run_dir, tmp_path / "hf", fp32=True)
    names = {path.name for path in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "xtune_run.json"} <= names
    assert not names & {"training_state.safetensors", "training_state.json", "deepspeed"}
    assert json.loads((out / "xtune_run.json").read_text())["converted_from"].endswith("checkpoint-2")  # the newest
    saved = load_file(out / "adapter_model.safetensors")  # in InternLM2's names (tests/convert/test_internlm2_adapter.py)
    assert any(".attention.wqkv.lora_A." in name for name in saved)
    base = load_model(resolve_model_path("xtune-tiny/internlm2-chat"))
    with torch.no_grad():
        attach_adapter(base, out, "xtune-tiny/internlm2-chat").eval()(INPUT)  # xtune's Llama layout takes it back
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    from transformers import GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in GenerationConfig.from_pretrained(out).eos_token_id
    assert_parts_render_as_strings(tokenizer, tokenizer, "internlm2_chat")


def test_the_base_models_dtype_is_the_default(tmp_path, lora_run):
    out = pth_to_hf("tiny_internlm2_chat_lora_antonyms", lora_run.checkpoint, tmp_path / "hf")
    published = json.loads((resolve_model_path("xtune-tiny/internlm2-chat") / "config.json").read_text())
    expected = {"float32": torch.float32, "bfloat16": torch.bfloat16}[published.get("dtype") or published.get("torch_dtype")]
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {expected}


def test_a_full_checkpoint_becomes_a_sharded_model(tmp_path_factory, tmp_path):
    run = short_run(tmp_path_factory, "tiny_llama_full_antonyms")
    out = pth_to_hf("tiny_llama_full_antonyms", run.checkpoint, tmp_path / "hf", fp32=True, max_shard_size="2MB")
    assert (out / "model.safetensors.index.json").is_file()
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    trained = AutoModelForCausalLM.from_pretrained(run.checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(converted(INPUT).logits, trained(INPUT).logits)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert_parts_render_as_strings(tokenizer, tokenizer, "internlm2_chat")  # the config's prompt_template
    prompt = tokenizer.apply_chat_template(as_parts(two_rounds()), add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert_generate_stops_at_end_of_turn(converted, out, tokenizer, **prompt)


def test_bad_checkpoints_are_clear_errors(tmp_path, lora_run):
    partial = lora_run.run_dir / ".checkpoint-9.partial"
    partial.mkdir()
    with pytest.raises(CheckpointError, match="save was interrupted"):
        pth_to_hf("tiny_internlm2_chat_lora_antonyms", partial, tmp_path / "a")
    with pytest.raises(CheckpointError, match="iter_500.pth.*no such file"):  # XTuner's name, read when it exists
        pth_to_hf("tiny_internlm2_chat_lora_antonyms", tmp_path / "iter_500.pth", tmp_path / "b")
    with pytest.raises(CheckpointError, match="trained from 'xtune-tiny/internlm2-chat' but .* names 'xtune-tiny/qwen2'"):
        pth_to_hf("tiny_qwen2_lora_antonyms", lora_run.checkpoint, tmp_path / "c")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        pth_to_hf("tiny_internlm2_chat_lora_antonyms", tmp_path, tmp_path / "d")
    assert not any((tmp_path / name).exists() for name in "abcd")
