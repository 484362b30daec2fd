"""Pack encoded samples into rows of exactly `max_length` tokens, samples never split.

Rows are filled best-fit-decreasing (the longest sample first, each into the fullest row it still
fits), which leaves little padding; what is left of a row becomes one padding segment with no loss.
Each sample keeps its own `position_ids` from 0 and its length in `seq_lens`, so attention can be
kept inside it.
"""

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from xtune.data.encode import IGNORE_INDEX, Encoded


@dataclass(frozen=True)
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_lens: list[int]
    """Length of each segment in order; the last is the padding when `padding` > 0."""
    padding: int
    images: tuple[str, ...] = ()
    """The images of its samples, in order."""
    groups: tuple[int, ...] = ()
    """The index of each group packed in it, in order (`pack_groups`): what per-group data is looked up by."""

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def plan_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Indices of the samples in each row, best-fit decreasing."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[tuple[int, int]] = []  # (space left, row index), kept sorted
    rows: list[list[int]] = []
    for index in order:
        length = lengths[index]
        if length > max_length:
            raise ValueError(f"sample {index} has {length} tokens, more than max_length={max_length}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            rows.append([index])
            bisect.insort(free, (max_length - length, len(rows) - 1))
        else:
            space, row = free.pop(slot)
            rows[row].append(index)
            bisect.insort(free, (space - length, row))
    return rows


def build_row(samples: Sequence[Encoded], max_length: int, pad_token_id: int) -> PackedRow:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    seq_lens: list[int] = []
    for sample in samples:
        n = len(sample.input_ids)
        input_ids += sample.input_ids
        # a segment's first token is never a target: it would be predicted from the previous sample
        labels += [IGNORE_INDEX, *sample.labels[1:]]
        position_ids += range(n)
        seq_lens.append(n)
    padding = max_length - len(input_ids)
    if padding:
        input_ids += [pad_token_id] * padding
        labels += [IGNORE_INDEX] * padding
        position_ids += range(padding)
        seq_lens.append(padding)
    return PackedRow(input_ids, labels, position_ids, seq_lens, padding, tuple(p for s in samples for p in s.images))


def pack(
    samples: Sequence[Encoded], max_length: int, pad_token_id: int, shuffle_seed: int | None = None
) -> list[PackedRow]:
    """Rows of exactly `max_length` tokens. With `shuffle_seed`, samples are shuffled before packing
    (which samples share a row) and rows are returned in shuffled order."""
    return pack_groups([[sample] for sample in samples], max_length, pad_token_id, shuffle_seed)


def pack_groups(
    groups: Sequence[Sequence[Encoded]], max_length: int, pad_token_id: int, shuffle_seed: int | None = None
) -> list[PackedRow]:
    """`pack` for groups of samples that stay side by side in one row, each its own segment (a preference pair's
    chosen and rejected answers)."""
    order = list(range(len(groups)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    lengths = [sum(len(sample.input_ids) for sample in groups[i]) for i in order]
    rows = [
        replace(build_row([sample for i in row for sample in groups[order[i]]], max_length, pad_token_id),
                groups=tuple(order[i] for i in row))
        for row in plan_rows(lengths, max_length)
    ]  # fmt: skip
    if shuffle_seed is not None:
        random.Random(shuffle_seed + 1).shuffle(rows)
    return rows


def packing_efficiency(rows: Sequence[PackedRow], max_length: int) -> float:
    """Share of the row tokens that are sample tokens, not padding."""
    if not rows:
        return 0.0
    return 1 - sum(row.padding for row in rows) / (len(rows) * max_length)


def collate_packed(rows: Sequence[PackedRow]) -> dict[str, torch.Tensor | int]:
    """Rows concatenated into one row, with `cu_seq_lens_q/k` and `max_length_q/k` for varlen attention."""
    seq_lens = [n for row in rows for n in row.seq_lens]
    cu_seq_lens = torch.tensor([0, *seq_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    total = sum(seq_lens)
    images = [path for row in rows for path in row.images]
    return ({"images": images} if images else {}) | {
        "input_ids": torch.tensor([[t for row in rows for t in row.input_ids]]),
        "labels": torch.tensor([[t for row in rows for t in row.labels]]),
        "position_ids": torch.tensor([[p for row in rows for p in row.position_ids]]),
        "attention_mask": torch.ones((1, total), dtype=torch.long),
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max(seq_lens),
        "max_length_k": max(seq_lens),
    }
