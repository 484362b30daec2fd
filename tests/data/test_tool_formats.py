"""Agent data: tool-calling records in, and the tools, calls and results as each template family writes them."""

import copy
import json
import re
from dataclasses import replace
from itertools import groupby

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import openai_message, system_in_last_user_turn
from xtune.data.encode import IGNORE_INDEX, encode
from xtune.data.formats import (
    FORMATS,
    Conversation,
    RecordError,
    ToolCall,
    Turn,
    detect_format,
    msagent_react_to_standard,
    openai_to_standard,
)
from xtune.data.templates import (
    REACT_TOOLS,
    get_template,
    official_chat_template,
    render,
    with_tool_format,
)
from xtune.errors import DataError, XtuneError

WEATHER = {
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
WEATHER_TOOL = json.dumps({"type": "function", "function": WEATHER})
AGENT = Conversation(
    (
        Turn("system", "You may call tools."),
        Turn("user", "Weather in Paris?"),
        Turn("assistant", "Let me look.", True, tool_calls=(ToolCall("get_weather", '{"city": "Paris"}'),)),
        Turn("tool", '{"celsius": 22}', name="get_weather"),
        Turn("assistant", "It is 22.", True),
    ),
    tools=(WEATHER_TOOL,),
)


# ---------------------------------------------------------------- readers


def test_openai_legacy_function_calling_reads_as_tool_calls():
    record = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"role": "function", "name": "get_weather", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],
        "functions": [WEATHER],
    }
    assert openai_to_standard(record) == Conversation(
        (
            Turn("user", "Weather in Paris?"),
            Turn("assistant", "", True, (ToolCall("get_weather", '{"city": "Paris"}'),)),
            Turn("tool", "sunny", name="get_weather"),
            Turn("assistant", "Sunny.", True),
        ),
        tools=(WEATHER_TOOL,),
    )
    with pytest.raises(RecordError, match=r"missing field 'functions\[0\]\.name'"):
        openai_to_standard({**record, "functions": [{"description": "x"}]})
    with pytest.raises(RecordError, match="both 'tools' and 'functions'"):  # neither is dropped silently
        openai_to_standard({**record, "tools": [WEATHER]})


SYSTEM_WITH_PLUGINS = (
    "你是达摩院的ModelScopeGPT。\n\n<tool_list>\n1. "
    + json.dumps(
        {
            "plugin_name": "modelscope_text-ie",
            "plugin_schema_for_model": {
                "name": "modelscope_text-ie",
                "description": "信息抽取",
                "url": "http://x",
                "paths": [
                    {
                        "name": "modelscope_text-ie",
                        "method": "post",
                        "parameters": [
                            {"name": "text", "description": "用户输入的文本", "required": "True"},
                            {"name": "schema", "description": "要抽取信息的json表示", "required": "False"},
                        ],
                    }
                ],
            },
        },
        ensure_ascii=False,
    )
    + "\n</tool_list>"
)
THINK = '<|startofthink|>```JSON\n{"api_name": "modelscope_text-ie", "url": "http://x", "parameters": {"text": "近日", "schema": "{}"}}\n```<|endofthink|>'
EXEC = '<|startofexec|>```JSON\n{"人物": []}\n```<|endofexec|>'
MSAGENT = {
    "id": "MS_Agent_Bench_20",
    "conversations": [
        {"from": "system", "value": SYSTEM_WITH_PLUGINS},
        {"from": "user", "value": "抽取信息"},
        {"from": "assistant", "value": f"好的。{THINK}\n\n{EXEC}\n信息抽取结果：无。"},
        {"from": "user", "value": "谢谢"},
        {"from": "assistant", "value": "不客气"},
    ],
}
IE_TOOL = json.dumps(
    {
        "type": "function",
        "function": {
            "name": "modelscope_text-ie",
            "description": "信息抽取",
            "parameters": {
                "type": "object",
                "properties": {
                    "text": {"type": "string", "description": "用户输入的文本"},
                    "schema": {"type": "string", "description": "要抽取信息的json表示"},
                },
                "required": ["text"],
            },
        },
    },
    ensure_ascii=False,
)
IE_CALL = ToolCall("modelscope_text-ie", '{"text": "近日", "schema": "{}"}')


def test_msagent_react_reads_thought_call_result_and_answer_as_xtuner_does():
    assert detect_format(MSAGENT) == "msagent_react"
    assert FORMATS["msagent_react"](MSAGENT) == Conversation(
        (
            Turn("user", "抽取信息"),
            Turn("assistant", "好的。", True, (IE_CALL,)),
            Turn("tool", '{"人物": []}', name="modelscope_text-ie"),
            Turn("assistant", "信息抽取结果：无。", True),
            Turn("user", "谢谢"),
            Turn("assistant", "不客气", True),
        ),
        tools=(IE_TOOL,),
    )


def test_msagent_react_in_react_style_is_xtuners_text_with_observations_untrained():
    """XTuner writes "Thought:/Action:/Action Input:" trained, "Response:" untrained, "Final Answer:" trained."""
    conversation = msagent_react_to_standard({"conversations": MSAGENT["conversations"][:3]})
    segments = render(conversation, get_template("default+react"))
    assert [(text, trained) for text, trained in segments if trained] == [
        ('Thought: 好的。\nAction: modelscope_text-ie\nAction Input: {"text": "近日", "schema": "{}"}</s>', True),
        ("信息抽取结果：无。</s>", True),
    ]
    assert ('<|User|>:Observation: {"人物": []}\n<|Bot|>:', False) in segments


def test_msagent_react_python_literal_parallel_calls_and_a_call_that_ends_the_record():
    second = THINK.replace("近日", "昨天")
    value = f"{THINK}{second}{EXEC}{EXEC.replace('人物', '地点')}都好。"
    record = {"conversations": repr([{"from": "user", "value": "q"}, {"from": "assistant", "value": value}])}
    assert msagent_react_to_standard(record).turns == (
        Turn("user", "q"),
        Turn("assistant", "", True, (IE_CALL, ToolCall("modelscope_text-ie", '{"text": "昨天", "schema": "{}"}'))),
        Turn("tool", '{"人物": []}', name="modelscope_text-ie"),
        Turn("tool", '{"地点": []}', name="modelscope_text-ie"),
        Turn("assistant", "都好。", True),
    )
    ending = {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": f"我来查。{THINK}"}]}
    assert msagent_react_to_standard(ending).turns[-1] == Turn("assistant", "我来查。", True, (IE_CALL,))


@pytest.mark.parametrize(
    "value, message",
    [
        (f"{EXEC}答案", "a <|startofexec|> result with no <|startofthink|> call before it"),
        ("<|startofthink|>```JSON\n{oops}\n```<|endofthink|>", "conversations[1].value <|startofthink|>' is not valid JSON"),
        ('<|startofthink|>{"parameters": {}}<|endofthink|>', "missing field 'conversations[1].value <|startofthink|>.api_name'"),
    ],
)
def test_msagent_react_errors_name_the_field(value, message):
    record = {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": value}]}
    with pytest.raises(RecordError, match=re.escape(message)):
        msagent_react_to_standard(record)


def test_plain_sharegpt_is_not_taken_for_msagent():
    record = {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]}
    assert detect_format(record) == "sharegpt"


# ---------------------------------------------------------------- rendering per family


def test_internlm2_lists_the_tools_in_a_plugin_system_turn_and_trains_calls_not_results(tokenizer):
    segments = render(AGENT, get_template("internlm2_chat"))
    assert segments == [
        ("<s>", False),
        ("<|im_start|>system\nYou may call tools.<|im_end|>\n", False),
        (
            "<|im_start|>system name=<|plugin|>\n[\n    {\n        \"name\": \"get_weather\",\n"
            '        "description": "Weather of a city",\n        "parameters": {\n'
            '            "type": "object",\n            "properties": {\n                "city": {\n'
            '                    "type": "string"\n                }\n            },\n'
            '            "required": [\n                "city"\n            ]\n        }\n    }\n]\n<|im_end|>\n',
            False,
        ),
        ("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n", False),
        (
            'Let me look.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
            "<|action_end|><|im_end|>",
            True,
        ),
        ("\n", False),
        ('<|im_start|>environment name=<|plugin|>\n{"celsius": 22}<|im_end|>\n<|im_start|>assistant\n', False),
        ("It is 22.<|im_end|>", True),
        ("\n", False),
    ]
    encoded = encode(AGENT, get_template("internlm2_chat"), tokenizer)
    trained = [token for token, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "".join(text for text, is_trained in segments if is_trained)
    assert tokenizer.convert_tokens_to_ids("<|action_end|>") in trained


def test_internlm2_without_a_system_turn_starts_with_the_plugin_turn():
    conversation = Conversation(AGENT.turns[1:3], tools=AGENT.tools)
    text = "".join(text for text, _ in render(conversation, get_template("internlm2_chat")))
    assert text.startswith("<s><|im_start|>system name=<|plugin|>\n[\n")
    assert "]\n<|im_end|>\n<|im_start|>user\nWeather in Paris?" in text


def test_qwen_writes_the_tools_into_the_system_turn_as_qwen2_5_does(tokenizer):
    text = "".join(text for text, _ in render(AGENT, get_template("qwen_chat")))
    messages = [
        {"role": "system", "content": "You may call tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"celsius": 22}'},
        {"role": "assistant", "content": "It is 22."},
    ]  # fmt: skip
    official = tokenizer.apply_chat_template(
        messages, tools=[json.loads(WEATHER_TOOL)], chat_template=official_chat_template("qwen_chat"), tokenize=False
    )
    assert text == official
    assert text.startswith(
        "<|im_start|>system\nYou may call tools.\n\n# Tools\n\nYou may call one or more functions to assist with the "
        "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + WEATHER_TOOL
        + "\n</tools>\n\n"
    )
    alone = Conversation(AGENT.turns[1:2], tools=AGENT.tools)
    assert "".join(t for t, _ in render(alone, get_template("qwen_chat"))).startswith("<|im_start|>system\n# Tools\n")


def test_react_writes_thoughts_actions_and_observations_for_a_family_without_a_protocol():
    segments = render(AGENT, get_template("llama3_chat+react"))
    assert segments == [
        ("<|begin_of_text|>", False),
        (
            "<|start_header_id|>system<|end_header_id|>\n\nYou may call tools.\n\nYou can use these tools:\n"
            + json.dumps(WEATHER)
            + "\n\nTo use a tool, answer in this format:\nThought: what you need to do\n"
            "Action: the tool's name, one of [get_weather]\nAction Input: the tool's arguments as a JSON object\n"
            'The result comes back as "Observation: ...". When you know the answer, write it without an Action.'
            "<|eot_id|>",
            False,
        ),
        ("<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ('Thought: Let me look.\nAction: get_weather\nAction Input: {"city": "Paris"}<|eot_id|>', True),
        (
            '<|start_header_id|>user<|end_header_id|>\n\nObservation: {"celsius": 22}<|eot_id|>'
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            False,
        ),
        ("It is 22.<|eot_id|>", True),
    ]  # fmt: skip


def test_react_in_a_family_without_a_system_role_and_with_parallel_calls():
    calls = (ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_weather", '{"city": "Rome"}'))
    conversation = Conversation(
        (
            Turn("user", "Paris and Rome?"),
            Turn("assistant", "", True, calls),
            Turn("tool", "22", name="get_weather"),
            Turn("tool", "25", name="get_weather"),
            Turn("assistant", "22 and 25.", True),
        ),
        tools=(WEATHER_TOOL,),
    )
    segments = render(conversation, get_template("mistral+react"))
    assert segments[0] == ("<s>", False)
    assert segments[1][0].startswith("[INST] You can use these tools:\n")
    assert segments[1][0].endswith("write it without an Action.\n\nParis and Rome? [/INST]")
    assert segments[2:] == [
        (
            'Action: get_weather\nAction Input: {"city": "Paris"}\nAction: get_weather\nAction Input: {"city": "Rome"}</s>',
            True,
        ),
        (" ", False),
        ("[INST] Observation: 22\nObservation: 25 [/INST]", False),
        ("22 and 25.</s>", True),
        (" ", False),
    ]


def test_tool_formats_are_chosen_by_name():
    react = get_template("llama3_chat+react")  # llama3_chat's turns, ReAct's tool format
    assert react.tools is REACT_TOOLS and replace(react, name="llama3_chat", tools=None) == get_template("llama3_chat")
    assert get_template("llama3_chat+react").name == "llama3_chat+react"
    assert get_template("internlm2_chat+react").tools == REACT_TOOLS
    assert with_tool_format(get_template("qwen_chat+react"), "internlm2").name == "qwen_chat+internlm2"
    with pytest.raises(XtuneError, match="unknown tool format 'json'; known: internlm2, qwen, react"):
        get_template("llama3_chat+json")
    with pytest.raises(XtuneError, match="'hf' writes tools as the tokenizer's chat_template does"):
        get_template("hf+react")
    with pytest.raises(XtuneError, match="unknown prompt template 'nope'"):
        get_template("nope+react")


def test_a_family_without_a_tool_format_refuses_tools_and_says_how():
    offered_only = Conversation((Turn("user", "Hi"), Turn("assistant", "Hello", True)), tools=(WEATHER_TOOL,))
    with pytest.raises(XtuneError, match=r"cannot write the tools offered .*prompt_template = \"llama3_chat\+react\""):
        render(offered_only, get_template("llama3_chat"))
    with pytest.raises(XtuneError, match=r"does not support tool turns or tool calls yet.*\"gemma\+react\""):
        render(Conversation(AGENT.turns), get_template("gemma"))


# ---------------------------------------------------------------- Llama 3.1


def official_llama3_1(tokenizer, conversation, add_generation_prompt=False):
    return tokenizer.apply_chat_template(
        [openai_message(turn) for turn in conversation.turns],
        tools=[json.loads(tool) for tool in conversation.tools] or None,
        chat_template=official_chat_template("llama3_1"),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def test_llama3_1_writes_tools_calls_and_results_as_its_jinja_does(tokenizer):
    segments = render(AGENT, get_template("llama3_1"), tokenizer)
    assert "".join(text for text, _ in segments) == official_llama3_1(tokenizer, AGENT)
    assert segments[1][0].startswith("<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting")
    assert segments[2][0].startswith(
        "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for a "
        "function call with its proper arguments that best answers the given prompt.\n\nRespond in the format "
        '{"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n\n'
        + json.dumps(json.loads(WEATHER_TOOL), indent=4)
        + "\n\nWeather in Paris?<|eot_id|>"
    )
    assert [(text, trained) for text, trained in segments[3:]] == [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', True),  # "Let me look." is dropped
        (
            '<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"celsius\\": 22}"<|eot_id|>'  # the result as JSON text
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            False,
        ),
        ("It is 22.<|eot_id|>", True),
    ]
    prompt = Conversation(AGENT.turns[:4], tools=AGENT.tools)
    assert "".join(text for text, _ in render(prompt, get_template("llama3_1"), tokenizer)) == official_llama3_1(
        tokenizer, prompt, add_generation_prompt=True
    )


def test_llama3_1_without_tools_offered_writes_no_environment_and_refuses_several_calls_in_a_turn(tokenizer):
    calls = Conversation(AGENT.turns[1:4])  # a call and its result, no tools offered
    text = "".join(text for text, _ in render(calls, get_template("llama3_1"), tokenizer))
    assert "Environment" not in text and text == official_llama3_1(tokenizer, calls, add_generation_prompt=True)
    two = (ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_weather", '{"city": "Rome"}'))
    several = Conversation((Turn("user", "Paris and Rome?"), Turn("assistant", "", True, two)))
    with pytest.raises(DataError, match=r"'llama3_1' writes one tool call per assistant turn.*makes 2 \(get_weather, "):
        render(several, get_template("llama3_1"))
    with pytest.raises(XtuneError, match="writes the tools offered into the first user turn; it has none"):
        render(Conversation((Turn("system", "Be brief."),), tools=AGENT.tools), get_template("llama3_1"))


names = st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True)
arguments = st.dictionaries(names, st.one_of(st.integers(), st.text(max_size=6), st.booleans()), max_size=3)
stripped = st.text(min_size=1, max_size=12).map(str.strip).filter(bool)


@st.composite
def tool_conversations(draw):
    """Rounds of a question, at most one call per assistant turn with its result, and an answer."""
    tools = tuple(
        json.dumps({"type": "function", "function": {"name": name, "description": draw(st.text(max_size=8)),
                                                      "parameters": {"type": "object", "properties": {}}}})
        for name in draw(st.lists(names, max_size=2, unique=True))
    )  # fmt: skip
    turns = [Turn("system", draw(stripped))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        turns.append(Turn("user", draw(stripped)))
        for _ in range(draw(st.integers(0, 2))):
            call = ToolCall(draw(names), json.dumps(draw(arguments)))
            turns += [Turn("assistant", draw(st.text(max_size=6)), True, (call,)), Turn("tool", draw(st.text(max_size=8)))]
        turns.append(Turn("assistant", draw(stripped), True))
    if draw(st.booleans()):
        turns.append(Turn("user", draw(stripped)))
    return Conversation(tuple(turns), tools=tools)


@settings(max_examples=150, deadline=None)
@given(tool_conversations())
def test_llama3_1_equals_its_jinja_for_random_agent_conversations(tokenizer, conversation):
    prompting = conversation.turns[-1].role != "assistant"
    text = "".join(text for text, _ in render(conversation, get_template("llama3_1"), tokenizer))
    assert text == official_llama3_1(tokenizer, conversation, add_generation_prompt=prompting)


def test_hf_gives_mistral_v0_3s_jinja_the_call_ids_it_needs(tokenizer):
    """Mistral-7B-Instruct-v0.3's jinja writes each call's 9-character id and each result's tool_call_id: the
    records' ids reach it, and the calls and the final answer are trained."""
    from xtune.data.formats import openai_to_standard
    from xtune.data.templates import TokenizerTemplate, official_chat_template

    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                 "parameters": {"type": "object", "properties": {}}}}  # fmt: skip
    record = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "abc123def", "type": "function",
                                             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "abc123def", "content": '{"celsius": 22}'},
        {"role": "assistant", "content": "It is 22 °C."},
    ], "tools": [weather]}  # fmt: skip
    mistral = copy.deepcopy(tokenizer)
    mistral.chat_template = official_chat_template("mistral_v0_3")
    encoded = encode(openai_to_standard(record), TokenizerTemplate(), mistral)
    text = mistral.decode(encoded.input_ids)
    assert '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}]' in text
    assert '[TOOL_RESULTS] {"content": {"celsius": 22}, "call_id": "abc123def"}[/TOOL_RESULTS]' in text
    trained = mistral.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX])
    assert "abc123def" in trained and "It is 22 °C." in trained and "celsius" not in trained
    del record["messages"][1]["tool_calls"][0]["id"], record["messages"][2]["tool_call_id"]
    with pytest.raises(XtuneError, match="Tool call IDs should be alphanumeric strings with length 9"):
        encode(openai_to_standard(record), TokenizerTemplate(), mistral)


# ---------------------------------------------------------------- Mistral v0.3


def official_mistral_v0_3(tokenizer, conversation):
    """The jinja's text, given the system text in the last user turn where xtune writes it (conftest)."""
    conversation = system_in_last_user_turn(conversation)
    return tokenizer.apply_chat_template(
        [openai_message(turn) for turn in conversation.turns],
        tools=[json.loads(tool) for tool in conversation.tools] or None,
        chat_template=official_chat_template("mistral_v0_3"),
        tokenize=False,
    )


MISTRAL_AGENT = Conversation(
    (
        Turn("system", "You may call tools."),
        Turn("user", "Weather in Paris and Rome?"),
        Turn("assistant", "Let me look.", True, tool_calls=(
            ToolCall("get_weather", '{"city": "Paris"}', "abc123def"),
            ToolCall("get_weather", '{"city": "Rome"}', "A1b2C3d4E"),
        )),  # fmt: skip
        Turn("tool", '{"celsius": 22}', name="get_weather", call_id="abc123def"),
        Turn("tool", "18", name="get_weather", call_id="A1b2C3d4E"),
        Turn("assistant", " It is 22 and 18.\n", True),
    ),
    tools=(WEATHER_TOOL,),
)


def test_mistral_v0_3_writes_tools_calls_and_results_as_its_jinja_does(tokenizer):
    segments = render(MISTRAL_AGENT, get_template("mistral_v0_3"), tokenizer)
    assert "".join(text for text, _ in segments) == official_mistral_v0_3(tokenizer, MISTRAL_AGENT)
    assert segments == [
        ("<s>", False),
        ('[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a '
         'city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]'
         "[/AVAILABLE_TOOLS]", False),
        ("[INST] You may call tools.\n\nWeather in Paris and Rome?[/INST]", False),
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}, {"name": '
         '"get_weather", "arguments": {"city": "Rome"}, "id": "A1b2C3d4E"}]</s>', True),  # "Let me look." is dropped
        ('[TOOL_RESULTS] {"content": {"celsius": 22}, "call_id": "abc123def"}[/TOOL_RESULTS]'
         '[TOOL_RESULTS] {"content": 18, "call_id": "A1b2C3d4E"}[/TOOL_RESULTS]', False),  # the content unquoted
        (" ", True),
        ("It is 22 and 18.</s>", True),
    ]  # fmt: skip
    prompt = replace(MISTRAL_AGENT, turns=MISTRAL_AGENT.turns[1:5])  # after the results; the jinja's own text
    assert "".join(text for text, _ in render(prompt, get_template("mistral_v0_3"), tokenizer)) == (
        tokenizer.apply_chat_template([openai_message(turn) for turn in prompt.turns], tools=[json.loads(WEATHER_TOOL)],
                                      chat_template=official_chat_template("mistral_v0_3"), tokenize=False)
    )  # fmt: skip


def test_mistral_v0_3_writes_the_tools_before_the_last_user_turn_only(tokenizer):
    rounds = Conversation(
        (Turn("user", "Hi"), Turn("assistant", "Hello", True), *MISTRAL_AGENT.turns[1:]), tools=(WEATHER_TOOL,)
    )
    text = "".join(text for text, _ in render(rounds, get_template("mistral_v0_3"), tokenizer))
    assert text.startswith("<s>[INST] Hi[/INST] Hello</s>[AVAILABLE_TOOLS] [") and text.count("[AVAILABLE_TOOLS]") == 1
    assert text == official_mistral_v0_3(tokenizer, rounds)
    with pytest.raises(XtuneError, match="writes the tools offered before the last user turn; it has none"):
        render(Conversation((Turn("assistant", "Hello", True),), tools=(WEATHER_TOOL,)), get_template("mistral_v0_3"))


@pytest.mark.parametrize("call_id, result_id", [
    (None, "abc123def"), ("abc123de", "abc123de"), ("abc-12345", "abc-12345"), ("abc123def", None),
])  # fmt: skip
def test_mistral_v0_3_refuses_ids_that_are_not_9_letters_and_digits(call_id, result_id):
    """The jinja raises on ids of another length; mistral-common also refuses other characters (it would write
    a 9-character id with a quote into the JSON as it is)."""
    turns = (
        Turn("user", "Weather in Paris?"),
        Turn("assistant", "", True, (ToolCall("get_weather", '{"city": "Paris"}', call_id),)),
        Turn("tool", "22", name="get_weather", call_id=result_id),
    )
    with pytest.raises(DataError, match=r"has id .*format 'mistral_v0_3' writes ids matching \[A-Za-z0-9\]\{9\}: give"):
        render(Conversation(turns), get_template("mistral_v0_3"))


def test_mistral_v0_3_trains_what_hf_with_its_jinja_trains_and_the_earlier_rounds_too(tokenizer):
    """A record read with its ids (a result naming none gets its call's, by position) through the named template
    and through `hf` with the carried jinja: the same ids, and the same labels for one round. With more rounds, `hf`
    trains the last only: the jinja writes the tools before the last user turn, so a prefix ending at an earlier
    one renders differently from the whole."""
    from xtune.data.templates import TokenizerTemplate

    record = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "abc123def", "type": "function",
                                             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"celsius": 22}'},
        {"role": "assistant", "content": "It is 22 °C."},
    ], "tools": [json.loads(WEATHER_TOOL)]}  # fmt: skip
    mistral = copy.deepcopy(tokenizer)
    mistral.chat_template = official_chat_template("mistral_v0_3")

    def trained(encoded):
        runs = groupby(zip(encoded.input_ids, encoded.labels), key=lambda item: item[1] != IGNORE_INDEX)
        return [mistral.decode([token for token, _ in run]) for is_trained, run in runs if is_trained]

    one_round = openai_to_standard(record)
    named = encode(one_round, get_template("mistral_v0_3"), mistral)
    hf = encode(one_round, TokenizerTemplate(), mistral)
    assert (named.input_ids, named.labels) == (hf.input_ids, hf.labels)
    assert trained(named) == [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}]</s>',
        " It is 22 °C.</s>",
    ]
    record["messages"] += [{"role": "user", "content": "And tomorrow?"}, {"role": "assistant", "content": "The same."}]
    rounds = openai_to_standard(record)
    named, hf = encode(rounds, get_template("mistral_v0_3"), mistral), encode(rounds, TokenizerTemplate(), mistral)
    assert named.input_ids == hf.input_ids
    assert trained(named)[:2] == trained(encode(one_round, get_template("mistral_v0_3"), mistral))
    assert trained(named)[2:] == trained(hf) == [" The same.</s>"]


ids = st.from_regex(r"[A-Za-z0-9]{9}", fullmatch=True)
any_text = st.text(max_size=10)


@st.composite
def mistral_v0_3_conversations(draw):
    """Rounds of a question, turns of one or two calls each followed by their results, and an answer (texts with
    spaces at their ends); then perhaps a question, or calls and their results, to prompt after."""
    tools = tuple(
        json.dumps({"type": "function", "function": {"name": name, "description": draw(st.text(max_size=8)),
                                                      "parameters": {"type": "object", "properties": {}}}})
        for name in draw(st.lists(names, max_size=2, unique=True))
    )  # fmt: skip

    def calls_and_results():
        count = draw(st.integers(1, 2))
        calls = tuple(ToolCall(draw(names), json.dumps(draw(arguments)), draw(ids)) for _ in range(count))
        results = [Turn("tool", draw(any_text), name=call.name, call_id=call.id) for call in calls]
        return [Turn("assistant", draw(any_text), True, calls), *results]

    turns = [Turn("system", draw(any_text))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        turns.append(Turn("user", draw(any_text)))
        for _ in range(draw(st.integers(0, 2))):
            turns += calls_and_results()
        turns.append(Turn("assistant", draw(any_text), True))
    if draw(st.booleans()):
        turns.append(Turn("user", draw(any_text)))
    if draw(st.booleans()):
        turns += calls_and_results()
    return Conversation(tuple(turns), tools=tools)


@settings(max_examples=200, deadline=None)
@given(mistral_v0_3_conversations())
def test_mistral_v0_3_equals_its_jinja_for_random_agent_conversations(tokenizer, conversation):
    questions = [turn.content for turn in conversation.turns if turn.role == "user"]
    assume(not conversation.tools or questions.count(questions[-1]) == 1)  # the jinja's by-value quirk (template)
    text = "".join(text for text, _ in render(conversation, get_template("mistral_v0_3"), tokenizer))
    assert text == official_mistral_v0_3(tokenizer, conversation)
