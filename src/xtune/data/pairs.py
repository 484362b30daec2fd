"""Preference records -> pairs of conversations, through the SFT formats: a pair is the prompt followed by the chosen
answer and the prompt followed by the rejected one, each read by the chat format it is written in (OpenAI messages,
ShareGPT, plain strings), so the templates and the token-exact encoding apply unchanged. Only the answers are trained.

Formats (detected from the keys, like the SFT ones):
- `preference`: {"prompt"?, "chosen", "rejected"} (TRL, UltraFeedback; XTuner's DPO data), also with the prompt as
  OpenAI `messages` or ShareGPT `conversations` (LLaMA-Factory's). The prompt and each answer are a string, a
  message, or a list of messages; where the answers are whole conversations (no prompt, or answers that open with
  the user's turn, as UltraFeedback's do), the prompt is what they share (TRL's implicit prompt).
- `kto`: {"prompt", "completion", "label"} (TRL's unpaired format): label true for a desirable completion.
"""

from dataclasses import dataclass, replace
from typing import Any

from xtune.data.formats import (
    Conversation,
    RecordError,
    _object,
    openai_to_standard,
    sharegpt_to_standard,
)
from xtune.errors import short_repr


@dataclass(frozen=True)
class PreferencePair:
    """The same prompt answered twice; each conversation trains its answer's turns only."""

    chosen: Conversation
    rejected: Conversation


@dataclass(frozen=True)
class Unpaired:
    """A prompt and one answer, desirable or not (KTO)."""

    conversation: Conversation
    desirable: bool


def detect_preference_format(record: Any) -> str:
    if isinstance(record, dict) and {"chosen", "rejected"} <= set(record):
        return "preference"
    if isinstance(record, dict) and {"completion", "label"} <= set(record):
        return "kto"
    keys = ", ".join(sorted(map(str, record))) if isinstance(record, dict) else type(record).__name__
    raise RecordError(
        f"not a preference record (keys: {keys}); expected {{prompt, chosen, rejected}} or {{prompt, completion, label}}"
    )


def preference_to_pair(record: Any) -> PreferencePair:
    """A preference record -> the prompt + chosen and the prompt + rejected conversations."""
    record = _object(record)
    prompt_key = next((key for key in ("prompt", "messages", "conversations") if record.get(key) is not None), None)
    sharegpt = prompt_key == "conversations" or _is_sharegpt(record.get("chosen"))
    chosen = _messages(record["chosen"], "chosen", sharegpt, "assistant")
    rejected = _messages(record["rejected"], "rejected", sharegpt, "assistant")
    whole = not _is_answer(chosen[0])  # UltraFeedback: the answers repeat the prompt; the shared turns are it
    prompt = _messages(record[prompt_key], prompt_key, sharegpt, "user") if prompt_key and not whole else []
    if not prompt and not whole:
        raise RecordError("the pair has no prompt: give 'prompt' (or 'messages'), or chosen and rejected conversations "
                          "that share their user turns")  # fmt: skip
    extra = {key: record[key] for key in ("tools", "system", "images", "image") if record.get(key) is not None}
    conversations = [_conversation([*prompt, *answer], extra, sharegpt, key)
                     for answer, key in ((chosen, "chosen"), (rejected, "rejected"))]  # fmt: skip
    shared = _shared_turns(*conversations)
    if shared == min(len(c.turns) for c in conversations):
        raise RecordError("'chosen' and 'rejected' are the same answer; a pair needs two different ones")
    if not any(turn.role == "user" for turn in conversations[0].turns[:shared]):
        raise RecordError("the pair has no prompt: give 'prompt' (or 'messages'), or chosen and rejected conversations "
                          "that share their user turns")  # fmt: skip
    return PreferencePair(*(_answers_trained(c, shared) for c in conversations))


def kto_to_unpaired(record: Any) -> Unpaired:
    """{"prompt", "completion", "label"} -> the prompt + completion conversation, and whether it is desirable."""
    record = _object(record)
    label = record.get("label")
    if not isinstance(label, bool):
        raise RecordError(f"field 'label' must be true (desirable) or false, got {short_repr(label)}")
    sharegpt = _is_sharegpt(record.get("completion"))
    prompt = _messages(record.get("prompt"), "prompt", sharegpt, "user")
    completion = _messages(record.get("completion"), "completion", sharegpt, "assistant")
    conversation = _conversation([*prompt, *completion], {}, sharegpt, "completion")
    return Unpaired(_answers_trained(conversation, len(conversation.turns) - _answer_turns(conversation, completion)),
                    label)  # fmt: skip


PREFERENCE_FORMATS = {"preference": preference_to_pair, "kto": kto_to_unpaired}


def _is_answer(message: dict) -> bool:
    return message.get("role", message.get("from")) in ("assistant", "gpt", "function_call", "model")


def _is_sharegpt(value: Any) -> bool:
    first = value[0] if isinstance(value, list) and value else value
    return isinstance(first, dict) and "from" in first


def _messages(value: Any, key: str, sharegpt: bool, role: str) -> list[dict]:
    """A string (one message of `role`), a message, or a list of messages, as the record's chat format writes them."""
    if value is None:
        raise RecordError(f"missing field '{key}'")
    if isinstance(value, str):
        return [{"from": "human" if role == "user" else "gpt", "value": value} if sharegpt
                else {"role": role, "content": value}]  # fmt: skip
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and value and all(isinstance(message, dict) for message in value):
        return value
    raise RecordError(f"field '{key}' must be a string, a message or a non-empty list of messages, got "
                      f"{short_repr(value)}")  # fmt: skip


def _conversation(messages: list[dict], extra: dict, sharegpt: bool, key: str) -> Conversation:
    try:
        if sharegpt:
            return sharegpt_to_standard({"conversations": messages, **extra})
        return openai_to_standard({"messages": messages, **extra})
    except RecordError as error:
        raise RecordError(f"the prompt followed by '{key}': {error}") from None


def _shared_turns(first: Conversation, second: Conversation) -> int:
    shared = 0
    for a, b in zip(first.turns, second.turns):
        if a != b:
            break
        shared += 1
    return shared


def _answer_turns(conversation: Conversation, answer: list[dict]) -> int:
    return min(len(answer), len(conversation.turns))


def _answers_trained(conversation: Conversation, prompt_turns: int) -> Conversation:
    """The prompt's assistant turns untrained, the answer's trained (a `weight: 0` in the answer stays)."""
    turns = [replace(turn, trainable=False) if index < prompt_turns else turn
             for index, turn in enumerate(conversation.turns)]  # fmt: skip
    return replace(conversation, turns=tuple(turns))
