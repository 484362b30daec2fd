# QLoRA on InternLM2-Chat-1.8B with the Alpaca instruction set, 3 epochs (XTuner's config of this name).
# Edit the paths below; everything else is XTuner's recipe.

# Model
pretrained_model_name_or_path = "internlm/internlm2-chat-1_8b"
method = "lora"
quantization = "4bit"
lora_r = 64
lora_alpha = 16
lora_dropout = 0.1

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
lr = 2e-4
betas = (0.9, 0.999)
weight_decay = 0.0
max_norm = 1.0  # grad clip
warmup_ratio = 0.03

# Saving, logging, evaluation
save_steps = 500
save_total_limit = 2  # maximum checkpoints to keep (-1 means unlimited)
evaluation_freq = 500
SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
)
evaluation_inputs = ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]
