"""Hugging Face dataset ids resolved from cache layouts built here, offline."""

import json

import datasets
import pytest

from xtune.data.sources import load_sources, resolve_data_path, SourceSpec
from xtune.errors import DataError

ROWS = {"instruction": ["Say hi", "Count"], "input": ["", "to 2"], "output": ["hi", "1 2"]}


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "hf"


def users(path: str, dataset_format: str = "alpaca") -> list[str]:
    loaded = load_sources([SourceSpec(path, dataset_format)])
    return [conversation.turns[0].content for conversation in loaded.conversations]


def test_hub_snapshot_train_split_only(hf_home):
    repo = hf_home / "hub" / "datasets--tatsu-lab--alpaca"
    snapshot = repo / "snapshots" / "abc123"
    (snapshot / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(ROWS).to_parquet(snapshot / "data" / "train-00000-of-00001-a1b2.parquet")
    datasets.Dataset.from_dict({"instruction": ["held out"], "input": [""], "output": ["no"]}).to_parquet(
        snapshot / "data" / "test-00000-of-00001-c3d4.parquet")  # fmt: skip
    (snapshot / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert resolve_data_path("tatsu-lab/alpaca") == snapshot
    assert users("tatsu-lab/alpaca") == ["Say hi", "Count\nto 2"]


def test_hub_snapshot_of_one_json_file_with_hf_hub_cache(hf_home, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    snapshot = tmp_path / "elsewhere" / "datasets--silk-road--alpaca-data-gpt4-chinese" / "snapshots" / "f00"
    snapshot.mkdir(parents=True)
    record = {"instruction_zh": "翻译", "input_zh": "", "output_zh": "好", "instruction": "x", "input": "", "output": "y"}
    (snapshot / "Alpaca_data_gpt4_zh.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n")
    assert users("silk-road/alpaca-data-gpt4-chinese", "alpaca_zh_map_fn") == ["翻译"]


def test_datasets_cache_written_by_load_dataset(hf_home, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "dscache"))
    folder = tmp_path / "dscache" / "tatsu-lab___alpaca" / "default" / "0.0.0" / "dce01c9b08f87459"
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(ROWS).save_to_disk(str(saved))
    folder.mkdir(parents=True)
    (saved / "data-00000-of-00001.arrow").rename(folder / "alpaca-train.arrow")
    (saved / "dataset_info.json").rename(folder / "dataset_info.json")
    assert resolve_data_path("tatsu-lab/alpaca") == folder
    assert users("tatsu-lab/alpaca") == ["Say hi", "Count\nto 2"]


def test_load_from_disk_folder(hf_home, tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    assert users(str(tmp_path / "dd")) == ["Say hi", "Count\nto 2"]


def test_not_found_names_every_place_looked(hf_home, tmp_path):
    with pytest.raises(DataError) as error:
        resolve_data_path("tatsu-lab/alpaca")
    message = str(error.value)
    assert f"local path {tmp_path / 'tatsu-lab' / 'alpaca'}" in message
    assert f"Hugging Face hub cache {hf_home / 'hub' / 'datasets--tatsu-lab--alpaca' / 'snapshots'}" in message
    assert f"datasets cache {hf_home / 'datasets' / 'tatsu-lab___alpaca'}/" in message
    assert "huggingface-cli download --repo-type dataset tatsu-lab/alpaca" in message


def test_a_missing_data_file_is_not_looked_up_as_an_id(hf_home):
    with pytest.raises(DataError, match="does not exist") as error:
        resolve_data_path("data/x.json")
    assert "cache" not in str(error.value)
