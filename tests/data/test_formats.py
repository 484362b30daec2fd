import copy
import json
import re

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from xtune.data.formats import (
    FORMATS,
    Conversation,
    RecordError,
    ToolCall,
    Turn,
    alpaca_to_standard,
    check_conversation,
    conversation_to_standard,
    detect_format,
    msagent_react_to_standard,
    openai_to_standard,
    sharegpt_to_standard,
    text_to_standard,
    with_system,
)


def test_conversation_multi_turn_with_system():
    record = {
        "conversation": [
            {"system": "Be brief.", "input": "Hi", "output": "Hello!"},
            {"input": "Bye", "output": "See you."},
        ]
    }
    assert conversation_to_standard(record) == Conversation(
        (
            Turn("system", "Be brief."),
            Turn("user", "Hi"),
            Turn("assistant", "Hello!", True),
            Turn("user", "Bye"),
            Turn("assistant", "See you.", True),
        )
    )


def test_alpaca_joins_instruction_and_input():
    both = alpaca_to_standard({"instruction": "Translate", "input": "chat", "output": "cat"})
    assert both.turns == (Turn("user", "Translate\nchat"), Turn("assistant", "cat", True))
    alone = alpaca_to_standard({"instruction": "Say hi", "input": "", "output": "hi"})
    assert alone.turns[0] == Turn("user", "Say hi")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"conversation": []}, "field 'conversation' must be a non-empty list"),
        ({"conversation": [{"input": "x"}]}, "missing field 'conversation[0].output'"),
        ({"conversation": [{"input": 3, "output": "y"}]}, "field 'conversation[0].input' must be a string, got int"),
        ({"conversation": ["x"]}, "'conversation[0]' must be an object"),
    ],
)
def test_conversation_errors_name_the_field(record, message):
    with pytest.raises(RecordError, match=message.replace("[", r"\[").replace("]", r"\]")):
        conversation_to_standard(record)


def test_detect_format():
    assert detect_format({"conversation": []}) == "conversation"
    assert detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    with pytest.raises(RecordError, match=r"unknown record format \(keys: foo\)"):
        detect_format({"foo": 1})
    with pytest.raises(RecordError, match="not an object but list"):
        detect_format([1])


def test_with_system_keeps_a_records_own_system():
    own = Conversation((Turn("system", "mine"), Turn("user", "q")))
    assert with_system(own, "default") is own
    bare = Conversation((Turn("user", "q"),))
    assert with_system(bare, "default").turns[0] == Turn("system", "default")
    assert with_system(bare, "") is bare
    rich = Conversation((Turn("user", "<image>q"), Turn("assistant", "a", True)), tools=("{}",), images=("x.jpg",))
    assert with_system(rich, "default") == Conversation((Turn("system", "default"), *rich.turns), ("{}",), ("x.jpg",))


# OpenAI messages ----------------------------------------------------------------------------------

WEATHER = {"name": "weather", "description": "Weather in a city", "parameters": {"type": "object"}}
WEATHER_TEXT = '{"type": "function", "function": {"name": "weather", "description": "Weather in a city", "parameters": {"type": "object"}}}'


def test_openai_messages_with_tool_calls_and_weights():
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city":  "Paris"}'}},
                    {"id": "c2", "type": "function", "function": {"name": "time", "arguments": {"city": "Paris"}}},
                ],
            },
            {"role": "tool", "tool_call_id": "c2", "content": "12:00"},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny at noon.", "weight": 0},
            {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "Rome?"}]},
            {"role": "assistant", "content": "Also sunny.", "weight": 1},
        ],
        "tools": [{"type": "function", "function": WEATHER}, WEATHER],
    }
    assert openai_to_standard(record) == Conversation(
        (
            Turn("system", "Be brief."),
            Turn("user", "Weather in Paris?"),
            Turn(
                "assistant",
                "",
                True,
                (ToolCall("weather", '{"city": "Paris"}', "c1"), ToolCall("time", '{"city": "Paris"}', "c2")),
            ),
            Turn("tool", "12:00", name="time", call_id="c2"),
            Turn("tool", "sunny", name="time", call_id="c2"),  # by position: the second call's
            Turn("assistant", "Sunny at noon.", False),
            Turn("user", "And Rome?"),
            Turn("assistant", "Also sunny.", True),
        ),
        tools=(WEATHER_TEXT, WEATHER_TEXT),
    )


def test_openai_tool_turn_names_by_name_then_position():
    calls = [{"function": {"name": "a", "arguments": "{}"}}, {"function": {"name": "b", "arguments": "{}"}}]
    record = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": calls},
            {"role": "tool", "content": "1"},
            {"role": "tool", "content": "2"},
            {"role": "assistant", "content": "done"},
        ],
        "tools": json.dumps([WEATHER]),
    }
    result = openai_to_standard(record)
    assert [turn.name for turn in result.turns] == [None, None, "a", "b", None]
    assert result.tools == (WEATHER_TEXT,)
    renamed = openai_to_standard({**record, "messages": [*record["messages"][:2], {"role": "tool", "content": "1", "name": "z"}, record["messages"][4]]})
    assert renamed.turns[2] == Turn("tool", "1", name="z")


def test_openai_nulls_count_as_absent():
    """Parquet rows fill the keys a message lacks with nulls."""
    null = {"tool_calls": None, "weight": None, "name": None, "tool_call_id": None}
    record = {"messages": [{"role": "user", "content": "q", **null}, {"role": "assistant", "content": "a", **null}], "tools": None, "images": None}
    assert openai_to_standard(record) == Conversation((Turn("user", "q"), Turn("assistant", "a", True)))


# ShareGPT and LLaVA -------------------------------------------------------------------------------


def test_sharegpt_with_system_tools_function_call_and_observation():
    record = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "Sunny."},
        ],
        "system": "Be brief.",
        "tools": json.dumps([WEATHER]),
    }
    assert sharegpt_to_standard(record) == Conversation(
        (
            Turn("system", "Be brief."),
            Turn("user", "Weather in Paris?"),
            Turn("assistant", "", True, (ToolCall("weather", '{"city": "Paris"}'),)),
            Turn("tool", "sunny", name="weather"),
            Turn("assistant", "Sunny.", True),
        ),
        tools=(WEATHER_TEXT,),
    )


def test_sharegpt_parallel_calls_system_message_and_loss_key():
    record = {
        "conversations": [
            {"from": "system", "value": "From the conversation."},
            {"from": "human", "value": "q"},
            {"from": "function_call", "value": '[{"name": "a", "arguments": "{}"}, {"name": "b", "arguments": {"x": 1}}]'},
            {"from": "observation", "value": "[1, 2]"},
            {"from": "gpt", "value": "3", "loss": False},
            {"from": "human", "value": "again"},
            {"from": "gpt", "value": "3"},
        ],
        "system": "Top level, overridden.",
        "tools": "",
    }
    assert sharegpt_to_standard(record).turns == (
        Turn("system", "From the conversation."),
        Turn("user", "q"),
        Turn("assistant", "", True, (ToolCall("a", "{}"), ToolCall("b", '{"x": 1}'))),
        Turn("tool", "[1, 2]"),
        Turn("assistant", "3", False),
        Turn("user", "again"),
        Turn("assistant", "3", True),
    )


def test_llava_keeps_the_placeholder_and_lists_the_images():
    record = {
        "id": "000001",
        "image": "coco/1.jpg",
        "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}],
    }
    assert detect_format(record) == "llava"
    assert FORMATS["llava"](record) == Conversation(
        (Turn("user", "<image>\nWhat is this?"), Turn("assistant", "A cat.", True)), images=("coco/1.jpg",)
    )
    two = {**record, "image": ["1.jpg", "2.jpg"], "conversations": [{"from": "human", "value": "<image><image>same?"}, {"from": "gpt", "value": "no"}]}
    assert FORMATS["llava"](two).images == ("1.jpg", "2.jpg")
    assert FORMATS["sharegpt"]({**two, "image": None, "images": ["1.jpg", "2.jpg"]}).images == ("1.jpg", "2.jpg")


# Plain text and alpaca extensions -----------------------------------------------------------------


def test_text_is_one_raw_trained_turn():
    assert text_to_standard({"text": "Once upon a time.", "meta": 1}) == Conversation(
        (Turn("assistant", "Once upon a time.", True),), raw=True
    )
    assert with_system(text_to_standard({"text": "x"}), "default").turns == (Turn("assistant", "x", True),)


def test_alpaca_with_system_and_history():
    record = {"instruction": "And 3+3?", "output": "6", "system": "Math.", "history": [["1+1?", "2"], ["2+2?", "4"]]}
    assert alpaca_to_standard(record).turns == (
        Turn("system", "Math."),
        Turn("user", "1+1?"),
        Turn("assistant", "2", True),
        Turn("user", "2+2?"),
        Turn("assistant", "4", True),
        Turn("user", "And 3+3?"),
        Turn("assistant", "6", True),
    )


def test_conversation_round_with_loss_false_is_untrained():
    record = {"conversation": [{"input": "a", "output": "b", "loss": False}, {"input": "c", "output": "d"}]}
    assert [turn.trainable for turn in conversation_to_standard(record).turns] == [False, False, False, True]


# Errors name the field ----------------------------------------------------------------------------


def _human(value):
    return {"from": "human", "value": value}


def _gpt(value):
    return {"from": "gpt", "value": value}


@pytest.mark.parametrize(
    "reader, record, message",
    [
        (sharegpt_to_standard, {"conversations": [_human("a"), _human("b"), _gpt("c")]}, "'conversations[1]' is a user turn after a user turn; expected an assistant turn"),
        (sharegpt_to_standard, {"conversations": [_gpt("a"), _human("b")]}, "'conversations[0]' is an assistant turn after the start; expected a user turn"),
        (sharegpt_to_standard, {"conversations": [_human("a"), _gpt("b"), _human("c")]}, "'conversations[2]' is a user turn at the end; the last turn must be the assistant's"),
        (sharegpt_to_standard, {"conversations": [_human("a"), _gpt("b"), {"from": "observation", "value": "x"}, _gpt("c")]}, "'conversations[2]' is a tool turn after an assistant turn; expected a user turn"),
        (sharegpt_to_standard, {"conversations": [_human("a"), {"from": "function_call", "value": '{"name": "f", "arguments": {}}'}, _human("c"), _gpt("d")]}, "'conversations[2]' is a user turn after an assistant turn with tool calls; expected a tool turn"),
        (sharegpt_to_standard, {"conversations": [_human("a"), _gpt("b"), {"from": "system", "value": "s"}, _human("c"), _gpt("d")]}, "'conversations[2]' is a system turn after the first turn"),
        (sharegpt_to_standard, {"conversations": [{"from": "bot", "value": "a"}]}, "field 'conversations[0].from' must be one of human, gpt, system, function_call, observation; got 'bot'"),
        (sharegpt_to_standard, {"conversations": [_human("a"), {"from": "gpt"}]}, "missing field 'conversations[1].value'"),
        (sharegpt_to_standard, {"conversations": [_human("a"), {"from": "function_call", "value": "{oops"}]}, "field 'conversations[1].value' is not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
        (sharegpt_to_standard, {"conversations": [_human("a"), {"from": "function_call", "value": '{"name": "f"}'}]}, "missing field 'conversations[1].value[0].arguments'"),
        (sharegpt_to_standard, {"conversations": [_human("a"), {"from": "function_call", "value": '{"name": "f", "arguments": "[1]"}'}]}, "field 'conversations[1].value[0].arguments' must be a JSON object or its text, got list"),
        (sharegpt_to_standard, {"conversations": [_human("a"), _gpt("b")], "tools": "[{]"}, "field 'tools' is not valid JSON"),
        (sharegpt_to_standard, {"conversations": [_human("a"), _gpt("b")], "tools": [{"description": "no name"}]}, "missing field 'tools[0].name'"),
        (sharegpt_to_standard, {"conversations": [_human("a"), _gpt("b", )], "image": "x.jpg"}, "the record has 1 image(s) but 0 '<image>' placeholder(s)"),
        (sharegpt_to_standard, {"conversations": [_human("<image>"), _gpt("b")], "image": 3}, "field 'image' must be an image path or a list of image paths, got 3"),
        (sharegpt_to_standard, {"conversations": [_human("<image>"), _gpt("b")], "image": "a", "images": ["a"]}, "the record has both 'image' and 'images'"),
        (sharegpt_to_standard, {"conversations": [_human("a"), {**_gpt("b"), "weight": 0}]}, "no assistant turn to train on"),
        (sharegpt_to_standard, {"conversations": "hi"}, "field 'conversations' must be a non-empty list"),
        (openai_to_standard, {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, "field 'messages[1].role' must be one of system, user, assistant, tool, got 'bot'"),
        (openai_to_standard, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}, "missing field 'messages[1].content'"),
        (openai_to_standard, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]}, "field 'messages[1].weight' must be 0 or 1 (or false or true), got 2"),
        (openai_to_standard, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "'messages[0].content[0]' must be a text part"),
        (openai_to_standard, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"id": "x", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "y", "content": "1"}, {"role": "assistant", "content": "b"}]}, "field 'messages[2].tool_call_id' is 'y', which no earlier tool call has as its id"),
        (openai_to_standard, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"type": "code", "function": {}}]}]}, "field 'messages[1].tool_calls[0].type' must be 'function', got 'code'"),
        (openai_to_standard, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{1}"}}]}]}, "field 'messages[1].tool_calls[0].function.arguments' is not valid JSON"),
        (openai_to_standard, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": 5}, "field 'tools' must be a list of tool schemas or its JSON text, got int"),
        (openai_to_standard, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}]}, "'messages[2]' is an assistant turn after an assistant turn; expected a user turn"),
        (alpaca_to_standard, {"instruction": "a", "output": "b", "history": [["x"]]}, "field 'history[0]' must be a pair of strings"),
        (alpaca_to_standard, {"instruction": "a"}, "missing field 'output'"),
        (text_to_standard, {"text": "  "}, "field 'text' is empty"),
        (text_to_standard, {"text": 3}, "field 'text' must be a string, got int"),
        (text_to_standard, ["text"], "a record must be a JSON object, got list"),
    ],
)
def test_format_errors_name_the_field(reader, record, message):
    with pytest.raises(RecordError) as caught:
        reader(record)
    assert message in str(caught.value)


def _msagent(think):
    return {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": f"<|startofthink|>{think}<|endofthink|>"}]}


CALL = "conversations[1].value <|startofthink|>"


@pytest.mark.parametrize(
    "think, message",
    [
        ('["f"]', f"'{CALL}' must be a JSON object, got list"),
        ('{"parameters": {}}', f"missing field '{CALL}.api_name'"),
        ('{"api_name": 3}', f"field '{CALL}.api_name' must be a string, got int"),
        ('{"api_name": ""}', f"field '{CALL}.api_name' is empty"),
        ('{"api_name": "f", "parameters": [1]}', f"field '{CALL}.parameters' must be a JSON object or its text, got list"),
        ('{"api_name": "f", "parameters": "{1}"}', f"field '{CALL}.parameters' is not valid JSON"),
    ],
)
def test_msagent_call_errors_name_the_field(think, message):
    with pytest.raises(RecordError) as caught:
        msagent_react_to_standard(_msagent(think))
    assert message in str(caught.value)


def test_msagent_call_parameters_may_be_left_out_or_given_as_text():
    assert msagent_react_to_standard(_msagent('{"api_name": "f"}')).turns[-1].tool_calls == (ToolCall("f", "{}"),)
    as_text = _msagent('{"api_name": "f", "parameters": "{\\"q\\": 1}"}')
    assert msagent_react_to_standard(as_text).turns[-1].tool_calls == (ToolCall("f", '{"q": 1}'),)


def test_detect_every_format():
    assert detect_format({"messages": []}) == "openai"
    assert detect_format({"conversations": [], "id": "1"}) == "sharegpt"
    assert detect_format({"conversations": [], "image": "a.jpg"}) == "llava"
    assert detect_format({"text": "x"}) == "text"
    assert detect_format({"conversation": None, "text": "x"}) == "text"


def test_check_conversation_accepts_what_templates_can_render():
    good = Conversation((Turn("user", "q"), Turn("assistant", "a", True)))
    assert check_conversation(good) is good
    with pytest.raises(RecordError, match=r"'turns\[0\]' must be a Turn"):
        check_conversation(Conversation(("not a turn",)))
    with pytest.raises(RecordError, match="expected a Conversation, got dict"):
        check_conversation({"turns": []})
    with pytest.raises(RecordError, match="one trainable assistant turn"):
        check_conversation(Conversation((Turn("user", "x"),), raw=True))


# Fuzzing: every reader returns a valid Conversation or raises RecordError --------------------------

KEYS = [
    "conversation", "instruction", "input", "output", "system", "history", "messages", "role", "content",
    "tool_calls", "tool_call_id", "id", "name", "weight", "loss", "tools", "conversations", "from", "value",
    "image", "images", "text", "function", "arguments", "type",
]  # fmt: skip
TEXTS = st.sampled_from(
    [
        "human", "gpt", "system", "function_call", "observation", "user", "assistant", "tool", "function", "text",
        "<image>", "", " ", "{}", '{"name": "f", "arguments": {}}', '[{"name": "f", "arguments": "{}"}]',
        '{"name": "f", "arguments": "{\\"a\\": NaN}"}', "null", "[", "NaN", '{"a": 1e999}', "[]", "c1",
    ]
) | st.text(max_size=4)  # fmt: skip
scalars = st.none() | st.booleans() | st.integers(-1, 2) | st.floats() | TEXTS
fuzz_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=2), children, max_size=4),
    max_leaves=10,
)
weights = st.sampled_from([{}, {}, {}, {"weight": 1}, {"weight": 0}, {"loss": True}, {"loss": False}])
words = st.sampled_from(["hi", "a b", "", "<image>", "ok"])
arguments = st.sampled_from(["{}", '{"x": 1}', {"x": [1, 2]}, {}])


@st.composite
def mutated(draw, valid):
    """A valid record, then up to three random edits anywhere in it: replace, delete or duplicate."""
    record = copy.deepcopy(draw(valid))  # strategies share their constants between examples
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        places = list(_places(record))
        container, key = draw(st.sampled_from(places)) if places else (None, None)
        if container is None:
            record = draw(fuzz_values)
            continue
        action = draw(st.sampled_from(["replace", "replace", "delete", "duplicate"]))
        if action == "replace":
            container[key] = draw(fuzz_values | TEXTS)
        elif action == "delete":
            del container[key]
        elif isinstance(container, list):
            container.insert(key, copy.deepcopy(container[key]))
        else:
            container[draw(st.sampled_from(KEYS))] = copy.deepcopy(container[key])
    return record


def _places(value):
    if isinstance(value, dict):
        for key in list(value):
            yield value, key
            yield from _places(value[key])
    elif isinstance(value, list):
        for index in range(len(value)):
            yield value, index
            yield from _places(value[index])


@st.composite
def openai_valid(draw):
    messages = [{"role": "system", "content": draw(words)}] if draw(st.booleans()) else []
    for round_ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(words | st.just([{"type": "text", "text": "x"}]))})
        if draw(st.booleans()):
            calls = [
                {"id": f"c{round_}{n}", "type": "function", "function": {"name": draw(st.sampled_from("fg")), "arguments": draw(arguments)}}
                for n in range(draw(st.integers(1, 2)))
            ]
            messages.append({"role": "assistant", "content": None, "tool_calls": calls, **draw(weights)})
            for call in calls:
                link = draw(st.sampled_from([{}, {"tool_call_id": call["id"]}, {"name": call["function"]["name"]}]))
                messages.append({"role": "tool", "content": draw(words), **link})
        messages.append({"role": "assistant", "content": draw(words), **draw(weights)})
    tools = draw(st.sampled_from([{}, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, {"tools": '[{"name": "g"}]'}]))
    return {"messages": messages, **tools}


@st.composite
def sharegpt_valid(draw):
    messages = [{"from": "system", "value": draw(words)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"from": draw(st.sampled_from(["human", "user"])), "value": draw(words)})
        if draw(st.booleans()):
            call = {"name": draw(st.sampled_from("fg")), "arguments": draw(arguments)}
            messages.append({"from": "function_call", "value": json.dumps(draw(st.sampled_from([call, [call, call]])))})
            messages.append({"from": "observation", "value": draw(words)})
        messages.append({"from": draw(st.sampled_from(["gpt", "assistant"])), "value": draw(words), **draw(weights)})
    extra = draw(st.sampled_from([{}, {"system": "s"}, {"tools": '[{"name": "f"}]'}, {"id": "7"}]))
    placeholders = sum(message["value"].count("<image>") for message in messages)
    image = draw(st.sampled_from([{}, {"image": "a.jpg"}, {"image": ["a.jpg"] * placeholders}, {"images": ["a.jpg"] * placeholders}]))
    return {"conversations": messages, **extra, **image}


@st.composite
def conversation_valid(draw):
    rounds = [
        {"input": draw(words), "output": draw(words), **draw(weights), **draw(st.sampled_from([{}, {"system": "s"}]))}
        for _ in range(draw(st.integers(1, 3)))
    ]
    return {"conversation": rounds}


alpaca_valid = st.fixed_dictionaries(
    {"instruction": words, "output": words},
    optional={"input": words, "system": words, "history": st.lists(st.tuples(words, words).map(list), max_size=2)},
)
text_valid = st.fixed_dictionaries({"text": words}, optional={"meta": fuzz_values})

openai_records = mutated(openai_valid())
sharegpt_records = mutated(sharegpt_valid())
conversation_records = mutated(conversation_valid())
alpaca_records = mutated(alpaca_valid)
text_records = mutated(text_valid)
any_records = openai_records | sharegpt_records | conversation_records | alpaca_records | text_records


def _assert_valid(result):
    assert isinstance(result, Conversation)
    assert check_conversation(result) is result
    for turn in result.turns:
        for call in turn.tool_calls:
            assert isinstance(json.loads(call.arguments), dict)
    for tool in result.tools:
        assert json.loads(tool)["type"] == "function"


def _fuzz(reader, record):
    try:
        result = reader(record)
    except RecordError as error:
        event(f"RecordError: {str(error)[:25]}")
        return
    event("Conversation")
    _assert_valid(result)


FUZZ = settings(max_examples=1000, deadline=None)


@FUZZ
@given(openai_records)
def test_fuzz_openai(record):
    _fuzz(openai_to_standard, record)


@FUZZ
@given(sharegpt_records)
def test_fuzz_sharegpt_and_llava(record):
    _fuzz(sharegpt_to_standard, record)


@FUZZ
@given(conversation_records)
def test_fuzz_conversation(record):
    _fuzz(conversation_to_standard, record)


@FUZZ
@given(alpaca_records)
def test_fuzz_alpaca(record):
    _fuzz(alpaca_to_standard, record)


@FUZZ
@given(text_records)
def test_fuzz_text(record):
    _fuzz(text_to_standard, record)


@FUZZ
@given(any_records)
def test_fuzz_detected_format(record):
    try:
        name = detect_format(record)
    except RecordError:
        return
    _fuzz(FORMATS[name], record)


# oasst1 (openassistant-guanaco's text) ----------------------------------------------------------------------------

GUANACO = (
    "### Human: Can you explain ### markdown?### Assistant: Sure!\n### Usage\nUse it.### Human: Thanks"
    "### Assistant: Welcome."
)


def test_oasst1_text_reads_as_rounds_and_a_heading_in_a_reply_stays_text():
    conversation = FORMATS["oasst1"]({"text": GUANACO})
    assert [(t.role, t.content, t.trainable) for t in conversation.turns] == [
        ("user", "Can you explain ### markdown?", False), ("assistant", "Sure!\n### Usage\nUse it.", True),
        ("user", "Thanks", False), ("assistant", "Welcome.", True),
    ]  # fmt: skip
    assert detect_format({"text": GUANACO}) == "oasst1" and detect_format({"text": "plain prose"}) == "text"
    unanswered = FORMATS["oasst1"]({"text": GUANACO + "### Human: And?"})
    assert unanswered.turns == conversation.turns  # a last question without a reply is left out, as XTuner does


@pytest.mark.parametrize("text, problem", [
    ("Hello ### Human: a### Assistant: b", "must start with '### Human:'"),
    ("### Human: a### Human: b### Assistant: c", "turn 2 is '### Human:' where '### Assistant:' belongs"),
    ("### Human: only a question", "holds no '### Human:' turn answered"),
])  # fmt: skip
def test_malformed_oasst1_text_names_the_problem(text, problem):
    with pytest.raises(RecordError, match=re.escape(problem)):
        FORMATS["oasst1"]({"text": text})


def test_a_txt_file_is_pretraining_text_even_if_it_starts_like_guanaco(tmp_path):
    from xtune.data.sources import read_conversations

    (tmp_path / "corpus.txt").write_text("### Human: not a chat here\nsecond line\n")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"text": GUANACO}) + "\n")
    assert [c.raw for _, c in read_conversations(tmp_path / "corpus.txt")] == [True, True]
    assert [c.raw for _, c in read_conversations(tmp_path / "chat.jsonl")] == [False]
