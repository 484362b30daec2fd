"""Every family the built-in configs name, as a tiny model of its own architecture: packed rows give each
sample's own losses (the family's soft-capping and sliding windows honoured), and LoRA trains it."""

import random

import pytest
import torch
import torch.nn.functional as F

from xtune.config.schema import Config
from xtune.data.encode import Encoded
from xtune.data.packing import collate_packed, pack
from xtune.models.attention import use_varlen_attention
from xtune.models.lora import prepare_trainable
from xtune.testing.families import FAMILIES, build_family_model


def losses(model, input_ids, **extra):
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False, **extra).logits[0]
    return F.cross_entropy(logits[:-1].float(), input_ids[0, 1:], reduction="none")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_rows_give_each_samples_own_losses(family):
    model = build_family_model(family)
    rng = random.Random(0)
    samples = [Encoded(ids, ids) for ids in ([1] + [rng.randrange(3, 500) for _ in range(n)] for n in (20, 6, 13, 25))]
    alone = [losses(model, torch.tensor([s.input_ids])) for s in samples]  # the family's own attention
    use_varlen_attention(model)
    (row,) = pack(samples, max_length=72, pad_token_id=0, shuffle_seed=None)
    batch = collate_packed([row])
    packed = losses(model, batch["input_ids"], position_ids=batch["position_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"],
                    cu_seq_lens_k=batch["cu_seq_lens_k"], max_length_q=batch["max_length_q"],
                    max_length_k=batch["max_length_k"])  # fmt: skip
    by_ids = {tuple(s.input_ids): loss for s, loss in zip(samples, alone)}
    start = 0
    for bound in batch["cu_seq_lens_q"].tolist()[1:]:
        ids = tuple(row.input_ids[start:bound])
        if ids in by_ids:
            assert (packed[start : bound - 1] - by_ids[ids]).abs().max() < 1e-4, family
            del by_ids[ids]
        start = bound
    assert not by_ids  # every sample compared


@pytest.mark.parametrize("family", ["gemma2", "mixtral", "qwen2_moe", "qwen3_moe", "phi3"])
def test_lora_reaches_every_linear_layer_and_trains(family):
    config = Config(llm_name_or_path="-", data_path="-", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model = prepare_trainable(build_family_model(family), config)
    adapted = {name.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if ".lora_A" in name}
    assert adapted >= {"q_proj" if family != "phi3" else "qkv_proj", "o_proj"}
    if "moe" in family or family == "mixtral":  # the fused experts and the router: adapters on their parameters
        experts = [name for name, _ in model.named_parameters() if ".experts." in name and ".lora_A" in name]
        assert {"experts", "gate"} <= adapted and len(experts) == 2 * 2  # gate_up_proj, down_proj in both layers
    if family == "qwen2_moe":  # its shared expert's layers too
        assert {"shared_expert_gate", "gate_proj", "up_proj", "down_proj"} <= adapted
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[1, *range(10, 40)]])
    model.train()
    first = None
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.7 * first


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_unpacked_batches_with_padding_through_the_packed_attention_give_the_familys_logits(family):
    """After packed training, evaluation generates through the same attention: without boundaries it must be the
    family's own (a padded batch, Gemma 2's soft-capping)."""
    model = build_family_model(family)
    input_ids = torch.tensor([[0, 0, 0, 1, *range(10, 30)], [1, *range(40, 63)]])
    attention_mask = (torch.arange(input_ids.shape[1]) >= torch.tensor([[3], [0]])).long()
    with torch.no_grad():
        own = model(input_ids=input_ids, attention_mask=attention_mask).logits
        use_varlen_attention(model)
        ours = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (own - ours)[attention_mask.bool()].abs().max() < 1e-4
