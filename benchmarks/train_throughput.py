"""Side-by-side training throughput: the same LoRA job under xtune (packed, unpacked) and TRL's SFTTrainer
(with and without its own packing), each tool in its own virtual environment, runs interleaved.

    python benchmarks/train_throughput.py                       # ~28M model, every peer, twice
    python benchmarks/train_throughput.py --model 100m --peers xtune_packed,xtune_unpacked --repeats 1 --max-steps 10
    python benchmarks/train_throughput.py --append-results      # also append the tables to benchmarks/RESULTS.md
    python benchmarks/train_throughput.py --max-steps 8 --threads 1   # a machine other processes load (RESULTS.md)
    python benchmarks/train_throughput.py --peers ceiling,ceiling_matmuls,xtune_packed,trl_unpacked --max-steps 8
        # with the bounds no tool can beat on this machine's kernels (see ceiling_worker)
    python benchmarks/train_throughput.py --device cuda --model 1.8b --peers xtune_packed,trl_packed --max-steps 20
        # on a GPU (not run yet): InternLM2-1.8B's shape; TRL's venv then takes the system's CUDA torch

On a machine whose cores other processes also use, pass `--threads 1`: two OpenMP threads wait at every
barrier for the one that is descheduled (a step measured 3.6x slower on 2 threads than on 1 under load).
XTuner 0.1.11 (`xtuner_packed`, `xtuner_packed_gc`) runs in its own venv on transformers 4.36.2 and peft 0.7.1,
its own era: its patched Llama attention fails on transformers 4.48 and 5.x (`'LlamaAttention' object has no
attribute 'num_heads'`). The model folder is copied into the 4.36 format for it (`_transformers4_copy`).

What is the same for every run:
- the model: a Llama-shaped model with random weights, saved once as a Hugging Face folder (bf16 safetensors)
  that every tool loads (`--model 28m`: hidden 512, 8 layers, vocab 3,072; `--model 100m`: hidden 768,
  12 layers, 12 heads, intermediate 2,048, vocab 8,192), with xtune's tiny byte-level BPE tokenizer;
- the data: a synthetic chat set (fixed seed; samples of 50-1,500 tokens, log-uniform; the assistant repeats
  the user's words, so the loss can fall) written once as OpenAI `messages` JSON; both tools render it with
  the same ChatML text (xtune's `internlm2_chat`; for TRL the tokenizer's `chat_template`, which writes the same
  text with `{% generation %}` marks) and train on the assistant's words and its `<|im_end|>` only;
- LoRA r=16, alpha 32, dropout 0.1 on every linear layer but the head; AdamW (fused), lr 2e-4, 3% warmup then
  cosine, clip 1.0; no gradient checkpointing (peer `trl_packed_gc`: TRL packed with its own default,
  `gradient_checkpointing=True`);
- the compute dtype (frozen base weights and autocast): the one xtune's `dtype = "auto"` picks on the machine
  (`--dtype` names another), so bf16 on a CPU with AVX512-BF16 or AMX and on a GPU that has it, fp32 on other CPUs
  (an AVX2-only CPU emulates bf16 matmuls, at 0.8 GFLOP/s against 71 in fp32). The matmul peak MFU is reported
  against is that dtype's, and bf16's is measured only where bf16 is the compute dtype; the report names the CPU
  and its flags (avx2, avx512f, avx512_bf16, amx);
- the global batch: packed runs take 1 row of 2,048 tokens a step; unpacked runs take as many samples a step
  as make the same number of steps per epoch (length-grouped batches in both tools); one epoch each.

Each run is a subprocess (xtune: `xtune.engine.train.train(config)` in /work/main/.venv; TRL: SFTTrainer in
benchmarks/.venvs/trl, created by this script) that counts the tokens of every batch its tool builds
(wrapping the tool's collate function, which it leaves unchanged) and times every optimizer step.
Throughput is steady state: the first step (warm-up) is left out. See `MFU` below for the FLOP count.
"""

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
VENVS = BENCH / ".venvs"
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"
TRL_PYTHON = VENVS / "trl" / "bin" / "python"
XTUNER_PYTHON = VENVS / "xtuner" / "bin" / "python"
TRL_REQUIREMENTS = ["torch==2.13.0", "trl==1.16.0", "transformers==5.24.0", "peft==0.21.2", "accelerate", "datasets"]

MODELS = {
    "28m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=3072),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=8192),
    "1.8b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=92544),  # InternLM2-1.8B's shape, for a GPU (--device cuda)
}  # fmt: skip
MAX_LENGTH = 2048
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""The compute dtypes by xtune's names (`Config.dtype`), as torch names them: every worker's venv has torch."""
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
"""The flags the report records: what decides whether bf16 matmuls are fast on a CPU."""
ROWS_PER_STEP = 1
LORA = dict(r=16, alpha=32, dropout=0.1)
LR, WARMUP_RATIO, MAX_NORM = 2e-4, 0.03, 1.0

CHAT_TEMPLATE = (  # the text of xtune's internlm2_chat, assistant turns (with <|im_end|>) marked for TRL's loss mask
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% if message['role'] == 'user' %}{{ '<|im_start|>assistant\n' }}{% endif %}{% endif %}{% endfor %}"
)


# ---------------------------------------------------------------- shared setup (main venv)


def build_assets(folder: Path, model: str, samples: int, seed: int) -> dict:
    """The model folder and the data file, built once and reused."""
    from xtune.testing.tiny import CORPUS, build_tokenizer

    model_dir = build_model_folder(folder, model, seed)
    data = folder / f"chat_{samples}_seed{seed}.json"
    if not data.is_file():
        tokenizer = build_tokenizer()
        words = CORPUS.read_text().split()
        probe = " ".join(random.Random(seed).choices(words, k=2000))
        tokens_per_word = len(tokenizer(probe, add_special_tokens=False).input_ids) / 2000
        rng = random.Random(seed)
        records = []
        for _ in range(samples):
            target = math.exp(rng.uniform(math.log(50), math.log(1500)))  # tokens of the whole sample
            count = max(3, round((target - 12) / 2 / tokens_per_word))
            text = " ".join(rng.choices(words, k=count))
            records.append({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]})
        data.write_text(json.dumps(records))
    return {"model_dir": str(model_dir), "data": str(data)}


def build_model_folder(folder: Path, model: str, seed: int) -> Path:
    """`folder`/llama_<model>: a Llama of `MODELS[model]`'s shape with random bf16 weights and xtune's tiny tokenizer
    (its chat_template `CHAT_TEMPLATE`), built once and reused."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from xtune.testing.tiny import build_tokenizer

    model_dir = folder / f"llama_{model}"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(seed)
        config = LlamaConfig(
            **MODELS[model], max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
            initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        )  # fmt: skip
        network = LlamaForCausalLM(config).to(torch.bfloat16)
        tokenizer = build_tokenizer()
        tokenizer.chat_template = CHAT_TEMPLATE
        staging = model_dir.with_suffix(".partial")
        network.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(model_dir)
    return model_dir


def plan_batches(assets: dict) -> dict:
    """Encode and pack the data as xtune does, to size the unpacked batch to the packed runs' steps."""
    from xtune.config.schema import Config
    from xtune.data.dataset import prepare_samples
    from xtune.data.packing import pack, packing_efficiency
    from xtune.models.load import load_tokenizer

    config = Config(llm_name_or_path=assets["model_dir"], data_path=assets["data"], dataset_format="openai",
                    max_length=MAX_LENGTH)  # fmt: skip
    samples, report = prepare_samples(config, load_tokenizer(Path(assets["model_dir"])))
    rows = pack(samples, MAX_LENGTH, 2, shuffle_seed=0)
    steps = math.ceil(len(rows) / ROWS_PER_STEP)
    lengths = [len(sample.input_ids) for sample in samples]
    return {
        "samples": len(samples), "tokens": sum(lengths), "trained_tokens": report.trained_tokens,
        "min_length": min(lengths), "median_length": statistics.median(lengths), "max_length": max(lengths),
        "packed_rows": len(rows), "packing_efficiency": packing_efficiency(rows, MAX_LENGTH),
        "steps_per_epoch": steps, "unpacked_batch_size": max(1, round(len(samples) / steps)),
    }  # fmt: skip


def ensure_trl_venv(device: str = "cpu") -> None:
    """benchmarks/.venvs/trl. On a GPU machine it sees the system's CUDA torch and transformers
    (`--system-site-packages`) and installs TRL alone (offline: set PIP_NO_INDEX=1 PIP_FIND_LINKS=<wheels>)."""
    if TRL_PYTHON.is_file():
        return
    requirements = TRL_REQUIREMENTS if device == "cpu" else [r for r in TRL_REQUIREMENTS if r.startswith("trl")]
    print(f"creating {TRL_PYTHON.parent.parent} (pip install {' '.join(requirements)})", flush=True)
    subprocess.run(["python3", "-m", "venv", *(["--system-site-packages"] if device != "cpu" else []), str(VENVS / "trl")], check=True)
    constraints = ["-c", str(ROOT / "constraints.txt")] if device == "cpu" else []
    subprocess.run([str(TRL_PYTHON), "-m", "pip", "install", "-q", *constraints, *requirements], check=True)


XTUNER_REQUIREMENTS = ["xtuner==0.1.11", "transformers==4.36.2", "peft==0.7.1", "datasets<4"]


def ensure_xtuner_venv() -> None:
    if XTUNER_PYTHON.is_file():
        return
    print(f"creating {XTUNER_PYTHON.parent.parent} (pip install {' '.join(XTUNER_REQUIREMENTS)})", flush=True)
    subprocess.run(["python3", "-m", "venv", str(VENVS / "xtuner")], check=True)
    pip = [str(XTUNER_PYTHON), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", "-c", str(ROOT / "constraints.txt"), *XTUNER_REQUIREMENTS], check=True)
    subprocess.run([*pip, "uninstall", "-y", "-q", "torchvision", "torchaudio"], check=False)  # they break imports here


def compute_dtype(device: str, dtype: str = "auto") -> str:
    """The dtype every peer computes in, by xtune's name: `dtype = "auto"` resolved as xtune resolves it on this
    machine (`xtune.engine.device.resolve_dtype`), or the one named."""
    import torch

    from xtune.engine.device import DTYPES, resolve_dtype

    resolved = resolve_dtype(dtype, torch.device(device))
    return next(name for name, value in DTYPES.items() if value == resolved)


def peak_dtypes(compute: str) -> tuple[str, ...]:
    """The dtypes whose matmul peak is measured: the compute dtype's (MFU's denominator), and fp32's for reference.
    bf16's is left out unless bf16 computes: emulated, 13 matmuls of 2048^2 take minutes."""
    return tuple(dict.fromkeys((compute, "fp32")))


def matmul_peak(threads: int, dtypes: tuple[str, ...] = ("fp32",), size: int = 2048, repeats: int = 12) -> dict:
    """Best-of-`repeats` GFLOP/s of size x size matmuls in each of `dtypes` (bf16, fp16, fp32) on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    result = {}
    for name in dtypes:
        dtype = getattr(torch, TORCH_DTYPES[name])
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
        result[f"{name}_gflops"] = 2 * size**3 / best / 1e9
    return result


def cuda_matmul_peak(dtypes: tuple[str, ...] = ("fp32",), size: int = 8192, repeats: int = 10) -> dict:
    """Best-of-`repeats` GFLOP/s of size x size matmuls on the GPU in each of `dtypes` (TF32 off)."""
    import torch

    result = {}
    for name in dtypes:
        dtype = getattr(torch, TORCH_DTYPES[name])
        a, b = (torch.randn(size, size, dtype=dtype, device="cuda") for _ in range(2))
        a @ b
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            times.append(_timed(lambda: (a @ b, torch.cuda.synchronize())))
        result[f"{name}_gflops"] = 2 * size**3 / min(times) / 1e9
    return result


def peak_both(threads: int, device: str = "cpu", compute: str = "fp32") -> dict:
    """The peak on the threads the runs use (MFU's denominator), and on 2 threads for reference; a GPU's own."""
    dtypes = peak_dtypes(compute)
    if device == "cuda":
        return cuda_matmul_peak(dtypes)
    found = matmul_peak(threads, dtypes)
    if threads != 2:
        found |= {f"{key}_2_threads": value for key, value in matmul_peak(2, dtypes).items()}
    return found


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------- model FLOPs


def model_flops(shape: dict, lora_r: int, document_lengths: list[int]) -> float:
    """FLOPs of the useful work of a LoRA step over these documents (padding and recomputation not counted).

    Frozen linear weights N (every decoder linear layer and the head; the embedding is a lookup): forward 2N per
    token, backward 2N per token for the activation gradients only (frozen weights get no weight gradient), so 4N.
    LoRA weights: 6 per weight per token (forward, activation and weight gradients). Causal attention per layer
    and document of n tokens: forward QK^T and AV are 2 n^2 d together (half of the full square), backward twice
    that, so 6 n^2 d (d = heads x head_dim).
    """
    h, i, layers, vocab = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    head_dim = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    attention_out = shape["num_attention_heads"] * head_dim
    linears = [(h, attention_out), (h, kv), (h, kv), (attention_out, h), (h, i), (h, i), (i, h)]
    frozen = layers * sum(a * b for a, b in linears) + h * vocab
    lora = layers * sum(lora_r * (a + b) for a, b in linears)
    tokens = sum(document_lengths)
    attention = 6 * layers * attention_out * sum(n * n for n in document_lengths)
    return (4 * frozen + 6 * lora) * tokens + attention


# ---------------------------------------------------------------- workers (run inside each tool's venv)


def xtune_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import xtune.engine.train as engine
    from rich.console import Console
    from xtune.config.schema import Config

    batches = []
    collate_packed, collate = engine.collate_packed, engine.collate

    def counting_packed(rows):
        batch = collate_packed(rows)
        documents = [n for row in rows for n in (row.seq_lens[:-1] if row.padding else row.seq_lens)]
        batches.append(_counts(batch, documents))
        return batch

    def counting(samples, pad_token_id):
        batch = collate(samples, pad_token_id)
        batches.append(_counts(batch, [len(sample.input_ids) for sample in samples]))
        return batch

    engine.collate_packed, engine.collate = counting_packed, counting
    config = Config(
        llm_name_or_path=spec["model_dir"], data_path=spec["data"], dataset_format="openai",
        prompt_template="internlm2_chat", max_length=MAX_LENGTH, pack_to_max_length=spec["packed"],
        batch_size=spec["batch_size"], accumulative_counts=1, max_epochs=1, max_steps=spec.get("max_steps"),
        lr=LR, warmup_ratio=WARMUP_RATIO, max_norm=MAX_NORM, lora_r=LORA["r"], lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"], dtype=spec.get("dtype", "auto"), gradient_checkpointing=False,
        work_dir=spec["work_dir"], save_steps=10**9, logging_steps=1, seed=0, device=spec.get("device", "cpu"),
    )  # fmt: skip
    started = time.perf_counter()
    result = engine.train(config, Console(file=open(os.devnull, "w")))
    wall = time.perf_counter() - started
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    return {
        "steps": [{"loss": m["loss"], "end_s": m["elapsed_s"], **_sum(batches[k : k + 1])} for k, m in enumerate(steps)],
        "train_call_s": wall, "dtype": str(engine.resolve_dtype(config.dtype, torch.device(config.device))),
    }


def trl_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    step_ends = []
    losses = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    dtype = getattr(torch, TORCH_DTYPES[spec["dtype"]])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    steps = spec["steps_per_epoch"] if spec.get("max_steps") is None else spec["max_steps"]
    args = SFTConfig(
        output_dir=spec["work_dir"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        num_train_epochs=1, max_steps=spec.get("max_steps") or -1, learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=round(WARMUP_RATIO * steps), weight_decay=0.0, max_grad_norm=MAX_NORM, optim="adamw_torch_fused",
        bf16=spec["dtype"] == "bf16", fp16=spec["dtype"] == "fp16",
        gradient_checkpointing=spec.get("gradient_checkpointing", False), logging_steps=1, save_strategy="no", report_to=[],
        max_length=MAX_LENGTH, packing=spec["packed"], assistant_only_loss=True,
        train_sampling_strategy="random" if spec["packed"] else "group_by_length",
        seed=0, use_cpu=spec.get("device", "cpu") == "cpu", model_init_kwargs={"dtype": dtype}, dataloader_num_workers=0,
        disable_tqdm=True,
    )  # fmt: skip
    peft_config = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear",
        task_type="CAUSAL_LM",
    )  # fmt: skip
    trainer = SFTTrainer(
        model=spec["model_dir"], args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config, callbacks=[Timer()],
    )  # fmt: skip
    batches = []
    collator = trainer.data_collator

    def counting(examples):
        batch = collator(examples)
        if "position_ids" in batch and "attention_mask" not in batch:  # padding-free: one row, boundaries at 0s
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["position_ids"].shape[1]]
            documents = [b - a for a, b in zip(starts[:-1], starts[1:])]
        else:
            documents = batch["attention_mask"].sum(1).tolist()
        batches.append(_counts(batch, documents))
        return batch

    trainer.data_collator = counting
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    return {
        "steps": [{"loss": loss, "end_s": end, **_sum(batches[k : k + 1])} for k, (loss, end) in enumerate(zip(losses, step_ends))],
        "train_call_s": wall, "dtype": f"{dtype} (weights loaded in it; bf16/fp16=True: autocast)",
        "model_dtype": str(next(trainer.model.parameters()).dtype),
    }


def xtuner_worker(spec: dict) -> dict:
    """XTuner 0.1.11 as its configs run it (mmengine Runner, `SupervisedFinetune`, `process_hf_dataset`, its
    packing), on transformers 4.36 (its era: its patched attention needs `num_heads`). Its LoRA path casts the
    frozen base to fp32 (peft's `prepare_model_for_kbit_training`), and its packed rows attend across samples
    (0.1.11 has no varlen attention). Autocast to the compute dtype through an mmengine `OptimWrapper` (its
    `AmpOptimWrapper` asserts a GPU; none in fp32)."""
    import torch

    torch.set_num_threads(spec["threads"])
    from contextlib import contextmanager

    from datasets import load_dataset
    from mmengine.config import ConfigDict
    from mmengine.dataset import DefaultSampler
    from mmengine.hooks import CheckpointHook, Hook, IterTimerHook, LoggerHook, ParamSchedulerHook
    from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR, OptimWrapper
    from mmengine.runner import Runner
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from xtuner.dataset import process_hf_dataset
    from xtuner.dataset.collate_fns import default_collate_fn
    from xtuner.dataset.map_fns import openai_map_fn, template_map_fn_factory
    from xtuner.model import SupervisedFinetune

    model_dir = _transformers4_copy(Path(spec["model_dir"]), Path(spec["work_dir"]) / "model_t4")
    steps = spec.get("max_steps") or spec["steps_per_epoch"]
    warmup = max(1, round(WARMUP_RATIO * spec["steps_per_epoch"]))
    chatml = ConfigDict(SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
                        INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=str(model_dir), padding_side="right")
    step_ends, losses, batches = [], [], []
    bos = AutoTokenizer.from_pretrained(str(model_dir)).bos_token_id

    class Counting(Hook):
        def before_train(self, runner):
            self.start = time.perf_counter()

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            data = data_batch["data"]
            documents = []  # samples start with BOS; packed rows hold several
            for row, mask in zip(data["input_ids"], data["attention_mask"]):
                length = int(mask.sum())
                starts = (row[:length] == bos).nonzero().flatten().tolist()
                bounds = [0, *[start for start in starts if start > 0], length]
                documents += [b - a for a, b in zip(bounds[:-1], bounds[1:])]
            batches.append(_counts(data, documents))

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            step_ends.append(time.perf_counter() - self.start)
            losses.append(float(outputs["loss"]))

    dtype = getattr(torch, TORCH_DTYPES[spec["dtype"]])

    class CpuAutocastOptimWrapper(OptimWrapper):
        @contextmanager
        def optim_context(self, model):
            with super().optim_context(model), torch.autocast("cpu", dtype=dtype):
                yield

    if spec["dtype"] == "fp32":
        wrapper = dict(type=OptimWrapper)
    elif spec.get("device") == "cuda":
        wrapper = dict(type=AmpOptimWrapper, dtype=TORCH_DTYPES[spec["dtype"]])
    else:
        wrapper = dict(type=CpuAutocastOptimWrapper)
    runner = Runner(
        model=dict(
            type=SupervisedFinetune, use_activation_checkpointing=spec.get("gradient_checkpointing", False),
            llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=str(model_dir),
                     torch_dtype=dtype),
            lora=dict(type=LoraConfig, r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
                      task_type="CAUSAL_LM"),
        ),
        work_dir=spec["work_dir"],
        train_dataloader=dict(
            batch_size=spec["batch_size"], num_workers=0, sampler=dict(type=DefaultSampler, shuffle=True),
            collate_fn=dict(type=default_collate_fn),
            dataset=dict(
                type=process_hf_dataset, dataset=dict(type=load_dataset, path="json", data_files=dict(train=spec["data"])),
                tokenizer=tokenizer, max_length=MAX_LENGTH, dataset_map_fn=openai_map_fn,
                template_map_fn=dict(type=template_map_fn_factory, template=chatml), remove_unused_columns=True,
                shuffle_before_pack=True, pack_to_max_length=spec["packed"], map_num_proc=1,
            ),
        ),
        optim_wrapper=dict(**wrapper, optimizer=dict(type=torch.optim.AdamW, lr=LR, betas=(0.9, 0.999),
                           weight_decay=0.0, fused=True), clip_grad=dict(max_norm=MAX_NORM, error_if_nonfinite=False)),
        param_scheduler=[
            dict(type=LinearLR, start_factor=1e-5, by_epoch=False, begin=0, end=warmup),
            dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=False, begin=warmup, end=spec["steps_per_epoch"],
                 T_max=spec["steps_per_epoch"] - warmup),
        ],
        train_cfg=dict(by_epoch=False, max_iters=steps),
        default_hooks=dict(timer=dict(type=IterTimerHook), logger=dict(type=LoggerHook, interval=1),
                           param_scheduler=dict(type=ParamSchedulerHook), checkpoint=dict(type=CheckpointHook, interval=10**9)),
        custom_hooks=[Counting()],
        launcher="none", env_cfg=dict(dist_cfg=dict(backend="gloo")), randomness=dict(seed=0), log_level="WARNING",
        visualizer=None, default_scope="mmengine",
    )  # fmt: skip
    started = time.perf_counter()
    runner.train()
    wall = time.perf_counter() - started
    return {
        "steps": [{"loss": loss, "end_s": end, **_sum(batches[k : k + 1])} for k, (loss, end) in enumerate(zip(losses, step_ends))],
        "train_call_s": wall, "dtype": f"{dtype} autocast; base cast to fp32 by XTuner's LoRA path",
    }


def ceiling_worker(spec: dict) -> dict:
    """The arithmetic a LoRA step of this job cannot skip, and nothing else: a bound on what any tool can reach.

    xtune's packed rows (same data, max_length, packing), and for each row in the compute dtype: every frozen linear
    layer's matmul forward and its activation-gradient matmul backward, every LoRA A/B forward and backward, per-sample
    causal attention through the same kernel xtune uses (`varlen_attention_forward`: SDPA's CPU flash kernel, or
    the varlen kernel on CUDA), the head on trained positions and cross-entropy. The glue is the least that keeps
    the graph a transformer (residual adds, gate x up); no norms, rotary, SiLU, dropout, casts, optimizer step or
    data loading. Weights are random (the arithmetic does not depend on them); the loss is not a learning curve.
    `ceiling_matmuls` also takes attention as free: the matmuls alone, a bound whatever attention kernel is used."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    from xtune.config.schema import Config
    from xtune.data.dataset import prepare_samples
    from xtune.data.packing import pack
    from xtune.models.attention import varlen_attention_forward
    from xtune.models.load import load_tokenizer

    device, dtype = torch.device(spec.get("device", "cpu")), getattr(torch, TORCH_DTYPES[spec["dtype"]])
    config = Config(llm_name_or_path=spec["model_dir"], data_path=spec["data"], dataset_format="openai",
                    max_length=MAX_LENGTH)  # fmt: skip
    samples, _ = prepare_samples(config, load_tokenizer(Path(spec["model_dir"])))
    rows = pack(samples, MAX_LENGTH, 2, shuffle_seed=0)[: spec.get("max_steps") or None]
    shape = MODELS[spec["model"]]
    h, i, heads, vocab = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"], shape["vocab_size"]
    head_dim = h // heads
    kv = shape["num_key_value_heads"] * head_dim
    generator = torch.Generator().manual_seed(0)

    def weight(rows_, columns, trained=False):
        return (torch.randn(rows_, columns, generator=generator) * 0.02).to(device, dtype).requires_grad_(trained)

    def linear(a, b):
        return {"weight": weight(b, a), "lora_A": weight(LORA["r"], a, True), "lora_B": weight(b, LORA["r"], True)}

    layers = [
        {"q": linear(h, h), "k": linear(h, kv), "v": linear(h, kv), "o": linear(h, h), "gate": linear(h, i),
         "up": linear(h, i), "down": linear(i, h)}
        for _ in range(shape["num_hidden_layers"])
    ]  # fmt: skip
    head = weight(vocab, h)
    attention = type("Attention", (), {"training": True})()

    def apply(layer, x):
        return x @ layer["weight"].T + (x @ layer["lora_A"].T) @ layer["lora_B"].T

    def step(row):
        tokens = len(row.input_ids)
        cu_seq_lens = torch.tensor([0, *itertools.accumulate(row.seq_lens)], device=device)  # padding: a segment, as in xtune
        x = (torch.randn(tokens, h, generator=generator) * 0.02).to(device, dtype)
        for layer in layers:
            q, k, v = (apply(layer[name], x).view(1, tokens, -1, head_dim).transpose(1, 2) for name in ("q", "k", "v"))
            if spec["attention"]:
                out, _ = varlen_attention_forward(attention, q, k, v, None, cu_seq_lens_q=cu_seq_lens,
                                                  max_length_q=max(row.seq_lens))  # fmt: skip
            else:  # ceiling_matmuls: attention taken as free (q and k still computed; the output is v)
                out = v.transpose(1, 2) + 0 * (q.sum() + k.sum())
            x = x + apply(layer["o"], out.reshape(tokens, h))
            x = x + apply(layer["down"], apply(layer["gate"], x) * apply(layer["up"], x))
        labels = torch.tensor(row.labels[1:] + [-100], device=device)
        trained = (labels != -100).nonzero().squeeze(1)
        loss = F.cross_entropy((x[trained] @ head.T).float(), labels[trained], reduction="sum")
        loss.backward()
        return loss.item() / max(1, len(trained))

    step_ends, losses, start = [], [], time.perf_counter()
    for row in rows:
        losses.append(step(row))
        step_ends.append(time.perf_counter() - start)
    return {
        "steps": [
            {"loss": loss, "end_s": end, "tokens": sum(r.seq_lens) - r.padding, "processed": len(r.input_ids),
             "trained": r.num_trained - int(r.labels[0] != -100),
             "documents": r.seq_lens[:-1] if r.padding else list(r.seq_lens)}
            for loss, end, r in zip(losses, step_ends, rows)
        ],
        "train_call_s": step_ends[-1], "dtype": f"{dtype} weights and activations (no autocast needed)",
    }  # fmt: skip


def _transformers4_copy(model_dir: Path, copy: Path) -> Path:
    """`model_dir` as transformers 4.36 reads it: rope_theta instead of rope_parameters, a fast tokenizer class."""
    if (copy / "config.json").is_file():
        return copy
    copy.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config["torch_dtype"] = config.pop("dtype", "bfloat16")
    (copy / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer.pop("backend", None)
    tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer["additional_special_tokens"] = tokenizer.pop("extra_special_tokens", [])
    tokenizer["model_max_length"] = 4096
    (copy / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    rules = json.loads((model_dir / "tokenizer.json").read_text())  # tokenizers 0.15: merges as "a b", no ignore_merges
    rules["model"]["merges"] = [" ".join(pair) if isinstance(pair, list) else pair for pair in rules["model"]["merges"]]
    rules["model"].pop("ignore_merges", None)
    (copy / "tokenizer.json").write_text(json.dumps(rules))
    (copy / "model.safetensors").symlink_to((model_dir / "model.safetensors").resolve())
    return copy


def _counts(batch, documents: list[int]) -> dict:
    labels = batch["labels"]
    return {
        "tokens": int(sum(documents)),  # sample tokens (no padding)
        "processed": int(batch["input_ids"].numel()),  # what the model ran over, padding included
        "trained": int((labels[:, 1:] != -100).sum()),
        "documents": [int(n) for n in documents],
    }


def _sum(batches: list[dict]) -> dict:
    return {
        "tokens": sum(b["tokens"] for b in batches), "processed": sum(b["processed"] for b in batches),
        "trained": sum(b["trained"] for b in batches), "documents": [n for b in batches for n in b["documents"]],
    }  # fmt: skip


def worker_main(kind: str, spec_path: str) -> None:
    started = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    result = {"xtune": xtune_worker, "trl": trl_worker, "xtuner": xtuner_worker, "ceiling": ceiling_worker}[kind](spec)
    result["process_s"] = time.perf_counter() - started
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if spec.get("device") == "cuda":
        import torch

        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------- orchestration


PEERS = {
    "xtune_packed": ("xtune", True),
    "xtune_unpacked": ("xtune", False),
    "trl_packed": ("trl", True),
    "trl_unpacked": ("trl", False),
    "trl_packed_gc": ("trl", True),  # TRL's own default: gradient checkpointing on (SFTConfig)
    "xtuner_packed": ("xtuner", True),  # XTuner 0.1.11 in its own venv on transformers 4.36 (see xtuner_worker)
    "xtuner_packed_gc": ("xtuner", True),  # its default: activation checkpointing on
    "ceiling": ("ceiling", True),  # only the step's unavoidable arithmetic (see ceiling_worker): a bound, not a tool
    "ceiling_matmuls": ("ceiling", True),  # the same with attention taken as free
}


def run_one(name: str, repeat: int, assets: dict, plan: dict, args, out_dir: Path, compute: str) -> dict:
    tool, packed = PEERS[name]
    work_dir = out_dir / f"{name}_{repeat}"
    work_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        **assets, "packed": packed, "threads": args.threads, "work_dir": str(work_dir), "device": args.device,
        "dtype": compute, "batch_size": ROWS_PER_STEP if packed else plan["unpacked_batch_size"], "max_steps": args.max_steps,
        "steps_per_epoch": plan["steps_per_epoch"], "result": str(work_dir / "result.json"),
        "gradient_checkpointing": name.endswith("_gc"), "model": args.model, "attention": name != "ceiling_matmuls",
    }  # fmt: skip
    (work_dir / "spec.json").write_text(json.dumps(spec))
    python = {"xtune": MAIN_PYTHON, "trl": TRL_PYTHON, "xtuner": XTUNER_PYTHON, "ceiling": MAIN_PYTHON}[tool]
    env = {**os.environ, "XTUNE_HOME": str(out_dir.parent / "xtune_home"), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}  # fmt: skip
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with open(work_dir / "log.txt", "w") as log:
        code = subprocess.call(
            [str(python), __file__, "--worker", tool, "--spec", str(work_dir / "spec.json")], stdout=log, stderr=log, env=env
        )
    wall = time.perf_counter() - started
    if code != 0:
        tail = (work_dir / "log.txt").read_text()[-3000:]
        raise SystemExit(f"{name} (repeat {repeat}) failed with exit code {code}; log {work_dir / 'log.txt'}:\n{tail}")
    result = json.loads((work_dir / "result.json").read_text())
    return summarize(name, repeat, result, wall, load, args)


def summarize(name: str, repeat: int, result: dict, wall: float, load: float, args) -> dict:
    steps = result["steps"]
    steady = steps[1:]  # the first step warms up allocators and kernels
    seconds = steps[-1]["end_s"] - steps[0]["end_s"]
    tokens = sum(s["tokens"] for s in steady)
    trained = sum(s["trained"] for s in steady)
    flops = sum(model_flops(MODELS[args.model], LORA["r"], s["documents"]) for s in steady)
    tail = max(5, len(steps) // 4)
    return {
        "peer": name, "repeat": repeat, "steps": len(steps), "steady_seconds": seconds,
        "tokens_per_s": tokens / seconds, "trained_tokens_per_s": trained / seconds,
        "padding_share": 1 - sum(s["tokens"] for s in steps) / sum(s["processed"] for s in steps),
        "model_tflops_per_s": flops / seconds / 1e12,
        "epoch_tokens": sum(s["tokens"] for s in steps), "epoch_trained_tokens": sum(s["trained"] for s in steps),
        "final_loss": steps[-1]["loss"], "tail_losses": [s["loss"] for s in steps[-tail:]],
        "first_loss": steps[0]["loss"], "process_wall_s": wall,
        "peak_rss_gib": result.get("peak_gpu_gib", result["peak_rss_gib"]),  # GPU: peak allocated there
        "train_call_s": result["train_call_s"], "load_avg_at_start": load, "dtype": result.get("dtype"),
    }  # fmt: skip


def tail_mean_and_se(runs: list[dict]) -> tuple[float, float]:
    """Mean of the runs' tail losses, and its standard error from the step-to-step scatter within a run (repeats
    of one configuration are deterministic, so they add no independent samples)."""
    mean = statistics.fmean(statistics.fmean(r["tail_losses"]) for r in runs)
    scatter = statistics.fmean(statistics.stdev(r["tail_losses"]) for r in runs)
    return mean, scatter / math.sqrt(len(runs[0]["tail_losses"]))


LOSS_RELATIVE_TOLERANCE = 0.01


def loss_check(runs: list[dict]) -> dict:
    """xtune packed vs unpacked, same data, same steps per epoch, same tokens per step on average: the mean loss
    of the last quarter of the steps (at least 5) must agree within 3 standard errors of the difference (the
    step-to-step scatter of those losses, which differ in batch make-up) plus 1% of the loss (the drift that a
    different batch order alone gives the learning curve over a short run). A packing bug (attention across samples,
    labels shifted at sample boundaries, a wrong loss normalisation) moves it by far more."""
    packed = [r for r in runs if r["peer"] == "xtune_packed"]
    unpacked = [r for r in runs if r["peer"] == "xtune_unpacked"]
    if not packed or not unpacked:
        return {"checked": False}
    p_mean, p_se = tail_mean_and_se(packed)
    u_mean, u_se = tail_mean_and_se(unpacked)
    tolerance = 3 * math.hypot(p_se, u_se) + LOSS_RELATIVE_TOLERANCE * u_mean
    return {
        "checked": True, "packed_tail_loss": p_mean, "unpacked_tail_loss": u_mean,
        "difference": p_mean - u_mean, "tolerance": tolerance, "ok": abs(p_mean - u_mean) <= tolerance,
    }  # fmt: skip


def aggregate(runs: list[dict], peak: float) -> dict:
    by_peer = {}
    for name in PEERS:
        mine = [r for r in runs if r["peer"] == name]
        if not mine:
            continue
        by_peer[name] = {
            key: statistics.fmean(r[key] for r in mine)
            for key in ("tokens_per_s", "trained_tokens_per_s", "padding_share", "model_tflops_per_s", "peak_rss_gib",
                        "final_loss", "process_wall_s", "epoch_tokens", "epoch_trained_tokens", "steps")
        }  # fmt: skip
        by_peer[name]["mfu"] = by_peer[name]["model_tflops_per_s"] * 1e3 / peak
        by_peer[name]["runs"] = len(mine)
    ratios = {}
    for mode in ("packed", "unpacked"):
        ours, theirs = by_peer.get(f"xtune_{mode}"), by_peer.get(f"trl_{mode}")
        if ours and theirs:
            ratios[f"xtune/trl {mode} tokens/s"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
            ratios[f"xtune/trl {mode} trained tokens/s"] = ours["trained_tokens_per_s"] / theirs["trained_tokens_per_s"]
        # per repeat, to see the spread
        pairs = [(o, t) for o in runs for t in runs
                 if o["peer"] == f"xtune_{mode}" and t["peer"] == f"trl_{mode}" and o["repeat"] == t["repeat"]]  # fmt: skip
        if pairs:
            ratios[f"xtune/trl {mode} per repeat"] = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in pairs]
    if "xtune_packed" in by_peer and "trl_unpacked" in by_peer:
        ratios["xtune packed / trl unpacked tokens/s"] = by_peer["xtune_packed"]["tokens_per_s"] / by_peer["trl_unpacked"]["tokens_per_s"]
    ours = [by_peer[name]["trained_tokens_per_s"] for name in by_peer if name.startswith("xtune")]
    theirs = [by_peer[name]["trained_tokens_per_s"] for name in by_peer if name.startswith("trl")]
    if ours and theirs:
        ratios["xtune best / trl best trained tokens/s"] = max(ours) / max(theirs)
    if "xtune_packed" in by_peer and "trl_packed_gc" in by_peer:
        ratios["xtune packed / trl packed with its default gradient checkpointing, trained tokens/s"] = (
            by_peer["xtune_packed"]["trained_tokens_per_s"] / by_peer["trl_packed_gc"]["trained_tokens_per_s"]
        )
    for peer in ("xtuner_packed", "xtuner_packed_gc"):
        if "xtune_packed" in by_peer and peer in by_peer:
            ratios[f"xtune packed / {peer} trained tokens/s"] = (
                by_peer["xtune_packed"]["trained_tokens_per_s"] / by_peer[peer]["trained_tokens_per_s"]
            )
    for bound in ("ceiling", "ceiling_matmuls"):
        for name in (name for name in by_peer if name == "xtune_packed" or name.startswith("trl")):
            if bound in by_peer:
                ratios[f"{bound} / {name} trained tokens/s"] = (
                    by_peer[bound]["trained_tokens_per_s"] / by_peer[name]["trained_tokens_per_s"]
                )
    if "xtune_packed" in by_peer and "xtune_unpacked" in by_peer:
        ratios["xtune packed / unpacked tokens/s"] = by_peer["xtune_packed"]["tokens_per_s"] / by_peer["xtune_unpacked"]["tokens_per_s"]
    return {"by_peer": by_peer, "ratios": ratios}


def ratio_lines(ratios: dict) -> list[str]:
    """RESULTS.md's list of ratios: a list of values as they are, a single one in bold."""
    return [f"- {key}: " + (", ".join(f"{v:.2f}" for v in value) if isinstance(value, list) else f"**{value:.2f}x**")
            for key, value in ratios.items()]  # fmt: skip


def markdown(report: dict) -> str:
    args, plan, peak, dtype = report["args"], report["plan"], report["peak"], report["dtype"]
    measured = peak_dtypes(dtype)
    chosen = " (what dtype = 'auto' picks here)" if args.get("dtype", "auto") == "auto" else ""
    also = f", fp32 {peak['fp32_gflops']:.0f}" if dtype != "fp32" else ""
    on_2 = " / ".join(f"{peak[key]:.0f}" for key in (f"{name}_gflops_2_threads" for name in measured) if key in peak)
    lines = [
        f"## {report['date']}: training throughput, xtune vs TRL ({args['model']} model, "
        f"{args.get('device', 'cpu').upper()}, {dtype})",
        "",
        f"`{report['command']}` ({report['machine']}; {cpu_flags_text(report['cpu']['flags'])}; torch threads "
        f"{args['threads']}; compute dtype {dtype}{chosen}; {dtype} matmul peak on {args['threads']} thread(s) "
        f"{peak[f'{dtype}_gflops']:.0f} GFLOP/s, best of the measurements before and after the runs{also}"
        + (f"; on 2 threads {on_2}" if on_2 else "")
        + f"; load average {report['load_before']:.1f} before, {report['load_after']:.1f} after)",
        "",
        f"Data: {plan['samples']} samples, {plan['tokens']:,} tokens ({plan['trained_tokens']:,} trained), lengths "
        f"{plan['min_length']}-{plan['max_length']} (median {plan['median_length']:.0f}); packed: {plan['packed_rows']} rows of "
        f"{MAX_LENGTH} ({plan['packing_efficiency']:.1%} sample tokens), {ROWS_PER_STEP} row(s) a step; unpacked: "
        f"{plan['unpacked_batch_size']} samples a step. Runs interleaved in the order {', '.join(args['peers'])}, "
        f"{args['repeats']}x.",
        "",
        f"| run | steps | tokens/s | trained tokens/s | padding | MFU | {'peak GPU allocated' if args.get('device') == 'cuda' else 'peak RSS'} | final loss | process wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["summary"]["by_peer"].items():
        lines.append(
            f"| {name} | {row['steps']:.0f} | {row['tokens_per_s']:,.0f} | {row['trained_tokens_per_s']:,.0f} | "
            f"{row['padding_share']:.1%} | {row['mfu']:.1%} | {row['peak_rss_gib']:.2f} GiB | {row['final_loss']:.3f} | "
            f"{row['process_wall_s']:.0f} |"
        )
    lines.append("")
    lines += ratio_lines(report["summary"]["ratios"])
    check = report["loss_check"]
    if check["checked"]:
        lines.append(
            f"- loss check (xtune packed vs unpacked, mean of the last quarter of steps): {check['packed_tail_loss']:.3f} vs "
            f"{check['unpacked_tail_loss']:.3f}, difference {check['difference']:+.3f}, tolerance {check['tolerance']:.3f}: "
            f"{'ok' if check['ok'] else 'FAILED'}"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="28m")
    parser.add_argument("--peers", default="xtune_packed,trl_packed,xtune_unpacked,trl_unpacked")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps (else one epoch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: every tool trains on the GPU; memory is the peak allocated there (see --model 1.8b)")
    parser.add_argument("--dtype", choices=["auto", *TORCH_DTYPES], default="auto",
                        help="compute dtype of every peer; auto: what xtune's dtype = 'auto' picks here")
    parser.add_argument("--work-dir", default=str(BENCH / "runs"))
    parser.add_argument("--out", default=None, help="JSON report (default: <work-dir>/train_throughput_<model>.json)")
    parser.add_argument("--append-results", action="store_true", help="append the markdown tables to benchmarks/RESULTS.md")
    parser.add_argument("--worker", choices=["xtune", "trl", "xtuner", "ceiling"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker, args.spec)

    peers = args.peers.split(",")
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {sorted(PEERS)}")
    if any(p.startswith("trl") for p in peers):
        ensure_trl_venv(args.device)
    if any(PEERS[peer][0] == "xtuner" for peer in peers):
        ensure_xtuner_venv()
    work = Path(args.work_dir)
    assets = build_assets(work / "assets", args.model, args.samples, args.seed)
    plan = plan_batches(assets)
    print(json.dumps({"plan": plan}), flush=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    load_before = os.getloadavg()[0]
    out_dir = work / f"{args.model}_{stamp}"
    from xtune.engine.device import cpu_flags

    compute = compute_dtype(args.device, args.dtype)
    cpu = {"model": cpu_name(), "flags": sorted(cpu_flags() & set(CPU_FLAGS), key=CPU_FLAGS.index)}
    print(json.dumps({"dtype": compute, "cpu": cpu}), flush=True)
    peaks = [peak_both(args.threads, args.device, compute)]
    runs = []
    for repeat in range(args.repeats):
        for name in peers:
            summary = run_one(name, repeat, assets, plan, args, out_dir, compute)
            runs.append(summary)
            print(json.dumps({k: v for k, v in summary.items() if k != "tail_losses"}), flush=True)
    peaks.append(peak_both(args.threads, args.device, compute))
    peak = {key: max(p[key] for p in peaks) for key in peaks[0]}  # the best the machine did: a conservative MFU
    report = {
        "date": datetime.date.today().isoformat(), "load_before": load_before, "load_after": os.getloadavg()[0],
        "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {cpu_name()}", "cpu": cpu,
        "dtype": compute,
        "args": {**vars(args), "peers": peers}, "plan": plan, "peak": peak, "peaks": peaks, "runs": runs,
        "summary": aggregate(runs, peak[f"{compute}_gflops"]), "loss_check": loss_check(runs), "versions": versions(),
    }  # fmt: skip
    out = Path(args.out) if args.out else work / f"train_throughput_{args.model}.json"
    out.write_text(json.dumps(report, indent=1))
    text = markdown(report)
    print(text)
    if args.append_results:
        with open(BENCH / "RESULTS.md", "a") as results:
            results.write("\n" + text)
    if report["loss_check"]["checked"] and not report["loss_check"]["ok"]:
        check = report["loss_check"]
        raise SystemExit(
            f"LOSS CHECK FAILED: xtune packed ends at {check['packed_tail_loss']:.4f}, unpacked at "
            f"{check['unpacked_tail_loss']:.4f} (difference {check['difference']:+.4f} > tolerance {check['tolerance']:.4f})"
        )


def cpu_flags_text(flags: list[str]) -> str:
    """Which of `CPU_FLAGS` the CPU has: `CPU flags avx2, avx512f (no avx512_bf16, amx_bf16, amx_tile, amx_int8)`."""
    missing = [flag for flag in CPU_FLAGS if flag not in flags]
    return f"CPU flags {', '.join(flags) or 'none'}" + (f" (no {', '.join(missing)})" if missing else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def versions() -> dict:
    found = {}
    for python, names in ((MAIN_PYTHON, "torch transformers peft xtune"), (TRL_PYTHON, "torch transformers peft trl"),
                          (XTUNER_PYTHON, "torch transformers peft xtuner mmengine")):
        if python.is_file():
            code = f"import importlib.metadata as m; print({{n: m.version(n) for n in {names.split()!r}}})"
            found[str(python.relative_to(ROOT))] = subprocess.run(
                [str(python), "-c", code], capture_output=True, text=True
            ).stdout.strip()
    return found


if __name__ == "__main__":
    main()
