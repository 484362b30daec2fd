"""Does a named template give the ids the tokenizer's own chat_template gives? Probe conversations, both ways.

Two properties matter: the training ids equal `apply_chat_template(messages, tokenize=True)` (the model is trained
on what its official format writes), and the ids a server feeds for the next reply (the history with
`add_generation_prompt=True`) are a prefix of the training ids (the model continues what it was trained on).
"""

from dataclasses import dataclass

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from xtune.data.encode import encode
from xtune.data.formats import Conversation, Turn
from xtune.data.templates import Template


def _conversation(*pairs: tuple[str, str], system: str | None = None) -> Conversation:
    turns = [Turn("system", system)] if system is not None else []
    for question, answer in pairs:
        turns += [Turn("user", question), Turn("assistant", answer, trainable=True)]
    return Conversation(tuple(turns))


PROBES: dict[str, Conversation] = {
    "one turn": _conversation(("What is 2+2?", "4")),
    "system prompt": _conversation(("What is 2+2?", "It is 4."), system="You are terse."),
    "three rounds": _conversation(("Hi", "Hello!"), ("How are you?", "Fine, thanks."), ("Bye", "Goodbye.")),
    "spaces and newlines": _conversation(("  padded question \n", "  padded answer  \n"), system="Be kind. "),
    "reply starts with a newline": _conversation(("Write a poem", "\nRoses are red\nViolets are blue"), system="Poet."),
    "chinese": _conversation(("你好，世界是什么？", "世界很大。")),
    "emoji": _conversation(("Say hi 😀", "Hi 👋🏽!")),
    "code": _conversation(("Fix:\n```py\ndef f(x):\n  return x+1\n```", "```python\ndef f(x):\n    return x + 1\n```")),
}
"""Conversations that show where tokenizing pieces of a rendering apart goes wrong: segment edges, spaces, a
reply's leading newline, text outside ASCII."""


@dataclass(frozen=True)
class ProbeResult:
    probe: str
    identical: bool
    position: int | None = None
    """First differing token position (None when identical, or when the tokenizer's template refused)."""
    ours: str | None = None
    theirs: str | None = None
    """The differing tokens, decoded."""
    prefix_holds: bool | None = None
    """Whether each generation prompt of the tokenizer's template is a prefix of the template's training ids."""
    refused: str | None = None
    """Why the tokenizer's own template could not render the probe (e.g. it has no system role)."""


def check_template(tokenizer: PreTrainedTokenizerBase, template: Template) -> list[ProbeResult]:
    """Each probe rendered by `template` and by the tokenizer's own chat_template, compared token by token."""
    return [_check(name, conversation, tokenizer, template) for name, conversation in PROBES.items()]


def first_disagreement(tokenizer: PreTrainedTokenizerBase, template: Template) -> ProbeResult | None:
    """The first probe on which the two templates write different ids, or None (also without a chat_template)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    for name, conversation in PROBES.items():
        result = _check(name, conversation, tokenizer, template)
        if not result.identical and result.refused is None:
            return result
    return None


def _check(name: str, conversation: Conversation, tokenizer, template: Template) -> ProbeResult:
    messages = [{"role": turn.role, "content": turn.content} for turn in conversation.turns]
    try:
        theirs = _official_ids(tokenizer, messages, add_generation_prompt=False)
        prompts = [
            _official_ids(tokenizer, messages[:index], add_generation_prompt=True)
            for index, turn in enumerate(conversation.turns)
            if turn.role == "assistant"
        ]
    except (TemplateError, ValueError, TypeError) as error:
        return ProbeResult(name, identical=False, refused=str(error).splitlines()[0][:200])
    ours = encode(conversation, template, tokenizer).input_ids
    prefix = all(ours[: len(prompt)] == prompt for prompt in prompts)
    if ours == theirs:
        return ProbeResult(name, identical=True, prefix_holds=prefix)
    position = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return ProbeResult(
        name, identical=False, position=position, ours=_shown(tokenizer, ours, position),
        theirs=_shown(tokenizer, theirs, position), prefix_holds=prefix,
    )  # fmt: skip


def _official_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _shown(tokenizer, ids: list[int], position: int) -> str:
    """The token at `position` and the two after it, each as the text it adds after the ones before it (so a
    SentencePiece word-start space shows); `(end)` past the last."""
    texts = [tokenizer.decode(ids[: end]) for end in range(position, min(position + 3, len(ids)) + 1)]
    pieces = [repr(after[len(before) :]) for before, after in zip(texts, texts[1:])]
    return " ".join(pieces) if pieces else "(end)"
