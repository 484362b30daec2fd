"""Merging: the merged model, loaded with plain transformers, computes what base + adapter computes; it carries
the training chat template; QLoRA adapters merge into their dequantized base; bad input is a clear error."""

import json
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.convert.shipped import as_parts, as_strings, assert_generate_stops_at_end_of_turn, assert_parts_render_as_strings, two_rounds
from xtune.convert.merge import merge
from xtune.data.formats import Conversation, Turn
from xtune.data.templates import TEMPLATES, generation_prompt, get_template
from xtune.engine.checkpoint import RUN_META
from xtune.errors import CheckpointError, XtuneError
from xtune.models.load import load_model, load_tokenizer, resolve_model_path
from xtune.models.lora import attach_adapter
from xtune.models.publish import saved_chat_template, stop_token_ids
from xtune.testing.tiny import TinySpec, build_model

INPUT = torch.tensor([[1, 300, 301, 302, 400, 500, 7, 8]])


def make_adapter(folder, base="xtune-tiny/internlm2-chat", quantization=None, template="internlm2_chat"):
    """A LoRA adapter with random (non-zero) A and B, saved as a training checkpoint would be."""
    model = load_model(resolve_model_path(base), dtype=torch.float32, quantization=quantization)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.05)  # a visible but sane change
    peft_model.save_pretrained(folder)
    load_tokenizer(resolve_model_path(base)).save_pretrained(folder)
    (folder / RUN_META).write_text(json.dumps({"llm_name_or_path": base, "method": "lora", "quantization": quantization, "prompt_template": template}))
    return folder


def logits_with_adapter(adapter, base="xtune-tiny/internlm2-chat", quantization=None):
    model = load_model(resolve_model_path(base), dtype=torch.float32, quantization=quantization)
    with torch.no_grad():
        return attach_adapter(model, adapter, base).eval()(INPUT).logits


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("adapter"))


def test_merged_model_loads_with_plain_transformers_and_gives_the_same_logits(tmp_path, adapter):
    merged = merge("xtune-tiny/internlm2-chat", adapter, tmp_path / "merged", fp32=True, max_shard_size="2MB")
    assert json.loads((merged / "config.json").read_text())["model_type"] == "llama"  # Llama layout by default
    assert len(list(merged.glob("model-*.safetensors"))) > 1 and (merged / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = model(INPUT).logits
    expected = logits_with_adapter(adapter)
    base = load_model(resolve_model_path("xtune-tiny/internlm2-chat"))(INPUT).logits
    assert (merged_logits - expected).abs().max() < 1e-4
    assert (base - expected).abs().max() > 1e-2  # the adapter changes something worth checking


def test_plain_generate_stops_at_the_end_of_a_reply_and_list_content_renders_as_strings(tmp_path, adapter):
    merged = merge("xtune-tiny/internlm2-chat", adapter, tmp_path / "merged", fp32=True)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert (merged / "chat_template.jinja").read_text() == tokenizer.chat_template  # what transformers 5 reads
    assert_parts_render_as_strings(tokenizer, tokenizer, "internlm2_chat")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(as_parts(two_rounds()), add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert_generate_stops_at_end_of_turn(model, merged, tokenizer, **prompt)
    image = as_parts(two_rounds(), [{"type": "image"}, {"type": "text", "text": "Big?"}])
    with pytest.raises(Exception, match="this model takes no images"):  # a text model's template refuses an image part
        tokenizer.apply_chat_template(image, tokenize=False, add_generation_prompt=True)


def test_keep_layout_writes_internlm2_that_loads_back_to_the_same_logits(tmp_path, adapter):
    merged = merge("xtune-tiny/internlm2-chat", adapter, tmp_path / "merged", fp32=True, keep_layout=True)
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "internlm2"
    from safetensors.torch import load_file

    assert any(".attention.wqkv." in name for name in load_file(merged / "model.safetensors"))
    with torch.no_grad():
        logits = load_model(merged)(INPUT).logits
    assert (logits - logits_with_adapter(adapter)).abs().max() < 1e-4
    # InternLM2's own modelling is remote code the folder does not carry: xtune's loader reads the layout, and
    # generate uses the folder's generation_config.json as transformers' loading would
    model = load_model(merged).eval()
    model.generation_config = GenerationConfig.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert_parts_render_as_strings(tokenizer, tokenizer, "internlm2_chat")
    prompt = tokenizer.apply_chat_template(as_parts(two_rounds()), add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert_generate_stops_at_end_of_turn(model, merged, tokenizer, **prompt)


@pytest.mark.parametrize("name", sorted(set(TEMPLATES) - {"hf"}))
def test_every_saved_chat_template_writes_list_content_as_the_same_string(tokenizer, name):
    """The jinja of every template, as it is saved, takes Hugging Face's list-of-parts content."""
    jinja = saved_chat_template(name)
    for messages in (as_strings(two_rounds()), as_strings(Conversation(two_rounds().turns[:3]))):
        parts = [{**message, "content": [{"type": "text", "text": message["content"]}]} for message in messages]
        for add_generation_prompt in (True, False):
            def written(messages):
                return tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=add_generation_prompt)  # fmt: skip

            assert written(parts) == written(messages)


@pytest.mark.parametrize("name", ["internlm2_chat", "qwen_chat", "llama3_chat", "mistral", "vicuna", "default"])
def test_the_saved_chat_template_writes_the_training_prompts(tmp_path, name):
    adapter = make_adapter(tmp_path / "adapter", template=name)
    merged = merge("xtune-tiny/internlm2-chat", adapter, tmp_path / "merged", fp32=True)
    saved = json.loads((merged / "tokenizer_config.json").read_text())["chat_template"]
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template == saved
    template = get_template(name)
    conversations = [
        Conversation((Turn("system", "Be brief."), Turn("user", "Hot?"), Turn("assistant", "cold", True), Turn("user", "Big?"))),
        Conversation((Turn("user", "Opposite of up?"),)),
    ]  # fmt: skip
    for conversation in conversations:
        messages = [{"role": turn.role, "content": turn.content} for turn in conversation.turns]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == generation_prompt(conversation, template, tokenizer)
    assert json.loads((merged / RUN_META).read_text())["prompt_template"] == name
    eos = GenerationConfig.from_pretrained(merged).eos_token_id
    assert set(stop_token_ids(tokenizer, name)) <= set(eos) and tokenizer.eos_token_id in eos
    if name in ("internlm2_chat", "qwen_chat"):  # plain generate stops at the template's end of a reply
        assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos


def test_a_qlora_adapter_is_merged_into_its_dequantized_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    adapter = make_adapter(tmp_path / "adapter", base="xtune-tiny/llama", quantization="4bit")
    lines = []
    console = type("C", (), {"print": lambda self, text: lines.append(text)})()
    merged = merge("xtune-tiny/llama", adapter, tmp_path / "merged", fp32=True, console=console)
    assert "dequantizing" in lines[0]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert not any("quantization_config" in key for key in json.loads((merged / "config.json").read_text()))
    with torch.no_grad():
        merged_logits = model(INPUT).logits
    dequantized = load_model(resolve_model_path("xtune-tiny/llama"), dtype=torch.float32, quantization="4bit").dequantize()
    with torch.no_grad():
        exact = attach_adapter(dequantized, adapter, "xtune-tiny/llama").eval()(INPUT).logits
    assert (merged_logits - exact).abs().max() < 1e-4  # merged into exactly the NF4 weights
    # As trained (bitsandbytes' CPU 4-bit kernel computes in lower precision) it is close; merging into the
    # original unquantized base would be much further off.
    trained = logits_with_adapter(adapter, base="xtune-tiny/llama", quantization="4bit")
    into_unquantized = logits_with_adapter(adapter, base="xtune-tiny/llama")
    assert (into_unquantized - trained).abs().max() > 10 * (merged_logits - trained).abs().max()


def test_bad_input_is_one_clear_error(tmp_path, adapter):
    other = tmp_path / "other-base"
    model = build_model(replace(TinySpec("llama"), hidden_size=128, intermediate_size=256), vocab_size=2560)
    model.save_pretrained(other)
    load_tokenizer(resolve_model_path("xtune-tiny/llama")).save_pretrained(other)
    with pytest.raises(CheckpointError, match=r"does not fit the base model .*other-base.*size mismatch"):
        merge(str(other), adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(XtuneError, match="already exists and is not empty"):
        merge("xtune-tiny/internlm2-chat", adapter, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"

    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        merge("xtune-tiny/internlm2-chat", tmp_path / "full", tmp_path / "out")


def test_cli_merge_then_chat_answers_as_base_plus_adapter(tmp_path, adapter):
    from typer.testing import CliRunner

    from xtune.cli import app

    runner = CliRunner()
    merged = tmp_path / "merged"
    result = runner.invoke(app, ["convert", "merge", "xtune-tiny/internlm2-chat", str(adapter), str(merged), "--fp32"])
    assert result.exit_code == 0, result.output
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the opposite of hot?\nAnd of up?\n")
    common = ["--input", str(prompts), "--dtype", "fp32", "--max-new-tokens", "8"]
    with_adapter = runner.invoke(app, ["chat", "xtune-tiny/internlm2-chat", "--adapter", str(adapter), *common])
    from_merged = runner.invoke(app, ["chat", str(merged), *common])  # its template comes from xtune_run.json
    assert with_adapter.exit_code == 0 and from_merged.exit_code == 0, from_merged.output
    answers = with_adapter.stdout.strip().splitlines()
    assert len(answers) == 2 and from_merged.stdout.strip().splitlines() == answers
