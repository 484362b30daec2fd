"""Files -> records -> conversations -> encoded samples -> padded batches."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xtune.data.encode import IGNORE_INDEX, Encoded, encode
from xtune.data.formats import FORMATS, Conversation, RecordError, detect_format, with_system
from xtune.data.templates import ChatTemplate
from xtune.errors import DataError

TINY_PREFIX = "xtune-tiny/"


def resolve_data_path(data_path: str) -> Path:
    """A local file, or `xtune-tiny/<name>` for a dataset xtune generates itself."""
    if data_path.startswith(TINY_PREFIX):
        from xtune.testing.tasks import tiny_dataset_path

        return tiny_dataset_path(data_path[len(TINY_PREFIX) :])
    path = Path(data_path)
    if not path.is_file():
        raise DataError(
            f"data_path = '{data_path}' does not exist (looked at {path.resolve()}). "
            "Fix data_path (or data_root) in the config."
        )
    return path


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs; location is `file:line` for .jsonl and `file[record N]` for .json."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno}).") from None
    elif path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno}).") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: a .json dataset must be a list of records, got {type(records).__name__}.")
        for index, record in enumerate(records):
            yield f"{path}[record {index}]", record
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .json or .jsonl.")


def load_conversations(path: Path, dataset_format: str = "auto", system: str = "") -> list[Conversation]:
    """Every record of the file in the standard form, with `system` added where a record has none."""
    conversations = []
    map_fn = None if dataset_format == "auto" else FORMATS[dataset_format]
    for location, record in read_records(path):
        try:
            if map_fn is None:
                map_fn = FORMATS[detect_format(record)]
            if not isinstance(record, dict):
                raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
            conversations.append(with_system(map_fn(record), system))
        except RecordError as error:
            raise DataError(f"{location}: {error}.") from None
    if not conversations:
        raise DataError(f"{path}: no records; the file is empty.")
    return conversations


@dataclass(frozen=True)
class EncodeStats:
    samples: int
    truncated: int
    dropped_untrained: int
    """Samples left without any trained token after truncation; they are not used."""
    tokens: int
    trained_tokens: int


def encode_all(
    conversations: list[Conversation], template: ChatTemplate, tokenizer, max_length: int
) -> tuple[list[Encoded], EncodeStats]:
    encoded = [encode(c, template, tokenizer, max_length) for c in conversations]
    kept = [sample for sample in encoded if sample.num_trained > 0]
    stats = EncodeStats(
        samples=len(kept),
        truncated=sum(sample.truncated for sample in encoded),
        dropped_untrained=len(encoded) - len(kept),
        tokens=sum(len(sample.input_ids) for sample in kept),
        trained_tokens=sum(sample.num_trained for sample in kept),
    )
    return kept, stats


def collate(samples: list[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `labels` (-100 on padding) and `attention_mask`."""
    length = max(len(sample.input_ids) for sample in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids)
        labels[row, :n] = torch.tensor(sample.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
