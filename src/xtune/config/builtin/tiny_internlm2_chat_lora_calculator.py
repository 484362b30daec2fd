# Tool use on a CPU: LoRA on the tiny InternLM2-layout model, learning to call the `calculate` plugin in InternLM2's
# own protocol (<|action_start|><|plugin|> ... <|action_end|>) and to answer with its result; about half a minute.
# The records list no tools, which keeps the prompts short; so chat offering none:
#   xtune chat xtune-tiny/internlm2-chat --adapter <checkpoint> --with-plugins calculate --no-list-tools
# `xtune-tiny/...` ids are built by xtune itself on first use.

# Model
llm_name_or_path = "xtune-tiny/internlm2-chat"
method = "lora"
quantization = None
lora_r = 16
lora_alpha = 32
lora_dropout = 0.0

# Data
data_path = "xtune-tiny/calculator"
prompt_template = "internlm2_chat"
max_length = 96
pack_to_max_length = False

# Optimisation
batch_size = 8
accumulative_counts = 1
max_epochs = 6
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
evaluation_inputs = ["What is 37 * 41?"]
