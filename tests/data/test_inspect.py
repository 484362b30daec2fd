import json

import pytest
from rich.console import Console

from xtune.config.schema import Config
from xtune.data.dataset import DataReport
from xtune.data.encode import Encoded, encode
from xtune.data.formats import Conversation, Turn
from xtune.data.inspect import (
    check_dataset,
    compact_labels,
    first_samples,
    highlighted,
    length_stats,
    padding_efficiency,
    preprocess,
    render_check,
    render_samples,
    summarize,
    text_runs,
)
from xtune.data.loader import shuffled_batches
from xtune.data.templates import get_template
from xtune.errors import DataError

HOT = {"conversation": [{"input": "What is the opposite of hot?", "output": "cold"}]}  # 20 tokens, 2 trained
BIG = {"conversation": [{"input": "Opposite of big?", "output": "small"}]}  # 20 tokens, 2 trained
UP = {"conversation": [{"input": "up", "output": "down"}]}  # 14 tokens, 2 trained
LONG = {"conversation": [{"input": "word " * 40, "output": "cold"}]}  # over 32 tokens: nothing trained is left


def mixed_config(tmp_path, **values) -> Config:
    """a.jsonl: 3 good records (one too long to train on) and 2 malformed; b.json: 1 record, used twice."""
    lines = [json.dumps(HOT), json.dumps(BIG), "not json", json.dumps(LONG), '{"conversation": [{"input": "x"}]}']
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([UP]))
    sources = [{"path": str(tmp_path / "a.jsonl")}, {"path": str(tmp_path / "b.json"), "repeats": 2.0}]
    settings = {"max_length": 32, "batch_size": 2} | values
    return Config(llm_name_or_path="xtune-tiny/internlm2-chat", datasets=sources, **settings)


def test_check_counts_every_source_and_lists_every_malformed_record(tmp_path, tokenizer):
    check = check_dataset(mixed_config(tmp_path), tokenizer)
    assert [(s.records, s.bad, s.samples) for s in check.sources] == [(3, 2, 3), (1, 0, 2)]
    assert [str(bad).split(": ")[0] for bad in check.bad_records] == [f"{tmp_path}/a.jsonl:3", f"{tmp_path}/a.jsonl:5"]
    assert "missing field 'conversation[0].output'" in str(check.bad_records[1])
    assert not check.ok
    counts = (check.encoded, check.samples, check.truncated, check.dropped_too_long, check.dropped_untrained)
    assert counts == (5, 4, 1, 0, 1)
    assert (check.tokens, check.trained_tokens) == (20 + 20 + 14 + 14, 8)
    assert check.trained_ratio == pytest.approx(8 / 68)
    stats = check.lengths
    assert (stats.min, stats.median, stats.p95, stats.max) == (14, 17, 20, 20)
    assert stats.bins == [(14, 14, 2), (15, 15, 0), (16, 16, 0), (17, 17, 0), (18, 18, 0), (19, 19, 0), (20, 20, 2)]
    # grouped by length, the two 20s and the two 14s share batches: no padding
    assert (check.packed, check.batches, check.efficiency) == (False, 2, 1.0)


def test_padding_without_length_grouping_uses_the_trainers_shuffle(tmp_path, tokenizer):
    check = check_dataset(mixed_config(tmp_path, group_by_length=False, seed=1), tokenizer)
    assert shuffled_batches(4, 2, 1) == [[1, 3], [2, 0]]  # each batch pads a 14 to 20
    assert check.efficiency == (20 + 20 + 14 + 14) / (4 * 20)


def test_packing_efficiency_of_the_mixed_dataset(tmp_path, tokenizer):
    check = check_dataset(mixed_config(tmp_path, pack_to_max_length=True), tokenizer)
    # best fit decreasing into rows of 32: [20], [20], [14, 14]
    assert (check.packed, check.batches) == (True, 3)
    assert check.efficiency == pytest.approx(68 / 96)


def test_a_clean_dataset_is_ok_and_a_fully_broken_one_still_reports(tmp_path, tokenizer):
    (tmp_path / "good.jsonl").write_text(json.dumps(UP) + "\n")
    clean = check_dataset(Config(llm_name_or_path="x", data_path=str(tmp_path / "good.jsonl")), tokenizer)
    assert clean.ok and clean.samples == 1
    (tmp_path / "bad.jsonl").write_text("[1]\n{\n")
    broken = check_dataset(Config(llm_name_or_path="x", data_path=str(tmp_path / "bad.jsonl")), tokenizer)
    assert (broken.ok, len(broken.bad_records), broken.samples, broken.lengths) == (False, 2, 0, None)


def test_length_stats_by_hand():
    stats = length_stats(list(range(20, 0, -1)))
    assert (stats.min, stats.median, stats.p95, stats.max) == (1, 10.5, 19, 20)
    assert [count for _, _, count in stats.bins] == [3, 3, 3, 3, 3, 3, 2]
    assert stats.bins[0] == (1, 3, 3) and stats.bins[-1] == (19, 20, 2)
    assert length_stats([]) is None


def test_padding_efficiency_by_hand():
    assert padding_efficiency([2, 4, 3, 1], [[0, 1], [2, 3]]) == (2 + 4 + 3 + 1) / (2 * 4 + 2 * 3)


def test_summarize_packs_with_best_fit():
    samples = [Encoded([5] * n, [5] * n) for n in (6, 5, 4, 3)]
    config = Config(llm_name_or_path="x", data_path="d", max_length=10, pack_to_max_length=True)
    check = summarize([], [], samples, DataReport(sources=[], samples=4), config, pad_id=0)
    # rows of 10: [6, 4] and [5, 3]
    assert (check.batches, check.efficiency) == (2, pytest.approx(18 / 20))


def test_trained_tokens_are_marked_from_ids_and_labels(tokenizer):
    conversation = Conversation((Turn("user", "What is the opposite of hot?"), Turn("assistant", "cold", True)))
    sample = encode(conversation, get_template("internlm2_chat"), tokenizer)
    text = highlighted(text_runs(sample, tokenizer), markers=True)
    assert text.plain == (
        "<s><|im_start|>user\nWhat is the opposite of hot?<|im_end|>\n<|im_start|>assistant\n[[cold<|im_end|>]]\n"
    )
    styled = highlighted(text_runs(sample, tokenizer), markers=False)
    assert "[[" not in styled.plain and [styled.plain[s.start : s.end] for s in styled.spans] == ["cold<|im_end|>"]


def test_compact_labels():
    assert compact_labels([-100, -100, -100, 5, 6, -100, 7]) == "[-100×3, 5, 6, -100, 7]"


def test_first_samples_in_data_order_after_the_length_policy(tmp_path, tokenizer):
    logged = first_samples(mixed_config(tmp_path, skip_bad_records=True), n=4, tokenizer=tokenizer)
    assert [entry.location for entry in logged] == [
        f"{tmp_path}/a.jsonl:1", f"{tmp_path}/a.jsonl:2", f"{tmp_path}/b.json[record 0]", f"{tmp_path}/b.json[record 0]"
    ]  # fmt: skip
    assert [run for entry in logged for run, trained in entry.runs if trained] == [
        "cold<|im_end|>", "small<|im_end|>", "down<|im_end|>", "down<|im_end|>"
    ]  # fmt: skip
    console = Console(record=True, width=60)
    render_samples(logged[:1], console)
    shown = console.export_text()
    assert "[[cold<|im_end|>]]\ninput_ids: [1, " in shown and "labels: [-100×17, " in shown


def test_first_samples_stop_at_a_malformed_record_as_training_does(tmp_path, tokenizer):
    with pytest.raises(DataError, match="a.jsonl:3"):
        first_samples(mixed_config(tmp_path), tokenizer=tokenizer)


def test_preprocess_writes_the_cache_then_hits_it(tmp_path, tokenizer):
    (tmp_path / "p.jsonl").write_text(json.dumps({"conversation": [{"input": "preprocess me", "output": "ok"}]}))
    config = Config(llm_name_or_path="x", data_path=str(tmp_path / "p.jsonl"))
    first = preprocess(config, tokenizer, num_proc=2)
    again = preprocess(config, tokenizer)
    assert (first.cache_hit, first.num_proc, again.cache_hit, again.num_proc) == (False, 2, True, 1)
    assert first.cache == again.cache and first.report.samples == again.report.samples == 1


def test_render_check_names_every_malformed_record(tmp_path, tokenizer):
    console = Console(record=True, width=200)
    render_check(check_dataset(mixed_config(tmp_path), tokenizer), console)
    shown = console.export_text()
    assert f"{tmp_path}/a.jsonl:3: not valid JSON" in shown and f"{tmp_path}/a.jsonl:5: missing field" in shown
    assert "min 14, median 17, p95 20, max 20" in shown


def test_check_and_log_dataset_of_a_preference_stage_show_pairs(tmp_path, tokenizer):
    lines = [json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}),
             json.dumps({"prompt": "Hi", "chosen": "x", "rejected": "x"}), "not json",
             json.dumps({"prompt": "Yo", "chosen": "Hey", "rejected": "No"})]  # fmt: skip
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    config = Config(llm_name_or_path="xtune-tiny/internlm2-chat", stage="dpo", data_path=str(tmp_path / "p.jsonl"),
                    max_length=64, pack_to_max_length=True, skip_bad_records=True)  # fmt: skip
    check = check_dataset(config, tokenizer)
    assert (check.sources[0].records, check.sources[0].bad, check.samples) == (2, 2, 2)
    assert [bad.message.split(";")[0] for bad in check.bad_records] == [
        "'chosen' and 'rejected' are the same answer", "not valid JSON (Expecting value at column 1)"]
    assert check.row_length == 128 and check.batches == 1  # both pairs' four answers in one row of 2 x max_length
    logged = first_samples(config, n=1, tokenizer=tokenizer)
    assert [entry.location.rsplit(":", 1)[1] for entry in logged] == ["1 chosen", "1 rejected"]
    assert [[run for run, trained in entry.runs if trained] for entry in logged] == [
        ["Hello<|im_end|>"], ["Go away<|im_end|>"]]
