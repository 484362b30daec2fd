# Full fine-tuning of InternLM2-Chat-1.8B on Alpaca, 3 epochs. Needs about 30 GB of GPU memory;
# use `--deepspeed deepspeed_zero2` or more GPUs for less per device.

# Model
pretrained_model_name_or_path = "internlm/internlm2-chat-1_8b"
method = "full"

# Data
data_root = "./data/"
alpaca_en_path = data_root + "alpaca_data.json"  # XTuner's name for data_path (tatsu-lab/alpaca as JSON)
prompt_template = "internlm2_chat"
max_length = 2048
pack_to_max_length = True

# Optimisation
batch_size = 1  # per device
accumulative_counts = 16
max_epochs = 3
lr = 2e-5
betas = (0.9, 0.999)
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.03
gradient_checkpointing = True

# Saving, logging, evaluation
save_steps = 500
save_total_limit = 2
evaluation_freq = 500
SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
)
evaluation_inputs = ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]
