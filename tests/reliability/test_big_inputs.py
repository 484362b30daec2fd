"""Oversized inputs: one 10 MB record, and a 1,000,000-line JSON Lines file with one bad line in the middle.

The million lines take about 36 s on one core, so that is a slow test, and a tenth of it runs in the quick suite
with the same assertions; the 10 MB record is encoded in a fraction of a second (only the text that can reach
max_length is tokenized), so both its sizes run there. Each prints its time (`pytest -s`); the figures are in
docs/RELIABILITY.md.
"""

import json
import resource
import time

import pytest

from xtune.config.schema import Config
from xtune.data.dataset import prepare_samples
from xtune.data.formats import Conversation
from xtune.data.sources import SourceSpec, load_sources
from xtune.errors import DataError

MAX_LENGTH = 2048
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex zebras and jovial kings; "


@pytest.mark.parametrize(
    "size", [pytest.param(10_000_000, id="10MB"), pytest.param(1_000_000, id="1MB")]
)
def test_a_huge_record_loads_and_is_truncated_to_max_length_and_counted(size, tmp_path, tokenizer):
    path = tmp_path / "huge.jsonl"
    output = (WORDS * (size // len(WORDS) + 1))[:size]
    path.write_text(json.dumps({"instruction": "Write a lot.", "output": output}) + "\n")
    config = Config(llm_name_or_path="xtune-tiny/internlm2-chat", data_path=str(path), max_length=MAX_LENGTH)
    peak_before, start = _peak_rss_gib(), time.perf_counter()
    samples, report = prepare_samples(config, tokenizer, use_cache=False)
    seconds = time.perf_counter() - start
    print(
        f"\none {size / 1e6:g} MB alpaca record: loaded, encoded, truncated to {MAX_LENGTH} tokens in {seconds:.1f} s; "
        f"peak memory +{_peak_rss_gib() - peak_before:.2f} GiB (meaningful run alone: -k {size // 1_000_000}MB)"
    )
    loaded = load_sources([SourceSpec(str(path), "alpaca")])
    assert loaded.conversations[0].turns[-1].content == output  # read whole, never cut while reading
    assert report.truncated == 1 and report.samples == 1 and report.dropped_too_long == 0
    assert len(samples[0].input_ids) == len(samples[0].labels) == MAX_LENGTH and samples[0].truncated
    assert samples[0].num_trained > MAX_LENGTH // 2  # the output is trained, the prompt is a few tokens


@pytest.mark.parametrize(
    "lines", [pytest.param(1_000_000, marks=pytest.mark.slow, id="1M"), pytest.param(100_000, id="100k")]
)
def test_one_bad_line_among_a_million_is_named_or_skipped_alone(lines, tmp_path):
    path = tmp_path / "many.jsonl"
    bad = lines // 2 + 1
    start = time.perf_counter()
    with path.open("wb") as file:
        file.write(
            b"".join(
                b'{"instruction": "question %d", "output": "answer %d"}\n' % (number, number)
                if number != bad
                else b'{"instruction": "question", "output": 42}\n'
                for number in range(1, lines + 1)
            )
        )
    written = time.perf_counter()
    with pytest.raises(DataError) as error:
        load_sources([SourceSpec(str(path), "alpaca")])
    raised = time.perf_counter()
    peak_before = _peak_rss_gib()
    loaded = load_sources([SourceSpec(str(path), "alpaca")], skip_bad_records=True)
    skipped = time.perf_counter()
    size = path.stat().st_size / 1e6
    print(
        f"\n{lines:,} alpaca lines ({size:.0f} MB) written in {written - start:.1f} s; "
        f"DataError at line {bad:,} in {raised - written:.1f} s; all read skipping it in {skipped - raised:.1f} s, "
        f"peak memory +{_peak_rss_gib() - peak_before:.2f} GiB"
    )
    why = f"{path}:{bad}: field 'output' must be a string, got int (format 'alpaca')"
    assert str(error.value) == f"{why}."
    assert [str(record) for record in loaded.skipped] == [why]
    assert len(loaded.samples) == lines - 1 and loaded.counts == [lines - 1]
    assert loaded.samples[bad - 1] == (f"{path}:{bad + 1}", loaded.samples[bad - 1][1])
    last = loaded.samples[-1][1]
    assert isinstance(last, Conversation) and last.turns[-1].content == f"answer {lines}"


def _peak_rss_gib() -> float:
    """This process's peak resident memory so far (a high-water mark: a growth shows only past earlier peaks)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
