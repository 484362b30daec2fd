"""From a config to encoded training samples: read the sources, encode, apply the length policy,
and cache the result on disk so that the next run (or `xtune preprocess`) does not tokenize again.

The cache key covers everything the samples depend on: the bytes of every data file, each source's
format and repeats, the system prompt, the tokenizer, the template, max_length and the length policy.
A cache entry is written aside and renamed into place, so a half-written one is never read.
"""

import hashlib
import inspect
import json
import math
import os
import random
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from xtune.config.schema import Config, names_code
from xtune.data.encode import IGNORE_INDEX, Encoded, encode_batch
from xtune.data.formats import Conversation
from xtune.data.pairs import EncodedPair, encode_pair, load_pairs, mismatched, pair_lengths
from xtune.data.sources import SourceSpec, data_files, load_sources, map_function, resolve_data_path
from xtune.data.templates import ChatTemplate, Template, get_template
from xtune.errors import DataError, XtuneError
from xtune.paths import file_sha256, write_failure, xtune_home

CACHE_VERSION = 4
"""Bump when encoding changes, so that entries written before are not read."""


@dataclass
class DataReport:
    sources: list[tuple[str, int]]
    """(path, samples it gave with repeats applied) per source."""
    skipped: list[str] = field(default_factory=list)
    """Bad records left out (`file:line: why`), under skip_bad_records."""
    samples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_untrained: int = 0
    """Samples with no trained token left (after truncation); they are not used."""
    lengths: list[int] = field(default_factory=list)
    """Token count of every kept sample."""
    trained_tokens: int = 0
    margins: list[float] = field(default_factory=list)
    """Each kept preference pair's `margin`, in order; empty when no record gives one."""
    cache: str = ""
    """Where the encoded samples are cached."""

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def source_specs(config: Config) -> list[SourceSpec]:
    most = config.max_dataset_length
    specs = [SourceSpec(config.data_path, config.dataset_format, image_folder=config.image_folder, max_records=most)] if config.data_path else []  # fmt: skip
    specs += [SourceSpec(s.path, s.format, s.repeats, s.image_folder or config.image_folder, s.max_dataset_length or most)
              for s in config.datasets]  # fmt: skip
    return specs


def config_template(config: Config) -> Template:
    """The config's prompt template, with its thinking settings."""
    template = get_template(config.prompt_template)
    return replace(template, enable_thinking=config.enable_thinking, train_on_thinking=config.train_on_thinking)


def cache_key(config: Config, specs: list[SourceSpec], tokenizer, image_tokens: int = 0) -> str:
    digest = hashlib.sha256()
    for spec in specs:
        fields = {key: value for key, value in asdict(spec).items() if key != "max_records" or value is not None}
        digest.update(json.dumps(fields, sort_keys=True).encode())  # a key added unset keeps the earlier caches
        if names_code(spec.format):  # a user's map function: its code decides the samples too
            digest.update(_code_fingerprint(spec.format).encode())
        for file in data_files(resolve_data_path(spec.path)):
            digest.update(str(file.name).encode())
            digest.update(file_sha256(file).encode())
    settings = {
        "version": CACHE_VERSION,
        "system": config.SYSTEM,
        "template": config.prompt_template,
        "max_length": config.max_length,
        "truncation": config.truncation,
        "last_turn_only": config.train_on_last_turn_only,
        "skip_bad_records": config.skip_bad_records,
        "seed": config.seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        **({"image_tokens": image_tokens} if image_tokens else {}),
        **({"split_special_tokens": True} if config.split_special_tokens else {}),
        **({"enable_thinking": False} if not config.enable_thinking else {}),
        **({"train_on_thinking": False} if not config.train_on_thinking else {}),
        **({"placeholders": config.data_placeholders} if config.data_placeholders else {}),
        **({"split_rounds": True} if config.split_rounds else {}),
        **({"examples": "kto" if config.stage == "kto" else "pairs"} if config.stage != "sft" else {}),
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def _code_fingerprint(dataset_format: str) -> str:
    """The sha256 of the module a `module:function` format names and of the file defining the function (the
    helpers they call count too; a change in another module they import does not)."""
    function = map_function(dataset_format)
    module_name = dataset_format.partition(":")[0] if ":" in dataset_format else dataset_format.rpartition(".")[0]
    files = {getattr(sys.modules.get(module_name), "__file__", None)}
    try:
        files.add(inspect.getsourcefile(function))
    except TypeError:  # a builtin
        pass
    return ",".join(file_sha256(Path(f)) for f in sorted(f for f in files if f and Path(f).is_file()))


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.chat_template])
    return hashlib.sha256((text + extra).encode()).hexdigest()


def cache_entry(config: Config, tokenizer, image_tokens: int = 0) -> Path:
    """The folder the config's encoded samples are cached in."""
    return xtune_home() / "data-cache" / cache_key(config, source_specs(config), tokenizer, image_tokens)


def is_cached(entry: Path) -> bool:
    return (entry / "samples.safetensors").is_file()


def prepare_samples(
    config: Config, tokenizer, use_cache: bool = True, image_tokens: int = 0
) -> tuple[list[Encoded], DataReport]:
    """The encoded samples the config trains on, from the cache when it has them. `image_tokens`: patches per
    image of a multimodal model (each `<image>` becomes that many IMAGE_TOKEN_ID)."""
    specs = source_specs(config)
    cache_dir = cache_entry(config, tokenizer, image_tokens)
    if use_cache and is_cached(cache_dir):
        return _read_cache(cache_dir)
    loaded = load_sources(
        specs, system=config.SYSTEM, skip_bad_records=config.skip_bad_records, seed=config.seed,
        placeholders=config.data_placeholders, split_rounds=config.split_rounds,
    )  # fmt: skip
    template = config_template(config)
    encoded = encode_parallel(loaded.conversations, template, tokenizer, config, config.num_proc, image_tokens)
    samples, report = apply_length_policy(encoded, config)
    report.sources = [(spec.path, count) for spec, count in zip(specs, loaded.counts)]
    report.skipped = [str(bad) for bad in loaded.skipped]
    report.cache = str(cache_dir)
    if use_cache:
        _write_cache(cache_dir, samples, report)
    return samples, report


def prepare_pairs(config: Config, tokenizer, use_cache: bool = True) -> tuple[list[EncodedPair], DataReport]:
    """The encoded preference pairs the config trains on, from the cache when it has them. A pair with an answer
    over max_length is cut (or dropped with truncation = "drop"); one whose cut left an answer with no trained token
    is dropped. `report.samples` counts pairs, `report.lengths` their two answers' tokens together."""
    cache_dir = cache_entry(config, tokenizer)
    if use_cache and is_cached(cache_dir):
        samples, report = _read_cache(cache_dir)
        return list(zip(samples[0::2], samples[1::2])), report
    specs = source_specs(config)
    located, skipped = load_pairs(
        specs, system=config.SYSTEM, skip_bad_records=config.skip_bad_records, seed=config.seed,
        placeholders=config.data_placeholders,
    )  # fmt: skip
    template = config_template(config)
    report = DataReport(sources=[(spec.path, 0) for spec in specs], skipped=[str(bad) for bad in skipped])
    pairs, margins = [], []
    for _, pair in located:
        encoded = encode_pair(pair, template, tokenizer, config.max_length, config.split_special_tokens)
        if _kept(encoded[0], encoded[1], config, report):
            pairs.append(encoded)
            margins.append(pair.margin)
    report.samples = len(pairs)
    report.margins = margins if any(margins) else []
    report.lengths = pair_lengths(pairs)
    report.trained_tokens = sum(sample.num_trained for pair in pairs for sample in pair)
    report.cache = str(cache_dir)
    if use_cache:
        _write_cache(cache_dir, [sample for pair in pairs for sample in pair], report)
    return pairs, report


def split_validation(
    config: Config, tokenizer, samples: list[Encoded], report: DataReport, image_tokens: int = 0
) -> tuple[list[Encoded], DataReport, list[Encoded]]:
    """(training samples, their report, validation samples): `val_split` holds a share of `samples` out, and
    `val_data_path` is read and encoded as training data is, through the same cache; neither set: no validation."""
    if config.val_split is not None:
        train, validation = hold_out(samples, config.val_split, config.seed)
        lengths = [len(sample.input_ids) for sample in train]
        trained = sum(sample.num_trained for sample in train)
        return train, replace(report, samples=len(train), lengths=lengths, trained_tokens=trained), validation
    if config.val_data_path is None:
        return samples, report, []
    validation_config = config.model_copy(
        update={"data_path": config.val_data_path, "dataset_format": config.val_dataset_format, "datasets": []}
    )
    validation, validation_report = prepare_samples(validation_config, tokenizer, image_tokens=image_tokens)
    if not validation:
        raise DataError(
            f"val_data_path = {config.val_data_path!r} leaves no sample to validate on: {validation_report.truncated} "
            f"were over max_length={config.max_length} ({validation_report.dropped_too_long} dropped), "
            f"{validation_report.dropped_untrained} had no trained token; check it with `xtune check-dataset`."
        )
    return samples, report, validation


def hold_out(samples: list[Encoded], share: float, seed: int) -> tuple[list[Encoded], list[Encoded]]:
    """(train, validation), each in the order of `samples`: `share` of the distinct samples (at least one, rounded)
    picked with `seed`. Copies of one sample (a record's repeats) stay together, so none is trained on and validated."""
    groups: dict[tuple, list[int]] = {}
    for index, sample in enumerate(samples):  # a tuple of ints hashes alike in every process (a str would not)
        key = (hash(tuple(sample.input_ids)), hash(tuple(sample.labels)), sample.images)
        groups.setdefault(key, []).append(index)
    distinct = list(groups.values())
    count = max(1, math.floor(share * len(distinct) + 0.5))
    if count >= len(distinct):
        raise DataError(
            f"val_split = {share} of {len(distinct)} distinct samples leaves none to train on; lower val_split, or "
            "give validation data of its own (val_data_path)."
        )
    held = {index for group in random.Random(f"{seed}/val_split").sample(distinct, count) for index in group}
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


@dataclass
class KtoExamples:
    """The encoded examples of a KTO run: each prompt with its answer, and with another example's answer (for the
    KL estimate, `xtune.data.pairs.mismatched`), and whether its answer is desirable."""

    answers: list[Encoded]
    kl: list[Encoded]
    desirable: list[bool]


def prepare_kto(config: Config, tokenizer, use_cache: bool = True) -> tuple[KtoExamples, DataReport]:
    """The encoded KTO examples, from the cache when it has them; the length rules of `prepare_pairs` apply to each
    example's own answer (its mismatched one is only cut). `report.lengths`: the examples' own tokens."""
    cache_dir = cache_entry(config, tokenizer)
    if use_cache and is_cached(cache_dir):
        samples, report = _read_cache(cache_dir)
        desirable = json.loads((cache_dir / "desirable.json").read_text())
        return KtoExamples(samples[0::2], samples[1::2], desirable), report
    specs = source_specs(config)
    located, skipped = load_pairs(
        specs, system=config.SYSTEM, skip_bad_records=config.skip_bad_records, seed=config.seed,
        placeholders=config.data_placeholders, kto=True,
    )  # fmt: skip
    examples = [example for _, example in located]
    conversations = [example.conversation for example in examples]
    template = config_template(config)
    encoded = encode_parallel([*conversations, *mismatched(examples, config.seed)], template, tokenizer, config,
                              config.num_proc)  # fmt: skip
    report = DataReport(sources=[(spec.path, 0) for spec in specs], skipped=[str(bad) for bad in skipped])
    kept = KtoExamples([], [], [])
    for example, answer, kl in zip(examples, encoded[: len(examples)], encoded[len(examples) :]):
        if _kept(answer, None, config, report):
            kept.answers.append(answer)
            kept.kl.append(kl)
            kept.desirable.append(example.desirable)
    report.samples = len(kept.answers)
    report.lengths = [len(sample.input_ids) for sample in kept.answers]
    report.trained_tokens = sum(sample.num_trained for sample in kept.answers)
    report.cache = str(cache_dir)
    if use_cache:
        _write_cache(cache_dir, [s for pair in zip(kept.answers, kept.kl) for s in pair], report,
                     {"desirable.json": kept.desirable})  # fmt: skip
    return kept, report


def _kept(first: Encoded, second: Encoded | None, config: Config, report: DataReport) -> bool:
    """Whether an example (a pair's two answers, or one) is trained on, counting why not in `report`."""
    samples = [first] if second is None else [first, second]
    if any(sample.truncated for sample in samples):
        report.truncated += 1
        if config.truncation == "drop":
            report.dropped_too_long += 1
            return False
    if not all(any(label != IGNORE_INDEX for label in sample.labels[1:]) for sample in samples):
        report.dropped_untrained += 1
        return False
    return True


def apply_length_policy(encoded: list[Encoded], config: Config) -> tuple[list[Encoded], DataReport]:
    """Drop samples with nothing to learn, and (truncation = drop) those over max_length."""
    report = DataReport(sources=[])
    kept = []
    for sample in encoded:
        if sample.truncated:
            report.truncated += 1
            if config.truncation == "drop":
                report.dropped_too_long += 1
                continue
        if sample.num_trained == 0:
            report.dropped_untrained += 1
            continue
        kept.append(sample)
    report.samples = len(kept)
    report.lengths = [len(sample.input_ids) for sample in kept]
    report.trained_tokens = sum(sample.num_trained for sample in kept)
    return kept, report


_worker: dict = {}


def _init_worker(
    template: ChatTemplate, tokenizer, max_length: int, last_turn_only: bool, image_tokens: int, split: bool,
    workers: bool,
) -> None:
    if workers:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(
        template=template, tokenizer=tokenizer, max_length=max_length, last_turn_only=last_turn_only,
        image_tokens=image_tokens, split=split,
    )  # fmt: skip


def _encode_chunk(conversations: list[Conversation]) -> list[Encoded]:
    return encode_batch(
        conversations, _worker["template"], _worker["tokenizer"], _worker["max_length"], _worker["last_turn_only"],
        _worker["image_tokens"], _worker["split"],
    )  # fmt: skip


def encode_parallel(
    conversations: list[Conversation],
    template: ChatTemplate,
    tokenizer,
    config: Config,
    num_proc: int = 1,
    image_tokens: int = 0,
) -> list[Encoded]:
    """`encode` over every conversation, in `num_proc` processes when more than one."""
    args = (template, tokenizer, config.max_length, config.train_on_last_turn_only, image_tokens,
            config.split_special_tokens)  # fmt: skip
    if num_proc <= 1 or len(conversations) < 2 * num_proc:
        _init_worker(*args, workers=False)
        return _encode_chunk(conversations)
    size = -(-len(conversations) // (num_proc * 4))
    chunks = [conversations[i : i + size] for i in range(0, len(conversations), size)]
    context = get_context("fork")
    with ProcessPoolExecutor(num_proc, mp_context=context, initializer=_init_worker, initargs=(*args, True)) as pool:
        return [sample for chunk in pool.map(_encode_chunk, chunks) for sample in chunk]


def _write_cache(cache_dir: Path, samples: list[Encoded], report: DataReport, extra: dict | None = None) -> None:
    """`extra`: more files of the entry, name -> what json writes."""
    partial = cache_dir.with_name(f".{cache_dir.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    lengths = torch.tensor([len(s.input_ids) for s in samples], dtype=torch.int64)
    tensors = {
        "input_ids": torch.tensor([t for s in samples for t in s.input_ids], dtype=torch.int32),
        "labels": torch.tensor([t for s in samples for t in s.labels], dtype=torch.int32),
        "lengths": lengths,
        "truncated": torch.tensor([s.truncated for s in samples], dtype=torch.bool),
    }
    try:
        partial.mkdir(parents=True)
        (partial / "report.json").write_text(json.dumps(asdict(report)))
        if any(s.images for s in samples):
            (partial / "images.json").write_text(json.dumps([list(s.images) for s in samples]))
        for name, value in (extra or {}).items():
            (partial / name).write_text(json.dumps(value))
        save_file(tensors, partial / "samples.safetensors")
    except (OSError, SafetensorError) as error:  # e.g. a full $XTUNE_HOME
        shutil.rmtree(partial, ignore_errors=True)
        raise XtuneError(
            f"could not write the data cache entry {cache_dir}: {write_failure(error)}. Nothing earlier is lost (the "
            "cache's other entries and the data files are as they were); free space there, or set XTUNE_HOME to a "
            "folder on a disk with room."
        ) from error
    if cache_dir.exists() and not is_cached(cache_dir):
        shutil.rmtree(cache_dir)  # not written by us: entries are renamed into place whole
    try:
        os.replace(partial, cache_dir)
    except OSError:  # another process finished the same entry first
        shutil.rmtree(partial, ignore_errors=True)


def _read_cache(cache_dir: Path) -> tuple[list[Encoded], DataReport]:
    tensors = load_file(cache_dir / "samples.safetensors")
    ids, labels = tensors["input_ids"].tolist(), tensors["labels"].tolist()
    lengths = tensors["lengths"].tolist()
    images_file = cache_dir / "images.json"
    images = json.loads(images_file.read_text()) if images_file.is_file() else [[]] * len(lengths)
    samples, start = [], 0
    for length, truncated, paths in zip(lengths, tensors["truncated"].tolist(), images):
        samples.append(Encoded(ids[start : start + length], labels[start : start + length], truncated, tuple(paths)))
        start += length
    report = DataReport(**json.loads((cache_dir / "report.json").read_text()))
    report.sources = [tuple(source) for source in report.sources]
    return samples, report

