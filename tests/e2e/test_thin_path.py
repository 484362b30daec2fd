"""The whole road on a CPU: config -> LoRA training -> adapter -> plain peft -> chat."""

import io
import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from rich.console import Console

from xtune.config.load import load_config
from xtune.demo import DEMO_CONFIG, run_demo
from xtune.models.load import load_model, resolve_model_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return run_demo(str(tmp_path_factory.mktemp("runs")), Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def trained(demo):
    config, _ = load_config(DEMO_CONFIG)
    return config, demo.training


def test_demo_learns_what_it_never_saw(demo):
    assert demo.accuracy_before <= 0.05
    assert demo.accuracy_after >= 0.9
    assert len(demo.prompts) == 38


def test_loss_falls_and_files_are_written(trained):
    config, result = trained
    assert result.losses[-1] < 0.1 * result.losses[0]
    checkpoint = result.checkpoint
    assert checkpoint.name == f"checkpoint-{len(result.losses)}"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "xtune_run.json"):
        assert (checkpoint / name).is_file(), name
    assert json.loads((checkpoint / "xtune_run.json").read_text())["prompt_template"] == "internlm2_chat"
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines if "loss" in json.loads(line)]
    assert [s["step"] for s in steps] == list(range(1, len(result.losses) + 1))
    assert any("evaluation" in json.loads(line) for line in lines)


def test_adapter_reloads_in_plain_peft_with_the_same_logits(trained):
    config, result = trained
    base_path = resolve_model_path(config.llm_name_or_path)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])

    base = load_model(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, result.checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.checkpoint)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") != tokenizer.unk_token_id
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    merged = model.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(ids).logits
    assert (adapted - plain).abs().max() > 1e-3  # the adapter changes the model
    assert (adapted - merged_logits).abs().max() < 1e-4


def test_chat_non_interactive_answers_from_the_adapter(trained, tmp_path):
    config, result = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the opposite of hot?\nGive the antonym of big.\n")
    out = tmp_path / "answers.jsonl"
    completed = subprocess.run(
        [sys.executable, "-m", "xtune.cli", "chat", config.llm_name_or_path, "--adapter", str(result.checkpoint),
         "--input", str(prompts), "--output", str(out), "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines() == ["cold", "small"]
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"prompt": "What is the opposite of hot?", "answer": "cold"},
        {"prompt": "Give the antonym of big.", "answer": "small"},
    ]
