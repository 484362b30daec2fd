"""Built-in configs as data: every listed name loads, copies to an editable file, and is found as users type it."""

import re

import pytest
from typer.testing import CliRunner

from xtune.cli import app
from xtune.config.load import config_family, copy_config, list_configs, load_config
from xtune.config.presets import MODELS, PRESETS, RECIPES, matches
from xtune.data.templates import get_template

runner = CliRunner()


def test_every_listed_config_loads():
    names = list_configs()
    assert len(names) >= len(MODELS) * len(RECIPES)
    for name in names:
        config, _ = load_config(name)
        get_template(config.prompt_template)  # a template xtune has
        assert config.work_dir == f"work_dirs/{name}"


@pytest.mark.parametrize("name", ["llama2_7b_qlora_alpaca_e3", "qwen1_5_7b_chat_qlora_alpaca_e3",
                                  "internlm2_chat_7b_qlora_alpaca_e3", "mistral_7b_full_custom_pretrain_e1"])  # fmt: skip
def test_xtuners_names_are_there(name):
    assert name in list_configs()


def test_a_preset_says_what_its_model_and_recipe_say():
    config, _ = load_config("qwen2_5_7b_instruct_qlora_alpaca_e3")
    assert (config.llm_name_or_path, config.method, config.quantization) == ("Qwen/Qwen2.5-7B-Instruct", "lora", "4bit")
    assert (config.prompt_template, config.dataset_format, config.max_epochs) == ("qwen_chat", "alpaca", 3)
    full, _ = load_config("qwen2_5_7b_instruct_full_alpaca_e3")
    assert (full.method, full.quantization, full.lr) == ("full", None, pytest.approx(config.lr / 10))
    text, _ = load_config("llama3_1_8b_instruct_full_custom_pretrain_e1")
    assert text.dataset_format == "text" and text.evaluation_inputs == []


def test_copy_cfg_writes_a_complete_file_that_loads_the_same(tmp_path):
    copied = copy_config("gemma2_9b_it_qlora_custom_sft_e1", tmp_path)
    assert copied.name == "gemma2_9b_it_qlora_custom_sft_e1_copy.py"
    assert 'pretrained_model_name_or_path = "google/gemma-2-9b-it"' in copied.read_text()
    ours, _ = load_config(str(copied))
    builtin, _ = load_config("gemma2_9b_it_qlora_custom_sft_e1")
    assert ours.model_dump(exclude={"work_dir"}) == builtin.model_dump(exclude={"work_dir"})


@pytest.mark.parametrize("typed, expected, not_expected", [
    ("internlm2_1_8b", "internlm2_chat_1_8b_qlora_alpaca_e3", "internlm2_chat_7b_qlora_alpaca_e3"),
    ("qwen2.5", "qwen2_5_7b_instruct_lora_alpaca_e3", "qwen2_7b_instruct_lora_alpaca_e3"),
    ("llama3", "llama3_1_8b_instruct_qlora_alpaca_e3", "llama2_7b_qlora_alpaca_e3"),
    ("Llama-3.2", "llama3_2_3b_instruct_qlora_alpaca_e3", "llama3_8b_instruct_qlora_alpaca_e3"),
    ("qlora_alpaca", "phi4_qlora_alpaca_e3", "phi4_lora_alpaca_e3"),
])  # fmt: skip
def test_list_cfg_matches_as_users_type(typed, expected, not_expected):
    found = list_configs(typed)
    assert expected in found and not_expected not in found
    assert matches(expected, typed) and not matches(not_expected, typed)


def test_list_cfg_family_groups_the_configs():
    result = runner.invoke(app, ["list-cfg", "--family", "-p", "gemma"])
    assert result.exit_code == 0
    groups = re.findall(r"^(\S.*):$", result.output, flags=re.M)
    assert groups == ["Gemma", "Gemma 2", "Gemma 3"]
    assert "  gemma2_9b_it_lora_alpaca_e3" in result.output.splitlines()
    assert config_family("internlm2_chat_1_8b_lora_self_cognition_e3") == "InternLM2"  # a file, not a preset
    assert all(config_family(name) for name in list_configs())


def test_show_cfg_of_a_preset_prints_it():
    result = runner.invoke(app, ["show-cfg", "deepseek_v2_lite_chat_qlora_alpaca_e3"])
    assert result.exit_code == 0 and '"llm_name_or_path": "deepseek-ai/DeepSeek-V2-Lite-Chat"' in result.output


def test_model_keys_and_preset_names_are_unique():
    assert len({m.key for m in MODELS}) == len(MODELS) and len(PRESETS) == len(MODELS) * len(RECIPES)


def test_remote_code_presets_trust_it_and_do_not_pack():
    """Packing needs transformers' attention interface, which a model's own modelling code does not go through."""
    remote = [m.key for m in MODELS if m.remote_code]
    assert {"baichuan2_7b_chat", "chatglm3_6b", "minicpm_2b_sft"} <= set(remote)
    for key in remote:
        config, _ = load_config(f"{key}_qlora_alpaca_e3")
        assert config.trust_remote_code and not config.pack_to_max_length, key
    assert load_config("qwen2_5_7b_instruct_qlora_alpaca_e3")[0].pack_to_max_length


def test_xtuners_preference_configs_are_there_with_its_key_names():
    config, _ = load_config("internlm2_chat_7b_dpo_qlora_varlenattn", ["dpo_loss_type='ipo'", "loss_beta=0.2"])
    assert (config.stage, config.loss_type, config.beta, config.pack_to_max_length) == ("dpo", "ipo", 0.2, True)
    assert load_config("llama3_8b_instruct_orpo_qlora_varlenattn")[0].stage == "orpo"


def test_xtuners_reward_configs_are_there():
    config, _ = load_config("internlm2_chat_1_8b_reward_full_varlenattn_ultrafeedback")
    assert (config.stage, config.method, config.lr, config.max_epochs) == ("reward", "full", 2e-5, 1)
    assert config.pack_to_max_length and config.evaluation_inputs == []  # a reward model does not generate
    assert load_config("llama3_8b_instruct_reward_full_varlenattn_ultrafeedback")[0].stage == "reward"
