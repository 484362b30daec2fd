"""The reward stage on the training engine: each answer's reward is the score head at its last token, packed rows
give the rewards of separate forwards, the loss is Bradley-Terry's (with a margin), accumulation is exact, and a
resumed run ends bit-identical to one never stopped."""

import io
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file

from xtune.config.load import load_config
from xtune.data.dataset import prepare_pairs
from xtune.data.encode import pad_token_id
from xtune.data.packing import pack_groups
from xtune.data.pairs import PreferenceCollator
from xtune.engine.reward import RewardObjective, answer_rewards, reward_setup
from xtune.engine.train import accumulate_gradients, train
from xtune.errors import ConfigError
from xtune.models.attention import use_varlen_attention
from xtune.models.load import load_model, load_tokenizer, resolve_model_path

CONFIG = "tiny_internlm2_chat_lora_reward_antonyms"


@pytest.fixture(scope="module")
def setup(xtune_home):
    config, _ = load_config(CONFIG, ["dtype='fp32'"])
    path = resolve_model_path(config.llm_name_or_path)
    tokenizer = load_tokenizer(path)
    pairs, _ = prepare_pairs(config, tokenizer)
    return config, path, tokenizer, pairs


def fresh_reward_model(config, path, seed=0):
    """The reward stage's model with an adapter that changes the backbone (LoRA B starts at zero)."""
    torch.manual_seed(seed)
    model, objective = reward_setup(load_model(path), config, 2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return model, objective


def split(batch):
    batch = dict(batch)
    batch.pop("group_ids")
    return batch, batch.pop("labels"), batch.pop("answer_ids")


def test_packed_and_padded_rewards_equal_separate_forwards_at_each_answers_last_token(setup):
    config, path, tokenizer, pairs = setup
    model, _ = fresh_reward_model(config, path)
    model.eval()
    subset = pairs[:6]
    with torch.no_grad():
        separate = torch.stack([model(input_ids=torch.tensor([sample.input_ids])).logits[0, -1, 0]
                                for pair in subset for sample in pair])  # fmt: skip
    pad = pad_token_id(tokenizer)
    collator = PreferenceCollator(subset, pad)
    batch, _, answers = split(collator(list(range(len(subset)))))
    assert (batch["attention_mask"] == 0).any()  # padded rows: the last non-pad token, not the last position
    with torch.no_grad():
        padded = answer_rewards(model, batch, answers, pad)
    assert (padded - separate).abs().max() < 1e-5
    use_varlen_attention(model)
    rows = pack_groups(subset, 2 * config.max_length, pad)
    collated = collator(rows)
    batch, _, answers = split(collated)
    assert batch["input_ids"].shape[0] == 1 and len(rows) < len(subset)  # several pairs share a row
    with torch.no_grad():
        packed = answer_rewards(model, batch, answers, pad)
    order = collated["group_ids"].tolist()  # packing reorders the pairs
    expected = separate.reshape(-1, 2)[order].reshape(-1)
    assert (packed - expected).abs().max() < 1e-5
    assert (separate[0::2] - separate[1::2]).abs().min() > 1e-4  # the answers' rewards differ: the check has teeth


def test_the_loss_is_bradley_terry_with_the_pairs_margins_and_trls_metrics(setup):
    config, path, tokenizer, pairs = setup
    model, _ = fresh_reward_model(config, path)
    pad = pad_token_id(tokenizer)
    batch = PreferenceCollator(pairs, pad)([3, 1, 4])
    inputs, labels, answers = split(batch)
    with torch.no_grad():
        rewards = answer_rewards(model, inputs, answers, pad)
    chosen, rejected = rewards[0::2], rewards[1::2]
    margins = torch.linspace(0.0, 2.0, len(pairs))
    objective = RewardObjective(pad, margins=margins)
    assert objective.count(batch).item() == 3
    with torch.no_grad():
        loss = objective.loss_sum(model, {k: v for k, v in batch.items() if k != "labels"}, labels)
    expected = -F.logsigmoid(chosen - rejected - margins[[3, 1, 4]]).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    metrics = objective.take_metrics()
    assert metrics["rewards/chosen"].item() == pytest.approx(chosen.sum().item(), rel=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx((chosen - rejected).sum().item(), rel=1e-6, abs=1e-7)
    assert metrics["rewards/accuracies"].item() == (chosen > rejected).sum().item()
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert objective.step_metrics({name: value.item() for name, value in metrics.items()}, 3)["rewards/accuracies"] <= 1
    no_margin = RewardObjective(pad)
    with torch.no_grad():
        plain = no_margin.loss_sum(model, {k: v for k, v in batch.items() if k != "labels"}, labels)
    assert plain.item() == pytest.approx(-F.logsigmoid(chosen - rejected).sum().item(), rel=1e-6)


def test_the_records_margins_reach_the_loss_in_the_order_of_the_kept_pairs(tmp_path, setup):
    """A record's `margin` is its pair's, through the length rules (a dropped pair takes its margin along) and the
    cache; data without margins gives none."""
    config, path, tokenizer, _ = setup
    records = [{"prompt": f"Opposite of word{k}?", "chosen": "cold", "rejected": "COLD!", "margin": float(k)}
               for k in range(5)]  # fmt: skip
    records[2]["chosen"] = "very " * 80  # over max_length: dropped
    del records[3]["margin"]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    margin_config = config.model_copy(update={"data_path": str(data), "truncation": "drop"})
    for _ in range(2):  # encoded, then read from the cache
        pairs, report = prepare_pairs(margin_config, tokenizer)
        assert report.margins == [0.0, 1.0, 0.0, 4.0] and len(pairs) == 4 and report.dropped_too_long == 1
    _, objective = reward_setup(load_model(path), config, 2, report.margins)
    assert objective.margins.tolist() == [0.0, 1.0, 0.0, 4.0]
    assert reward_setup(load_model(path), config, 2, prepare_pairs(config, tokenizer)[1].margins)[1].margins is None


def test_internlm2s_focal_ranking_loss_and_log_barrier_in_closed_form():
    """By hand: chosen 1, rejected 0: -log s(1) = log(1 + e^-1) = 0.3132617; p = 2 (s(1) - 1/2) = 0.4621172, so focal
    = (1 - p)^2 * 0.3132617 = 0.0906322. A wrong order (chosen 0, rejected 2): p = 0, focal = plain = log(1 + e^2).
    Log barrier: r = 1: -log 4 - log 6 = -3.1780538; r = 0: -2 log 5; r = 6 clamps to 4.999: -log 0.001 - log 9.999."""
    from xtune.engine.preference import bradley_terry_loss, reward_penalty

    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert bradley_terry_loss(chosen, rejected).tolist() == pytest.approx([0.3132617, 2.1269280], abs=1e-6)
    assert bradley_terry_loss(chosen, rejected, focal=True).tolist() == pytest.approx([0.0906322, 2.1269280], abs=1e-6)
    barrier = reward_penalty(torch.tensor([1.0, 0.0, 6.0]), "log_barrier").tolist()
    assert barrier == pytest.approx([-3.1780538, -3.2188758, 4.6052702], abs=2e-4)  # fp32 near the bound
    assert reward_penalty(torch.tensor([3.0, -2.0]), "L2").tolist() == [9.0, 4.0]
    assert reward_penalty(torch.tensor([3.0]), "none").tolist() == [0.0]


def test_the_objective_adds_the_penalty_of_both_rewards_per_pair(setup):
    config, path, tokenizer, pairs = setup
    model, _ = fresh_reward_model(config, path)
    pad = pad_token_id(tokenizer)
    batch = PreferenceCollator(pairs, pad)([0, 2])
    inputs, labels, answers = split(batch)
    with torch.no_grad():
        rewards = answer_rewards(model, inputs, answers, pad)
        objective = RewardObjective(pad, loss="focal", penalty="log_barrier", penalty_weight=0.01)
        loss = objective.loss_sum(model, {k: v for k, v in batch.items() if k != "labels"}, labels)
    from xtune.engine.preference import bradley_terry_loss, reward_penalty

    chosen, rejected = rewards[0::2], rewards[1::2]
    expected = bradley_terry_loss(chosen, rejected, focal=True) + 0.01 * (
        reward_penalty(chosen, "log_barrier") + reward_penalty(rejected, "log_barrier"))
    assert loss.item() == pytest.approx(expected.sum().item(), rel=1e-6)
    _, configured = reward_setup(load_model(path), config.model_copy(update={"reward_penalty": "L2"}), 2)
    assert (configured.loss, configured.penalty, configured.penalty_weight) == ("ranking", "L2", 0.01)


def test_a_ranks_stand_in_part_counts_no_pair_and_weighs_nothing(setup):
    config, path, tokenizer, pairs = setup
    model, objective = fresh_reward_model(config, path)
    batch = PreferenceCollator(pairs, pad_token_id(tokenizer))([0, 1])
    batch["labels"] = torch.full_like(batch["labels"], -100)  # as rank_batch writes a stand-in
    assert objective.count(batch).item() == 0
    loss = objective.loss_sum(model, {k: v for k, v in batch.items() if k != "labels"}, batch["labels"])
    assert loss.item() == 0 and loss.requires_grad and objective.take_metrics() == {}


def test_under_lora_the_adapter_and_the_whole_score_head_train(setup):
    config, path, _, _ = setup
    model, _ = reward_setup(load_model(path), config, 2)
    trained = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert "base_model.model.lm_head.modules_to_save.default.weight" in trained
    assert all("lora_" in name or "lm_head" in name for name in trained)
    assert model.get_output_embeddings().modules_to_save["default"].weight.shape == (1, model.config.hidden_size)
    full, _ = reward_setup(load_model(path), config.model_copy(update={"method": "full"}), 2)
    assert all(parameter.requires_grad for parameter in full.parameters())
    with pytest.raises(ConfigError, match="evaluation_inputs = \\[\\]"):
        reward_setup(load_model(path), config.model_copy(update={"evaluation_inputs": ["hi"]}), 2)


def test_eight_micro_batches_of_one_pair_give_the_gradient_of_one_batch_of_eight(setup):
    config, path, tokenizer, pairs = setup
    collator = PreferenceCollator(pairs, pad_token_id(tokenizer))
    grads = []
    for sizes in ([8], [1] * 8):
        model, objective = fresh_reward_model(config, path)
        start, batches = 0, []
        for size in sizes:
            batches.append(collator(list(range(start, start + size))))
            start += size
        _, count, _ = accumulate_gradients(model, batches, "cpu", objective=objective)
        assert count.item() == 8
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method, weights", [("lora", "adapter_model.safetensors"), ("full", "model.safetensors")])
def test_a_reward_run_resumed_from_the_middle_ends_bit_identical(tmp_path, method, weights):
    """4 steps straight, and the same run stopped after checkpoint-2 and resumed: the same losses, metrics and
    final weights, the score head's included."""
    options = ["max_steps=4", "save_steps=2", "save_total_limit=-1", "batch_size=4", "dtype='fp32'",
               f"method={method!r}", "lr=1e-3"]  # fmt: skip
    config, _ = load_config(CONFIG, [f"work_dir={str(tmp_path / 'a')!r}", *options])
    straight = train(config, Console(file=io.StringIO()))
    resumed_dir = tmp_path / "b" / straight.run_dir.name
    shutil.copytree(straight.run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoint-4")
    config_b, _ = load_config(CONFIG, [f"work_dir={str(tmp_path / 'b')!r}", *options])
    resumed = train(config_b, Console(file=io.StringIO()), resume="auto")
    assert resumed.run_dir == resumed_dir and resumed.losses == straight.losses[2:]
    final = load_file(resumed_dir / "checkpoint-4" / weights)
    expected = load_file(straight.run_dir / "checkpoint-4" / weights)
    head = "base_model.model.lm_head.weight" if method == "lora" else "lm_head.weight"
    assert expected[head].shape == (1, 256) and final.keys() == expected.keys()
    assert all(torch.equal(final[name], expected[name]) for name in expected)
    records = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert {"rewards/margins", "rewards/accuracies"} <= set(records[-1])
    assert json.loads((resumed_dir / "checkpoint-4" / "xtune_run.json").read_text())["stage"] == "reward"
