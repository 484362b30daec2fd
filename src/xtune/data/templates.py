"""Chat templates: how a model family writes a conversation as text, and which parts are trained.

Template strings write the family's BOS and EOS tokens as `{bos}` and `{eos}`. Rendered for a tokenizer, these are
that tokenizer's own BOS/EOS texts, so they encode to its special ids and not to byte pieces; rendered without one,
they are the family's (`bos_token`, `eos_token`).

Each template follows the family's official chat template (the jinja in its tokenizer_config.json, carried in
`jinja/` and checked against in the tests). XTuner's PROMPT_TEMPLATE is the reference for names and pieces; where it
differs from the official template, the comment at the template says how.

`get_template("hf")` renders with the tokenizer's own `chat_template` instead, and still trains only the
assistant's text.
"""

import json
import re
import string
from dataclasses import dataclass, replace
from importlib import resources
from itertools import groupby

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from xtune.data.formats import Conversation, ToolCall, Turn
from xtune.errors import DataError, XtuneError


@dataclass(frozen=True)
class ToolFormat:
    """How a family writes the tools offered, the assistant's tool calls and the tools' results."""

    name: str
    call: str
    """One call, with `{call}`: the JSON object {"name": ..., <arguments_key>: ...}; or with `{name}` and
    `{arguments}` (the arguments' JSON object)."""
    arguments_key: str
    call_separator: str
    """Between the assistant's text and its first call, and between calls."""
    result: str
    """One tool result, with `{content}`."""
    results: str | None
    """A run of consecutive tool results, with `{results}`; ends with the assistant's header. None: the run is
    written as a user turn of the template."""
    result_separator: str = ""
    thought: str = "{content}"
    """The assistant's text before its calls, with `{content}`; "" drops it (Llama 3.1's jinja writes a call alone)."""
    result_json: bool = False
    """Each result's text is written as a JSON string, quoted (Llama 3.1's jinja applies `tojson` to it)."""
    single_call: bool = False
    """An assistant turn makes one call at most; a turn with more is refused (Llama 3.1's jinja raises)."""
    tools_prompt: str = ""
    """The tools offered, with `{tools}` (and `{names}`, their names), written into the system text after a blank
    line (or as the whole system text when the conversation has none)."""
    tools_turn: str = ""
    """The tools offered as a turn of their own, with `{tools}`, written after the system turn."""
    tools_in_user: str = ""
    """The tools offered, with `{tools}` (and `{names}`), opening the first user turn's text (Llama 3.1's jinja)."""
    tools_before_last_user: str = ""
    """The tools offered, with `{tools}`, written just before the last user turn (Mistral v0.3's jinja)."""
    system: str = ""
    """The system turn, with `{system}`, written in place of the template's when tools are offered ("": the
    template's). It ties the format to its template (Llama 3.1's dated header, opened by `Environment: ipython`)."""
    calls: str = "{calls}"
    """A turn's calls, with `{calls}` (each call, joined by call_separator), after its thought."""
    assistant_prefix: str | None = None
    """Opens an assistant turn that makes calls, in place of the template's assistant_prefix (None: the template's);
    Mistral v0.3's calls follow [/INST] without the space its answers open with."""
    call_ids: str | None = None
    """A regular expression that each call's `id` and each result's `call_id` must match: the ids are written, each
    call's JSON object ending with its "id" and a result with `{call_id}` (Mistral v0.3's: 9 letters and digits).
    None: ids are not written."""
    tools_json: str = "tools_per_line"
    """How `{tools}` is written: a key of TOOL_LISTS."""
    stop_words: tuple[str, ...] = ()
    """Where a call ends: generation stops there, so that the model does not write the tool's result itself."""


@dataclass(frozen=True)
class Thinking:
    """How a family writes an assistant's reasoning ahead of its answer, and when."""

    block: str = "<think>\n{reasoning}\n</think>\n\n"
    """The reasoning (stripped of newlines at its ends) before the answer (stripped of newlines at its start)."""
    history: bool = True
    """Whether turns before the last user turn keep their reasoning. False (Qwen3, DeepSeek-R1): only the turns
    answering the last user turn are written with it; earlier answers are written without."""
    always_last: bool = False
    """The conversation's last turn, an answer, is written with a block, empty when it has no reasoning (Qwen3)."""
    switch: bool = False
    """The family's template takes `enable_thinking`; off, an empty block ends the generation prompt."""
    opening: str = ""
    """What of the block the generation prompt writes (DeepSeek-R1's `<think>\n`): written untrained in training."""
    strip_history: bool = True
    """An answer written without its reasoning loses the newlines after `</think>` (Qwen3's jinja); False keeps
    them (DeepSeek-R1's)."""


THINK_TAGS = ("<think>", "</think>")
"""What the reasoning is written between in an answer's content, where a record does not give it apart."""


@dataclass(frozen=True)
class ChatTemplate:
    """A family's chat format as pieces of text, rendered turn by turn."""

    name: str
    user: str
    """A user turn, with `{input}` (and `{round}`, its number from 1), ending with the assistant's header (the
    generation prompt)."""
    assistant_suffix: str
    """Closes an assistant turn; trained with it, so the model learns to stop."""
    system: str
    """The system turn, with `{system}`."""
    system_in_user: bool = False
    """The family has no system role: the formatted system text opens the next user turn's text."""
    system_in_last_user: bool = False
    """With system_in_user: the system text opens the last user turn's text instead (Mistral v0.3)."""
    default_system: str = ""
    """Written as the system turn when the conversation has none."""
    system_always: bool = False
    """The system turn is written, empty, when the conversation has none (Llama 3.1's dated header)."""
    skip_empty_system: bool = False
    """A system turn with an empty text is not written (Phi-3.5's and GLM-4's jinja skip it)."""
    assistant_prefix: str = ""
    """Opens every assistant turn's text, trained with it (e.g. Llama 2's space after [/INST])."""
    separator: str = ""
    """Written after each assistant turn, untrained."""
    prefix: str = ""
    """Written once at the start of every sample, untrained."""
    end_of_conversation: str = ""
    """Written after a conversation that ends with an assistant turn, trained with that turn."""
    strip_content: bool = False
    """Strip each turn's text as the official template does (`| trim`, `.strip()`); a system text written into the
    user turn is kept as it is, as those templates keep it."""
    strip_with_system: bool = False
    """With strip_content and system_in_user: strip the system text and the user's text joined, as Llama 2's jinja
    trims the two together (so a user text's leading spaces after a system prompt stay)."""
    strip_answers: bool = False
    """Strip each answer's text, and no other (Mistral v0.3's jinja trims the assistant's only)."""
    stop_words: tuple[str, ...] = ()
    """Generation stops at any of these, and always at the tokenizer's EOS."""
    tools: ToolFormat | None = None
    """How tool calls and results are written; None: the template cannot write them yet."""
    thinking: Thinking | None = None
    """How the family writes reasoning; None: a turn's reasoning is written as `Thinking().block` before its
    answer, and a `<think>` in its content stays text."""
    enable_thinking: bool = True
    """Off: no reasoning block is trained (each is written as on, as the family's jinja writes it), and a template
    with the switch ends its generation prompt with its empty block. A record's own `enable_thinking` decides for
    it."""
    train_on_thinking: bool = True
    """Off: the reasoning block of each trained answer is written but not trained; the answer after it is."""
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    """The family's BOS/EOS texts, written for `{bos}`/`{eos}` when rendering without a tokenizer."""

    @property
    def bos(self) -> bool:
        """Whether samples start with the BOS token."""
        return (self.prefix or self.user).startswith("{bos}")


@dataclass(frozen=True)
class TokenizerTemplate:
    """prompt_template = "hf": the tokenizer's own `chat_template` jinja, through `apply_chat_template`.

    Its stop words are empty by default: generation always stops at the tokenizer's EOS. `hf_stop_words` adds the
    EOS ids of the model's generation config, e.g. `replace(template, stop_words=hf_stop_words(tokenizer, config))`.
    """

    name: str = "hf"
    stop_words: tuple[str, ...] = ()
    enable_thinking: bool = True
    """Passed to the chat_template as `enable_thinking` (Qwen3's switch); a record's own decides for it."""
    train_on_thinking: bool = True
    """Off: a `<think>...</think>` block opening a trained answer is not trained."""


Template = ChatTemplate | TokenizerTemplate

Segment = tuple[str, bool]
"""A piece of rendered text and whether its tokens are trained."""


CHATML_SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n"
CHATML_USER = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"

# InternLM2's chat_format.md: the functions as an indented JSON list in a `system name=<|plugin|>` turn of their own
# (as lagent's Internlm2Protocol writes them), calls between <|action_start|><|plugin|> and <|action_end|>, results
# in `environment` turns.
INTERNLM2_TOOLS = ToolFormat(
    name="internlm2",
    call="<|action_start|><|plugin|>\n{call}<|action_end|>",
    arguments_key="parameters",
    call_separator="",
    result="<|im_start|>environment name=<|plugin|>\n{content}<|im_end|>\n",
    results="{results}<|im_start|>assistant\n",
    tools_turn="<|im_start|>system name=<|plugin|>\n{tools}\n<|im_end|>\n",
    tools_json="functions_indented",
    stop_words=("<|action_end|>",),
)
# Qwen2.5's jinja: the tools one JSON per line inside <tools></tools> after the system text; calls in <tool_call>,
# results in <tool_response> inside one user turn. Without a system turn the jinja writes Qwen's default system text
# before the tools; here, as for qwen_chat without tools, there is none (set `SYSTEM` to match a model's).
QWEN_TOOLS = ToolFormat(
    name="qwen",
    call="<tool_call>\n{call}\n</tool_call>",
    arguments_key="arguments",
    call_separator="\n",
    result="<tool_response>\n{content}\n</tool_response>",
    result_separator="\n",
    results=CHATML_USER.replace("{input}", "{results}"),
    tools_prompt=(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
        'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
    ),
    tools_json="tools_per_line",
    stop_words=("</tool_call>",),
)
# ReAct (Yao et al. 2023) as plain text, for families without a protocol of their own: the assistant writes
# "Thought: ...", then "Action: NAME" and "Action Input: {JSON}"; the results come back in a user turn as
# "Observation: ...". The tools are listed in the system text, one JSON function a line.
REACT_TOOLS = ToolFormat(
    name="react",
    call="Action: {name}\nAction Input: {arguments}",
    arguments_key="arguments",
    call_separator="\n",
    thought="Thought: {content}",
    result="Observation: {content}",
    result_separator="\n",
    results=None,
    tools_prompt=(
        "You can use these tools:\n{tools}\n\n"
        "To use a tool, answer in this format:\n"
        "Thought: what you need to do\nAction: the tool's name, one of [{names}]\n"
        "Action Input: the tool's arguments as a JSON object\n"
        'The result comes back as "Observation: ...". When you know the answer, write it without an Action.'
    ),
    tools_json="functions_per_line",
    stop_words=("Observation:",),
)
LLAMA3_1_DATE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
"""Llama 3.1's jinja opens its system text with these (its `date_string` default)."""
# Llama 3.1's jinja, for custom tools as it writes them by default (tools_in_user_message): the system turn announces
# "Environment: ipython"; the tools, each as indented JSON after an instruction, open the first user turn; an
# assistant turn is one call, {"name", "parameters"} alone (the jinja drops the turn's text and refuses more calls);
# each result is an `ipython` turn holding the result quoted as a JSON string, as the jinja's `tojson` writes a text.
# Its built-in tools (`<|python_tag|>` calls ending with <|eom_id|>) are not written. Not in TOOL_FORMATS: its system
# turn is llama3_1's.
LLAMA3_1_TOOLS = ToolFormat(
    name="llama3_1",
    call="{call}",
    arguments_key="parameters",
    call_separator="",
    thought="",
    result="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
    results="{results}<|start_header_id|>assistant<|end_header_id|>\n\n",
    result_json=True,
    single_call=True,
    tools_in_user=(
        "Given the following functions, please respond with a JSON for a function call with its proper arguments "
        'that best answers the given prompt.\n\nRespond in the format {{"name": function name, "parameters": '
        "dictionary of argument name and its value}}.Do not use variables.\n\n{tools}"
    ),
    tools_json="tools_each_indented",
    system=(
        "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n" + LLAMA3_1_DATE + "{system}<|eot_id|>"
    ),
)
# Mistral-7B-Instruct-v0.3's jinja: the tools as a JSON list in [AVAILABLE_TOOLS] just before the last user turn;
# a turn's calls as one JSON list after [TOOL_CALLS], each {"name", "arguments", "id"} with its 9-character id (the
# jinja raises on ids of another length, mistral-common on any but letters and digits), the turn's text dropped;
# each result in [TOOL_RESULTS] as {"content": ..., "call_id": ...}, the content written as it is, unquoted (where
# mistral-common quotes a text that is not JSON). Not in TOOL_FORMATS: its calls end with mistral_v0_3's EOS.
MISTRAL_V0_3_TOOLS = ToolFormat(
    name="mistral_v0_3",
    call="{call}",
    arguments_key="arguments",
    call_separator=", ",
    thought="",
    calls="[TOOL_CALLS] [{calls}]",
    assistant_prefix="",
    call_ids="[A-Za-z0-9]{9}",
    result='[TOOL_RESULTS] {{"content": {content}, "call_id": "{call_id}"}}[/TOOL_RESULTS]',
    results="{results}",
    tools_before_last_user="[AVAILABLE_TOOLS] {tools}[/AVAILABLE_TOOLS]",
    tools_json="mistral_v0_3",
)
TOOL_FORMATS = {"internlm2": INTERNLM2_TOOLS, "qwen": QWEN_TOOLS, "react": REACT_TOOLS}
"""Tool formats by name; `prompt_template = "NAME+FORMAT"` (e.g. "llama3_chat+react") picks one for a template."""


def _functions(tools: list[dict]) -> list[dict]:
    return [tool.get("function", tool) for tool in tools]


def _mistral_v0_3_tools(tools: list[dict]) -> str:
    """As Mistral v0.3's jinja writes them: a function's text fields as `"key": "text"`, unescaped, the others as
    JSON, its "return" left out, each function wrapped in {"type": "function", "function": {...}}."""

    def field(key: str, value) -> str:
        return f'"{key}": "{value}"' if isinstance(value, str) else f'"{key}": {json.dumps(value, ensure_ascii=False)}'

    functions = [", ".join(field(k, v) for k, v in function.items() if k != "return") for function in _functions(tools)]
    return "[" + ", ".join('{"type": "function", "function": {' + function + "}}" for function in functions) + "]"


TOOL_LISTS = {
    "tools_per_line": lambda tools: "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools),
    "functions_per_line": lambda tools: "\n".join(json.dumps(f, ensure_ascii=False) for f in _functions(tools)),
    "functions_indented": lambda tools: json.dumps(_functions(tools), ensure_ascii=False, indent=4),
    "tools_each_indented": lambda tools: "".join(json.dumps(t, ensure_ascii=False, indent=4) + "\n\n" for t in tools),
    "mistral_v0_3": _mistral_v0_3_tools,
}
"""How a ToolFormat writes the list of tools (OpenAI tool objects) for `{tools}`."""

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# The official generation prompt ends with "Assistant:" and an answer is written "Assistant: {answer}", so the space
# is the answer's (XTuner puts it in the prompt).
DEEPSEEK_V2 = ChatTemplate(
    name="deepseek_v2",
    prefix="{bos}",
    system="{system}\n\n",
    user="User: {input}\n\nAssistant:",
    assistant_prefix=" ",
    assistant_suffix="{eos}",
    bos_token="<｜begin▁of▁sentence｜>",
    eos_token="<｜end▁of▁sentence｜>",
)
BAICHUAN2_CHAT = ChatTemplate(
    name="baichuan2_chat",
    system="{system}",
    user="<reserved_106>{input}<reserved_107>",
    assistant_suffix="",
    end_of_conversation="{eos}",
)

TEMPLATES: dict[str, ChatTemplate] = {
    "internlm2_chat": ChatTemplate(
        name="internlm2_chat",
        prefix="{bos}",
        system=CHATML_SYSTEM,
        user=CHATML_USER,
        assistant_suffix="<|im_end|>",
        separator="\n",
        stop_words=("<|im_end|>",),
        tools=INTERNLM2_TOOLS,
    ),
    # Qwen2/2.5's jinja writes a default system prompt when there is none; which one changed between versions
    # (and Qwen3 has none), so this plain ChatML does not: set `system` in the config to match a model's.
    "qwen_chat": ChatTemplate(
        name="qwen_chat",
        system=CHATML_SYSTEM,
        user=CHATML_USER,
        assistant_suffix="<|im_end|>",
        separator="\n",
        stop_words=("<|im_end|>", "<|endoftext|>"),
        tools=QWEN_TOOLS,
        bos_token="",
        eos_token="<|endoftext|>",
    ),
    # Qwen3's jinja: Qwen2.5's ChatML and tools without a default system prompt, and thinking. Only the answers to
    # the last user turn keep their reasoning; the last answer is always written with a block, empty when it has no
    # reasoning (so a sample without reasoning trains "<think>\n\n</think>\n\n" before its answer). With
    # enable_thinking off, that empty block ends the generation prompt, and is written untrained in training.
    "qwen3": ChatTemplate(
        name="qwen3",
        system=CHATML_SYSTEM,
        user=CHATML_USER,
        assistant_suffix="<|im_end|>",
        separator="\n",
        stop_words=("<|im_end|>", "<|endoftext|>"),
        tools=QWEN_TOOLS,
        thinking=Thinking(history=False, always_last=True, switch=True),
        bos_token="",
        eos_token="<|im_end|>",
    ),
    # Yi-1.5's jinja: the system text bare (a first turn only; the jinja writes no later one, xtune does), then
    # ChatML's user and assistant turns, the assistant's header after every user turn (the jinja ignores
    # add_generation_prompt). XTuner has no Yi template. Yi-6B/34B-Chat's jinja is plain ChatML: qwen_chat's text.
    "yi_chat": ChatTemplate(
        name="yi_chat",
        system="{system}",
        user=CHATML_USER,
        assistant_suffix="<|im_end|>",
        separator="\n",
        stop_words=("<|im_end|>", "<|endoftext|>"),
        bos_token="<|startoftext|>",
        eos_token="<|im_end|>",
    ),
    # XTuner always writes Llama 2's long default safety prompt in a [INST] block of its own and a "\n" between
    # rounds; the official jinja puts the system text (if any) in the first [INST] and nothing between rounds.
    # The official jinja strips the first user text after the <<SYS>> block is put in front of it, so leading
    # whitespace of that text survives there; here every text is stripped.
    "llama2_chat": ChatTemplate(
        name="llama2_chat",
        system="<<SYS>>\n{system}\n<</SYS>>\n\n",
        system_in_user=True,
        user="{bos}[INST] {input} [/INST]",
        assistant_prefix=" ",
        assistant_suffix=" {eos}",
        strip_content=True,
        strip_with_system=True,
    ),
    "llama3_chat": ChatTemplate(
        name="llama3_chat",
        prefix="{bos}",
        system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user=(
            "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        assistant_suffix="<|eot_id|>",
        strip_content=True,
        stop_words=("<|eot_id|>", "<|end_of_text|>"),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
    ),
    # Mistral v0.1's jinja rejects a system turn; XTuner writes it as an [INST] block of its own. Here it opens the
    # first [INST] followed by a blank line, as Mistral's later templates do. XTuner writes "\n" between rounds;
    # the official jinja writes " " (Mistral) or nothing (Mixtral).
    "mistral": ChatTemplate(
        name="mistral",
        prefix="{bos}",
        system="{system}\n\n",
        system_in_user=True,
        user="[INST] {input} [/INST]",
        assistant_suffix="{eos}",
        separator=" ",
    ),
    "mixtral": ChatTemplate(
        name="mixtral",
        prefix="{bos}",
        system="{system}\n\n",
        system_in_user=True,
        user="[INST] {input} [/INST]",
        assistant_suffix="{eos}",
    ),
    # Mistral-7B-Instruct-v0.3's jinja (mistral-common's v3 tokenizer): no space before [/INST] and nothing between
    # rounds; each answer trimmed, after a space; the system text and a blank line open the last user turn; tools as
    # MISTRAL_V0_3_TOOLS says. The jinja writes the system text only when the conversation ends with that user turn,
    # so it drops it from a whole conversation (an answer last) and from a prompt after tool results; xtune writes
    # it into the last user turn always, as mistral-common does (the jinja's prompt for the last answer is a prefix
    # of the training text). The jinja compares messages by value, writing the tools before any earlier user turn
    # equal to the last one too; xtune writes them once, as mistral-common does.
    "mistral_v0_3": ChatTemplate(
        name="mistral_v0_3",
        prefix="{bos}",
        system="{system}\n\n",
        system_in_user=True,
        system_in_last_user=True,
        user="[INST] {input}[/INST]",
        assistant_prefix=" ",
        assistant_suffix="{eos}",
        strip_answers=True,
        tools=MISTRAL_V0_3_TOOLS,
    ),
    # Gemma has no system role. XTuner invents `<start_of_turn>system`; Gemma 1/2's jinja rejects a system turn;
    # Gemma 3's opens the first user turn with it and a blank line, which is what this does. XTuner also trains an
    # <eos> after <end_of_turn>, which the official template does not write.
    "gemma": ChatTemplate(
        name="gemma",
        prefix="{bos}",
        system="{system}\n\n",
        system_in_user=True,
        user="<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
        assistant_suffix="<end_of_turn>",
        separator="\n",
        strip_content=True,
        stop_words=("<end_of_turn>",),
        bos_token="<bos>",
        eos_token="<eos>",
    ),
    # The official jinja ends a conversation with EOS (XTuner does not).
    "phi3_chat": ChatTemplate(
        name="phi3_chat",
        prefix="{bos}",
        system="<|system|>\n{system}<|end|>\n",
        user="<|user|>\n{input}<|end|>\n<|assistant|>\n",
        assistant_suffix="<|end|>",
        separator="\n",
        end_of_conversation="{eos}",
        stop_words=("<|end|>",),
        eos_token="<|endoftext|>",
    ),
    # Phi-3.5-mini's jinja: Phi-3's format without BOS, and no system turn where the system text is empty. An EOS
    # ends a conversation, trained, as in phi3_chat (XTuner has no Phi-3.5 template).
    "phi3_5": ChatTemplate(
        name="phi3_5",
        system="<|system|>\n{system}<|end|>\n",
        skip_empty_system=True,
        user="<|user|>\n{input}<|end|>\n<|assistant|>\n",
        assistant_suffix="<|end|>",
        separator="\n",
        end_of_conversation="{eos}",
        stop_words=("<|end|>",),
        eos_token="<|endoftext|>",
    ),
    # ChatGLM3's own format writes "\n " after each role token and nothing between turns: the next role token ends
    # a turn. XTuner writes no space and an EOS and "\n" after every answer. Here the text is the official one, and
    # an EOS closes the conversation, trained, as ChatGLM3's own fine-tuning code does. The model must be given
    # ChatGLM3's tokenizer, which knows "[gMASK]", "sop" and the role tokens.
    "chatglm3": ChatTemplate(
        name="chatglm3",
        prefix="[gMASK]sop",
        system="<|system|>\n {system}",
        user="<|user|>\n {input}<|assistant|>",
        assistant_prefix="\n ",
        assistant_suffix="",
        end_of_conversation="{eos}",
        stop_words=("<|user|>", "<|observation|>"),
    ),
    # GLM-4-9B-Chat's jinja, for conversations without tools: "[gMASK]<sop>", then each turn as its role token, a
    # newline and its text, nothing between turns; the generation prompt is the role token alone. The jinja skips
    # every turn with an empty text; xtune skips an empty system text only. The model ends an answer at the next
    # role token (<|user|>, <|observation|>) or EOS: as in chatglm3, an EOS closes the conversation, trained
    # (GLM-4's fine-tuning demo trains it too, and also the role token after each earlier answer, which is not
    # trained here). XTuner has no GLM-4 template. glm-4-9b-chat-hf's own jinja was not checked against this one.
    "glm4": ChatTemplate(
        name="glm4",
        prefix="[gMASK]<sop>",
        system="<|system|>\n{system}",
        skip_empty_system=True,
        user="<|user|>\n{input}<|assistant|>",
        assistant_prefix="\n",
        assistant_suffix="",
        end_of_conversation="{eos}",
        stop_words=("<|user|>", "<|observation|>"),
        eos_token="<|endoftext|>",
    ),
    "deepseek_v2": DEEPSEEK_V2,
    # DeepSeek-MoE-16B-Chat's model card writes DeepSeek-LLM's "User: ...\n\nAssistant:" format, DeepSeek-V2's;
    # XTuner's deepseek_moe writes [INST] blocks instead.
    "deepseek_moe": replace(DEEPSEEK_V2, name="deepseek_moe"),
    # FastChat's vicuna_v1.1: the system text (Vicuna's own by default) replaces the default, and rounds follow
    # each other without a separator. XTuner appends the system text to the default one and writes "\n" between
    # rounds.
    "vicuna": ChatTemplate(
        name="vicuna",
        prefix="{bos}",
        system="{system} ",
        default_system=VICUNA_SYSTEM,
        user="USER: {input} ASSISTANT:",
        assistant_prefix=" ",
        assistant_suffix="{eos}",
    ),
    # Llama 3.1 / 3.2 / 3.3's jinja always writes the system turn, opened by a knowledge cut-off and a date (its
    # default "26 Jul 2024"); tools as LLAMA3_1_TOOLS says.
    "llama3_1": ChatTemplate(
        name="llama3_1",
        prefix="{bos}",
        system="<|start_header_id|>system<|end_header_id|>\n\n" + LLAMA3_1_DATE + "{system}<|eot_id|>",
        system_always=True,
        user=(
            "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        assistant_suffix="<|eot_id|>",
        strip_content=True,
        stop_words=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
        tools=LLAMA3_1_TOOLS,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
    ),
    # Phi-4 (14B): ChatML with <|im_sep|> after the role and nothing between turns.
    "phi4": ChatTemplate(
        name="phi4",
        system="<|im_start|>system<|im_sep|>{system}<|im_end|>",
        user="<|im_start|>user<|im_sep|>{input}<|im_end|><|im_start|>assistant<|im_sep|>",
        assistant_suffix="<|im_end|>",
        stop_words=("<|im_end|>",),
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
    ),
    # DeepSeek-R1 and its distills (Qwen, Llama): the generation prompt opens the think block, so an answer is
    # trained as the model writes it after that prompt: its reasoning, "</think>", the answer. The official jinja
    # drops the reasoning of every answer, the last too; xtune keeps the last's (answers before the last question
    # are written as the jinja writes them, untrained). The system text follows BOS bare.
    "deepseek_r1": ChatTemplate(
        name="deepseek_r1",
        prefix="{bos}",
        system="{system}",
        user="<｜User｜>{input}<｜Assistant｜>",
        assistant_suffix="{eos}",
        thinking=Thinking(history=False, always_last=True, opening="<think>\n", strip_history=False),
        bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>",
    ),
    # DeepSeek-V3's jinja: DeepSeek-R1's format without thinking (its generation prompt is "<｜Assistant｜>" alone, and
    # an answer is written whole). The jinja gathers every system text at the start, joined by blank lines; xtune
    # writes each system turn where it is. XTuner has no DeepSeek-V3 template.
    "deepseek_v3": ChatTemplate(
        name="deepseek_v3",
        prefix="{bos}",
        system="{system}",
        user="<｜User｜>{input}<｜Assistant｜>",
        assistant_suffix="{eos}",
        bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>",
    ),
    # InternLM (v1) chat, as XTuner and the model's first remote code write it (no jinja): <eoh> ends a question,
    # <eoa> an answer (the model's own EOS for chat). Its later remote code dropped <eoh>.
    "internlm_chat": ChatTemplate(
        name="internlm_chat",
        prefix="{bos}",
        system="<|System|>:{system}\n",
        user="<|User|>:{input}<eoh>\n<|Bot|>:",
        assistant_suffix="<eoa>",
        separator="\n",
        stop_words=("<eoa>",),
    ),
    # Baichuan and Baichuan 2 ship no chat_template: their generation code writes the system text, then a user token
    # (<reserved_102> / <reserved_106>, id 195 in Baichuan 2) before each question and an assistant token (id 196)
    # after it, nothing between rounds. An EOS closes the conversation, trained, as their fine-tuning code writes
    # it. XTuner writes "\n" after the system text and an EOS and "\n" after every answer.
    "baichuan_chat": replace(BAICHUAN2_CHAT, name="baichuan_chat", user="<reserved_102>{input}<reserved_103>"),
    "baichuan2_chat": BAICHUAN2_CHAT,
    # ChatGLM2's build_prompt: numbered rounds of 问/答 with "\n\n" after each answer; no jinja. An EOS closes the
    # conversation, trained (XTuner writes one after every answer). The system text (XTuner's) opens the first round.
    "chatglm2": ChatTemplate(
        name="chatglm2",
        prefix="[gMASK]sop",
        system="{system}\n",
        user="[Round {round}]\n\n问：{input}\n\n答：",
        assistant_suffix="\n\n",  # trained: the last answer ends "\n\n" + EOS, which the model must write
        end_of_conversation="{eos}",
    ),
    # MOSS-003's format (its README; no jinja): "<|MOSS|>:" opens the answer and <eom> ends it. XTuner's moss_sft
    # leaves "<|MOSS|>:" to the data; here the generation prompt writes it, so plain answers chat as MOSS does.
    "moss_sft": ChatTemplate(
        name="moss_sft",
        system="{system}\n",
        user="<|Human|>: {input}<eoh>\n<|MOSS|>:",
        assistant_prefix=" ",
        assistant_suffix="<eom>",
        separator="\n",
        stop_words=("<eoc>", "<eom>"),
    ),
    # Code Llama - Instruct, as XTuner writes it: [INST] blocks, the system text on a line before the first, EOS
    # after each answer.
    "code_llama_chat": ChatTemplate(
        name="code_llama_chat",
        prefix="{bos}",
        system="{system}\n",
        user="[INST] {input} [/INST]",
        assistant_suffix="{eos}",
    ),
    # DeepSeek-Coder-Instruct's jinja: its default system prompt when there is none, "### Instruction:" and
    # "### Response:" blocks, <|EOT|> after each answer.
    "deepseek_coder": ChatTemplate(
        name="deepseek_coder",
        prefix="{bos}",
        system="{system}",
        default_system=(
            "You are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek Company, "
            "and you only answer questions related to computer science. For politically sensitive questions, "
            "security and privacy issues, and other non-computer science questions, you will refuse to answer\n"
        ),
        user="### Instruction:\n{input}\n### Response:\n",
        assistant_suffix="\n<|EOT|>",
        separator="\n",
        stop_words=("<|EOT|>",),
        bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<|EOT|>",
    ),
    # Command-R (v01, 08-2024), as XTuner writes it; Command-R7B's jinja (a long default preamble) is `hf`.
    "cohere_chat": ChatTemplate(
        name="cohere_chat",
        prefix="{bos}",
        system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>",
        user=(
            "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{input}<|END_OF_TURN_TOKEN|>"
            "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
        ),
        assistant_suffix="<|END_OF_TURN_TOKEN|>",
        stop_words=("<|END_OF_TURN_TOKEN|>",),
        bos_token="<BOS_TOKEN>",
        eos_token="<|END_OF_TURN_TOKEN|>",
    ),
    # MiniCPM (2B)'s jinja: <用户> and <AI> with each text stripped, nothing between turns, the system text bare.
    # The jinja writes no EOS; an EOS closes the conversation, trained (XTuner writes "\n" between rounds).
    "minicpm": ChatTemplate(
        name="minicpm",
        system="{system}",
        user="<用户>{input}<AI>",
        assistant_suffix="",
        end_of_conversation="{eos}",
        strip_content=True,
    ),
    # MiniCPM3: ChatML, as XTuner and its jinja (for conversations without tools) write it.
    "minicpm3": ChatTemplate(
        name="minicpm3",
        system=CHATML_SYSTEM,
        user=CHATML_USER,
        assistant_suffix="<|im_end|>",
        separator="\n",
        stop_words=("<|im_end|>", "<|endoftext|>"),
        bos_token="<s>",
        eos_token="<|im_end|>",
    ),
    # XTuner writes no EOS after the system and user texts, unlike the official jinja.
    "zephyr": ChatTemplate(
        name="zephyr",
        system="<|system|>\n{system}{eos}\n",
        user="<|user|>\n{input}{eos}\n<|assistant|>\n",
        assistant_suffix="{eos}",
        separator="\n",
    ),
    "default": ChatTemplate(
        name="default",
        prefix="{bos}",
        system="<|System|>:{system}\n",
        user="<|User|>:{input}\n<|Bot|>:",
        assistant_suffix="{eos}",
        separator="\n",
    ),
}


def get_template(name: str) -> Template:
    """The template of that name; "NAME+FORMAT" is template NAME writing tools in TOOL_FORMATS[FORMAT]."""
    base, plus, tool_format = name.partition("+")
    if base == "hf":
        if plus:
            raise XtuneError(f"prompt template '{name}': 'hf' writes tools as the tokenizer's chat_template does.")
        return TokenizerTemplate()
    if base not in TEMPLATES:
        raise XtuneError(f"unknown prompt template '{base}'; known: {', '.join(TEMPLATES)}, hf.")
    return with_tool_format(TEMPLATES[base], tool_format) if plus else TEMPLATES[base]


def with_tool_format(template: ChatTemplate, tool_format: str) -> ChatTemplate:
    """The template writing tools, calls and results in TOOL_FORMATS[tool_format], e.g. "react" for a family that
    has no protocol of its own; the template's name becomes "NAME+FORMAT"."""
    if tool_format not in TOOL_FORMATS:
        raise XtuneError(f"unknown tool format '{tool_format}'; known: {', '.join(TOOL_FORMATS)}.")
    base = template.name.partition("+")[0]
    return replace(template, name=f"{base}+{tool_format}", tools=TOOL_FORMATS[tool_format])


def official_chat_template(name: str) -> str:
    """The chat_template jinja of the family's tokenizer_config.json, for the templates that carry one."""
    path = resources.files(__package__) / "jinja" / f"{name}.jinja"
    if not path.is_file():
        raise XtuneError(f"no official chat template is carried for '{name}'.")
    return path.read_text(encoding="utf-8").removesuffix("\n")


def render(
    conversation: Conversation, template: Template, tokenizer: PreTrainedTokenizerBase | None = None
) -> list[Segment]:
    """The conversation as text segments in order, each marked trained or not.

    `{bos}`/`{eos}` become the tokenizer's BOS/EOS texts when a tokenizer is given, else the family's. A raw
    conversation is BOS + text + EOS whatever the template, all but BOS trained. A conversation that ends with a
    user or tool turn ends with the assistant's header.
    """
    if isinstance(template, TokenizerTemplate) and tokenizer is None:
        raise XtuneError("prompt template 'hf' renders with the tokenizer's chat_template; pass the tokenizer.")
    bos, eos = _bos_eos(template, tokenizer)
    if conversation.raw:
        return _drop_empty([(bos, False), ("".join(turn.content for turn in conversation.turns) + eos, True)])
    if isinstance(template, TokenizerTemplate):
        return _render_with_chat_template(conversation, template, tokenizer)
    return _render_turns(conversation, template, bos, eos)


def generation_prompt(
    conversation: Conversation, template: Template, tokenizer: PreTrainedTokenizerBase | None = None
) -> str:
    """The text the model continues to write the next assistant turn, BOS included; the conversation ends with a
    user (or tool) turn."""
    return "".join(text for text, _ in render(conversation, template, tokenizer))


def hf_stop_words(tokenizer: PreTrainedTokenizerBase, generation_config=None) -> tuple[str, ...]:
    """Stop words for prompt_template "hf": the tokenizer's EOS and the EOS ids of the generation config."""
    ids = getattr(generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or ())
    words = [tokenizer.eos_token, *tokenizer.convert_ids_to_tokens(ids)]
    return tuple(dict.fromkeys(word for word in words if word))


def _bos_eos(template: Template, tokenizer: PreTrainedTokenizerBase | None) -> tuple[str, str]:
    if tokenizer is None:
        return template.bos_token, template.eos_token
    return tokenizer.bos_token or "", tokenizer.eos_token or ""


def _render_turns(conversation: Conversation, template: ChatTemplate, bos: str, eos: str) -> list[Segment]:
    rounds = 0  # user turns so far: `{round}`

    def fill(text: str, **fields: str) -> str:
        return text.format(bos=bos, eos=eos, **{"round": str(rounds), **fields})

    turns = _with_default_system(conversation.turns, template)
    tools_turn = tools_in_user = tools_before_last_user = ""
    if conversation.tools:
        turns, tools_turn, tools_in_user, tools_before_last_user = _with_tools(turns, conversation.tools, template)
        if template.tools.system:
            template = replace(template, system=template.tools.system)
    thinking = _thinking_on(conversation, template)
    last_user = max((index for index, turn in enumerate(turns) if turn.role == "user"), default=-1)
    segments: list[Segment] = [(fill(template.prefix), False)]
    pending_system = ""
    for is_tool, run in groupby(enumerate(turns), key=lambda item: item[1].role == "tool"):
        if is_tool:
            rounds += _tool_format(template).results is None  # the results are written as a user turn
            segments.append((_tool_results([turn for _, turn in run], template, fill), False))
            continue
        for index, turn in run:
            if turn.role == "system" and not turn.content and template.skip_empty_system:
                continue
            if turn.role != "system" and tools_turn:
                segments.append((tools_turn, False))
                tools_turn = ""
            if turn.role == "system" and template.system_in_user:
                pending_system += fill(template.system, system=turn.content)
            elif turn.role == "system":
                segments.append((fill(template.system, system=_text(turn, template)), False))
            elif turn.role == "user":
                writes_system = index == last_user or not template.system_in_last_user
                system = pending_system if writes_system else ""
                joined = template.strip_with_system and template.strip_content
                text = (system + turn.content).strip() if joined else system + _text(turn, template)
                rounds += 1
                if index == last_user:
                    segments.append((tools_before_last_user, False))
                    tools_before_last_user = ""
                segments.append((fill(template.user, input=tools_in_user + text, round=str(rounds)), False))
                pending_system = "" if writes_system else pending_system
                tools_in_user = ""
            else:
                segments += _answer(turn, template, fill, thinking, index > last_user, index == len(turns) - 1)
    if pending_system:
        raise XtuneError(
            f"template '{template.name}' writes the system prompt into the next user turn, but no user turn follows it."
        )
    if tools_in_user or tools_before_last_user:
        where = "into the first user turn" if tools_in_user else "before the last user turn"
        raise XtuneError(f"template '{template.name}' writes the tools offered {where}; it has none.")
    if turns and turns[-1].role == "assistant":
        segments.append((fill(template.end_of_conversation), turns[-1].trainable))
    elif turns and not thinking and template.thinking and template.thinking.switch:
        segments.append((template.thinking.block.format(reasoning=""), False))  # the prompt's empty block
    elif turns and template.thinking:
        segments.append((template.thinking.opening, False))
    return _drop_empty(segments)


def _answer(turn: Turn, template: ChatTemplate, fill, thinking: bool, answers_last_query: bool, last: bool):
    """An assistant turn's segments. It is trained only where it is written as the model would write it as the
    last answer: an answer whose reasoning the template drops (Qwen3's history) is context."""
    block, answer = _block_and_answer(turn, template, answers_last_query, last)
    written_as_last = block == _block_and_answer(turn, template, True, True)[0]
    trained = turn.trainable and written_as_last
    opening = template.thinking.opening if template.thinking and block else ""
    prefix = template.assistant_prefix
    if turn.tool_calls and template.tools and template.tools.assistant_prefix is not None:
        prefix = template.tools.assistant_prefix
    return [
        (fill(prefix), trained),
        (opening, False),  # the generation prompt's
        (block.removeprefix(opening), trained and thinking and template.train_on_thinking),
        (_assistant_text(answer, template) + fill(template.assistant_suffix), trained),
        (fill(template.separator), False),
    ]


def _thinking_on(conversation: Conversation, template: Template) -> bool:
    return template.enable_thinking if conversation.enable_thinking is None else conversation.enable_thinking


def _block_and_answer(turn: Turn, template: ChatTemplate, answers_last_query: bool, last: bool):
    """(the reasoning block written before the answer, the turn with the answer as its content), as the family's
    template writes them; the block is "" where it writes none."""
    thinking = template.thinking or Thinking()
    reasoning, answer = turn.reasoning, turn.content
    if reasoning is None and template.thinking and THINK_TAGS[1] in answer:  # as Qwen3's jinja reads the content
        reasoning = answer.split(THINK_TAGS[1])[0].rstrip("\n").split(THINK_TAGS[0])[-1].lstrip("\n")
        answer = answer.split(THINK_TAGS[1])[-1]
        answer = answer.lstrip("\n") if thinking.strip_history else answer
    written = thinking.history or answers_last_query
    if not (written and (reasoning or (last and thinking.always_last))):
        return "", replace(turn, content=answer)
    return thinking.block.format(reasoning=(reasoning or "").strip("\n")), replace(turn, content=answer.lstrip("\n"))


def _with_default_system(turns: tuple[Turn, ...], template: ChatTemplate) -> tuple[Turn, ...]:
    if not (template.default_system or template.system_always) or any(turn.role == "system" for turn in turns):
        return turns
    return (Turn("system", template.default_system), *turns)


def _with_tools(
    turns: tuple[Turn, ...], tools: tuple[str, ...], template: ChatTemplate
) -> tuple[tuple[Turn, ...], str, str, str]:
    """(turns with the tools written into the system text, the tools' own turn, the text opening the first user
    turn, the text before the last user turn), as the tool format writes them."""
    tool_format = _tool_format(template, "cannot write the tools offered (the record's 'tools') yet")
    schemas = [_tool_schema(tool) for tool in tools]
    listed = TOOL_LISTS[tool_format.tools_json](schemas)
    names = ", ".join(function.get("name", "") for function in _functions(schemas))
    if tool_format.tools_prompt:
        prompt = tool_format.tools_prompt.format(tools=listed, names=names)
        if turns and turns[0].role == "system":
            turns = (replace(turns[0], content=f"{turns[0].content}\n\n{prompt}"), *turns[1:])
        else:
            turns = (Turn("system", prompt), *turns)
    in_user = tool_format.tools_in_user.format(tools=listed, names=names)
    before_last_user = tool_format.tools_before_last_user.format(tools=listed)
    return turns, tool_format.tools_turn.format(tools=listed), in_user, before_last_user


def _tool_schema(text: str) -> dict:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"a tool offered must be the JSON text of a tool schema, got {text[:40]!r} ({error})") from None
    if not isinstance(schema, dict):
        raise DataError(f"a tool offered must be a JSON object, got {text[:40]!r}")
    return schema


def _text(turn: Turn, template: ChatTemplate) -> str:
    return turn.content.strip() if template.strip_content else turn.content


def _assistant_text(turn: Turn, template: ChatTemplate) -> str:
    text = turn.content.strip() if template.strip_answers else _text(turn, template)
    if not turn.tool_calls:
        return text
    tools = _tool_format(template)
    if tools.single_call and len(turn.tool_calls) > 1:
        names = ", ".join(call.name for call in turn.tool_calls)
        raise DataError(
            f"template '{template.name}' writes one tool call per assistant turn, as its family's template does; this "
            f"turn makes {len(turn.tool_calls)} ({names}): give each call an assistant turn of its own, followed by "
            "its result."
        )
    calls = tools.calls.format(calls=tools.call_separator.join(_call_text(call, tools) for call in turn.tool_calls))
    thought = tools.thought.format(content=text) if text else ""
    return tools.call_separator.join([thought, calls]) if thought else calls


def _call_text(call: ToolCall, tools: ToolFormat) -> str:
    arguments = _arguments(call)
    fields = {"name": call.name, tools.arguments_key: arguments}
    if tools.call_ids is not None:
        fields["id"] = _call_id(call.id, tools, f"tool call '{call.name}'")
    call_json = json.dumps(fields, ensure_ascii=False)
    return tools.call.format(call=call_json, name=call.name, arguments=json.dumps(arguments, ensure_ascii=False))


def _call_id(call_id: str | None, tools: ToolFormat, what: str) -> str:
    """The id as the tool format writes it ("" where it writes none); one that does not fit is refused."""
    if tools.call_ids is None:
        return ""
    if call_id is None or not re.fullmatch(tools.call_ids, call_id):
        raise DataError(
            f"{what} has id {call_id!r}; tool format '{tools.name}' writes ids matching {tools.call_ids}: give each "
            "call such an id (tool_calls[].id) and each tool result the id of its call (tool_call_id)."
        )
    return call_id


def _tool_results(turns: list[Turn], template: ChatTemplate, fill) -> str:
    tools = _tool_format(template)
    results = tools.result_separator.join(
        tools.result.format(
            content=json.dumps(turn.content, ensure_ascii=False) if tools.result_json else turn.content,
            call_id=_call_id(turn.call_id, tools, f"the result of '{turn.name or 'a tool'}'"),
        )
        for turn in turns
    )
    if tools.results is None:
        return fill(template.user, input=results)
    return tools.results.format(results=results)


def _tool_format(template: ChatTemplate, refusal: str = "does not support tool turns or tool calls yet") -> ToolFormat:
    """The template's tool format; a template without one is refused with `refusal`, saying what it cannot do."""
    if template.tools is None:
        writing = ", ".join(name for name, each in TEMPLATES.items() if each.tools is not None)
        raise XtuneError(
            f"template '{template.name}' {refusal}; use one that does ({writing}) or hf for agent data, or write "
            f"them in ReAct style: prompt_template = \"{template.name}+react\"."
        )
    return template.tools


def _arguments(call: ToolCall):
    try:
        return json.loads(call.arguments)
    except json.JSONDecodeError as error:
        message = f"tool call '{call.name}': arguments must be JSON text, got {call.arguments!r} ({error})"
        raise DataError(message) from None


def _drop_empty(segments: list[Segment]) -> list[Segment]:
    return [(text, trained) for text, trained in segments if text]


PROBE = {"role": "user", "content": "?"}


def _render_with_chat_template(
    conversation: Conversation, template: TokenizerTemplate, tokenizer: PreTrainedTokenizerBase
) -> list[Segment]:
    """The tokenizer's rendering, cut where each trained assistant turn starts and ends.

    Turn i starts after the tokens that turns[:i] render to with the generation prompt (the assistant's header),
    and ends after the tokens that the whole, turns[:i+1], and turns[:i+1] followed by a probe user turn all
    share (the whole and turns[:i+1] where the probe changes the turn itself). Comparing tokens of these renderings
    rather than text copes with templates that write something after the last turn only (e.g. an EOS) or that have
    no generation prompt. Whitespace tokens at the end of a turn
    (the separator before the next one) are not trained; nor, with train_on_thinking off, a `<think>...</think>`
    block opening an answer. Reasoning given apart goes to the jinja as `reasoning_content`, and enable_thinking as
    `enable_thinking`.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise XtuneError("prompt template 'hf': the tokenizer has no chat_template; pick a named prompt template.")
    if not getattr(tokenizer, "is_fast", False):
        raise XtuneError("prompt template 'hf' needs a fast tokenizer (tokenizer.json); pick a named prompt template.")
    if not conversation.turns:
        return []
    messages = [_message(turn) for turn in conversation.turns]
    tools = [json.loads(schema) for schema in conversation.tools] or None
    thinking = _thinking_on(conversation, template)

    switch = {} if thinking and conversation.enable_thinking is None else {"enable_thinking": thinking}

    def _apply(messages: list[dict], add_generation_prompt: bool) -> str:
        return _apply_chat_template(tokenizer, messages, tools, add_generation_prompt, switch)

    text = _apply(messages, add_generation_prompt=messages[-1]["role"] != "assistant")
    if any(turn.reasoning for turn in conversation.turns) and not _writes_reasoning(tokenizer):
        raise DataError(
            "prompt template 'hf': the tokenizer's chat_template does not write reasoning_content, so the record's "
            "reasoning would be lost; write it into the answer as <think>...</think>, or use a named template (it "
            "writes reasoning given apart as a <think> block)."
        )
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, ends = encoding["input_ids"], [end for _, end in encoding["offset_mapping"]]
    spans = []
    for index, turn in enumerate(conversation.turns):
        if turn.role != "assistant" or not turn.trainable:
            continue
        prefix = _ids(tokenizer, _apply(messages[:index], True)) if index else []
        alone = _ids(tokenizer, _apply(messages[: index + 1], False))
        try:
            followed = _ids(tokenizer, _apply([*messages[: index + 1], PROBE], False))
        except XtuneError:  # a template that wants a call's results after it (Mistral v0.3's) refuses the probe
            followed = alone
        first, last = _shared_length(ids, prefix), _shared_length(ids, alone, followed)
        if last <= first:  # the probe changed the turn itself (Qwen3 drops the thinking of answers before a question)
            last = _shared_length(ids, alone)
        while last > first and text[_token_start(ends, last - 1) : ends[last - 1]].isspace():
            last -= 1
        if not (template.train_on_thinking and thinking):
            first = _after_think_block(text, ends, first, last)
        if last > first:
            spans.append((_token_start(ends, first), ends[last - 1]))
    return _cut(text, spans)


def _writes_reasoning(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat_template writes an answer's `reasoning_content` (Qwen3's, DeepSeek-V3.1's do)."""
    probe = [PROBE, {"role": "assistant", "content": "answer", "reasoning_content": "xtune-reasoning-probe"}]
    try:
        return "xtune-reasoning-probe" in _apply_chat_template(tokenizer, probe, None, False, {})
    except XtuneError:
        return False


def _after_think_block(text: str, ends: list[int], first: int, last: int) -> int:
    """The first token after the `<think>...</think>` block (and the whitespace after it) that tokens first..last
    open with or start inside (a generation prompt may open it), or `first` where they have none."""
    start, end = _token_start(ends, first), ends[last - 1]
    close = text.find(THINK_TAGS[1], start, end)
    opening = text.rfind(THINK_TAGS[0], 0, close) if close >= 0 else -1
    if opening < 0 or (text[start:opening].strip() if opening >= start else THINK_TAGS[1] in text[opening:start]):
        return first
    closed = close + len(THINK_TAGS[1])
    closed += len(text[closed:end]) - len(text[closed:end].lstrip())
    while first < last and ends[first] <= closed:
        first += 1
    return first


def _message(turn: Turn) -> dict:
    message = {"role": turn.role, "content": turn.content}
    if turn.reasoning is not None:
        message["reasoning_content"] = turn.reasoning
    if turn.tool_calls:
        message["tool_calls"] = [
            {"type": "function", "function": {"name": call.name, "arguments": _arguments(call)},
             **({"id": call.id} if call.id is not None else {})}
            for call in turn.tool_calls
        ]  # fmt: skip
    if turn.name is not None:
        message["name"] = turn.name
    if turn.call_id is not None:
        message["tool_call_id"] = turn.call_id
    return message


def _apply_chat_template(tokenizer, messages: list[dict], tools, add_generation_prompt: bool, switch: dict) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **switch
        )
    except TemplateError as error:
        message = f"prompt template 'hf': the tokenizer's chat_template rejects this conversation: {error}"
        raise XtuneError(message) from None


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _shared_length(*sequences: list[int]) -> int:
    length = 0
    for tokens in zip(*sequences):
        if len(set(tokens)) > 1:
            break
        length += 1
    return length


def _token_start(ends: list[int], index: int) -> int:
    """Where token `index` starts: where the one before it ends (offsets may leave out a leading space)."""
    return ends[index - 1] if index else 0


def _cut(text: str, spans: list[tuple[int, int]]) -> list[Segment]:
    segments: list[Segment] = []
    position = 0
    for start, end in spans:
        segments += [(text[position:start], False), (text[start:end], True)]
        position = end
    segments.append((text[position:], False))
    return _drop_empty(segments)


SAVED_AS_OFFICIAL = set(TEMPLATES) - {"qwen_chat", "mistral", "mixtral"}
"""Templates whose prompts equal their family's official jinja for every conversation xtune writes (the tests
check it). Not so: qwen_chat (the official jinja adds Qwen's default system prompt, which xtune does not train
with), mistral and mixtral (their jinja refuses the system turn xtune writes as an [INST] block). mistral_v0_3's
jinja drops the system text from a prompt after tool results (see the template); it is saved all the same, as the
only jinja that writes its tools."""


def chat_template_jinja(name: str) -> str:
    """The `chat_template` to save with a model trained with template `name`: the family's official jinja where
    it writes the same prompts, else one generated from the template's pieces (`jinja_of`)."""
    template = get_template(name)
    if isinstance(template, TokenizerTemplate):
        raise XtuneError("prompt template 'hf' is the tokenizer's own chat_template; there is nothing to write.")
    if name in SAVED_AS_OFFICIAL and (resources.files(__package__) / "jinja" / f"{name}.jinja").is_file():
        return official_chat_template(name)
    return jinja_of(template)


def jinja_of(template: ChatTemplate) -> str:
    """A jinja chat template that writes what `render` writes for system, user and assistant turns (tool turns
    raise; answers are written as their content, reasoning left out, as DeepSeek-R1's history writes them). As in
    xtune's templates, a user turn always ends with the assistant's header, with or without add_generation_prompt."""

    def text(piece: str, **fields: str) -> str:
        """A template piece as a jinja expression; `fields` maps {input}/{system} to jinja expressions."""
        parts = []
        for literal, field, _, _ in string.Formatter().parse(piece):
            if literal:
                parts.append(json.dumps(literal, ensure_ascii=False))
            if field is not None:
                parts.append({"bos": "bos_token", "eos": "eos_token", **fields}[field])
        return " + ".join(parts) or "''"

    content = "(message['content'] | trim)" if template.strip_content else "message['content']"
    answer = "(message['content'] | trim)" if template.strip_answers else content
    joined = template.strip_with_system and template.strip_content
    pending = "(ns.pending if loop.index0 == ns.last_user else '')" if template.system_in_last_user else "ns.pending"
    user = f"(({pending} + message['content']) | trim)" if joined else f"{pending} + {content}"
    system = text(template.system, system="message['content']" if template.system_in_user else content)
    default = text(template.system, system=json.dumps(template.default_system, ensure_ascii=False))
    keep = "{%- set ns.pending = ns.pending + " if template.system_in_user else "{{- "
    close = " -%}" if template.system_in_user else " -}}"
    write_system = keep + system + close
    if template.skip_empty_system:
        write_system = "{%- if message['content'] -%}" + write_system + "{%- endif -%}"
    lines = ["{%- set ns = namespace(pending='', round=0) -%}"]
    if template.system_in_last_user:  # the system text waits for the last user turn
        lines = [
            "{%- set ns = namespace(pending='', round=0, last_user=-1) -%}",
            "{%- for message in messages -%}",
            "{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}",
            "{%- endfor -%}",
        ]
    lines.append("{{- " + text(template.prefix) + " -}}")
    if template.default_system or template.system_always:
        lines += [
            "{%- if messages | selectattr('role', 'equalto', 'system') | list | length == 0 -%}",
            keep + default + close,
            "{%- endif -%}",
        ]
    lines += [
        "{%- for message in messages -%}",
        "{%- if message['role'] == 'system' -%}",
        write_system,
        "{%- elif message['role'] == 'user' -%}",
        "{%- set ns.round = ns.round + 1 -%}",
        "{{- " + text(template.user, input=user, round="(ns.round | string)") + " -}}",
        *(["{%- set ns.pending = '' -%}"] if not template.system_in_last_user else []),
        "{%- elif message['role'] == 'assistant' -%}",
        "{{- " + text(template.assistant_prefix + "{content}" + template.assistant_suffix, content=answer) + " -}}",
        "{{- " + text(template.separator) + " -}}",
        "{%- else -%}",
        "{{- raise_exception('this chat template writes system, user and assistant messages only') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if messages and messages[-1]['role'] == 'assistant' -%}",
        "{{- " + text(template.end_of_conversation) + " -}}",
    ]
    if template.thinking and template.thinking.opening:  # DeepSeek-R1's generation prompt opens the block
        lines += ["{%- else -%}", "{{- " + text(template.thinking.opening) + " -}}"]
    lines.append("{%- endif -%}")
    return "\n".join(lines)


SYSTEM_TEMPLATES = {
    "moss_sft": (
        "You are an AI assistant whose name is BOT.\nCapabilities and tools that BOT can possess.\n"
        "- Inner thoughts: enabled.\n- Web search: enabled. API: Search(query)\n"
        "- Calculator: enabled. API: Calculate(expression)\n- Equation solver: enabled. API: Solve(equation)\n"
        "- Text-to-image: disabled.\n- Image edition: disabled.\n- Text-to-speech: disabled.\n"
    ),
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n",
    "arxiv_gentile": (
        "If you are an expert in writing papers, please generate a good paper title for this paper based on other "
        "authors' descriptions of their abstracts.\n"
    ),
    "colorist": (
        "You are a professional color designer. Please provide the corresponding colors based on the description of "
        "Human.\n"
    ),
    "coder": "You are a professional programer. Please provide the corresponding code based on the description of Human.\n",
    "lawyer": "你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n",
    "medical": "如果你是一名医生，请根据患者的描述回答医学问题。\n",
    "sql": "If you are an expert in SQL, please generate a good SQL Query for Question based on the CREATE TABLE statement.\n",
}
"""XTuner's named system prompts (SYSTEM_TEMPLATE), for `xtune chat --system-template NAME` and configs."""
