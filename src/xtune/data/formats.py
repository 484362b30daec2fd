"""Raw records in common formats -> one standard conversation.

Each map function takes one raw record and returns a `Conversation`, or raises `RecordError` naming
the field at fault; the reader adds the file and line. Map functions are pure: image paths come back
as written, and the reader resolves and checks them. A key whose value is null counts as absent,
because Parquet files and saved datasets fill the keys a row lacks with nulls.

Every conversation a map function returns passes `check_conversation`: an optional system turn, then
user and assistant turns in turn, tool results after an assistant turn that calls tools, the
assistant's turn last, and at least one assistant turn to train on.
"""

import ast
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from xtune.errors import short_repr

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str
    """The call's arguments as a JSON object text, as OpenAI's `tool_calls[].function.arguments`."""
    id: str | None = None
    """The record's `tool_calls[].id`, which some chat templates write (Mistral v0.3's: 9 characters)."""


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str
    trainable: bool = False
    """Whether the loss is computed on this turn's tokens (assistant turns only)."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Tools the assistant calls in this turn; `tool` turns that follow hold their results."""
    name: str | None = None
    """For `tool` turns: the tool that produced the content."""
    call_id: str | None = None
    """For `tool` turns: the id of the call answered (the record's `tool_call_id`, else its call's id)."""
    reasoning: str | None = None
    """For assistant turns: the thinking before the answer, given apart from the content (OpenAI-style
    `reasoning_content`). None: not given apart; templates that think read a `<think>...</think>` in the content."""


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    tools: tuple[str, ...] = ()
    """Tools offered to the model, rendered into the system turn: each the JSON text of an OpenAI
    tool, `{"type": "function", "function": {"name", "description", "parameters"}}`."""
    images: tuple[str, ...] = ()
    """Image paths for multimodal samples; each `<image>` in the text stands for one."""
    raw: bool = False
    """Plain text for pretraining: one trained assistant turn, encoded without a chat template as
    BOS + text + EOS, every token trained."""
    enable_thinking: bool | None = None
    """The record's own `enable_thinking`; None: the template's (the config's `enable_thinking`)."""

    @property
    def system(self) -> str | None:
        return self.turns[0].content if self.turns and self.turns[0].role == "system" else None


class RecordError(ValueError):
    """A record does not fit its format; the message names the field and what is expected."""


def _object(record: Any, what: str = "a record") -> dict:
    if not isinstance(record, dict):
        raise RecordError(f"{what} must be a JSON object, got {type(record).__name__}")
    return record


def _text(record: dict, key: str, where: str = "", required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise RecordError(f"missing field '{where}{key}'")
    if not isinstance(value, str):
        raise RecordError(f"field '{where}{key}' must be a string, got {type(value).__name__}")
    return value


def _trainable(message: dict, where: str) -> bool:
    """False when the message has `weight` or `loss` 0/false (OpenAI's and LLaMA-Factory's opt-out)."""
    trainable = True
    for key in ("weight", "loss"):
        value = message.get(key)
        if value is None:
            continue
        if not isinstance(value, (bool, int, float)) or value not in (0, 1):
            raise RecordError(f"field '{where}{key}' must be 0 or 1 (or false or true), got {short_repr(value)}")
        trainable = trainable and bool(value)
    return trainable


REASONING_KEYS = ("reasoning_content", "reasoning")
"""Where an assistant message gives its thinking apart from its content: DeepSeek's and vLLM's
`reasoning_content`, OpenRouter's and newer vLLM's `reasoning`."""


def _reasoning(message: dict, where: str) -> str | None:
    given = [key for key in REASONING_KEYS if message.get(key) is not None]
    if len(given) > 1:
        owner = f"'{where.rstrip('.')}'" if where else "the record"
        raise RecordError(f"{owner} has both {' and '.join(repr(k) for k in given)}; keep one")
    return _text(message, given[0], where) if given else None


def _enable_thinking(record: dict) -> bool | None:
    value = record.get("enable_thinking")
    if value is not None and not isinstance(value, bool):
        raise RecordError(f"field 'enable_thinking' must be true or false, got {short_repr(value)}")
    return value


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordError(f"field '{where}' is not valid JSON ({error.msg} at column {error.colno})") from None
    except (ValueError, RecursionError) as error:
        raise RecordError(f"field '{where}' is not valid JSON ({type(error).__name__})") from None


def _dump(value: Any, where: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as error:
        raise RecordError(f"field '{where}' cannot be written as JSON ({error})") from None


def _json_object_text(value: Any, where: str) -> str:
    """A JSON object given as text or already parsed -> one canonical JSON text."""
    if isinstance(value, str):
        value = _parse_json(value, where)
    if not isinstance(value, dict):
        raise RecordError(f"field '{where}' must be a JSON object or its text, got {type(value).__name__}")
    return _dump(value, where)


def _tool_call(
    function: Any, where: str, name_key: str = "name", arguments_key: str = "arguments", required: bool = True
) -> ToolCall:
    """{"name", "arguments"} -> a ToolCall; arguments may be an object or its JSON text.

    MSAgent's calls name the keys `api_name` and `parameters`, and leave out the parameters of a call
    that takes none (`required=False` reads them as {}).
    """
    function = _object(function, f"'{where}'")
    name = _text(function, name_key, f"{where}.")
    if not name:
        raise RecordError(f"field '{where}.{name_key}' is empty")
    arguments = function.get(arguments_key)
    if arguments is None and required:
        raise RecordError(f"missing field '{where}.{arguments_key}'")
    return ToolCall(name, _json_object_text({} if arguments is None else arguments, f"{where}.{arguments_key}"))


def _tools(record: dict, key: str = "tools") -> tuple[str, ...]:
    """`record[key]`: a list of tool schemas, or its JSON text (LLaMA-Factory), in OpenAI's wrapped form or bare."""
    tools = record.get(key)
    if tools is None or (isinstance(tools, str) and not tools.strip()):
        return ()
    if isinstance(tools, str):
        tools = _parse_json(tools, key)
    if not isinstance(tools, list):
        raise RecordError(f"field '{key}' must be a list of tool schemas or its JSON text, got {type(tools).__name__}")
    schemas = []
    for index, tool in enumerate(tools):
        where = f"{key}[{index}]"
        tool = _object(tool, f"'{where}'")
        if tool.get("function") is not None:
            if tool.get("type") not in (None, "function"):
                raise RecordError(f"field '{where}.type' must be 'function', got {short_repr(tool['type'])}")
            function, where = _object(tool["function"], f"'{where}.function'"), f"{where}.function"
        else:
            function = tool
        if not _text(function, "name", f"{where}."):
            raise RecordError(f"field '{where}.name' is empty")
        schemas.append(_dump({"type": "function", "function": function}, where))
    return tuple(schemas)


def _images(record: dict) -> tuple[str, ...]:
    """LLaVA's `image` (a path or a list) or LLaMA-Factory's `images` (a list)."""
    if record.get("image") is not None and record.get("images") is not None:
        raise RecordError("the record has both 'image' and 'images'; keep one")
    key = "image" if record.get("image") is not None else "images"
    value = record.get(key)
    if value is None:
        return ()
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(path, str) and path for path in paths):
        raise RecordError(f"field '{key}' must be an image path or a list of image paths, got {short_repr(value)}")
    return tuple(paths)


def _describe(role: str | None, calls: bool) -> str:
    if role is None:
        return "the start"
    if role == "assistant":
        return "an assistant turn with tool calls" if calls else "an assistant turn"
    return f"a {role} turn"


def _expected_after(role: str | None, calls: bool) -> tuple[str, ...]:
    if role in (None, "system"):
        return ("user",)
    if role == "user":
        return ("assistant",)
    if role == "assistant":
        return ("tool",) if calls else ("user",)
    return ("tool", "assistant")


def check_conversation(conversation: Any, wheres: Sequence[str] | None = None) -> Conversation:
    """The conversation, if a model can be trained on it; else a RecordError naming the turn at fault.

    `wheres` names each turn for the message (the field it came from, e.g. `messages[3]`); the
    default is `turns[i]`.
    """
    if not isinstance(conversation, Conversation):
        raise RecordError(f"expected a Conversation, got {type(conversation).__name__}")
    turns = conversation.turns
    if not isinstance(turns, tuple) or not turns:
        raise RecordError("a conversation needs a non-empty tuple of turns")
    wheres = list(wheres) if wheres is not None else [f"turns[{index}]" for index in range(len(turns))]
    _check_types(conversation, wheres)
    if conversation.raw:
        if len(turns) != 1 or turns[0].role != "assistant" or not turns[0].trainable:
            raise RecordError("a raw (pretraining) conversation must be one trainable assistant turn")
        return conversation
    previous, calls = None, False
    for index, (turn, where) in enumerate(zip(turns, wheres)):
        if turn.role == "system" and index > 0:
            raise RecordError(f"'{where}' is a system turn after the first turn; only the first turn may be one")
        expected = _expected_after(previous, calls)
        if turn.role != "system" and turn.role not in expected:
            raise RecordError(
                f"'{where}' is {_describe(turn.role, False)} after {_describe(previous, calls)}; "
                f"expected {' or '.join(_describe(role, False) for role in expected)}"
            )
        previous, calls = turn.role, bool(turn.tool_calls)
    if previous != "assistant":
        raise RecordError(
            f"'{wheres[-1]}' is {_describe(previous, calls)} at the end; the last turn must be the assistant's"
        )
    if not any(turn.role == "assistant" and turn.trainable for turn in turns):
        raise RecordError("no assistant turn to train on (every assistant turn has weight 0)")
    placeholders = sum(turn.content.count(IMAGE_PLACEHOLDER) for turn in turns)
    if conversation.images and placeholders != len(conversation.images):
        raise RecordError(
            f"the record has {len(conversation.images)} image(s) but {placeholders} '{IMAGE_PLACEHOLDER}' "
            "placeholder(s) in its text; put one placeholder where each image goes"
        )
    return conversation


def _check_types(conversation: Conversation, wheres: list[str]) -> None:
    """What a user's map function could get wrong that ours cannot."""
    for turn, where in zip(conversation.turns, wheres, strict=True):
        if not isinstance(turn, Turn) or turn.role not in ROLES or not isinstance(turn.content, str):
            raise RecordError(f"'{where}' must be a Turn with a role in {', '.join(ROLES)} and string content")
        calls = turn.tool_calls
        if calls and (turn.role != "assistant" or not all(isinstance(call, ToolCall) for call in calls)):
            raise RecordError(f"'{where}': only assistant turns have tool calls, each a ToolCall")
        if turn.reasoning is not None and (turn.role != "assistant" or not isinstance(turn.reasoning, str)):
            raise RecordError(f"'{where}': only assistant turns have reasoning, a string")
    if not all(isinstance(tool, str) for tool in conversation.tools):
        raise RecordError("a conversation's tools must be JSON texts")
    if not all(isinstance(image, str) for image in conversation.images):
        raise RecordError("a conversation's images must be paths")
    for turn, where in zip(conversation.turns, wheres):
        texts = [turn.content, turn.name or "", turn.reasoning or "",
                 *(f"{call.name}{call.arguments}" for call in turn.tool_calls or ())]  # fmt: skip
        _check_unicode(texts, f"'{where}'")
    _check_unicode(list(conversation.tools), "the tools")


def _check_unicode(texts: list[str], where: str) -> None:
    """Text a tokenizer can take: a lone surrogate (the JSON escape \\ud800) is valid JSON but not Unicode text."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RecordError(f"{where} holds a lone surrogate (not valid Unicode text); fix or drop the record") from None


def conversation_to_standard(record: Any) -> Conversation:
    """XTuner's format: {"conversation": [{"system"?, "input", "output"}, ...]}."""
    rounds = _object(record).get("conversation")
    if not isinstance(rounds, list) or not rounds:
        raise RecordError("field 'conversation' must be a non-empty list of {input, output} objects")
    turns: list[Turn] = []
    wheres: list[str] = []
    for index, round_ in enumerate(rounds):
        where = f"conversation[{index}]."
        if not isinstance(round_, dict):
            raise RecordError(f"'conversation[{index}]' must be an object with input and output")
        system = _text(round_, "system", where, required=False)
        if system:
            turns.append(Turn("system", system))
            wheres.append(f"{where}system")
        turns.append(Turn("user", _text(round_, "input", where)))
        output = _text(round_, "output", where)
        turns.append(Turn("assistant", output, _trainable(round_, where), reasoning=_reasoning(round_, where)))
        wheres += [f"{where}input", f"{where}output"]
    return check_conversation(Conversation(tuple(turns), enable_thinking=_enable_thinking(record)), wheres)


def alpaca_to_standard(record: Any) -> Conversation:
    """Alpaca: {"instruction", "input"?, "output"}; a non-empty input follows the instruction on a new line.

    LLaMA-Factory's additions are read too: `system`, and `history`, a list of earlier
    [instruction, response] pairs, both trained.
    """
    record = _object(record)
    turns: list[Turn] = []
    system = _text(record, "system", required=False)
    if system:
        turns.append(Turn("system", system))
    history = record.get("history")
    if history is not None and not isinstance(history, list):
        raise RecordError(
            f"field 'history' must be a list of [instruction, response] pairs, got {type(history).__name__}"
        )
    for index, pair in enumerate(history or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) for text in pair)):
            raise RecordError(f"field 'history[{index}]' must be a pair of strings [instruction, response]")
        turns += [Turn("user", pair[0]), Turn("assistant", pair[1], trainable=True)]
    instruction = _text(record, "instruction")
    extra = _text(record, "input", required=False)
    turns.append(Turn("user", f"{instruction}\n{extra}" if extra else instruction))
    turns.append(Turn("assistant", _text(record, "output"), trainable=True, reasoning=_reasoning(record, "")))
    return check_conversation(Conversation(tuple(turns), enable_thinking=_enable_thinking(record)))


def _content(message: dict, where: str, required: bool = True) -> str:
    """OpenAI content: a string, or a list of text parts joined."""
    content = message.get("content")
    if content is None:
        if required:
            raise RecordError(f"missing field '{where}content'")
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RecordError(
            f"field '{where}content' must be a string or a list of text parts, got {type(content).__name__}"
        )
    texts = []
    for index, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise RecordError(
                f"'{where}content[{index}]' must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                f"for images put '{IMAGE_PLACEHOLDER}' in the text and the paths in a top-level 'images' list"
            )
        texts.append(part["text"])
    return "".join(texts)


def openai_to_standard(record: Any) -> Conversation:
    """OpenAI's chat fine-tuning format: {"messages": [{"role", "content", ...}], "tools"?}.

    Roles are system, user, assistant and tool. An assistant message may carry `tool_calls`
    [{"id", "type": "function", "function": {"name", "arguments"}}], its content then optional; a
    tool message's name is its `name`, else that of the call its `tool_call_id` answers, else that of
    the call at its position after the assistant turn. `weight` 0 leaves an assistant turn untrained.
    OpenAI's older function calling reads the same: an assistant `function_call` {"name", "arguments"}
    is one tool call, a `function` message its result, and top-level `functions` the tools offered.
    Top-level `images` (paths) go with `<image>` placeholders in the text, as in LLaMA-Factory.
    """
    record = _object(record)
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError("field 'messages' must be a non-empty list of {role, content} objects")
    turns: list[Turn] = []
    wheres: list[str] = []
    calls_by_id: dict[str, ToolCall] = {}
    last_calls: tuple[ToolCall, ...] = ()
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RecordError(f"'{where}' must be an object with role and content")
        role = _text(message, "role", f"{where}.")
        role = "tool" if role == "function" else role
        if role not in ROLES:
            raise RecordError(f"field '{where}.role' must be one of {', '.join(ROLES)}, got {short_repr(role)}")
        if role == "assistant":
            last_calls = _openai_tool_calls(message, where, calls_by_id)
            content = _content(message, f"{where}.", required=not last_calls)
            reasoning = _reasoning(message, f"{where}.")
            turns.append(Turn("assistant", content, _trainable(message, f"{where}."), last_calls, reasoning=reasoning))
        elif role == "tool":
            position = len(turns) - len(_without_trailing_tools(turns))
            name = _tool_name(message, where, calls_by_id, last_calls, position)
            call_id = _text(message, "tool_call_id", f"{where}.", required=False) or (
                last_calls[position].id if position < len(last_calls) else None)  # fmt: skip
            turns.append(Turn("tool", _content(message, f"{where}."), name=name, call_id=call_id))
        else:
            turns.append(Turn(role, _content(message, f"{where}.")))
        wheres.append(where)
    if record.get("tools") is not None and record.get("functions") is not None:
        raise RecordError("the record has both 'tools' and 'functions' (OpenAI's legacy name for them); keep one")
    tools = _tools(record) or _tools(record, "functions")
    conversation = Conversation(tuple(turns), tools, _images(record), enable_thinking=_enable_thinking(record))
    return check_conversation(conversation, wheres)


def _openai_tool_calls(message: dict, where: str, calls_by_id: dict[str, ToolCall]) -> tuple[ToolCall, ...]:
    raw_calls = message.get("tool_calls")
    if raw_calls is None and message.get("function_call") is not None:
        return (_tool_call(message["function_call"], f"{where}.function_call"),)
    if raw_calls is None:
        return ()
    if not isinstance(raw_calls, list):
        raise RecordError(f"field '{where}.tool_calls' must be a list, got {type(raw_calls).__name__}")
    calls = []
    for index, raw in enumerate(raw_calls):
        call_where = f"{where}.tool_calls[{index}]"
        raw = _object(raw, f"'{call_where}'")
        if raw.get("type") not in (None, "function"):
            raise RecordError(f"field '{call_where}.type' must be 'function', got {short_repr(raw['type'])}")
        if raw.get("function") is None:
            raise RecordError(f"missing field '{call_where}.function'")
        call_id = _text(raw, "id", f"{call_where}.", required=False) or None
        call = replace(_tool_call(raw["function"], f"{call_where}.function"), id=call_id)
        if call_id:
            calls_by_id[call_id] = call
        calls.append(call)
    return tuple(calls)


def _without_trailing_tools(turns: list[Turn]) -> list[Turn]:
    end = len(turns)
    while end and turns[end - 1].role == "tool":
        end -= 1
    return turns[:end]


def _tool_name(
    message: dict, where: str, calls_by_id: dict[str, ToolCall], last_calls: tuple[ToolCall, ...], position: int
) -> str | None:
    name = _text(message, "name", f"{where}.", required=False)
    if name:
        return name
    call_id = _text(message, "tool_call_id", f"{where}.", required=False)
    if call_id:
        if call_id not in calls_by_id:
            raise RecordError(
                f"field '{where}.tool_call_id' is {short_repr(call_id)}, which no earlier tool call has as its id"
            )
        return calls_by_id[call_id].name
    return last_calls[position].name if position < len(last_calls) else None


SHAREGPT_ROLES: dict[str, Role] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
}
"""ShareGPT `from` values (LLaMA-Factory's tags, and OpenAI's role names) -> roles."""


def sharegpt_to_standard(record: Any) -> Conversation:
    """ShareGPT: {"conversations": [{"from", "value"}], "system"?, "tools"?}; also LLaVA's format.

    `from` is human, gpt, system (first only), function_call or observation, as in LLaMA-Factory. A
    function_call's value is the JSON text of {"name", "arguments"} (or a list of them) and becomes an
    assistant turn with tool calls; an observation becomes a tool turn. A system message in the
    conversation takes the place of the top-level `system`. LLaVA's `image` (a path or a list) and
    LLaMA-Factory's `images` give the image paths, `<image>` staying in the text; `id` is ignored.
    """
    record = _object(record)
    messages = record.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise RecordError("field 'conversations' must be a non-empty list of {from, value} objects")
    turns: list[Turn] = []
    wheres: list[str] = []
    system = _text(record, "system", required=False)
    first = messages[0]
    if system and not (isinstance(first, dict) and first.get("from") == "system"):
        turns.append(Turn("system", system))
        wheres.append("system")
    last_calls: tuple[ToolCall, ...] = ()
    for index, message in enumerate(messages):
        where = f"conversations[{index}]"
        if not isinstance(message, dict):
            raise RecordError(f"'{where}' must be an object with from and value")
        sender = _text(message, "from", f"{where}.")
        if sender not in SHAREGPT_ROLES:
            raise RecordError(
                f"field '{where}.from' must be one of human, gpt, system, function_call, observation; "
                f"got {short_repr(sender)}"
            )
        value = _text(message, "value", f"{where}.")
        if sender == "function_call":
            last_calls = _sharegpt_calls(value, f"{where}.value")
            turns.append(Turn("assistant", "", _trainable(message, f"{where}."), last_calls))
        elif sender == "observation":
            turns.append(Turn("tool", value, name=last_calls[0].name if len(last_calls) == 1 else None))
        elif SHAREGPT_ROLES[sender] == "assistant":
            last_calls = ()
            reasoning = _reasoning(message, f"{where}.")
            turns.append(Turn("assistant", value, _trainable(message, f"{where}."), reasoning=reasoning))
        else:
            turns.append(Turn(SHAREGPT_ROLES[sender], value))
        wheres.append(where)
    conversation = Conversation(tuple(turns), _tools(record), _images(record), enable_thinking=_enable_thinking(record))
    return check_conversation(conversation, wheres)


def _sharegpt_calls(value: str, where: str) -> tuple[ToolCall, ...]:
    calls = _parse_json(value, where)
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls:
        raise RecordError(
            f"field '{where}' must be the JSON text of {{\"name\", \"arguments\"}} or a non-empty list of them"
        )
    return tuple(_tool_call(call, f"{where}[{index}]") for index, call in enumerate(calls))


_MSAGENT_STEP = re.compile(
    r"<\|startofthink\|>(?P<think>.*?)<\|endofthink\|>|<\|startofexec\|>(?P<exec>.*?)<\|endofexec\|>", re.DOTALL
)


def msagent_react_to_standard(record: Any) -> Conversation:
    """MSAgent-Bench (ModelScope-Agent): {"conversations": [{"from": system|user|assistant, "value"}]}, read as
    XTuner's `msagent_react_map_fn` reads it.

    The system value declares the tools as JSON objects with `name`, `description` and `paths[0].parameters`
    ([{name, description, required}]); they become the conversation's `tools` (every parameter a string), and, as
    in XTuner, the rest of the system text is dropped. An assistant value is a ReAct trajectory: text (the
    thought), `<|startofthink|>```JSON {"api_name", "parameters"}```<|endofthink|>` (the call),
    `<|startofexec|>```JSON ...```<|endofexec|>` (the result), then the final answer. Thoughts, calls and answers
    become trained assistant turns, results untrained tool turns, and each template writes them in its own
    protocol (ReAct's Thought/Action/Action Input/Observation where it has none). `conversations` may also be its
    JSON (or Python literal) text, as in the dataset's own files.
    """
    record = _object(record)
    messages = record.get("conversations")
    if isinstance(messages, str):
        messages = _literal(messages, "conversations")
    if not isinstance(messages, list) or not messages:
        raise RecordError("field 'conversations' must be a non-empty list of {from, value} objects")
    turns: list[Turn] = []
    wheres: list[str] = []
    tools: list[str] = []
    for index, message in enumerate(messages):
        where = f"conversations[{index}]"
        if not isinstance(message, dict):
            raise RecordError(f"'{where}' must be an object with from and value")
        sender = _text(message, "from", f"{where}.")
        value = _text(message, "value", f"{where}.")
        if sender == "system":
            tools += _msagent_tools(value, f"{where}.value")
        elif sender == "user":
            turns.append(Turn("user", value))
            wheres.append(where)
        elif sender == "assistant":
            steps = _msagent_steps(value, f"{where}.value")
            turns += steps
            wheres += [where] * len(steps)
        else:
            raise RecordError(f"field '{where}.from' must be one of system, user, assistant; got {short_repr(sender)}")
    return check_conversation(Conversation(tuple(turns), tools=tuple(tools)), wheres)


def _literal(text: str, where: str) -> Any:
    """JSON text, or the Python literal text that some copies of MSAgent-Bench hold (read safely, never run)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise RecordError(f"field '{where}' is neither a list nor the JSON text of one") from None


def _msagent_tools(system: str, where: str) -> list[str]:
    """The JSON objects with a name and a description in the system text (XTuner's `extract_json_objects`), as tools."""
    decoder = json.JSONDecoder()
    tools, position = [], 0
    while (start := system.find("{", position)) != -1:
        try:
            found, length = decoder.raw_decode(system, start)
        except ValueError:
            position = start + 1
            continue
        if not (isinstance(found, dict) and "name" in found and "description" in found):
            position = start + 1
            continue
        position = start + length
        properties, required = {}, []
        paths = found.get("paths")
        first_path = paths[0] if isinstance(paths, list) and paths and isinstance(paths[0], dict) else {}
        parameters = first_path.get("parameters")
        for parameter in parameters if isinstance(parameters, list) else []:
            if isinstance(parameter, dict) and isinstance(parameter.get("name"), str):
                properties[parameter["name"]] = {"type": "string", "description": str(parameter.get("description", ""))}
                if str(parameter.get("required", "")).lower() == "true":
                    required.append(parameter["name"])
        function = {
            "name": str(found["name"]),
            "description": str(found["description"]),
            "parameters": {"type": "object", "properties": properties, "required": required},
        }
        tools.append(_dump({"type": "function", "function": function}, where))
    return tools


def _fenced_json(text: str) -> str:
    """The text inside MSAgent's ```JSON ... ``` fence."""
    return text.replace("```JSON", "").replace("```json", "").replace("```", "").strip()


def _msagent_steps(value: str, where: str) -> list[Turn]:
    """One assistant value -> assistant turns (thought + calls, answer) and tool turns (results), in order."""
    turns: list[Turn] = []
    thought, calls = "", []
    position = 0
    for match in _MSAGENT_STEP.finditer(value):
        text = value[position : match.start()].strip()
        position = match.end()
        if text and (calls or match.group("think") is not None):
            thought = f"{thought}\n{text}" if thought else text
        if match.group("think") is not None:
            call_where = f"{where} <|startofthink|>"
            call = _parse_json(_fenced_json(match.group("think")).replace("\n", ""), call_where)
            calls.append(_tool_call(call, call_where, "api_name", "parameters", required=False))
            continue
        if calls:
            turns.append(Turn("assistant", thought, trainable=True, tool_calls=tuple(calls)))
            thought, calls = "", []
        elif text or not turns or turns[-1].role != "tool":
            raise RecordError(f"field '{where}': a <|startofexec|> result with no <|startofthink|> call before it")
        answered = len(turns) - len(_without_trailing_tools(turns))
        caller = turns[-1 - answered]
        name = caller.tool_calls[answered].name if answered < len(caller.tool_calls) else None
        turns.append(Turn("tool", _fenced_json(match.group("exec")), name=name))
    rest = value[position:].strip()
    if calls:
        thought = f"{thought}\n{rest}" if thought and rest else thought or rest
        turns.append(Turn("assistant", thought, trainable=True, tool_calls=tuple(calls)))
    elif rest or not turns:
        turns.append(Turn("assistant", rest, trainable=True))
    return turns


def text_to_standard(record: Any) -> Conversation:
    """Pretraining text: {"text"}; other keys are ignored."""
    text = _text(_object(record), "text")
    if not text.strip():
        raise RecordError("field 'text' is empty")
    return check_conversation(Conversation((Turn("assistant", text, trainable=True),), raw=True), ["text"])


_GUANACO_TURN = re.compile(r"### (Human|Assistant):")


def oasst1_to_standard(record: Any) -> Conversation:
    """OpenAssistant (oasst1) as timdettmers/openassistant-guanaco ships it, and XTuner's `oasst1_map_fn` reads it:
    {"text": "### Human: ...### Assistant: ...### Human: ..."}. The text is cut at each `### Human:` /
    `### Assistant:` (a `###` inside a reply, a markdown heading, stays text; XTuner cuts at every `###`), each
    reply trained; a last question without a reply is left out, as XTuner leaves it."""
    text = _text(_object(record), "text")
    pieces = _GUANACO_TURN.split(text)
    if pieces[0].strip():
        raise RecordError(f"field 'text' must start with '### Human:', got {short_repr(pieces[0][:40])}")
    turns: list[Turn] = []
    for index, (speaker, content) in enumerate(zip(pieces[1::2], pieces[2::2])):
        expected = "Human" if index % 2 == 0 else "Assistant"
        if speaker != expected:
            raise RecordError(f"field 'text': turn {index + 1} is '### {speaker}:' where '### {expected}:' belongs")
        turns.append(Turn("user", content.strip()) if speaker == "Human" else Turn("assistant", content.strip(), True))
    if turns and turns[-1].role == "user":
        turns.pop()
    if not turns:
        raise RecordError("field 'text' holds no '### Human:' turn answered by '### Assistant:'")
    return check_conversation(Conversation(tuple(turns)), [f"text turn {i + 1}" for i in range(len(turns))])


FORMATS: dict[str, Callable[[Any], Conversation]] = {
    "conversation": conversation_to_standard,
    "alpaca": alpaca_to_standard,
    "openai": openai_to_standard,
    "sharegpt": sharegpt_to_standard,
    "llava": sharegpt_to_standard,
    "text": text_to_standard,
    "msagent_react": msagent_react_to_standard,
    "oasst1": oasst1_to_standard,
}
"""Format names (the values of `dataset_format`) -> map functions. `llava` is ShareGPT with images."""

MSAGENT_MARKERS = ("<|startofthink|>", "<|startofexec|>", '"plugin_schema_for_model"')
"""Text only MSAgent-Bench records hold: its call and result markers, and its tool declarations."""


def detect_format(record: Any) -> str:
    """The format name whose signature keys the record has (keys with null values do not count)."""
    if isinstance(record, dict):
        keys = {key for key, value in record.items() if value is not None}
        if "conversation" in keys:
            return "conversation"
        if "messages" in keys:
            return "openai"
        if "conversations" in keys:
            if keys & {"image", "images"}:
                return "llava"
            return "msagent_react" if _has_msagent_markers(record["conversations"]) else "sharegpt"
        if "instruction" in keys:
            return "alpaca"
        if "text" in keys:  # a guanaco conversation reads as one, not as text to pretrain on
            text = record["text"]
            return "oasst1" if isinstance(text, str) and text.lstrip().startswith("### Human:") else "text"
        found = ", ".join(sorted(map(str, record))) or "none"
    else:
        found = f"not an object but {type(record).__name__}"
    raise RecordError(
        f"unknown record format (keys: {found}); expected the keys of one of {', '.join(FORMATS)}. "
        "Set dataset_format in the config to choose one"
    )


def _has_msagent_markers(messages: Any) -> bool:
    if isinstance(messages, str):
        return any(marker in messages for marker in MSAGENT_MARKERS)
    messages = messages if isinstance(messages, list) else []
    values = [message.get("value") for message in messages if isinstance(message, dict)]
    return any(isinstance(value, str) and marker in value for value in values for marker in MSAGENT_MARKERS)


def with_system(conversation: Conversation, system: str) -> Conversation:
    """Put `system` in front when the conversation has no system turn of its own (raw text has none)."""
    if not system or conversation.raw or conversation.system is not None:
        return conversation
    return replace(conversation, turns=(Turn("system", system), *conversation.turns))


def with_placeholders(conversation: Conversation, placeholders: dict[str, str]) -> Conversation:
    """Each `{{KEY}}` of `placeholders` in the conversation's texts replaced by its value (LLaMA-Factory's
    identity.json and xtune's self_cognition write {{name}} and {{author}})."""
    if not placeholders:
        return conversation

    def fill(text: str | None) -> str | None:
        for key, value in placeholders.items():
            text = text.replace("{{" + key + "}}", value) if text is not None else None
        return text

    turns = tuple(replace(t, content=fill(t.content), reasoning=fill(t.reasoning)) for t in conversation.turns)
    return replace(conversation, turns=turns)


def rounds_of(conversation: Conversation) -> list[Conversation]:
    """One conversation per trained assistant turn: the turns up to it, it alone trained, so that each answer is
    trained as the last one (templates that drop earlier answers' reasoning, Qwen3's and R1's, train only that)."""
    if conversation.raw:
        return [conversation]
    rounds = []
    for index, turn in enumerate(conversation.turns):
        if turn.role == "assistant" and turn.trainable:
            history = [replace(t, trainable=False) if t.role == "assistant" else t for t in conversation.turns[:index]]
            rounds.append(replace(conversation, turns=(*history, turn)))
    return rounds
