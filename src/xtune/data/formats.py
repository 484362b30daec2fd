"""Raw records in common formats -> one standard conversation.

Each map function takes one raw record (a dict) and returns a `Conversation`, or raises
`RecordError` naming the field at fault; the reader adds the file and line.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str
    """The call's arguments as a JSON object text, as OpenAI's `tool_calls[].function.arguments`."""


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


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    tools: tuple[str, ...] = ()
    """JSON schemas (as text) of the tools offered to the model, rendered into the system turn."""
    images: tuple[str, ...] = ()
    """Image paths for multimodal samples; each `<image>` in the text stands for one."""
    raw: bool = False
    """Plain text for pretraining: one trained assistant turn, encoded without a chat template as
    BOS + text + EOS, every token trained."""

    @property
    def system(self) -> str | None:
        return self.turns[0].content if self.turns and self.turns[0].role == "system" else None


class RecordError(ValueError):
    """A record does not fit its format; the message names the field and what is expected."""


def _text(record: dict, key: str, where: str = "", required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise RecordError(f"missing field '{where}{key}'")
    if not isinstance(value, str):
        raise RecordError(f"field '{where}{key}' must be a string, got {type(value).__name__}")
    return value


def conversation_to_standard(record: dict[str, Any]) -> Conversation:
    """XTuner's format: {"conversation": [{"system"?, "input", "output"}, ...]}."""
    rounds = record.get("conversation")
    if not isinstance(rounds, list) or not rounds:
        raise RecordError("field 'conversation' must be a non-empty list of {input, output} objects")
    turns: list[Turn] = []
    for index, round_ in enumerate(rounds):
        where = f"conversation[{index}]."
        if not isinstance(round_, dict):
            raise RecordError(f"'conversation[{index}]' must be an object with input and output")
        system = _text(round_, "system", where, required=False)
        if system:
            turns.append(Turn("system", system))
        turns.append(Turn("user", _text(round_, "input", where)))
        turns.append(Turn("assistant", _text(round_, "output", where), trainable=True))
    return Conversation(tuple(turns))


def alpaca_to_standard(record: dict[str, Any]) -> Conversation:
    """Alpaca: {"instruction", "input"?, "output"}; a non-empty input follows the instruction on a new line."""
    instruction = _text(record, "instruction")
    extra = _text(record, "input", required=False)
    prompt = f"{instruction}\n{extra}" if extra else instruction
    return Conversation((Turn("user", prompt), Turn("assistant", _text(record, "output"), trainable=True)))


FORMATS: dict[str, Callable[[dict[str, Any]], Conversation]] = {
    "conversation": conversation_to_standard,
    "alpaca": alpaca_to_standard,
}


def detect_format(record: Any) -> str:
    """The format name whose signature keys the record has."""
    if isinstance(record, dict):
        if "conversation" in record:
            return "conversation"
        if "instruction" in record and "output" in record:
            return "alpaca"
        keys = ", ".join(sorted(map(str, record))) or "none"
    else:
        keys = f"not an object but {type(record).__name__}"
    raise RecordError(
        f"unknown record format (keys: {keys}); expected one of {', '.join(FORMATS)}. "
        "Set dataset_format in the config to choose one."
    )


def with_system(conversation: Conversation, system: str) -> Conversation:
    """Put `system` in front when the conversation has no system turn of its own."""
    if not system or conversation.system is not None:
        return conversation
    return Conversation((Turn("system", system), *conversation.turns))
