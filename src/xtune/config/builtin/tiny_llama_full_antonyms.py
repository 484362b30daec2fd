# Full fine-tuning of a tiny random-weight Llama on the antonyms task; runs on a CPU in under a minute.

llm_name_or_path = "xtune-tiny/llama"
method = "full"

data_path = "xtune-tiny/antonyms"
prompt_template = "internlm2_chat"
max_length = 64

batch_size = 8
accumulative_counts = 1
max_epochs = 6
lr = 1e-3
warmup_ratio = 0.05
seed = 0

save_steps = 1000
save_total_limit = 1
evaluation_freq = 1000
evaluation_inputs = ["What is the opposite of hot?"]
