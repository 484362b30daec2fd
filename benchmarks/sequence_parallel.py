"""Per-rank peak memory and tokens/s of one long packed row at sequence_parallel_size 1 and 2 (Ulysses, gloo
processes on this CPU), the largest row that fits a per-rank activation budget, and (`--shape internlm2_1_8b`) the
activation memory per token per layer of the InternLM2-1.8B width, extrapolated to 24 layers and an 80 GB GPU.

    python benchmarks/sequence_parallel.py [--shape small] [--tokens 4096,8192,16384] [--sizes 1,2]
        [--checkpointing off] [--sample-tokens 4096] [--threads 1] [--budget-gib 2]
    python benchmarks/sequence_parallel.py --shape internlm2_1_8b --layers 1,2 --tokens 4096,8192 \
        --checkpointing off,on --steps 1
    python benchmarks/sequence_parallel.py --from-reports A.json,B.json   # the extrapolation of several invocations

Each setting (size, row length, layers, checkpointing) runs in fresh processes, one per rank of the group, started
as tests/engine/sequence_parallel_worker.py is (RANK, WORLD_SIZE, MASTER_ADDR/PORT; gloo). A rank builds the model
with random weights (a Llama: `small` is hidden 512, 8 layers, 8 heads, 4 key-value heads, intermediate 1,536,
vocab 32,000, 58M parameters; `internlm2_1_8b` is InternLM2-1.8B's width with `--layers` layers) in the compute
dtype `dtype = "auto"` picks here (`xtune.engine.device.resolve_dtype`: bf16 with AVX512-BF16 or AMX, else fp32),
the packed (varlen) attention in its Ulysses form, LoRA from xtune's defaults (r 64, alpha 16, dropout 0.1, every
linear layer but the head), optionally gradient checkpointing, xtune's fused AdamW and fused loss, as
`xtune train` sets them up. The step is the loop's: the row (`--sample-tokens` samples a row, each wholly trained)
cut into this rank's shard (`sequence_parallel.shard`), `next_token_loss_sum` under autocast, backward of the loss
over the whole row's trained tokens, the LoRA gradients summed over the group (what DDP's all-reduce does), the
optimizer step.

Memory is the process's resident set from /proc/self/status: a first step on a 256-token row allocates the optimizer
state and the lazily made buffers, then `baseline` is VmRSS (model, LoRA, gradients, Adam state) and VmHWM is reset
(/proc/self/clear_refs); `peak` is VmHWM after the first long step and `activation = peak - baseline`. glibc's
MALLOC_MMAP_THRESHOLD_ is fixed at 64 KiB in the workers so that large blocks return to the system when freed and
RSS follows the live tensors. tokens/s is the row's tokens (the whole row, not the shard) over the wall time of the
steps after the first long one.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SHAPES = {
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000),
    "internlm2_1_8b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                           num_key_value_heads=8, vocab_size=92544),
}  # fmt: skip
GPU_BYTES = 80e9
"""An 80 GB GPU (H100/A100 80GB: 80 GB as its maker counts, ~79.6 GiB usable less the CUDA context)."""


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def packed_row(tokens: int, sample_tokens: int, vocab: int, seed: int = 0) -> dict:
    import torch

    from xtune.data.packing import PackedRow, collate_packed

    lengths = [min(sample_tokens, tokens - start) for start in range(0, tokens, sample_tokens)]
    ids = torch.randint(3, vocab, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    positions = [position for length in lengths for position in range(length)]
    return collate_packed([PackedRow(ids, ids, positions, lengths, padding=0)])


def worker(args) -> dict:
    import torch
    import torch.distributed as dist
    from peft.helpers import disable_input_dtype_casting
    from transformers import LlamaConfig, LlamaForCausalLM

    from xtune.config.schema import Config
    from xtune.engine import sequence_parallel
    from xtune.engine.device import resolve_dtype
    from xtune.engine.distributed import Ranks
    from xtune.engine.loss import FusedHead, next_token_loss_sum, next_token_targets, pop_labels
    from xtune.engine.optim import build_optimizer
    from xtune.models.attention import use_varlen_attention
    from xtune.models.lora import prepare_trainable

    torch.set_num_threads(args.threads)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if size > 1 else 0
    sp = sequence_parallel.setup(Ranks(rank, size, rank), size)
    device = torch.device("cpu")
    dtype = resolve_dtype("auto", device)
    shape = {**SHAPES[args.shape], "num_hidden_layers": args.worker_layers}
    config = LlamaConfig(**shape, max_position_embeddings=max(args.worker_tokens, 4096), rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # the base made in the compute dtype directly, as load_model(dtype=...) loads it
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    use_varlen_attention(model)
    sequence_parallel.use_ulysses(model, sp)
    train_config = Config(llm_name_or_path="random", data_path="-")
    model = prepare_trainable(model, train_config)
    if args.worker_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, train_config, device)
    low_precision = dtype != torch.float32
    autocast = torch.autocast("cpu", dtype=dtype) if low_precision else torch.autocast("cpu", enabled=False)
    fused = FusedHead.of(model)

    def step(row: dict) -> float:
        batch = sequence_parallel.shard(row, size, sp.rank) if size > 1 else dict(row)
        labels, shifted = pop_labels(batch)
        num_trained = next_token_targets(row["labels"])[1].numel()  # the whole row's
        loss = next_token_loss_sum(model, batch, labels, autocast, fused, 0.0, shifted)
        (loss * size / num_trained).backward()  # the group's all-reduce below averages: its sum is the row's gradient
        if size > 1:
            for parameter in trainable:
                dist.all_reduce(parameter.grad)
                parameter.grad /= size
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    with disable_input_dtype_casting(model, active=low_precision):
        step(packed_row(256, 256, shape["vocab_size"], seed=1))
        if size > 1:
            dist.barrier()
        baseline = status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        row = packed_row(args.worker_tokens, args.sample_tokens, shape["vocab_size"])
        started = time.perf_counter()
        losses = [step(row)]
        first_s = time.perf_counter() - started
        peak = status_bytes("VmHWM")
        started = time.perf_counter()
        for _ in range(args.steps - 1):
            losses.append(step(row))
        steady_s = (time.perf_counter() - started) / max(args.steps - 1, 1) if args.steps > 1 else first_s
    if size > 1:
        dist.destroy_process_group()
    return {
        "rank": rank, "baseline_gib": baseline / 2**30, "peak_gib": peak / 2**30,
        "activation_gib": (peak - baseline) / 2**30, "first_step_s": first_s, "step_s": steady_s,
        "loss_sum": losses, "parameters": parameters, "trainable": sum(p.numel() for p in trainable),
        "dtype": str(dtype).removeprefix("torch."), "trained": next_token_targets(row["labels"])[1].numel(),
    }  # fmt: skip


def run_setting(args, size: int, tokens: int, layers: int, checkpointing: bool) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = Path(tempfile.mkdtemp(prefix="sequence_parallel_"))  # each invocation its own: they may run side by side
    processes = []
    for rank in range(size):
        environment = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(args.threads),
                       "MALLOC_MMAP_THRESHOLD_": "65536"}  # fmt: skip
        command = [sys.executable, __file__, "--shape", args.shape, "--threads", str(args.threads), "--steps",
                   str(args.steps), "--sample-tokens", str(args.sample_tokens), "--worker-tokens", str(tokens),
                   "--worker-layers", str(layers), *(["--worker-checkpointing"] if checkpointing else []),
                   "--worker-out", str(out / f"rank{rank}.json")]  # fmt: skip
        processes.append(subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True))  # fmt: skip
    logs = [process.communicate()[1] for process in processes]
    if any(process.returncode for process in processes):
        raise SystemExit(f"size {size}, {tokens} tokens failed:\n" + "\n".join(log[-3000:] for log in logs))
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(size)]
    shutil.rmtree(out)
    step_s = max(r["step_s"] for r in ranks)
    return {
        "shape": args.shape, "layers": layers, "size": size, "tokens": tokens, "tokens_per_rank": tokens // size,
        "sample_tokens": args.sample_tokens, "gradient_checkpointing": checkpointing, "threads_per_rank": args.threads,
        "dtype": ranks[0]["dtype"], "parameters": ranks[0]["parameters"], "trainable": ranks[0]["trainable"],
        "baseline_gib": max(r["baseline_gib"] for r in ranks), "peak_gib": max(r["peak_gib"] for r in ranks),
        "activation_gib": max(r["activation_gib"] for r in ranks), "step_s": step_s, "tokens_per_s": tokens / step_s,
        "first_step_s": max(r["first_step_s"] for r in ranks),
        "loss_per_token": sum(r["loss_sum"][0] for r in ranks) / ranks[0]["trained"],
        "load_average": os.getloadavg()[0],
    }  # fmt: skip


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares activation = intercept + slope * tokens_per_rank."""
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    if n == 1:
        return 0.0, mean_y / mean_x
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


def budget_summary(results: list[dict], budget_gib: float) -> list[dict]:
    summary = []
    for size, checkpointing in sorted({(r["size"], r["gradient_checkpointing"]) for r in results}):
        mine = [r for r in results if r["size"] == size and r["gradient_checkpointing"] == checkpointing]
        intercept, slope = fit([(r["tokens_per_rank"], r["activation_gib"]) for r in mine])
        fitting = [r["tokens"] for r in mine if r["activation_gib"] <= budget_gib]
        summary.append({
            "size": size, "gradient_checkpointing": checkpointing, "budget_gib": budget_gib,
            "activation_mib_per_1k_tokens_per_rank": slope * 1024 * 1024, "intercept_gib": intercept,
            "largest_measured_row_within_budget": max(fitting, default=None),
            "largest_row_by_fit": int((budget_gib - intercept) / slope * size),
        })  # fmt: skip
    return summary


def extrapolate(results: list[dict], layers_target: int = 24, gpu_bytes: float = GPU_BYTES) -> list[dict]:
    """Per rank, activation(L layers, t tokens a rank) = fixed + L * per_layer_fixed + t * (rest + L * per_layer),
    fitted on runs at 1 and 2 layers, each at two row lengths: `per_layer` (bytes a token a layer: what a layer saves
    for the backward; with checkpointing its input), `per_layer_fixed` (a layer's LoRA gradients, allocated in the
    step, and what the optimizer step and all-reduce make of them), `rest` (embeddings, final norm, the loss's
    hidden-state gradient; with checkpointing the one layer recomputed at a time) and `fixed` (the fused loss's chunk
    of logits). Then, for an 80 GB GPU:
        max_length = size * (80 GB - weights - LoRA state - fixed - 24 * per_layer_fixed) / (rest + 24 * per_layer)
    with weights the bf16 base and LoRA state its fp32 weights and Adam's two moments (the gradients are measured).
    With checkpointing, `per_layer` is at least the layer's bf16 input (hidden_size * 2 bytes a token)."""
    out = []
    for size, checkpointing in sorted({(r["size"], r["gradient_checkpointing"]) for r in results}):
        mine = [r for r in results if (r["size"], r["gradient_checkpointing"]) == (size, checkpointing)]
        runs = {layers: {r["tokens_per_rank"]: r for r in mine if r["layers"] == layers} for layers in (1, 2)}
        if len(runs[1]) < 2 or len(runs[2]) < 2:
            continue
        (c1, s1), (c2, s2) = (fit([(t, r["activation_gib"] * 2**30) for t, r in runs[n].items()]) for n in (1, 2))
        per_layer, per_layer_fixed = s2 - s1, c2 - c1
        rest, fixed = s1 - per_layer, c1 - per_layer_fixed
        measured_per_layer = per_layer
        if checkpointing:  # a checkpointed layer holds at least its bf16 input for the backward: a fit below is noise
            per_layer = max(per_layer, 2 * SHAPES["internlm2_1_8b"]["hidden_size"])
        one, two = next(iter(runs[1].values())), next(iter(runs[2].values()))
        weights = 2 * (one["parameters"] + (layers_target - 1) * (two["parameters"] - one["parameters"]))  # bf16
        lora = one["trainable"] + (layers_target - 1) * (two["trainable"] - one["trainable"])
        lora_state = lora * 4 * 3  # fp32 weights and Adam's two moments
        per_token = rest + layers_target * per_layer
        held = weights + lora_state + fixed + layers_target * per_layer_fixed
        out.append({
            "size": size, "gradient_checkpointing": checkpointing, "row_lengths_per_rank": sorted(runs[1]),
            "per_layer_kib_per_token": per_layer / 1024, "measured_per_layer_kib_per_token": measured_per_layer / 1024,
            "per_layer_fixed_mib": per_layer_fixed / 2**20,
            "rest_kib_per_token": rest / 1024, "fixed_gib": fixed / 2**30,
            "per_token_24_layers_kib": per_token / 1024, "weights_gb": weights / 1e9, "lora_parameters": lora,
            "lora_state_gb": lora_state / 1e9, "held_before_tokens_gb": held / 1e9,
            "max_length_80gb": int(size * (gpu_bytes - held) / per_token) // 1024 * 1024,
        })  # fmt: skip
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--tokens", default="4096,8192,16384", help="row lengths, comma-separated")
    parser.add_argument("--sizes", default="1,2", help="sequence_parallel_size values (processes), comma-separated")
    parser.add_argument("--layers", default=None, help="decoder layers, comma-separated (default: the shape's)")
    parser.add_argument("--checkpointing", default="off", help="gradient checkpointing: off, on or off,on")
    parser.add_argument("--sample-tokens", type=int, default=4096, help="tokens a sample (the row's last may be shorter)")
    parser.add_argument("--steps", type=int, default=2, help="steps on the long row (the first is not timed)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads a rank")
    parser.add_argument("--budget-gib", type=float, default=2.0, help="per-rank activation budget")
    parser.add_argument("--out", default=None)
    parser.add_argument("--from-reports", default=None, help="reports (JSON) of earlier invocations, comma-separated: "
                        "print the extrapolation of their results together, run nothing")  # fmt: skip
    for hidden in ("--worker-tokens", "--worker-layers"):
        parser.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        Path(args.worker_out).write_text(json.dumps(worker(args)))
        return
    if args.from_reports:
        results = [r for path in args.from_reports.split(",") for r in json.loads(Path(path).read_text())["results"]]
        for line in extrapolate(results):
            print(json.dumps(line))
        return
    flags = set(Path("/proc/cpuinfo").read_text().split()) & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2"}
    print(json.dumps({"cpu_flags": sorted(flags), "load_average": os.getloadavg(), "threads_per_rank": args.threads}))
    layers = [int(x) for x in args.layers.split(",")] if args.layers else [SHAPES[args.shape]["num_hidden_layers"]]
    results = []
    for checkpointing in [c == "on" for c in args.checkpointing.split(",")]:
        for layer_count in layers:
            for tokens in [int(x) for x in args.tokens.split(",")]:
                for size in [int(x) for x in args.sizes.split(",")]:
                    results.append(run_setting(args, size, tokens, layer_count, checkpointing))
                    print(json.dumps(results[-1]), flush=True)
    report = {"cpu_flags": sorted(flags), "results": results}
    for result in results:
        if result["size"] > 1:
            base = [r for r in results if r["size"] == 1 and all(r[k] == result[k] for k in
                    ("tokens", "layers", "gradient_checkpointing"))]  # fmt: skip
            if base:
                result["activation_ratio_to_size_1"] = result["activation_gib"] / base[0]["activation_gib"]
                result["tokens_per_s_ratio_to_size_1"] = result["tokens_per_s"] / base[0]["tokens_per_s"]
                print(json.dumps({k: result[k] for k in ("size", "tokens", "layers", "gradient_checkpointing",
                                  "activation_ratio_to_size_1", "tokens_per_s_ratio_to_size_1")}))  # fmt: skip
    if args.shape == "internlm2_1_8b":
        report["extrapolation"] = extrapolate(results)
    else:
        report["budget"] = budget_summary(results, args.budget_gib)
    for line in report.get("extrapolation", report.get("budget")):
        print(json.dumps(line))
    print(json.dumps({"load_average_end": os.getloadavg()}))
    out = Path(args.out or BENCH / "runs" / f"sequence_parallel_{args.shape}.json")
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
