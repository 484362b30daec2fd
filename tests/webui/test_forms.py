"""The config form: schema -> form -> YAML config that `xtune train` loads and runs, with the CLI's errors."""

import json
import os
import subprocess
import sys

import pytest

from xtune.config.load import BUILTIN_DIR, load_config
from xtune.config.schema import Config
from xtune.errors import ConfigError
from xtune.webui.forms import FormError, config_text, load_form, parse_form, schema_fields, validate, write_config

TINY = "tiny_internlm2_chat_lora_antonyms"


def as_the_page_sends(values: dict) -> dict:
    """What app.js posts: checkboxes as booleans, lists and mappings as JSON text, the rest as typed text."""
    sent = {}
    for field in schema_fields():
        value = values[field.name]
        if field.kind == "bool":
            sent[field.name] = value
        elif field.kind == "json":
            sent[field.name] = "" if value is None else json.dumps(value)
        else:
            sent[field.name] = "None" if value is None and field.kind == "choice" else "" if value is None else str(value)
    return sent


def test_every_field_of_the_schema_is_in_the_form_with_its_docstring():
    fields = {field.name: field for field in schema_fields()}
    assert set(fields) == set(Config.model_fields)
    assert fields["lr"].kind == "float" and fields["lr"].group == "Optimisation"
    assert fields["lr"].help == Config.model_fields["lr"].description
    assert fields["method"].kind == "choice" and fields["method"].choices == ("lora", "full")
    assert fields["quantization"].optional and fields["quantization"].choices == ("4bit", "8bit")
    assert fields["evaluation_inputs"].kind == "json" and fields["pack_to_max_length"].kind == "bool"
    assert fields["llm_name_or_path"].required and fields["llm_name_or_path"].group == "Model"


def builtin_files():
    return sorted(path.stem for path in BUILTIN_DIR.iterdir() if path.suffix in (".py", ".yaml"))


@pytest.mark.parametrize("name", builtin_files())
def test_round_trip_gives_the_same_config(name, tmp_path):
    try:
        original, _ = load_config(name)
    except ConfigError as error:  # a config naming data this machine lacks
        pytest.skip(str(error))
    form = load_form(name)
    path = write_config(parse_form(as_the_page_sends(form["values"])), tmp_path / "round.yaml")
    again, _ = load_config(str(path))
    assert again == original


def test_only_what_differs_from_the_defaults_is_written():
    form = load_form(TINY)
    text = config_text(parse_form(as_the_page_sends(form["values"])))
    assert "lora_r: 16\n" in text and "work_dir: work_dirs/tiny_internlm2_chat_lora_antonyms\n" in text
    assert "stage:" not in text and "optim_type:" not in text  # defaults


def test_errors_are_the_clis_and_sit_at_their_field(tmp_path):
    values = as_the_page_sends(load_form(TINY)["values"])
    assert validate(values) == {}
    errors = validate({**values, "lora_r": "0", "lr": "fast", "lora_dropout": "2"})
    assert set(errors) == {"lr"}  # a value that is no number stops before the schema is asked
    errors = validate({**values, "lora_r": "0", "lora_dropout": "2"})
    assert set(errors) == {"lora_r", "lora_dropout"}
    bad = {**values, "lora_r": "0"}
    (tmp_path / "cli.yaml").write_text(config_text(parse_form(bad)))
    with pytest.raises(ConfigError) as cli:
        load_config(str(tmp_path / "cli.yaml"))
    assert errors["lora_r"] == str(cli.value).splitlines()[0].replace(str(tmp_path / "cli.yaml"), "form")
    assert "greater than 0" in errors["lora_r"]


def test_an_unknown_key_and_a_bad_json_value_are_refused_by_name():
    values = as_the_page_sends(load_form(TINY)["values"])
    errors = validate({**values, "learning_rate": 0.1})
    assert "unknown key 'learning_rate'" in errors["learning_rate"] and "'lr'" in errors["learning_rate"]
    errors = validate({**values, "evaluation_inputs": '["unclosed"'})
    assert "expects JSON" in errors["evaluation_inputs"]


def test_a_yaml_key_that_runs_code_needs_allow_code(tmp_path):
    values = as_the_page_sends(load_form(TINY)["values"])
    values["trust_remote_code"] = True
    assert "--allow-code" in validate(values)["trust_remote_code"]
    assert validate(values, allow_code=True) == {}
    with pytest.raises(FormError):
        write_config(parse_form(values), tmp_path / "code.yaml")
    assert not (tmp_path / "code.yaml").exists()  # a file that does not load is not left behind


@pytest.mark.slow
def test_the_written_config_trains(tmp_path):
    values = as_the_page_sends(load_form(TINY)["values"])
    values |= {"max_steps": "2", "save_steps": "2", "evaluation_inputs": "[]", "work_dir": str(tmp_path / "runs")}
    path = write_config(parse_form(values), tmp_path / "configs" / "tiny.yaml")
    done = subprocess.run([sys.executable, "-m", "xtune.cli", "train", str(path)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = (tmp_path / "runs").glob("*/metrics.jsonl")
    assert [json.loads(line)["step"] for line in run.read_text().splitlines()] == [1, 2]
    assert (run.parent / "checkpoint-2" / "adapter_model.safetensors").is_file()
