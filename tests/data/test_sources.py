import json
import random
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xtune.data.formats import Conversation, Turn
from xtune.data.loader import load_conversations, resolve_data_path
from xtune.data.sources import (
    BadRecord,
    SourceSpec,
    data_files,
    load_sources,
    map_function,
    read_conversations,
    read_records,
    repeat,
)
from xtune.errors import DataError

ALPACA = [{"instruction": f"q{n}", "output": f"a{n}"} for n in range(4)]
QA = Conversation((Turn("user", "q0"), Turn("assistant", "a0", True)))


def qa(n: int) -> Conversation:
    return Conversation((Turn("user", f"q{n}"), Turn("assistant", f"a{n}", True)))


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def load(path, **options):
    return load_sources([SourceSpec(str(path), **options)])


def error_of(path, **options) -> str:
    with pytest.raises(DataError) as caught:
        load(path, **options)
    message = str(caught.value)
    assert "\n" not in message
    return message


# Every source type, with locations -----------------------------------------------------------------


def test_jsonl_locations_are_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n\n" + json.dumps(ALPACA[1]) + "\n")
    assert load(path).samples == [(f"{path}:1", qa(0)), (f"{path}:3", qa(1))]


def test_json_list_locations_are_record_indices(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ALPACA[:2], indent=2))
    assert load(path).samples == [(f"{path}[record 0]", qa(0)), (f"{path}[record 1]", qa(1))]


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.json", ALPACA[:2])
    assert load(path).samples == [(f"{path}:1", qa(0)), (f"{path}:2", qa(1))]


def test_parquet_rows(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ALPACA[:3]), path)
    assert load(path).samples == [(f"{path}[row {n}]", qa(n)) for n in range(3)]


def test_parquet_nulls_of_a_merged_schema_count_as_absent(tmp_path):
    """Messages with and without tool_calls share one struct type: the missing keys read back as null."""
    messages = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "content": "r", "tool_call_id": "1"},
                {"role": "assistant", "content": "a", "weight": 1},
            ]
        },
    ]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(messages), path)
    first, second = load(path).conversations
    assert first == Conversation((Turn("user", "q"), Turn("assistant", "a", True)))
    assert second.turns[2] == Turn("tool", "r", name="f", call_id="1")


def test_csv_location_is_the_line_a_row_starts_on(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\nq0,,a0\n\n"q1","multi\nline","a1"\nq2,,a2\n')
    loaded = load(path)
    assert [location for location, _ in loaded.samples] == [f"{path}:2", f"{path}:4", f"{path}:6"]
    assert loaded.conversations[1].turns[0] == Turn("user", "q1\nmulti\nline")


def test_txt_is_one_raw_document_per_line(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("First document.\n\n  \nSecond one.\r\n")
    assert load(path, format="auto").samples == [
        (f"{path}:1", Conversation((Turn("assistant", "First document.", True),), raw=True)),
        (f"{path}:4", Conversation((Turn("assistant", "Second one.", True),), raw=True)),
    ]


def test_text_records_in_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "doc", "source": "web"}])
    assert load(path).conversations == [Conversation((Turn("assistant", "doc", True),), raw=True)]


def test_folder_is_read_sorted_and_recursively_with_a_format_per_file(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [ALPACA[1]])
    write_jsonl(tmp_path / "a" / "z.jsonl", [{"conversation": [{"input": "q0", "output": "a0"}]}])
    (tmp_path / "c.txt").write_text("doc\n")
    (tmp_path / "README.md").write_text("# not data\n")
    write_jsonl(tmp_path / ".cache" / "x.jsonl", [{"junk": 1}])
    locations = [location for location, _ in load(tmp_path).samples]
    assert locations == [f"{tmp_path}/a/z.jsonl:1", f"{tmp_path}/b.jsonl:1", f"{tmp_path}/c.txt:1"]
    assert load(tmp_path).conversations[:2] == [qa(0), qa(1)]


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    assert "holds no data files" in error_of(tmp_path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("saved")
    datasets.Dataset.from_list(ALPACA[:2]).save_to_disk(str(root / "plain"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ALPACA[:3]), "test": datasets.Dataset.from_list(ALPACA[3:])}
    ).save_to_disk(str(root / "dict"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(ALPACA[:1])}).save_to_disk(str(root / "notrain"))
    return root


def test_saved_dataset_folder(saved):
    assert load(saved / "plain").samples == [(f"{saved}/plain[row 0]", qa(0)), (f"{saved}/plain[row 1]", qa(1))]


def test_saved_dataset_dict_uses_the_train_split(saved):
    assert load(saved / "dict").samples == [(f"{saved}/dict/train[row {n}]", qa(n)) for n in range(3)]
    assert load(saved / "dict" / "test").conversations == [qa(3)]


def test_saved_dataset_dict_without_train_lists_its_splits(saved):
    message = error_of(saved / "notrain")
    assert "has splits validation but no 'train'" in message and f"{saved}/notrain/validation" in message


def test_saved_dataset_inside_a_folder_is_one_source(saved):
    assert data_files(saved) == [saved / "dict", saved / "notrain", saved / "plain"]


def test_tiny_dataset_paths_keep_working():
    path = resolve_data_path("xtune-tiny/antonyms")
    assert path.suffix == ".jsonl"
    assert len(load("xtune-tiny/antonyms").samples) == len(load_conversations(path))
    with pytest.raises(Exception, match="unknown tiny dataset"):
        resolve_data_path("xtune-tiny/nope")


def test_load_conversations_adds_the_system_prompt(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA[0], {"text": "raw"}, {"instruction": "q", "output": "a", "system": "own"}])
    with pytest.raises(DataError):  # the second record is read as alpaca: the format is the first record's
        load_conversations(path, system="default")
    conversations = load_conversations(path, "auto", "default", skip_bad_records=True)
    assert [c.system for c in conversations] == ["default", "own"]


# Images -------------------------------------------------------------------------------------------

LLAVA = {"id": "7", "image": "cat.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]}


def test_image_paths_are_joined_to_the_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (4, 4), "gray").save(tmp_path / "images" / "cat.jpg")
    path = write_jsonl(tmp_path / "d.jsonl", [LLAVA])
    (conversation,) = load(path, image_folder=str(tmp_path / "images")).conversations
    assert conversation.images == (str(tmp_path / "images" / "cat.jpg"),)


def test_missing_image_names_record_and_path(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [LLAVA])
    message = error_of(path, image_folder=str(tmp_path))
    assert message == (
        f"{path}:1: image 'cat.jpg' of record id '7' not found (looked at {tmp_path / 'cat.jpg'}); "
        "set image_folder, or fix the path."
    )
    unchecked = load_sources([SourceSpec(str(path), image_folder="imgs")], check_images=False)
    assert unchecked.conversations[0].images == ("imgs/cat.jpg",)


# Mixing and repeats -------------------------------------------------------------------------------


def test_sources_mix_in_order_with_repeats(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", ALPACA[:2])
    second = write_jsonl(tmp_path / "second.jsonl", ALPACA[2:])
    loaded = load_sources([SourceSpec(str(first), repeats=2), SourceSpec(str(second), "alpaca", repeats=1)])
    assert loaded.conversations == [qa(0), qa(1), qa(0), qa(1), qa(2), qa(3)]


def test_fractional_repeats_pick_a_seeded_random_share(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{n}", "output": f"a{n}"} for n in range(10)])
    half = load_sources([SourceSpec(str(path), repeats=0.5)], seed=1).conversations
    assert len(half) == 5 and len(set(half)) == 5
    assert half == load_sources([SourceSpec(str(path), repeats=0.5)], seed=1).conversations
    assert len(load_sources([SourceSpec(str(path), repeats=1.5)]).conversations) == 15
    assert len(load_sources([SourceSpec(str(path), repeats=0.26)]).conversations) == 3
    picks = {tuple(load_sources([SourceSpec(str(path), repeats=0.5)], seed=seed).conversations) for seed in range(5)}
    assert len(picks) > 1


def test_repeat_counts():
    items = [(str(n), QA) for n in range(7)]
    rng = random.Random(0)
    assert [len(repeat(items, r, rng)) for r in (0, 0.5, 1, 2, 2.5, 3)] == [0, 4, 7, 14, 18, 21]
    assert repeat(items, 2, rng) == items + items


def test_repeats_zero_everywhere_and_negative_repeats_are_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    assert "repeats leave none" in error_of(path, repeats=0)
    assert "repeats must be a number >= 0, got -1" in error_of(path, repeats=-1)


# Bad input: one-line errors naming file, line or record, and field ----------------------------------


@pytest.mark.parametrize(
    "name, content, location, message",
    [
        ("d.jsonl", '{"instruction": "q", "output": "a"}\n{"instruction": "q",\n', ":2", "not valid JSON (Expecting property name enclosed in double quotes at column 21)."),
        ("d.json", '[\n  {"instruction": "q", "output": "a"},\n  {"instruction" "q"}\n]', ":3", "not valid JSON (Expecting ':' delimiter at line 3, column 18); the whole file is unreadable."),
        ("d.json", '{"instruction": "q"}', "", "a .json dataset must be a list of records (or JSON Lines), got dict."),
        ("d.jsonl", '{"instruction": "q"}\n', ":1", "missing field 'output' (format 'alpaca')."),
        ("d.jsonl", '{"instruction": "q", "output": 5}\n', ":1", "field 'output' must be a string, got int (format 'alpaca')."),
        ("d.json", '[{"instruction": "q", "output": "a"}, {"instruction": "q", "output": ["a"]}]', "[record 1]", "field 'output' must be a string, got list (format 'alpaca')."),
        ("d.jsonl", '{"prompt": "q"}\n', ":1", "unknown record format (keys: prompt)"),
        ("d.jsonl", "", "", "no records; the file is empty."),
        ("d.jsonl", "\n\n", "", "no records; the file is empty."),
        ("d.json", "[]", "", "no records; the file is empty."),
        ("d.txt", "", "", "no records; the file is empty."),
        ("d.csv", "instruction,output\n", "", "no records; the file is empty."),
        ("d.csv", "instruction,output\nq,a,extra\n", ":2", "the row has 3 fields but the header has 2."),
        ("d.csv", "instruction,input\nq,a\n", ":2", "missing field 'output' (format 'alpaca')."),
        ("d.xlsx", "x", "", "unsupported file type '.xlsx'; use one of .json, .jsonl, .parquet, .csv, .txt, .arrow."),
        ("d.parquet", "not parquet", "", "not a readable Parquet file"),
        ("d.jsonl", '{"text": "a"}\n{"text": ' + "[" * 5000 + "]" * 5000 + "}\n", ":2", "JSON nested 5,001 levels deep, deeper than Python's JSON parser reads (records are a few levels deep)."),
        ("d.json", '[\n{"text": "a"},\n' + "[" * 5000 + "]" * 5000 + "\n]", ":3", "JSON nested 5,001 levels deep, deeper than Python's JSON parser reads (records are a few levels deep); the whole file is unreadable."),
    ],
)
def test_bad_input_errors_name_the_location(tmp_path, name, content, location, message):
    path = tmp_path / name
    path.write_text(content)
    assert error_of(path).startswith(f"{path}{location}: {message}")


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    assert error_of(path) == f"{path}:2: not UTF-8 text (byte 11 of the line)."
    whole = tmp_path / "d.json"
    whole.write_bytes(b'[\n{"text": "\xff"}]')
    assert error_of(whole) == f"{whole}:2: not UTF-8 text; the whole file is unreadable."


def test_sharegpt_order_error_names_file_line_and_message_index(tmp_path):
    record = {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    assert error_of(path) == (
        f"{path}:1: 'conversations[1]' is a user turn after a user turn; expected an assistant turn (format 'sharegpt')."
    )


def test_missing_path_and_unknown_format_are_errors_before_reading(tmp_path):
    assert "does not exist" in error_of(tmp_path / "nope.jsonl")
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    assert "unknown dataset_format 'alpacca'; use auto, conversation, alpaca, openai, sharegpt, llava, text" in error_of(path, format="alpacca")


def test_skip_bad_records_counts_and_lists_them(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(
            [json.dumps(ALPACA[0]), "{oops", json.dumps({"instruction": "q"}), json.dumps(ALPACA[1]), json.dumps([1])]
        )
    )
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    loaded = load_sources([SourceSpec(str(path), repeats=2), SourceSpec(str(empty))], skip_bad_records=True)
    assert loaded.conversations == [qa(0), qa(1), qa(0), qa(1)]
    assert [str(bad) for bad in loaded.skipped] == [
        f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{path}:3: missing field 'output' (format 'alpaca')",
        f"{path}:5: a record must be a JSON object, got list (format 'alpaca')",
        f"{empty}: no records; the file is empty",
    ]


def test_all_records_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q"}])
    with pytest.raises(DataError, match=r"no usable records in .*: all 1 were bad; the first: .*d.jsonl:1: missing field 'output'"):
        load_sources([SourceSpec(str(path))], skip_bad_records=True)


def test_records_before_the_first_known_one_are_bad_and_detection_moves_on(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"junk": 1}, ALPACA[0]])
    items = list(read_conversations(path))
    assert isinstance(items[0], BadRecord) and items[0].location == f"{path}:1"
    assert items[1] == (f"{path}:2", qa(0))


def test_read_records_yields_records_and_bad_records(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n[\n')
    assert list(read_records(path)) == [
        (f"{path}:1", {"a": 1}),
        BadRecord(f"{path}:2", "not valid JSON (Expecting value at column 2)"),
    ]


# A user's own map function, by dotted path ---------------------------------------------------------

USER_MODULE = '''
from xtune.data.formats import Conversation, RecordError, Turn


def qa_map_fn(record):
    if "q" not in record:
        raise RecordError("missing field 'q'")
    return Conversation((Turn("user", record["q"]), Turn("assistant", record["a"], True)))


def broken(record):
    return record["nope"]


def not_a_conversation(record):
    return {"q": 1}


def bad_order(record):
    return Conversation((Turn("assistant", "a", True), Turn("user", "q")))
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_formats.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_formats"
    sys.modules.pop("my_formats", None)


@pytest.mark.parametrize("separator", [":", "."])
def test_user_map_function_by_dotted_path(tmp_path, user_module, separator):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "q0", "a": "a0"}])
    assert load(path, format=f"{user_module}{separator}qa_map_fn").conversations == [qa(0)]


def test_user_map_function_failures_are_bad_records(tmp_path, user_module):
    path = write_jsonl(tmp_path / "d.jsonl", [{"a": "x"}])
    assert error_of(path, format="my_formats:qa_map_fn") == f"{path}:1: missing field 'q' (format 'my_formats:qa_map_fn')."
    with pytest.raises(DataError, match=r"map function 'my_formats:broken' failed \(KeyError: 'nope'\)") as caught:
        load(path, format="my_formats:broken")
    assert isinstance(caught.value.__cause__, KeyError)
    assert "expected a Conversation, got dict (format 'my_formats:not_a_conversation')" in error_of(path, format="my_formats:not_a_conversation")
    assert "'turns[0]' is an assistant turn after the start; expected a user turn" in error_of(path, format="my_formats:bad_order")


def test_user_map_function_import_errors_name_the_path(user_module):
    with pytest.raises(DataError, match=r"dataset_format 'no_such_pkg\.mod:fn': cannot import module 'no_such_pkg\.mod'"):
        map_function("no_such_pkg.mod:fn")
    with pytest.raises(DataError, match=r"dataset_format 'my_formats\.missing': module 'my_formats' has no function 'missing'"):
        map_function("my_formats.missing")


# Fuzzing the file readers: only records or BadRecords, never an exception ---------------------------

FILE_TEXT = st.text(alphabet=st.sampled_from(list('{}[]",:\n\r 01ab\\') + ["\x00", "é"]), max_size=60) | st.lists(
    st.sampled_from([json.dumps(ALPACA[0]), '{"text": "x"}', '{"messages": 1}', "[1, 2]", "{", "", "a,b", '"x\ny"']), max_size=4
).map("\n".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(suffix=st.sampled_from([".json", ".jsonl", ".csv", ".txt", ".parquet"]), text=FILE_TEXT, raw=st.binary(max_size=20), as_bytes=st.booleans())
def test_fuzz_file_readers(suffix, text, raw, as_bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"d{suffix}"
        path.write_bytes(raw if as_bytes else text.encode())
        for item in read_conversations(path):
            assert isinstance(item, BadRecord) or isinstance(item[1], Conversation)


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path):
    from xtune.data.sources import SourceSpec, load_sources

    data = tmp_path / "d.csv"
    data.write_text("instruction,output,output\nhi,a,b\n")
    with pytest.raises(DataError, match=r"d.csv:1: the header names 'output' more than once"):
        load_sources([SourceSpec(str(data), "alpaca")])


# Built-in datasets and placeholders ---------------------------------------------------------------------------------

def test_self_cognition_ships_with_xtune_and_names_the_assistant_given():
    from xtune.data.sources import BUILTIN_DATASETS

    loaded = load_sources([SourceSpec("xtune-data/self_cognition")], placeholders={"name": "Aria", "author": "Acme"})
    answers = [c.turns[-1].content for c in loaded.conversations]
    assert len(answers) >= 30 and all("{{" not in a for a in answers)
    assert any("Aria" in a and "Acme" in a for a in answers) and any("我是Aria" in a for a in answers)
    with pytest.raises(DataError, match=r"writes \{\{author\}\}: set data_placeholders = \{\"name\": \"...\", \"author\""):
        load_sources([SourceSpec("xtune-data/self_cognition")], placeholders={"name": "Aria"})
    with pytest.raises(DataError, match="no such dataset; xtune ships xtune-data/self_cognition"):
        load_sources([SourceSpec("xtune-data/identity")])
    assert set(BUILTIN_DATASETS) == {"self_cognition"}


def test_placeholders_fill_every_format_and_reasoning(tmp_path):
    path = tmp_path / "id.jsonl"
    record = {"messages": [{"role": "system", "content": "You are {{name}}."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "I am {{name}}", "reasoning_content": "by {{author}}"}]}  # fmt: skip
    path.write_text(json.dumps(record) + "\n")
    (conversation,) = load_sources([SourceSpec(str(path))], placeholders={"name": "Aria", "author": "Acme"}).conversations
    assert [t.content for t in conversation.turns] == ["You are Aria.", "Hi", "I am Aria"]
    assert conversation.turns[-1].reasoning == "by Acme"
    (untouched,) = load_sources([SourceSpec(str(path))]).conversations
    assert untouched.turns[-1].content == "I am {{name}}"  # without placeholders the text is the data's


def test_placeholders_are_part_of_the_cache_key(tokenizer):
    from xtune.config.schema import Config
    from xtune.data.dataset import cache_key, source_specs

    def key(**values):
        config = Config(llm_name_or_path="xtune-tiny/internlm2-chat", data_path="xtune-data/self_cognition", **values)
        return cache_key(config, source_specs(config), tokenizer)

    assert key(data_placeholders={"name": "A", "author": "B"}) != key(data_placeholders={"name": "C", "author": "B"})
