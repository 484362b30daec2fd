"""Rendered segments -> token ids and labels, -100 wherever no loss is taken."""

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from xtune.data.formats import Conversation
from xtune.data.templates import ChatTemplate, render

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode(
    conversation: Conversation,
    template: ChatTemplate,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
) -> Encoded:
    """Token ids with labels equal to the ids on trained segments, truncated to `max_length`."""
    input_ids: list[int] = []
    labels: list[int] = []
    if template.bos and tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, trained in render(conversation, template):
        ids = tokenizer.encode(text, add_special_tokens=False)
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return Encoded(input_ids, labels, truncated)
