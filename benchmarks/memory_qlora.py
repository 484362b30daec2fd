"""Peak memory of one QLoRA step of an InternLM2-1.8B-shaped model at 2,048 tokens, with and without gradient
checkpointing, each setting in a fresh process.

    python benchmarks/memory_qlora.py [--layers 24] [--tokens 2048] [--settings gc,no_gc,gc_full_logits]

The model is a Llama with InternLM2-1.8B's shape (hidden 2048, 16 heads, 8 key-value heads, intermediate 8192,
vocab 92,544; `--layers` of them, 24 in the real model) and random bf16 weights, saved once as a Hugging Face
folder and loaded through xtune's own `load_model(..., quantization="4bit")` (NF4, double quantization, bf16
compute), LoRA r=64 on every linear layer but the head (xtune's `prepare_trainable`), xtune's fused AdamW, one
sequence of `--tokens` tokens (every position trained), bf16 autocast, xtune's loss
(`xtune.engine.loss.next_token_loss_sum`: head and cross-entropy fused, chunk by chunk).

On a GPU it reports `torch.cuda.max_memory_allocated`. On a CPU it reports the process's resident memory: the
peak of the step alone (VmHWM after resetting it through /proc/self/clear_refs once the model is loaded), the
memory held before the step, and the whole process's peak (loading included). Before the step, weights still
backed by the checkpoint's memory map become private copies and the map is dropped (see `private_copies`), so
that the step's peak is what the step needs, not pages of the bf16 checkpoint file.

On a CPU a 24-layer step takes minutes; `--layers 4` and `--layers 8` give the per-layer slope, and the 24-layer
figure is extrapolated linearly (every per-layer term, 4-bit weights, LoRA weights, gradients and Adam state,
saved activations, is linear in the layer count; the head, embeddings and loss are not per layer).
Settings: `gc` / `no_gc` (gradient checkpointing on / off), `gc_full_logits` / `no_gc_full_logits` (the loss
as xtune computed it before `xtune.engine.loss`: the whole [tokens, vocab] logits, then fp32 cross-entropy).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
INTERNLM2_1_8B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
    num_key_value_heads=8, vocab_size=92544, max_position_embeddings=32768, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=False,
)  # fmt: skip


def build_folder(folder: Path, layers: int) -> Path:
    """Random bf16 weights (normal, std 0.02), written without ever holding an fp32 copy."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(**{**INTERNLM2_1_8B, "num_hidden_layers": layers}, bos_token_id=1, eos_token_id=2)
    torch.set_default_dtype(torch.bfloat16)  # allocate bf16 directly: no fp32 copy of 1.8B weights
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model = model.to_empty(device="cpu")  # rotary inv_freq is not saved: loading recomputes it
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    staging = folder.with_suffix(".partial")
    model.save_pretrained(staging)
    staging.rename(folder)
    return folder


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def private_copies(model) -> None:
    """Weights still backed by the checkpoint's memory map (the bf16 embeddings and head, norms) become private
    copies and the map is dropped: otherwise resident pages of the file, including those of weights that were
    quantized and are never read again, count in the process's RSS."""
    import gc

    import torch

    with torch.no_grad():
        for module in model.modules():
            for name, parameter in module.named_parameters(recurse=False):
                if not hasattr(parameter, "quant_state"):  # bitsandbytes' 4-bit weights are private already
                    parameter.data = parameter.data.clone()
            for name, buffer in list(module.named_buffers(recurse=False)):
                module._buffers[name] = buffer.clone()
    gc.collect()


def step(folder: Path, setting: str, tokens: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from xtune.config.schema import Config
    from xtune.engine.loss import FusedHead, next_token_loss_sum
    from xtune.engine.optim import build_optimizer
    from xtune.models.load import load_model
    from xtune.models.lora import prepare_trainable

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    checkpointing = not setting.startswith("no_gc")
    full_logits = setting.endswith("full_logits")
    started = time.perf_counter()
    model = load_model(folder, dtype=torch.bfloat16, quantization="4bit", device=device)
    config = Config(llm_name_or_path=str(folder), data_path="-", lora_r=64, lora_alpha=16, lora_dropout=0.1)
    model = prepare_trainable(model, config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], config, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not cuda:
        private_copies(model)
    load_s = time.perf_counter() - started
    ids = torch.randint(3, INTERNLM2_1_8B["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = status_kib("VmRSS") * 1024
        before_anon = status_kib("RssAnon") * 1024
        before_file = status_kib("RssFile") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    started = time.perf_counter()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    if full_logits:
        with autocast:
            logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="mean")
    else:
        loss = next_token_loss_sum(model, {"input_ids": ids}, ids, autocast, FusedHead.of(model)) / (tokens - 1)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {
        "setting": setting, "gradient_checkpointing": checkpointing, "full_logits_loss": full_logits,
        "layers": model.config.num_hidden_layers, "tokens": tokens, "trainable_parameters": trainable,
        "loss": loss.item(), "load_s": load_s, "step_s": seconds, "device": str(device),
    }  # fmt: skip
    if cuda:
        result |= {"before_step_gib": before / 2**30, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    else:
        result |= {
            "before_step_rss_gib": before / 2**30, "before_step_anon_gib": before_anon / 2**30,
            "before_step_file_gib": before_file / 2**30,
            "step_peak_rss_gib": status_kib("VmHWM") / 2**20,
            "process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }  # fmt: skip
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--settings", default="gc,no_gc")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--folder", default=None, help="model folder (default: benchmarks/runs/assets/internlm2_1_8b_shape_<layers>l)")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--malloc-mmap-threshold", type=int, default=None,
        help="set glibc's MALLOC_MMAP_THRESHOLD_ in the step's process (e.g. 65536): large blocks then go back to "
        "the system when freed, so RSS follows the live tensors instead of the allocator's high-water mark",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.folder or BENCH / "runs" / "assets" / f"internlm2_1_8b_shape_{args.layers}l")
    if args.worker:
        print(json.dumps(step(folder, args.worker, args.tokens, args.threads)), flush=True)
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    build_folder(folder, args.layers)
    print(json.dumps({"built_or_found": str(folder), "seconds": time.perf_counter() - started}), flush=True)
    results = []
    for setting in args.settings.split(","):
        command = [sys.executable, __file__, "--worker", setting, "--layers", str(args.layers), "--tokens",
                   str(args.tokens), "--threads", str(args.threads), "--folder", str(folder)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        if args.malloc_mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{setting} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]) | {"malloc_mmap_threshold": args.malloc_mmap_threshold})
        print(json.dumps(results[-1]), flush=True)
    suffix = "" if args.malloc_mmap_threshold is None else f"_mmap{args.malloc_mmap_threshold}"
    out = Path(args.out or BENCH / "runs" / f"memory_qlora_{args.layers}l{suffix}.json")
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
