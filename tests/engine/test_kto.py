"""KTO on the engine: unpaired examples with a mismatched answer each for the KL estimate, a step's estimate over all
its micro-batches (so accumulation is exact), and precomputed reference log-probabilities equal to live ones."""

import io
import json
from contextlib import nullcontext

import pytest
import torch
from rich.console import Console

from xtune.config.load import load_config
from xtune.data.dataset import prepare_kto, prepare_pairs
from xtune.data.encode import IGNORE_INDEX, pad_token_id
from xtune.data.packing import pack_groups
from xtune.data.pairs import PreferenceCollator
from xtune.engine.preference import precompute_reference, preference_objective
from xtune.engine.train import accumulate_gradients, train
from xtune.models.attention import use_varlen_attention
from xtune.models.load import load_tokenizer, resolve_model_path

from tests.engine.test_preference_training import fresh_policy as lora_policy

CONFIG = "tiny_internlm2_chat_lora_kto_antonyms"


@pytest.fixture(scope="module")
def setup(xtune_home):
    config, _ = load_config(CONFIG, ["dtype='fp32'"])
    path = resolve_model_path(config.llm_name_or_path)
    tokenizer = load_tokenizer(path)
    examples, report = prepare_kto(config, tokenizer)
    return config, path, tokenizer, examples, report


def fresh_policy(config, path):
    model = lora_policy(config, path)
    use_varlen_attention(model)  # packed rows keep their segments apart
    return model


def answer_text(tokenizer, sample):
    return tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX])


def test_each_example_keeps_its_prompt_and_gets_another_examples_answer(setup):
    _, _, tokenizer, examples, report = setup
    assert report.samples == len(examples.answers) == len(examples.kl) == len(examples.desirable) == 532
    assert sum(examples.desirable) == 266  # each antonym pair gave one desirable and one undesirable example
    differing = 0
    for answer, kl in zip(examples.answers, examples.kl):
        start = next(i for i, label in enumerate(answer.labels) if label != IGNORE_INDEX)
        assert kl.input_ids[:start] == answer.input_ids[:start]  # the same prompt
        differing += answer_text(tokenizer, answer) != answer_text(tokenizer, kl)
    assert differing > 0.9 * len(examples.answers)
    again, _ = prepare_kto(setup[0], tokenizer)  # from the cache: the same examples
    assert again.answers == examples.answers and again.kl == examples.kl and again.desirable == examples.desirable


def test_the_kl_estimate_is_the_steps_so_eight_micro_batches_give_the_gradient_of_one(setup):
    config, path, tokenizer, examples, _ = setup
    collator = PreferenceCollator([(a,) for a in examples.answers], pad_token_id(tokenizer), examples.kl,
                                  examples.desirable)  # fmt: skip
    grads, estimates = [], []
    for sizes in ([8], [1] * 8):
        policy = fresh_policy(config, path)
        objective = preference_objective(config, policy)
        start, batches = 0, []
        for size in sizes:
            batches.append(collator(list(range(start, start + size))))
            start += size
        _, count, _ = accumulate_gradients(policy, batches, "cpu", objective=objective)
        assert count.item() == 8
        estimates.append(objective.kl.item())
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.requires_grad]))
        metrics = objective.step_metrics({k: v.item() for k, v in objective.take_metrics().items()}, 8)
        assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"} <= set(metrics)
    assert estimates[0] == pytest.approx(estimates[1], abs=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_precomputed_reference_logps_equal_the_live_reference(setup, stage):
    config, path, tokenizer, examples, _ = setup
    if stage == "dpo":
        config = config.model_copy(update={"stage": "dpo", "data_path": "xtune-tiny/antonym-pairs"})
        pairs, _ = prepare_pairs(config, tokenizer)
        collator = PreferenceCollator(pairs[:16], pad_token_id(tokenizer))
    else:
        collator = PreferenceCollator([(a,) for a in examples.answers[:16]], pad_token_id(tokenizer),
                                      examples.kl[:16], examples.desirable[:16])  # fmt: skip
    rows = pack_groups(collator.groups, 2 * config.max_length, pad_token_id(tokenizer))
    policy = fresh_policy(config, path)
    objective = preference_objective(config, policy)
    table = precompute_reference(objective, [collator(rows[:3]), collator(rows[3:])], 16, "cpu")
    assert table.shape == (16, 2) and (table < 0).all()
    for items in (rows[:2], [0, 5, 9]):  # packed rows and unpacked groups look the table up alike
        batch = collator(items)
        labels, answers = batch.pop("labels"), batch.pop("answer_ids")
        live = objective._reference_sums(batch, labels, answers, nullcontext(), batch["group_ids"],
                                         column=0 if stage == "kto" else None)  # fmt: skip
        objective.reference_table = table
        cached = objective._reference_sums(batch, labels, answers, nullcontext(), batch["group_ids"],
                                           column=0 if stage == "kto" else None)  # fmt: skip
        objective.reference_table = None
        assert torch.allclose(live, cached, atol=1e-4)


def test_a_kto_run_learns_to_reward_the_desirable_answers_and_caches_its_reference(tmp_path):
    options = [f"work_dir={str(tmp_path)!r}", "max_steps=12", "dtype='fp32'", "evaluation_inputs=[]",
               "precompute_reference=True"]  # fmt: skip
    config, _ = load_config(CONFIG, options)
    output = io.StringIO()
    result = train(config, Console(file=output, width=200))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # policy = reference: 1 - s(0) for every example
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"] + 0.5
    assert result.losses[-1] < 0.45
    assert "computed before training (precompute_reference)" in output.getvalue()
    output = io.StringIO()
    train(config.model_copy(update={"work_dir": str(tmp_path / "again"), "max_steps": 1}), Console(file=output, width=200))
    assert "read from" in output.getvalue()
