"""Chat templates: how a model family writes a conversation as text, and which parts are trained."""

from dataclasses import dataclass

from xtune.data.formats import Conversation, Turn
from xtune.errors import XtuneError


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str
    """Format of the system turn, with `{system}`."""
    user: str
    """Format of a user turn, with `{input}`, ending with the assistant's header (generation prompt)."""
    assistant_suffix: str
    """Closes an assistant turn; trained with it, so the model learns to stop."""
    separator: str
    """Written after each assistant turn, untrained."""
    stop_words: tuple[str, ...]
    """Generation stops at any of these."""
    bos: bool = True
    """Start the sample with the tokenizer's BOS token, if it has one."""


def chatml(name: str, stop_words: tuple[str, ...], bos: bool) -> ChatTemplate:
    return ChatTemplate(
        name=name,
        system="<|im_start|>system\n{system}<|im_end|>\n",
        user="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>",
        separator="\n",
        stop_words=stop_words,
        bos=bos,
    )


TEMPLATES: dict[str, ChatTemplate] = {
    "internlm2_chat": chatml("internlm2_chat", ("<|im_end|>",), bos=True),
    "qwen_chat": chatml("qwen_chat", ("<|im_end|>", "<|endoftext|>"), bos=False),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise XtuneError(f"unknown prompt template '{name}'; known: {', '.join(sorted(TEMPLATES))}.")
    return TEMPLATES[name]


Segment = tuple[str, bool]
"""A piece of rendered text and whether its tokens are trained."""


def render(conversation: Conversation, template: ChatTemplate) -> list[Segment]:
    """The conversation as text segments in template order, each marked trained or not."""
    segments: list[Segment] = []
    for turn in conversation.turns:
        segments.extend(_render_turn(turn, template))
    return segments


def _render_turn(turn: Turn, template: ChatTemplate) -> list[Segment]:
    if turn.role == "system":
        return [(template.system.format(system=turn.content), False)]
    if turn.role == "user":
        return [(template.user.format(input=turn.content), False)]
    return [(turn.content + template.assistant_suffix, turn.trainable), (template.separator, False)]


def generation_prompt(conversation: Conversation, template: ChatTemplate) -> str:
    """Text to feed the model so that it writes the next assistant turn; conversation ends with a user turn."""
    return "".join(text for text, _ in render(conversation, template))
