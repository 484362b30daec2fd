import re
import subprocess
import sys

from typer.testing import CliRunner

from xtune.cli import app

runner = CliRunner()


def xtune(*args):
    return subprocess.run([sys.executable, "-m", "xtune.cli", *args], capture_output=True, text=True, timeout=120)


def test_list_cfg_with_pattern():
    result = runner.invoke(app, ["list-cfg", "-p", "internlm2_chat_1_8b_qlora"])
    assert result.exit_code == 0
    assert result.output.split() == [
        "internlm2_chat_1_8b_dpo_qlora_varlenattn",
        "internlm2_chat_1_8b_orpo_qlora_varlenattn",
        "internlm2_chat_1_8b_qlora_alpaca_e3",
        "internlm2_chat_1_8b_qlora_custom_sft_e1",
        "internlm2_chat_1_8b_qlora_oasst1_e3",
        "internlm2_chat_1_8b_qlora_self_cognition_e3",
        "llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune",
    ]


def test_copy_cfg_then_show_it(tmp_path):
    deep = tmp_path / ("a_folder_with_a_long_name_" * 4)  # piped output: the path printed on one line for scripts
    result = runner.invoke(app, ["copy-cfg", "tiny_llama_full_antonyms", str(deep)])
    assert result.exit_code == 0, result.output
    copied = deep / "tiny_llama_full_antonyms_copy.py"
    assert copied.is_file() and str(copied) in result.output
    shown = runner.invoke(app, ["show-cfg", str(copied)])
    assert '"method": "full"' in shown.output and '"llm_name_or_path": "xtune-tiny/llama"' in shown.output


def test_show_cfg_fields_documents_every_key():
    result = runner.invoke(app, ["show-cfg", "--fields"], env={"COLUMNS": "300"})
    assert "accumulative_counts" in result.output and "Micro-batches accumulated" in result.output


def test_errors_are_one_clear_message_without_a_traceback(tmp_path):
    config = tmp_path / "bad.py"
    config.write_text("llm_name_or_path = 'xtune-tiny/llama'\ndata_path = 'd.json'\nmax_epoch = 3\n")
    result = xtune("train", str(config))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{config}:3: unknown key 'max_epoch'. Did you mean 'max_epochs'?" in result.stderr.replace("\n", "")


def test_missing_data_path_names_the_key_and_the_path(tmp_path):
    config = tmp_path / "nodata.py"
    config.write_text("llm_name_or_path = 'xtune-tiny/llama'\ndata_path = './nowhere/x.json'\n")
    result = xtune("train", str(config), "--work-dir", str(tmp_path / "runs"))
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "data_path = './nowhere/x.json' does not exist" in message and "Traceback" not in result.stderr


def test_cfg_options_must_be_key_value(tmp_path):
    result = xtune("train", "tiny_llama_full_antonyms", "--cfg-options", "lr")
    assert result.returncode == 1 and "--cfg-options takes key=value pairs" in result.stderr


def data_config(tmp_path, *lines: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "d.jsonl").write_text("".join(line + "\n" for line in lines))
    config = tmp_path / "c.py"
    config.write_text(f"llm_name_or_path = 'xtune-tiny/internlm2-chat'\ndata_path = {str(tmp_path / 'd.jsonl')!r}\n")
    return str(config)


HOT = '{"conversation": [{"input": "What is the opposite of hot?", "output": "cold"}]}'


def test_check_dataset_exit_code_says_whether_a_record_is_malformed(tmp_path):
    clean = runner.invoke(app, ["check-dataset", data_config(tmp_path / "clean", HOT)])
    assert clean.exit_code == 0, clean.output
    assert re.search(r"malformed records +none", clean.output)
    broken = runner.invoke(app, ["check-dataset", data_config(tmp_path / "broken", HOT, "{oops", HOT)])
    assert broken.exit_code == 1
    assert f"{tmp_path}/broken/d.jsonl:2: not valid JSON" in broken.output.replace("\n", "")


def test_log_dataset_marks_trained_tokens_when_not_a_terminal(tmp_path):
    config = data_config(tmp_path, HOT, '{"conversation": [{"input": "up", "output": "down"}]}')
    result = runner.invoke(app, ["log-dataset", config, "-n", "1", "--cfg-options", "max_length=64"])
    assert result.exit_code == 0, result.output
    assert "assistant\n[[cold<|im_end|>]]\ninput_ids: [1, " in result.output and "down" not in result.output


def test_preprocess_twice_hits_the_cache(tmp_path):
    config = data_config(tmp_path, '{"conversation": [{"input": "cache me", "output": "once"}]}')
    first = runner.invoke(app, ["preprocess", config, "--num-proc", "2"])
    assert first.exit_code == 0, first.output
    assert first.output.startswith("cache written: ") and "1 samples" in first.output
    second = runner.invoke(app, ["preprocess", config])
    assert second.output.startswith("cache hit: ")
