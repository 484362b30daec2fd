"""Tool use learned on a CPU: LoRA on xtune-tiny/calculator, then the agent loop with the real calculate plugin on
questions the model never saw, and the same through `xtune chat --with-plugins`."""

import io
import json
import subprocess
import sys
import time

import pytest
from rich.console import Console

from xtune.config.load import load_config
from xtune.data.formats import Conversation, Turn
from xtune.data.templates import get_template
from xtune.engine.train import train
from xtune.infer.agent import model_generate, run_agent
from xtune.infer.chat import load_chat_model
from xtune.infer.generate import GenerationOptions
from xtune.infer.plugins import get_plugins
from xtune.testing.tasks import calculator_correct, calculator_questions

pytestmark = pytest.mark.slow

CONFIG = "tiny_internlm2_chat_lora_calculator"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config, _ = load_config(CONFIG, [f"work_dir={str(tmp_path_factory.mktemp('runs'))!r}"])
    start = time.perf_counter()
    result = train(config, Console(file=io.StringIO()))
    return config, result, time.perf_counter() - start


def held_out_accuracy(config, adapter: str | None) -> float:
    """The share of held-out questions the agent answers right after one well-formed `calculate` call."""
    model, tokenizer = load_chat_model(config.llm_name_or_path, adapter=adapter, device=config.device, dtype=config.dtype)
    template = get_template(config.prompt_template)
    _, held_out = calculator_questions()
    generate = model_generate(model, tokenizer, template, GenerationOptions(max_new_tokens=48), batch_size=len(held_out))
    questions = [Conversation((Turn("user", q.question),)) for q in held_out]
    episodes = run_agent(questions, get_plugins(["calculate"]), template, generate, max_turns=3, tools=())
    return sum(calculator_correct(e.steps, q) for e, q in zip(episodes, held_out)) / len(held_out)


def test_the_tiny_model_learns_to_call_the_calculator(trained):
    config, result, seconds = trained
    before, after = held_out_accuracy(config, None), held_out_accuracy(config, str(result.checkpoint))
    print(f"\nheld-out episodes right: before {before:.0%}, after {after:.0%}; training {seconds:.0f} s")
    assert before == 0.0
    assert after >= 0.7
    assert result.losses[-1] < 0.05 * result.losses[0]


def test_chat_with_plugins_answers_through_the_calculator(trained, tmp_path):
    config, result, _ = trained
    _, held_out = calculator_questions()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{q.question}\n" for q in held_out[:2]))
    out = tmp_path / "answers.jsonl"
    completed = subprocess.run(
        [sys.executable, "-m", "xtune.cli", "chat", config.llm_name_or_path, "--adapter", str(result.checkpoint),
         "--with-plugins", "calculate", "--no-list-tools", "--input", str(prompts), "--output", str(out),
         "--max-new-tokens", "48"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert len(completed.stdout.splitlines()) == 2
    assert f'[1] -> calculate({{"expression": "{held_out[0].expression}"}})' in completed.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == [q.question for q in held_out[:2]]
    assert records[0]["steps"][0]["calls"] == [{"name": "calculate", "arguments": {"expression": held_out[0].expression}}]
