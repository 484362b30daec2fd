# KTO on the tiny InternLM2-layout model: unpaired examples, the antonym desirable and the shouted antonym
# ("COLD!") not. Runs on a CPU in a minute. The reference is the same weights with the LoRA adapter switched off.

# Model
llm_name_or_path = "xtune-tiny/internlm2-chat"
method = "lora"
lora_r = 16
lora_alpha = 32
lora_dropout = 0.0

# Preference
stage = "kto"
beta = 0.1
desirable_weight = 1.0
undesirable_weight = 1.0

# Data
data_path = "xtune-tiny/antonym-kto"
prompt_template = "internlm2_chat"
max_length = 64
pack_to_max_length = True

# Optimisation
batch_size = 8
accumulative_counts = 1
max_epochs = 4
lr = 2e-3
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.05
seed = 0

# Saving, logging, evaluation
save_steps = 1000
save_total_limit = 2
evaluation_freq = 1000
evaluation_inputs = ["What is the opposite of hot?"]
