"""XTuner 0.1.x configs read as they are: written here in XTuner's layout (mmengine dicts), never run."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from xtune.cli import app
from xtune.config.load import copy_config, load_config
from xtune.config.xtuner import Ref, is_xtuner_config, read_file, read_xtuner_config
from xtune.data.templates import SYSTEM_TEMPLATES
from xtune.errors import ConfigError

IMPORTS = """\
import torch
from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import CheckpointHook, IterTimerHook, LoggerHook
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, CLIPVisionModel
from xtuner.dataset import LLaVADataset, process_hf_dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.map_fns import alpaca_map_fn, llava_map_fn, template_map_fn_factory
from xtuner.dataset.preference_dataset import build_preference_dataset, orpo_dpo_mix_40k_map_fn
from xtuner.engine.hooks import DatasetInfoHook, EvaluateChatHook, VarlenAttnArgsToMessageHubHook
from xtuner.engine.runner import TrainLoop
from xtuner.model import LLaVAModel, SupervisedFinetune
from xtuner.model.dpo import DPO
from xtuner.model.orpo import ORPO
from xtuner.model.reward import RewardModel
from xtuner.parallel.sequence import SequenceParallelSampler
from xtuner.utils import PROMPT_TEMPLATE, SYSTEM_TEMPLATE
"""

SETTINGS = """
pretrained_model_name_or_path = 'org/some-chat-model'
use_varlen_attn = False
data_file = './data/my_alpaca.json'
prompt_template = PROMPT_TEMPLATE.qwen_chat
max_length = 1024
pack_to_max_length = True
sequence_parallel_size = 1
batch_size = 2
accumulative_counts = 8
accumulative_counts *= sequence_parallel_size
dataloader_num_workers = 1
max_epochs = 2
optim_type = AdamW
lr = 1e-4
betas = (0.9, 0.95)
weight_decay = 0.01
max_norm = 0.5
warmup_ratio = 0.1
save_steps = 100
save_total_limit = 3
evaluation_freq = 50
SYSTEM = SYSTEM_TEMPLATE.coder
evaluation_inputs = ['Write hello world in C']
tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=pretrained_model_name_or_path,
                 trust_remote_code=True, padding_side='right')
"""

QLORA_MODEL = """
model = dict(
    type=SupervisedFinetune,
    use_varlen_attn=use_varlen_attn,
    llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=pretrained_model_name_or_path,
             trust_remote_code=True, torch_dtype=torch.float16,
             quantization_config=dict(type=BitsAndBytesConfig, load_in_4bit=True, load_in_8bit=False,
                                      bnb_4bit_compute_dtype=torch.float16, bnb_4bit_use_double_quant=True,
                                      bnb_4bit_quant_type='nf4')),
    lora=dict(type=LoraConfig, r=32, lora_alpha=64, lora_dropout=0.05, bias='none', task_type='CAUSAL_LM'))
"""

SFT_DATA = """
train_dataset = dict(
    type=process_hf_dataset,
    dataset=dict(type=load_dataset, path='json', data_files=dict(train=data_file)),
    tokenizer=tokenizer, max_length=max_length, dataset_map_fn=alpaca_map_fn,
    template_map_fn=dict(type=template_map_fn_factory, template=prompt_template),
    remove_unused_columns=True, shuffle_before_pack=True, pack_to_max_length=pack_to_max_length,
    use_varlen_attn=use_varlen_attn)
"""

RUNTIME = """
sampler = SequenceParallelSampler if sequence_parallel_size > 1 else DefaultSampler
train_dataloader = dict(batch_size=batch_size, num_workers=dataloader_num_workers, dataset=train_dataset,
                        sampler=dict(type=sampler, shuffle=True),
                        collate_fn=dict(type=default_collate_fn, use_varlen_attn=use_varlen_attn))
optim_wrapper = dict(type=AmpOptimWrapper,
                     optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
                     clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
                     accumulative_counts=accumulative_counts, loss_scale='dynamic', dtype='bfloat16')
param_scheduler = [
    dict(type=LinearLR, start_factor=1e-5, by_epoch=True, begin=0, end=warmup_ratio * max_epochs,
         convert_to_iter_based=True),
    dict(type=CosineAnnealingLR, eta_min=lr * 0.1, by_epoch=True, begin=warmup_ratio * max_epochs, end=max_epochs,
         convert_to_iter_based=True)]
train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)
custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    dict(type=EvaluateChatHook, tokenizer=tokenizer, every_n_iters=evaluation_freq,
         evaluation_inputs=evaluation_inputs, system=SYSTEM, prompt_template=prompt_template)]
if use_varlen_attn:
    custom_hooks += [dict(type=VarlenAttnArgsToMessageHubHook)]
default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=5),
    checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=save_steps, max_keep_ckpts=save_total_limit))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='nccl'))
visualizer = None
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=7, deterministic=False)
"""

QLORA = IMPORTS + SETTINGS + QLORA_MODEL + SFT_DATA + RUNTIME


def write(tmp_path: Path, text: str, name: str = "xtuner_cfg.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_qlora_alpaca_maps_every_value(tmp_path):
    path = write(tmp_path, QLORA)
    assert is_xtuner_config(path)
    config, _ = load_config(str(path))
    assert config.llm_name_or_path == "org/some-chat-model" and not config.trust_remote_code
    assert (config.method, config.quantization, config.lora_r, config.lora_alpha, config.lora_dropout) == (
        "lora", "4bit", 32, 64, 0.05)
    assert config.lora_target_modules == "all-linear"
    assert (config.data_path, config.dataset_format, config.prompt_template) == (
        "./data/my_alpaca.json", "alpaca", "qwen_chat")
    assert (config.max_length, config.pack_to_max_length, config.shuffle_before_pack) == (1024, True, True)
    assert (config.batch_size, config.accumulative_counts, config.dataloader_num_workers) == (2, 8, 1)
    assert (config.max_epochs, config.lr, config.betas, config.weight_decay, config.max_norm) == (
        2, 1e-4, (0.9, 0.95), 0.01, 0.5)
    assert config.warmup_ratio == pytest.approx(0.1) and config.lr_min_ratio == pytest.approx(0.1)
    assert (config.dtype, config.optim_type, config.seed) == ("bf16", "adamw", 7)
    # XTuner's intervals count micro-batches, xtune's optimizer steps of accumulative_counts = 8 micro-batches
    assert (config.save_steps, config.save_total_limit, config.logging_steps) == (13, 3, 1)
    assert (config.evaluation_freq, config.evaluation_inputs) == (7, ["Write hello world in C"])
    assert config.SYSTEM == SYSTEM_TEMPLATES["coder"]
    assert config.stage == "sft" and config.work_dir == "work_dirs/xtuner_cfg"


def test_show_cfg_from_xtuner_prints_the_mapping_and_a_config_that_trains(tmp_path):
    path = write(tmp_path, QLORA)
    result = CliRunner().invoke(app, ["show-cfg", "--from-xtuner", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "quantization = '4bit'  # model.llm.quantization_config.load_in_4bit" in lines
    assert "prompt_template = 'qwen_chat'  # train_dataloader.dataset.template_map_fn.template" in lines
    assert "warmup_ratio = 0.1  # param_scheduler[0].end" in lines
    assert any(line.startswith("#   custom_hooks[0] (DatasetInfoHook):") for line in lines)
    assert any("model.llm.trust_remote_code = True is not carried over" in line for line in lines)
    converted = write(tmp_path, result.output, "converted.py")
    assert not is_xtuner_config(converted)
    assert load_config(str(converted))[0].model_dump() == load_config(str(path))[0].model_dump() | {
        "work_dir": "work_dirs/converted"}
    copied = copy_config(str(path), tmp_path / "copies")
    assert copied.read_text() == result.output


def test_nothing_is_imported_or_run(tmp_path):
    marker = tmp_path / "ran"
    text = QLORA.replace("import torch\n", "import torch\nimport module_that_does_not_exist_xyz\n")
    text += f"\nif False:\n    open({str(marker)!r}, 'w')\n"
    path = write(tmp_path, text)
    assert load_config(str(path))[0].quantization == "4bit"
    with pytest.raises(ConfigError, match="calls.py:[0-9]+: a Expr statement is code xtune does not run"):  # never made
        load_config(str(write(tmp_path, text + f"open({str(marker)!r}, 'w')\n", "calls.py")))
    assert not marker.exists()
    with pytest.raises(ConfigError, match="repeated"):  # nor a value too big to hold
        load_config(str(write(tmp_path, text + "a = 'x' * 10000\nb = a * 10000\n", "big.py")))
    with pytest.raises(ConfigError, match="a power of"):
        load_config(str(write(tmp_path, text + "a = 10 ** 64\nb = a ** 64\n", "power.py")))
    env, lines = read_file(path)
    assert env["optim_type"] == Ref("torch.optim.AdamW") and env["prompt_template"].name == "qwen_chat"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("import os\nx = os.system('echo hi')\n", "a call of os.system(...): code xtune does not run"),
        ("inputs = [s for s in evaluation_inputs]\n", "a list comprehension"),
        ("name = f'{max_length}'\n", "an f-string of values"),
        ("def f():\n    pass\n", "a FunctionDef statement is code xtune does not run"),
    ],
)
def test_an_unreadable_construct_names_its_line(tmp_path, line, message):
    text = QLORA + line
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    lineno = len(QLORA.splitlines()) + (2 if line.startswith("import") else 1)
    assert f"{path}:{lineno}: {message}" in str(error.value)


def test_full_and_lora_with_target_modules(tmp_path):
    full_model = ("\nmodel = dict(type=SupervisedFinetune, use_varlen_attn=use_varlen_attn,\n"
                  "    llm=dict(type=AutoModelForCausalLM.from_pretrained,\n"
                  "             pretrained_model_name_or_path=pretrained_model_name_or_path, torch_dtype=torch.bfloat16))\n")
    config, _ = load_config(str(write(tmp_path, IMPORTS + SETTINGS + full_model + SFT_DATA + RUNTIME, "full.py")))
    assert (config.method, config.quantization) == ("full", None)
    lora_model = full_model.replace(
        "torch_dtype=torch.bfloat16))",
        "torch_dtype=torch.bfloat16),\n    lora=dict(type=LoraConfig, r=8, lora_alpha=16, lora_dropout=0.0, "
        "target_modules=['q_proj', 'v_proj'], use_dora=True, bias='none'))")
    config, _ = load_config(str(write(tmp_path, IMPORTS + SETTINGS + lora_model + SFT_DATA + RUNTIME, "lora.py")))
    assert (config.method, config.lora_r, config.lora_target_modules, config.use_dora) == (
        "lora", 8, ["q_proj", "v_proj"], True)


PREFERENCE_DATA = """
train_dataset = dict(
    type=build_preference_dataset, dataset=dict(type=load_dataset, path='json', data_files=data_file),
    tokenizer=tokenizer, max_length=max_length, dataset_map_fn=orpo_dpo_mix_40k_map_fn, is_dpo=True,
    is_reward=False, reward_token_id=-1, num_proc=4, use_varlen_attn=True, max_packed_length=max_length * 2,
    shuffle_before_pack=True, seed=42)
"""


def test_dpo_orpo_and_reward(tmp_path):
    dpo_model = QLORA_MODEL.replace("type=SupervisedFinetune,", "type=DPO, loss_type='hinge', beta=0.2, label_smoothing=0.1,")
    config, _ = load_config(str(write(tmp_path, IMPORTS + SETTINGS + dpo_model + PREFERENCE_DATA + RUNTIME, "dpo.py")))
    assert (config.stage, config.loss_type, config.beta, config.label_smoothing) == ("dpo", "hinge", 0.2, 0.1)
    assert (config.pack_to_max_length, config.num_proc, config.dataset_format, config.quantization) == (
        True, 4, "auto", "4bit")
    orpo_model = QLORA_MODEL.replace("type=SupervisedFinetune,", "type=ORPO, beta=0.25,")
    config, _ = load_config(str(write(tmp_path, IMPORTS + SETTINGS + orpo_model + PREFERENCE_DATA + RUNTIME, "orpo.py")))
    assert (config.stage, config.orpo_alpha) == ("orpo", 0.25)
    reward_model = ("\nmodel = dict(type=RewardModel, use_varlen_attn=True, loss_type='focal', penalty_type='log_barrier',\n"
                    "    llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path='m'))\n")
    path = write(tmp_path, IMPORTS + SETTINGS + reward_model + PREFERENCE_DATA + RUNTIME, "reward.py")
    config, _ = load_config(str(path))  # XTuner's reward configs: InternLM2's focal loss and log barrier
    assert (config.stage, config.method, config.llm_name_or_path) == ("reward", "full", "m")
    assert (config.reward_loss, config.reward_penalty, config.reward_penalty_weight) == ("focal", "log_barrier", 0.01)
    path.write_text(path.read_text().replace(", loss_type='focal', penalty_type='log_barrier'", ""))
    config, _ = load_config(str(path))  # RewardModel's defaults
    assert (config.reward_loss, config.reward_penalty, config.reward_penalty_weight) == ("ranking", "log_barrier", 0.01)
    path.write_text(path.read_text().replace("use_varlen_attn=True,", "use_varlen_attn=True, penalty_type='L1',"))
    with pytest.raises(ConfigError, match=r"XTuner key 'model.penalty_type': = 'L1': xtune's reward stage has none, "):
        load_config(str(path))


LLAVA = IMPORTS + """
llm_name_or_path = 'org/llm'
visual_encoder_name_or_path = 'org/clip'
pretrained_pth = './work_dirs/pretrain/checkpoint-10'
data_root = './data/llava_data/'
data_path = data_root + 'mix.json'
image_folder = data_root + 'images'
prompt_template = PROMPT_TEMPLATE.internlm2_chat
max_length = int(2048 - (336 / 14)**2)
tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=llm_name_or_path)
model = dict(
    type=LLaVAModel, freeze_llm=True, freeze_visual_encoder=True, pretrained_pth=pretrained_pth,
    llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=llm_name_or_path,
             quantization_config=dict(type=BitsAndBytesConfig, load_in_4bit=True, bnb_4bit_quant_type='nf4')),
    llm_lora=dict(type=LoraConfig, r=512, lora_alpha=256, lora_dropout=0.05, bias='none', task_type='CAUSAL_LM'),
    visual_encoder=dict(type=CLIPVisionModel.from_pretrained, pretrained_model_name_or_path=visual_encoder_name_or_path),
    visual_encoder_lora=dict(type=LoraConfig, r=64, lora_alpha=16, lora_dropout=0.05, bias='none'))
llava_dataset = dict(type=LLaVADataset, data_path=data_path, image_folder=image_folder, tokenizer=tokenizer,
                     dataset_map_fn=llava_map_fn,
                     template_map_fn=dict(type=template_map_fn_factory, template=prompt_template),
                     max_length=max_length, pad_image_to_square=True)
train_dataloader = dict(batch_size=16, num_workers=4, pin_memory=True, dataset=llava_dataset)
custom_hooks = [dict(type=EvaluateChatHook, every_n_iters=500, evaluation_inputs=['Describe it'],
                     evaluation_images='https://example.com/view.jpg', system='', prompt_template=prompt_template)]
"""


def test_llava(tmp_path):
    config, _ = load_config(str(write(tmp_path, LLAVA, "llava.py")))
    assert (config.llm_name_or_path, config.visual_encoder_name_or_path) == ("org/llm", "org/clip")
    assert (config.method, config.quantization, config.lora_r, config.lora_alpha, config.freeze_llm) == (
        "lora", "4bit", 512, 256, False)
    assert (config.visual_encoder_lora, config.visual_encoder_lora_r, config.visual_encoder_lora_alpha) == (True, 64, 16)
    assert (config.freeze_visual_encoder, config.pretrained_pth) == (True, "./work_dirs/pretrain/checkpoint-10")
    assert (config.data_path, config.image_folder, config.dataset_format) == (
        "./data/llava_data/mix.json", "./data/llava_data/images", "llava")
    assert (config.max_length, config.pad_image_to_square, config.batch_size) == (1472, True, 16)
    assert config.evaluation_images == []  # a URL: noted, not read
    pretrain = LLAVA.replace("    llm_lora=dict(type=LoraConfig, r=512, lora_alpha=256, lora_dropout=0.05, bias='none', "
                             "task_type='CAUSAL_LM'),\n", "").replace(
        "quantization_config=dict(type=BitsAndBytesConfig, load_in_4bit=True, bnb_4bit_quant_type='nf4')", "")
    config, _ = load_config(str(write(tmp_path, pretrain, "pretrain.py")))
    assert (config.freeze_llm, config.quantization) == (True, None)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("type=SupervisedFinetune,", "type=MyModel,", "XTuner key 'model.type': my_pkg.models.MyModel is a model class xtune does "
         "not have"),
        ("dataset_map_fn=alpaca_map_fn", "dataset_map_fn=my_map_fn", "XTuner key 'train_dataloader.dataset."
         "dataset_map_fn': = xtuner.dataset.map_fns.my_map_fn: xtune has no map function of that name"),
        ("PROMPT_TEMPLATE.qwen_chat", "PROMPT_TEMPLATE.no_such", "PROMPT_TEMPLATE.no_such: xtune has no template"),
        ("SYSTEM_TEMPLATE.coder", "SYSTEM_TEMPLATE.no_such", "SYSTEM_TEMPLATE.no_such: xtune has no system prompt"),
        ("resume = False", "resume = True", "XTuner key 'resume': = True: pass --resume auto"),
        ("bias='none'", "bias='all'", "XTuner key 'model.lora.bias': = 'all': xtune trains no biases with LoRA"),
        ("by_epoch=False, interval", "by_epoch=True, interval", "XTuner key 'default_hooks.checkpoint.by_epoch'"),
    ],
)
def test_what_xtune_cannot_honour_is_refused_by_key(tmp_path, old, new, message):
    text = "from my_pkg.models import MyModel\nfrom xtuner.dataset.map_fns import my_map_fn\n" + QLORA
    assert old in text
    path = write(tmp_path, text.replace(old, new))
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert message in str(error.value) and str(path) in str(error.value)


TINY = IMPORTS + """
model = dict(type=SupervisedFinetune,
             llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path='xtune-tiny/internlm2-chat'),
             lora=dict(type=LoraConfig, r=8, lora_alpha=16, lora_dropout=0.0, bias='none', task_type='CAUSAL_LM'))
train_dataloader = dict(batch_size=4, num_workers=0,
                        dataset=dict(type=process_hf_dataset, dataset=dict(type=load_dataset, path='xtune-tiny/antonyms'),
                                     max_length=64, dataset_map_fn=None, pack_to_max_length=False,
                                     template_map_fn=dict(type=template_map_fn_factory,
                                                          template=PROMPT_TEMPLATE.internlm2_chat)),
                        sampler=dict(type=DefaultSampler, shuffle=True))
optim_wrapper = dict(type=AmpOptimWrapper, optimizer=dict(type=AdamW, lr=1e-3, betas=(0.9, 0.999), weight_decay=0),
                     clip_grad=dict(max_norm=1), accumulative_counts=1, dtype='float32')
train_cfg = dict(type=TrainLoop, max_iters=2)
default_hooks = dict(checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=1000, max_keep_ckpts=1))
randomness = dict(seed=0)
"""


def test_xtune_train_runs_a_tiny_xtuner_config(tmp_path):
    path = write(tmp_path, TINY, "tiny_xtuner.py")
    result = CliRunner().invoke(app, ["train", str(path), "--work-dir", str(tmp_path / "run"), "--cfg-options",
                                      "device='cpu'"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "checkpoint:" in result.output and "checkpoint-2" in result.output
    assert read_xtuner_config(path).values["max_steps"] == 2


@pytest.mark.parametrize("map_fn, dataset_format", [("alpaca_zh_map_fn", "alpaca_zh"), ("colorist_map_fn", "colors"),
                                                    ("sql_map_fn", "sql"), ("openai_map_fn", "openai")])  # fmt: skip
def test_xtuners_map_functions_become_their_dataset_formats(tmp_path, map_fn, dataset_format):
    text = QLORA.replace("dataset_map_fn=alpaca_map_fn", f"dataset_map_fn={map_fn}")
    text = text.replace("from xtuner.dataset.map_fns import alpaca_map_fn", f"from xtuner.dataset.map_fns import {map_fn}")
    assert text != QLORA
    config, _ = load_config(str(write(tmp_path, text)))
    assert config.dataset_format == dataset_format


CONCAT_DATA = """
english = dict(
    type=process_hf_dataset, dataset=dict(type=load_dataset, path='json', data_files=dict(train=data_file)),
    tokenizer=tokenizer, max_length=max_length, dataset_map_fn=alpaca_map_fn,
    template_map_fn=dict(type=template_map_fn_factory, template=prompt_template),
    shuffle_before_pack=True, pack_to_max_length=pack_to_max_length, use_varlen_attn=use_varlen_attn)
chinese = dict(
    type=process_hf_dataset, dataset=dict(type=load_dataset, path='json', data_files='./data/zh.json'),
    tokenizer=tokenizer, max_length=max_length, dataset_map_fn=alpaca_zh_map_fn,
    template_map_fn=dict(type=template_map_fn_factory, template=prompt_template),
    shuffle_before_pack=True, pack_to_max_length=pack_to_max_length, use_varlen_attn=use_varlen_attn)
train_dataset = dict(type=ConcatDataset, datasets=[english, chinese])
"""


def test_a_concat_dataset_becomes_one_source_per_part(tmp_path):
    text = (IMPORTS + "from xtuner.dataset import ConcatDataset\nfrom xtuner.dataset.map_fns import alpaca_zh_map_fn\n"
            + SETTINGS + QLORA_MODEL + CONCAT_DATA + RUNTIME)  # fmt: skip
    config, _ = load_config(str(write(tmp_path, text)))
    assert [(source.path, source.format) for source in config.datasets] == [
        ("./data/my_alpaca.json", "alpaca"), ("./data/zh.json", "alpaca_zh")]  # fmt: skip
    assert config.data_path is None and config.max_length == 1024 and config.prompt_template == "qwen_chat"
    differing = text.replace("template_map_fn=dict(type=template_map_fn_factory, template=prompt_template),\n"
                             "    shuffle_before_pack=True, pack_to_max_length=pack_to_max_length, use_varlen_attn=use_varlen_attn)\n"
                             "train_dataset", "template_map_fn=dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.vicuna),\n"
                             "    shuffle_before_pack=True, pack_to_max_length=pack_to_max_length, use_varlen_attn=use_varlen_attn)\n"
                             "train_dataset")  # fmt: skip
    assert differing != text
    with pytest.raises(ConfigError, match=r"datasets\[1\]': its settings differ from the first dataset's"):
        load_config(str(write(tmp_path, differing, "differing.py")))


def test_pretraining_without_a_template_and_8_bit_loading_as_from_pretrained_spells_it(tmp_path):
    text = QLORA.replace("template_map_fn=dict(type=template_map_fn_factory, template=prompt_template)",
                         "template_map_fn=None")  # fmt: skip
    start = text.index("quantization_config=dict(")
    text = text[:start] + "load_in_8bit=True)," + text[text.index("bnb_4bit_quant_type='nf4')),") + len("bnb_4bit_quant_type='nf4')),"):]
    assert "template_map_fn=None" in text and "quantization_config" not in text
    config, _ = load_config(str(write(tmp_path, text)))
    assert config.quantization == "8bit" and config.method == "lora"


ITERATION_SCHEDULE = """
param_scheduler = [
    dict(type=LinearLR, start_factor=1e-5, by_epoch=False, begin=0, end=400),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=False, begin=400, end=4000)]
train_cfg = dict(type=TrainLoop, max_iters=4000)
"""


def test_a_warmup_counted_in_iterations_becomes_warmup_steps(tmp_path):
    start, end = RUNTIME.index("param_scheduler = ["), RUNTIME.index("custom_hooks = [")
    text = IMPORTS + SETTINGS + QLORA_MODEL + SFT_DATA + RUNTIME[:start] + ITERATION_SCHEDULE + RUNTIME[end:]
    config, _ = load_config(str(write(tmp_path, text)))
    assert (config.warmup_steps, config.max_steps) == (50, 500)  # 400 and 4000 micro-batches, 8 to a step
    # XTuner's minicpm configs write the warmup in epochs (by_epoch=True) but count the loop in iterations: mmengine
    # stretches such a warmup by the epoch length, past the run; its end is computed from max_iters, so it is read so
    in_epochs = text.replace("by_epoch=False, begin=0, end=400", "by_epoch=True, begin=0, end=400, convert_to_iter_based=True")
    assert in_epochs != text
    mapped = read_xtuner_config(write(tmp_path, in_epochs, "in_epochs.py"))
    assert mapped.values["warmup_steps"] == 50 and "warmup_ratio" not in mapped.values
    assert any("by_epoch=True in a loop counted in iterations" in note for note in mapped.notes)
    no_length = in_epochs.replace("train_cfg = dict(type=TrainLoop, max_iters=4000)", "train_cfg = dict(type=TrainLoop)")
    with pytest.raises(ConfigError, match=r"'param_scheduler\[0\]': a warmup in epochs, and train_cfg names no"):
        load_config(str(write(tmp_path, no_length, "no_length.py")))


def test_warmup_steps_replace_the_warmup_ratio_in_the_schedule():
    from xtune.config.schema import Config
    from xtune.engine.optim import build_scheduler

    def factors(**settings):
        config = Config(llm_name_or_path="x", data_path="x.json", lr=1.0, **settings)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = build_scheduler(optimizer, config, total_steps=100)
        return [scheduler.lr_lambdas[0](step) for step in (0, 3, 4, 5)]

    assert factors(warmup_steps=4)[:3] == [0.25, 1.0, 1.0]
    assert factors(warmup_ratio=0.5)[:2] == [1 / 50, 4 / 50]
    assert factors(warmup_ratio=0.5, warmup_steps=4) == factors(warmup_steps=4)


JSONL_DPO = IMPORTS + """
from xtuner.dataset.preference_dataset import load_jsonl_dataset
model = dict(type=DPO, loss_type='sigmoid', beta=0.1, use_varlen_attn=False,
             llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path='org/chat'))
train_dataloader = dict(batch_size=1, dataset=dict(
    type=build_preference_dataset, dataset=dict(type=load_jsonl_dataset, data_files=FILES),
    tokenizer=None, max_length=512, dataset_map_fn=None, is_dpo=True, is_reward=False, max_packed_length=1024,
    num_proc=2, use_varlen_attn=True))
"""


def test_xtuners_jsonl_loader_reads_each_file_as_a_source(tmp_path):
    config, _ = load_config(str(write(tmp_path, JSONL_DPO.replace("FILES", "['a.jsonl', 'b.jsonl']"))))
    assert [(source.path, source.format) for source in config.datasets] == [("a.jsonl", "auto"), ("b.jsonl", "auto")]
    assert config.data_path is None and config.stage == "dpo"
    config, _ = load_config(str(write(tmp_path, JSONL_DPO.replace("FILES", "'one.jsonl'"), "one.py")))
    assert config.data_path == "one.jsonl" and config.datasets == []
    folder = JSONL_DPO.replace("data_files=FILES", "data_dir='./pairs', suffix='.jsonl'")
    mapped = read_xtuner_config(write(tmp_path, folder, "folder.py"))
    assert mapped.values["data_path"] == "./pairs"
    assert any("suffix = '.jsonl': xtune reads every data file in the folder" in note for note in mapped.notes)


def test_max_dataset_length_keeps_a_seeded_subset_of_each_source(tmp_path):
    from xtune.data.sources import SourceSpec, load_sources

    text = QLORA.replace("use_varlen_attn=use_varlen_attn)\n", "use_varlen_attn=use_varlen_attn, max_dataset_length=3)\n", 1)
    assert text != QLORA
    config, _ = load_config(str(write(tmp_path, text)))
    assert config.max_dataset_length == 3
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(f'{{"instruction": "q{n}", "output": "a{n}"}}\n' for n in range(10)))

    def inputs(max_records, seed=0, repeats=1.0):
        loaded = load_sources([SourceSpec(str(data), max_records=max_records, repeats=repeats)], seed=seed)
        return [conversation.turns[0].content for conversation in loaded.conversations]

    picked = inputs(3)
    assert len(picked) == 3 and len(set(picked)) == 3 and picked == sorted(picked, key=lambda q: int(q[1:]))
    assert inputs(3) == picked and inputs(3, seed=1) != picked  # seeded: the same records run after run
    assert inputs(3, repeats=2) == picked * 2  # the subset first, then its repeats
    assert inputs(50) == inputs(None) == [f"q{n}" for n in range(10)]


def test_sequence_parallel_carries_over_with_the_accumulation_xtuner_scales_by_it(tmp_path):
    config, _ = load_config(str(write(tmp_path, QLORA.replace("sequence_parallel_size = 1", "sequence_parallel_size = 4"))))
    assert config.sequence_parallel_size == 4 and config.accumulative_counts == 32  # 8 *= 4: the same global batch


def test_max_dataset_length_over_several_data_files_is_refused(tmp_path):
    """XTuner draws max_dataset_length records from all of a loader's files together; xtune's is per source."""
    text = JSONL_DPO.replace("FILES", "['a.jsonl', 'b.jsonl']").replace("num_proc=2,", "num_proc=2, max_dataset_length=5,")
    assert "max_dataset_length=5" in text
    with pytest.raises(ConfigError, match="max_dataset_length': with several data_files XTuner draws that many"):
        load_config(str(write(tmp_path, text)))
