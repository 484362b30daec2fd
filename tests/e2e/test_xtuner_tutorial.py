"""XTuner's own tutorial (the InternLM camp's "fine-tune a personal assistant" and its LLaVA part), replayed word for
word with `xtuner` read as `xtune`, on the tiny models: the only edits are the model, the data and the run's length.

    xtuner list-cfg -p internlm2_1_8b
    xtuner copy-cfg internlm2_1_8b_qlora_alpaca_e3 ./config
    (edit: pretrained_model_name_or_path, alpaca_en_path, max_length, max_epochs, save_steps, evaluation_freq,
     evaluation_inputs, dataset_map_fn=None)
    xtuner train ./config/internlm2_1_8b_qlora_alpaca_e3_copy.py --work-dir ./train
    xtuner convert pth_to_hf ./train/internlm2_1_8b_qlora_alpaca_e3_copy.py ./train/iter_N.pth ./huggingface
    xtuner convert merge BASE ./huggingface ./final_model --max-shard-size 2GB
    xtuner chat ./final_model --prompt-template internlm2_chat
    xtuner chat BASE --adapter ./huggingface --prompt-template internlm2_chat
LLaVA: a stage-2 config whose `pretrained_pth` is the stage-1 work_dir's `iter_N.pth`, its pth_to_hf, merge --is-clip,
and `xtuner chat BASE --visual-encoder CLIP --llava ./hf --prompt-template internlm2_chat --image IMAGE`.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from xtune.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()
CONFIG = "internlm2_1_8b_qlora_alpaca_e3"
ANSWER = "我是小明的小助手，内在是上海AI实验室书生·浦语的1.8B大模型哦"


def xtune(*args: str) -> str:
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.output


def edit(path, replacements: dict[str, str]) -> None:
    text = path.read_text()
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)


def test_the_personal_assistant_tutorial(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    records = [{"conversation": [{"input": "请介绍一下你自己", "output": ANSWER}]}] * 40
    (tmp_path / "data" / "personal_assistant.json").write_text(json.dumps(records, ensure_ascii=False))

    assert CONFIG in xtune("list-cfg", "-p", "internlm2_1_8b").split()
    xtune("copy-cfg", CONFIG, "./config")
    config = tmp_path / "config" / f"{CONFIG}_copy.py"
    edit(config, {
        '"internlm/internlm2-1_8b"': '"xtune-tiny/internlm2-chat"',
        'data_root + "alpaca_data.json"': '"./data/personal_assistant.json"',
        'dataset_format = "alpaca"': "dataset_map_fn = None",  # the tutorial's records are XTuner's conversations
        "max_length = 2048": "max_length = 64",
        "batch_size = 1 ": "batch_size = 4 ",
        "accumulative_counts = 16": "accumulative_counts = 2",
        "save_steps = 500": "save_steps = 2",
        "evaluation_freq = 500": "evaluation_freq = 4",
        "max_epochs = 3": "max_epochs = 1",
        'evaluation_inputs = ["Please tell me five scenic spots in Shanghai", "请给我介绍五个上海的景点"]':
            'evaluation_inputs = ["请你介绍一下你自己", "你是谁"]',
    })  # fmt: skip
    assert 'quantization = "4bit"' in config.read_text()  # QLoRA as the tutorial trains it

    output = xtune("train", config, "--work-dir", "./train")
    work_dir = tmp_path / "train"
    (run,) = [path for path in work_dir.iterdir() if path.is_dir() and not path.is_symlink()]
    steps = sorted(int(path.name.split("-")[1]) for path in run.glob("checkpoint-*"))
    last = steps[-1]
    # 40 samples packed into 20 rows, 4 to a batch, 2 batches to a step: 5 steps, saved at 2, 4 and 5, and the
    # oldest pruned (save_total_limit = 2)
    assert steps == [4, 5] and f"checkpoint: train/{run.name}/checkpoint-5" in output
    # XTuner's names beside the run: the config it was trained with, and each kept checkpoint by its iteration count
    # (XTuner counts micro-batches: 2 to an optimizer step); the pruned checkpoints' names are gone with them
    assert (work_dir / f"{CONFIG}_copy.py").read_text() == config.read_text()
    assert sorted(work_dir.glob("iter_*.pth")) == sorted(work_dir / f"iter_{2 * step}.pth" for step in steps)
    assert (work_dir / f"iter_{2 * last}.pth").resolve() == (run / f"checkpoint-{last}").resolve()

    xtune("convert", "pth_to_hf", f"./train/{CONFIG}_copy.py", f"./train/iter_{2 * last}.pth", "./huggingface")
    adapter = json.loads((tmp_path / "huggingface" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "xtune-tiny/internlm2-chat"  # what the user named, QLoRA too
    assert "wqkv" in adapter["target_modules"]  # InternLM2's own names, as XTuner's pth_to_hf writes them
    xtune("convert", "merge", "xtune-tiny/internlm2-chat", "./huggingface", "./final_model", "--max-shard-size", "2GB")
    assert (tmp_path / "final_model" / "model.safetensors").is_file()

    (tmp_path / "prompts.txt").write_text("请介绍一下你自己\n")
    xtune("chat", "./final_model", "--prompt-template", "internlm2_chat", "--input", "prompts.txt",
          "--max-new-tokens", "8", "--output", "merged.jsonl")  # fmt: skip
    xtune("chat", "xtune-tiny/internlm2-chat", "--adapter", "./huggingface", "--prompt-template", "internlm2_chat",
          "--input", "prompts.txt", "--max-new-tokens", "8", "--output", "adapted.jsonl")  # fmt: skip
    merged, adapted = ((tmp_path / name).read_text().splitlines() for name in ("merged.jsonl", "adapted.jsonl"))
    assert len(merged) == 1 and merged == adapted  # greedy: the merged model answers as base + adapter


def test_the_llava_tutorial_starts_stage_2_from_the_stage_1_iter_pth(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    xtune("train", "tiny_llava_pretrain_shapes", "--work-dir", "./pretrain", "--cfg-options", "max_steps=2")
    assert (tmp_path / "pretrain" / "iter_2.pth").is_dir()

    xtune("copy-cfg", "tiny_llava_finetune_shapes", ".")
    config = tmp_path / "tiny_llava_finetune_shapes_copy.py"
    edit(config, {"pretrained_pth = None": "pretrained_pth = './pretrain/iter_2.pth'"})
    # a learning rate that moves nothing: the stage-2 projector must then be the stage-1 one it started from
    xtune("train", config, "--work-dir", "./finetune", "--cfg-options", "max_steps=2", "lr=1e-12",
          "visual_encoder_lora=True", "visual_encoder_lora_r=4", "visual_encoder_lora_alpha=8")  # fmt: skip
    stage_1 = load_file(tmp_path / "pretrain" / "iter_2.pth" / "projector" / "model.safetensors")
    stage_2 = load_file(tmp_path / "finetune" / "iter_2.pth" / "projector" / "model.safetensors")
    assert stage_1.keys() == stage_2.keys()
    assert all(torch.allclose(stage_1[name].float(), stage_2[name].float(), atol=1e-6) for name in stage_1)

    xtune("convert", "pth_to_hf", "./finetune/tiny_llava_finetune_shapes_copy.py", "./finetune/iter_2.pth", "./hf")
    assert (tmp_path / "hf" / "visual_encoder_adapter" / "adapter_config.json").is_file()
    xtune("convert", "merge", "xtune-tiny/clip-vision", "./hf/visual_encoder_adapter", "./clip_merged", "--is-clip")
    merged = load_file(tmp_path / "clip_merged" / "model.safetensors")
    assert not any("lora" in name for name in merged) and any(torch.is_floating_point(t) for t in merged.values())

    (tmp_path / "prompts.txt").write_text("请描述一下这张照片\n")
    xtune("chat", "xtune-tiny/internlm2-chat", "--visual-encoder", "xtune-tiny/clip-vision", "--llava", "./hf",
          "--prompt-template", "internlm2_chat", "--image", "xtune-data/view.png", "--input", "prompts.txt",
          "--max-new-tokens", "4", "--output", "answers.jsonl")  # fmt: skip
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 1
