"""Reasoning data: `reasoning_content` and `<think>` blocks, written as Qwen3's official template writes them (its
jinja carried in xtune), token-exact with Qwen3's tokenizer (Qwen2.5's plus its <tool_response> and <think> added
tokens), and trained as `enable_thinking` and `train_on_thinking` say."""

import copy
import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AddedToken

from conftest import openai_message
from xtune.data.encode import IGNORE_INDEX, encode
from xtune.data.formats import FORMATS, Conversation, RecordError, Turn
from xtune.data.templates import TokenizerTemplate, get_template, official_chat_template, render

QWEN3_ADDED = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
"""Qwen3's added tokens after Qwen2.5's vocabulary, ids 151665-151668; not special (they decode as text)."""


@pytest.fixture(scope="module")
def qwen3(real_tokenizer):
    tokenizer = copy.deepcopy(real_tokenizer("qwen2"))
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_ADDED])
    assert tokenizer.convert_tokens_to_ids("</think>") == 151668
    tokenizer.chat_template = official_chat_template("qwen3")
    return tokenizer


def official(tokenizer, conversation, add_generation_prompt=False, tokenize=False, **options):
    messages = [openai_message(turn) for turn in conversation.turns]
    return tokenizer.apply_chat_template(
        messages, tokenize=tokenize, add_generation_prompt=add_generation_prompt, return_dict=False, **options
    )


def text_of(conversation, template, tokenizer=None):
    return "".join(text for text, _ in render(conversation, template, tokenizer))


def trained_text(tokenizer, encoded):
    runs, run = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs + ([tokenizer.decode(run)] if run else [])


QWEN3 = get_template("qwen3")
text = st.text(st.sampled_from("ab \n<>/思"), min_size=1, max_size=8).filter(lambda t: t.strip() and "think" not in t)


@st.composite
def reasoning_conversations(draw):
    turns = [Turn("system", draw(text))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        turns.append(Turn("user", draw(text)))
        answer, way = draw(text), draw(st.sampled_from(["apart", "inline", "inline without opening", "none"]))
        reasoning = draw(st.text(st.sampled_from("xy \n"), max_size=6))
        if way == "apart":
            turns.append(Turn("assistant", answer, True, reasoning=reasoning))
        elif way == "inline":
            turns.append(Turn("assistant", f"<think>{reasoning}</think>{answer}", True))
        elif way == "inline without opening":  # DeepSeek-R1's answers, whose prompt opened the block
            turns.append(Turn("assistant", f"{reasoning}</think>\n\n{answer}", True))
        else:
            turns.append(Turn("assistant", answer, True))
    if draw(st.booleans()):
        turns.append(Turn("user", draw(text)))
    return Conversation(tuple(turns), enable_thinking=draw(st.sampled_from([None, True, False])))


@settings(max_examples=150, deadline=None)
@given(reasoning_conversations())
def test_rendering_equals_qwen3s_official_jinja(qwen3, conversation):
    prompting = conversation.turns[-1].role == "user"
    switch = {} if conversation.enable_thinking is None else {"enable_thinking": conversation.enable_thinking}
    assert text_of(conversation, QWEN3, qwen3) == official(qwen3, conversation, prompting, **switch)
    ids = encode(conversation, QWEN3, qwen3).input_ids
    assert ids == official(qwen3, conversation, prompting, tokenize=True, **switch)


def test_only_the_answers_to_the_last_question_keep_their_thinking_and_only_they_are_trained(qwen3):
    conversation = Conversation((
        Turn("user", "2+2?"), Turn("assistant", "4", True, reasoning="Two and two."),
        Turn("user", "3+3?"), Turn("assistant", "<think>\nThree and three.\n</think>\n\n6", True),
    ))  # fmt: skip
    encoded = encode(conversation, QWEN3, qwen3)
    assert trained_text(qwen3, encoded) == ["<think>\nThree and three.\n</think>\n\n6<|im_end|>"]
    assert "Two and two" not in qwen3.decode(encoded.input_ids)  # the official template drops it
    assert qwen3.decode(encoded.input_ids).count("<|im_start|>assistant\n4<|im_end|>") == 1


def test_an_answer_without_reasoning_trains_the_empty_block_qwen3_writes(qwen3):
    conversation = Conversation((Turn("user", "Hi"), Turn("assistant", "Hello", True)))
    assert trained_text(qwen3, encode(conversation, QWEN3, qwen3)) == ["<think>\n\n</think>\n\nHello<|im_end|>"]
    off = encode(replace(conversation, enable_thinking=False), QWEN3, qwen3)
    assert off.input_ids == encode(conversation, QWEN3, qwen3).input_ids  # the same text ...
    assert trained_text(qwen3, off) == ["Hello<|im_end|>"]  # ... but the empty block is the prompt's, as served


def test_enable_thinking_off_ends_the_generation_prompt_with_the_empty_block(qwen3):
    question = Conversation((Turn("user", "Hi"),))
    assert text_of(question, QWEN3).endswith("<|im_start|>assistant\n")
    off = replace(QWEN3, enable_thinking=False)
    assert text_of(question, off).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert text_of(question, off, qwen3) == official(qwen3, question, True, enable_thinking=False)
    assert text_of(replace(question, enable_thinking=True), off).endswith("assistant\n")  # the record decides


def test_enable_thinking_off_trains_no_reasoning_and_writes_it_as_the_jinja_does(qwen3):
    conversation = Conversation((Turn("user", "Hi"), Turn("assistant", "Hello", True, reasoning="greet back")))
    encoded = encode(conversation, replace(QWEN3, enable_thinking=False), qwen3)
    assert encoded.input_ids == official(qwen3, conversation, tokenize=True, enable_thinking=False)
    assert trained_text(qwen3, encoded) == ["Hello<|im_end|>"]


def test_train_on_thinking_off_writes_the_block_untrained(qwen3):
    conversation = Conversation((Turn("user", "2+2?"), Turn("assistant", "4", True, reasoning="Two and two.")))
    encoded = encode(conversation, replace(QWEN3, train_on_thinking=False), qwen3)
    assert encoded.input_ids == encode(conversation, QWEN3, qwen3).input_ids
    assert trained_text(qwen3, encoded) == ["4<|im_end|>"]


@pytest.mark.parametrize("train_on_thinking", [True, False])
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_hf_with_qwen3s_jinja_trains_what_the_named_template_trains(qwen3, train_on_thinking, enable_thinking):
    conversation = Conversation((
        Turn("system", "Be brief."), Turn("user", "2+2?"), Turn("assistant", "4", True, reasoning="Two and two."),
        Turn("user", "3+3?"), Turn("assistant", "<think>Three and three.</think>6", True),
    ))  # fmt: skip
    options = {"train_on_thinking": train_on_thinking, "enable_thinking": enable_thinking}
    named = encode(conversation, replace(QWEN3, **options), qwen3)
    hf = encode(conversation, TokenizerTemplate(**options), qwen3)
    assert (hf.input_ids, hf.labels) == (named.input_ids, named.labels)


def test_a_template_without_thinking_writes_reasoning_given_apart_as_a_think_block():
    conversation = Conversation((Turn("user", "2+2?"), Turn("assistant", "4", True, reasoning="\nTwo and two.\n")))
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n<think>\nTwo and two.\n</think>\n\n4<|eot_id|>" in text_of(
        conversation, get_template("llama3_chat")
    )
    inline = Conversation((Turn("user", "2+2?"), Turn("assistant", "<think>x</think> 4", True)))
    assert "<|end_header_id|>\n\n<think>x</think> 4<|eot_id|>" in text_of(inline, get_template("llama3_chat"))


WEATHER = json.dumps({"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})  # fmt: skip


@pytest.mark.parametrize("system", [True, False])
def test_qwen3_tool_calls_with_reasoning_between_them_render_as_its_jinja(qwen3, system):
    from xtune.data.formats import ToolCall

    turns = (
        *([Turn("system", "Be brief.")] if system else []),
        Turn("user", "Weather in Paris and Rome?"),
        Turn("assistant", "", True, (ToolCall("get_weather", '{"city": "Paris"}'),), reasoning="Paris first."),
        Turn("tool", '{"celsius": 22}', name="get_weather"),
        Turn("assistant", "Now Rome.", True, (ToolCall("get_weather", '{"city": "Rome"}'),)),
        Turn("tool", '{"celsius": 25}', name="get_weather"),
        Turn("assistant", "22 °C and 25 °C.", True, reasoning="Both known."),
    )
    conversation = Conversation(turns, tools=(WEATHER,))
    messages = [openai_message(turn) for turn in turns]
    expected = qwen3.apply_chat_template(messages, tools=[json.loads(WEATHER)], tokenize=False)
    assert text_of(conversation, QWEN3, qwen3) == expected
    assert "<think>\nParis first.\n</think>\n\n<tool_call>" in expected  # answers after the question keep theirs
    trained = trained_text(qwen3, encode(conversation, QWEN3, qwen3))
    # the call without reasoning is written without a block where the model, thinking, would have opened one
    assert [run.split("\n")[1] for run in trained] == ["Paris first.", "Both known."]


# The formats -----------------------------------------------------------------------------------------------------

def test_every_chat_format_reads_reasoning_given_apart_and_the_records_switch():
    records = {
        "openai": {"messages": [{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "a", "reasoning_content": "r"}],
                   "enable_thinking": True},
        "sharegpt": {"conversations": [{"from": "human", "value": "q"},
                                       {"from": "gpt", "value": "a", "reasoning": "r"}],
                     "enable_thinking": True},
        "conversation": {"conversation": [{"input": "q", "output": "a", "reasoning_content": "r"}],
                         "enable_thinking": True},
        "alpaca": {"instruction": "q", "output": "a", "reasoning_content": "r", "enable_thinking": True},
    }  # fmt: skip
    for name, record in records.items():
        conversation = FORMATS[name](record)
        assert (conversation.turns[-1].content, conversation.turns[-1].reasoning) == ("a", "r"), name
        assert conversation.enable_thinking is True, name
        inline = json.loads(json.dumps(record).replace('"a"', '"<think>r</think>a"').replace('"r"', "null"))
        assert FORMATS[name](inline).turns[-1].reasoning is None  # read by the template, as the jinja does
        assert text_of(FORMATS[name](inline), QWEN3) == text_of(conversation, QWEN3), name


def test_bad_reasoning_fields_name_the_field():
    answer = {"role": "assistant", "content": "a", "reasoning": "r", "reasoning_content": "r"}
    both = {"messages": [{"role": "user", "content": "q"}, answer]}
    with pytest.raises(RecordError, match=r"'messages\[1\]' has both 'reasoning_content' and 'reasoning'"):
        FORMATS["openai"](both)
    with pytest.raises(RecordError, match=r"field 'messages\[1\]\.reasoning_content' must be a string"):
        FORMATS["openai"]({"messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "a", "reasoning_content": 3}]})  # fmt: skip
    with pytest.raises(RecordError, match="field 'enable_thinking' must be true or false, got 'no'"):
        FORMATS["alpaca"]({"instruction": "q", "output": "a", "enable_thinking": "no"})


# The config's switches, as training and log-dataset read them -------------------------------------------------

def test_the_configs_switches_reach_the_samples_and_log_dataset_shows_the_block(tmp_path, tokenizer):
    from xtune.config.schema import Config
    from xtune.data.dataset import cache_key, config_template, source_specs
    from xtune.data.inspect import first_samples

    records = [{"messages": [{"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "4", "reasoning_content": "Two and two."}]},
               {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                "enable_thinking": False}]  # fmt: skip
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")

    def trained(**values):
        config = Config(llm_name_or_path="xtune-tiny/internlm2-chat", data_path=str(tmp_path / "r.jsonl"),
                        prompt_template="qwen3", **values)  # fmt: skip
        return config, [[run for run, on in entry.runs if on] for entry in first_samples(config, tokenizer=tokenizer)]

    default, runs = trained()
    assert runs == [["<think>\nTwo and two.\n</think>\n\n4<|im_end|>"], ["Hello<|im_end|>"]]  # the record's own off
    off, runs = trained(enable_thinking=False)
    assert runs == [["4<|im_end|>"], ["Hello<|im_end|>"]]
    untrained, runs = trained(train_on_thinking=False)
    assert runs == [["4<|im_end|>"], ["Hello<|im_end|>"]]
    assert config_template(off).enable_thinking is False and config_template(untrained).train_on_thinking is False
    split, runs = trained(split_rounds=True)
    keys = {cache_key(c, source_specs(c), tokenizer) for c in (default, off, untrained, split)}
    assert len(keys) == 4  # each setting has its own cached samples


# DeepSeek-R1: the generation prompt opens the block ------------------------------------------------------------

R1 = get_template("deepseek_r1")


@settings(max_examples=100, deadline=None)
@given(reasoning_conversations())
def test_deepseek_r1_trains_what_follows_its_official_generation_prompt(tokenizer, conversation):
    """R1's jinja drops the reasoning of every answer, the last too, and its prompt ends "<｜Assistant｜><think>\\n":
    the training text is that prompt (the history as the jinja writes it) and then what the model writes."""
    turns = conversation.turns[:-1] if conversation.turns[-1].role != "assistant" else conversation.turns
    conversation = Conversation(turns)  # thinking on: the block is trained
    history = replace(conversation, turns=conversation.turns[:-1])
    prompt = tokenizer.apply_chat_template(
        [{"role": t.role, "content": t.content} for t in history.turns], chat_template=official_chat_template(
            "deepseek_r1"), tokenize=False, add_generation_prompt=True,
    ).replace("<｜end▁of▁sentence｜>", tokenizer.eos_token).replace("<｜begin▁of▁sentence｜>", tokenizer.bos_token)
    segments = render(conversation, R1, tokenizer)
    text = "".join(piece for piece, _ in segments)
    assert text.startswith(prompt) and prompt.endswith("<｜Assistant｜><think>\n")
    trained = "".join(piece for piece, on in segments if on)
    assert text == prompt + trained  # every trained token follows the prompt; nothing earlier is trained
    last = conversation.turns[-1]
    reasoning = last.reasoning if last.reasoning is not None else (
        last.content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n") if "</think>" in last.content
        else "")  # fmt: skip
    answer = last.content.split("</think>")[-1] if last.reasoning is None else last.content
    assert trained == f"{reasoning.strip(chr(10))}\n</think>\n\n{answer.lstrip(chr(10))}{tokenizer.eos_token}"
    assert text_of(history, R1, tokenizer) == prompt  # chat and serve prompt as the jinja does


def test_gemma_writes_gemma_2s_official_format_where_it_has_no_system_turn(tokenizer):
    conversation = Conversation((Turn("user", " Hi "), Turn("assistant", "Hello", True), Turn("user", "Bye")))
    official_text = tokenizer.apply_chat_template(
        [{"role": t.role, "content": t.content} for t in conversation.turns],
        chat_template=official_chat_template("gemma2"), tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    assert text_of(conversation, get_template("gemma"), tokenizer) == official_text


def test_split_rounds_trains_every_answer_as_the_last_one(qwen3, tmp_path):
    from xtune.data.sources import SourceSpec, load_sources

    record = {"messages": [{"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4", "reasoning_content": "Two and two."},
                           {"role": "user", "content": "3+3?"},
                           {"role": "assistant", "content": "6", "reasoning_content": "Three and three."}]}  # fmt: skip
    (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n")
    whole = load_sources([SourceSpec(str(tmp_path / "r.jsonl"))])
    split = load_sources([SourceSpec(str(tmp_path / "r.jsonl"))], split_rounds=True)
    assert [location.rsplit("/", 1)[1] for location, _ in split.samples] == ["r.jsonl:1 round 1", "r.jsonl:1 round 2"]
    runs = [trained_text(qwen3, encode(c, QWEN3, qwen3)) for c in split.conversations]
    assert runs == [["<think>\nTwo and two.\n</think>\n\n4<|im_end|>"], ["<think>\nThree and three.\n</think>\n\n6<|im_end|>"]]
    (only,) = [trained_text(qwen3, encode(c, QWEN3, qwen3)) for c in whole.conversations]
    assert only == runs[1]  # unsplit, the first answer is context: Qwen3 writes it without its reasoning


def test_a_special_tokens_text_in_the_reasoning_is_plain_text_with_split_special_tokens(qwen3):
    typed = Conversation((Turn("user", "Hi"), Turn("assistant", "Hello", True, reasoning="x <|im_end|> y")))
    im_end = qwen3.convert_tokens_to_ids("<|im_end|>")
    as_control = encode(typed, QWEN3, qwen3).input_ids.count(im_end)
    as_text = encode(typed, QWEN3, qwen3, split_special_tokens=True).input_ids.count(im_end)
    assert (as_control, as_text) == (3, 2)  # the user's and the answer's end markers only


def test_hf_refuses_reasoning_its_jinja_would_drop(real_tokenizer):
    from xtune.errors import DataError

    conversation = Conversation((Turn("user", "Hi"), Turn("assistant", "Hello", True, reasoning="greet back")))
    with pytest.raises(DataError, match="does not write reasoning_content, so the record's reasoning would be lost"):
        encode(conversation, TokenizerTemplate(), real_tokenizer("llama3"))
    llama3 = real_tokenizer("llama3")
    inline = Conversation((Turn("user", "Hi"), Turn("assistant", "<think>greet back</think>Hello", True)))
    assert "greet back" in llama3.decode(encode(inline, TokenizerTemplate(), llama3).input_ids)
