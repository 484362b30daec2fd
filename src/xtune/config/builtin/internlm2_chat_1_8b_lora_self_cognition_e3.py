# LoRA on InternLM2-Chat-1.8B teaching it who it is (a self-cognition set in XTuner's `conversation`
# format: [{"conversation": [{"input": "Who are you?", "output": "I am ..."}]}]), 3 epochs.

# Model
pretrained_model_name_or_path = "internlm/internlm2-chat-1_8b"
method = "lora"
quantization = None
lora_r = 64
lora_alpha = 16
lora_dropout = 0.1

# Data
data_root = "./data/"
data_path = data_root + "self_cognition.json"
prompt_template = "internlm2_chat"
max_length = 2048
pack_to_max_length = True

# Optimisation
batch_size = 1  # per device
accumulative_counts = 16
max_epochs = 3
lr = 2e-4
betas = (0.9, 0.999)
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.03

# Saving, logging, evaluation
save_steps = 500
save_total_limit = 2
evaluation_freq = 500
SYSTEM = ""
evaluation_inputs = ["你是谁？", "Who are you?", "What can you do?"]
