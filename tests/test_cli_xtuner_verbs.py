"""XTuner's verbs: version, list-dataset-format, check-custom-dataset, convert split, train's --cfg-options."""

import json

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import xtune
from xtune.cli import app

runner = CliRunner()


def test_version_and_dash_dash_version():
    for args in (["version"], ["--version"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and result.output.strip() == xtune.__version__


def test_list_dataset_format_lists_xtuners_names_with_a_description():
    result = runner.invoke(app, ["list-dataset-format"])
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert "b-mc2/sql-create-context: {context, question, answer}" in lines["sql"]
    assert "[XTuner: alpaca_zh_map_fn]" in lines["alpaca_zh"] and "sharegpt" in lines


def test_train_help_lists_cfg_options():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "--cfg-options key=value" in result.output


def test_check_custom_dataset_shows_the_first_sample_at_each_step(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "Reverse xs.", "completion": "xs[::-1]"}) + "\n" + "{oops\n")
    config = tmp_path / "c.py"
    config.write_text(f"llm_name_or_path = 'xtune-tiny/internlm2-chat'\ndata_path = {str(tmp_path / 'd.jsonl')!r}\n"
                      "dataset_map_fn = 'code_alpaca_map_fn'\n")  # fmt: skip
    result = runner.invoke(app, ["check-custom-dataset", str(config)])
    output = result.output.replace("\n", "")
    assert "####   first sample after dataset_format 'code_alpaca_map_fn'   ####" in output
    assert "{'role': 'user', 'content': 'Reverse xs.'}" in output and "[[xs[::-1]" in output
    assert "####   encoded labels   ####" in output
    assert result.exit_code == 1 and f"{tmp_path}/d.jsonl:2: not valid JSON" in output


def test_convert_split_reshards_and_keeps_every_tensor(tmp_path):
    from xtune.models.load import resolve_model_path

    source = resolve_model_path("xtune-tiny/llama")
    result = runner.invoke(app, ["convert", "split", str(source), str(tmp_path / "split"), "--max-shard-size", "20KB"])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "split" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and (tmp_path / "split" / "config.json").is_file()
    resharded = {name: tensor for shard in shards for name, tensor in load_file(tmp_path / "split" / shard).items()}
    original = {name: tensor for file in sorted(source.glob("*.safetensors")) for name, tensor in load_file(file).items()}
    assert resharded.keys() == original.keys()
    assert all(torch.equal(resharded[name], original[name]) for name in original)
    again = runner.invoke(app, ["convert", "split", str(source), str(tmp_path / "split")])
    assert again.exit_code != 0  # never overwrites
