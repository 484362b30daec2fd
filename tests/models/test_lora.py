import pytest
import torch

from xtune.config.schema import Config
from xtune.models.load import load_model, resolve_model_path
from xtune.models.lora import FastDropout, count_parameters, prepare_trainable


def config(**values):
    return Config(llm_name_or_path="xtune-tiny/llama", data_path="-", lora_r=8, lora_alpha=16, **values)


def model():
    return load_model(resolve_model_path("xtune-tiny/llama"))


def test_lora_adapts_every_linear_layer_but_the_head():
    peft_model = prepare_trainable(model(), config())
    adapted = {name.split(".lora_A")[0].split(".")[-1] for name, _ in peft_model.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in name and "lora" in name for name, _ in peft_model.named_parameters())
    trainable, total = count_parameters(peft_model)
    assert 0 < trainable < 0.2 * total


def test_dora_and_rslora_options_reach_peft():
    dora = prepare_trainable(model(), config(use_dora=True))
    assert any("lora_magnitude_vector" in name for name, _ in dora.named_parameters())
    rslora = prepare_trainable(model(), config(use_rslora=True))
    assert rslora.peft_config["default"].use_rslora
    layer = rslora.base_model.model.model.layers[0].self_attn.q_proj
    assert abs(layer.scaling["default"] - 16 / 8**0.5) < 1e-9


def test_full_method_trains_every_weight():
    full = prepare_trainable(model(), config(method="full"))
    trainable, total = count_parameters(full)
    assert trainable == total


def test_modules_to_save_train_in_full_beside_the_adapters():
    peft_model = prepare_trainable(model(), config(modules_to_save=["embed_tokens", "lm_head"]))
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any("embed_tokens.modules_to_save" in name for name in trainable)
    assert any("lm_head.modules_to_save" in name for name in trainable)


def test_embeddings_grow_when_the_tokenizer_does(tokenizer):
    from copy import deepcopy

    from xtune.models.lora import fit_embeddings

    llama = model()
    rows = llama.get_input_embeddings().num_embeddings
    assert not fit_embeddings(llama, tokenizer)
    grown = deepcopy(tokenizer)
    grown.add_special_tokens({"additional_special_tokens": [f"<|new_{i}|>" for i in range(rows - len(tokenizer) + 3)]})
    assert fit_embeddings(llama, grown)
    assert llama.get_input_embeddings().num_embeddings >= len(grown)
    assert llama.get_input_embeddings().num_embeddings % 64 == 0
    assert llama.get_output_embeddings().weight.shape[0] == llama.get_input_embeddings().num_embeddings


def test_attach_adapter_refuses_folders_that_are_not_complete_adapters(tmp_path):
    from xtune.errors import CheckpointError
    from xtune.models.lora import attach_adapter

    partial = tmp_path / ".checkpoint-5.partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="save was interrupted"):
        attach_adapter(None, partial, "base")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        attach_adapter(None, tmp_path / "a", "base")


def test_fast_dropout_keeps_the_distribution_of_nn_dropout():
    torch.manual_seed(0)
    x = torch.rand(1000, 1000, dtype=torch.bfloat16) + 1
    dropout = FastDropout(0.1).train()
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - 3277 / 2**15)) < 0.002  # p rounded to 3277 / 2**15
    scale = 2**15 / (2**15 - 3277)
    assert torch.equal(y[kept], (x * scale)[kept])
    assert abs(y.double().sum().item() / x.double().sum().item() - 1) < 0.003  # unbiased
    rows, columns = kept.float().mean(1), kept.float().mean(0)  # no pattern along either axis
    assert rows.std().item() < 0.02 and columns.std().item() < 0.02
    torch.manual_seed(0)
    torch.rand(1000, 1000)
    assert torch.equal(dropout(x), y)  # seeded by torch's generator
    assert not torch.equal(dropout(x), y)
    assert dropout.eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    assert (FastDropout(0.99999).train()(x) != 0).float().mean() < 0.001  # p -> 1: no division by zero


def test_fast_dropout_gradient_is_the_mask_times_the_scale():
    x = torch.randn(7, 33, requires_grad=True)  # odd sizes: the draws are cut to the element count
    y = FastDropout(0.5).train()(x)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() * 2)


def test_lora_adapters_drop_out_with_fast_dropout():
    peft_model = prepare_trainable(model(), config(lora_dropout=0.1))
    dropouts = [m for m in peft_model.modules() if isinstance(m, FastDropout)]
    assert len(dropouts) == 7 * peft_model.config.num_hidden_layers and dropouts[0].p == 0.1
    assert not any(isinstance(m, torch.nn.Dropout) for m in peft_model.modules())
    no_dropout = prepare_trainable(model(), config(lora_dropout=0.0))
    assert not any(isinstance(m, FastDropout) for m in no_dropout.modules())


def test_an_adapter_of_another_base_is_warned_of(tmp_path):
    import json

    from xtune.models.lora import other_base_warning

    adapter = tmp_path / "checkpoint-10"
    adapter.mkdir()
    assert other_base_warning(adapter, "xtune-tiny/internlm2-chat") is None  # nothing recorded: nothing to say
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/qwen2"}))
    assert "'/models/qwen2'" in other_base_warning(adapter, "xtune-tiny/internlm2-chat")
    (adapter / "xtune_run.json").write_text(json.dumps({"llm_name_or_path": "internlm/internlm2-chat-1_8b"}))
    assert other_base_warning(adapter, "/data/internlm2-chat-1_8b/") is None  # the same model elsewhere
    warning = other_base_warning(adapter, "xtune-tiny/qwen2")
    assert warning == (
        f"the adapter {adapter} was trained on 'internlm/internlm2-chat-1_8b', and the base given is 'xtune-tiny/qwen2'; "
        "unless they are the same model, its answers will be wrong."
    )


@pytest.mark.parametrize("key, value", [("modules_to_save", ["embed_token"]), ("lora_target_modules", ["q_projj"])])
def test_a_module_name_the_model_lacks_is_named_before_training(key, value):
    from xtune.config.schema import Config
    from xtune.errors import ConfigError
    from xtune.models.load import load_model, resolve_model_path
    from xtune.models.lora import prepare_trainable

    model = load_model(resolve_model_path("xtune-tiny/llama"))
    config = Config(llm_name_or_path="xtune-tiny/llama", data_path="d.json", **{key: value})
    with pytest.raises(ConfigError, match=rf"{key}: the model has no module named '{value[0]}'; its linear layers are .*q_proj"):
        prepare_trainable(model, config)
    fine = Config(llm_name_or_path="xtune-tiny/llama", data_path="d.json", lora_target_modules=["self_attn.q_proj"],
                  modules_to_save=["embed_tokens"])  # fmt: skip
    prepare_trainable(load_model(resolve_model_path("xtune-tiny/llama")), fine)
