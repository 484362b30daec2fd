# LLaVA stage 2 on a CPU: starts from the stage-1 projector (pretrained_pth), LoRA on the tiny InternLM2,
# projector trained too, on multi-turn questions about generated shape drawings ("What colour is the circle?").
# Set pretrained_pth to the pretrain run's checkpoint, e.g.
#   xtune train tiny_llava_finetune_shapes --cfg-options "pretrained_pth='work_dirs/.../checkpoint-N'"

llm_name_or_path = "xtune-tiny/internlm2-chat"
visual_encoder_name_or_path = "xtune-tiny/clip-vision"
visual_select_layer = -2
pretrained_pth = None
freeze_llm = False
freeze_visual_encoder = True
method = "lora"
lora_r = 16
lora_alpha = 32
lora_dropout = 0.0

data_path = "xtune-tiny/shapes-vqa"
dataset_format = "llava"
prompt_template = "internlm2_chat"
max_length = 128
pad_image_to_square = True

batch_size = 16
accumulative_counts = 1
max_epochs = 6
lr = 2e-3
warmup_ratio = 0.03
seed = 0

save_steps = 1000
save_total_limit = 1
evaluation_freq = 1000
evaluation_inputs = ["What colour is the shape?"]
evaluation_images = []
