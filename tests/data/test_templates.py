import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import openai_message, system_in_last_user_turn
from xtune.data.formats import Conversation, ToolCall, Turn
from xtune.data.templates import (
    TEMPLATES,
    TokenizerTemplate,
    generation_prompt,
    get_template,
    hf_stop_words,
    jinja_of,
    official_chat_template,
    render,
)
from xtune.errors import DataError, XtuneError

TWO_TURNS = Conversation(
    (
        Turn("system", "You are helpful."),
        Turn("user", "What is the opposite of hot?"),
        Turn("assistant", "cold", True),
        Turn("user", "And of big?"),
        Turn("assistant", "small", True),
    )
)

RENDERED = {
    "internlm2_chat": (
        "<s><|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWhat is the opposite of hot?<|im_end|>\n<|im_start|>assistant\ncold<|im_end|>\n"
        "<|im_start|>user\nAnd of big?<|im_end|>\n<|im_start|>assistant\nsmall<|im_end|>\n"
    ),
    "qwen_chat": (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWhat is the opposite of hot?<|im_end|>\n<|im_start|>assistant\ncold<|im_end|>\n"
        "<|im_start|>user\nAnd of big?<|im_end|>\n<|im_start|>assistant\nsmall<|im_end|>\n"
    ),
    "qwen3": (  # the first answer is written without a block, the last with an empty one
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWhat is the opposite of hot?<|im_end|>\n<|im_start|>assistant\ncold<|im_end|>\n"
        "<|im_start|>user\nAnd of big?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nsmall<|im_end|>\n"
    ),
    "yi_chat": (  # Yi-1.5: the system text bare
        "You are helpful.<|im_start|>user\nWhat is the opposite of hot?<|im_end|>\n<|im_start|>assistant\n"
        "cold<|im_end|>\n<|im_start|>user\nAnd of big?<|im_end|>\n<|im_start|>assistant\nsmall<|im_end|>\n"
    ),
    "llama2_chat": (
        "<s>[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nWhat is the opposite of hot? [/INST] cold </s>"
        "<s>[INST] And of big? [/INST] small </s>"
    ),
    "llama3_chat": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the opposite of hot?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\ncold<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd of big?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nsmall<|eot_id|>"
    ),
    "mistral": (
        "<s>[INST] You are helpful.\n\nWhat is the opposite of hot? [/INST]cold</s> "
        "[INST] And of big? [/INST]small</s> "
    ),
    "mixtral": (
        "<s>[INST] You are helpful.\n\nWhat is the opposite of hot? [/INST]cold</s>[INST] And of big? [/INST]small</s>"
    ),
    "mistral_v0_3": (  # the system text opens the last user turn
        "<s>[INST] What is the opposite of hot?[/INST] cold</s>[INST] You are helpful.\n\nAnd of big?[/INST] small</s>"
    ),
    "gemma": (
        "<bos><start_of_turn>user\nYou are helpful.\n\nWhat is the opposite of hot?<end_of_turn>\n"
        "<start_of_turn>model\ncold<end_of_turn>\n"
        "<start_of_turn>user\nAnd of big?<end_of_turn>\n<start_of_turn>model\nsmall<end_of_turn>\n"
    ),
    "phi3_chat": (
        "<s><|system|>\nYou are helpful.<|end|>\n<|user|>\nWhat is the opposite of hot?<|end|>\n"
        "<|assistant|>\ncold<|end|>\n<|user|>\nAnd of big?<|end|>\n<|assistant|>\nsmall<|end|>\n<|endoftext|>"
    ),
    "phi3_5": (  # Phi-3's without BOS
        "<|system|>\nYou are helpful.<|end|>\n<|user|>\nWhat is the opposite of hot?<|end|>\n"
        "<|assistant|>\ncold<|end|>\n<|user|>\nAnd of big?<|end|>\n<|assistant|>\nsmall<|end|>\n<|endoftext|>"
    ),
    "chatglm3": (
        "[gMASK]sop<|system|>\n You are helpful.<|user|>\n What is the opposite of hot?<|assistant|>\n cold"
        "<|user|>\n And of big?<|assistant|>\n small</s>"
    ),
    "glm4": (
        "[gMASK]<sop><|system|>\nYou are helpful.<|user|>\nWhat is the opposite of hot?<|assistant|>\ncold"
        "<|user|>\nAnd of big?<|assistant|>\nsmall<|endoftext|>"
    ),
    "deepseek_v2": (
        "<｜begin▁of▁sentence｜>You are helpful.\n\nUser: What is the opposite of hot?\n\nAssistant: cold"
        "<｜end▁of▁sentence｜>User: And of big?\n\nAssistant: small<｜end▁of▁sentence｜>"
    ),
    "vicuna": (
        "<s>You are helpful. USER: What is the opposite of hot? ASSISTANT: cold</s>"
        "USER: And of big? ASSISTANT: small</s>"
    ),
    "zephyr": (
        "<|system|>\nYou are helpful.</s>\n<|user|>\nWhat is the opposite of hot?</s>\n<|assistant|>\ncold</s>\n"
        "<|user|>\nAnd of big?</s>\n<|assistant|>\nsmall</s>\n"
    ),
    "default": (
        "<s><|System|>:You are helpful.\n<|User|>:What is the opposite of hot?\n<|Bot|>:cold</s>\n"
        "<|User|>:And of big?\n<|Bot|>:small</s>\n"
    ),
    "llama3_1": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nYou are helpful.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "What is the opposite of hot?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\ncold<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd of big?<|eot_id|><|start_header_id|>"
        "assistant<|end_header_id|>\n\nsmall<|eot_id|>"
    ),
    "phi4": (
        "<|im_start|>system<|im_sep|>You are helpful.<|im_end|><|im_start|>user<|im_sep|>"
        "What is the opposite of hot?<|im_end|><|im_start|>assistant<|im_sep|>cold<|im_end|><|im_start|>"
        "user<|im_sep|>And of big?<|im_end|><|im_start|>assistant<|im_sep|>small<|im_end|>"
    ),
    "deepseek_r1": (
        "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>What is the opposite of hot?<｜Assistant｜>"
        "cold<｜end▁of▁sentence｜><｜User｜>And of big?<｜Assistant｜><think>\n\n</think>\n\nsmall<｜end▁of▁sentence｜>"
    ),
    "deepseek_v3": (
        "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>What is the opposite of hot?<｜Assistant｜>"
        "cold<｜end▁of▁sentence｜><｜User｜>And of big?<｜Assistant｜>small<｜end▁of▁sentence｜>"
    ),
    "internlm_chat": (
        "<s><|System|>:You are helpful.\n<|User|>:What is the opposite of hot?<eoh>\n<|Bot|>:cold<eoa>\n<|User|>"
        ":And of big?<eoh>\n<|Bot|>:small<eoa>\n"
    ),
    "baichuan_chat": (
        "You are helpful.<reserved_102>What is the opposite of hot?<reserved_103>cold<reserved_102>"
        "And of big?<reserved_103>small</s>"
    ),
    "baichuan2_chat": (
        "You are helpful.<reserved_106>What is the opposite of hot?<reserved_107>cold<reserved_106>"
        "And of big?<reserved_107>small</s>"
    ),
    "chatglm2": (
        "[gMASK]sopYou are helpful.\n[Round 1]\n\n问：What is the opposite of hot?\n\n答：cold\n\n[Round 2]\n\n"
        "问：And of big?\n\n答：small\n\n</s>"
    ),
    "moss_sft": (
        "You are helpful.\n<|Human|>: What is the opposite of hot?<eoh>\n<|MOSS|>: cold<eom>\n<|Human|>"
        ": And of big?<eoh>\n<|MOSS|>: small<eom>\n"
    ),
    "code_llama_chat": (
        "<s>You are helpful.\n[INST] What is the opposite of hot? [/INST]cold</s>"
        "[INST] And of big? [/INST]small</s>"
    ),
    "deepseek_coder": (
        "<｜begin▁of▁sentence｜>You are helpful.### Instruction:\nWhat is the opposite of hot?\n### Response:\n"
        "cold\n<|EOT|>\n### Instruction:\nAnd of big?\n### Response:\nsmall\n<|EOT|>\n"
    ),
    "cohere_chat": (
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are helpful.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>What is the opposite of hot?<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>cold<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
        "<|USER_TOKEN|>And of big?<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
        "small<|END_OF_TURN_TOKEN|>"
    ),
    "minicpm": (
        "You are helpful.<用户>What is the opposite of hot?<AI>cold<用户>And of big?<AI>small</s>"
    ),
    "minicpm3": (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n"
        "What is the opposite of hot?<|im_end|>\n<|im_start|>assistant\ncold<|im_end|>\n<|im_start|>user\n"
        "And of big?<|im_end|>\n<|im_start|>assistant\nsmall<|im_end|>\n"
    ),
    "deepseek_moe": (
        "<｜begin▁of▁sentence｜>You are helpful.\n\nUser: What is the opposite of hot?\n\n"
        "Assistant: cold<｜end▁of▁sentence｜>User: And of big?\n\nAssistant: small<｜end▁of▁sentence｜>"
    ),
}

OFFICIAL = [
    "internlm2_chat", "qwen_chat", "llama2_chat", "llama3_chat", "mistral", "mixtral", "gemma", "phi3_chat", "zephyr",
    "deepseek_v2", "chatglm3", "qwen3", "llama3_1", "phi4", "deepseek_coder", "minicpm", "minicpm3", "phi3_5",
    "yi_chat", "glm4", "deepseek_v3", "mistral_v0_3",
]  # fmt: skip
WITHOUT_SYSTEM_ROLE = {"mistral", "mixtral"}
"""Their official jinja rejects a system turn."""


def text_of(conversation, template, tokenizer=None):
    return "".join(text for text, _ in render(conversation, template, tokenizer))


def messages(conversation):
    return [{"role": turn.role, "content": turn.content} for turn in conversation.turns]


def official(tokenizer, name, conversation, add_generation_prompt=False):
    text = tokenizer.apply_chat_template(
        messages(conversation),
        chat_template=official_chat_template(name),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    if name == "deepseek_v3":  # its jinja writes DeepSeek's EOS as text, not as eos_token (the same in its tokenizer)
        text = text.replace("<｜end▁of▁sentence｜>", tokenizer.eos_token)
    return text


QWEN_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
)


def official_as_xtune(tokenizer, name, conversation):
    """The official text with xtune's documented deviations: ChatGLM3's, GLM-4's and MiniCPM's conversations end
    with EOS (the GLMs' own fine-tuning code writes one, their jinja does not), qwen_chat writes no default system
    prompt, and mistral_v0_3 writes the system text into the last user turn also when an answer follows it."""
    prompting = conversation.turns[-1].role != "assistant"
    if name == "mistral_v0_3":
        conversation = system_in_last_user_turn(conversation)
    text = official(tokenizer, name, conversation, add_generation_prompt=prompting)
    if name in ("chatglm3", "glm4", "minicpm") and not prompting:  # GLM-4's and MiniCPM's jinja write no EOS either
        text += tokenizer.eos_token
    if name == "qwen_chat" and conversation.system is None:
        text = text.removeprefix(QWEN_DEFAULT_SYSTEM)
    return text


def test_every_template_has_a_pinned_rendering():
    assert set(RENDERED) == set(TEMPLATES)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_two_turns_with_a_system_prompt_render_exactly(name):
    assert text_of(TWO_TURNS, get_template(name)) == RENDERED[name]


@pytest.mark.parametrize("name", OFFICIAL)
def test_rendering_equals_the_official_jinja(tokenizer, name):
    conversation = replace(TWO_TURNS, turns=TWO_TURNS.turns[1:]) if name in WITHOUT_SYSTEM_ROLE else TWO_TURNS
    prompt = replace(conversation, turns=conversation.turns[:-1])
    template = get_template(name)
    assert text_of(conversation, template, tokenizer) == official_as_xtune(tokenizer, name, conversation)
    assert generation_prompt(prompt, template, tokenizer) == official(tokenizer, name, prompt, True)


stripped_text = st.text(min_size=1, max_size=12).map(str.strip).filter(bool)


@st.composite
def alternating_conversations(draw, text=stripped_text, system=True):
    turns = [Turn("system", draw(text))] if system and draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 4))):
        turns += [Turn("user", draw(text)), Turn("assistant", draw(text), trainable=True)]
    if draw(st.booleans()):
        turns.append(Turn("user", draw(text)))
    return Conversation(tuple(turns))


@settings(max_examples=200, deadline=None)
@given(alternating_conversations(), alternating_conversations(system=False))
def test_rendering_equals_the_official_jinja_for_random_conversations(tokenizer, conversation, without_system):
    for name in OFFICIAL:
        sample = without_system if name in WITHOUT_SYSTEM_ROLE else conversation
        assert text_of(sample, get_template(name), tokenizer) == official_as_xtune(tokenizer, name, sample), name


@settings(max_examples=100, deadline=None)
@given(alternating_conversations())
def test_qwen_chat_writes_the_plain_chatml_of_yi_6b_and_34b_chat(tokenizer, conversation):
    """Yi-6B/34B-Chat's jinja (yi_v1_chat.jinja) has no template of its own: it is qwen_chat's text."""
    assert text_of(conversation, get_template("qwen_chat"), tokenizer) == official_as_xtune(
        tokenizer, "yi_v1_chat", conversation
    )


def test_bos_and_eos_are_the_tokenizers_own_texts(tokenizer):
    assert text_of(TWO_TURNS, get_template("llama3_chat"), tokenizer).startswith("<s><|start_header_id|>system")
    assert text_of(TWO_TURNS, get_template("gemma"), tokenizer).startswith("<s><start_of_turn>user\n")
    assert text_of(TWO_TURNS, get_template("deepseek_v2"), tokenizer).endswith("Assistant: small</s>")


def test_families_without_a_system_role_open_the_first_user_turn_with_it():
    conversation = Conversation((Turn("system", "Be brief."), Turn("user", "Hi"), Turn("assistant", "Hello", True)))
    assert text_of(conversation, get_template("mistral")) == "<s>[INST] Be brief.\n\nHi [/INST]Hello</s> "
    assert text_of(conversation, get_template("gemma")) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
    )
    assert text_of(conversation, get_template("llama2_chat")) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s>"
    )


def test_mistral_v0_3_writes_the_system_text_where_its_jinja_prompts_for_the_last_answer(tokenizer):
    """Its jinja writes the system text into the last user turn only when the conversation ends there, so it drops
    it from a whole conversation; xtune trains with it where the jinja's prompt for the last answer has it."""
    template = get_template("mistral_v0_3")
    prompt = replace(TWO_TURNS, turns=TWO_TURNS.turns[:-1])
    assert generation_prompt(prompt, template, tokenizer) == official(tokenizer, "mistral_v0_3", prompt, True) == (
        "<s>[INST] What is the opposite of hot?[/INST] cold</s>[INST] You are helpful.\n\nAnd of big?[/INST]"
    )
    assert text_of(TWO_TURNS, template, tokenizer) == generation_prompt(prompt, template, tokenizer) + " small</s>"
    assert official(tokenizer, "mistral_v0_3", TWO_TURNS) == (
        "<s>[INST] What is the opposite of hot?[/INST] cold</s>[INST] And of big?[/INST] small</s>"
    )
    spaced = Conversation((Turn("system", " Be brief. "), Turn("user", " Hi \n"), Turn("assistant", "\nHello ", True)))
    assert text_of(spaced, template, tokenizer) == "<s>[INST]  Be brief. \n\n Hi \n[/INST] Hello</s>"  # answers trimmed
    assert text_of(spaced, template, tokenizer) == official_as_xtune(tokenizer, "mistral_v0_3", spaced)
    with pytest.raises(XtuneError, match="writes the system prompt into the next user turn, but no user turn follows"):
        render(Conversation((*TWO_TURNS.turns[1:3], Turn("system", "Late."))), template)
    generated = jinja_of(template)  # what `mistral_v0_3+react` is saved with
    for conversation in (TWO_TURNS, prompt, spaced):
        assert tokenizer.apply_chat_template(messages(conversation), chat_template=generated, tokenize=False) == (
            text_of(conversation, template, tokenizer)
        )


def test_a_system_prompt_without_a_user_turn_after_it_is_an_error_where_it_goes_into_one():
    conversation = Conversation((Turn("system", "Be brief."),))
    with pytest.raises(XtuneError, match="template 'gemma' writes the system prompt into the next user turn"):
        render(conversation, get_template("gemma"))


def test_an_empty_system_text_writes_no_system_turn_where_the_jinja_skips_it(tokenizer):
    conversation = Conversation((Turn("system", ""), Turn("user", "Hi"), Turn("assistant", "Hello", True)))
    official_text = official_as_xtune(tokenizer, "phi3_5", conversation)
    assert text_of(conversation, get_template("phi3_5"), tokenizer) == official_text
    assert text_of(conversation, get_template("phi3_5")).startswith("<|user|>\nHi<|end|>\n")
    assert text_of(conversation, get_template("phi3_chat")).startswith("<s><|system|>\n<|end|>\n<|user|>")
    assert text_of(conversation, get_template("glm4"), tokenizer) == official_as_xtune(tokenizer, "glm4", conversation)
    assert text_of(conversation, get_template("glm4")).startswith("[gMASK]<sop><|user|>")
    generated = jinja_of(get_template("phi3_5"))  # what a model trained with it would carry, had it no official one
    for system in ("", "Be brief."):
        prompt = Conversation((Turn("system", system), Turn("user", "Hi")))
        assert tokenizer.apply_chat_template(
            messages(prompt), chat_template=generated, tokenize=False, add_generation_prompt=True
        ) == generation_prompt(prompt, get_template("phi3_5"), tokenizer)


def test_vicuna_writes_its_own_system_prompt_when_there_is_none():
    conversation = Conversation((Turn("user", "Hi"), Turn("assistant", "Hello", True)))
    assert text_of(conversation, get_template("vicuna")) == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: Hello</s>"
    )


def test_templates_that_trim_like_their_jinja_strip_each_text():
    conversation = Conversation((Turn("user", "  Hi \n"), Turn("assistant", "\nHello  ", True)))
    assert text_of(conversation, get_template("llama3_chat")).endswith(
        "user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
    )
    assert text_of(conversation, get_template("qwen_chat")).endswith(
        "user\n  Hi \n<|im_end|>\n<|im_start|>assistant\n\nHello  <|im_end|>\n"
    )


def test_generation_prompt_ends_with_the_assistant_header():
    prompt = Conversation((Turn("user", "Hi"),))
    assert generation_prompt(prompt, get_template("llama3_chat")) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert generation_prompt(prompt, get_template("llama2_chat")) == "<s>[INST] Hi [/INST]"
    assert generation_prompt(prompt, get_template("deepseek_v2")) == "<｜begin▁of▁sentence｜>User: Hi\n\nAssistant:"
    assert generation_prompt(prompt, get_template("chatglm3")) == "[gMASK]sop<|user|>\n Hi<|assistant|>"
    assert generation_prompt(prompt, get_template("glm4")) == "[gMASK]<sop><|user|>\nHi<|assistant|>"


def test_bos_flag_says_whether_samples_start_with_bos():
    assert [name for name, template in TEMPLATES.items() if not template.bos] == [
        "qwen_chat", "qwen3", "yi_chat", "phi3_5", "chatglm3", "glm4", "phi4", "baichuan_chat", "baichuan2_chat",
        "chatglm2", "moss_sft", "minicpm", "minicpm3", "zephyr",
    ]  # fmt: skip


AGENT = Conversation(
    (
        Turn("system", "You may call tools."),
        Turn("user", "Weather in Paris?"),
        Turn("assistant", "Let me look.", True, tool_calls=(ToolCall("get_weather", '{"city": "Paris"}'),)),
        Turn("tool", '{"celsius": 22}', name="get_weather"),
        Turn("assistant", "It is 22 °C.", True),
    )
)


def test_internlm2_writes_tool_calls_as_actions_and_results_as_the_environment():
    assert text_of(AGENT, get_template("internlm2_chat")) == (
        "<s><|im_start|>system\nYou may call tools.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
        'Let me look.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        "<|action_end|><|im_end|>\n"
        '<|im_start|>environment name=<|plugin|>\n{"celsius": 22}<|im_end|>\n'
        "<|im_start|>assistant\nIt is 22 °C.<|im_end|>\n"
    )


def test_qwen_writes_tool_calls_and_results_as_qwen2_5_does(tokenizer):
    calls = (ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_time", "{}"))
    conversation = Conversation(
        (
            *AGENT.turns[:2],
            Turn("assistant", "", True, tool_calls=calls),
            Turn("tool", '{"celsius": 22}', name="get_weather"),
            Turn("tool", "12:00", name="get_time"),
            AGENT.turns[-1],
        )
    )
    expected = (
        "<|im_start|>system\nYou may call tools.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"celsius": 22}\n</tool_response>\n'
        "<tool_response>\n12:00\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is 22 °C.<|im_end|>\n"
    )
    assert text_of(conversation, get_template("qwen_chat")) == expected
    assert expected == tokenizer.apply_chat_template(
        [openai_message(turn) for turn in conversation.turns],
        chat_template=official_chat_template("qwen_chat"),
        tokenize=False,
    )
    assert text_of(AGENT, get_template("qwen_chat")).count("Let me look.\n<tool_call>\n") == 1


@pytest.mark.parametrize("name", [name for name, template in TEMPLATES.items() if template.tools is None])
def test_other_templates_refuse_tool_turns_by_name(name):
    with pytest.raises(XtuneError, match=f"template '{name}' does not support tool turns or tool calls yet"):
        render(AGENT, get_template(name))
    result_only = Conversation((Turn("user", "Hi"), Turn("tool", "42")))
    with pytest.raises(XtuneError, match=f"template '{name}' does not support tool turns"):
        render(result_only, get_template(name))


def test_tool_call_arguments_must_be_json():
    bad = Conversation((Turn("user", "Hi"), Turn("assistant", "", True, tool_calls=(ToolCall("f", "{oops"),))))
    with pytest.raises(DataError, match="tool call 'f': arguments must be JSON text"):
        render(bad, get_template("qwen_chat"))


def test_each_call_is_written_from_one_parse_of_its_arguments(monkeypatch):
    from xtune.data import templates

    parsed = []
    monkeypatch.setattr(templates, "_arguments", lambda call: parsed.append(call.name) or json.loads(call.arguments))
    qwen = get_template("qwen_chat")
    template = replace(qwen, tools=replace(qwen.tools, call="{call} | {name} | {arguments}"))
    calls = (ToolCall("f", '{"city": "Zürich"}'), ToolCall("g", "[1, 2]"))
    turns = (Turn("user", "Hi"), Turn("assistant", "", True, tool_calls=calls))
    assert text_of(Conversation(turns), template).endswith(
        '{"name": "f", "arguments": {"city": "Zürich"}} | f | {"city": "Zürich"}\n'
        '{"name": "g", "arguments": [1, 2]} | g | [1, 2]<|im_end|>\n'
    )
    assert parsed == ["f", "g"]


def test_hf_is_the_tokenizers_own_template(tokenizer):
    template = get_template("hf")
    assert isinstance(template, TokenizerTemplate) and template.name == "hf"
    assert text_of(TWO_TURNS, template, tokenizer) == RENDERED["internlm2_chat"]
    prompt = replace(TWO_TURNS, turns=TWO_TURNS.turns[:-1])
    assert generation_prompt(prompt, template, tokenizer) == tokenizer.apply_chat_template(
        messages(prompt), tokenize=False, add_generation_prompt=True
    )
    with pytest.raises(XtuneError, match="pass the tokenizer"):
        render(TWO_TURNS, template)


def test_hf_stop_words_are_the_eos_of_tokenizer_and_generation_config(tokenizer):
    class GenerationConfig:
        eos_token_id = [2, tokenizer.convert_tokens_to_ids("<|im_end|>")]

    assert hf_stop_words(tokenizer) == ("</s>",)
    assert hf_stop_words(tokenizer, GenerationConfig()) == ("</s>", "<|im_end|>")


def test_unknown_names_list_the_known_ones():
    with pytest.raises(XtuneError, match=r"unknown prompt template 'nope'; known: internlm2_chat, .*, default, .*hf\."):
        get_template("nope")
    with pytest.raises(XtuneError, match="no official chat template is carried for 'vicuna'"):
        official_chat_template("vicuna")


@pytest.mark.parametrize("name", [name for name, template in TEMPLATES.items() if not template.thinking or
                                  template.thinking.opening])  # fmt: skip
def test_the_jinja_saved_for_react_variants_prompts_as_render_does(tokenizer, name):
    """`NAME+react` is saved with a jinja made from the template's pieces: its prompts must be the training ones."""
    from xtune.data.templates import chat_template_jinja

    template = get_template(f"{name}+react")
    jinja = chat_template_jinja(f"{name}+react")
    for conversation in (Conversation((Turn("user", "hi"),)), replace(TWO_TURNS, turns=TWO_TURNS.turns[1:4])):
        if name in WITHOUT_SYSTEM_ROLE and conversation.system:
            continue
        rendered = tokenizer.apply_chat_template(messages(conversation), chat_template=jinja, tokenize=False)
        assert rendered == text_of(conversation, template, tokenizer), name


def test_chatglm2_numbers_a_react_observation_as_a_round_of_its_own():
    text = text_of(AGENT, get_template("chatglm2+react"))
    assert "[Round 1]\n\n问：Weather in Paris?" in text and '[Round 2]\n\n问：Observation: {"celsius": 22}' in text
