"""Two processes (torchrun, gloo, DDP) give the same per-step losses as one process with the same global batch."""

import io
import json
import os
import subprocess
import sys

import pytest
from rich.console import Console
from safetensors.torch import load_file

from xtune.config.load import load_config
from xtune.engine.distributed import Ranks, my_share, torchrun_command
from xtune.engine.train import train

pytestmark = pytest.mark.slow

OPTIONS = ["max_steps=6", "save_steps=3", "accumulative_counts=2", "dtype='fp32'", "lora_dropout=0.0",
           "evaluation_inputs=[]"]  # fmt: skip


def step_losses(work_dir):
    (run,) = work_dir.iterdir()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process(tmp_path, strategy):
    environment = {**os.environ, "NPROC_PER_NODE": "2", "PORT": "29517", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "xtune.cli", "train", "tiny_internlm2_chat_lora_antonyms",
               "--work-dir", str(tmp_path / "two"), "--cfg-options", "batch_size=2", f"strategy={strategy!r}", *OPTIONS]  # fmt: skip
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"data parallel over 2 processes ({strategy.upper()})" in completed.stderr

    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", [f"work_dir={str(tmp_path / 'one')!r}", "batch_size=4", *OPTIONS])
    train(config, Console(file=io.StringIO()))
    two, one = step_losses(tmp_path / "two"), step_losses(tmp_path / "one")
    assert len(two) == len(one) == 6
    assert two == pytest.approx(one, abs=1e-5)
    (run,) = (tmp_path / "two").iterdir()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    saved = load_file(run / "checkpoint-6" / "adapter_model.safetensors")
    (one_run,) = (tmp_path / "one").iterdir()
    expected = load_file(one_run / "checkpoint-6" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    assert all((saved[name] - expected[name]).abs().max() < 1e-4 for name in saved)


def test_torchrun_command_and_rank_shares(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("NPROC_PER_NODE", "8")
    command = torchrun_command(["train", "cfg.py"])
    assert command[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=8"] and command[-3:] == ["xtune.cli", "train", "cfg.py"]
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert torchrun_command(["train", "cfg.py"]) is None
    assert my_share([10, 11, 12], Ranks(1, 2)) == ([11], True)
    assert my_share([10], Ranks(1, 2)) == ([10], False)
