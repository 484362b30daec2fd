# LLaVA stage 2 (XTuner's config of this name): the stage-1 projector (pretrained_pth), QLoRA on
# InternLM2-Chat-1.8B, LoRA on CLIP ViT-L/14-336, the projector trained too, on LLaVA-v1.5's 665k mixed
# visual instructions. Run on 8 GPUs:
#   NPROC_PER_NODE=8 xtune train llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune --deepspeed deepspeed_zero2
# Edit the paths below (pretrained_pth: the pretrain run's checkpoint, by XTuner's name in its work_dir or as
# RUN/checkpoint-<step>; or XTuner's own iter_N.pth); everything else is XTuner's recipe.

# Model
llm_name_or_path = "internlm/internlm2-chat-1_8b"
visual_encoder_name_or_path = "openai/clip-vit-large-patch14-336"
visual_select_layer = -2
pretrained_pth = "./work_dirs/llava_internlm2_chat_1_8b_clip_vit_large_p14_336_e1_gpu8_pretrain/iter_2181.pth"
method = "lora"
quantization = "4bit"
lora_r = 512
lora_alpha = 256
lora_dropout = 0.05
visual_encoder_lora = True
visual_encoder_lora_r = 64
visual_encoder_lora_alpha = 16

# Data
data_root = "./data/llava_data/"
data_path = data_root + "LLaVA-Instruct-150K/llava_v1_5_mix665k.json"
image_folder = data_root + "llava_images"
dataset_format = "llava"
prompt_template = "internlm2_chat"
max_length = int(2048 - (336 / 14) ** 2)
pad_image_to_square = True

# Optimisation
batch_size = 16  # per device
dataloader_num_workers = 4  # images read and preprocessed ahead of the step (benchmarks/image_collate.py)
accumulative_counts = 1
max_epochs = 1
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
evaluation_inputs = ["请描述一下这张照片", "Please describe this picture"]
evaluation_images = ["xtune-data/view.png"]  # a lake with a pier, shipped with xtune; or your own local image
