"""XTuner's named map functions, each on a record of its dataset's real field layout."""

import pytest

from xtune.data.formats import FORMATS, Conversation, RecordError, Turn
from xtune.data.sources import map_function
from xtune.data.templates import SYSTEM_TEMPLATES
from xtune.data.xtuner_maps import DESCRIPTIONS, XTUNER_FORMATS, XTUNER_NAMES, format_name


def one_round(system: str, user: str, output: str) -> Conversation:
    turns = (Turn("system", system),) if system else ()
    return Conversation((*turns, Turn("user", user), Turn("assistant", output, trainable=True)))


CASES = [
    ("alpaca_zh", {"instruction": "Give three tips.", "input": "", "output": "1. Eat.", "instruction_zh": "给出三个提示。",
                   "input_zh": "", "output_zh": "1. 吃。"}, one_round("", "给出三个提示。", "1. 吃。")),
    ("alpaca_zh", {"instruction_zh": "翻译", "input_zh": "hello", "output_zh": "你好"}, one_round("", "翻译\nhello", "你好")),
    ("arxiv", {"id": "0704.0001", "title": "Calculation of prompt diphoton production cross sections at Tevatron and\n  LHC energies",
               "abstract": "  A fully differential calculation.\n", "categories": "hep-ph"},
     one_round(SYSTEM_TEMPLATES["arxiv_gentile"], "A fully differential calculation.",
               "Calculation of prompt diphoton production cross sections at Tevatron and LHC energies")),
    ("code_alpaca", {"prompt": "Reverse a list in Python.", "completion": "xs[::-1]"},
     one_round(SYSTEM_TEMPLATES["coder"], "Reverse a list in Python.", "xs[::-1]")),
    ("colors", {"color": "#2b1e10", "description": "Dark chocolate: a deep, warm brown."},
     one_round(SYSTEM_TEMPLATES["colorist"], "a deep, warm brown.", "#2b1e10")),
    ("crime_kg_assitant", {"input": "盗窃罪怎么判？", "output": "视数额而定。"}, one_round(SYSTEM_TEMPLATES["lawyer"], "盗窃罪怎么判？", "视数额而定。")),
    ("default", {"input": "2+2?", "output": "4"}, one_round("", "2+2?", "4")),
    ("law_reference", {"question": "合同无效怎么办？", "answer": "返还财产。", "reference": ["民法典第157条"]},
     one_round(SYSTEM_TEMPLATES["lawyer"], "合同无效怎么办？", "返还财产。")),
    ("medical", {"instruction": "头痛怎么办？", "input": "", "output": "多休息。"},
     one_round(SYSTEM_TEMPLATES["medical"], "头痛怎么办？", "多休息。")),
    ("openorca", {"id": "niv.242684", "system_prompt": "You are an AI assistant.", "question": "Hi?", "response": "Hello."},
     one_round("You are an AI assistant.", "Hi?", "Hello.")),
    ("openorca", {"id": "t0.1", "system_prompt": "", "question": "Hi?", "response": "Hello."}, one_round("", "Hi?", "Hello.")),
    ("sql", {"question": "How many heads?", "context": "CREATE TABLE head (age INTEGER)", "answer": "SELECT COUNT(*) FROM head"},
     one_round(SYSTEM_TEMPLATES["sql"], "CREATE TABLE head (age INTEGER)\nHow many heads?", "SELECT COUNT(*) FROM head")),
    ("stack_exchange", {"qid": 1, "question": "Why?", "response": "Because.", "date": "2020/01/01"}, one_round("", "Why?", "Because.")),
    ("tiny_codes", {"prompt": "Write a Rust add.", "main_topic": "x", "programming_language": "Rust", "response": "fn add() {}"},
     one_round(SYSTEM_TEMPLATES["coder"], "Write a Rust add.", "fn add() {}")),
    ("wizardlm", {"idx": "abc", "conversations": [{"from": "gpt", "value": "stray"}, {"from": "human", "value": "Hi"},
                  {"from": "human", "value": "there"}, {"from": "gpt", "value": "Hello"}]},
     Conversation((Turn("user", "Hi\nthere"), Turn("assistant", "Hello", trainable=True)))),
    ("pretrain", {"text": "Once upon a time."}, Conversation((Turn("assistant", "Once upon a time.", True),), raw=True)),
]


@pytest.mark.parametrize(("name", "record", "expected"), CASES, ids=[case[0] for case in CASES])
def test_map_function_on_its_datasets_layout(name, record, expected):
    assert map_function(name)(record) == expected
    assert map_function(f"{name}_map_fn")(record) == expected  # XTuner's function name


def test_llava_image_only_keeps_just_the_placeholder():
    record = {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": "select luxury furniture"}]}  # fmt: skip
    conversation = map_function("llava_image_only_map_fn")(record)
    assert conversation.turns == (Turn("user", "<image>"), Turn("assistant", "select luxury furniture", trainable=True))
    assert conversation.images == ("00453/004539375.jpg",)


def test_xtuner_names_resolve_to_xtunes_own_formats():
    for name in ("alpaca", "oasst1", "openai", "llava", "msagent_react"):
        assert map_function(f"{name}_map_fn") is FORMATS[name]
    assert format_name("crime_kg_assitan") == "crime_kg_assitant"  # DATASET_FORMAT_MAPPING's key
    assert format_name("colorist") == "colors" and format_name("text_map_fn") is None


def test_every_name_has_a_description_and_every_xtuner_name_resolves():
    assert set(DESCRIPTIONS) == set(FORMATS) | set(XTUNER_FORMATS)
    assert all(format_name(name) for name in XTUNER_NAMES)


def test_a_missing_field_is_named():
    with pytest.raises(RecordError, match="missing field 'completion'"):
        map_function("code_alpaca")({"prompt": "x"})
    with pytest.raises(RecordError, match="human or gpt"):
        map_function("wizardlm")({"conversations": [{"from": "bot", "value": "x"}]})


def test_an_alpaca_record_without_output_is_trained_as_written():
    """XTuner's alpaca map drops `<nooutput>` records; xtune keeps them, as the README says."""
    conversation = FORMATS["alpaca"]({"instruction": "Name a colour.", "input": "", "output": "<nooutput>"})
    assert conversation.turns[-1] == Turn("assistant", "<nooutput>", True)
