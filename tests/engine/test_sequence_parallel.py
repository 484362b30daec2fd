"""Sequence parallel (Ulysses): a packed row split over gloo processes gives the loss and gradients of the whole row
on one process, sample boundaries inside a shard and on its edge; a 2-process training run equals one process (DDP
and ZeRO-2, with accumulation), resumes bit-identical, and trains with data parallel beside it on 4. The preference
stages split their rows of pairs too: each objective and its gradients on 2 ranks are one process's, and DPO (also
under FSDP2, ZeRO-3 and beside data parallel), SimPO, ORPO, KTO and reward runs on 2 processes train as one."""

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
REPOSITORY = Path(__file__).parents[2]


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
        ({"stage": "dpo", "data_path": "x.jsonl", "pack_to_max_length": False}, "needs pack_to_max_length = True"),
        ({"max_length": 63}, "needs a max_length divisible by 2 (it is 63)"),
    ],
)
def test_what_sequence_parallel_cannot_split_is_refused_by_key(settings, message):
    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", ["sequence_parallel_size=2", "pack_to_max_length=True",
                                                                  "max_length=64"])  # fmt: skip
    config = config.model_copy(update=settings)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sequence_parallel.check_config(config)
    with pytest.raises(ConfigError, match="8 attention heads and 2 key/value heads; .* so 3 must divide the attention"):
        sequence_parallel.check_heads(3, {"num_attention_heads": 8, "num_key_value_heads": 2})
    with pytest.raises(ConfigError, match="12 attention heads and 8 key/value heads"):
        sequence_parallel.check_heads(6, {"num_attention_heads": 12, "num_key_value_heads": 8})
    for size in (2, 4, 8):  # 2 divides the key/value heads; 4 and 8 are multiples of them (each repeated)
        sequence_parallel.check_heads(size, {"num_attention_heads": 8, "num_key_value_heads": 2})


def run_ranks(spec_values: dict, size: int, tmp_path: Path, worker: Path = WORKER) -> list[dict]:
    """`worker` run as `size` gloo ranks on SPEC (`spec_values` saved); each rank's results."""
    spec = tmp_path / "spec.pt"
    torch.save(spec_values, spec)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for rank in range(size):
        environment = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                       "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        command = [sys.executable, str(worker), str(spec), str(tmp_path / f"rank{rank}.pt")]
        processes.append(subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True))  # fmt: skip
    logs = [process.communicate(timeout=600)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * size, "\n".join(log[-3000:] for log in logs)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(size)]


@pytest.mark.parametrize("size", [2, 4])
def test_the_ranks_give_the_loss_and_gradients_of_the_whole_row(tmp_path, xtune_home, size):
    """Every weight's gradient (embeddings and head included: what a full fine-tune trains) summed over the ranks. On
    4 ranks the tiny model's 2 key/value heads are each repeated to the 2 ranks whose query heads read it."""
    # 32 tokens in shards of 16 (of 8 on 4 ranks): a boundary inside the first shard (at 10), one on the shards' edge
    # (at 16), one inside the second (at 27), and a sample spanning from it to the row's end
    row = packed_row([10, 6, 11, 5])
    model = load_model(resolve_model_path("xtune-tiny/internlm2-chat"), dtype=torch.float32)
    use_varlen_attention(model)
    inputs = {key: value for key, value in row.items() if key != "labels"}
    loss = next_token_loss_sum(model, inputs, row["labels"])
    loss.backward()
    ranks = run_ranks({"row": row, "size": size}, size, tmp_path)
    assert sum(rank["trained"] for rank in ranks) == next_token_targets(row["labels"])[1].numel()
    assert sum(rank["loss"] for rank in ranks).item() == pytest.approx(loss.item(), rel=1e-6)  # a sum of ~200
    assert ranks[0]["loss"].item() != pytest.approx(ranks[1]["loss"].item())  # each holds its own part
    worst = max((ranks[0]["grads"][name] - parameter.grad).abs().max().item() for name, parameter in model.named_parameters())
    largest = max(parameter.grad.abs().max().item() for parameter in model.parameters())
    assert worst < 1e-5 * largest  # fp32 sums in another order (a loss summed over ~200 tokens: gradients of ~10)
    assert all(torch.equal(ranks[0]["grads"][name], rank["grads"][name]) for rank in ranks[1:] for name in rank["grads"])


OPTIONS = ["max_steps=4", "save_steps=2", "accumulative_counts=2", "dtype='fp32'", "lora_dropout=0.0", "lr=2e-4",
           "evaluation_inputs=[]", "pack_to_max_length=True", "max_length=64"]  # fmt: skip
CONFIG = "tiny_internlm2_chat_lora_antonyms"


def losses(work_dir: Path) -> list[float]:
    (run,) = run_folders(work_dir)
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def adapter(work_dir: Path, step: int = 4) -> dict:
    (run,) = run_folders(work_dir)
    return load_file(run / f"checkpoint-{step}" / "adapter_model.safetensors")


def launch(work_dir: Path, processes: int, port: int, *flags: str, config: str = CONFIG, **environ: str) -> str:
    """`xtune train CONFIG --work-dir WORK_DIR FLAGS` on `processes` gloo ranks (NPROC_PER_NODE); its log."""
    environment = {**os.environ, "NPROC_PER_NODE": str(processes), "PORT": str(port), "OMP_NUM_THREADS": "1", **environ}
    command = [sys.executable, "-m", "xtune.cli", "train", config, "--work-dir", str(work_dir), *flags]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stderr


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, xtune_home):
    work_dir = tmp_path_factory.mktemp("one")
    launch(work_dir, 1, 0, "--cfg-options", "batch_size=2", *OPTIONS)
    return work_dir


ENGINES = {"ddp": ["--cfg-options", "gradient_checkpointing=True"], "zero2": ["--deepspeed", "deepspeed_zero2"],
           "fsdp": ["--cfg-options", "strategy='fsdp'"], "zero3": ["--deepspeed", "deepspeed_zero3"]}  # fmt: skip
"""The DDP run recomputes each layer's forward in the backward (gradient checkpointing), its two all-to-alls included,
on every rank of the group; its losses stay one process's (which does not recompute)."""


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
    if engine != "ddp":
        return  # the resume of the sharded engines is test_distributed's; here the split's

    (run,) = run_folders(tmp_path / "two")  # killed after checkpoint-2: resumed, it ends where the whole run ended
    shutil.copytree(run, tmp_path / "resumed" / run.name, ignore=shutil.ignore_patterns("checkpoint-4"))
    log = launch(tmp_path / "resumed", 2, port + 2, *flags, "--resume", "auto", *options)
    assert "from step 2" in log
    assert losses(tmp_path / "resumed") == losses(tmp_path / "two")
    resumed = adapter(tmp_path / "resumed")
    assert all(torch.equal(resumed[name], split[name]) for name in split)


# Preference stages (DPO and its loss types, SimPO, ORPO, KTO, reward models) ---------------------------------------
# A preference row keeps its labels and answer_ids whole on each rank; an answer's log-probability (a reward: its
# score) is summed over the group, every rank computes the objective, and takes 1/N of it as its loss.

from functools import partial  # noqa: E402

from xtune.data.encode import Encoded  # noqa: E402
from xtune.data.packing import pack_groups  # noqa: E402
from xtune.data.pairs import PreferenceCollator  # noqa: E402
from xtune.engine.preference import PreferenceObjective  # noqa: E402
from xtune.engine.reward import RewardObjective  # noqa: E402

PREFERENCE_WORKER = Path(__file__).with_name("sequence_parallel_preference_worker.py")


def random_sample(length: int, generator: torch.Generator) -> Encoded:
    """A prompt (its first third, untrained) and an answer, of random ids (>= 5: never the pad id 0)."""
    ids = torch.randint(5, 2600, (length,), generator=generator).tolist()
    return Encoded(ids, [IGNORE_INDEX] * (length // 3) + ids[length // 3 :])


def pair_row(lengths: list[tuple[int, int]], padding: int, seed: int = 0) -> tuple[PreferenceCollator, dict]:
    """One packed row of pairs with answers of these lengths and `padding` pad tokens after them, collated."""
    generator = torch.Generator().manual_seed(seed)
    pairs = [(random_sample(chosen, generator), random_sample(rejected, generator)) for chosen, rejected in lengths]
    (row,) = pack_groups(pairs, sum(map(sum, lengths)) + padding, 0)
    collator = PreferenceCollator(pairs, 0)
    return collator, collator([row])


def test_a_preference_row_is_split_with_its_labels_and_answers_whole():
    _, row = pair_row([(9, 12), (7, 10)], padding=2)  # 40 tokens: the second answer crosses the shards' edge at 20
    shards = [sequence_parallel.shard(row, 2, rank) for rank in (0, 1)]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards], 1), row["input_ids"])
    for shard in shards:
        assert SHIFTED not in shard and shard["input_ids"].shape == (1, 20)
        assert all(torch.equal(shard[key], row[key]) for key in ("labels", "answer_ids", "group_ids", "cu_seq_lens_q"))
    groups = [sequence_parallel.SequenceParallel(2, rank) for rank in (0, 1)]
    parts = [sequence_parallel.own_positions(row["labels"], row["answer_ids"], sp) for sp in groups]
    next_labels = torch.cat([labels for labels, _, _ in parts], 1)
    assert torch.equal(next_labels[:, :-1], row["labels"][:, 1:]) and next_labels[0, -1] == IGNORE_INDEX
    assert torch.equal(torch.cat([answers for _, answers, _ in parts], 1), row["answer_ids"])
    assert [start for _, _, start in parts] == [0, 20]
    # the pairs are counted once per group, on its first rank; a stand-in part (every label ignored) not at all
    stand_in = {**shards[0], "labels": torch.full_like(row["labels"], IGNORE_INDEX)}
    for cls in (partial(PreferenceObjective, "dpo"), partial(RewardObjective, 0)):
        assert [int(cls(sequence_parallel=sp).count(shards[sp.rank])) for sp in groups] == [2, 0]
        assert int(cls(sequence_parallel=groups[0]).count(stand_in)) == 0


def test_a_kto_rows_mismatched_answers_are_padded_to_split_alike():
    generator = torch.Generator().manual_seed(1)
    examples = [(random_sample(n, generator),) for n in (9, 6, 11)]
    kl = [random_sample(n, generator) for n in (8, 7, 10)]  # 25 tokens: padded to 26, split in two
    (row,) = pack_groups(examples, 26, 0)
    collator = PreferenceCollator(examples, 0, kl, [True, False, True], row_multiple=2)
    batch = collator([row])
    assert batch["kl"]["input_ids"].shape == (1, 26) and batch["kl"]["answer_ids"][0, -1] == -1
    assert batch["kl"]["cu_seq_lens_q"].tolist()[-2:] == [25, 26]  # the padding is a segment of its own
    shards = [sequence_parallel.shard(batch, 2, rank)["kl"] for rank in (0, 1)]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards], 1), batch["kl"]["input_ids"])
    assert all(torch.equal(s["answer_ids"], batch["kl"]["answer_ids"]) for s in shards)
    unsplit = PreferenceCollator(examples, 0, kl, [True, False, True])([row])
    assert unsplit["kl"]["input_ids"].shape == (1, 25)


def run_preference_ranks(row: dict, groups: int, size: int, tmp_path: Path) -> list[dict]:
    return run_ranks({"row": row, "groups": groups, "size": size}, size, tmp_path, PREFERENCE_WORKER)


def test_two_ranks_give_each_preference_objective_and_its_gradients_of_the_whole_row(tmp_path, xtune_home):
    """Each rank's loss is 1/2 of the objective on the whole row, and the gradients summed over the two ranks (the
    all-reduce's backward counts each rank's copy of the loss again) are one process's: DPO's loss types with a
    reference forward or table, SimPO, ORPO, and a reward model whose answers end on either shard."""
    from tests.engine.sequence_parallel_preference_worker import CASES, objective, preference_model

    _, row = pair_row([(9, 12), (7, 10), (11, 5)], padding=2)  # 56 tokens in shards of 28
    ranks = run_preference_ranks(row, 3, 2, tmp_path)
    whole = sequence_parallel.SequenceParallel()
    for case in CASES:
        model = preference_model(case, whole)
        batch = dict(row)
        labels = batch.pop("labels")
        loss = objective(case, whole, 3).loss_sum(model, batch, labels)
        loss.backward()
        halves = [rank[case]["loss"].item() for rank in ranks]
        assert halves == pytest.approx([loss.item() / 2] * 2, rel=1e-6), case
        grads = {name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None}
        scale = max(grad.abs().max().item() for grad in grads.values())
        worst = max((ranks[0][case]["grads"][name] - grad).abs().max().item() for name, grad in grads.items())
        assert scale > 0 and worst < 1e-5 * max(1.0, scale), (case, worst, scale)


STAGE_OPTIONS = ["batch_size=2", "max_steps=4", "save_steps=2", "accumulative_counts=2", "dtype='fp32'",
                 "lora_dropout=0.0", "evaluation_inputs=[]", "pack_to_max_length=True", "max_length=64"]  # fmt: skip
DPO_CONFIG = "tiny_internlm2_chat_lora_dpo_antonyms"
STAGE_RUNS = {  # name -> (config, options)
    "dpo-precomputed-reference": (DPO_CONFIG, ["precompute_reference=True"]),
    "kto": ("tiny_internlm2_chat_lora_kto_antonyms", []),
}
"""Whole runs of the stages whose batches differ most (a reference table computed split; KTO's kl row, padded to split
alike); every objective's loss and gradients on a split row are the fast test's, DPO's live reference the runs'
below (each launch costs ~10 s of imports: the suite keeps the runs few)."""


def stage_records(work_dir: Path) -> list[dict]:
    (run,) = run_folders(work_dir)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def launch_stage(config_name: str, work_dir: Path, processes: int, port: int, options: list[str], flags=(),
                 **environ) -> str:  # fmt: skip
    return launch(work_dir, processes, port, *flags, "--cfg-options", *options, config=config_name, **environ)


@pytest.mark.slow
@pytest.mark.parametrize("name", STAGE_RUNS)
def test_two_processes_splitting_each_preference_row_train_as_one(tmp_path, name):
    """Per-step losses (1e-5), gradient norms (the 1/N of each rank's loss: Adam and clipping would hide a factor),
    the stage's metrics (TRL's rewards/* and logps/*, KTO's kl and counts; 1e-4), trained and seen tokens (exact: the
    pairs and tokens are counted once per group) and the final adapter (1e-4) are one process's. The precomputed
    reference's table is computed by the split run itself (its own cache folder)."""
    config_name, extra = STAGE_RUNS[name]
    options = [*STAGE_OPTIONS, *extra]
    launch_stage(config_name, tmp_path / "one", 1, 0, options)
    fresh = {"XTUNE_HOME": str(tmp_path / "home")} if "precompute_reference=True" in extra else {}
    port = 29701 + 2 * list(STAGE_RUNS).index(name)
    log = launch_stage(config_name, tmp_path / "two", 2, port, [*options, "sequence_parallel_size=2"], **fresh)
    assert "each row split over 2 processes (Ulysses), 1 data-parallel groups" in log
    if fresh:
        assert "computed before training (precompute_reference)" in log
    assert_trains_as_one(tmp_path / "two", tmp_path / "one")


def assert_trains_as_one(split_dir: Path, whole_dir: Path) -> None:
    one, two = stage_records(whole_dir), stage_records(split_dir)
    assert len(one) == len(two) == 4 and one[-1]["loss"] < one[0]["loss"]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-5)
    metrics = [key for key in one[0] if "/" in key or key == "kl"]
    assert metrics and all(set(metrics) <= set(r) for r in two)
    for key in metrics:
        assert [r.get(key) for r in two] == pytest.approx([r.get(key) for r in one], abs=1e-4), key
    for key in ("trained_tokens", "tokens"):
        assert [r[key] for r in two] == [r[key] for r in one], key
    split, whole = adapter(split_dir), adapter(whole_dir)
    assert split.keys() == whole.keys() and max((split[k] - whole[k]).abs().max().item() for k in split) < 1e-4


@pytest.fixture(scope="module")
def one_process_dpo(tmp_path_factory, xtune_home):
    work_dir = tmp_path_factory.mktemp("one-dpo")
    launch_stage(DPO_CONFIG, work_dir, 1, 0, STAGE_OPTIONS)
    return work_dir


DPO_LAUNCHES = {  # name -> (processes, flags, options, what the log says)
    "zero3": (2, ["--deepspeed", "zero3"], [], "data parallel over 2 processes (DeepSpeed ZeRO-3)"),
    "two-groups": (4, [], ["batch_size=1"], "each row split over 2 processes (Ulysses), 2 data-parallel groups"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", DPO_LAUNCHES)
def test_dpo_rows_split_under_sharded_engines_and_beside_data_parallel_train_as_one(tmp_path, one_process_dpo, name):
    """ZeRO-3 (the reference forward too runs on the sharded weights, on each rank of the group), and 4
    processes as 2 groups of 2, each group half of the global batch: the pairs of both groups counted once each."""
    processes, flags, options, label = DPO_LAUNCHES[name]
    if name == "zero3":
        pytest.importorskip("deepspeed")
    port = 29721 + 2 * list(DPO_LAUNCHES).index(name)
    options = [*STAGE_OPTIONS, *options, "sequence_parallel_size=2"]  # the global batch: 2 rows, as one process's
    log = launch_stage(DPO_CONFIG, tmp_path / "split", processes, port, options, flags)
    assert label in log
    assert_trains_as_one(tmp_path / "split", one_process_dpo)
