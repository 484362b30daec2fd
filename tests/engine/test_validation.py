"""Validation during training: the loss is every trained token's NLL over their count (by hand, packed or not, shared
over ranks); the split is seeded, disjoint and repeat-proof; a run with validation trains as one without, a resumed
run reports the same validation losses, save_best survives pruning and early stopping stops (and stays stopped)."""

import io
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file

from tests.engine.test_loss import random_samples
from xtune.config.load import load_config
from xtune.data.encode import IGNORE_INDEX, Encoded
from xtune.data.loader import collate
from xtune.data.packing import collate_packed, pack
from xtune.engine.distributed import Ranks
from xtune.engine.train import rank_batch, train
from xtune.engine.validation import BestEval, validation_loss, validation_plan
from xtune.errors import ConfigError, DataError
from xtune.engine.checkpoint import run_folders

CONFIG = "tiny_internlm2_chat_lora_antonyms"
VALIDATED = ["max_steps=4", "save_steps=2", "save_total_limit=-1", "dtype='fp32'", "lora_dropout=0.1",
             "evaluation_inputs=[]", "pack_to_max_length=True", "batch_size=1", "max_length=128"]  # fmt: skip
VAL_RECORDS = [{"instruction": f"What is the opposite of {word}?", "output": opposite}
               for word, opposite in [("hot", "cold"), ("up", "down"), ("early", "late"), ("full", "empty"),
                                      ("open", "closed"), ("light", "dark")]]  # fmt: skip


def records(run_dir, key: str) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(line["step"], line[key]) for line in lines if key in line]


def run(work_dir, *options, resume=None):
    config, _ = load_config(CONFIG, [f"work_dir={str(work_dir)!r}", *options])
    output = io.StringIO()
    result = train(config, Console(file=output, width=300), resume=resume)
    return result, output.getvalue()


@pytest.fixture(scope="module")
def tiny_model():
    from xtune.config.schema import Config
    from xtune.models.attention import use_varlen_attention
    from xtune.models.load import load_model, resolve_model_path
    from xtune.models.lora import prepare_trainable

    model = load_model(resolve_model_path("xtune-tiny/llama"), dtype=torch.float32)
    use_varlen_attention(model)
    config = Config(llm_name_or_path="xtune-tiny/llama", data_path="-", lora_r=8, lora_alpha=16, lora_dropout=0.5)
    model = prepare_trainable(model, config).train()
    with torch.no_grad():  # B = 0 at init would leave the adapters, and their dropout, out of the output
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05)
    return model


def by_hand(model, samples: list[Encoded]) -> float:
    """Sum of the trained tokens' NLLs over their count, one sample at a time, in eval mode."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            logits = model(input_ids=torch.tensor([sample.input_ids])).logits[0, :-1].double()
            targets = torch.tensor(sample.labels[1:])
            trained = targets != IGNORE_INDEX
            total += F.cross_entropy(logits[trained], targets[trained], reduction="sum").item()
            count += int(trained.sum())
    model.train()
    return total / count


def test_the_loss_is_every_trained_tokens_nll_over_their_count_in_eval_mode(tiny_model):
    samples = random_samples(7, 40)
    batches = [collate(samples[:1], pad_token_id=2), collate(samples[1:], pad_token_id=2)]  # 1 sample, then 6
    numbers = validation_loss(tiny_model, batches, "cpu")
    expected = by_hand(tiny_model, samples)
    assert numbers["eval_loss"] == pytest.approx(expected, abs=1e-5)
    assert numbers["eval_perplexity"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)
    assert numbers["eval_trained_tokens"] == sum(sample.num_trained for sample in samples)
    mean_of_batch_means = (by_hand(tiny_model, samples[:1]) + by_hand(tiny_model, samples[1:])) / 2
    assert abs(mean_of_batch_means - expected) > 1e-3  # the batches above tell the two apart
    assert tiny_model.training  # back in train mode, whose dropout would change the numbers:
    assert validation_loss(tiny_model, batches, "cpu") == numbers
    with torch.no_grad():
        assert tiny_model(**batches[0]).loss.item() != tiny_model(**batches[0]).loss.item()


def test_packed_unpacked_fused_and_shared_over_ranks_give_the_same_loss(tiny_model):
    from xtune.engine.loss import FusedHead

    samples = random_samples(9, 40)
    unpacked = validation_loss(tiny_model, [collate(samples[i : i + 4], pad_token_id=2) for i in (0, 4, 8)], "cpu")
    rows = pack(samples, max_length=64, pad_token_id=2)
    assert 1 < len(rows) < len(samples)
    packed = validation_loss(tiny_model, [collate_packed(rows[i : i + 2]) for i in range(0, len(rows), 2)], "cpu")
    fused = validation_loss(tiny_model, [collate(samples, pad_token_id=2)], "cpu", fused=FusedHead.of(tiny_model))
    assert abs(packed["eval_loss"] - unpacked["eval_loss"]) < 1e-5
    assert abs(fused["eval_loss"] - unpacked["eval_loss"]) < 1e-5
    assert packed["eval_trained_tokens"] == unpacked["eval_trained_tokens"] == fused["eval_trained_tokens"]

    plan = validation_plan(samples, global_batch=4)  # 9 samples: the last batch leaves rank 1 a stand-in part
    assert sorted(i for batch in plan for i in batch) == list(range(9)) and len(plan[-1]) == 1
    sums, counts = 0.0, 0
    for rank in (0, 1):
        ranks = Ranks(rank=rank, world=2, local_rank=rank)
        batches = [rank_batch(samples, indices, lambda part: collate(part, pad_token_id=2), ranks) for indices in plan]
        share = validation_loss(tiny_model, batches, "cpu")
        sums, counts = sums + share["eval_loss"] * share["eval_trained_tokens"], counts + share["eval_trained_tokens"]
    assert counts == unpacked["eval_trained_tokens"]
    assert abs(sums / counts - unpacked["eval_loss"]) < 1e-5


def test_the_val_split_is_seeded_disjoint_and_keeps_copies_together():
    from xtune.data.dataset import hold_out

    samples = random_samples(40, 20)
    samples += samples[:10]  # a record's repeats
    train_part, held = hold_out(samples, 0.25, seed=0)
    assert len({tuple(sample.input_ids) for sample in held}) == 10  # 25% of the 40 distinct samples
    assert all(held.count(sample) == samples.count(sample) for sample in held)  # with every copy
    assert not any(sample in held for sample in train_part) and len(train_part) + len(held) == len(samples)
    assert len(held) > 10  # some held-out sample has a copy: the test above had something to check
    assert hold_out(samples, 0.25, seed=0) == (train_part, held)  # the same split each time (a resumed run, any rank)
    assert hold_out(samples, 0.25, seed=1)[1] != held
    with pytest.raises(DataError, match="val_split = 0.99 of 40 distinct samples leaves none to train on"):
        hold_out(samples, 0.99, seed=0)


def test_config_combinations_without_validation_data_or_with_two_are_refused():
    def loaded(*options):
        return load_config(CONFIG, list(options))[0]

    with pytest.raises(ConfigError, match="val_split and val_data_path are both set"):
        loaded("val_split=0.1", "val_data_path='v.jsonl'")
    for value in ("0", "1", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match="key 'val_split' expects"):
            loaded(f"val_split={value}")
    for option in ("save_best='eval_loss'", "early_stopping_patience=2", "eval_steps=10"):
        with pytest.raises(ConfigError, match=f"{option.split('=')[0]} needs validation data: set val_data_path"):
            loaded(option)
    with pytest.raises(ConfigError, match="key 'save_best' expects"):
        loaded("val_split=0.1", "save_best='loss'")
    with pytest.raises(ConfigError, match="stage = 'dpo' cannot use it yet"):
        load_config("tiny_internlm2_chat_lora_dpo_antonyms", ["val_split=0.1"])
    assert loaded("val_split=0.1", "save_best='eval_loss'", "early_stopping_patience=3").eval_steps is None


def test_best_eval_counts_evaluations_since_the_lowest_loss():
    best = BestEval()
    assert [best.update(step, loss) for step, loss in enumerate([3.0, float("nan"), 2.0, 2.0, 2.5], 1)] == [
        True, False, True, False, False,
    ]  # fmt: skip
    assert (best.step, best.loss, best.evals_since) == (3, 2.0, 2)
    assert best.out_of_patience(2) and not best.out_of_patience(3) and not best.out_of_patience(None)
    assert BestEval(**json.loads(json.dumps(best.state()))["best_eval"]) == best  # through a checkpoint's JSON


@pytest.fixture(scope="module")
def val_data(tmp_path_factory) -> list[str]:
    path = tmp_path_factory.mktemp("val") / "val.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in VAL_RECORDS))
    return [f"val_data_path={str(path)!r}", "eval_steps=1"]


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory, xtune_home, val_data):
    return run(tmp_path_factory.mktemp("validated"), *VALIDATED, *val_data)[0]


def test_a_run_with_validation_trains_as_one_without_and_reports_the_loss_of_its_weights(validated_run, val_data, tmp_path):
    from peft import PeftModel

    from xtune.data.dataset import split_validation, prepare_samples
    from xtune.models.load import load_model, load_tokenizer, resolve_model_path

    without, _ = run(tmp_path, *VALIDATED)
    assert validated_run.losses == without.losses  # dropout's random numbers included: validation draws none
    evaluations = records(validated_run.run_dir, "eval_loss")
    assert [step for step, _ in evaluations] == [1, 2, 3, 4]

    config, _ = load_config(CONFIG, [*VALIDATED, *val_data])
    tokenizer = load_tokenizer(resolve_model_path(config.llm_name_or_path))
    samples, report = prepare_samples(config, tokenizer)
    _, _, validation = split_validation(config, tokenizer, samples, report)
    assert len(validation) == len(VAL_RECORDS)
    base = load_model(resolve_model_path(config.llm_name_or_path), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, validated_run.run_dir / "checkpoint-4")
    assert evaluations[-1][1] == pytest.approx(by_hand(model, validation), abs=1e-5)  # packed in training, not here


def test_a_resumed_run_reports_the_same_validation_losses_at_the_same_steps(validated_run, val_data, tmp_path):
    resumed_dir = tmp_path / validated_run.run_dir.name
    shutil.copytree(validated_run.run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoint-4")
    resumed, _ = run(tmp_path, *VALIDATED, *val_data, resume="auto")
    assert resumed.run_dir == resumed_dir and resumed.losses == validated_run.losses[2:]
    assert records(resumed_dir, "eval_loss") == records(validated_run.run_dir, "eval_loss")  # exactly
    assert records(resumed_dir, "eval_perplexity") == records(validated_run.run_dir, "eval_perplexity")


SCRIPTED = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5}
"""Validation losses by step, put in place of the computed ones: the best at step 2, then two without a lower one."""


EARLY_STOPPING = ["max_steps=10", "save_steps=3", "eval_steps=1", "save_total_limit=2", "save_best='eval_loss'",
                  "early_stopping_patience=2", "val_split=0.02", "dtype='fp32'", "evaluation_inputs=[]",
                  "batch_size=2"]  # fmt: skip


def test_save_best_survives_pruning_and_early_stopping_stops_and_resumes_exactly(tmp_path, monkeypatch):
    import xtune.engine.train as engine
    from xtune.engine.validation import validation_loss as real

    steps = iter(range(1, 5))  # eval_steps = 1: the step each evaluation runs at

    def scripted(*args, **kwargs):  # the real pass runs; its loss is then the script's for the step
        return {**real(*args, **kwargs), "eval_loss": SCRIPTED[next(steps)]}

    monkeypatch.setattr(engine, "validation_loss", scripted)
    result, output = run(tmp_path / "a", *EARLY_STOPPING)
    run_dir = result.run_dir
    assert "validation: 5 samples (val_split = 0.02 of the data)" in output
    assert "early stopping at step 4: the validation loss has not gone below 1.0000 (step 2) for 2 evaluations" in output
    assert len(result.losses) == 4 and records(run_dir, "eval_loss") == list(SCRIPTED.items())
    # saved: 1 and 2 (each a new best), 3 (save_steps), 4 (the stop); the newest two are kept, and the best
    assert sorted(path.name for path in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert result.best_checkpoint == run_dir / "checkpoint-2" and result.checkpoint == run_dir / "checkpoint-4"
    assert json.loads((run_dir / "best.json").read_text()) == {"checkpoint": "checkpoint-2", "step": 2, "eval_loss": 1.0}

    _, again = run(tmp_path / "a", *EARLY_STOPPING, resume="auto")  # a run that stopped early stays stopped
    assert f"{run_dir} stopped early at step 4 already" in again

    resumed_dir = tmp_path / "b" / run_dir.name  # resumed from checkpoint-3: it stops at the same step, the same way
    shutil.copytree(run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoint-4")
    steps = iter(range(4, 5))
    resumed, _ = run(tmp_path / "b", *EARLY_STOPPING, resume="auto")
    assert resumed.losses == result.losses[3:] and records(resumed_dir, "eval_loss") == list(SCRIPTED.items())
    assert sorted(path.name for path in resumed_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    final = load_file(resumed_dir / "checkpoint-4" / "adapter_model.safetensors")
    expected = load_file(run_dir / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.equal(final[key], expected[key]) for key in expected)


def test_pruning_keeps_the_newest_and_the_best(tmp_path):
    from xtune.engine.checkpoint import complete_checkpoints, prune_checkpoints

    for step in (1, 2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert [path.name for path in prune_checkpoints(tmp_path, keep=2, best=1)] == ["checkpoint-2"]
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]
    assert [path.name for path in prune_checkpoints(tmp_path, keep=2, best=4)] == ["checkpoint-1"]


def test_validation_metrics_reach_tensorboard_and_the_loss_plot(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from xtune.config.schema import Config
    from xtune.engine.hooks import MetricSinks, plot_loss

    sinks = MetricSinks(tmp_path, Config(llm_name_or_path="m", data_path="d", report_to=["tensorboard"]))
    for step in (1, 2):
        sinks.log({"step": step, "loss": 3.0 / step})
        sinks.log({"step": step, "eval_loss": 2.5 / step, "eval_perplexity": 12.0 / step, "eval_trained_tokens": 9})
    sinks.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("eval/loss")] == [(1, 2.5), (2, 1.25)]
    assert [event.value for event in events.Scalars("eval/perplexity")] == [12.0, 6.0]
    assert [event.value for event in events.Scalars("train/loss")] == [3.0, 1.5]
    assert plot_loss(tmp_path) == tmp_path / "loss.png"


@pytest.mark.slow
def test_two_gloo_ranks_report_the_validation_loss_of_one_process(tmp_path):
    import os
    import subprocess
    import sys

    # val_split: 13 samples, so the last global batch of 4 has one, and rank 1 a stand-in part
    options = ["max_steps=2", "eval_steps=1", "accumulative_counts=2", "dtype='fp32'", "evaluation_inputs=[]",
               "val_split=0.05"]  # fmt: skip
    config, _ = load_config(CONFIG, [f"work_dir={str(tmp_path / 'one')!r}", "batch_size=4", *options])
    one = train(config, Console(file=io.StringIO())).run_dir
    environment = {**os.environ, "NPROC_PER_NODE": "2", "PORT": "29571", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "xtune.cli", "train", CONFIG, "--work-dir", str(tmp_path / "two"), "--cfg-options",
               "batch_size=2", *options]  # fmt: skip
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (two,) = run_folders(tmp_path / "two")
    assert [step for step, _ in records(two, "eval_loss")] == [1, 2]
    assert records(two, "eval_trained_tokens") == records(one, "eval_trained_tokens")
    pairs = zip(records(two, "eval_loss"), records(one, "eval_loss"), strict=True)
    assert max(abs(got - expected) for (_, got), (_, expected) in pairs) < 1e-5
