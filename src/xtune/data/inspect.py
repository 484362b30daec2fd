"""Looking at the data before training on it: `xtune preprocess`, `check-dataset` and `log-dataset`.

Each verb has a function that computes a dataclass (`preprocess`, `check_dataset`, `first_samples`)
and a `render_*` function that prints it with rich. The numbers come from the code training runs:
`prepare_samples` for the samples, `pack` or the loader's batch functions for the padding.
"""

import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby

from rich.console import Console
from rich.table import Table
from rich.text import Text

from xtune.config.schema import Config
from xtune.data.dataset import (
    DataReport, apply_length_policy, cache_entry, config_template, is_cached, prepare_kto, prepare_pairs, prepare_samples,
    source_specs,
)  # fmt: skip
from xtune.data.encode import IGNORE_INDEX, Encoded, encode, pad_token_id
from xtune.data.loader import length_grouped_batches, shuffled_batches
from xtune.data.packing import pack, pack_groups, packing_efficiency
from xtune.data.formats import RecordError
from xtune.data.pairs import (
    WRONG_FORMAT, detect_preference_format, encode_pair, kto_to_unpaired, load_pairs, preference_to_pair,
)
from xtune.data.sources import (
    BadRecord, SourceSpec, at_most, data_files, load_sources, read_conversations, read_records, repeat, resolve_data_path,
)  # fmt: skip

TRAINED_STYLE = "bold green"
"""How trained tokens are shown on a terminal; elsewhere they are put between `[[` and `]]`."""


def config_tokenizer(config: Config):
    from xtune.models.load import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(config.llm_name_or_path), trust_remote_code=config.trust_remote_code)


# preprocess ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessed:
    cache: str
    """The cache entry's folder."""
    cache_hit: bool
    """The entry was there already: nothing was tokenized."""
    report: DataReport
    num_proc: int
    seconds: float


def preprocess(config: Config, tokenizer=None, num_proc: int | None = None) -> Preprocessed:
    """Build (or find) the tokenized-data cache that training with `config` reads."""
    tokenizer = tokenizer if tokenizer is not None else config_tokenizer(config)
    if num_proc is not None:
        config = config.model_copy(update={"num_proc": num_proc})
    hit = is_cached(cache_entry(config, tokenizer))
    start = time.perf_counter()
    _, report = prepare_samples(config, tokenizer)
    return Preprocessed(report.cache, hit, report, config.num_proc, time.perf_counter() - start)


def render_preprocess(result: Preprocessed, console: Console) -> None:
    report = result.report
    if result.cache_hit:
        console.print(f"cache hit: {result.cache} (nothing to tokenize)", highlight=False, soft_wrap=True)
    else:
        processes = "process" if result.num_proc == 1 else "processes"
        console.print(
            f"cache written: {result.cache} ({result.seconds:.1f} s, {result.num_proc} {processes})",
            highlight=False,
            soft_wrap=True,
        )
    for path, count in report.sources:
        console.print(f"source {path}: {count:,} samples", highlight=False, soft_wrap=True)
    console.print(
        f"{report.samples:,} samples, {report.tokens:,} tokens ({report.trained_tokens:,} trained); "
        f"{report.truncated:,} over max_length ({report.dropped_too_long:,} dropped), "
        f"{report.dropped_untrained:,} without trained tokens dropped, {len(report.skipped):,} bad records skipped",
        highlight=False,
        soft_wrap=True,
    )


# check-dataset -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceCheck:
    path: str
    format: str
    records: int
    """Well-formed records read."""
    bad: int
    """Malformed records (a whole unreadable file counts once)."""
    repeats: float
    samples: int
    """Samples the source gives, repeats applied."""


@dataclass(frozen=True)
class LengthStats:
    min: int
    median: float
    p95: int
    """Nearest rank: the smallest length that at least 95% of the samples do not exceed."""
    max: int
    bins: list[tuple[int, int, int]]
    """(lowest length, highest length, samples) of equal-width bins from min to max."""


@dataclass(frozen=True)
class DatasetCheck:
    sources: list[SourceCheck]
    bad_records: list[BadRecord]
    """Every malformed record, whatever `skip_bad_records` says."""
    encoded: int
    """Samples encoded from the well-formed records, before any is dropped."""
    samples: int
    """Samples training uses."""
    truncated: int
    dropped_too_long: int
    dropped_untrained: int
    tokens: int
    trained_tokens: int
    lengths: LengthStats | None
    """None when no sample is left."""
    max_length: int
    truncation: str
    """What happens to samples over max_length: `truncate` or `drop`."""
    packed: bool
    efficiency: float
    """Packed: sample tokens / row tokens. Unpacked: sample tokens / padded batch tokens."""
    batches: int
    """Packed rows, or unpacked batches of one epoch."""
    batch_size: int
    group_by_length: bool
    row_length: int = 0
    """Packed: tokens per row (2 x max_length for preference pairs, which hold two answers)."""

    @property
    def trained_ratio(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    @property
    def ok(self) -> bool:
        return not self.bad_records


def length_stats(lengths: Sequence[int], bins: int = 8) -> LengthStats | None:
    if not lengths:
        return None
    ordered = sorted(lengths)
    low, high = ordered[0], ordered[-1]
    width = math.ceil((high - low + 1) / bins)
    counts = [0] * math.ceil((high - low + 1) / width)
    for length in ordered:
        counts[(length - low) // width] += 1
    edges = [(low + i * width, min(low + (i + 1) * width - 1, high), count) for i, count in enumerate(counts)]
    p95 = ordered[math.ceil(0.95 * len(ordered)) - 1]
    return LengthStats(low, statistics.median(ordered), p95, high, edges)


def unpacked_batches(lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool) -> list[list[int]]:
    """The first epoch's batches (sample indices), as the training loop draws them."""
    if group_by_length:
        return length_grouped_batches(list(lengths), batch_size, seed)
    return shuffled_batches(len(lengths), batch_size, seed)


def padding_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Sample tokens / batch tokens, each batch padded to its longest sample."""
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    return sum(lengths[i] for batch in batches for i in batch) / padded if padded else 0.0


def summarize(
    sources: list[SourceCheck],
    bad_records: list[BadRecord],
    samples: list[Encoded],
    report: DataReport,
    config: Config,
    pad_id: int,
    pairs: list | None = None,
) -> DatasetCheck:
    """The check of samples `prepare_samples` gave (with its report), and of how they are batched; for a preference
    stage `samples` are the answers of `pairs`, packed two by two into rows of 2 x max_length."""
    lengths = [len(sample.input_ids) for sample in samples]
    row = 2 * config.max_length if pairs is not None and config.stage != "kto" else config.max_length
    if config.pack_to_max_length:
        shuffle_seed = config.seed if config.shuffle_before_pack else None
        rows = pack_groups(pairs, row, pad_id, shuffle_seed) if pairs is not None else pack(samples, row, pad_id, shuffle_seed)
        batches, efficiency = len(rows), packing_efficiency(rows, row)
    else:
        grouped = unpacked_batches(lengths, config.batch_size, config.seed, config.group_by_length)
        batches, efficiency = len(grouped), padding_efficiency(lengths, grouped)
    return DatasetCheck(
        sources=sources,
        bad_records=bad_records,
        encoded=(len(samples) if pairs is None else len(pairs)) + report.dropped_too_long + report.dropped_untrained,
        samples=len(samples) if pairs is None else len(pairs),
        truncated=report.truncated,
        dropped_too_long=report.dropped_too_long,
        dropped_untrained=report.dropped_untrained,
        tokens=sum(lengths),
        trained_tokens=sum(sample.num_trained for sample in samples),
        lengths=length_stats(lengths),
        max_length=config.max_length,
        truncation=config.truncation,
        packed=config.pack_to_max_length,
        efficiency=efficiency,
        batches=batches,
        batch_size=config.batch_size,
        group_by_length=config.group_by_length,
        row_length=row,
    )


def read_all(specs: Sequence[SourceSpec]) -> tuple[list[tuple[int, int]], list[BadRecord]]:
    """(well-formed records, malformed records) per source, and every malformed record."""
    counts, bad_records = [], []
    for spec in specs:
        good = bad = 0
        for item in read_conversations(spec.path, spec.format, image_folder=spec.image_folder):
            if isinstance(item, BadRecord):
                bad += 1
                bad_records.append(item)
            else:
                good += 1
        counts.append((good, bad))
    return counts, bad_records


def check_dataset(config: Config, tokenizer=None) -> DatasetCheck:
    """Every source read to the end (so every malformed record is listed), then the samples training
    would use, from the cache when it has them, and their lengths and padding."""
    tokenizer = tokenizer if tokenizer is not None else config_tokenizer(config)
    if config.stage != "sft":
        return _check_pairs(config, tokenizer)
    specs = source_specs(config)
    counts, bad_records = read_all(specs)
    if any(good for good, _ in counts):
        # with malformed records and no skip_bad_records training stops; show what skipping would give
        skipping = bool(bad_records) and not config.skip_bad_records
        usable = config.model_copy(update={"skip_bad_records": True}) if skipping else config
        samples, report = prepare_samples(usable, tokenizer, use_cache=not skipping)
        per_source = [count for _, count in report.sources]
    else:
        samples, report, per_source = [], DataReport(sources=[]), [0] * len(specs)
    sources = [
        SourceCheck(spec.path, spec.format, good, bad, spec.repeats, count)
        for spec, (good, bad), count in zip(specs, counts, per_source)
    ]
    return summarize(sources, bad_records, samples, report, config, pad_token_id(tokenizer))


def _check_pairs(config: Config, tokenizer) -> DatasetCheck:
    """check_dataset for a preference stage: records are pairs; the samples, their answers (two per pair)."""
    sources, bad_records = [], []
    for spec in source_specs(config):
        good, bad = _read_pairs(spec, kto=config.stage == "kto")
        rng = random.Random(0)
        repeated = len(repeat(at_most(list(range(good)), spec.max_records, rng), spec.repeats, rng))
        sources.append(SourceCheck(spec.path, spec.format, good, len(bad), spec.repeats, repeated))
        bad_records += bad
    usable = config.model_copy(update={"skip_bad_records": True})
    if not any(s.samples for s in sources):
        pairs, report = [], DataReport([])
    elif config.stage == "kto":  # an example's one answer (its mismatched one is no training sample)
        examples, report = prepare_kto(usable, tokenizer)
        pairs = [(answer,) for answer in examples.answers]
    else:
        pairs, report = prepare_pairs(usable, tokenizer)
    answers = [sample for pair in pairs for sample in pair]
    return summarize(sources, bad_records, answers, report, config, pad_token_id(tokenizer), pairs=pairs)


def _read_pairs(spec: SourceSpec, kto: bool = False) -> tuple[int, list[BadRecord]]:
    """(well-formed preference records, the malformed ones) of a source, each named as training names it; `kto`:
    {prompt, completion, label} records."""
    good, bad = 0, []
    for file in data_files(resolve_data_path(spec.path)):
        for item in read_records(file):
            if not isinstance(item, BadRecord):
                try:
                    wanted = "kto" if kto else "preference"
                    name = detect_preference_format(item[1]) if spec.format == "auto" else spec.format
                    if name != wanted:
                        raise RecordError(WRONG_FORMAT[wanted].format(name=name))
                    (kto_to_unpaired if kto else preference_to_pair)(item[1])
                    good += 1
                    continue
                except RecordError as error:
                    item = BadRecord(item[0], str(error))
            bad.append(item)
    return good, bad


def _histogram(stats: LengthStats, width: int = 30) -> Table:
    table = Table.grid(padding=(0, 2))
    most = max(count for _, _, count in stats.bins)
    for low, high, count in stats.bins:
        span = str(low) if low == high else f"{low}-{high}"
        table.add_row(span, str(count), "█" * math.ceil(count / most * width) if count else "")
    return table


def render_check(check: DatasetCheck, console: Console) -> None:
    sources = Table("source", "format", "records", "malformed", "repeats", "samples")
    for source in check.sources:
        sources.add_row(
            source.path, source.format, str(source.records), str(source.bad), f"{source.repeats:g}", str(source.samples)
        )
    console.print(sources)
    summary = Table.grid(padding=(0, 2))
    too_long = "dropped" if check.truncation == "drop" else "truncated"
    summary.add_row("samples", f"{check.samples:,} kept of {check.encoded:,} encoded")
    summary.add_row(f"over max_length={check.max_length}", f"{check.truncated:,} {too_long}")
    summary.add_row("no trained token", f"{check.dropped_untrained:,} dropped")
    summary.add_row("tokens", f"{check.tokens:,}, {check.trained_tokens:,} trained ({check.trained_ratio:.1%})")
    if check.lengths is not None:
        stats = check.lengths
        summary.add_row("length", f"min {stats.min}, median {stats.median:g}, p95 {stats.p95}, max {stats.max}")
    if check.packed:
        summary.add_row(
            "packing", f"{check.batches:,} rows of {check.row_length}: {check.efficiency:.1%} sample tokens"
        )
    else:
        grouping = "grouped by length" if check.group_by_length else "shuffled"
        summary.add_row(
            "padding",
            f"{check.batches:,} batches of {check.batch_size}, {grouping}: {check.efficiency:.1%} sample tokens",
        )
    summary.add_row("malformed records", f"{len(check.bad_records):,}" if check.bad_records else "none")
    console.print(summary, highlight=False)
    if check.lengths is not None:
        console.print("length histogram (tokens, samples):")
        console.print(_histogram(check.lengths))
    if check.bad_records:
        console.print(f"malformed records ({len(check.bad_records)}):", style="bold red", highlight=False)
        for bad in check.bad_records:
            console.print(f"  {bad}", highlight=False, markup=False, soft_wrap=True)


# log-dataset --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedSample:
    location: str
    sample: Encoded
    runs: list[tuple[str, bool]]
    """The sample's tokens decoded run by run: (text, trained)."""


def text_runs(sample: Encoded, tokenizer) -> list[tuple[str, bool]]:
    """Each contiguous run of trained or untrained tokens, decoded: what is shown is what is trained."""
    runs = groupby(zip(sample.input_ids, sample.labels), lambda pair: pair[1] != IGNORE_INDEX)
    return [(_decode(tokenizer, [token for token, _ in run]), trained) for trained, run in runs]


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def highlighted(runs: Sequence[tuple[str, bool]], markers: bool) -> Text:
    """Trained runs in TRAINED_STYLE, or (markers, for a file or pipe) between `[[` and `]]`."""
    text = Text()
    for part, trained in runs:
        if trained and markers:
            text.append(f"[[{part}]]")
        else:
            text.append(part, style=TRAINED_STYLE if trained else "")
    return text


def compact_labels(labels: Sequence[int]) -> str:
    """Labels with each run of IGNORE_INDEX written once with its count: `[-100×5, 17, 2, -100]`."""
    parts = []
    for label, run in groupby(labels):
        count = len(list(run))
        if label == IGNORE_INDEX:
            parts.append(f"{label}×{count}" if count > 1 else str(label))
        else:
            parts += [str(label)] * count
    return "[" + ", ".join(parts) + "]"


def first_samples(config: Config, n: int = 3, tokenizer=None) -> list[LoggedSample]:
    """The first `n` samples training uses, in data order (before shuffling and packing)."""
    tokenizer = tokenizer if tokenizer is not None else config_tokenizer(config)
    template = config_template(config)
    if config.stage == "kto":  # each example's answer, desirable or not
        located, _ = load_pairs(source_specs(config), system=config.SYSTEM, skip_bad_records=config.skip_bad_records,
                                seed=config.seed, placeholders=config.data_placeholders, kto=True)  # fmt: skip
        shown = []
        for location, example in located[:n]:
            sample = encode(example.conversation, template, tokenizer, config.max_length,
                            split_special_tokens=config.split_special_tokens)  # fmt: skip
            side = "desirable" if example.desirable else "undesirable"
            shown.append(LoggedSample(f"{location} {side}", sample, text_runs(sample, tokenizer)))
        return shown
    if config.stage != "sft":  # each pair shown as its two answers
        located, _ = load_pairs(source_specs(config), system=config.SYSTEM, skip_bad_records=config.skip_bad_records,
                                seed=config.seed, placeholders=config.data_placeholders)  # fmt: skip
        shown = []
        for location, pair in located[:n]:
            encoded = encode_pair(pair, template, tokenizer, config.max_length, config.split_special_tokens)
            shown += [LoggedSample(f"{location} {side}", sample, text_runs(sample, tokenizer))
                      for side, sample in zip(("chosen", "rejected"), encoded)]  # fmt: skip
        return shown
    loaded = load_sources(
        source_specs(config), system=config.SYSTEM, skip_bad_records=config.skip_bad_records, seed=config.seed,
        placeholders=config.data_placeholders, split_rounds=config.split_rounds,
    )
    logged: list[LoggedSample] = []
    for location, conversation in loaded.samples:
        if len(logged) == n:
            break
        encoded = encode(
            conversation, template, tokenizer, config.max_length, config.train_on_last_turn_only,
            split_special_tokens=config.split_special_tokens,
        )  # fmt: skip
        kept, _ = apply_length_policy([encoded], config)
        if kept:
            logged.append(LoggedSample(location, kept[0], text_runs(kept[0], tokenizer)))
    return logged


def render_samples(samples: Sequence[LoggedSample], console: Console) -> None:
    markers = not console.is_terminal
    for index, logged in enumerate(samples):
        sample = logged.sample
        truncated = ", truncated" if sample.truncated else ""
        counts = f"{len(sample.input_ids)} tokens, {sample.num_trained} trained{truncated}"
        console.print(f"sample {index}: {logged.location} ({counts})", style="bold", highlight=False, markup=False)
        text = highlighted(logged.runs, markers)
        console.print(text, soft_wrap=True, end="" if text.plain.endswith("\n") else "\n")
        console.print(f"input_ids: {sample.input_ids}", soft_wrap=True, highlight=False)
        console.print(f"labels: {compact_labels(sample.labels)}", soft_wrap=True, highlight=False)
        if index + 1 < len(samples):
            console.print()


# check-custom-dataset ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSteps:
    """The first sample at each step of the data road, as XTuner's check_custom_dataset shows it."""

    location: str
    dataset_format: str
    conversation: list[dict]
    """The record after its map function: one {role, content} per turn (tool calls as `tool_calls`)."""
    logged: LoggedSample | None
    """The same sample in the prompt template and encoded; None when it is not trained on (too long, say)."""


def first_sample_steps(config: Config, tokenizer=None) -> SampleSteps | None:
    """The first well-formed record of the first source, mapped, templated and encoded; None if it has none."""
    spec = source_specs(config)[0]
    items = read_conversations(spec.path, spec.format, image_folder=spec.image_folder)
    location, conversation = next((item for item in items if not isinstance(item, BadRecord)), (None, None))
    if conversation is None:
        return None
    turns = [{"role": turn.role, "content": turn.content}
             | ({"tool_calls": [f"{call.name}({call.arguments})" for call in turn.tool_calls]} if turn.tool_calls else {})
             for turn in conversation.turns]  # fmt: skip
    logged = first_samples(config, 1, tokenizer) if config.stage == "sft" else []
    return SampleSteps(location, spec.format, turns, logged[0] if logged else None)


def _banner(title: str) -> str:
    return f"{'#' * 20}   {title}   {'#' * 20}"


def render_sample_steps(steps: SampleSteps | None, console: Console) -> None:
    if steps is None:
        console.print("no well-formed record to show", highlight=False)
        return
    console.print(_banner(f"first sample after dataset_format '{steps.dataset_format}'"), highlight=False, markup=False)
    console.print(steps.location, highlight=False, markup=False)
    console.print(repr(steps.conversation), highlight=False, markup=False, soft_wrap=True)
    if steps.logged is None:
        return
    console.print(_banner("the same sample in the prompt template"), highlight=False, markup=False)
    console.print(highlighted(steps.logged.runs, not console.is_terminal), soft_wrap=True)
    console.print(_banner("encoded input_ids"), highlight=False, markup=False)
    console.print(str(steps.logged.sample.input_ids), highlight=False, soft_wrap=True)
    console.print(_banner("encoded labels"), highlight=False, markup=False)
    console.print(compact_labels(steps.logged.sample.labels), highlight=False, soft_wrap=True)
