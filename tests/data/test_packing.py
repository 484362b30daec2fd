import random

import pytest
import torch
import torch.nn.functional as F

from xtune.data.encode import IGNORE_INDEX, Encoded
from xtune.data.packing import build_row, collate_packed, pack, packing_efficiency, plan_rows
from xtune.models.attention import use_varlen_attention
from xtune.models.load import load_model, resolve_model_path


def sample(ids, trained_from=1):
    return Encoded(list(ids), [IGNORE_INDEX] * trained_from + list(ids[trained_from:]))


def test_plan_rows_best_fit_decreasing():
    assert plan_rows([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    with pytest.raises(ValueError, match="more than max_length=8"):
        plan_rows([9], 8)


def test_row_layout_positions_restart_and_padding_has_no_loss():
    row = build_row([sample([1, 10, 11]), sample([1, 20])], max_length=8, pad_token_id=2)
    assert row.input_ids == [1, 10, 11, 1, 20, 2, 2, 2]
    assert row.position_ids == [0, 1, 2, 0, 1, 0, 1, 2]
    assert row.labels == [IGNORE_INDEX, 10, 11, IGNORE_INDEX, 20, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert row.seq_lens == [3, 2, 3] and row.padding == 3


def test_a_segments_first_token_is_never_a_target():
    raw = Encoded([7, 8, 9], [7, 8, 9])  # e.g. pretraining text without BOS
    row = build_row([sample([1, 5]), raw], max_length=5, pad_token_id=0)
    assert row.labels == [IGNORE_INDEX, 5, IGNORE_INDEX, 8, 9] and row.padding == 0


def test_pack_keeps_every_sample_once_and_rows_are_exactly_max_length():
    rng = random.Random(0)
    samples = [sample([1] + [rng.randrange(3, 100) for _ in range(rng.randrange(1, 60))]) for _ in range(200)]
    rows = pack(samples, max_length=64, pad_token_id=0, shuffle_seed=3)
    assert all(len(r.input_ids) == len(r.labels) == len(r.position_ids) == 64 == sum(r.seq_lens) for r in rows)
    packed = sorted(tuple(r.input_ids[s:s + n]) for r in rows for s, n in _segments(r))
    assert packed == sorted(tuple(s.input_ids) for s in samples)
    assert packing_efficiency(rows, 64) > 0.95
    assert pack(samples, 64, 0, shuffle_seed=3) == rows


def _segments(row):
    start = 0
    for n in row.seq_lens[: len(row.seq_lens) - (1 if row.padding else 0)]:
        yield start, n
        start += n


def test_collate_concatenates_rows_with_cumulative_boundaries():
    rows = [build_row([sample([1, 2, 3])], 4, 0), build_row([sample([1, 5]), sample([1, 6])], 4, 0)]
    batch = collate_packed(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 1, 5, 1, 6]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 4, 6, 8]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 0, 1]]
    assert batch["max_length_q"] == 3


def per_token_losses(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0]
    return F.cross_entropy(logits[:-1], batch["labels"][0, 1:], ignore_index=IGNORE_INDEX, reduction="none")


@pytest.mark.parametrize("name", ["internlm2-chat", "qwen2"])
def test_packed_loss_equals_each_sample_alone(name):
    model = load_model(resolve_model_path(f"xtune-tiny/{name}"), dtype=torch.float32)
    use_varlen_attention(model)
    rng = random.Random(1)
    samples = [sample([1] + [rng.randrange(3, 2000) for _ in range(n)], trained_from=2) for n in (30, 7, 19, 44, 12)]
    rows = pack(samples, max_length=64, pad_token_id=2)
    assert len(rows) == 2
    batch = collate_packed(rows)
    packed = per_token_losses(model, batch)
    by_ids = {tuple(s.input_ids): s for s in samples}
    offset, compared = 0, 0
    for row in rows:
        for start, n in _segments(row):
            segment = row.input_ids[start : start + n]
            alone = per_token_losses(model, {"input_ids": torch.tensor([segment]), "labels": torch.tensor([by_ids[tuple(segment)].labels])})
            inside = packed[offset + start : offset + start + n - 1]
            trained = torch.tensor(by_ids[tuple(segment)].labels[1:]) != IGNORE_INDEX
            assert (inside[trained] - alone[trained]).abs().max() < 1e-5
            compared += int(trained.sum())
        offset += len(row.input_ids)
    assert compared == sum(s.num_trained for s in samples)

    # the control: the same packed batch attended across samples gives other losses
    model.set_attn_implementation("sdpa")
    leaky = per_token_losses(model, {k: batch[k] for k in ("input_ids", "labels", "attention_mask")})
    assert (leaky - packed).abs().max() > 1e-3
