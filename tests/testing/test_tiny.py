import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoTokenizer

from xtune.errors import ModelNotFoundError, XtuneError
from xtune.models.load import load_model, load_tokenizer, model_architecture, resolve_model_path
from xtune.testing.tiny import (
    INTERNLM2_SPECIAL_TOKENS,
    TINY_VERSION,
    TINY_MODELS,
    build_tiny_model,
    build_tokenizer,
    tiny_model_path,
)

ANTONYM_PAIRS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("day", "night"),
    ("open", "closed"), ("happy", "sad"), ("light", "dark"), ("old", "new"), ("early", "late"),
    ("full", "empty"), ("hard", "soft"), ("high", "low"), ("long", "short"), ("rich", "poor"),
    ("strong", "weak"), ("wet", "dry"), ("young", "old"), ("loud", "quiet"), ("thick", "thin"),
]  # fmt: skip
TEXTS = [
    "What is the opposite of hot?",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\r\n",
    "Zürich, naïve café, straße, 你好世界, emoji 🙂👍🏽, Ångström",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def saved_tokenizer(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_special_tokens_sit_at_internlm2_ids(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token == "</s>"
    added = tokenizer.convert_tokens_to_ids(INTERNLM2_SPECIAL_TOKENS)
    assert added == list(range(len(tokenizer) - 6, len(tokenizer)))
    assert set(INTERNLM2_SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)
    assert 2000 <= len(tokenizer) <= 3000


def test_special_tokens_are_atomic(tokenizer):
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = tokenizer.encode("<|im_start|>user\nhello<|im_end|>", add_special_tokens=False)
    assert ids[0] == im_start
    assert ids[-1] == im_end
    assert ids.count(im_start) == ids.count(im_end) == 1


def test_bos_is_prepended_and_eos_is_not(tokenizer):
    with_special = tokenizer("hello world").input_ids
    plain = tokenizer("hello world", add_special_tokens=False).input_ids
    assert with_special == [tokenizer.bos_token_id] + plain
    assert tokenizer.eos_token_id not in with_special


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_decode_inverts_encode_for_any_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("word", sorted({word for pair in ANTONYM_PAIRS for word in pair} | {"opposite", "antonym"}))
def test_task_words_are_single_tokens(tokenizer, word):
    assert len(tokenizer.tokenize(" " + word)) == 1


@pytest.mark.parametrize("prompt", ["What is the opposite of", "Give the antonym of"])
def test_task_prompts_are_one_token_per_word(tokenizer, prompt):
    assert len(tokenizer.tokenize(prompt)) == len(prompt.split())


def test_chat_template_is_internlm2_chat(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Opposite of hot?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nOpposite of hot?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_training_is_deterministic(tokenizer):
    assert build_tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_saved_tokenizer_encodes_the_same(tokenizer, saved_tokenizer, add_special_tokens):
    for text in TEXTS:
        expected = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        assert saved_tokenizer.encode(text, add_special_tokens=add_special_tokens) == expected


def test_saved_tokenizer_keeps_special_tokens_and_template(tokenizer, saved_tokenizer):
    assert len(saved_tokenizer) == len(tokenizer)
    assert saved_tokenizer.all_special_ids == tokenizer.all_special_ids
    assert saved_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert saved_tokenizer.chat_template == tokenizer.chat_template
    assert saved_tokenizer("hi").input_ids[0] == saved_tokenizer.bos_token_id


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_loads_and_runs(name):
    path = resolve_model_path(f"xtune-tiny/{name}")
    tokenizer = load_tokenizer(path)
    model = load_model(path)
    inputs = tokenizer("What is the opposite of hot?", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert model_architecture(path) == TINY_MODELS[name].architecture
    assert logits.shape == (1, inputs.input_ids.shape[1], model.config.vocab_size)
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tokenizer)
    assert torch.isfinite(logits).all()


def test_tiny_models_have_the_default_size():
    config = load_model(tiny_model_path("llama")).config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (256, 704, 4)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 2, 32)
    assert (config.max_position_embeddings, config.rms_norm_eps, config.tie_word_embeddings) == (2048, 1e-6, False)


def test_internlm2_chat_is_saved_in_internlm2_layout():
    path = tiny_model_path("internlm2-chat")
    config = json.loads((path / "config.json").read_text())
    names = load_file(path / "model.safetensors").keys()
    assert config["model_type"] == "internlm2" and "auto_map" in config
    assert {"model.tok_embeddings.weight", "model.layers.0.attention.wqkv.weight", "output.weight"} <= names


def test_qwen2_has_attention_biases():
    weights = load_file(tiny_model_path("qwen2") / "model.safetensors")
    for projection in ("q_proj", "k_proj", "v_proj"):
        assert weights[f"model.layers.0.self_attn.{projection}.bias"].abs().sum() > 0


def test_generation_config_stops_at_im_end():
    path = tiny_model_path("internlm2-chat")
    im_end = load_tokenizer(path).convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, im_end]
    assert generation["pad_token_id"] == 2


@pytest.mark.parametrize("name", TINY_MODELS)
def test_builds_are_deterministic(name, tmp_path):
    first = build_tiny_model(name, tmp_path / "first")
    second = build_tiny_model(name, tmp_path / "second")
    for file in sorted(first.glob("*.safetensors")):
        a, b = load_file(file), load_file(second / file.name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()


def test_built_folder_is_complete_and_leaves_nothing_behind(tmp_path):
    dest = build_tiny_model("llama", tmp_path / "llama")
    assert sorted(file.name for file in dest.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert [folder.name for folder in tmp_path.iterdir()] == ["llama"]


def test_a_finished_folder_wins_the_race(tmp_path):
    dest = build_tiny_model("llama", tmp_path / "llama")
    winner = (dest / "config.json").stat().st_ino
    assert build_tiny_model("llama", dest) == dest
    assert (dest / "config.json").stat().st_ino == winner
    assert [folder.name for folder in tmp_path.iterdir()] == ["llama"]


def test_concurrent_builds_agree_on_one_folder(tmp_path):
    with ThreadPoolExecutor(max_workers=2) as pool:
        built = list(pool.map(lambda _: build_tiny_model("qwen2", tmp_path / "qwen2"), range(2)))
    assert built == [tmp_path / "qwen2"] * 2
    assert [folder.name for folder in tmp_path.iterdir()] == ["qwen2"]
    assert (tmp_path / "qwen2" / "model.safetensors").is_file()


def test_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "notes.txt").write_text("mine")
    with pytest.raises(XtuneError, match="not a model folder"):
        build_tiny_model("llama", tmp_path / "llama")
    assert (tmp_path / "llama" / "notes.txt").read_text() == "mine"


def test_tiny_model_path_lives_in_xtune_home(xtune_home):
    assert tiny_model_path("qwen2") == xtune_home / "tiny" / f"v{TINY_VERSION}" / "qwen2"


@pytest.mark.parametrize("resolve", [tiny_model_path, lambda name: resolve_model_path(f"xtune-tiny/{name}")])
def test_unknown_tiny_model_lists_the_valid_names(resolve):
    with pytest.raises(ModelNotFoundError, match="internlm2-chat, llama, qwen2"):
        resolve("gpt5")
