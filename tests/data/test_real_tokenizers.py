"""Training data with real tokenizers (../shared/tokenizers): the ids equal the family's official chat template's,
a server's generation prompt is a prefix of them, and the labels cover the replies and their end markers.

Each named template is paired with the tokenizer of its family; Phi-3's is Llama 2's with Phi-3's added tokens, and
Mistral v0.3's is v0.1's SentencePiece model (../shared has v0.1's only) with v0.3's control tokens added."""

import copy
import json
import shutil
from dataclasses import replace
from itertools import groupby

import pytest
from transformers import AddedToken

from conftest import SHARED_TOKENIZERS, system_in_last_user_turn
from xtune.data.check_template import PROBES, check_template, first_disagreement
from xtune.data.encode import IGNORE_INDEX, encode
from xtune.data.formats import Turn
from xtune.data.templates import get_template, official_chat_template
from xtune.errors import CheckpointError
from xtune.models.load import load_tokenizer

PAIRS = {
    "internlm2_chat": "internlm2", "qwen_chat": "qwen2", "llama3_chat": "llama3", "llama2_chat": "llama2",
    "mistral": "mistral", "mixtral": "mistral", "zephyr": "mistral", "phi3_chat": "phi3", "qwen3": "qwen3",
    "phi3_5": "phi3", "mistral_v0_3": "mistral_v0_3",
}  # fmt: skip
"""Named template -> the family's tokenizer (Zephyr and Mixtral use Mistral's; Qwen3's is Qwen2.5's with its added
tokens; Phi-3.5-mini's is Phi-3-mini's; Mistral v0.3's is v0.1's with its control tokens)."""

NOT_A_PREFIX = {("internlm2_chat", "reply starts with a newline"), ("qwen_chat", "reply starts with a newline")}
"""Where the official template itself breaks train = serve: the header's "\\n" and a reply's leading "\\n" are one
token ("\\n\\n") in the conversation, while the generation prompt ends with "\\n" alone (docs/data.md)."""

QWEN_DEFAULT_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"

PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]  # fmt: skip
"""Phi-3-mini's added tokens, ids 32000-32010 after Llama 2's vocabulary; all but <|endoftext|> strip what follows."""
QWEN3_ADDED = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
"""Qwen3's added tokens after Qwen2.5's, ids 151665-151668 (not special)."""
MISTRAL_V0_3_CONTROL = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                        "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]  # fmt: skip
"""Mistral v0.3's control tokens (ids 3-9 of its 32,768, before v0.1's pieces; here after them), special, none
stripping; in v0.1 "[INST]" is text. Added to v0.1's tokenizer.model as transformers converts it (v0.1's
tokenizer.json writes an extra "▁" after a special token), they tokenize as v0.3's own model file does
(mistral-common's mistral_instruct_tokenizer_240323.model.v3, compared once on PROBES and an agent conversation,
ids mapped by piece)."""


@pytest.fixture(scope="module")
def family(real_tokenizer, tmp_path_factory):
    """`family("qwen_chat")`: the family's tokenizer, with the template's official jinja as its chat_template."""
    made = {}

    def get(name: str):
        if name not in made:
            if PAIRS[name] == "phi3":
                tokenizer = copy.deepcopy(real_tokenizer("llama2"))
                added = [AddedToken(t, rstrip=t != "<|endoftext|>", special=True, normalized=False) for t in PHI3_ADDED]
                tokenizer.add_tokens(added, special_tokens=True)
                assert tokenizer.convert_tokens_to_ids("<|user|>") == 32010
            elif PAIRS[name] == "qwen3":
                tokenizer = copy.deepcopy(real_tokenizer("qwen2"))
                tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_ADDED])
            elif PAIRS[name] == "mistral_v0_3":
                real_tokenizer("mistral")  # skips without it
                folder = tmp_path_factory.mktemp("mistral_v0_3")
                for file in ("config.json", "tokenizer_config.json", "tokenizer.model"):
                    shutil.copy(SHARED_TOKENIZERS / "mistral" / file, folder)
                tokenizer = load_tokenizer(folder)
                added = [AddedToken(t, special=True, normalized=False) for t in MISTRAL_V0_3_CONTROL]
                tokenizer.add_tokens(added, special_tokens=True)
                assert tokenizer.convert_tokens_to_ids("[/TOOL_RESULTS]") == 32006
            else:
                tokenizer = copy.deepcopy(real_tokenizer(PAIRS[name]))
            tokenizer.chat_template = official_chat_template(name)
            made[name] = tokenizer
        return made[name]

    return get


def messages(conversation):
    return [{"role": turn.role, "content": turn.content} for turn in conversation.turns]


def official_ids(tokenizer, conversation, add_generation_prompt=False):
    return tokenizer.apply_chat_template(
        messages(conversation), tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )


def refuses(tokenizer, conversation) -> bool:
    try:
        official_ids(tokenizer, conversation)
    except Exception:  # mistral's and mixtral's jinja have no system role
        return True
    return False


CASES = [(name, probe) for name in PAIRS for probe in PROBES]


@pytest.mark.parametrize("name, probe", CASES)
def test_training_ids_equal_the_official_templates(family, name, probe):
    tokenizer, conversation = family(name), PROBES[probe]
    if refuses(tokenizer, conversation):
        pytest.skip(f"the official {name} template has no system role")
    # mistral_v0_3: its jinja drops the system text of a whole conversation; xtune writes it into the last user turn
    given = system_in_last_user_turn(conversation) if name == "mistral_v0_3" else conversation
    expected = official_ids(tokenizer, given)
    if name == "qwen_chat" and conversation.system is None:  # xtune's choice: no default system prompt (docs/data.md)
        default = tokenizer(QWEN_DEFAULT_SYSTEM, add_special_tokens=False)["input_ids"]
        assert expected[: len(default)] == default
        expected = expected[len(default) :]
    assert encode(conversation, get_template(name), tokenizer).input_ids == expected


@pytest.mark.parametrize("name, probe", CASES)
def test_each_generation_prompt_is_a_prefix_of_the_training_ids(family, name, probe):
    tokenizer, conversation = family(name), PROBES[probe]
    if name == "qwen_chat" and conversation.system is None:
        conversation = replace(conversation, turns=(Turn("system", "You are Qwen."), *conversation.turns))
    if refuses(tokenizer, conversation):
        pytest.skip(f"the official {name} template has no system role")
    ids = encode(conversation, get_template(name), tokenizer).input_ids
    assistant_turns = [index for index, turn in enumerate(conversation.turns) if turn.role == "assistant"]
    prefixes = [ids[: len(p)] == p for p in (
        official_ids(tokenizer, replace(conversation, turns=conversation.turns[:index]), True) for index in assistant_turns
    )]  # fmt: skip
    assert all(prefixes) == ((name, probe) not in NOT_A_PREFIX), prefixes


def trained_runs(tokenizer, encoded):
    runs, run = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return [tokenizer.decode(r) for r in [*runs, *([run] if run else [])]]


END_MARKERS = {
    "internlm2_chat": "<|im_end|>", "qwen_chat": "<|im_end|>", "llama3_chat": "<|eot_id|>", "llama2_chat": " </s>",
    "mistral": "</s>", "mixtral": "</s>", "zephyr": "</s>", "phi3_chat": "<|end|>",
    "phi3_5": "<|end|>", "mistral_v0_3": "</s>",
}  # fmt: skip


@pytest.mark.parametrize("name", [name for name in PAIRS if name != "qwen3"])  # qwen3: tests/data/test_thinking.py
def test_labels_cover_each_reply_and_its_end_marker(family, name):
    tokenizer = family(name)
    conversation = PROBES["three rounds"]
    encoded = encode(conversation, get_template(name), tokenizer)
    replies = [turn.content for turn in conversation.turns if turn.role == "assistant"]
    expected = [reply + END_MARKERS[name] for reply in replies]
    if name in ("phi3_chat", "phi3_5"):  # Phi-3's official format ends a conversation with EOS after the last <|end|>
        expected[-1] += "</s>"  # the "\n" after <|end|> is stripped into it
    assert [run.strip() for run in trained_runs(tokenizer, encoded)] == [text.strip() for text in expected]
    bos = tokenizer.bos_token_id
    assert bos is None or encoded.input_ids[:2].count(bos) <= 1  # no double BOS
    last_only = encode(conversation, get_template(name), tokenizer, train_on_last_turn_only=True)
    assert last_only.input_ids == encoded.input_ids
    assert trained_runs(tokenizer, last_only) == trained_runs(tokenizer, encoded)[-1:]
    cut = encode(conversation, get_template(name), tokenizer, max_length=len(encoded.input_ids) - 3)
    assert (cut.input_ids, cut.labels) == (encoded.input_ids[:-3], encoded.labels[:-3])


def test_a_reply_starting_with_a_newline_is_trained_from_the_merged_token(family):
    tokenizer = family("internlm2_chat")
    encoded = encode(PROBES["reply starts with a newline"], get_template("internlm2_chat"), tokenizer)
    (run,) = trained_runs(tokenizer, encoded)
    assert run == "\n\nRoses are red\nViolets are blue<|im_end|>"  # "\n\n" is one token; the model writes it


def test_phi3s_stripping_markers_are_not_trained(family):
    tokenizer = family("phi3_chat")
    encoded = encode(PROBES["spaces and newlines"], get_template("phi3_chat"), tokenizer)
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    position = encoded.input_ids.index(assistant)
    assert encoded.labels[position] == IGNORE_INDEX and encoded.labels[position + 1] != IGNORE_INDEX


MISTRAL_AGENT_RECORD = {"messages": [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "abc123def", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "A1b2C3d4E", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "tool_call_id": "abc123def", "content": '{"celsius": 22}'},
    {"role": "tool", "tool_call_id": "A1b2C3d4E", "content": "18 °C"},
    {"role": "assistant", "content": "22 °C in Paris, 18 in Rome."},
], "tools": [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}}]}  # fmt: skip


@pytest.mark.parametrize("system", [True, False])
def test_mistral_v0_3_agent_ids_equal_its_jinjas_and_train_the_calls_and_the_answer(family, system):
    """v0.3's control tokens around the tools, calls and results: the ids of the whole conversation are the jinja's,
    the jinja's prompt for each step is a prefix of them (without a system text: after tool results the jinja
    drops it), and the calls, the answer and their </s> are trained, [TOOL_CALLS] with them."""
    from conftest import openai_message
    from xtune.data.formats import openai_to_standard

    tokenizer = family("mistral_v0_3")
    messages = MISTRAL_AGENT_RECORD["messages"]
    record = {**MISTRAL_AGENT_RECORD, "messages": messages if system else messages[1:]}
    conversation = openai_to_standard(record)

    def jinja_ids(conversation):
        messages = [openai_message(turn) for turn in conversation.turns]
        return tokenizer.apply_chat_template(messages, tools=record["tools"], tokenize=True, return_dict=False)

    encoded = encode(conversation, get_template("mistral_v0_3"), tokenizer)
    assert encoded.input_ids == jinja_ids(system_in_last_user_turn(conversation))
    control = [tokenizer.convert_tokens_to_ids(token) for token in MISTRAL_V0_3_CONTROL]
    assert [i for i in encoded.input_ids if i in control] == [control[i] for i in (3, 4, 0, 1, 2, 5, 6, 5, 6)]
    trained = [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}, '
        '{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "A1b2C3d4E"}]</s>',
        " 22 °C in Paris, 18 in Rome.</s>",
    ]  # compared as ids: decoding writes a space after a control token that the text does not have
    runs = groupby(zip(encoded.input_ids, encoded.labels), key=lambda pair: pair[1] != IGNORE_INDEX)
    assert [[token for token, _ in run] for is_trained, run in runs if is_trained] == [
        tokenizer(text, add_special_tokens=False)["input_ids"] for text in trained
    ]
    steps = [index for index, turn in enumerate(conversation.turns) if turn.role == "assistant"]
    prompts = [jinja_ids(replace(conversation, turns=conversation.turns[:index])) for index in steps]
    assert [encoded.input_ids[: len(prompt)] == prompt for prompt in prompts] == [True, not system]


def test_check_template_finds_mistral_v0_3_apart_from_its_jinja_on_the_system_probes_only(family):
    """What `xtune train` warns about with a v0.3 tokenizer: its jinja drops the system text of a conversation that
    ends with an answer. Every prompt of the jinja is a prefix of the training ids all the same."""
    results = check_template(family("mistral_v0_3"), get_template("mistral_v0_3"))
    assert [r.probe for r in results if not r.identical] == [name for name, c in PROBES.items() if c.system is not None]
    assert all(r.prefix_holds for r in results)


# check-template and the warning at train start ------------------------------------------------------------------

def test_check_template_finds_the_first_difference_and_the_prefix(family, real_tokenizer):
    results = {r.probe: r for r in check_template(family("internlm2_chat"), get_template("internlm2_chat"))}
    assert all(r.identical for r in results.values())
    assert [p for p, r in results.items() if not r.prefix_holds] == ["reply starts with a newline"]
    qwen = real_tokenizer("qwen2")
    one = {r.probe: r for r in check_template(qwen, get_template("qwen_chat"))}["one turn"]
    assert (one.identical, one.position, one.ours, one.theirs) == (False, 1, "'user' '\\n' 'What'", "'system' '\\n' 'You'")
    assert first_disagreement(family("mistral"), get_template("mistral")) is None  # refused probes are skipped
    assert first_disagreement(real_tokenizer("llama2"), get_template("vicuna")).position == 1


def test_check_template_command(tmp_path):
    from typer.testing import CliRunner

    from xtune.cli import app

    runner = CliRunner()
    same = runner.invoke(app, ["check-template", str(SHARED_TOKENIZERS / "llama3"), "--prompt-template", "llama3_chat"])
    assert same.exit_code == 0, same.output
    assert "one turn: identical; generation prompts are prefixes" in same.output
    other = runner.invoke(app, ["check-template", str(SHARED_TOKENIZERS / "llama3"), "--prompt-template", "qwen_chat"])
    assert other.exit_code == 1 and "one turn: differs at token 0: qwen_chat writes '<' '|' 'im'" in other.output


# Loading real folders -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["internlm2", "llama2", "llama3", "qwen2", "mistral"])
def test_each_family_folder_loads_without_remote_code(name):
    tokenizer = load_tokenizer(SHARED_TOKENIZERS / name)
    assert tokenizer.is_fast and tokenizer.chat_template
    assert tokenizer.decode(tokenizer("Hello world", add_special_tokens=False)["input_ids"]) == "Hello world"


def test_internlm2_chat_folder_as_shipped_loads_without_remote_code(tmp_path):
    """tokenizer.model only, tokenizer_class InternLM2Tokenizer and auto_map to remote code, as the hub ships it."""
    folder = tmp_path / "internlm2-chat-1_8b"
    shutil.copytree(SHARED_TOKENIZERS / "internlm2", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "InternLM2Tokenizer" and "auto_map" in config
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": 92544,
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
    }))  # fmt: skip
    tokenizer = load_tokenizer(folder)
    assert not (folder / "tokenizer.json").exists()
    ids = tokenizer("<|im_start|>user\n你好<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 92543 and ids[-1] == 92542 and tokenizer.decode(ids) == "<|im_start|>user\n你好<|im_end|>"


def test_a_sentencepiece_model_alone_tokenizes_as_its_tokenizer_json(tmp_path):
    folder = tmp_path / "mistral-model-only"
    shutil.copytree(SHARED_TOKENIZERS / "mistral", folder)
    (folder / "tokenizer.json").unlink()
    alone, both = load_tokenizer(folder), load_tokenizer(SHARED_TOKENIZERS / "mistral")
    # neither runs of spaces (tokenizers/README.md) nor text right after a special token: after </s>, tokenizer.json
    # (Mistral's legacy SentencePiece behaviour) and the model file as transformers converts it tokenize apart
    text = "[INST] What is 2+2? [/INST] 4 你好 😀 def f(x):\n return x"
    assert alone(text)["input_ids"] == both(text)["input_ids"]


def test_a_tokenizer_that_needs_sentencepiece_says_how_to_install_it(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    def fails(*args, **kwargs):
        raise ValueError("`tiktoken` is required to read a `tiktoken` file. Install it with `pip install tiktoken`.")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fails)
    monkeypatch.setattr("xtune.models.load._importable", lambda module: module != "sentencepiece")
    shutil.copytree(SHARED_TOKENIZERS / "internlm2", tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"tokenizer.model is a SentencePiece model, .*pip install sentencepiece"):
        load_tokenizer(tmp_path / "m")


@pytest.mark.parametrize("name", ["vicuna", "default", "gemma", "chatglm3", "deepseek_v2", *PAIRS])
def test_xtunes_own_prompts_are_prefixes_of_its_training_ids(tokenizer, family, name):
    """What chat and serve feed (no official template to compare with for Vicuna and XTuner's default): Vicuna
    with its Llama 2 tokenizer, the others with the tiny one and, where there is one, the family's."""
    from xtune.infer.generate import prompt_ids

    tokenizers = [tokenizer, family(name) if name in PAIRS else None]
    if name == "vicuna":
        tokenizers.append(family("llama2_chat"))
    for each in filter(None, tokenizers):
        for probe, conversation in PROBES.items():
            ids = encode(conversation, get_template(name), each).input_ids
            turns = [index for index, turn in enumerate(conversation.turns) if turn.role == "assistant"]
            prompts = [prompt_ids(replace(conversation, turns=conversation.turns[:i]), get_template(name), each) for i in turns]
            holds = all(ids[: len(p)] == p for p in prompts)
            assert holds or (name, probe) in NOT_A_PREFIX, (name, probe)
