"""`xtune eval --compare` sees learning: the tiny model, LoRA-tuned on a synthetic multiple-choice task (xtune-tiny/
colour-choice, asked as MMLU's zero-shot prompt in the chat template), scores about chance before and >= 90% after on
held-out questions written as an MMLU task folder."""

import io
import json
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

from xtune.cli import app
from xtune.config.load import load_config
from xtune.engine.train import train
from xtune.evaluate.report import COMPARISON_FILE
from xtune.testing.tasks import colour_choice_questions, write_choice_task

pytestmark = pytest.mark.slow

MODEL = "xtune-tiny/internlm2-chat"
OPTIONS = ["data_path='xtune-tiny/colour-choice'", "max_length=96", "max_epochs=12", "evaluation_inputs=[]"]


def test_compare_shows_the_tuned_model_learned_the_task(tmp_path):
    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", [f"work_dir={str(tmp_path / 'runs')!r}", *OPTIONS])
    start = time.perf_counter()
    result = train(config, Console(file=io.StringIO()))
    seconds = time.perf_counter() - start
    folder = write_choice_task(tmp_path / "colours", colour_choice_questions()[1])

    out = tmp_path / "eval"
    command = ["eval", MODEL, "--adapter", str(result.checkpoint), "--tasks", "colours", "--data", f"colours={folder}",
               "--chat", "--compare", MODEL, "--device", "cpu", "--dtype", "fp32", "--output", str(out)]  # fmt: skip
    completed = CliRunner().invoke(app, command)
    assert completed.exit_code == 0, completed.output
    entry = json.loads((out / COMPARISON_FILE).read_text())["tasks"]["colours"]["accuracy"]
    print(f"\nheld-out accuracy: before {entry['base']:.0%}, after {entry['tuned']:.0%} "
          f"(difference {entry['difference']:+.0%} ± {entry['stderr']:.0%}); training {seconds:.0f} s")  # fmt: skip
    assert entry["n"] == 20
    assert entry["base"] <= 0.45  # about chance (25%): each letter is the answer of 5 of the 20
    assert entry["tuned"] >= 0.9
    assert entry["difference"] > 4 * entry["stderr"]
    assert "colours" in completed.output and "difference" in completed.output
