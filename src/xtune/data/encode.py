"""Rendered segments -> token ids and labels, -100 wherever no loss is taken."""

from dataclasses import dataclass, replace

from transformers import PreTrainedTokenizerBase

from xtune.data.formats import Conversation
from xtune.data.templates import Segment, Template, TokenizerTemplate, render

IGNORE_INDEX = -100


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


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
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    train_on_last_turn_only: bool = False,
) -> Encoded:
    """Token ids with labels equal to the ids on trained segments, truncated to `max_length`.

    A named template's segments are tokenized one by one, so that no token straddles a trained and an untrained
    segment. "hf" tokenizes the whole text at once, as `apply_chat_template` does, and trains the tokens that lie
    in trained segments.
    """
    if train_on_last_turn_only:
        conversation = last_turn_trained_only(conversation)
    segments = render(conversation, template, tokenizer)
    tokenize = _tokenize_whole if isinstance(template, TokenizerTemplate) else _tokenize_segments
    input_ids, labels = tokenize(segments, tokenizer)
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return Encoded(input_ids, labels, truncated)


def encode_batch(
    conversations: list[Conversation],
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    train_on_last_turn_only: bool = False,
) -> list[Encoded]:
    """`encode` over many conversations, with every segment tokenized in one call to the Rust
    tokenizer (several times faster than segment by segment); the same ids and labels as `encode`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or isinstance(template, TokenizerTemplate):
        return [encode(c, template, tokenizer, max_length, train_on_last_turn_only) for c in conversations]
    if train_on_last_turn_only:
        conversations = [last_turn_trained_only(c) for c in conversations]
    rendered = [render(c, template, tokenizer) for c in conversations]
    pieces = backend.encode_batch([text for segments in rendered for text, _ in segments], add_special_tokens=False)
    results, cursor = [], 0
    for segments in rendered:
        input_ids: list[int] = []
        labels: list[int] = []
        for _, trained in segments:
            ids = pieces[cursor].ids
            cursor += 1
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        truncated = max_length is not None and len(input_ids) > max_length
        if truncated:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        results.append(Encoded(input_ids, labels, truncated))
    return results


def last_turn_trained_only(conversation: Conversation) -> Conversation:
    """The conversation with every trainable turn but the last one made untrainable."""
    trainable = [index for index, turn in enumerate(conversation.turns) if turn.trainable]
    turns = tuple(
        replace(turn, trainable=False) if index in trainable[:-1] else turn
        for index, turn in enumerate(conversation.turns)
    )
    return replace(conversation, turns=turns)


def _tokenize_segments(segments: list[Segment], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        ids = tokenizer.encode(text, add_special_tokens=False)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def _tokenize_whole(segments: list[Segment], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    text = "".join(text for text, _ in segments)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, ends = encoding["input_ids"], [end for _, end in encoding["offset_mapping"]]
    starts = [0, *ends[:-1]]
    spans = _trained_spans(segments)
    labels = [
        token if any(a <= start and end <= b for a, b in spans) else IGNORE_INDEX
        for token, start, end in zip(input_ids, starts, ends)
    ]
    return input_ids, labels


def _trained_spans(segments: list[Segment]) -> list[tuple[int, int]]:
    spans, position = [], 0
    for text, trained in segments:
        if trained:
            spans.append((position, position + len(text)))
        position += len(text)
    return spans
