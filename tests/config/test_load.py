import pytest
import yaml

from xtune.config.load import copy_config, list_configs, load_config, parse_override
from xtune.config.schema import Config
from xtune.errors import ConfigError


def write(tmp_path, text, name="my_cfg.py"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_python_config_computes_values_and_applies_alias(tmp_path):
    path = write(
        tmp_path,
        "import os\n"
        "pretrained_model_name_or_path = 'some/model'\n"
        "data_root = './mydata/'\n"
        "data_path = data_root + 'x.json'\n"
        "lr = 1e-4\n"
        "betas = (0.9, 0.95)\n"
        "_private = 3\n",
    )
    config, source = load_config(str(path))
    assert source == path
    assert config.llm_name_or_path == "some/model"
    assert config.data_path == "./mydata/x.json"
    assert config.lr == 1e-4 and config.betas == (0.9, 0.95)
    assert config.work_dir == "work_dirs/my_cfg"


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, "llm_name_or_path = 'm'\ndata_path = 'd.json'\nlora_rank = 8\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    message = str(error.value)
    assert f"{path}:3" in message and "'lora_rank'" in message and "Did you mean 'lora_r'" in message


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write(tmp_path, "llm_name_or_path = 'm'\ndata_path = 'd.json'\n\nbatch_size = '4'\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    message = str(error.value)
    assert f"{path}:4" in message and "'batch_size'" in message and "expects int" in message and "str '4'" in message


def test_bool_is_not_an_int_and_ranges_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="'max_epochs'"):
        load_config(str(write(tmp_path, "llm_name_or_path='m'\ndata_path='d'\nmax_epochs=True\n")))
    with pytest.raises(ConfigError, match="'lora_dropout'"):
        load_config(str(write(tmp_path, "llm_name_or_path='m'\ndata_path='d'\nlora_dropout=1.5\n", "b.py")))


def test_missing_required_key_and_missing_data(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'llm_name_or_path'"):
        load_config(str(write(tmp_path, "data_path = 'd.json'\n")))
    with pytest.raises(ConfigError, match="no training data: set data_path, or datasets"):
        load_config(str(write(tmp_path, "llm_name_or_path = 'm'\n", "b.py")))


def test_dataset_mix_is_validated_per_entry(tmp_path):
    path = write(tmp_path, "llm_name_or_path='m'\ndatasets=[{'path': 'a.json'}, {'path': 'b.jsonl', 'repeats': -1}]\n")
    with pytest.raises(ConfigError, match=r"key 'datasets\[1\].repeats' expects"):
        load_config(str(path))
    path.write_text("llm_name_or_path='m'\ndatasets=[{'path': 'a.json', 'format': 'alpaca', 'repeats': 2}]\n")
    config, _ = load_config(str(path))
    assert config.datasets[0].repeats == 2.0 and config.data_path is None


def test_xtuners_alpaca_en_path_is_the_data_path_and_the_alpaca_configs_name_it(tmp_path):
    """The tutorial's edit of a copied alpaca config: its `alpaca_en_path` line."""
    config, _ = load_config(str(write(tmp_path, "llm_name_or_path = 'm'\nalpaca_en_path = '/data/a.json'\n")))
    assert config.data_path == "/data/a.json"
    copied = copy_config("internlm2_chat_1_8b_qlora_alpaca_e3", tmp_path / "copy")
    text = copied.read_text().replace('alpaca_en_path = data_root + "alpaca_data.json"', "alpaca_en_path = '/data/b.json'")
    copied.write_text(text)
    assert load_config(str(copied))[0].data_path == "/data/b.json"


def test_alias_and_name_both_set_is_an_error(tmp_path):
    path = write(tmp_path, "llm_name_or_path='a'\npretrained_model_name_or_path='b'\ndata_path='d'\n")
    with pytest.raises(ConfigError, match="both set"):
        load_config(str(path))


def test_yaml_config_with_line_numbers(tmp_path):
    path = write(tmp_path, "llm_name_or_path: m\ndata_path: d.json\nbetas: [0.9, 0.95]\nlearning_rate: 0.1\n", "c.yaml")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert f"{path}:4" in str(error.value) and "Did you mean 'lr'?" not in str(error.value)
    path.write_text("llm_name_or_path: m\ndata_path: d.json\nbetas: [0.9, 0.95]\nlr: 1.0e-3\n")
    config, _ = load_config(str(path))
    assert config.betas == (0.9, 0.95) and config.lr == 1e-3


def test_overrides_parse_literals_and_are_validated(tmp_path):
    path = write(tmp_path, "llm_name_or_path='m'\ndata_path='d'\n")
    config, _ = load_config(str(path), ["lr=0.5", "SYSTEM=be brief", "evaluation_inputs=['a', 'b']"])
    assert config.lr == 0.5 and config.SYSTEM == "be brief" and config.evaluation_inputs == ["a", "b"]
    with pytest.raises(ConfigError, match="--cfg-options: unknown key 'lrr'"):
        load_config(str(path), ["lrr=1"])
    with pytest.raises(ConfigError, match="expects key=value"):
        parse_override("lr")


def test_config_that_raises_names_the_file(tmp_path):
    path = write(tmp_path, "data_path = undefined_name + 'x'\n")
    with pytest.raises(ConfigError, match=f"{path}: running the config failed: NameError"):
        load_config(str(path))


def test_list_and_copy_builtin_configs(tmp_path):
    names = list_configs()
    assert "internlm2_chat_1_8b_qlora_alpaca_e3" in names and "tiny_internlm2_chat_lora_antonyms" in names
    assert list_configs("QLORA") == [n for n in names if "qlora" in n]
    copied = copy_config("internlm2_chat_1_8b_qlora_alpaca_e3", tmp_path)
    assert copied == tmp_path / "internlm2_chat_1_8b_qlora_alpaca_e3_copy.py"
    config, _ = load_config(str(copied))
    assert config.quantization == "4bit" and config.llm_name_or_path == "internlm/internlm2-chat-1_8b"
    with pytest.raises(ConfigError, match="already exists"):
        copy_config("internlm2_chat_1_8b_qlora_alpaca_e3", tmp_path)


def test_unknown_builtin_name_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'tiny_llama_full_antonyms'"):
        load_config("tiny_llama_full_antonym")


@pytest.mark.parametrize("name", list_configs())
def test_every_builtin_config_loads(name):
    config, _ = load_config(name)
    assert isinstance(config, Config)


@pytest.mark.parametrize("key", ["true", "null", "on", "1", "2024-01-01", "[a, b]"])
def test_yaml_key_that_is_not_a_string_names_its_line(tmp_path, key):
    path = write(tmp_path, f"llm_name_or_path: m\ndata_path: d.json\n{key}: 1\n", "c.yaml")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert str(error.value).startswith(f"{path}:3: the key '{key}' is not a name;") and "quote" in str(error.value)


def test_yaml_is_read_once_and_keeps_anchors_and_merges(tmp_path, monkeypatch):
    path = write(
        tmp_path,
        "llm_name_or_path: m\ndatasets: [&a {path: a.json, repeats: 2}, {<<: *a, path: b.json}]\n",
        "c.yaml",
    )
    reads = []
    original = yaml.reader.Reader.__init__
    monkeypatch.setattr(yaml.reader.Reader, "__init__", lambda self, stream: reads.append(1) or original(self, stream))
    config, _ = load_config(str(path))
    assert len(reads) == 1
    assert [(d.path, d.repeats) for d in config.datasets] == [("a.json", 2.0), ("b.json", 2.0)]


def test_yaml_number_too_long_to_read_names_its_key(tmp_path):
    path = write(tmp_path, f"llm_name_or_path: m\nlr: 1{'0' * 5000}\n", "c.yaml")
    with pytest.raises(ConfigError, match=f"{path}:2: key 'lr': a value of 5001 characters cannot be read"):
        load_config(str(path))


@pytest.mark.parametrize(
    ("key", "ours"), [("learning_rate", "lr"), ("num_train_epochs", "max_epochs"), ("gradient_accumulation_steps", "accumulative_counts")]
)
def test_a_key_named_as_other_tools_name_it_suggests_ours(tmp_path, key, ours):
    path = write(tmp_path, f"llm_name_or_path = 'm'\ndata_path = 'd'\n{key} = 1\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert str(error.value) == (
        f"{path}:3: unknown key '{key}'. Did you mean '{ours}' (xtune's name for {key})? "
        "Every key, with its default and meaning: `xtune show-cfg --fields`."
    )


def test_a_yaml_key_set_twice_is_refused_at_its_second_line(tmp_path):
    path = write(tmp_path, "llm_name_or_path: m\ndata_path: d.json\nlr: 0.1\nlr: 0.2\n", name="c.yaml")
    with pytest.raises(ConfigError, match=rf"{path}:4: key 'lr' is set twice \(first at line 3\); keep one"):
        load_config(str(path))


def test_both_names_of_a_key_are_named(tmp_path):
    path = write(tmp_path, "llm_name_or_path = 'a'\npretrained_model_name_or_path = 'b'\ndata_path = 'd.json'\n")
    with pytest.raises(ConfigError, match="'llm_name_or_path' and 'pretrained_model_name_or_path' both set; keep one"):
        load_config(str(path))


@pytest.mark.parametrize("override, key", [("betas=(2.0, -1.0)", "betas"), ("seed=2**70", "seed"), (f"seed={2**70}", "seed")])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"--cfg-options: key '{key}'"):
        load_config("tiny_internlm2_chat_lora_antonyms", [override])


@pytest.mark.parametrize("device, message", [("banana", "is not a device"), ("cuda", "this machine has no CUDA device")])
def test_a_device_that_is_not_there_is_a_config_error(device, message):
    import torch

    from xtune.engine.device import resolve_device

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=message):
        resolve_device(device)


def test_a_yaml_billion_laughs_and_deep_nesting_are_refused_before_they_are_built(tmp_path):
    laughs = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)
    )
    path = write(tmp_path, laughs, name="laughs.yaml")
    with pytest.raises(ConfigError, match=r"laughs.yaml:\d+: the config holds more than 100,000 values"):
        load_config(str(path))
    deep = write(tmp_path, "llm_name_or_path: m\nx: " + "[" * 100 + "]" * 100 + "\n", name="deep.yaml")
    with pytest.raises(ConfigError, match=r"deep.yaml:2: the config holds .*nested over 64 deep"):
        load_config(str(deep))
    deeper = write(tmp_path, "llm_name_or_path: m\nx: " + "[" * 3000 + "]" * 3000 + "\n", name="deeper.yaml")
    with pytest.raises(ConfigError, match=r"deeper.yaml: the config is nested thousands of levels deep"):
        load_config(str(deeper))
