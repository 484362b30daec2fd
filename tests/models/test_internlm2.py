import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from xtune.errors import CheckpointError
from xtune.models.internlm2 import (
    internlm2_to_llama_config,
    internlm2_to_llama_state_dict,
    is_internlm2,
    llama_to_internlm2_config,
    llama_to_internlm2_state_dict,
    save_internlm2,
)
from xtune.models.load import load_model

INTERNLM2_CHAT_1_8B = {
    "architectures": ["InternLM2ForCausalLM"],
    "attn_implementation": "eager",
    "auto_map": {
        "AutoConfig": "configuration_internlm2.InternLM2Config",
        "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
    },
    "bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 32768,
    "model_type": "internlm2",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "pad_token_id": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 92544,
}


TINY_LLAMA = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
)


def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA | overrides)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    return model


def logits(model, length=12):
    input_ids = torch.arange(length).remainder(model.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("num_key_value_heads", [1, 2, 4])
@pytest.mark.parametrize("attention_bias", [False, True])
def test_state_dict_round_trip_is_exact(num_key_value_heads, attention_bias):
    model = tiny_llama(num_key_value_heads=num_key_value_heads, attention_bias=attention_bias)
    config = llama_to_internlm2_config(model.config)
    llama = model.state_dict()
    internlm2 = llama_to_internlm2_state_dict(llama, config)
    back = internlm2_to_llama_state_dict(internlm2, config)
    assert back.keys() == llama.keys()
    assert all(torch.equal(back[name], llama[name]) for name in llama)
    again = llama_to_internlm2_state_dict(back, config)
    assert all(torch.equal(again[name], internlm2[name]) for name in internlm2)


def test_state_dict_uses_internlm2_names():
    model = tiny_llama()
    names = llama_to_internlm2_state_dict(model.state_dict(), llama_to_internlm2_config(model.config)).keys()
    layer = {name.removeprefix("model.layers.0.") for name in names if name.startswith("model.layers.0.")}
    assert layer == {
        "attention.wqkv.weight",
        "attention.wo.weight",
        "feed_forward.w1.weight",
        "feed_forward.w2.weight",
        "feed_forward.w3.weight",
        "attention_norm.weight",
        "ffn_norm.weight",
    }
    assert {"model.tok_embeddings.weight", "model.norm.weight", "output.weight"} <= names


@pytest.mark.parametrize("num_key_value_heads", [1, 2, 4])
def test_wqkv_is_grouped_by_key_value_head(num_key_value_heads):
    model = tiny_llama(num_key_value_heads=num_key_value_heads, attention_bias=True)
    attention = model.model.layers[1].self_attn
    head_dim, queries_per_group = 16, 4 // num_key_value_heads
    internlm2 = llama_to_internlm2_state_dict(model.state_dict(), llama_to_internlm2_config(model.config))

    def head(projection, index):
        return projection[index * head_dim : (index + 1) * head_dim]

    for kind in ("weight", "bias"):
        q, k, v = (getattr(getattr(attention, f"{name}_proj"), kind) for name in "qkv")
        rows = []
        for group in range(num_key_value_heads):
            rows += [head(q, group * queries_per_group + i) for i in range(queries_per_group)]
            rows += [head(k, group), head(v, group)]
        assert torch.equal(internlm2[f"model.layers.1.attention.wqkv.{kind}"], torch.cat(rows))


def test_config_round_trip():
    llama = internlm2_to_llama_config(INTERNLM2_CHAT_1_8B)
    assert llama.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000}
    assert (llama.num_key_value_heads, llama.head_dim, llama.attention_bias) == (8, 128, False)
    assert (llama.rms_norm_eps, llama.pad_token_id, llama.dtype) == (1e-5, 2, torch.bfloat16)
    assert llama_to_internlm2_config(llama) == INTERNLM2_CHAT_1_8B


def test_config_without_rope_scaling():
    config = INTERNLM2_CHAT_1_8B | {"rope_scaling": None}
    assert internlm2_to_llama_config(config).rope_parameters == {"rope_type": "default", "rope_theta": 1000000}
    assert llama_to_internlm2_config(internlm2_to_llama_config(config)) == config


def test_config_defaults_follow_internlm2():
    config = {key: INTERNLM2_CHAT_1_8B[key] for key in ("vocab_size", "hidden_size", "intermediate_size")}
    llama = internlm2_to_llama_config(config | {"num_hidden_layers": 2, "num_attention_heads": 16})
    assert (llama.num_key_value_heads, llama.attention_bias, llama.rope_parameters["rope_theta"]) == (16, True, 10000)


def test_config_errors_name_the_field():
    with pytest.raises(CheckpointError, match="'hidden_size'"):
        internlm2_to_llama_config({k: v for k, v in INTERNLM2_CHAT_1_8B.items() if k != "hidden_size"})
    with pytest.raises(CheckpointError, match="'yarn'"):
        internlm2_to_llama_config(INTERNLM2_CHAT_1_8B | {"rope_scaling": {"type": "yarn", "factor": 4.0}})


def test_is_internlm2():
    assert is_internlm2(INTERNLM2_CHAT_1_8B)
    assert is_internlm2({"architectures": ["InternLM2ForCausalLM"]})
    assert not is_internlm2({"model_type": "llama", "architectures": None})


def test_saved_folder_gives_the_same_logits(tmp_path):
    model = tiny_llama()
    save_internlm2(model, tmp_path)
    loaded = load_model(tmp_path)
    assert isinstance(loaded, LlamaForCausalLM)
    assert (logits(loaded) - logits(model)).abs().max() < 1e-5
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "internlm2" and config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_")


def test_dynamic_rope_scaling_survives_the_trip(tmp_path):
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10_000.0}
    model = tiny_llama(max_position_embeddings=8, rope_parameters=rope)
    save_internlm2(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    loaded = load_model(tmp_path)
    assert loaded.config.rope_parameters == rope
    assert (logits(loaded, length=20) - logits(model, length=20)).abs().max() < 1e-5


def test_attention_bias_survives_the_trip(tmp_path):
    model = tiny_llama(attention_bias=True)
    save_internlm2(model, tmp_path)
    assert "model.layers.0.attention.wqkv.bias" in load_file(tmp_path / "model.safetensors")
    assert (logits(load_model(tmp_path)) - logits(model)).abs().max() < 1e-5


def test_tied_embeddings(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    save_internlm2(model, tmp_path)
    assert "output.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert (logits(loaded) - logits(model)).abs().max() < 1e-5


def test_sharded_save_loads(tmp_path):
    model = tiny_llama()
    save_internlm2(model, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert "model.layers.1.attention.wqkv.weight" in index["weight_map"]
    assert all((tmp_path / shard).is_file() for shard in shards)
    assert (logits(load_model(tmp_path)) - logits(model)).abs().max() < 1e-5


def test_loads_in_the_requested_dtype(tmp_path):
    save_internlm2(tiny_llama(), tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}


def rewrite_weights(folder, change):
    file = folder / "model.safetensors"
    weights = load_file(file)
    change(weights)
    save_file(weights, file)


def test_missing_tensor_is_named(tmp_path):
    save_internlm2(tiny_llama(), tmp_path)
    rewrite_weights(tmp_path, lambda weights: weights.pop("model.layers.1.attention.wqkv.weight"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors has no tensor 'model\.layers\.1\.attention\.wqkv"):
        load_model(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    save_internlm2(tiny_llama(), tmp_path)
    rewrite_weights(tmp_path, lambda weights: weights.update({"model.layers.7.attention.wo.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors holds tensor 'model\.layers\.7\.attention\.wo"):
        load_model(tmp_path)


def test_wrong_shape_is_a_checkpoint_error(tmp_path):
    save_internlm2(tiny_llama(), tmp_path)
    rewrite_weights(tmp_path, lambda weights: weights.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match="do not fit its config.json"):
        load_model(tmp_path)


def test_missing_shard_is_named(tmp_path):
    save_internlm2(tiny_llama(), tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"index.json lists {shard.name}"):
        load_model(tmp_path)


def test_folder_without_weights(tmp_path):
    save_internlm2(tiny_llama(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        load_model(tmp_path)


def test_a_full_disk_while_writing_the_llama_layout_copy_names_it_and_leaves_nothing(tmp_path, monkeypatch):
    """Issue 23, item 16: a full XTUNE_HOME was a raw SafetensorError (the copy quantized loading reads lives there)."""
    from safetensors import SafetensorError

    from xtune.errors import XtuneError
    from xtune.models.internlm2 import llama_layout_copy

    save_internlm2(tiny_llama(), tmp_path / "model")

    def full_disk(self, folder, **kwargs):
        folder.mkdir(parents=True, exist_ok=True)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", full_disk)
    message = r"could not write .*, the Llama-layout copy of .*model that quantized loading reads: the disk is full \(No space left on device\)\. Nothing earlier is lost"
    with pytest.raises(XtuneError, match=message):
        llama_layout_copy(tmp_path / "model", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
