"""GPU checks, run by hand on a CUDA machine (CI has no GPU):

1. varlen: packed rows through PyTorch's flash-attention varlen kernel give the same per-token loss as
   each sample alone, and as the per-sample SDPA path used on CPU.
2. train: the tiny LoRA job in bf16 on the GPU, packed and unpacked (tokens/s, final loss).
3. qlora: one QLoRA step (NF4 + double quantization, LoRA r=64 on all linear layers) of an
   InternLM2-1.8B-shaped Llama with random weights at 2048 tokens: peak allocated memory, with and
   without gradient checkpointing.

    python benchmarks/gpu_check.py --out results.json [--skip-qlora]
"""

import argparse
import io
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from xtune.config.load import load_config
from xtune.config.schema import Config
from xtune.data.encode import IGNORE_INDEX, Encoded
from xtune.data.packing import collate_packed, pack
from xtune.engine.optim import build_optimizer
from xtune.engine.loss import FusedHead, next_token_loss_sum
from xtune.engine.train import train
from xtune.models import attention
from xtune.models.load import load_model, resolve_model_path
from xtune.models.lora import prepare_trainable

INTERNLM2_1_8B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
    num_key_value_heads=8, vocab_size=92544, max_position_embeddings=32768, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=False,
)  # fmt: skip


def per_token_losses(model, batch):
    inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0].float()
    return F.cross_entropy(logits[:-1], batch["labels"][0, 1:].cuda(), ignore_index=IGNORE_INDEX, reduction="none")


def check_varlen() -> dict:
    model = load_model(resolve_model_path("xtune-tiny/internlm2-chat"), dtype=torch.bfloat16, device="cuda")
    attention.use_varlen_attention(model)
    rng = random.Random(1)
    documents = [[1] + [rng.randrange(3, 2000) for _ in range(n)] for n in (300, 70, 190, 440, 120, 33, 800)]
    samples = [Encoded(ids, [IGNORE_INDEX] * 2 + ids[2:]) for ids in documents]
    batch = collate_packed(pack(samples, max_length=1024, pad_token_id=2))
    flash = per_token_losses(model, batch)
    kernel = attention.varlen_attn
    attention.varlen_attn = None
    per_segment = per_token_losses(model, batch)
    attention.varlen_attn = kernel
    labels = batch["labels"][0, 1:].cuda()
    trained = labels != IGNORE_INDEX
    alone = []
    rows = batch["input_ids"][0].tolist()
    for start, end in zip(batch["cu_seq_lens_q"][:-1].tolist(), batch["cu_seq_lens_q"][1:].tolist()):
        segment = rows[start:end]
        match = next((s for s in samples if s.input_ids == segment), None)
        if match is None:
            continue
        losses = per_token_losses(model, {"input_ids": torch.tensor([segment]), "labels": torch.tensor([match.labels])})
        inside = flash[start : end - 1]
        mask = torch.tensor(match.labels[1:], device="cuda") != IGNORE_INDEX
        alone.append((inside[mask] - losses[mask]).abs().max().item())
    return {
        "kernel": "torch.nn.attention.varlen.varlen_attn" if kernel is not None else "none (per-sample SDPA)",
        "max_abs_diff_flash_vs_alone_bf16": max(alone),
        "max_abs_diff_flash_vs_per_sample_sdpa_bf16": (flash[trained] - per_segment[trained]).abs().max().item(),
        "mean_loss": flash[trained].mean().item(),
    }


def check_varlen_kernel() -> dict:
    """Attention outputs alone: the flash varlen path in bf16 against an fp32 per-sample reference, and
    the gap a leak across samples would make."""
    torch.manual_seed(0)
    lengths = [300, 70, 190, 440, 24]
    cu = torch.tensor([0, *lengths]).cumsum(0)
    query = torch.randn(1, 16, sum(lengths), 128, device="cuda", dtype=torch.bfloat16)
    key, value = (torch.randn(1, 8, sum(lengths), 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    module = torch.nn.Module().eval()
    flash, _ = attention.varlen_attention_forward(module, query, key, value, None, cu_seq_lens_q=cu, max_length_q=max(lengths))
    q32, k32, v32 = (t.float() for t in (query, key, value))
    reference = torch.cat(
        [F.scaled_dot_product_attention(q32[:, :, a:b], k32[:, :, a:b], v32[:, :, a:b], is_causal=True, enable_gqa=True)
         for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=2,
    ).transpose(1, 2)  # fmt: skip
    leaky = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True, enable_gqa=True).transpose(1, 2)
    return {
        "max_abs_diff_vs_fp32_reference": (flash.float() - reference).abs().max().item(),
        "max_abs_diff_if_attention_leaked": (leaky - reference).abs().max().item(),
    }


def train_speed(work_dir: Path, device: str = "cuda") -> dict:
    """The tiny LoRA demo job, unpacked (batches of 8 samples) and packed (3 rows of 256 tokens)."""
    results = {}
    for packed in (False, True):
        overrides = [f"work_dir={str(work_dir / str(packed))!r}", f"device={device!r}", f"pack_to_max_length={packed}"]
        overrides += ["batch_size=3", "max_length=256"] if packed else []
        config, _ = load_config("tiny_internlm2_chat_lora_antonyms", overrides)
        console = Console(file=io.StringIO())
        start = time.perf_counter()
        result = train(config, console)
        elapsed = time.perf_counter() - start
        metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        last = [m for m in metrics if "loss" in m][-1]
        results["packed" if packed else "unpacked"] = {
            "seconds": elapsed, "steps": len(result.losses), "final_loss": result.losses[-1],
            "tokens_per_s": last["tokens_per_s"], "trained_tokens": last["trained_tokens"],
            "trained_tokens_per_s": last["trained_tokens_per_s"],
        }  # fmt: skip
    return results


def qlora_step(folder: Path, checkpointing: bool, tokens: int = 2048, optim_type: str = "adamw") -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = load_model(folder, dtype=torch.bfloat16, quantization="4bit", device="cuda")
    config = Config(
        llm_name_or_path=str(folder), data_path="x", lora_r=64, lora_alpha=16, lora_dropout=0.1, optim_type=optim_type
    )
    model = prepare_trainable(model, config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], config, torch.device("cuda"))
    loaded = torch.cuda.memory_allocated()
    ids = torch.randint(3, INTERNLM2_1_8B["vocab_size"], (1, tokens), device="cuda")
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
        loss = next_token_loss_sum(model, {"input_ids": ids}, ids, autocast, FusedHead.of(model)) / (tokens - 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated()
    del model, optimizer, loss
    return {
        "gradient_checkpointing": checkpointing, "tokens": tokens, "optim_type": optim_type,
        "weights_loaded_gib": loaded / 2**30, "peak_allocated_gib": peak / 2**30,
        "step_seconds": min(times), "tokens_per_s": tokens / min(times),
    }  # fmt: skip


def qlora_memory(folder: Path) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**INTERNLM2_1_8B, initializer_range=0.02)).to(torch.bfloat16)
        model.save_pretrained(folder)
        del model
    runs = [qlora_step(folder, True, optim_type=optim) for optim in ("adamw", "paged_adamw_8bit")]
    return runs + [qlora_step(folder, False)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--work-dir", default="/tmp/xtune_gpu_check")
    parser.add_argument("--skip-qlora", action="store_true")
    parser.add_argument("--cpu-train-only", action="store_true", help="only the tiny training job, on the CPU")
    parser.add_argument("--qlora-only", action="store_true")
    args = parser.parse_args()
    work_dir = Path(args.work_dir)
    if args.cpu_train_only:
        print(json.dumps(train_speed(work_dir, "cpu"), indent=1))
        return
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    skip = {"varlen_kernel", "varlen", "train"} if args.qlora_only else set()
    for name, run in [
        ("varlen_kernel", check_varlen_kernel),
        ("varlen", check_varlen),
        ("train", lambda: train_speed(work_dir)),
        ("qlora_internlm2_1_8b_shape", None if args.skip_qlora else lambda: qlora_memory(work_dir / "llama_1_8b")),
    ]:
        if run is None or name in skip:
            continue
        try:
            results[name] = run()
        except Exception as error:  # record and go on: each check stands alone
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps({name: results[name]}, indent=1), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
