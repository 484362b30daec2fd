import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xtune.data.formats import (
    Conversation,
    RecordError,
    Turn,
    alpaca_to_standard,
    conversation_to_standard,
    detect_format,
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


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
records = st.dictionaries(
    st.sampled_from(["conversation", "instruction", "input", "output", "system", "x"]), json_values, max_size=4
) | st.fixed_dictionaries({"conversation": st.lists(st.dictionaries(st.sampled_from(["system", "input", "output"]), json_values), max_size=3)})


@settings(deadline=None, max_examples=300)
@given(records)
def test_readers_return_a_conversation_or_a_record_error(record):
    for reader in (conversation_to_standard, alpaca_to_standard):
        try:
            result = reader(record)
        except RecordError:
            continue
        assert isinstance(result, Conversation) and all(isinstance(t.content, str) for t in result.turns)
