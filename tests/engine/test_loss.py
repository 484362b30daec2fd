import pytest
import torch
import torch.nn.functional as F

from xtune.config.schema import Config
from xtune.data.encode import IGNORE_INDEX, Encoded
from xtune.data.loader import collate
from xtune.data.packing import collate_packed, pack
from xtune.engine.loss import FusedHead, linear_cross_entropy, next_token_loss_sum, next_token_targets
from xtune.models.attention import use_varlen_attention
from xtune.models.load import load_model, resolve_model_path
from xtune.models.lora import prepare_trainable

X = IGNORE_INDEX


def test_next_token_targets_keep_positions_whose_next_token_is_trained():
    labels = torch.tensor([[X, X, 7, 8, X], [X, 5, X, X, 9]])
    keep, targets = next_token_targets(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, False, False, True, False]]
    assert targets.tolist() == [7, 8, 5, 9]


@pytest.mark.parametrize("weight_trains", [True, False])
def test_linear_cross_entropy_equals_the_head_then_cross_entropy(weight_trains):
    torch.manual_seed(0)
    hidden = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=weight_trains)
    targets = torch.randint(0, 50, (10,))
    expected = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
    expected_grads = torch.autograd.grad(expected * 3, [hidden, weight] if weight_trains else [hidden])
    fused = linear_cross_entropy(hidden, weight, targets, chunk=3)  # 4 chunks, the last of one token
    grads = torch.autograd.grad(fused * 3, [hidden, weight] if weight_trains else [hidden])
    assert abs(fused.item() - expected.item()) < 1e-6 * expected.item()
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert (grad - expected_grad).abs().max() < 1e-5


def test_linear_cross_entropy_under_bf16_autocast_rounds_as_the_head_does():
    torch.manual_seed(0)
    hidden = torch.randn(64, 32, requires_grad=True)  # fp32 residual stream, as in full fine-tuning
    weight = torch.randn(300, 32, requires_grad=True)
    targets = torch.randint(0, 300, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
        fused = linear_cross_entropy(hidden, weight, targets, chunk=16)
    assert abs(fused.item() - expected.item()) < 1e-4 * expected.item()
    expected_grads = torch.autograd.grad(expected, [hidden, weight])
    grads = torch.autograd.grad(fused, [hidden, weight])
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert grad.dtype == torch.float32
        assert (grad - expected_grad).abs().max() < 0.02 * expected_grad.abs().max()


def random_samples(count: int, longest: int) -> list[Encoded]:
    """Seeded samples of random ids: a prompt, then a trained answer."""
    import random

    rng = random.Random(0)
    samples = []
    for _ in range(count):
        ids = [1] + [rng.randrange(3, 2000) for _ in range(rng.randrange(5, longest))]
        cut = rng.randrange(1, len(ids) - 1)
        samples.append(Encoded(ids, [X] * cut + ids[cut:]))
    return samples


def _tiny_batches():
    samples = random_samples(6, 30)
    return {"unpacked": collate(samples, pad_token_id=2), "packed": collate_packed(pack(samples, 64, 2)[:1])}


def _full_logits_loss(model, batch):
    batch = dict(batch)
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=X, reduction="sum")


@pytest.mark.parametrize("layout", ["unpacked", "packed"])
def test_trained_positions_only_and_fused_give_the_full_logits_loss_and_gradients(layout):
    torch.manual_seed(0)
    model = prepare_trainable(
        load_model(resolve_model_path("xtune-tiny/llama"), dtype=torch.float32),
        Config(llm_name_or_path="xtune-tiny/llama", data_path="-", lora_dropout=0.0),
    )
    use_varlen_attention(model)
    for module in model.modules():  # LoRA B starts at zero: make the adapters matter
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.02)
    batch = _tiny_batches()[layout]
    trained = [p for p in model.parameters() if p.requires_grad]
    fused = FusedHead.of(model)
    assert fused is not None

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in trained])

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    reference = loss_and_grads(lambda: _full_logits_loss(model, batch))
    for way in (None, fused):
        loss, grads = loss_and_grads(lambda: next_token_loss_sum(model, inputs, batch["labels"], fused=way))
        assert abs(loss - reference[0]) < 1e-5 * reference[0]
        assert (grads - reference[1]).abs().max() < 1e-5 * reference[1].abs().max()
    assert model(**inputs, use_cache=False).logits.shape[-1] == model.config.vocab_size  # the head is back


def test_the_head_is_restored_when_the_forward_fails():
    model = load_model(resolve_model_path("xtune-tiny/llama"), dtype=torch.float32)
    fused = FusedHead.of(model)
    with pytest.raises(RuntimeError, match="boom"), fused.hidden_states():
        assert model.lm_head(torch.ones(2, 3)).shape == (2, 3)
        raise RuntimeError("boom")
    assert model.lm_head(torch.ones(1, model.config.hidden_size)).shape[-1] == model.config.vocab_size
    assert "forward" not in vars(model.lm_head)


def test_no_fused_head_where_the_head_is_not_a_plain_linear_layer():
    def tiny(**values):
        return prepare_trainable(
            load_model(resolve_model_path("xtune-tiny/llama")),
            Config(llm_name_or_path="xtune-tiny/llama", data_path="-", **values),
        )

    assert FusedHead.of(tiny()) is not None
    assert FusedHead.of(tiny(method="full")) is not None
    assert FusedHead.of(tiny(modules_to_save=["lm_head"])) is None  # peft's wrapper around a trained copy
    assert FusedHead.of(tiny(lora_target_modules=["q_proj", "lm_head"])) is None  # LoRA on the head
    soft_capped = tiny()
    soft_capped.config.model_type = "gemma2"  # logits soft-capped after the head: the fused loss would skip that
    assert FusedHead.of(soft_capped) is None


def test_an_fp16_loss_scale_does_not_overflow_the_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(8, 16, dtype=torch.float16, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float16) * 0.001  # gradients of ~1e-3
    targets = torch.randint(0, 40, (8,))
    (linear_cross_entropy(hidden, weight, targets) * (65536.0 * 8 / 4)).backward()  # scale x 8 ranks / 4 tokens
    assert torch.isfinite(hidden.grad).all() and hidden.grad.abs().max() > 1


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward knows nothing of `logits_to_keep`, as some remote code is."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()


def test_a_model_without_logits_to_keep_gets_the_same_loss():
    torch.manual_seed(0)
    model = load_model(resolve_model_path("xtune-tiny/llama"), dtype=torch.float32)
    batch = _tiny_batches()["unpacked"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    reference = _full_logits_loss(model, batch).item()
    plain = _NoLogitsToKeep(model)
    assert FusedHead.of(plain) is not None
    for fused in (None, FusedHead.of(plain)):
        loss = next_token_loss_sum(plain, inputs, batch["labels"], fused=fused).item()
        assert abs(loss - reference) < 1e-5 * reference
