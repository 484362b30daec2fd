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

import math
import random
from dataclasses import dataclass, replace
from typing import Any

import torch

from xtune.data.encode import Encoded, encode
from xtune.data.formats import (
    Conversation,
    RecordError,
    _object,
    openai_to_standard,
    sharegpt_to_standard,
    with_placeholders,
    with_system,
)
from xtune.data.loader import collate
from xtune.data.packing import PackedRow, build_row, collate_packed, pack_groups
from xtune.data.sources import BadRecord, at_most, data_files, read_records, repeat, resolve_data_path
from xtune.data.templates import Template
from xtune.errors import DataError, short_repr


@dataclass(frozen=True)
class PreferencePair:
    """The same prompt answered twice; each conversation trains its answer's turns only."""

    chosen: Conversation
    rejected: Conversation
    margin: float = 0.0
    """How much more the chosen answer is preferred (the record's `margin`, as TRL's reward datasets give it): a
    reward model's loss asks for r_chosen - r_rejected > margin (Llama 2's margin loss). Other stages ignore it."""


@dataclass(frozen=True)
class Unpaired:
    """A prompt and one answer, desirable or not (KTO)."""

    conversation: Conversation
    desirable: bool
    prompt_turns: int
    """The turns before the answer."""


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
    return PreferencePair(*(_answers_trained(c, shared) for c in conversations), _margin(record.get("margin")))


def _margin(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(f"field 'margin' must be a finite number, got {short_repr(value)}")
    return float(value)


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
    prompt_turns = len(conversation.turns) - _answer_turns(conversation, completion)
    return Unpaired(_answers_trained(conversation, prompt_turns), label, prompt_turns)


def mismatched(examples: list[Unpaired], seed: int = 0) -> list[Conversation]:
    """KTO's KL estimate reads each prompt followed by another example's answer: here the next one's in a seeded
    order (TRL pairs them within a batch; a fixed pairing makes the estimate independent of the batching)."""
    order = list(range(len(examples)))
    random.Random(f"kto/{seed}").shuffle(order)
    partner = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    conversations = []
    for index, example in enumerate(examples):
        other = examples[partner[index]]
        turns = example.conversation.turns[: example.prompt_turns] + other.conversation.turns[other.prompt_turns :]
        conversations.append(replace(example.conversation, turns=turns))
    return conversations


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


# Encoding, packing and batching pairs ----------------------------------------------------------------------------

EncodedPair = tuple[Encoded, Encoded]
"""(chosen, rejected), each the prompt and its answer, the answer's tokens trained."""


def encode_pair(
    pair: PreferencePair, template: Template, tokenizer, max_length: int | None = None, split_special_tokens: bool = False
) -> EncodedPair:
    """Both conversations of a pair through the SFT encoder (the same template and token-exact rules)."""
    return tuple(encode(c, template, tokenizer, max_length, split_special_tokens=split_special_tokens)
                 for c in (pair.chosen, pair.rejected))  # fmt: skip


def pack_pairs(
    pairs: list[EncodedPair], max_length: int, pad_token_id: int, shuffle_seed: int | None = None
) -> list[PackedRow]:
    """Rows of exactly `max_length` tokens, each pair's chosen and rejected answers side by side as two segments of
    one row (attention never crosses segments), pairs never split; best-fit decreasing, as SFT samples pack."""
    return pack_groups(pairs, max_length, pad_token_id, shuffle_seed)


def collate_packed_pairs(rows: list[PackedRow]) -> dict:
    """`collate_packed` plus `answer_ids` [1, tokens]: each position's answer (0, 1 the first pair's chosen and
    rejected, 2, 3 the next pair's, ...), -1 on padding, and `group_ids`: the rows' groups (`PackedRow.groups`)."""
    batch = collate_packed(rows)
    answers, next_answer = [], 0
    for row in rows:
        segments = row.seq_lens[:-1] if row.padding else row.seq_lens
        for length in segments:
            answers += [next_answer] * length
            next_answer += 1
        answers += [-1] * row.padding
    batch["answer_ids"] = torch.tensor([answers])
    batch["group_ids"] = torch.tensor([group for row in rows for group in row.groups])
    return batch


def collate_pairs(pairs: list[EncodedPair], pad_token_id: int) -> dict:
    """Unpacked: rows chosen, rejected, chosen, rejected, ... right-padded (`collate`), `answer_ids`: each
    position's row, -1 on padding, and `group_ids`: the pairs' places in `pairs`."""
    return collate_answers([sample for pair in pairs for sample in pair], pad_token_id) | {
        "group_ids": torch.arange(len(pairs))}


def collate_answers(samples: list[Encoded], pad_token_id: int) -> dict:
    """Samples as right-padded rows (`collate`) with `answer_ids`: each position's row, -1 on padding."""
    batch = collate(samples, pad_token_id)
    rows = torch.arange(batch["input_ids"].shape[0])[:, None].expand_as(batch["input_ids"])
    batch["answer_ids"] = torch.where(batch["attention_mask"].bool(), rows, -1)
    return batch


@dataclass
class PreferenceCollator:
    """A preference stage's batches: its items are packed rows (`pack_groups`) or, unpacked, indices of `groups`
    (each a pair's chosen and rejected answers, or a KTO example's one answer). A batch has `answer_ids` (each
    position's answer, -1 on padding) and `group_ids` (the group of each answer's pair or example, in order); for
    KTO also `desirable` per example and `kl`: the batch of each example's prompt with a mismatched answer
    (`mismatched`), packed into one row when the items are packed."""

    groups: list[tuple[Encoded, ...]]
    pad_token_id: int
    kl: list[Encoded] | None = None
    desirable: list[bool] | None = None
    row_multiple: int = 1
    """Packed KTO: the `kl` row padded to a multiple of this many tokens (sequence parallel splits it in as many)."""

    def __call__(self, items: list) -> dict:
        packed = bool(items) and isinstance(items[0], PackedRow)
        if packed:
            batch = collate_packed_pairs(items)
        else:
            batch = collate_answers([sample for group in items for sample in self.groups[group]], self.pad_token_id)
            batch["group_ids"] = torch.tensor(items)
        groups = batch["group_ids"].tolist()
        if self.kl is not None:
            kl = [self.kl[group] for group in groups]
            if packed:
                length = sum(len(s.input_ids) for s in kl)
                length += -length % self.row_multiple
                batch["kl"] = collate_packed_pairs([build_row(kl, length, self.pad_token_id)])
            else:
                batch["kl"] = collate_answers(kl, self.pad_token_id)
            batch["desirable"] = torch.tensor([self.desirable[group] for group in groups])
        return batch


def pair_lengths(pairs: list[EncodedPair]) -> list[int]:
    return [len(chosen.input_ids) + len(rejected.input_ids) for chosen, rejected in pairs]


def load_pairs(specs, *, system: str = "", skip_bad_records: bool = False, seed: int = 0,
               placeholders: dict[str, str] | None = None, kto: bool = False) -> tuple[list[tuple[str, Any]], list]:  # fmt: skip
    """(location, pair) for every record of the sources (with `kto`, (location, Unpaired) of every {prompt,
    completion, label} record), repeats applied, and the bad records skipped; a bad record raises a DataError naming
    its location unless `skip_bad_records`, as `load_sources` does for SFT."""
    def prepared(conversation: Conversation) -> Conversation:
        return with_placeholders(with_system(conversation, system), placeholders or {})

    wanted = "kto" if kto else "preference"
    examples: list[tuple[str, Any]] = []
    skipped: list = []
    for index, spec in enumerate(specs):
        good = []
        for file in data_files(resolve_data_path(spec.path)):
            for item in read_records(file):
                if not isinstance(item, BadRecord):
                    location, record = item
                    try:
                        name = detect_preference_format(record) if spec.format == "auto" else spec.format
                        if name != wanted:
                            raise RecordError(WRONG_FORMAT[wanted].format(name=name))
                        if kto:
                            example = kto_to_unpaired(record)
                            good.append((location, replace(example, conversation=prepared(example.conversation))))
                        else:
                            pair = preference_to_pair(record)
                            good.append((location, replace(pair, chosen=prepared(pair.chosen), rejected=prepared(pair.rejected))))
                        continue
                    except RecordError as error:
                        item = BadRecord(location, str(error))
                if not skip_bad_records:
                    raise DataError(f"{item}.")
                skipped.append(item)
        rng = random.Random(f"{seed}/{index}")
        examples += repeat(at_most(good, spec.max_records, rng), spec.repeats, rng)
    if not examples:
        what = "KTO examples" if kto else "preference pairs"
        raise DataError(f"no {what} in {', '.join(spec.path for spec in specs)}"
                        + (f"; all {len(skipped)} records were bad, the first: {skipped[0]}" if skipped else "") + ".")
    return examples, skipped


WRONG_FORMAT = {
    "preference": "a '{name}' record where stage = dpo, simpo, orpo or reward reads {{prompt, chosen, rejected}} "
                  "pairs; train {{prompt, completion, label}} records with stage = 'kto'",
    "kto": "a '{name}' record where stage = 'kto' reads {{prompt, completion, label}} records; train "
           "{{prompt, chosen, rejected}} pairs with stage = 'dpo' (or give each answer as its own KTO record)",
}  # fmt: skip
