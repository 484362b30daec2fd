"""Preference records in each format people publish them in -> the same pair of conversations, answers trained."""

import pytest

from xtune.data.encode import IGNORE_INDEX, encode
from xtune.data.formats import RecordError, Turn
from xtune.data.pairs import detect_preference_format, kto_to_unpaired, preference_to_pair
from xtune.data.templates import get_template

USER, GOOD, BAD = "Opposite of hot?", "cold", "warm"
EXPECTED = ((Turn("user", USER), Turn("assistant", GOOD, True)), (Turn("user", USER), Turn("assistant", BAD, True)))

RECORDS = {
    "strings (TRL)": {"prompt": USER, "chosen": GOOD, "rejected": BAD},
    "messages (XTuner's DPO data)": {"prompt": [{"role": "user", "content": USER}],
                                     "chosen": [{"role": "assistant", "content": GOOD}],
                                     "rejected": [{"role": "assistant", "content": BAD}]},
    "whole conversations (implicit prompt)": {
        "chosen": [{"role": "user", "content": USER}, {"role": "assistant", "content": GOOD}],
        "rejected": [{"role": "user", "content": USER}, {"role": "assistant", "content": BAD}]},
    "UltraFeedback (answers repeat the prompt)": {
        "prompt": USER,
        "chosen": [{"role": "user", "content": USER}, {"role": "assistant", "content": GOOD}],
        "rejected": [{"role": "user", "content": USER}, {"role": "assistant", "content": BAD}]},
    "OpenAI messages + chosen/rejected messages": {"messages": [{"role": "user", "content": USER}],
                                                   "chosen": {"role": "assistant", "content": GOOD},
                                                   "rejected": {"role": "assistant", "content": BAD}},
    "ShareGPT (LLaMA-Factory)": {"conversations": [{"from": "human", "value": USER}],
                                 "chosen": {"from": "gpt", "value": GOOD}, "rejected": {"from": "gpt", "value": BAD}},
}  # fmt: skip


@pytest.mark.parametrize("name", list(RECORDS))
def test_each_format_gives_the_same_pair(name):
    record = RECORDS[name]
    assert detect_preference_format(record) == "preference"
    pair = preference_to_pair(record)
    assert (pair.chosen.turns, pair.rejected.turns) == EXPECTED


def test_only_the_answer_is_trained_in_a_multi_round_prompt():
    record = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": USER}],
              "chosen": GOOD, "rejected": BAD}  # fmt: skip
    pair = preference_to_pair(record)
    assert [t.trainable for t in pair.chosen.turns] == [False, False, False, False, True]


def test_a_pair_encodes_through_the_sft_road_with_only_the_answer_trained(tokenizer):
    pair = preference_to_pair({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                          {"role": "user", "content": USER}], "chosen": GOOD, "rejected": BAD})  # fmt: skip
    template = get_template("internlm2_chat")
    for conversation, answer in ((pair.chosen, GOOD), (pair.rejected, BAD)):
        encoded = encode(conversation, template, tokenizer)
        trained = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
        assert tokenizer.decode(trained) == answer + "<|im_end|>"


@pytest.mark.parametrize("record, problem", [
    ({"prompt": USER, "chosen": GOOD, "rejected": GOOD}, "'chosen' and 'rejected' are the same answer"),
    ({"chosen": GOOD, "rejected": BAD}, "the pair has no prompt"),
    ({"prompt": USER, "chosen": 3, "rejected": BAD}, "field 'chosen' must be a string, a message or a non-empty list"),
    ({"prompt": USER, "chosen": [{"role": "user", "content": "x"}], "rejected": BAD},
     "the prompt followed by 'chosen'"),
    ({"prompt": USER, "completion": GOOD, "label": "yes"}, "field 'label' must be true (desirable) or false"),
    ({"prompt": USER, "chosen": GOOD, "rejected": BAD, "margin": "2"}, "field 'margin' must be a finite number"),
    ({"prompt": USER, "chosen": GOOD, "rejected": BAD, "margin": float("nan")}, "field 'margin' must be a finite"),
    ({"prompt": USER, "chosen": GOOD, "rejected": BAD, "margin": True}, "field 'margin' must be a finite number"),
])  # fmt: skip
def test_malformed_records_name_the_field(record, problem):
    reader = kto_to_unpaired if "completion" in record else preference_to_pair
    with pytest.raises(RecordError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        reader(record)


def test_a_pairs_margin_is_its_records_margin_field_else_zero():
    assert preference_to_pair(RECORDS["strings (TRL)"]).margin == 0.0
    assert preference_to_pair({**RECORDS["strings (TRL)"], "margin": 3}).margin == 3.0
    assert preference_to_pair({**RECORDS["ShareGPT (LLaMA-Factory)"], "margin": -0.5}).margin == -0.5
    assert preference_to_pair({**RECORDS["strings (TRL)"], "margin": None}).margin == 0.0


def test_kto_records_are_one_answer_with_its_label():
    record = {"prompt": [{"role": "user", "content": USER}], "completion": [{"role": "assistant", "content": BAD}],
              "label": False}  # fmt: skip
    assert detect_preference_format(record) == "kto"
    unpaired = kto_to_unpaired(record)
    assert unpaired.conversation.turns == EXPECTED[1] and unpaired.desirable is False
    assert kto_to_unpaired({"prompt": USER, "completion": GOOD, "label": True}).conversation.turns == EXPECTED[0]
    with pytest.raises(RecordError, match=r"not a preference record \(keys: prompt, text\)"):
        detect_preference_format({"prompt": USER, "text": GOOD})
