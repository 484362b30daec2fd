"""Preference stages on the training engine: pairs go through the SFT data road and packing, log-probabilities of
packed answers equal separate forwards, the LoRA reference is the base model, and accumulation is exact."""

import io
import json
import math

import pytest
import torch
from rich.console import Console

from xtune.config.load import load_config
from xtune.data.dataset import prepare_pairs
from xtune.data.encode import IGNORE_INDEX, pad_token_id
from xtune.data.pairs import collate_packed_pairs, collate_pairs, pack_pairs
from xtune.engine.preference import answer_logps, preference_objective
from xtune.engine.train import accumulate_gradients, train
from xtune.errors import ConfigError
from xtune.models.attention import use_varlen_attention
from xtune.models.load import load_model, load_tokenizer, resolve_model_path
from xtune.models.lora import prepare_trainable

CONFIG = "tiny_internlm2_chat_lora_dpo_antonyms"


@pytest.fixture(scope="module")
def setup(xtune_home):
    config, _ = load_config(CONFIG, ["dtype='fp32'"])
    path = resolve_model_path(config.llm_name_or_path)
    tokenizer = load_tokenizer(path)
    pairs, _ = prepare_pairs(config, tokenizer)
    return config, path, tokenizer, pairs


def fresh_policy(config, path, seed=0):
    torch.manual_seed(seed)
    model = load_model(path, dtype=torch.float32, quantization=None, device=torch.device("cpu"))
    model = prepare_trainable(model, config, others_train=False)
    with torch.no_grad():  # an adapter that changes the model, so that policy and reference differ
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return model


def split(batch):
    batch = dict(batch)
    return batch, batch.pop("labels"), batch.pop("answer_ids")


def test_pairs_keep_only_the_answers_trained_and_stay_side_by_side_when_packed(setup):
    config, _, tokenizer, pairs = setup
    chosen, rejected = pairs[0]
    starts = [next(i for i, label in enumerate(s.labels) if label != IGNORE_INDEX) for s in pairs[0]]
    assert starts[0] == starts[1] and chosen.input_ids[: starts[0]] == rejected.input_ids[: starts[1]]  # one prompt
    trained = [tokenizer.decode([t for t, label in zip(s.input_ids, s.labels) if label != IGNORE_INDEX]) for s in pairs[0]]
    assert trained[0].endswith("<|im_end|>") and trained[0] != trained[1]
    rows = pack_pairs(pairs, 2 * config.max_length, pad_token_id(tokenizer))
    batch = collate_packed_pairs(rows[:2])
    answers = batch["answer_ids"][0]
    bounds = batch["cu_seq_lens_q"].tolist()
    segments = [answers[start:end].unique().tolist() for start, end in zip(bounds, bounds[1:])]
    answer_segments = [s for s in segments if s != [-1]]
    assert all(len(s) == 1 for s in segments)
    assert [s[0] for s in answer_segments] == list(range(len(answer_segments))) and len(answer_segments) % 2 == 0


def test_packed_answer_logps_equal_separate_forwards(setup):
    config, path, tokenizer, pairs = setup
    model = fresh_policy(config, path).eval()
    subset = pairs[:5]
    separate = []
    for sample in (s for pair in subset for s in pair):
        batch, labels, answers = split(collate_pairs([(sample, sample)], pad_token_id(tokenizer)))
        with torch.no_grad():
            separate.append(answer_logps(model, batch, labels, answers)[0][0])
    use_varlen_attention(model)
    rows = pack_pairs(subset, 2 * config.max_length, pad_token_id(tokenizer))
    batch, labels, answers = split(collate_packed_pairs(rows))
    with torch.no_grad():
        packed, _ = answer_logps(model, batch, labels, answers)
    # packing reorders pairs (best fit): compare as sorted multisets of (chosen, rejected)
    expected = sorted(zip(separate[0::2], separate[1::2]))
    got = sorted(zip(packed[0::2].tolist(), packed[1::2].tolist()))
    assert torch.allclose(torch.tensor(got), torch.tensor([[a.item(), b.item()] for a, b in expected]), atol=1e-5)


def test_the_lora_reference_is_the_base_model_without_a_second_copy(setup):
    config, path, tokenizer, pairs = setup
    policy = fresh_policy(config, path).eval()
    objective = preference_objective(config, policy)
    batch, labels, answers = split(collate_pairs(pairs[:4], pad_token_id(tokenizer)))
    context, reference = objective.reference()
    assert reference is policy
    with torch.no_grad(), context:
        disabled, _ = answer_logps(reference, batch, labels, answers)
    base = load_model(path, dtype=torch.float32, quantization=None, device=torch.device("cpu")).eval()
    with torch.no_grad():
        frozen, _ = answer_logps(base, batch, labels, answers)
        adapted, _ = answer_logps(policy, batch, labels, answers)
    assert torch.allclose(disabled, frozen, atol=1e-5) and not torch.allclose(adapted, frozen, atol=1e-3)
    full = preference_objective(config.model_copy(update={"method": "full"}), base)
    context, copy = full.reference()
    assert copy is not base and not any(p.requires_grad for p in copy.parameters())


@pytest.mark.parametrize("stage", ["dpo", "simpo", "orpo"])
def test_eight_micro_batches_of_one_pair_give_the_gradient_of_one_batch_of_eight(setup, stage):
    config, path, tokenizer, pairs = setup
    config = config.model_copy(update={"stage": stage})
    grads = []
    for sizes in ([8], [1] * 8):
        policy = fresh_policy(config, path)
        objective = preference_objective(config, policy)
        start, batches = 0, []
        for size in sizes:
            batches.append(collate_pairs(pairs[start : start + size], pad_token_id(tokenizer)))
            start += size
        loss_sum, count, _ = accumulate_gradients(policy, batches, "cpu", objective=objective)
        assert count.item() == 8
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.requires_grad]))
        metrics = objective.take_metrics()
        assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                                "logps/chosen", "logps/rejected"}  # fmt: skip
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_a_dpo_run_logs_trls_metrics_and_starts_at_log_2(tmp_path):
    config, _ = load_config(CONFIG, [f"work_dir={str(tmp_path)!r}", "max_steps=3", "dtype='fp32'", "evaluation_inputs=[]"])
    output = io.StringIO()
    result = train(config, Console(file=output, width=200))
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # the adapter starts at zero: policy = reference
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(records[-1])
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert "packed into" in output.getvalue() and "rows of 128 tokens" in output.getvalue()


def test_preference_stages_refuse_what_they_cannot_train_yet(tmp_path):
    config, _ = load_config(CONFIG, [f"work_dir={str(tmp_path)!r}", "method='full'",
                                     "deepspeed='deepspeed_zero2'"])  # fmt: skip
    with pytest.raises(ConfigError, match="stage = 'dpo' trains language models with LoRA/QLoRA"):
        train(config, Console(file=io.StringIO()))
