"""Built-in configs as data: one table of models (family, hub id, chat template, defaults) times one table of
recipes (method x data). `list-cfg` lists their names, `show-cfg` and `train` read them, and `copy-cfg` writes a
complete Python file to edit. Names follow XTuner's (`llama2_7b_qlora_alpaca_e3`, `qwen1_5_7b_chat_qlora_alpaca_e3`)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Model:
    """One model of a family, with what its configs need to know about it."""

    key: str
    """The name stem, spelt as XTuner spells it: `internlm2_chat_7b`, `llama2_7b`, `qwen1_5_7b_chat`."""
    family: str
    model_id: str
    """Its Hugging Face id (found in the local Hugging Face or ModelScope cache, or edited to a folder)."""
    template: str
    """The prompt template: a named one where it writes the family's official format, `hf` (the model's own
    chat_template) where xtune has no template of that format yet, `default` for base models."""
    lr: float = 2e-4
    """LoRA/QLoRA learning rate; full fine-tuning uses a tenth of it."""
    max_length: int = 2048
    lora_r: int = 64
    lora_alpha: int = 16
    note: str = ""
    """Written at the top of the config file."""
    remote_code: bool = False
    """The model's modelling code lives in its repository: the config sets `trust_remote_code = True` (a Python
    config needs no --allow-code; read the code first)."""


MODELS: tuple[Model, ...] = (
    Model("internlm2_1_8b", "InternLM2", "internlm/internlm2-1_8b", "default", note="A base model: XTuner's default template."),
    Model("internlm2_chat_1_8b", "InternLM2", "internlm/internlm2-chat-1_8b", "internlm2_chat"),
    Model("internlm2_7b", "InternLM2", "internlm/internlm2-7b", "default", note="A base model: XTuner's default template."),
    Model("internlm2_chat_7b", "InternLM2", "internlm/internlm2-chat-7b", "internlm2_chat"),
    Model("internlm2_5_chat_7b", "InternLM2.5", "internlm/internlm2_5-7b-chat", "internlm2_chat"),
    Model("internlm3_8b_instruct", "InternLM3", "internlm/internlm3-8b-instruct", "internlm2_chat", remote_code=True,
          note="InternLM3's jinja is InternLM2's; its modelling is remote code (trust_remote_code)."),
    Model("llama2_7b", "Llama 2", "meta-llama/Llama-2-7b-hf", "default", note="A base model: XTuner's default template."),
    Model("llama2_7b_chat", "Llama 2", "meta-llama/Llama-2-7b-chat-hf", "llama2_chat"),
    Model("llama3_8b", "Llama 3", "meta-llama/Meta-Llama-3-8B", "default", lr=1e-4,
          note="A base model: XTuner's default template."),
    Model("llama3_8b_instruct", "Llama 3", "meta-llama/Meta-Llama-3-8B-Instruct", "llama3_chat", lr=1e-4),
    Model("llama3_1_8b_instruct", "Llama 3.1", "meta-llama/Llama-3.1-8B-Instruct", "llama3_1", lr=1e-4,
          note="Llama 3.1's template writes a dated system header, and tools as its jinja does (llama3_1)."),
    Model("llama3_2_3b_instruct", "Llama 3.2", "meta-llama/Llama-3.2-3B-Instruct", "hf", lr=1e-4,
          note="Llama 3.2's template writes today's date into the system header: its own (hf)."),
    Model("llama3_3_70b_instruct", "Llama 3.3", "meta-llama/Llama-3.3-70B-Instruct", "llama3_1", lr=1e-4, lora_r=16),
    Model("qwen1_5_7b", "Qwen 1.5", "Qwen/Qwen1.5-7B", "default", note="A base model: XTuner's default template."),
    Model("qwen1_5_7b_chat", "Qwen 1.5", "Qwen/Qwen1.5-7B-Chat", "qwen_chat"),
    Model("qwen2_7b_instruct", "Qwen 2", "Qwen/Qwen2-7B-Instruct", "qwen_chat"),
    Model("qwen2_5_7b_instruct", "Qwen 2.5", "Qwen/Qwen2.5-7B-Instruct", "qwen_chat"),
    Model("qwen3_8b", "Qwen 3", "Qwen/Qwen3-8B", "qwen3", lr=1e-4,
          note="Reasoning in the data (reasoning_content or <think>) is written as Qwen3's template writes it."),
    Model("qwen3_30b_a3b", "Qwen 3 MoE", "Qwen/Qwen3-30B-A3B", "qwen3", lr=1e-4, lora_r=16),
    Model("mistral_7b", "Mistral", "mistralai/Mistral-7B-v0.1", "default", note="A base model: XTuner's default template."),
    Model("mistral_7b_instruct_v0_1", "Mistral", "mistralai/Mistral-7B-Instruct-v0.1", "mistral", lr=1e-4),
    Model("mistral_7b_instruct_v0_3", "Mistral", "mistralai/Mistral-7B-Instruct-v0.3", "mistral_v0_3", lr=1e-4),
    Model("mixtral_8x7b_instruct", "Mixtral", "mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral", lr=1e-4, lora_r=16),
    Model("gemma_7b_it", "Gemma", "google/gemma-7b-it", "gemma", lr=1e-4),
    Model("gemma2_9b_it", "Gemma 2", "google/gemma-2-9b-it", "gemma", lr=1e-4),
    Model("gemma3_1b_it", "Gemma 3", "google/gemma-3-1b-it", "gemma", lr=1e-4),
    Model("phi3_mini_4k_instruct", "Phi-3", "microsoft/Phi-3-mini-4k-instruct", "phi3_chat"),
    Model("phi3_5_mini_instruct", "Phi-3.5", "microsoft/Phi-3.5-mini-instruct", "phi3_5"),
    Model("phi4", "Phi-4", "microsoft/phi-4", "phi4", lr=1e-4),
    Model("deepseek_v2_lite_chat", "DeepSeek-V2", "deepseek-ai/DeepSeek-V2-Lite-Chat", "deepseek_v2", lora_r=16),
    Model("deepseek_coder_6_7b_instruct", "DeepSeek-Coder", "deepseek-ai/deepseek-coder-6.7b-instruct", "deepseek_coder"),
    Model("deepseek_r1_distill_qwen_7b", "DeepSeek-R1-Distill", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "deepseek_r1",
          lr=1e-4, note="Answers are trained after the '<think>' the prompt opens: give reasoning in the data."),
    Model("deepseek_moe_16b_chat", "DeepSeek-MoE", "deepseek-ai/deepseek-moe-16b-chat", "deepseek_moe", lora_r=16,
          remote_code=True),
    Model("yi_6b_chat", "Yi", "01-ai/Yi-6B-Chat", "qwen_chat",
          note="Yi-6B-Chat's template is plain ChatML, which qwen_chat writes (Yi-1.5's differs: yi_chat)."),
    Model("yi1_5_9b_chat", "Yi-1.5", "01-ai/Yi-1.5-9B-Chat", "yi_chat"),
    Model("glm4_9b_chat", "GLM-4", "THUDM/glm-4-9b-chat-hf", "hf", lr=1e-4,
          note="The -hf repository's own template (hf); glm4 writes glm-4-9b-chat's: check-template compares them."),
    Model("command_r7b", "Cohere Command-R", "CohereForAI/c4ai-command-r7b-12-2024", "hf", lr=1e-4),
    Model("baichuan2_7b_chat", "Baichuan 2", "baichuan-inc/Baichuan2-7B-Chat", "baichuan2_chat", remote_code=True),
    Model("chatglm3_6b", "ChatGLM3", "THUDM/chatglm3-6b", "chatglm3", remote_code=True),
    Model("minicpm_2b_sft", "MiniCPM", "openbmb/MiniCPM-2B-sft-bf16", "minicpm", remote_code=True),
    Model("minicpm3_4b", "MiniCPM3", "openbmb/MiniCPM3-4B", "minicpm3", remote_code=True),
)  # fmt: skip
"""One sensible size per family (several where the family changed its format between versions)."""


@dataclass(frozen=True)
class Recipe:
    """A method and a dataset, as a config's name ends: `qlora_alpaca_e3`."""

    key: str
    method: str
    quantization: str | None
    data: str
    """`alpaca`, `oasst1` (openassistant-guanaco's "### Human: ... ### Assistant: ..." text), `self_cognition` (the
    identity questions xtune ships, answered with the config's name and author), `custom_sft` (OpenAI messages JSONL)
    or `custom_pretrain` (plain text), `preference` (chosen and rejected conversations), `ultrafeedback`
    (UltraFeedback's binarized pairs, as XTuner's reward configs read them)."""
    epochs: int
    stage: str = "sft"
    """`sft`, or a preference stage (`dpo`, `orpo`, `reward`) with its own learning rate: `lr` below."""
    lr: float | None = None
    """The stage's learning rate where it differs from the model's (DPO on LoRA: 5e-6, as LLaMA-Factory's examples)."""


RECIPES: tuple[Recipe, ...] = (
    Recipe("qlora_alpaca_e3", "lora", "4bit", "alpaca", 3),
    Recipe("lora_alpaca_e3", "lora", None, "alpaca", 3),
    Recipe("full_alpaca_e3", "full", None, "alpaca", 3),
    Recipe("qlora_oasst1_e3", "lora", "4bit", "oasst1", 3),
    Recipe("qlora_self_cognition_e3", "lora", "4bit", "self_cognition", 3),
    Recipe("qlora_custom_sft_e1", "lora", "4bit", "custom_sft", 1),
    Recipe("full_custom_pretrain_e1", "full", None, "custom_pretrain", 1),
    # XTuner's names; its DPO configs use lr 5e-7 (the alignment handbook's, for full weights) with QLoRA too
    Recipe("dpo_qlora_varlenattn", "lora", "4bit", "preference", 3, stage="dpo", lr=5e-6),
    Recipe("orpo_qlora_varlenattn", "lora", "4bit", "preference", 3, stage="orpo", lr=8e-6),
    # XTuner's reward model recipe: full weights, one epoch (more overfit a reward model), lr 2e-5
    Recipe("reward_full_varlenattn_ultrafeedback", "full", None, "ultrafeedback", 1, stage="reward", lr=2e-5),
)

_DATA = {
    "alpaca": ('alpaca_en_path = data_root + "alpaca_data.json"  # tatsu-lab/alpaca as JSON (XTuner\'s name for data_path)',
               "alpaca"),
    "oasst1": ('data_path = data_root + "openassistant_best_replies_train.jsonl"  # timdettmers/openassistant-guanaco',
               "oasst1"),
    "self_cognition": (
        'datasets = [{"path": "xtune-data/self_cognition", "repeats": 20}]  # "Who are you?" in English and Chinese\n'
        'data_placeholders = {"name": "MyAssistant", "author": "My Team"}  # who the tuned model says it is',
        "alpaca",
    ),
    "ultrafeedback": ('data_path = data_root + "ultrafeedback-binarized-preferences-cleaned.jsonl"  # '
                      "argilla/ultrafeedback-binarized-preferences-cleaned, as XTuner's reward configs", "auto"),
    "preference": ('data_path = data_root + "orpo-dpo-mix-40k.jsonl"  # mlabonne/orpo-dpo-mix-40k, as XTuner\'s configs',
                   "auto"),
    "custom_sft": ('data_path = data_root + "my_conversations.jsonl"  # {"messages": [{"role": ..., "content": ...}]}', "openai"),
    "custom_pretrain": ('data_path = data_root + "my_corpus.txt"  # one document per line', "text"),
}  # fmt: skip

_STAGE_KEYS = {"dpo": ["beta = 0.1"], "orpo": ["orpo_alpha = 0.1"], "reward": []}
"""The keys a preference stage's preset sets beside `stage`."""

PRESETS: dict[str, tuple[Model, Recipe]] = {f"{m.key}_{r.key}": (m, r) for m in MODELS for r in RECIPES}


def matches(name: str, pattern: str) -> bool:
    """Whether `pattern`, as a user types it (`qwen2.5`, `Llama-3.2`, `internlm2_1_8b`, `llama3`), names `name`:
    its words in order, each the start of a word of the name, or its letters and digits in a row."""
    words, wanted = _words(name), _words(pattern)
    if "".join(wanted) in "".join(words):
        return True
    position = 0
    for word in wanted:
        position = next((i + 1 for i in range(position, len(words)) if words[i].startswith(word)), -1)
        if position < 0:
            return False
    return True


def _words(text: str) -> list[str]:
    return [word for word in text.lower().replace(".", "_").replace("-", "_").split("_") if word]


def family_of(name: str) -> str | None:
    return PRESETS[name][0].family if name in PRESETS else None


def preset_source(name: str) -> str:
    """A complete, editable Python config for the preset `name`."""
    model, recipe = PRESETS[name]
    data_line, data_format = _DATA[recipe.data]
    full = recipe.method == "full"
    lr = recipe.lr if recipe.lr is not None else model.lr / 10 if full else model.lr
    pretrain = recipe.data == "custom_pretrain"
    lines = [
        f"# {recipe.method.upper() if not recipe.quantization else 'QLoRA'} on {model.model_id} ({model.family}), "
        f"{recipe.data.replace('_', ' ')} data, {recipe.epochs} epoch{'s' if recipe.epochs > 1 else ''}.",
        *([f"# {model.note}"] if model.note else []),
        "# Edit the model and data paths; `xtune show-cfg --fields` lists every key.",
        "",
        "# Model",
        f'pretrained_model_name_or_path = "{model.model_id}"',
        f'method = "{recipe.method}"',
        f"quantization = {recipe.quantization!r}".replace("'", '"'),
        *(["trust_remote_code = True  # the model's own modelling code: read it before you run it"]
          if model.remote_code else []),
    ]
    if not full:
        lines += [f"lora_r = {model.lora_r}", f"lora_alpha = {model.lora_alpha}", "lora_dropout = 0.1"]
    lines += [
        "",
        "# Data",
        'data_root = "./data/"',
        data_line,
        f'dataset_format = "{data_format}"',
        *([f'stage = "{recipe.stage}"', *_STAGE_KEYS[recipe.stage]] if recipe.stage != "sft" else []),
        f'prompt_template = "{model.template}"',
        f"max_length = {model.max_length}",
        # packing needs transformers' attention interface, which remote modelling code does not go through
        f"pack_to_max_length = {not model.remote_code}",
        "",
        "# Optimisation",
        "batch_size = 1  # per device",
        "accumulative_counts = 16",
        f"max_epochs = {recipe.epochs}",
        f"lr = {lr:g}",
        "weight_decay = 0.0",
        "max_norm = 1.0",
        "warmup_ratio = 0.03",
        "",
        "# Saving, logging, evaluation",
        "save_steps = 500",
        "save_total_limit = 2",
        "evaluation_freq = 500",
    ]
    if not pretrain and recipe.stage != "reward":  # a reward model scores answers, it does not generate them
        lines += ['evaluation_inputs = ["Please tell me five scenic spots in Shanghai", "请给我介绍五个上海的景点"]']
    return "\n".join(lines) + "\n"
