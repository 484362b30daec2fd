# LLaVA stage 1 (XTuner's config of this name): InternLM2-Chat-1.8B and CLIP ViT-L/14-336 frozen, the projector
# trained on LLaVA-Pretrain's 558k captions. Run on 8 GPUs:
#   NPROC_PER_NODE=8 xtune train llava_internlm2_chat_1_8b_clip_vit_large_p14_336_e1_gpu8_pretrain --deepspeed deepspeed_zero2
# Edit the paths below; everything else is XTuner's recipe.

# Model
llm_name_or_path = "internlm/internlm2-chat-1_8b"
visual_encoder_name_or_path = "openai/clip-vit-large-patch14-336"
visual_select_layer = -2
freeze_llm = True
freeze_visual_encoder = True

# Data
data_root = "./data/llava_data/"
data_path = data_root + "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
image_folder = data_root + "LLaVA-Pretrain/images"
dataset_format = "llava"
prompt_template = "internlm2_chat"
max_length = int(2048 - (336 / 14) ** 2)
pad_image_to_square = False

# Optimisation
batch_size = 32  # per device
dataloader_num_workers = 4  # images read and preprocessed ahead of the step (benchmarks/image_collate.py)
accumulative_counts = 1
max_epochs = 1
lr = 1e-3
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
