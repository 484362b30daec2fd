"""Files -> records -> conversations -> encoded samples -> padded batches.

Reading lives in `xtune.data.sources`; `resolve_data_path`, `read_records` and `load_conversations`
are importable from here as well.
"""

from pathlib import Path

import torch

from xtune.data.encode import IGNORE_INDEX, Encoded
from xtune.data.formats import Conversation
from xtune.data.sources import SourceSpec, load_sources, read_records, resolve_data_path

__all__ = ["collate", "length_grouped_batches", "load_conversations", "read_records", "resolve_data_path", "shuffled_batches"]


def load_conversations(
    path: str | Path,
    dataset_format: str = "auto",
    system: str = "",
    *,
    image_folder: str | None = None,
    skip_bad_records: bool = False,
    check_images: bool = True,
) -> list[Conversation]:
    """Every record of one source in the standard form, with `system` added where a record has none.

    `path` is anything `SourceSpec.path` takes; a bad record raises a DataError naming its location
    unless `skip_bad_records` (use `load_sources` to get the skipped ones and to mix sources).
    """
    source = SourceSpec(str(path), dataset_format, image_folder=image_folder)
    loaded = load_sources([source], system=system, skip_bad_records=skip_bad_records, check_images=check_images)
    return loaded.conversations


def collate(samples: list[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `labels` (-100 on padding) and `attention_mask`; `images` (paths, in order)
    when samples have any."""
    length = max(len(sample.input_ids) for sample in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids)
        labels[row, :n] = torch.tensor(sample.labels)
        attention_mask[row, :n] = 1
    images = [path for sample in samples for path in sample.images]
    return ({"images": images} if images else {}) | {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def shuffled_batches(num_items: int, batch_size: int, seed: int) -> list[list[int]]:
    """Indices of each batch: a seeded shuffle cut into batches."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[start : start + batch_size] for start in range(0, num_items, batch_size)]


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, group: int = 64) -> list[list[int]]:
    """Batches of samples of similar length (less padding), still random: a seeded shuffle is cut into
    groups of `group` batches, each group sorted by length and cut into batches, and the batches shuffled."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    span = batch_size * group
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
