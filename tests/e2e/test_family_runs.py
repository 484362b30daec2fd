"""Every family of `xtune.testing.families` through xtune's own entry points, from a model folder in Hugging Face
layout with a tokenizer: LoRA training whose loss falls, the adapter reloaded in plain peft with xtune's logits,
`convert merge` equal to base + adapter, `chat --input` answering, a packed run's first loss equal to the unpacked
one's (a family whose attention cannot keep packed samples apart is refused), and a QLoRA step where bitsandbytes
runs. Per-token packed == unpacked losses of each family are pinned in tests/models/test_families.py."""

import io
import json

import pytest
import torch
from peft import PeftModel
from rich.console import Console
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from xtune.cli import app
from xtune.config.load import load_config
from xtune.engine.train import train
from xtune.errors import ConfigError
from xtune.infer.chat import load_chat_model
from xtune.testing.families import FAMILIES, save_family_model

PAIRS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down")]
IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140]])  # longer than the sliding windows (8)
runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "antonyms.json"
    path.write_text(json.dumps([{"conversation": [{"input": f"The opposite of {a}?", "output": b}]} for a, b in PAIRS]))
    return path


def lora_run(base, data, work_dir, *overrides):
    """The tiny LoRA config on `base`, every step on the same four samples so that the loss falls in a few steps."""
    settings = [f"llm_name_or_path={str(base)!r}", f"data_path={str(data)!r}", f"work_dir={str(work_dir)!r}",
                "batch_size=4", "max_steps=12", "lr=2e-2", "warmup_ratio=0.0", "lora_r=8", "lora_alpha=16",
                "evaluation_inputs=[]", "dtype='fp32'", *overrides]  # fmt: skip
    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", settings)
    return train(config, Console(file=io.StringIO(), width=200))


@pytest.fixture(scope="module", params=list(FAMILIES))
def run(request, tmp_path_factory, tokenizer, data):
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    base = save_family_model(family, folder / "base", tokenizer)
    return family, base, lora_run(base, data, folder / "runs")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_loss_falls(run):
    family, _, result = run
    assert len(result.losses) == 12 and all(torch.isfinite(torch.tensor(result.losses))), family
    assert result.losses[-1] < 0.7 * result.losses[0], (family, result.losses)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "xtune_run.json"):
        assert (result.checkpoint / name).is_file(), (family, name)


def test_adapter_reloads_in_plain_peft_with_xtunes_logits(run):
    family, base, result = run
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), result.checkpoint).eval()
    ours, _ = load_chat_model(str(base), str(result.checkpoint), device="cpu", dtype="fp32")
    adapted = logits(plain)
    with plain.disable_adapter():
        assert (adapted - logits(plain)).abs().max() > 1e-3, family  # the adapter changes the model
    assert (adapted - logits(ours)).abs().max() < 1e-5, family


def test_convert_merge_equals_base_plus_adapter(run, tmp_path):
    family, base, result = run
    merged_dir = tmp_path / "merged"
    merged = runner.invoke(app, ["convert", "merge", str(base), str(result.checkpoint), str(merged_dir)])
    assert merged.exit_code == 0, (family, merged.output)
    adapted, _ = load_chat_model(str(base), str(result.checkpoint), device="cpu", dtype="fp32")
    standalone = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in standalone.named_parameters()), family
    assert (logits(adapted) - logits(standalone)).abs().max() < 1e-4, family


def test_chat_input_answers_from_the_checkpoint(run, tmp_path):
    family, base, result = run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"The opposite of {a}?\n" for a, _ in PAIRS[:2]))
    chat = runner.invoke(app, ["chat", str(base), "--adapter", str(result.checkpoint), "--input", str(prompts),
                               "--max-new-tokens", "4", "--device", "cpu"])  # fmt: skip
    assert chat.exit_code == 0, (family, chat.output)
    answers = chat.stdout.splitlines()
    assert len(answers) == 2 and all(answer.strip() for answer in answers), (family, answers)


def test_a_packed_run_starts_from_the_unpacked_runs_loss(run, tmp_path, data):
    """Every family honours packing boundaries (none has to be refused): the first step, all four samples in
    one batch, has the same loss packed into rows as apart. The samples are 18 tokens each, so two fill a row of 36
    exactly: no padding segment, which an MoE router's load-balancing loss would count (engine/loss.py)."""
    family, base, result = run
    packed = lora_run(base, data, tmp_path / "runs", "pack_to_max_length=True", "max_length=36", "max_steps=1")
    assert abs(packed.losses[0] - result.losses[0]) < 1e-4, family


def test_a_family_whose_attention_cannot_honour_packing_is_refused(tmp_path, tokenizer, data):
    """Bloom computes attention in its own code (transformers only logs that it keeps it): packed, its samples would
    see each other."""
    config = AutoConfig.for_model("bloom", vocab_size=2624, hidden_size=32, n_layer=1, n_head=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bloom")
    tokenizer.save_pretrained(tmp_path / "bloom")
    with pytest.raises(ConfigError, match="BloomForCausalLM computes attention in its own code"):
        lora_run(tmp_path / "bloom", data, tmp_path / "runs", "pack_to_max_length=True", "max_steps=1")
    assert len(lora_run(tmp_path / "bloom", data, tmp_path / "runs", "max_steps=1").losses) == 1  # padded, it trains


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "qwen3_moe"])
def test_qlora_step_on_a_4bit_base(family, tmp_path, tokenizer, data):
    bnb = pytest.importorskip("bitsandbytes")
    base = save_family_model(family, tmp_path / "base", tokenizer)
    result = lora_run(base, data, tmp_path / "runs", "quantization='4bit'", "max_steps=2")
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses))), family
    assert json.loads((result.checkpoint / "xtune_run.json").read_text())["quantization"] == "4bit"
    quantized, _ = load_chat_model(str(base), str(result.checkpoint), bits=4, device="cpu", dtype="fp32")
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in quantized.modules()), family
    assert torch.isfinite(logits(quantized)).all(), family
