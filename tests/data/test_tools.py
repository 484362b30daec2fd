import json

import pytest

from xtune.data.loader import load_conversations
from xtune.data.tools import repeat_dataset
from xtune.errors import DataError

RECORDS = [
    {"conversation": [{"input": "Opposite of hot?", "output": "cold"}]},
    {"conversation": [{"input": "Zürich ist schön? 你好", "output": "ja 🙂"}]},
]


def write_json(path, value):
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_a_json_array_is_repeated_n_times(tmp_path):
    source = write_json(tmp_path / "in.json", RECORDS)
    assert repeat_dataset(source, tmp_path / "out.json", 3) == 6
    assert json.loads((tmp_path / "out.json").read_text(encoding="utf-8")) == RECORDS * 3


def test_json_lines_in_and_out(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    assert repeat_dataset(str(source), str(tmp_path / "out.jsonl"), 2) == 4
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == RECORDS * 2
    assert "Zürich" in lines[1]  # written as text, not \u escapes


@pytest.mark.parametrize(("source_name", "output_name"), [("in.json", "out.jsonl"), ("in.jsonl", "out.json")])
def test_the_output_suffix_picks_the_format(tmp_path, source_name, output_name):
    source = tmp_path / source_name
    write_json(source, RECORDS) if source_name.endswith(".json") else write_jsonl(source, RECORDS)
    assert repeat_dataset(source, tmp_path / output_name, 2) == 4
    assert len(load_conversations(tmp_path / output_name)) == 4


def test_json_lines_in_a_json_file_are_read(tmp_path):
    source = write_jsonl(tmp_path / "in.json", RECORDS)
    assert repeat_dataset(source, tmp_path / "out.json", 1) == 2


def test_an_existing_output_is_never_replaced(tmp_path):
    source = write_json(tmp_path / "in.json", RECORDS)
    (tmp_path / "out.json").write_text("mine")
    with pytest.raises(DataError, match="out.json already exists"):
        repeat_dataset(source, tmp_path / "out.json", 2)
    assert (tmp_path / "out.json").read_text() == "mine"


@pytest.mark.parametrize("value", [{"conversation": []}, "text", 3])
def test_json_that_is_not_a_list_is_refused(tmp_path, value):
    source = write_json(tmp_path / "in.json", value)
    with pytest.raises(DataError, match=r"in\.json holds a JSON .*not a list"):
        repeat_dataset(source, tmp_path / "out.json", 2)
    assert not (tmp_path / "out.json").exists()


def test_invalid_json_names_the_file_and_line(tmp_path):
    (tmp_path / "in.json").write_text('[\n{"a": 1},\n{"b": }\n]')
    with pytest.raises(DataError, match=r"in\.json:3: not valid JSON"):
        repeat_dataset(tmp_path / "in.json", tmp_path / "out.json", 2)
    write_jsonl(tmp_path / "in.jsonl", RECORDS)
    with (tmp_path / "in.jsonl").open("a") as file:
        file.write("{oops\n")
    with pytest.raises(DataError, match=r"in\.jsonl:3: not valid JSON"):
        repeat_dataset(tmp_path / "in.jsonl", tmp_path / "out.jsonl", 2)


def test_a_missing_or_empty_input_is_refused(tmp_path):
    with pytest.raises(DataError, match="nope.json does not exist"):
        repeat_dataset(tmp_path / "nope.json", tmp_path / "out.json", 2)
    write_json(tmp_path / "empty.json", [])
    with pytest.raises(DataError, match="empty.json holds no records"):
        repeat_dataset(tmp_path / "empty.json", tmp_path / "out.json", 2)


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "2"])
def test_the_count_must_be_a_whole_number_of_at_least_one(tmp_path, n):
    source = write_json(tmp_path / "in.json", RECORDS)
    with pytest.raises(DataError, match="repeat count"):
        repeat_dataset(source, tmp_path / "out.json", n)


def test_the_output_must_be_json_or_json_lines(tmp_path):
    source = write_json(tmp_path / "in.json", RECORDS)
    with pytest.raises(DataError, match=r"out\.csv.*\.json"):
        repeat_dataset(source, tmp_path / "out.csv", 2)


def test_writes_into_new_folders_and_leaves_nothing_behind(tmp_path):
    source = write_json(tmp_path / "in.json", RECORDS)
    assert repeat_dataset(source, tmp_path / "made" / "out.json", 200) == 400
    assert [path.name for path in (tmp_path / "made").iterdir()] == ["out.json"]


@pytest.mark.parametrize("name", ["in.json", "in.jsonl"])
def test_json_nested_too_deep_names_the_file_and_line(tmp_path, name):
    """Issue 23, item 16: `data repeat` on JSON nested 100,000 deep was a RecursionError traceback."""
    deep = "[" * 100_000 + "]" * 100_000
    text = f'[\n{json.dumps(RECORDS[0])},\n{deep}\n]' if name == "in.json" else f"{json.dumps(RECORDS[0])}\n{deep}\n"
    (tmp_path / name).write_text(text)
    line = 3 if name == "in.json" else 2
    with pytest.raises(DataError, match=rf"{name}:{line}: JSON nested 100,00[01] levels deep, deeper than Python's JSON parser reads"):
        repeat_dataset(tmp_path / name, tmp_path / "out.jsonl", 2)
    assert not (tmp_path / "out.jsonl").exists()


def test_a_number_python_will_not_read_names_the_line(tmp_path):
    (tmp_path / "in.jsonl").write_text(f'{json.dumps(RECORDS[0])}\n{{"n": {"9" * 5000}}}\n')
    with pytest.raises(DataError, match=r"in\.jsonl:2: not valid JSON \(Exceeds the limit"):
        repeat_dataset(tmp_path / "in.jsonl", tmp_path / "out.jsonl", 2)


def test_a_full_disk_names_the_output_and_leaves_the_input_and_no_partial_file(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    source = write_json(tmp_path / "in.json", RECORDS)
    before = source.read_bytes()

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(DataError, match=r"could not write .*out\.json: the disk is full \(No space left on device\); .*in\.json is as it was"):
        repeat_dataset(source, tmp_path / "out.json", 2)
    assert source.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.json"]
