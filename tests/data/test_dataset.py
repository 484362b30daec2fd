import json
from pathlib import Path


from xtune.config.schema import Config
from xtune.data import dataset
from xtune.data.dataset import cache_key, encode_parallel, prepare_samples, source_specs
from xtune.data.formats import Conversation, Turn
from xtune.data.templates import get_template


def write_data(tmp_path, outputs=("cold", "small", "a very long answer " * 20)):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": o}) + "\n" for i, o in enumerate(outputs)))
    return path


def config_for(path, **values):
    return Config(**{"llm_name_or_path": "xtune-tiny/internlm2-chat", "data_path": str(path), "max_length": 48, **values})


def test_second_call_reads_the_cache(tmp_path, tokenizer, monkeypatch):
    config = config_for(write_data(tmp_path))
    first, report = prepare_samples(config, tokenizer)
    assert report.samples == 3 and report.truncated == 1 and report.sources == [(config.data_path, 3)]

    def no_reading(*args, **kwargs):
        raise AssertionError("the sources were read again")

    monkeypatch.setattr(dataset, "load_sources", no_reading)
    second, cached = prepare_samples(config, tokenizer)
    assert second == first and cached.lengths == report.lengths and cached.cache == report.cache


def test_cache_key_follows_content_and_settings(tmp_path, tokenizer):
    path = write_data(tmp_path)
    config = config_for(path)
    key = cache_key(config, source_specs(config), tokenizer)
    assert cache_key(config_for(path, max_length=64), source_specs(config), tokenizer) != key
    assert cache_key(config_for(path, prompt_template="qwen_chat"), source_specs(config), tokenizer) != key
    assert cache_key(config_for(path, SYSTEM="x"), source_specs(config), tokenizer) != key
    assert cache_key(config, source_specs(config), tokenizer) == key
    write_data(tmp_path, outputs=("cold", "small", "changed"))
    assert cache_key(config, source_specs(config), tokenizer) != key


def test_drop_policy_leaves_long_samples_out_and_counts_them(tmp_path, tokenizer):
    samples, report = prepare_samples(config_for(write_data(tmp_path), truncation="drop"), tokenizer, use_cache=False)
    assert report.samples == 2 and report.truncated == 1 and report.dropped_too_long == 1
    assert all(len(s.input_ids) <= 48 for s in samples)


def test_an_incomplete_cache_entry_is_never_read(tmp_path, tokenizer):
    config = config_for(write_data(tmp_path))
    first, report = prepare_samples(config, tokenizer)
    cache_dir = Path(report.cache)
    (cache_dir / "samples.safetensors").unlink()
    again, _ = prepare_samples(config, tokenizer)
    assert again == first and (cache_dir / "samples.safetensors").is_file()
    assert not list(cache_dir.parent.glob(".*.partial"))


def test_parallel_encoding_equals_serial(tokenizer):
    conversations = [Conversation((Turn("user", f"question {i}"), Turn("assistant", f"answer {i} " * (i % 7), True))) for i in range(40)]
    config = Config(llm_name_or_path="-", data_path="-", max_length=32)
    template = get_template("internlm2_chat")
    assert encode_parallel(conversations, template, tokenizer, config, 2) == encode_parallel(conversations, template, tokenizer, config, 1)


def test_mixed_sources_are_counted_per_source(tmp_path, tokenizer):
    first = write_data(tmp_path)
    second = tmp_path / "more.jsonl"
    second.write_text(json.dumps({"conversation": [{"input": "hi", "output": "hello"}]}) + "\n")
    config = Config(
        llm_name_or_path="-", max_length=48,
        datasets=[{"path": str(first)}, {"path": str(second), "repeats": 3}],
    )  # fmt: skip
    _, report = prepare_samples(config, tokenizer, use_cache=False)
    assert report.sources == [(str(first), 3), (str(second), 3)] and report.samples == 6


def test_the_cache_key_follows_the_code_of_a_users_map_function(tmp_path, tokenizer, monkeypatch):
    import sys

    module = tmp_path / "my_map.py"
    code = "from xtune.data.formats import alpaca_to_standard\n\ndef to_conversation(record):\n    return alpaca_to_standard(record)\n"
    module.write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        config = config_for(write_data(tmp_path), dataset_format="my_map:to_conversation")
        key = cache_key(config, source_specs(config), tokenizer)
        module.write_text(code.replace("(record)\n", "({**record, 'output': record['output'].upper()})\n"))
        assert cache_key(config, source_specs(config), tokenizer) != key  # was a 'cache hit' on the old samples
    finally:
        sys.modules.pop("my_map", None)
