"""Rendered segments -> token ids and labels, -100 wherever no loss is taken."""

import re
import weakref
from dataclasses import dataclass, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from xtune.data.formats import IMAGE_PLACEHOLDER, Conversation
from xtune.data.templates import Segment, Template, TokenizerTemplate, render
from xtune.errors import DataError

IGNORE_INDEX = -100
IMAGE_TOKEN_ID = -200
"""Stands for one image patch in `input_ids` (as in LLaVA); the model puts the projected patch there."""


CUT_MARGIN_TOKENS = 64
"""Tokens' worth of characters kept past what a sample of `max_length` tokens can reach (`text_limit`)."""
_LONGEST_TOKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def text_limit(tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> int | None:
    """The characters of one text worth tokenizing for a sample of at most `max_length` tokens: the rest is
    cut before tokenizing, so a record of megabytes costs what its first tokens cost.

    No token covers more characters of the text than it is written with in the vocabulary (byte-level and
    byte-fallback tokens are written at least as long as what they stand for), so the first max_length + 1
    tokens lie within (max_length + 1) x the longest token's characters. A cut changes the tokens around it
    only (the word it falls in, for a tokenizer that splits words first; a few merges back for one that does
    not): CUT_MARGIN_TOKENS more tokens' worth keep it clear of them. The tests compare with whole texts."""
    if max_length is None:
        return None
    longest = _LONGEST_TOKEN.get(tokenizer)
    if longest is None:
        longest = _LONGEST_TOKEN[tokenizer] = max(map(len, tokenizer.get_vocab()), default=1)
    return (max_length + 1 + CUT_MARGIN_TOKENS) * longest


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    images: tuple[str, ...] = ()
    """The images whose patches fill this sample's IMAGE_TOKEN_ID runs, in order."""

    @property
    def num_trained(self) -> int:
        """Tokens the loss is taken on: a sample's first label is never a target (nothing comes before it)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def encode(
    conversation: Conversation,
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    train_on_last_turn_only: bool = False,
    image_tokens: int = 0,
    split_special_tokens: bool = False,
) -> Encoded:
    """Token ids with labels equal to the ids on trained segments, truncated to `max_length`.

    The rendered text is tokenized whole, as `apply_chat_template(tokenize=True)` tokenizes it, so the ids are
    the ones the model meets at inference for any tokenizer (a SentencePiece `▁` or a merged `\n\n` across a
    segment's edge included). A token is trained when its characters overlap a trained segment (the reply and
    its end marker). With `image_tokens` (a multimodal model), each `<image>` becomes that many IMAGE_TOKEN_ID,
    untrained. `split_special_tokens`: a special token's text inside the conversation's own content (what a user
    typed) is plain text, never the control token; only the template writes those.
    """
    return encode_batch(
        [conversation], template, tokenizer, max_length, train_on_last_turn_only, image_tokens, split_special_tokens
    )[0]


def encode_batch(
    conversations: list[Conversation],
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    train_on_last_turn_only: bool = False,
    image_tokens: int = 0,
    split_special_tokens: bool = False,
) -> list[Encoded]:
    """`encode` over many conversations, their texts tokenized in one call to the Rust tokenizer."""
    limit = text_limit(tokenizer, max_length)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    plans = [
        _plan(c, template, tokenizer, limit, image_tokens, split_special_tokens, train_on_last_turn_only, backend is None)
        for c in conversations
    ]
    texts = [plan.text[start:end] for plan in plans for start, end, kind in plan.chunks if kind == "text"]
    if backend is not None:
        # as `tokenizer(text)` does: a call with split_special_tokens=True (plain_text_ids) leaves the backend so
        backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        encodings = iter([(e.ids, e) for e in backend.encode_batch(texts, add_special_tokens=False)])
    else:  # no offsets: each chunk lies in one segment (`_plan`), and all its tokens are labelled by it
        encodings = iter([(ids, None) for ids in _encode_each(texts, tokenizer)])
    controls = _control_ids(tokenizer)
    results = []
    for conversation, plan in zip(conversations, plans):
        ids, pieces = [], []
        for start, end, kind in plan.chunks:
            if kind == "image":
                piece, encoding = [IMAGE_TOKEN_ID] * image_tokens, None
            elif kind == "plain":
                piece, encoding = plain_text_ids(plan.text[start:end], tokenizer), None
            else:
                piece, encoding = next(encodings)
            pieces.append(_Piece(start, end, len(ids), piece, encoding, kind == "image"))
            ids += piece
        labels = _labels(len(ids), pieces, plan.spans, controls)
        images = conversation.images if image_tokens else ()
        results.append(_fit(ids, labels, max_length, images, image_tokens))
    return results


@dataclass(frozen=True)
class _Piece:
    """The tokens of one chunk of a conversation's text."""

    start: int
    end: int
    """The chunk's characters in the text."""
    offset: int
    """Where its tokens start in the sample."""
    ids: list[int]
    encoding: Any | None
    """The tokenizers Encoding, which maps characters to tokens; None: each token stands for the whole chunk."""
    image: bool


def _labels(length: int, pieces: list[_Piece], spans: list[tuple[int, int]], controls: frozenset[int]) -> list[int]:
    """The ids of tokens whose characters overlap a trained span, IGNORE_INDEX elsewhere (and on image patches).

    A token that starts before a span and reaches into it is trained (InternLM2's header `\n` and a reply's
    leading `\n` are one token, which the model writes to begin the reply), unless it is a special token of the
    markup that only swallowed the reply's leading spaces (Phi-3's `<|assistant|>` strips what follows it)."""
    labels = [IGNORE_INDEX] * length
    for a, b in spans:
        for piece in pieces:
            if piece.image or piece.end <= a or piece.start >= b:
                continue
            low, high = max(a, piece.start) - piece.start, min(b, piece.end) - piece.start
            first, last = (0, len(piece.ids)) if piece.encoding is None else _overlapping(piece, low, high, controls)
            labels[piece.offset + first : piece.offset + last] = piece.ids[first:last]
    return labels


def _overlapping(piece: _Piece, low: int, high: int, controls: frozenset[int]) -> tuple[int, int]:
    """The tokens of `piece` that hold characters low..high of its chunk (every byte piece of a character)."""
    encoding = piece.encoding
    first = next((t for c in range(low, high) if (t := encoding.char_to_token(c)) is not None), None)
    if first is None:
        return 0, 0
    last = next(t for c in range(high - 1, low - 1, -1) if (t := encoding.char_to_token(c)) is not None) + 1
    while last < len(piece.ids) and encoding.token_to_chars(last)[0] < high:
        last += 1
    if encoding.token_to_chars(first)[0] < low and piece.ids[first] in controls:
        first += 1
    return first, last


@dataclass(frozen=True)
class _Plan:
    text: str
    spans: list[tuple[int, int]]
    """Character ranges of the trained segments."""
    chunks: list[tuple[int, int, str]]
    """(start, end, kind) covering `text`: `text` is tokenized as it is, `plain` with special tokens as plain text
    (what a user typed), `image` stands for an image's patches."""


def _plan(
    conversation: Conversation,
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    limit: int | None,
    image_tokens: int,
    split_special_tokens: bool,
    last_turn_only: bool,
    cut_at_segments: bool,
) -> _Plan:
    if last_turn_only:
        conversation = last_turn_trained_only(conversation)
    markers = None
    if split_special_tokens and (controls := _control_texts(tokenizer)):
        conversation, markers = _mark_control_texts(conversation, controls)
    segments = render(conversation, template, tokenizer)
    if image_tokens and isinstance(template, TokenizerTemplate) and conversation.images:
        raise DataError("prompt template 'hf' cannot place image patches yet; name the model's template instead.")
    text = "".join(text for text, _ in segments)[:limit]
    cuts = []  # (start, end, kind) of what is not plain `text`
    if image_tokens:
        cuts += [(m.start(), m.end(), "image") for m in re.finditer(re.escape(IMAGE_PLACEHOLDER), text)]
    if markers is not None:
        start, end = map(re.escape, markers)
        for match in re.finditer(f"{start}(.*?){end}", text, flags=re.DOTALL):
            cuts += [(match.start(), match.start() + 1, "drop"), (*match.span(1), "plain"), (match.end() - 1, match.end(), "drop")]
        cuts += [(m.start(), m.end(), "drop") for m in re.finditer(f"{start}|{end}", text) if not _inside(m.start(), cuts)]
    if cut_at_segments:
        position = 0
        for piece, _ in segments:
            position += len(piece)
            cuts.append((position, position, "drop"))
    return _Plan(text, _trained_spans(segments), _chunks(text, cuts))


def _inside(position: int, cuts: list[tuple[int, int, str]]) -> bool:
    return any(start <= position < end for start, end, _ in cuts)


def _chunks(text: str, cuts: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """`text` as chunks: the cuts (in order, overlapping none), and `text` chunks between them; `drop` cuts
    (a marker character, a segment's edge) are left out."""
    chunks, position = [], 0
    for start, end, kind in sorted(cuts):
        if start < position:
            continue
        if start > position:
            chunks.append((position, start, "text"))
        if kind != "drop" and end > start:
            chunks.append((start, end, kind))
        position = end
    if position < len(text):
        chunks.append((position, len(text), "text"))
    return chunks


def _encode_each(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


# Special tokens typed as text ---------------------------------------------------------------------------------

_CONTROLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _control_texts(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The texts of the tokenizer's special tokens, longest first: what a template writes to mark turns."""
    if tokenizer not in _CONTROLS:
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        texts = {token.content for token in added.values() if token.special} | set(tokenizer.all_special_tokens)
        _CONTROLS[tokenizer] = tuple(sorted((text for text in texts if text), key=lambda text: (-len(text), text)))
    return _CONTROLS[tokenizer]


_CONTROL_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _control_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    if tokenizer not in _CONTROL_IDS:
        _CONTROL_IDS[tokenizer] = frozenset(tokenizer.convert_tokens_to_ids(list(_control_texts(tokenizer))))
    return _CONTROL_IDS[tokenizer]


_PATTERNS: dict[tuple[str, ...], re.Pattern] = {}


def _control_pattern(controls: tuple[str, ...]) -> re.Pattern:
    if controls not in _PATTERNS:
        _PATTERNS[controls] = re.compile("|".join(map(re.escape, controls)))
    return _PATTERNS[controls]


def _texts_of(conversation: Conversation) -> list[str]:
    """Every text of the conversation that comes from its author rather than from the template."""
    texts = [*conversation.tools]
    for turn in conversation.turns:
        texts += [turn.content, turn.reasoning or "", *(call.arguments for call in turn.tool_calls)]
    return texts


def _mentions(conversation: Conversation, pattern: re.Pattern) -> bool:
    return any(pattern.search(text) for text in _texts_of(conversation))


def _mark_control_texts(
    conversation: Conversation, controls: tuple[str, ...]
) -> tuple[Conversation, tuple[str, str] | None]:
    """The conversation with each special token's text in its content put between two marker characters (ones
    that occur nowhere in it), so that they can be found in the rendered text and tokenized as plain text."""
    pattern = _control_pattern(controls)
    if not _mentions(conversation, pattern):
        return conversation, None
    used = set("".join(_texts_of(conversation)))
    start, end = next((chr(c), chr(c + 1)) for c in range(0xE000, 0xF8FF, 2) if not {chr(c), chr(c + 1)} & used)

    def mark(text: str) -> str:
        return pattern.sub(lambda match: start + match.group(0) + end, text)

    turns = tuple(
        replace(turn, content=mark(turn.content), reasoning=mark(turn.reasoning) if turn.reasoning else turn.reasoning,
                tool_calls=tuple(replace(call, arguments=mark(call.arguments)) for call in turn.tool_calls))
        for turn in conversation.turns
    )  # fmt: skip
    return replace(conversation, turns=turns, tools=tuple(map(mark, conversation.tools))), (start, end)


def plain_text_ids(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """`text` tokenized with no special token in it, even where the text spells one.

    `split_special_tokens` is not always enough: a tokenizer whose model holds the special token as a piece of
    its own vocabulary (InternLM2's SentencePiece `<|im_start|>`) still produces it. Then the text is cut
    inside each such token's text, so that no piece holds it whole."""
    ids = _after_text(text, tokenizer)
    if len(text) < 2 or not _control_ids(tokenizer).intersection(ids):
        return ids
    match = _control_pattern(_control_texts(tokenizer)).search(text)
    cut = match.start() + 1 if match else len(text) // 2
    return plain_text_ids(text[:cut], tokenizer) + plain_text_ids(text[cut:], tokenizer)


def _after_text(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """`text` tokenized as plain text as it reads after other text: tokenized alone, a SentencePiece tokenizer
    would start it with a word-start `▁` (a space that is not there). So it is tokenized after a newline, whose
    tokens are then dropped, unless the two merge."""
    def split(piece: str) -> list[int]:
        return tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    head, anchored = split("\n"), split("\n" + text)
    return anchored[len(head) :] if anchored[: len(head)] == head else split(text)


def _fit(input_ids, labels, max_length: int | None, images: tuple[str, ...], image_tokens: int) -> Encoded:
    """Truncated to `max_length`; a cut through an image's patches moves back to where they start, and only the
    images wholly kept stay with the sample."""
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        cut = max_length
        if images:  # the cut falls inside the last kept image's patches when their count is not whole
            cut -= input_ids[:cut].count(IMAGE_TOKEN_ID) % image_tokens
        input_ids, labels = input_ids[:cut], labels[:cut]
    if images:
        images = images[: input_ids.count(IMAGE_TOKEN_ID) // image_tokens]
    return Encoded(input_ids, labels, truncated, tuple(images))


def last_turn_trained_only(conversation: Conversation) -> Conversation:
    """The conversation with every trainable turn but the last one made untrainable."""
    trainable = [index for index, turn in enumerate(conversation.turns) if turn.trainable]
    turns = tuple(
        replace(turn, trainable=False) if index in trainable[:-1] else turn
        for index, turn in enumerate(conversation.turns)
    )
    return replace(conversation, turns=turns)


def _trained_spans(segments: list[Segment]) -> list[tuple[int, int]]:
    spans, position = [], 0
    for text, trained in segments:
        if trained:
            spans.append((position, position + len(text)))
        position += len(text)
    return spans
