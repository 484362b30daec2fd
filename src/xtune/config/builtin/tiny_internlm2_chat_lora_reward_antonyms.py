# A reward model on the tiny InternLM2-layout model: it learns to score the antonym in lower case ("cold") above it
# shouted ("COLD!"), from the DPO config's pairs. Runs on a CPU in about a minute. LoRA on the backbone, the score
# head (hidden_size -> 1) trained in full; `xtune convert merge` writes a transformers sequence classifier.

# Model
llm_name_or_path = "xtune-tiny/internlm2-chat"
method = "lora"
lora_r = 16
lora_alpha = 32
lora_dropout = 0.0

# Preference
stage = "reward"

# Data
data_path = "xtune-tiny/antonym-pairs"
prompt_template = "internlm2_chat"
max_length = 64
pack_to_max_length = True

# Optimisation
batch_size = 8
accumulative_counts = 1
max_epochs = 1  # as XTuner's reward configs: more epochs overfit a reward model
lr = 2e-3
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.05
seed = 0

# Saving, logging
save_steps = 1000
save_total_limit = 2
