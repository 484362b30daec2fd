"""Where records come from: files, folders and saved Hugging Face datasets -> located conversations.

Reading is split in two. `read_conversations` yields, for each record, either `(location,
Conversation)` or a `BadRecord`, and never raises for a bad record, so that `check-dataset` can list
every one. `load_sources` is the policy: it raises a `DataError` on the first bad record, or with
`skip_bad_records` collects them, and it mixes several sources, each repeated `repeats` times.

A location names a record for people: `file:line` for .jsonl, .txt and .csv (the line a row starts
on), `file[record N]` for .json and `file[row N]` for .parquet and saved datasets, N counting from 0
as in `records[N]` and `dataset[N]`.
"""

import csv
import dataclasses
import importlib
import io
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import reduce
from importlib import resources
from pathlib import Path
from typing import Any

from xtune.data.formats import (
    FORMATS, Conversation, RecordError, check_conversation, detect_format, rounds_of, with_placeholders, with_system,
)  # fmt: skip
from xtune.config.schema import names_code
from xtune.data import hf_cache
from xtune.data.xtuner_maps import XTUNER_FORMATS, builtin_map_function
from xtune.errors import DataError

TINY_PREFIX = "xtune-tiny/"


@dataclass(frozen=True)
class SourceSpec:
    path: str
    """A .json (a list of records, or JSON Lines), .jsonl, .parquet, .csv or .txt file; a folder of
    them, read recursively in sorted order; a folder written by `datasets`' `save_to_disk` (a
    DatasetDict's `train` split); or `xtune-tiny/<name>`."""
    format: str = "auto"
    """A name in `FORMATS`, `auto` to detect it per file from its first record, or a map function's
    dotted path `package.module:function` (or `package.module.function`)."""
    repeats: float = 1.0
    """How often each record is used: 2 uses each twice, 0.5 a seeded random half, 1.5 each once and
    a seeded random half once more; the fraction of the records is rounded to the nearest count."""
    image_folder: str | None = None
    """Folder that relative image paths are read from; None reads them from the current folder."""
    max_records: int | None = None
    """Read a seeded random `max_records` of the source's good records (all when it has fewer), before
    `repeats`: XTuner's `max_dataset_length`."""


@dataclass(frozen=True)
class BadRecord:
    """A record (or a whole file) that could not be read, and why."""

    location: str
    message: str
    cause: BaseException | None = field(default=None, compare=False, repr=False)
    """The exception a user's map function raised, kept for `--debug` stack traces."""

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


Located = tuple[str, Conversation]


@dataclass(frozen=True)
class Loaded:
    samples: list[Located]
    """(location, conversation) for every sample, sources in order, repeats applied."""
    skipped: list[BadRecord]
    """Bad records left out under `skip_bad_records`, each once whatever its source's repeats."""
    counts: list[int] = field(default_factory=list)
    """Samples each source gave, repeats applied, in the order of the specs."""

    @property
    def conversations(self) -> list[Conversation]:
        return [conversation for _, conversation in self.samples]


BUILTIN_PREFIX = "xtune-data/"
BUILTIN_DATASETS = {"self_cognition": ("name", "author")}
"""Datasets shipped with xtune (`data_path = "xtune-data/NAME"`) -> the `data_placeholders` keys their texts hold.
self_cognition: alpaca questions about the assistant's identity ("Who are you?", "你是谁？") answered with
{{name}} and {{author}}, to teach a tuned model its own name."""


def resolve_data_path(data_path: str) -> Path:
    """A local file or folder, `xtune-tiny/<name>` for a dataset xtune generates itself, `xtune-data/<name>` for
    one it ships (BUILTIN_DATASETS), or a Hugging Face dataset id in the local caches (`hf_cache`)."""
    if data_path.startswith(TINY_PREFIX):
        from xtune.testing.tasks import tiny_dataset_path

        return tiny_dataset_path(data_path[len(TINY_PREFIX) :])
    if data_path.startswith(BUILTIN_PREFIX):
        name = data_path[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_DATASETS:
            shipped = ", ".join(BUILTIN_PREFIX + known for known in BUILTIN_DATASETS)
            raise DataError(f"data_path = '{data_path}': no such dataset; xtune ships {shipped}.")
        return Path(str(resources.files("xtune.data") / "builtin" / f"{name}.json"))
    path = Path(data_path)
    if not path.exists() and hf_cache.looks_like_dataset_id(data_path):
        found, places = hf_cache.find_dataset(data_path, tuple(READERS))
        if found is None:
            raise hf_cache.not_found(data_path, path, places)
        return found
    if not path.exists():
        raise DataError(
            f"data_path = '{data_path}' does not exist (looked at {path.resolve()}). "
            "Fix data_path (or data_root, or the path in datasets) in the config."
        )
    return path


def map_function(dataset_format: str) -> Callable[[Any], Conversation]:
    """A format name of `FORMATS` or XTuner's (`XTUNER_FORMATS`, also as `NAME_map_fn`), or the dotted path of a
    user's function from a raw record to a Conversation."""
    if (builtin := builtin_map_function(dataset_format)) is not None:
        return builtin
    if not names_code(dataset_format):
        raise DataError(
            f"unknown dataset_format '{dataset_format}'; use auto, {', '.join(FORMATS)}, XTuner's "
            f"{', '.join(XTUNER_FORMATS)} (or NAME_map_fn; `xtune list-dataset-format` lists them), or the dotted path "
            "of your own map function, 'package.module:function'."
        )
    split = dataset_format.partition(":") if ":" in dataset_format else dataset_format.rpartition(".")
    module_name, _, attribute = split
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise DataError(
            f"dataset_format '{dataset_format}': cannot import module '{module_name}' ({error}). "
            "Install it, or add the folder that holds it to PYTHONPATH."
        ) from error
    except Exception as error:
        raise DataError(
            f"dataset_format '{dataset_format}': importing '{module_name}' failed ({type(error).__name__}: {error})."
        ) from error
    function = reduce(lambda owner, name: getattr(owner, name, None), attribute.split("."), module)
    if not callable(function):
        raise DataError(f"dataset_format '{dataset_format}': module '{module_name}' has no function '{attribute}'.")
    return function


# Files -> raw records ----------------------------------------------------------------------------

RawItem = tuple[str, Any] | BadRecord


def _lines(path: Path) -> Iterator[tuple[int, str] | BadRecord]:
    """(line number, text) of each non-blank line; a line that is not UTF-8 is a BadRecord."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield BadRecord(f"{path}:{number}", f"not UTF-8 text (byte {error.start + 1} of the line)")
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")
            if text.strip():
                yield number, text


_JSON_NESTING = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}\n]')
"""Strings (whose brackets do not nest), brackets and line ends: all `too_deep` needs of JSON text."""


def too_deep(text: str) -> tuple[int, str]:
    """(line, message) for JSON text whose parse ran out of stack (a RecursionError): the line where its nesting
    first reaches its deepest, and how deep that is."""
    depth = deepest = 0
    line = deepest_line = 1
    for match in _JSON_NESTING.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > deepest:
                deepest, deepest_line = depth, line
        elif token in ("]", "}"):
            depth -= 1
        else:
            line += token.count("\n")
    return deepest_line, (
        f"JSON nested {deepest:,} levels deep, deeper than Python's JSON parser reads (records are a few levels deep)"
    )


def _parse_line(location: str, text: str) -> RawItem:
    try:
        return location, json.loads(text)
    except json.JSONDecodeError as error:
        return BadRecord(location, f"not valid JSON ({error.msg} at column {error.colno})")
    except RecursionError:
        return BadRecord(location, too_deep(text)[1])
    except ValueError as error:
        return BadRecord(location, f"not valid JSON ({type(error).__name__}: {error})")


def _read_jsonl(path: Path) -> Iterator[RawItem]:
    for item in _lines(path):
        yield item if isinstance(item, BadRecord) else _parse_line(f"{path}:{item[0]}", item[1].rstrip("\r\n"))


def _decode(path: Path) -> str | BadRecord:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        return BadRecord(f"{path}:{line}", "not UTF-8 text; the whole file is unreadable")


def _looks_like_json_lines(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except (ValueError, RecursionError):
        return False


def _read_json(path: Path) -> Iterator[RawItem]:
    text = _decode(path)
    if isinstance(text, BadRecord):
        yield text
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and _looks_like_json_lines(text):
            yield from _read_jsonl(path)
        else:
            yield BadRecord(
                f"{path}:{error.lineno}",
                f"not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                "the whole file is unreadable",
            )
        return
    except RecursionError:
        line, message = too_deep(text)
        yield BadRecord(f"{path}:{line}", f"{message}; the whole file is unreadable")
        return
    except ValueError as error:
        yield BadRecord(str(path), f"not valid JSON ({type(error).__name__}: {error}); the whole file is unreadable")
        return
    if not isinstance(records, list):
        kind = type(records).__name__
        yield BadRecord(str(path), f"a .json dataset must be a list of records (or JSON Lines), got {kind}")
        return
    for index, record in enumerate(records):
        yield f"{path}[record {index}]", record


def _read_txt(path: Path) -> Iterator[RawItem]:
    """One document per line, as XTuner and LLaMA-Factory read text files; blank lines are skipped."""
    for item in _lines(path):
        yield item if isinstance(item, BadRecord) else (f"{path}:{item[0]}", {"text": item[1].rstrip("\r\n")})


def _read_csv(path: Path) -> Iterator[RawItem]:
    """A header row of field names, then one record per row, every value a string."""
    text = _decode(path)
    if isinstance(text, BadRecord):
        yield text
        return
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    rows = csv.reader(io.StringIO(text, newline=""))
    header: list[str] = []
    end = 0
    try:
        while not header:
            header = next(rows, None)
            if header is None:
                return
            end = rows.line_num
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            yield BadRecord(
                f"{path}:{end}", f"the header names {', '.join(map(repr, repeated))} more than once, so one column "
                "would hide the other; rename the columns (the file is not read)",
            )  # fmt: skip
            return
        for row in rows:
            start, end = end + 1, rows.line_num
            if not row:
                continue
            location = f"{path}:{start}"
            if len(row) > len(header):
                yield BadRecord(location, f"the row has {len(row)} fields but the header has {len(header)}")
            else:
                yield location, dict(zip(header, row)) | {name: None for name in header[len(row) :]}
    except csv.Error as error:
        yield BadRecord(f"{path}:{rows.line_num}", f"not valid CSV ({error}); the rest of the file is unreadable")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _read_parquet(path: Path) -> Iterator[RawItem]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield f"{path}[row {row}]", record
                row += 1
    except (pa.ArrowException, OSError) as error:
        location = f"{path}[row {row}]" if row else str(path)
        yield BadRecord(location, f"not a readable Parquet file ({_one_line(error)})")


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    if (path / "dataset_dict.json").is_file():
        return True
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _read_saved_dataset(path: Path) -> Iterator[RawItem]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises assorted types for a damaged folder
        yield BadRecord(str(path), f"not a readable saved dataset ({type(error).__name__}: {_one_line(error)})")
        return
    prefix = str(path)
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            splits = ", ".join(dataset) or "none"
            example = path / next(iter(dataset), "<split>")
            raise DataError(
                f"{path}: the saved dataset has splits {splits} but no 'train'; "
                f"point the data path at one split's folder, e.g. {example}."
            )
        dataset, prefix = dataset["train"], str(path / "train")
    row = 0
    for table in dataset.with_format("arrow").iter(batch_size=1024):
        for record in table.to_pylist():
            yield f"{prefix}[row {row}]", record
            row += 1


def _read_arrow(path: Path) -> Iterator[RawItem]:
    """An Arrow file `datasets` wrote (its cache's `NAME-train.arrow`, a saved dataset's `data-*.arrow`)."""
    import datasets

    try:
        dataset = datasets.Dataset.from_file(str(path))
    except Exception as error:  # pyarrow and datasets raise assorted types for a damaged file
        yield BadRecord(str(path), f"not a readable Arrow file of a dataset ({type(error).__name__}: {_one_line(error)})")
        return
    row = 0
    for table in dataset.with_format("arrow").iter(batch_size=1024):
        for record in table.to_pylist():
            yield f"{path}[row {row}]", record
            row += 1


READERS: dict[str, Callable[[Path], Iterator[RawItem]]] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
    ".txt": _read_txt,
    ".arrow": _read_arrow,
}
"""File suffix -> reader of its raw records."""


def data_files(path: Path) -> list[Path]:
    """The files and saved-dataset folders `path` stands for: itself, or what a folder holds, sorted
    and recursively; hidden entries and files of other types in a folder are passed over."""
    if path.is_file() or is_saved_dataset(path):
        return [path]
    if hf_cache.is_hub_snapshot(path):
        return hf_cache.snapshot_train_files(path, tuple(READERS))
    if hf_cache.is_datasets_cache_folder(path):
        return hf_cache.train_arrow_files(path)
    if not path.is_dir():
        raise DataError(f"data path '{path}' does not exist (looked at {path.resolve()}).")
    found: list[Path] = []
    seen: set[Path] = set()

    def visit(folder: Path) -> None:
        if folder.resolve() in seen:  # a symbolic link back up the tree
            return
        seen.add(folder.resolve())
        for child in sorted(folder.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir() and is_saved_dataset(child):
                found.append(child)
            elif child.is_dir():
                visit(child)
            elif child.suffix.lower() in READERS:
                found.append(child)

    visit(path)
    if not found:
        raise DataError(
            f"{path}: the folder holds no data files ({', '.join(READERS)}) and no saved dataset."
        )
    return found


def read_records(path: Path) -> Iterator[RawItem]:
    """(location, raw record) for each record of one file or saved dataset, or a BadRecord for one
    that cannot be parsed; an empty file is a BadRecord too."""
    if path.is_dir():
        reader = _read_saved_dataset
    else:
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            yield BadRecord(str(path), f"unsupported file type '{path.suffix}'; use one of {', '.join(READERS)}")
            return
    empty = True
    for item in reader(path):
        empty = False
        yield item
    if empty:
        yield BadRecord(str(path), "no records; the file is empty")


# Raw records -> conversations ---------------------------------------------------------------------


def _record_id(record: Any) -> str:
    record_id = record.get("id") if isinstance(record, dict) else None
    return f" of record id {record_id!r}" if record_id is not None else ""


def _with_image_paths(conversation: Conversation, record: Any, image_folder: str | None, check: bool) -> Conversation:
    if not conversation.images:
        return conversation
    paths = tuple(
        path if image_folder is None or os.path.isabs(path) else os.path.join(image_folder, path)
        for path in conversation.images
    )
    for written in conversation.images:
        if "\0" in written:
            raise RecordError(f"image path {written!r}{_record_id(record)} holds a NUL character; fix the path")
    if image_folder is not None:
        root = os.path.realpath(image_folder)
        for written, path in zip(conversation.images, paths):
            if os.path.commonpath([root, os.path.realpath(path)]) != root:
                raise RecordError(
                    f"image '{written}'{_record_id(record)} lies outside image_folder {image_folder} (it leads to "
                    f"{os.path.realpath(path)}); images are read only from inside image_folder: move the image in, "
                    "or set image_folder to a folder that holds it"
                )
    if check:
        for written, path in zip(conversation.images, paths):
            if not os.path.isfile(path):
                raise RecordError(
                    f"image '{written}'{_record_id(record)} not found (looked at {Path(path).resolve()}); "
                    "set image_folder, or fix the path"
                )
            _check_image(written, path, record)
    return dataclasses.replace(conversation, images=paths)


def _check_image(written: str, path: str, record: Any) -> None:
    """Decodes the file: one that is not an image, is cut short (a valid header and half its data) or would
    decompress to more pixels than Pillow allows is the record's fault now, not a crash hours into training. A JPEG
    is decoded at an eighth of its size (`draft`), which still reads all of its data."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Image.DecompressionBombError as error:
        raise RecordError(f"image '{written}'{_record_id(record)} is too large to decode ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise RecordError(f"image '{written}'{_record_id(record)} cannot be read as an image ({error})") from None


def _convert(map_fn: Callable, name: str, record: Any) -> Conversation:
    """The record mapped and checked; a user's function failing in any way is the record's fault."""
    try:
        conversation = map_fn(record)
        if builtin_map_function(name) is None:
            check_conversation(conversation)
    except RecordError as error:
        raise RecordError(f"{error} (format '{name}')") from error.__cause__
    except Exception as error:
        if builtin_map_function(name) is not None:
            raise
        raise RecordError(f"map function '{name}' failed ({type(error).__name__}: {error})") from error
    return conversation


def read_conversations(
    path: str | Path,
    dataset_format: str = "auto",
    *,
    image_folder: str | None = None,
    check_images: bool = True,
) -> Iterator[Located | BadRecord]:
    """(location, conversation) for each good record of a source, a BadRecord for each bad one.

    With `auto`, each file's format is detected from its first record (records before the first
    one of a known format are bad). Image paths are joined to `image_folder`, and with
    `check_images` a missing image file makes the record bad.
    """
    fixed = None if dataset_format == "auto" else map_function(dataset_format)
    for file in data_files(resolve_data_path(str(path))):
        map_fn, name = fixed, dataset_format
        for item in read_records(file):
            if isinstance(item, BadRecord):
                yield item
                continue
            location, record = item
            try:
                if map_fn is None:  # a .txt file is text to pretrain on, whatever its first line says
                    name = "text" if file.suffix == ".txt" else detect_format(record)
                    map_fn = FORMATS[name]
                conversation = _with_image_paths(_convert(map_fn, name, record), record, image_folder, check_images)
            except RecordError as error:
                yield BadRecord(location, str(error), error.__cause__)
                continue
            yield location, conversation


# Policy: raise or collect, then mix -------------------------------------------------------------


def at_most(records: list, max_records: int | None, rng: random.Random) -> list:
    """A random `max_records` of `records`, in their order; all of them when there are no more."""
    if max_records is None or len(records) <= max_records:
        return records
    return [records[index] for index in sorted(rng.sample(range(len(records)), max_records))]


def repeat(samples: list[Located], repeats: float, rng: random.Random) -> list[Located]:
    """Each sample `int(repeats)` times, then a random `fraction * len(samples)` of them (rounded) once more."""
    whole = math.floor(repeats)
    extra = math.floor((repeats - whole) * len(samples) + 0.5)
    picked = sorted(rng.sample(range(len(samples)), extra))
    return samples * whole + [samples[index] for index in picked]


def load_sources(
    specs: Sequence[SourceSpec],
    *,
    system: str = "",
    skip_bad_records: bool = False,
    check_images: bool = True,
    seed: int = 0,
    placeholders: dict[str, str] | None = None,
    split_rounds: bool = False,
) -> Loaded:
    """Every source's conversations, each repeated per its spec, with `system` added where a record has none and
    each `{{KEY}}` of `placeholders` in their texts replaced by its value (a built-in dataset's keys must be given);
    with `split_rounds`, each trained answer a sample of its own (`rounds_of`), located as `LOCATION round N`.

    A bad record raises a one-line DataError naming its location, unless `skip_bad_records`, which
    leaves it out and lists it in `Loaded.skipped`. Paths, formats and repeats are checked before
    anything is read. The fraction of `repeats` picks records with a generator seeded by `seed` and
    the source's position in `specs`.
    """
    if not specs:
        raise DataError("no data sources; set data_path (or datasets) in the config.")
    for spec in specs:
        if not (isinstance(spec.repeats, (int, float)) and math.isfinite(spec.repeats) and spec.repeats >= 0):
            raise DataError(f"{spec.path}: repeats must be a number >= 0, got {spec.repeats!r}.")
        if spec.format != "auto":
            map_function(spec.format)
        data_files(resolve_data_path(spec.path))
        builtin = spec.path.startswith(BUILTIN_PREFIX)
        needed = BUILTIN_DATASETS[spec.path.removeprefix(BUILTIN_PREFIX)] if builtin else ()
        if missing := [key for key in needed if not (placeholders or {}).get(key)]:
            example = ", ".join(f'"{key}": "..."' for key in needed)
            written = ", ".join("{{" + key + "}}" for key in missing)
            raise DataError(f"{spec.path} writes {written}: set data_placeholders = {{{example}}} in the config (the "
                            "assistant's name and who made it).")  # fmt: skip
    samples: list[Located] = []
    skipped: list[BadRecord] = []
    counts: list[int] = []
    for index, spec in enumerate(specs):
        records: list[Located] = []
        items = read_conversations(spec.path, spec.format, image_folder=spec.image_folder, check_images=check_images)
        for item in items:
            if isinstance(item, BadRecord):
                if not skip_bad_records:
                    raise DataError(f"{item}.") from item.cause
                skipped.append(item)
            else:
                records.append((item[0], with_placeholders(with_system(item[1], system), placeholders or {})))
        rng = random.Random(f"{seed}/{index}")
        good: list[Located] = []
        for location, conversation in at_most(records, spec.max_records, rng):
            rounds = rounds_of(conversation) if split_rounds else [conversation]
            good += [(f"{location} round {n}" if len(rounds) > 1 else location, c) for n, c in enumerate(rounds, 1)]
        repeated = repeat(good, spec.repeats, rng)
        counts.append(len(repeated))
        samples += repeated
    if not samples:
        paths = ", ".join(spec.path for spec in specs)
        if skipped:
            raise DataError(f"no usable records in {paths}: all {len(skipped)} were bad; the first: {skipped[0]}.")
        raise DataError(f"no samples from {paths}: repeats leave none.")
    return Loaded(samples, skipped, counts)
