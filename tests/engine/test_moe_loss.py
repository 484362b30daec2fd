"""MoE families train on the router's load-balancing loss as well: xtune's loss of a micro-batch is the model's own
(cross-entropy + router_aux_loss_coef * aux_loss), with the plain and the fused head; packed rows leave their padding
out of the router's statistics, as an unpacked batch does; the router learns from the aux term, and training with it
balances the experts; LoRA's default targets reach experts and router."""

import io
import random
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from transformers import AutoConfig, AutoModelForCausalLM

from xtune.config.schema import Config
from xtune.data.encode import IGNORE_INDEX, Encoded
from xtune.data.loader import collate
from xtune.data.packing import collate_packed, pack
from xtune.engine.loss import FusedHead, next_token_loss_sum, router_aux_coefficient
from xtune.engine.train import accumulate_gradients
from xtune.errors import ConfigError
from xtune.models.attention import use_varlen_attention
from xtune.models.lora import FastDropout, prepare_trainable
from xtune.testing.families import COMMON, FAMILIES, build_family_model

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
COEF = 0.05
"""Above the families' default (0.001), so that the router's term stands far above the tolerances."""


def moe_model(family: str):
    model = build_family_model(family).train()
    model.config.router_aux_loss_coef = model.router_aux_loss_coef = COEF  # the forward reads the attribute
    return model


def samples(count: int, longest: int, seed: int = 0) -> list[Encoded]:
    """Seeded random ids of the tiny families' vocab: a prompt, then a trained answer."""
    rng = random.Random(seed)
    result = []
    for _ in range(count):
        ids = [1] + [rng.randrange(3, 500) for _ in range(rng.randrange(8, longest))]
        cut = rng.randrange(1, len(ids) - 1)
        result.append(Encoded(ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return result


def xtune_loss(model, batch, fused=None, coef=None) -> float:
    """One micro-batch through the training loop's loss and backward: its mean loss."""
    coef = router_aux_coefficient(model, None) if coef is None else coef
    loss_sum, num_trained, _ = accumulate_gradients(model, [batch], "cpu", fused=fused, router_aux_loss_coef=coef)
    return (loss_sum / num_trained).item()


def gradients(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("head", ["plain", "fused"])
@pytest.mark.parametrize("family", MOE)
def test_one_micro_batch_gives_the_models_own_loss_and_gradients(family, head):
    model = moe_model(family)
    batch = collate(samples(4, 24), pad_token_id=0)  # right padding, untrained prompts
    own = model(**batch, output_router_logits=True).loss
    own.backward()
    own_gradients = gradients(model)
    model.zero_grad()
    with torch.no_grad():
        cross_entropy = model(**batch).loss.item()  # the config's output_router_logits = False: no router term
    assert own.item() - cross_entropy > 0.05  # coef * aux_loss (about top_k = 2): there to be missed
    fused = FusedHead.of(model) if head == "fused" else None
    assert (fused is not None) == (head == "fused")
    loss = xtune_loss(model, batch, fused)
    assert abs(loss - own.item()) < 1e-5 * own.item()
    assert (gradients(model) - own_gradients).abs().max() < 1e-5 * own_gradients.abs().max()


@pytest.mark.parametrize("family", MOE)
def test_packed_rows_give_the_unpacked_batchs_loss_and_gradients_their_padding_out_of_the_router_statistics(family):
    model = moe_model(family)
    use_varlen_attention(model)
    items = samples(6, 20)
    own_unpacked = model(**collate(items, pad_token_id=0), output_router_logits=True).loss  # padding masked out
    own_unpacked.backward()
    own_gradients, own_unpacked = gradients(model), own_unpacked.item()
    model.zero_grad()
    used = sum(len(s.input_ids) for s in items)
    # no padding; one padding segment at the end; several rows with their padding segments between samples too
    for rows in (pack(items, used, 0), pack(items, used + 8, 0), pack(items, used // 2 + 12, 0)):
        batch = collate_packed(rows)
        for fused in (None, FusedHead.of(model)):
            assert abs(xtune_loss(model, batch, fused) - own_unpacked) < 1e-5 * own_unpacked
            assert (gradients(model) - own_gradients).abs().max() < 1e-5 * own_gradients.abs().max()
            model.zero_grad()
        if sum(row.padding for row in rows):
            with torch.no_grad():  # the model's own statistics of the row count its padding
                own_row = model(**batch, output_router_logits=True).loss.item()
            assert abs(own_row - own_unpacked) > 1e-4
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    stand_in = torch.full_like(batch["labels"], IGNORE_INDEX)  # a rank's part without trained tokens adds nothing
    assert next_token_loss_sum(model, inputs, stand_in, router_aux_loss_coef=COEF).item() == 0.0


@pytest.mark.parametrize("family", MOE)
def test_under_bf16_autocast_a_packed_row_stays_near_the_unpacked_batch(family):
    model = moe_model(family)
    use_varlen_attention(model)
    items = samples(6, 20)
    batches = (collate(items, pad_token_id=0), collate_packed(pack(items, sum(len(s.input_ids) for s in items) + 8, 0)))
    losses = []
    for batch in batches:
        loss_sum, num_trained, _ = accumulate_gradients(
            model, [batch], "cpu", torch.autocast("cpu", dtype=torch.bfloat16), fused=FusedHead.of(model),
            router_aux_loss_coef=COEF,
        )  # fmt: skip
        losses.append((loss_sum / num_trained).item())
    assert abs(losses[0] - losses[1]) < 1e-3 * losses[0]  # bf16 rounding: 6e-5 measured


@pytest.mark.parametrize("family", MOE)
def test_the_router_loss_reaches_the_routers_lora_adapter(family):
    config = Config(llm_name_or_path=family, data_path="-", lora_dropout=0.0)
    model = prepare_trainable(build_family_model(family).train(), config)
    assert router_aux_coefficient(model, None) == model.config.router_aux_loss_coef > 0  # through peft's wrapper
    router = [p for name, p in model.named_parameters() if ".mlp.gate.lora_" in name]
    assert len(router) == 2 * COMMON["num_hidden_layers"]  # lora_A, lora_B of each layer's router
    batch = collate(samples(4, 24), pad_token_id=0)
    router_gradient = {}
    for coef in (0.0, COEF):
        model.zero_grad()
        xtune_loss(model, batch, coef=coef)
        router_gradient[coef] = torch.cat([p.grad.flatten() for p in router])
    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model(**inputs, output_router_logits=True).aux_loss.backward()
    expected = COEF * torch.cat([p.grad.flatten() for p in router])
    assert expected.abs().max() > 1e-5  # the aux loss's own gradient reaches the router's adapter
    assert ((router_gradient[COEF] - router_gradient[0.0]) - expected).abs().max() < 1e-4 * expected.abs().max()


@pytest.mark.parametrize("family", MOE)
def test_training_with_the_router_loss_balances_the_experts(family):
    """aux_loss is top_k when the experts are evenly loaded, more the less they are."""
    batches = [collate(samples(4, 24, seed), pad_token_id=0) for seed in range(4)]
    top_k = FAMILIES[family]["num_experts_per_tok"]

    def imbalance(model) -> float:
        with torch.no_grad():
            return sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_router_logits=True)
                       .aux_loss.item() - top_k for b in batches) / len(batches)  # fmt: skip

    after = {}
    for coef in (0.0, 0.1):
        model = build_family_model(family).train()
        before = imbalance(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(20):
            accumulate_gradients(model, [batches[step % len(batches)]], "cpu", router_aux_loss_coef=coef)
            optimizer.step()
            optimizer.zero_grad()
        after[coef] = imbalance(model)
    assert after[0.1] < 0.5 * before and after[0.1] < 0.5 * after[0.0]


def test_the_coefficient_is_the_models_own_unless_set():
    mixtral = build_family_model("mixtral")
    assert not mixtral.config.output_router_logits  # so HF's Trainer would leave the router loss out
    assert router_aux_coefficient(mixtral, None) == mixtral.config.router_aux_loss_coef > 0
    assert router_aux_coefficient(mixtral, 0.0) == 0.0
    assert router_aux_coefficient(mixtral, 0.02) == 0.02
    llava_like = SimpleNamespace(llm=mixtral)
    assert router_aux_coefficient(llava_like, None) == mixtral.config.router_aux_loss_coef
    llama4 = AutoConfig.for_model("llama4_text", **(COMMON | {"num_local_experts": 2, "head_dim": 16}))
    assert llama4.router_aux_loss_coef  # its config has the key, its modelling no router loss
    for model_type, config in (("llama", None), ("deepseek_v2", None), ("llama4_text", llama4)):
        config = config or AutoConfig.for_model(model_type, **COMMON)
        model = AutoModelForCausalLM.from_config(config)  # transformers' DeepSeek-V2 computes no router loss either
        assert router_aux_coefficient(model, None) == router_aux_coefficient(model, 0.0) == 0.0
        with pytest.raises(ConfigError, match=f"router_aux_loss_coef = 0.01: {model_type} computes no router"):
            router_aux_coefficient(model, 0.01)


@pytest.mark.parametrize("family", MOE)
def test_lora_dropout_stays_on_the_layers_and_off_the_parameters_adapters(family, tmp_path):
    """peft's adapters on the experts' and router's parameters refuse dropout (xtune's default lora_dropout is 0.1)."""
    from peft import PeftModel

    model = prepare_trainable(build_family_model(family), Config(llm_name_or_path=family, data_path="-"))
    dropouts = [m for m in model.modules() if isinstance(m, FastDropout)]
    linear = 4 + (4 if family == "qwen2_moe" else 0)  # q, k, v, o; Qwen2-MoE's shared expert: gate, up, down, its gate
    assert len(dropouts) == linear * COMMON["num_hidden_layers"] and dropouts[0].p == 0.1
    model.save_pretrained(tmp_path)
    assert PeftModel.from_pretrained(build_family_model(family), tmp_path).peft_config["default"].lora_dropout == 0.0


def test_lora_all_linear_leaves_deepseek_v2s_dense_and_shared_mlps_out():
    """peft 0.21 renames targets named gate_proj/up_proj/down_proj to the fused experts' parameters for transformers
    5 (huggingface/peft#3711): DeepSeek-V2's first, dense MLP and its shared experts get no adapter. Pinned so that the
    docs change with peft."""
    deepseek = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                    first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                    v_head_dim=16, n_group=1, topk_group=1)  # fmt: skip
    config = AutoConfig.for_model("deepseek_v2", **(COMMON | deepseek))
    model = prepare_trainable(AutoModelForCausalLM.from_config(config), Config(llm_name_or_path="d", data_path="-"))
    adapted = {name.split(".layers.", 1)[1].rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters()
               if ".lora_A" in name}  # fmt: skip
    assert {"1.mlp.gate", "1.mlp.experts", "1.mlp.experts.base_layer", "0.self_attn.kv_b_proj"} <= adapted
    assert not any(".mlp.gate_proj" in name or "shared_experts" in name for name in adapted)


def test_train_adds_the_models_own_router_loss_and_says_so(tmp_path):
    from transformers import GenerationConfig

    from xtune.config.load import load_config
    from xtune.engine.train import train
    from xtune.testing.tiny import VOCAB_MULTIPLE, build_tokenizer

    tokenizer = build_tokenizer()
    vocab_size = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    config = AutoConfig.for_model("mixtral", **(COMMON | FAMILIES["mixtral"] | {"vocab_size": vocab_size}))
    folder = tmp_path / "tiny-mixtral"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)
    first_losses, said = {}, {}
    for coef in (None, 0.0):
        overrides = [f"llm_name_or_path={str(folder)!r}", f"work_dir={str(tmp_path / str(coef))!r}", "max_steps=1",
                     "evaluation_inputs=[]", f"router_aux_loss_coef={coef}"]  # fmt: skip
        output = io.StringIO()
        first_losses[coef] = train(load_config("tiny_internlm2_chat_lora_antonyms", overrides)[0],
                                   Console(file=output, width=200)).losses[0]  # fmt: skip
        said[coef] = "router load-balancing loss in the training loss, coefficient 0.001" in output.getvalue()
    assert said == {None: True, 0.0: False}
    assert 0.001 * 1.9 < first_losses[None] - first_losses[0.0] < 0.001 * 2.5  # 0.001 * aux_loss (top_k = 2 even)
