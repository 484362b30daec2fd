"""Two processes (gloo) under DDP, FSDP2, DeepSpeed ZeRO-2/3 and a Slurm-style launch give the same
per-step losses and weights as one process with the same global batch; a run resumed from its middle
checkpoint on two processes ends bit-identical. A DPO run on two processes matches one too, TRL's metrics
included."""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from xtune.config.load import load_config
from xtune.engine.distributed import Ranks, first_host, my_share, slurm_environment, torchrun_command
from xtune.engine.train import train
from xtune.errors import XtuneError
from xtune.engine.checkpoint import run_folders

OPTIONS = ["max_steps=6", "save_steps=3", "accumulative_counts=2", "dtype='fp32'", "lora_dropout=0.0",
           "evaluation_inputs=[]"]  # fmt: skip
CONFIG = "tiny_internlm2_chat_lora_antonyms"
DPO_CONFIG = "tiny_internlm2_chat_lora_dpo_antonyms"
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")  # fmt: skip
ENGINES = {  # name -> (train flags, what the log says)
    "ddp": (["--cfg-options", "strategy='ddp'"], "DDP"),
    "fsdp": (["--cfg-options", "strategy='fsdp'"], "FSDP"),
    "zero2": (["--deepspeed", "deepspeed_zero2", "--cfg-options"], "DeepSpeed ZeRO-2"),
    "zero3": (["--deepspeed", "zero3", "--cfg-options"], "DeepSpeed ZeRO-3"),
}


def step_losses(work_dir, name="loss"):
    (run,) = run_folders(work_dir)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[name] for line in lines if "loss" in json.loads(line)]


def final_adapter(work_dir):
    (run,) = run_folders(work_dir)
    return load_file(run / "checkpoint-6" / "adapter_model.safetensors")


def one_process_run(work_dir, config_name):
    config, _ = load_config(config_name, [f"work_dir={str(work_dir)!r}", "batch_size=4", *OPTIONS])
    train(config, Console(file=io.StringIO()))
    return work_dir


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, xtune_home):
    return one_process_run(tmp_path_factory.mktemp("one"), CONFIG)


@pytest.fixture(scope="module")
def one_process_dpo(tmp_path_factory, xtune_home):
    return one_process_run(tmp_path_factory.mktemp("one-dpo"), DPO_CONFIG)


def two_ranks(work_dir, flags, port, extra=(), config_name=CONFIG):
    environment = {**os.environ, "NPROC_PER_NODE": "2", "PORT": str(port), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "xtune.cli", "train", config_name, "--work-dir", str(work_dir), *extra, *flags,
               "batch_size=2", *OPTIONS]  # fmt: skip
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stderr


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_two_gloo_ranks_match_one_process_and_resume_bit_identical(tmp_path, one_process, engine):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    flags, label = ENGINES[engine]
    port = 29517 + 2 * list(ENGINES).index(engine)
    log = two_ranks(tmp_path / "two", flags, port)
    assert f"data parallel over 2 processes ({label})" in log
    two, one = step_losses(tmp_path / "two"), step_losses(one_process)
    assert len(two) == len(one) == 6
    assert two == pytest.approx(one, abs=1e-5)
    (run,) = run_folders(tmp_path / "two")
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    saved, expected = final_adapter(tmp_path / "two"), final_adapter(one_process)
    assert saved.keys() == expected.keys()
    assert all((saved[name] - expected[name]).abs().max() < 1e-4 for name in saved)
    if engine == "ddp":
        return  # DDP's resume is the one-process resume test's; the sharded engines keep their state apart

    # The run as if killed after checkpoint-3: resumed on two processes, it ends where the whole run ended.
    shutil.copytree(run, tmp_path / "resumed" / run.name, ignore=shutil.ignore_patterns("checkpoint-6"))
    log = two_ranks(tmp_path / "resumed", flags, port + 1, extra=["--resume", "auto"])
    assert "from step 3" in log
    assert step_losses(tmp_path / "resumed") == step_losses(tmp_path / "two")
    resumed = final_adapter(tmp_path / "resumed")
    assert all(torch.equal(resumed[name], saved[name]) for name in saved)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero3"])  # ZeRO-2 shards like ZeRO-3's optimizer, not its weights
def test_a_dpo_run_on_two_gloo_ranks_matches_one_process(tmp_path, one_process_dpo, engine):
    """LoRA DPO on packed pairs: a step's loss is a mean over the pairs of both ranks, and the reference (the
    adapter switched off) runs beside the policy on each rank's share, so losses, adapter and TRL's metrics
    (sums over the pairs, divided by the global pair count) are one process's."""
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    flags, label = ENGINES[engine]
    log = two_ranks(tmp_path / "two", flags, 29551 + list(ENGINES).index(engine), config_name=DPO_CONFIG)
    assert f"data parallel over 2 processes ({label})" in log
    two, one = step_losses(tmp_path / "two"), step_losses(one_process_dpo)
    assert len(two) == len(one) == 6 and one[0] == pytest.approx(0.6931, abs=1e-4) and one[-1] < one[0]
    assert two == pytest.approx(one, abs=1e-5)
    for name in TRL_METRICS:
        assert step_losses(tmp_path / "two", name) == pytest.approx(step_losses(one_process_dpo, name), abs=1e-4), name
    assert step_losses(tmp_path / "two", "trained_tokens") == step_losses(one_process_dpo, "trained_tokens")
    saved, expected = final_adapter(tmp_path / "two"), final_adapter(one_process_dpo)
    assert saved.keys() == expected.keys()
    assert all((saved[name] - expected[name]).abs().max() < 1e-4 for name in saved)


@pytest.mark.slow
def test_slurm_launch_two_tasks_match_one_process(tmp_path, one_process):
    """`srun -n 2 xtune train --launcher slurm`: each task is a rank, named by Slurm's variables."""
    processes = []
    for rank in range(2):
        environment = {
            **{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")},
            "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
            "SLURM_JOB_NODELIST": "localhost", "PORT": "29541", "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        command = [sys.executable, "-m", "xtune.cli", "train", CONFIG, "--launcher", "slurm", "--work-dir",
                   str(tmp_path / "slurm"), "--cfg-options", "batch_size=2", *OPTIONS]  # fmt: skip
        processes.append(subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True))
    logs = [process.communicate(timeout=300)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], logs[0][-3000:]
    assert "data parallel over 2 processes (DDP)" in logs[0]
    assert step_losses(tmp_path / "slurm") == pytest.approx(step_losses(one_process), abs=1e-5)


def test_slurm_variables_become_torch_distributed_ones():
    environ = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-09,12],cpu1"}
    slurm_environment(environ)
    assert (environ["RANK"], environ["WORLD_SIZE"], environ["LOCAL_RANK"]) == ("5", "16", "1")
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("gpu07", "29500")
    assert [first_host(n) for n in ("node1,node2", "a-b[001]", "solo")] == ["node1", "a-b001", "solo"]
    with pytest.raises(XtuneError, match="srun"):
        slurm_environment({})


def test_torchrun_command_and_rank_shares(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("NPROC_PER_NODE", "8")
    command = torchrun_command(["train", "cfg.py"])
    assert command[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=8"] and command[-3:] == ["xtune.cli", "train", "cfg.py"]
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert torchrun_command(["train", "cfg.py"]) is None
    assert my_share([10, 11, 12], Ranks(1, 2)) == ([11], True)
    assert my_share([10], Ranks(1, 2)) == ([10], False)
