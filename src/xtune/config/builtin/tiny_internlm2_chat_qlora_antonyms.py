# QLoRA (4-bit NF4 base, LoRA on top) on a tiny random-weight model in InternLM2's checkpoint layout, learning antonyms.
# Runs on a CPU in about a minute. `xtune-tiny/...` ids are built by xtune itself on first use.

# Model
llm_name_or_path = "xtune-tiny/internlm2-chat"
method = "lora"
quantization = "4bit"
lora_r = 16
lora_alpha = 32
lora_dropout = 0.0

# Data
data_path = "xtune-tiny/antonyms"
prompt_template = "internlm2_chat"
max_length = 64
pack_to_max_length = False

# Optimisation
batch_size = 8
accumulative_counts = 1
max_epochs = 25
lr = 2e-3
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.05
seed = 0

# Saving, logging, evaluation
save_steps = 1000
save_total_limit = 2
evaluation_freq = 1000
SYSTEM = ""
evaluation_inputs = ["What is the opposite of hot?", "Give the antonym of fast."]
