import pytest

from xtune.data.encode import IGNORE_INDEX, encode
from xtune.data.formats import Conversation, Turn
from xtune.data.templates import generation_prompt, get_template, render
from xtune.errors import XtuneError

TWO_TURNS = Conversation(
    (
        Turn("system", "You are helpful."),
        Turn("user", "What is the opposite of hot?"),
        Turn("assistant", "cold", True),
        Turn("user", "And of big?"),
        Turn("assistant", "small", True),
    )
)

INTERNLM2_TEXT = (
    "<s><|im_start|>system\nYou are helpful.<|im_end|>\n"
    "<|im_start|>user\nWhat is the opposite of hot?<|im_end|>\n<|im_start|>assistant\ncold<|im_end|>\n"
    "<|im_start|>user\nAnd of big?<|im_end|>\n<|im_start|>assistant\nsmall<|im_end|>\n"
)


def trained_runs(tokenizer, encoded):
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_internlm2_chat_layout_of_a_two_turn_sample(tokenizer):
    template = get_template("internlm2_chat")
    encoded = encode(TWO_TURNS, template, tokenizer)
    assert tokenizer.decode(encoded.input_ids) == INTERNLM2_TEXT
    assert encoded.input_ids == tokenizer(INTERNLM2_TEXT, add_special_tokens=False)["input_ids"]
    assert encoded.input_ids[0] == tokenizer.bos_token_id == 1
    assert trained_runs(tokenizer, encoded) == ["cold<|im_end|>", "small<|im_end|>"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert encoded.input_ids.count(im_end) == 5
    # the "\n" after each assistant <|im_end|> is not trained; the token before each trained run is "assistant\n"'s
    ends = [i for i, (t, l) in enumerate(zip(encoded.input_ids, encoded.labels)) if t == im_end and l == im_end]
    assert [encoded.labels[i + 1] for i in ends] == [IGNORE_INDEX, IGNORE_INDEX]
    assert encoded.num_trained == len(tokenizer.encode("cold<|im_end|>small<|im_end|>", add_special_tokens=False))


def test_rendering_matches_the_official_internlm2_jinja(tokenizer):
    messages = [{"role": t.role, "content": t.content} for t in TWO_TURNS.turns]
    official = tokenizer.apply_chat_template(messages, tokenize=False)
    assert official == INTERNLM2_TEXT
    prompt = Conversation(TWO_TURNS.turns[:4])
    official_prompt = tokenizer.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)
    assert "<s>" + generation_prompt(prompt, get_template("internlm2_chat")) == official_prompt


def test_qwen_chat_has_no_bos_and_the_same_chatml_body(tokenizer):
    encoded = encode(TWO_TURNS, get_template("qwen_chat"), tokenizer)
    assert tokenizer.decode(encoded.input_ids) == INTERNLM2_TEXT.removeprefix("<s>")


def test_truncation_cuts_ids_and_labels_together(tokenizer):
    template = get_template("internlm2_chat")
    full = encode(TWO_TURNS, template, tokenizer)
    short = encode(TWO_TURNS, template, tokenizer, max_length=len(full.input_ids) - 3)
    assert short.truncated and not full.truncated
    assert short.input_ids == full.input_ids[:-3] and short.labels == full.labels[:-3]


def test_untrained_assistant_turn_is_masked(tokenizer):
    conversation = Conversation((Turn("user", "q"), Turn("assistant", "a", trainable=False)))
    assert encode(conversation, get_template("internlm2_chat"), tokenizer).num_trained == 0


def test_segments_mark_only_assistant_text():
    segments = render(TWO_TURNS, get_template("internlm2_chat"))
    assert [text for text, trained in segments if trained] == ["cold<|im_end|>", "small<|im_end|>"]


def test_unknown_template_lists_known_ones():
    with pytest.raises(XtuneError, match="unknown prompt template 'nope'; known: internlm2_chat"):
        get_template("nope")
