"""Sequence parallel (Ulysses): a packed row split over gloo processes gives the loss and gradients of the whole row
on one process, sample boundaries inside a shard and on its edge; a 2-process training run equals one process (DDP
and ZeRO-2, with accumulation), resumes bit-identical, and trains with data parallel beside it on 4."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xtune.config.load import load_config
from xtune.data.encode import IGNORE_INDEX
from xtune.data.packing import PackedRow, collate_packed
from xtune.engine import sequence_parallel
from xtune.engine.checkpoint import run_folders
from xtune.engine.loss import SHIFTED, next_token_loss_sum, next_token_targets
from xtune.engine.train import count_trained
from xtune.errors import ConfigError
from xtune.models.attention import use_varlen_attention
from xtune.models.load import load_model, resolve_model_path

WORKER = Path(__file__).with_name("sequence_parallel_worker.py")


def packed_row(seq_lens: list[int], seed: int = 0) -> dict:
    """One packed row of samples of these lengths: random ids, each sample's first third untrained."""
    generator = torch.Generator().manual_seed(seed)
    ids, labels, positions = [], [], []
    for length in seq_lens:
        sample = torch.randint(5, 2600, (length,), generator=generator).tolist()
        ids += sample
        labels += [IGNORE_INDEX] * (length // 3) + sample[length // 3 :]
        positions += list(range(length))
    return collate_packed([PackedRow(ids, labels, positions, seq_lens, padding=0)])


def test_a_shard_holds_its_tokens_with_the_next_tokens_labels_and_the_rows_boundaries():
    row = packed_row([5, 7, 4])  # 16 tokens: the boundary at 12 lies inside the second shard of 8
    shards = [sequence_parallel.shard(row, 2, rank) for rank in (0, 1)]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards], 1), row["input_ids"])
    assert torch.equal(torch.cat([s["position_ids"] for s in shards], 1), row["position_ids"])
    next_labels = torch.cat([s["labels"] for s in shards], 1)
    assert torch.equal(next_labels[:, :-1], row["labels"][:, 1:]) and next_labels[0, -1] == IGNORE_INDEX
    assert shards[0]["labels"][0, -1] == row["labels"][0, 8]  # the first shard's last token learns the second's first
    for shard in shards:
        assert shard[SHIFTED] and torch.equal(shard["cu_seq_lens_q"], row["cu_seq_lens_q"])
        assert shard["max_length_q"] == 7 and shard["attention_mask"].shape == (1, 8)
    assert sum(count_trained(shard) for shard in shards) == count_trained(row)
    assert sum(next_token_targets(s["labels"], True)[1].numel() for s in shards) == next_token_targets(row["labels"])[1].numel()
    with pytest.raises(ValueError, match="does not split into 3 equal shards"):
        sequence_parallel.shard(row, 3, 0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"pack_to_max_length": False}, "needs pack_to_max_length = True"),
        ({"stage": "dpo", "data_path": "x.jsonl"}, "needs stage = 'sft' (stage = 'dpo' is not split yet)"),
        ({"max_length": 63}, "needs a max_length divisible by 2 (it is 63)"),
    ],
)
def test_what_sequence_parallel_cannot_split_is_refused_by_key(settings, message):
    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", ["sequence_parallel_size=2", "pack_to_max_length=True",
                                                                  "max_length=64"])  # fmt: skip
    config = config.model_copy(update=settings)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sequence_parallel.check_config(config)
    with pytest.raises(ConfigError, match="8 attention heads and 2 key/value heads; .* divisible by 4"):
        sequence_parallel.check_heads(4, {"num_attention_heads": 8, "num_key_value_heads": 2})
    sequence_parallel.check_heads(2, {"num_attention_heads": 8, "num_key_value_heads": 2})


def run_ranks(row: dict, size: int, tmp_path: Path) -> list[dict]:
    spec = tmp_path / "spec.pt"
    torch.save({"row": row, "size": size}, spec)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for rank in range(size):
        environment = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        command = [sys.executable, str(WORKER), str(spec), str(tmp_path / f"rank{rank}.pt")]
        processes.append(subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True))  # fmt: skip
    logs = [process.communicate(timeout=600)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * size, "\n".join(log[-3000:] for log in logs)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(size)]


def test_two_ranks_give_the_loss_and_gradients_of_the_whole_row(tmp_path, xtune_home):
    # 32 tokens in shards of 16: a boundary inside the first shard (at 10), one on the shards' edge (at 16), one
    # inside the second (at 27), and a sample spanning from it to the row's end
    row = packed_row([10, 6, 11, 5])
    model = load_model(resolve_model_path("xtune-tiny/internlm2-chat"), dtype=torch.float32)
    use_varlen_attention(model)
    inputs = {key: value for key, value in row.items() if key != "labels"}
    loss = next_token_loss_sum(model, inputs, row["labels"])
    loss.backward()
    ranks = run_ranks(row, 2, tmp_path)
    assert sum(rank["trained"] for rank in ranks) == next_token_targets(row["labels"])[1].numel()
    assert sum(rank["loss"] for rank in ranks).item() == pytest.approx(loss.item(), rel=1e-6)  # a sum of ~200
    assert ranks[0]["loss"].item() != pytest.approx(ranks[1]["loss"].item())  # each holds its own part
    worst = max((ranks[0]["grads"][name] - parameter.grad).abs().max().item() for name, parameter in model.named_parameters())
    assert worst < 1e-5
    assert all(torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]) for name in ranks[0]["grads"])


OPTIONS = ["max_steps=4", "save_steps=2", "accumulative_counts=2", "dtype='fp32'", "lora_dropout=0.0", "lr=2e-4",
           "evaluation_inputs=[]", "pack_to_max_length=True", "max_length=64"]  # fmt: skip
CONFIG = "tiny_internlm2_chat_lora_antonyms"


def losses(work_dir: Path) -> list[float]:
    (run,) = run_folders(work_dir)
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def adapter(work_dir: Path, step: int = 4) -> dict:
    (run,) = run_folders(work_dir)
    return load_file(run / f"checkpoint-{step}" / "adapter_model.safetensors")


def launch(work_dir: Path, processes: int, port: int, *flags: str) -> str:
    environment = {**os.environ, "NPROC_PER_NODE": str(processes), "PORT": str(port), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "xtune.cli", "train", CONFIG, "--work-dir", str(work_dir), *flags]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stderr


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, xtune_home):
    work_dir = tmp_path_factory.mktemp("one")
    launch(work_dir, 1, 0, "--cfg-options", "batch_size=2", *OPTIONS)
    return work_dir


ENGINES = {"ddp": [], "zero2": ["--deepspeed", "deepspeed_zero2"], "fsdp": ["--cfg-options", "strategy='fsdp'"],
           "zero3": ["--deepspeed", "deepspeed_zero3"]}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_splitting_each_row_train_as_one_and_resume_bit_identical(tmp_path, one_process, engine):
    """Each engine averages the gradients over the whole world, the group's ranks included: the sum of the shards'."""
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    flags = ENGINES[engine]
    port = 29641 + 4 * list(ENGINES).index(engine)
    options = [*(["--cfg-options"] if "--cfg-options" not in flags else []), "batch_size=2", "sequence_parallel_size=2", *OPTIONS]
    log = launch(tmp_path / "two", 2, port, *flags, *options)
    assert "each row split over 2 processes (Ulysses), 1 data-parallel groups" in log
    assert losses(tmp_path / "two") == pytest.approx(losses(one_process), abs=1e-5)
    split, whole = adapter(tmp_path / "two"), adapter(one_process)
    assert split.keys() == whole.keys() and max((split[k] - whole[k]).abs().max().item() for k in split) < 1e-4
    if engine not in ("ddp", "zero2"):
        return  # the resume of a sharded engine is test_distributed's; here the split's, once plain and once ZeRO

    (run,) = run_folders(tmp_path / "two")  # killed after checkpoint-2: resumed, it ends where the whole run ended
    shutil.copytree(run, tmp_path / "resumed" / run.name, ignore=shutil.ignore_patterns("checkpoint-4"))
    log = launch(tmp_path / "resumed", 2, port + 2, *flags, "--resume", "auto", *options)
    assert "from step 2" in log
    assert losses(tmp_path / "resumed") == losses(tmp_path / "two")
    resumed = adapter(tmp_path / "resumed")
    assert all(torch.equal(resumed[name], split[name]) for name in split)


@pytest.mark.slow
def test_four_processes_two_groups_of_two_train_as_one(tmp_path, one_process):
    """Sequence parallel 2 x data parallel 2: each group gets half of the global batch, each rank half a row."""
    log = launch(tmp_path / "four", 4, 29661, "--cfg-options", "batch_size=1", "sequence_parallel_size=2", *OPTIONS)
    assert "data parallel over 4 processes" in log and "2 data-parallel groups" in log
    assert losses(tmp_path / "four") == pytest.approx(losses(one_process), abs=1e-5)
    split, whole = adapter(tmp_path / "four"), adapter(one_process)
    assert max((split[k] - whole[k]).abs().max().item() for k in split) < 1e-4
