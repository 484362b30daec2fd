# LLaVA stage 1 on a CPU: a tiny CLIP vision encoder and a tiny InternLM2, both frozen; only the projector
# learns, from captions of generated shape drawings ("A red circle.").

llm_name_or_path = "xtune-tiny/internlm2-chat"
visual_encoder_name_or_path = "xtune-tiny/clip-vision"
visual_select_layer = -2
freeze_llm = True
freeze_visual_encoder = True

data_path = "xtune-tiny/shapes-captions"
dataset_format = "llava"
prompt_template = "internlm2_chat"
max_length = 128
pack_to_max_length = False

batch_size = 16
accumulative_counts = 1
max_epochs = 4
lr = 2e-3
warmup_ratio = 0.03
weight_decay = 0.0
seed = 0

save_steps = 1000
save_total_limit = 1
evaluation_freq = 1000
evaluation_inputs = ["Describe the image."]
evaluation_images = []
