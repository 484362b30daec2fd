import json
import os
import shutil

import pytest
import torch

from xtune.errors import ConfigError, ModelNotFoundError, XtuneError
from xtune.models.load import (
    hf_hub_cache,
    load_model,
    load_tokenizer,
    model_architecture,
    quantization_config,
    resolve_model_path,
)
from xtune.testing.tiny import TINY_MODELS, tiny_model_path


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face and ModelScope caches, and a working folder with nothing in it."""
    hf, modelscope, cwd = tmp_path / "hf", tmp_path / "modelscope", tmp_path / "cwd"
    for folder in (hf, modelscope, cwd):
        folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(modelscope))
    monkeypatch.chdir(cwd)
    return hf, modelscope


def model_folder(path, config=None):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return path


def hf_snapshots(hf, repo_id, revisions, main=None):
    repo = hf / ("models--" + repo_id.replace("/", "--"))
    for age, revision in enumerate(revisions):
        snapshot = model_folder(repo / "snapshots" / revision)
        os.utime(snapshot, (1_000_000 + age, 1_000_000 + age))
    if main:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(main)
    return repo / "snapshots"


def test_local_folder(tmp_path):
    folder = model_folder(tmp_path / "my-model")
    assert resolve_model_path(str(folder)) == folder


def test_local_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path / 'empty'} has no config.json"):
        resolve_model_path(str(tmp_path / "empty"))


def test_hf_cache_prefers_refs_main(caches):
    snapshots = hf_snapshots(caches[0], "internlm/internlm2-chat-1_8b", ["aaa", "bbb"], main="aaa\n")
    assert resolve_model_path("internlm/internlm2-chat-1_8b") == snapshots / "aaa"


def test_hf_cache_without_refs_takes_the_newest_snapshot(caches):
    snapshots = hf_snapshots(caches[0], "internlm/internlm2-chat-1_8b", ["aaa", "bbb"])
    assert resolve_model_path("internlm/internlm2-chat-1_8b") == snapshots / "bbb"


def test_hf_cache_repo_without_org(caches):
    snapshots = hf_snapshots(caches[0], "gpt2", ["abc"], main="abc")
    assert resolve_model_path("gpt2") == snapshots / "abc"


def test_hf_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert hf_hub_cache() == tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hf_hub_cache() == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    ("repo_id", "stored_as"),
    [
        ("internlm/internlm2-chat-1_8b", "internlm/internlm2-chat-1_8b"),
        ("internlm/internlm2-chat-1_8b", "models/internlm/internlm2-chat-1_8b"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2___5-0___5B-Instruct"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "models/Qwen/Qwen2___5-0___5B-Instruct"),
    ],
)
def test_modelscope_cache_layouts(caches, repo_id, stored_as):
    folder = model_folder(caches[1] / stored_as)
    assert resolve_model_path(repo_id) == folder


def test_not_found_lists_every_place_looked(caches):
    hf, modelscope = caches
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model_path("internlm/internlm2-chat-7b")
    message = str(error.value)
    for place in (
        os.path.join(os.getcwd(), "internlm/internlm2-chat-7b"),
        hf / "models--internlm--internlm2-chat-7b" / "snapshots",
        modelscope / "internlm/internlm2-chat-7b",
        modelscope / "models/internlm/internlm2-chat-7b",
    ):
        assert str(place) in message
    assert "huggingface-cli download internlm/internlm2-chat-7b" in message
    assert "modelscope download --model internlm/internlm2-chat-7b" in message
    assert "local folder" in message


def test_a_path_is_not_looked_up_in_caches(caches, tmp_path):
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model_path(str(tmp_path / "nowhere"))
    assert str(error.value) == f"there is no folder {tmp_path / 'nowhere'}; pass a folder that holds config.json"


def test_snapshot_without_config_is_skipped(caches):
    snapshots = hf_snapshots(caches[0], "org/model", ["good"], main="partial")
    (snapshots / "partial").mkdir()
    assert resolve_model_path("org/model") == snapshots / "good"


def test_tiny_model_id():
    assert resolve_model_path("xtune-tiny/internlm2-chat") == tiny_model_path("internlm2-chat")


@pytest.mark.parametrize("name", TINY_MODELS)
def test_model_architecture(name):
    assert model_architecture(tiny_model_path(name)) == TINY_MODELS[name].architecture


def test_custom_code_is_refused_without_trust(tmp_path):
    folder = model_folder(
        tmp_path / "custom",
        {"model_type": "mystery", "auto_map": {"AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"}},
    )
    with pytest.raises(XtuneError, match="modeling_mystery.MysteryForCausalLM") as error:
        load_model(folder)
    assert "trust_remote_code = True" in str(error.value)
    assert "--trust-remote-code" in str(error.value)


def test_unknown_model_type_without_code(tmp_path):
    with pytest.raises(XtuneError, match="model_type 'mystery'.*not know"):
        load_model(model_folder(tmp_path / "unknown", {"model_type": "mystery"}))


def test_auto_map_of_a_known_architecture_loads_natively(tmp_path):
    folder = shutil.copytree(tiny_model_path("llama"), tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    assert type(load_model(folder)).__name__ == "LlamaForCausalLM"


def test_dtype(tmp_path):
    model = load_model(tiny_model_path("qwen2"), dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}


def test_internlm2_tokenizer_loads_without_remote_code():
    tokenizer = load_tokenizer(tiny_model_path("internlm2-chat"))
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id


def test_tokenizer_folder_without_config(tmp_path):
    tokenizer = load_tokenizer(tiny_model_path("llama"))
    tokenizer.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path)("hi").input_ids == tokenizer("hi").input_ids


def test_internlm2_keeps_its_generation_config():
    path = tiny_model_path("internlm2-chat")
    im_end = load_tokenizer(path).convert_tokens_to_ids("<|im_end|>")
    assert load_model(path).generation_config.eos_token_id == [2, im_end]


def test_quantization_config():
    four_bit = quantization_config("4bit", torch.bfloat16)
    assert four_bit.load_in_4bit and four_bit.bnb_4bit_quant_type == "nf4" and four_bit.bnb_4bit_use_double_quant
    assert four_bit.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("8bit", torch.bfloat16).load_in_8bit
    assert quantization_config(None, torch.bfloat16) is None
    with pytest.raises(ConfigError, match="'3bit'"):
        quantization_config("3bit", torch.bfloat16)




def test_incomplete_model_folders_are_clear_errors(tmp_path):
    import shutil

    from xtune.errors import CheckpointError
    from xtune.models.load import load_model, load_tokenizer, resolve_model_path

    tiny = resolve_model_path("xtune-tiny/llama")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny / "config.json", config_only)
    with pytest.raises(CheckpointError, match="config-only has a config.json but no weights"):
        load_model(config_only)
    with pytest.raises(CheckpointError, match="config-only has no tokenizer"):
        load_tokenizer(config_only)
