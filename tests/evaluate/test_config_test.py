"""`xtune test CONFIG --checkpoint CKPT`: the checkpoint's validation loss on its config's validation data is the
one its training run logged at that step."""

import io
import json

import pytest
from rich.console import Console
from typer.testing import CliRunner

from xtune.cli import app
from xtune.config.load import load_config
from xtune.engine.train import train
from xtune.errors import ConfigError
from xtune.evaluate.config_test import score_checkpoint

CONFIG = "tiny_internlm2_chat_lora_antonyms"


def test_a_checkpoint_scores_the_validation_loss_its_run_logged(tmp_path, xtune_home):
    options = [f"work_dir={str(tmp_path)!r}", "max_steps=3", "save_steps=3", "val_split=0.1", "dtype='fp32'",
               "evaluation_inputs=['Opposite of hot?']", "evaluation_max_new_tokens=4"]  # fmt: skip
    config, _ = load_config(CONFIG, options)
    run = train(config, Console(file=io.StringIO()))
    logged = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    (last,) = [record for record in logged if record.get("step") == 3 and "eval_loss" in record]
    scored = score_checkpoint(config, str(tmp_path), device="cpu", dtype="fp32")  # the work_dir: its newest
    assert scored["checkpoint"] == str(run.run_dir / "checkpoint-3")
    assert scored["eval_loss"] == pytest.approx(last["eval_loss"], abs=1e-5)
    assert scored["eval_trained_tokens"] == last["eval_trained_tokens"]
    assert [answer["input"] for answer in scored["answers"]] == ["Opposite of hot?"]
    result = CliRunner().invoke(app, ["test", CONFIG, "--checkpoint", str(run.run_dir), "--device", "cpu",
                                      "--dtype", "fp32", "--cfg-options", *options])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"validation loss {last['eval_loss']:.4f}" in result.output


def test_a_config_without_validation_data_is_refused(xtune_home):
    config, _ = load_config(CONFIG)
    with pytest.raises(ConfigError, match="this config has none: set val_data_path"):
        score_checkpoint(config, "no-such-run")
