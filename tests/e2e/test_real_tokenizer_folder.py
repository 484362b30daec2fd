"""A model folder laid out as InternLM2-Chat-1.8B ships (InternLM2 weights, `tokenizer.model` only, remote-code
`auto_map`s), with the real InternLM2 tokenizer and a tiny random-weight model of its 92,544-token vocabulary:
it trains without remote code, and what it saves prompts and stops as it was trained."""

import io
import json
import shutil

import pytest
import torch
from rich.console import Console
from transformers import GenerationConfig

from conftest import SHARED_TOKENIZERS
from xtune.config.load import load_config
from xtune.engine.train import train
from xtune.infer.generate import prompt_ids
from xtune.models.internlm2 import save_internlm2
from xtune.models.load import load_tokenizer
from xtune.testing.tiny import TinySpec, build_model


@pytest.fixture(scope="module")
def shipped_folder(tmp_path_factory):
    if not (SHARED_TOKENIZERS / "internlm2").is_dir():
        pytest.skip(f"no real tokenizer at {SHARED_TOKENIZERS / 'internlm2'}")
    folder = tmp_path_factory.mktemp("internlm2-chat-1_8b")
    spec = TinySpec("internlm2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    save_internlm2(build_model(spec, vocab_size=92544), folder)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SHARED_TOKENIZERS / "internlm2" / name, folder / name)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "internlm2" and "auto_map" in config
    return folder


def test_the_shipped_layout_trains_and_saves_what_it_was_trained_with(shipped_folder, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"conversation": [{"input": f"Say {w}", "output": f"{w} {w}"}]} for w in
                                ["hello", "你好", "emoji 😀", "  spaced  "]]))  # fmt: skip
    overrides = [f"llm_name_or_path={str(shipped_folder)!r}", f"data_path={str(data)!r}", f"work_dir={str(tmp_path)!r}",
                 "max_steps=2", "batch_size=2", "evaluation_inputs=[]", "dtype='fp32'"]  # fmt: skip
    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", overrides)
    output = io.StringIO()
    result = train(config, Console(file=output, width=200))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert "warning" not in output.getvalue()  # internlm2_chat writes the ids of InternLM2-Chat's own template
    tokenizer = load_tokenizer(result.checkpoint)
    from xtune.models.publish import parts_as_text

    # the official one, as trained, behind the preamble that takes list-of-parts content
    assert tokenizer.chat_template == parts_as_text() + load_tokenizer(shipped_folder).chat_template
    assert 92542 in GenerationConfig.from_pretrained(result.checkpoint).eos_token_id  # <|im_end|>
    from xtune.data.formats import Conversation, Turn
    from xtune.data.templates import get_template

    conversation = Conversation((Turn("system", "Be brief."), Turn("user", "Say 你好 😀"),))
    messages = [{"role": turn.role, "content": turn.content} for turn in conversation.turns]
    official = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompt_ids(conversation, get_template("internlm2_chat"), tokenizer) == official  # chat and serve prompt so
