import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xtune.data.encode import IGNORE_INDEX, encode, last_turn_trained_only
from xtune.data.formats import Conversation, ToolCall, Turn
from xtune.data.templates import TEMPLATES, generation_prompt, get_template, official_chat_template, render
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
    assert generation_prompt(prompt, get_template("internlm2_chat")) == official_prompt


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


def rendered_text(conversation, template, tokenizer):
    return "".join(text for text, _ in render(conversation, template, tokenizer))


def tokenizer_with(tokenizer, *special_tokens, bos=None, eos=None, chat_template=None):
    """A copy of the tiny tokenizer that knows more special tokens, e.g. a family's BOS and EOS."""
    variant = copy.deepcopy(tokenizer)
    named = {key: value for key, value in (("bos_token", bos), ("eos_token", eos)) if value}
    named["extra_special_tokens"] = list(special_tokens)
    variant.add_special_tokens(named, replace_extra_special_tokens=False)
    if chat_template is not None:
        variant.chat_template = chat_template
    return variant


TRAINED_RUNS = {
    "internlm2_chat": ["cold<|im_end|>", "small<|im_end|>"],
    "qwen_chat": ["cold<|im_end|>", "small<|im_end|>"],
    "qwen3": ["<think>\n\n</think>\n\nsmall<|im_end|>"],  # the model would have thought before "cold"
    "yi_chat": ["cold<|im_end|>", "small<|im_end|>"],
    "llama2_chat": [" cold </s>", " small </s>"],
    # the tiny tokenizer has no <|eot_id|> token: the text is tokenized whole, "><" merges across the reply's end,
    # and a token that holds characters of the reply is trained (the model must write it to write the reply)
    "llama3_chat": ["cold<|eot_id|><", "small<|eot_id|>"],
    "mistral": ["cold</s>", "small</s>"],
    "mixtral": ["cold</s>", "small</s>"],
    "mistral_v0_3": [" cold</s>", " small</s>"],  # the space after [/INST] is the answer's
    "gemma": ["cold<end_of_turn>", "small<end_of_turn>"],
    "phi3_chat": ["cold<|end|>", "small<|end|>", "</s>"],
    "phi3_5": ["cold<|end|>", "small<|end|>", "</s>"],
    "chatglm3": ["\n cold", "\n small</s>"],
    "glm4": ["\ncold", "\nsmall</s>"],
    "deepseek_v2": [" cold</s>", " small</s>"],
    "vicuna": [" cold</s>", " small</s>"],
    "zephyr": ["cold</s>", "small</s>"],
    "default": ["cold</s>", "small</s>"],
    "llama3_1": ["cold<|eot_id|><", "small<|eot_id|>"],
    "phi4": ["cold<|im_end|>", "small<|im_end|>"],
    "deepseek_r1": ["\n</think>\n\nsmall</s>"],  # "<think>\n" is the generation prompt's; "cold" is context
    "deepseek_v3": ["cold</s>", "small</s>"],
    "internlm_chat": ["cold<eoa>", "small<eoa>"],
    "baichuan_chat": ["cold", "small</s>"],
    "baichuan2_chat": ["cold", "small</s>"],
    "chatglm2": ["cold\n\n", "small\n\n</s>"],
    "moss_sft": [" cold<eom>", " small<eom>"],
    "code_llama_chat": ["cold</s>", "small</s>"],
    "deepseek_coder": ["cold\n<|EOT|>", "small\n<|EOT|>"],
    "cohere_chat": ["cold<|END_OF_TURN_TOKEN|><", "small<|END_OF_TURN_TOKEN|>"],
    "minicpm": ["cold", "small</s>"],
    "minicpm3": ["cold<|im_end|>", "small<|im_end|>"],
    "deepseek_moe": [" cold</s>", " small</s>"],
}


def test_every_template_has_a_pinned_label_layout():
    assert set(TRAINED_RUNS) == set(TEMPLATES)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_only_the_assistant_text_and_its_end_marker_are_trained(tokenizer, name):
    encoded = encode(TWO_TURNS, get_template(name), tokenizer)
    assert trained_runs(tokenizer, encoded) == TRAINED_RUNS[name]
    assert tokenizer.decode(encoded.input_ids) == rendered_text(TWO_TURNS, get_template(name), tokenizer)


@pytest.mark.parametrize("name", ["internlm2_chat", "llama3_chat", "phi3_chat", "hf"])
def test_train_on_last_turn_only(tokenizer, name):
    every = encode(TWO_TURNS, get_template(name), tokenizer)
    last = encode(TWO_TURNS, get_template(name), tokenizer, train_on_last_turn_only=True)
    assert last.input_ids == every.input_ids
    assert trained_runs(tokenizer, last) == TRAINED_RUNS.get(name, TRAINED_RUNS["internlm2_chat"])[1:]


def test_last_turn_only_keeps_an_untrainable_last_turn_untrained():
    conversation = Conversation((Turn("user", "q"), Turn("assistant", "a", True), Turn("assistant", "b", False)))
    assert [turn.trainable for turn in last_turn_trained_only(conversation).turns] == [False, True, False]


def test_bos_and_eos_written_by_templates_are_the_tokenizers_special_ids(tokenizer):
    llama3 = tokenizer_with(
        tokenizer, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", bos="<|begin_of_text|>", eos="<|eot_id|>"
    )
    encoded = encode(TWO_TURNS, get_template("llama3_chat"), llama3)
    assert encoded.input_ids[0] == llama3.bos_token_id == llama3.convert_tokens_to_ids("<|begin_of_text|>")
    assert encoded.input_ids.count(llama3.eos_token_id) == 5
    assert trained_runs(llama3, encoded) == ["cold<|eot_id|>", "small<|eot_id|>"]
    text = generation_prompt(TWO_TURNS, get_template("llama3_chat"), llama3)
    assert text == generation_prompt(TWO_TURNS, get_template("llama3_chat"))
    assert encoded.input_ids == llama3(text, add_special_tokens=False)["input_ids"]

    gemma = tokenizer_with(tokenizer, "<start_of_turn>", "<end_of_turn>", bos="<bos>", eos="<eos>")
    encoded = encode(TWO_TURNS, get_template("gemma"), gemma)
    assert encoded.input_ids[0] == gemma.bos_token_id and tokenizer.bos_token_id not in encoded.input_ids
    assert encoded.input_ids.count(gemma.convert_tokens_to_ids("<end_of_turn>")) == 4

    llama2 = encode(TWO_TURNS, get_template("llama2_chat"), tokenizer)
    assert llama2.input_ids.count(tokenizer.bos_token_id) == 2
    eos_positions = [i for i, token in enumerate(llama2.input_ids) if token == tokenizer.eos_token_id]
    assert len(eos_positions) == 2 and all(llama2.labels[i] == tokenizer.eos_token_id for i in eos_positions)

    zephyr = encode(TWO_TURNS, get_template("zephyr"), tokenizer)
    assert tokenizer.bos_token_id not in zephyr.input_ids
    eos_labels = [label for token, label in zip(zephyr.input_ids, zephyr.labels) if token == tokenizer.eos_token_id]
    assert eos_labels == [IGNORE_INDEX, IGNORE_INDEX, tokenizer.eos_token_id, IGNORE_INDEX, tokenizer.eos_token_id]


def test_a_tokenizer_without_bos_gets_none(tokenizer):
    no_bos = copy.deepcopy(tokenizer)
    no_bos.bos_token = None
    assert tokenizer.bos_token_id not in encode(TWO_TURNS, get_template("llama3_chat"), no_bos).input_ids


RAW = Conversation((Turn("assistant", "Plain text, no chat.", True),), raw=True)


@pytest.mark.parametrize("name", ["internlm2_chat", "qwen_chat", "llama3_chat", "chatglm3", "hf"])
def test_raw_text_is_bos_text_eos_all_trained_but_bos(tokenizer, name):
    encoded = encode(RAW, get_template(name), tokenizer)
    text_ids = tokenizer.encode("Plain text, no chat.", add_special_tokens=False)
    assert encoded.input_ids == [tokenizer.bos_token_id, *text_ids, tokenizer.eos_token_id]
    assert encoded.labels == [IGNORE_INDEX, *text_ids, tokenizer.eos_token_id]


def test_hf_trains_the_assistant_spans_and_tokenizes_like_apply_chat_template(tokenizer):
    template = get_template("hf")
    messages = [{"role": turn.role, "content": turn.content} for turn in TWO_TURNS.turns]
    encoded = encode(TWO_TURNS, template, tokenizer)
    assert encoded.input_ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert trained_runs(tokenizer, encoded) == ["cold<|im_end|>", "small<|im_end|>"]
    prompt = encode(Conversation(TWO_TURNS.turns[:4]), template, tokenizer)
    official = tokenizer.apply_chat_template(messages[:4], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert prompt.input_ids == official and trained_runs(tokenizer, prompt) == ["cold<|im_end|>"]


@pytest.mark.parametrize(
    ("name", "special_tokens", "runs"),
    [
        ("phi3_chat", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), ["cold<|end|>", "small<|end|>"]),
        ("llama2_chat", (), [" cold </s>", " small </s>"]),
        ("gemma", ("<start_of_turn>", "<end_of_turn>"), ["cold<end_of_turn>", "small<end_of_turn>"]),
    ],
)
def test_hf_masks_official_templates_that_decorate_the_last_turn_or_have_no_generation_prompt(
    tokenizer, name, special_tokens, runs
):
    family = tokenizer_with(tokenizer, *special_tokens, chat_template=official_chat_template(name))
    messages = [{"role": turn.role, "content": turn.content} for turn in TWO_TURNS.turns]
    encoded = encode(TWO_TURNS, get_template("hf"), family)
    assert encoded.input_ids == family.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert trained_runs(family, encoded) == runs


def test_hf_needs_a_chat_template(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(XtuneError, match="the tokenizer has no chat_template"):
        encode(TWO_TURNS, get_template("hf"), bare)


TOOLS = Conversation(
    (
        Turn("user", "Weather in Paris?"),
        Turn("assistant", "Let me look.", True, tool_calls=(ToolCall("get_weather", '{"city": "Paris"}'),)),
        Turn("tool", "sunny", name="get_weather"),
        Turn("assistant", "Sunny.", True),
    )
)


def test_tool_calls_are_trained_and_tool_results_are_not(tokenizer):
    internlm2 = encode(TOOLS, get_template("internlm2_chat"), tokenizer)
    assert trained_runs(tokenizer, internlm2) == [
        'Let me look.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        "<|action_end|><|im_end|>",
        "Sunny.<|im_end|>",
    ]
    qwen = encode(TOOLS, get_template("qwen_chat"), tokenizer)
    assert trained_runs(tokenizer, qwen) == [
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "Sunny.<|im_end|>",
    ]


any_text = st.text(max_size=16)


@st.composite
def conversations(draw):
    turns = [Turn("system", draw(any_text))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 4))):
        turns += [Turn("user", draw(any_text)), Turn("assistant", draw(any_text), trainable=draw(st.booleans()))]
    if draw(st.booleans()):
        turns.append(Turn("user", draw(any_text)))
    return Conversation(tuple(turns))


@settings(max_examples=150, deadline=None)
@given(conversations(), st.booleans())
def test_every_template_encodes_any_conversation_and_decodes_back_to_its_text(tokenizer, conversation, last_only):
    for name in [*TEMPLATES, "hf"]:
        template = get_template(name)
        encoded = encode(conversation, template, tokenizer, train_on_last_turn_only=last_only)
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(encoded.input_ids, encoded.labels)), name
        assert tokenizer.decode(encoded.input_ids) == rendered_text(conversation, template, tokenizer), name
        if not any(turn.trainable for turn in conversation.turns):
            assert encoded.num_trained == 0, name
    messages = [{"role": turn.role, "content": turn.content} for turn in conversation.turns]
    prompting = conversation.turns[-1].role == "user"
    official = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompting)["input_ids"]
    assert encode(conversation, get_template("hf"), tokenizer).input_ids == official


def test_encode_batch_equals_encode_one_by_one(tokenizer):
    from xtune.data.encode import encode_batch

    conversations = [
        TWO_TURNS,
        Conversation((Turn("user", "héllo wörld 😀"), Turn("assistant", "  spaced  ", True))),
        Conversation((Turn("assistant", "plain text for pretraining", True),), raw=True),
    ]
    for name in ("internlm2_chat", "qwen_chat", "llama3_chat", "hf"):
        template = get_template(name)
        for last_only in (False, True):
            expected = [encode(c, template, tokenizer, 40, last_only) for c in conversations]
            assert encode_batch(conversations, template, tokenizer, 40, last_only) == expected


def _wordless_bpe():
    """A BPE tokenizer that does not split words first (no pre-tokenizer): merges run across spaces, so a cut
    can change more than the word it falls in."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    from xtune.testing.tiny import CORPUS

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    special = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    alphabet = list("a汉字测试 \n")
    bpe.train_from_iterator(CORPUS.read_text().splitlines(), trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                                                                                 initial_alphabet=alphabet))  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


LONG_TEXTS = {
    "words": "the quick brown fox, jumps over 12 lazy dogs; " * 500,
    "one run": "a" * 20_000,
    "cjk": "汉字测试" * 5_000,
    "mixed": "".join(__import__("random").Random(0).choices("ab cd\n\t汉😀1.", k=20_000)),
}


@pytest.mark.parametrize("text", LONG_TEXTS.values(), ids=LONG_TEXTS.keys())
@pytest.mark.parametrize("which", ["byte-level", "wordless"])
def test_a_long_text_is_cut_before_tokenizing_with_the_tokens_of_the_whole(tokenizer, which, text):
    from xtune.data.encode import encode_batch, text_limit

    tokenizer = tokenizer if which == "byte-level" else _wordless_bpe()
    conversation = Conversation((Turn("user", "Write."), Turn("assistant", text, True), Turn("user", "more")))
    templates = ["internlm2_chat", "hf"] if which == "byte-level" else ["internlm2_chat"]
    limit = text_limit(tokenizer, 32)
    assert limit < len(text) // 4
    for name in templates:
        whole = encode(conversation, get_template(name), tokenizer)  # no max_length: nothing cut
        assert len(whole.input_ids) > 32
        cut = encode(conversation, get_template(name), tokenizer, 32)
        assert (cut.input_ids, cut.labels, cut.truncated) == (whole.input_ids[:32], whole.labels[:32], True)
        assert encode_batch([conversation], get_template(name), tokenizer, 32) == [cut]
    seen = []
    backend = tokenizer._tokenizer

    class Spy:
        def __getattr__(self, name):
            return getattr(backend, name)

        def __setattr__(self, name, value):
            setattr(backend, name, value)

        def encode_batch(self, texts, **kwargs):
            seen.extend(map(len, texts))
            return backend.encode_batch(texts, **kwargs)

    tokenizer._tokenizer = Spy()
    try:
        encode(conversation, get_template("internlm2_chat"), tokenizer, 32)
    finally:
        tokenizer._tokenizer = backend
    assert max(seen) == limit  # the long text was cut before the tokenizer saw it


def test_a_tokenizer_without_character_offsets_is_tokenized_segment_by_segment(tokenizer):
    """A Python tokenizer (no Rust backend, e.g. remote code) gives no character offsets: each rendered segment is
    then tokenized apart and labelled as a whole, as before token-exact encoding."""

    class NoOffsets:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            if name == "backend_tokenizer":
                raise AttributeError(name)
            return getattr(self._inner, name)

    template = get_template("internlm2_chat")
    encoded = encode(TWO_TURNS, template, NoOffsets(tokenizer))
    segments = render(TWO_TURNS, template, tokenizer)
    pieces = [(tokenizer.encode(text, add_special_tokens=False), trained) for text, trained in segments]
    assert encoded.input_ids == [token for ids, _ in pieces for token in ids]
    assert encoded.labels == [token if trained else IGNORE_INDEX for ids, trained in pieces for token in ids]
