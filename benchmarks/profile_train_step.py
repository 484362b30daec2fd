"""Where xtune's training step spends its time, and what the levers of issue #8 buy, on the CPU.

    python benchmarks/profile_train_step.py [--model 100m] [--rounds 3] [--threads 1]
    python benchmarks/profile_train_step.py --levers baseline,compile --rounds 4   # torch.compile, alone

The step is xtune's, piece by piece (`xtune.engine.train`'s loop: forward under bf16 autocast with its loss,
`xtune.engine.loss.next_token_loss_sum` (fused head + cross-entropy), backward, gradient clipping, fused AdamW), on packed rows of 2,048 tokens of the
benchmark's synthetic chat data (benchmarks/train_throughput.py), model and LoRA (r=16, all linear layers) as
xtune's `load_model`, `use_varlen_attention` and `prepare_trainable` build them. Timers split forward (with
the loss; the fused loss makes the head's gradients there too), backward and optimizer; torch.profiler attributes one baseline step to operator groups.

Levers, each a patch in this process (nothing in src/ changes), measured on the very same batches, the levers
interleaved within each round so that the load of other processes falls on all of them alike:
- `baseline`: as xtune trains today;
- `unfused_loss`: `fused_loss = False`: the head's logits for the trained positions only, then cross-entropy;
- `full_logits_loss`: logits for every position, then cross-entropy over the trained ones (xtune before
  `xtune.engine.loss`);
- `no_lora_dropout`: LoRA's input dropout (xtune's `FastDropout`, p=0.1) replaced by identity;
- `peft_dropout`: LoRA's input dropout back to peft's own `nn.Dropout` (what xtune used before `FastDropout`);
- `peft_input_cast`: peft's cast of each adapter's input to the adapter's fp32 weight dtype, which xtune's
  training step leaves out under autocast (the LoRA matmuls run in bf16 either way), put back;
- `gradient_checkpointing`: xtune's `gradient_checkpointing = True` (the memory lever; its cost);
- `one_sdpa_block_mask`: a packed row's attention in one SDPA call with a block-diagonal causal mask instead of
  xtune's one SDPA call per sample (CPU path of `xtune.models.attention`);
- `fp32`: no autocast, fp32 base weights (what bf16 autocast buys);
- `compile`: `torch.compile` of every decoder layer (dynamic shapes); its first step, which compiles, is
  reported apart.
"""

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from peft.helpers import disable_input_dtype_casting

from xtune.engine.loss import next_token_loss_sum

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from train_throughput import LORA, MAX_LENGTH, MODELS, build_assets, matmul_peak, model_flops  # noqa: E402

GROUPS = {  # operator -> group, for the profile
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
    "attention": ("sdpa", "scaled_dot_product", "flash_attention"),
    "dropout (bernoulli, masks)": ("bernoulli", "dropout"),
    "casts and copies": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous"),
    "loss (log_softmax, nll)": ("log_softmax", "nll_loss", "cross_entropy"),
    "optimizer": ("_fused_adam", "adam", "_foreach"),
    "elementwise": ("aten::mul", "aten::add", "aten::div", "aten::neg", "aten::pow", "aten::rsqrt", "aten::mean",
                    "aten::silu", "aten::sum", "aten::fill_", "aten::cat", "aten::where", "aten::sub", "aten::exp",
                    "aten::zero_", "aten::zeros", "aten::sigmoid", "aten::cos", "aten::sin", "aten::index",
                    "aten::embedding", "aten::masked", "aten::slice", "aten::norm", "aten::_foreach_norm"),
}  # fmt: skip


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, keys in GROUPS.items():
        if any(key.lower() in lowered for key in keys):
            return group
    return "other"


def build(model_dir: str, dtype: torch.dtype):
    from xtune.config.schema import Config
    from xtune.engine.optim import build_optimizer
    from xtune.models.attention import use_varlen_attention
    from xtune.models.load import load_model
    from xtune.models.lora import prepare_trainable

    config = Config(llm_name_or_path=model_dir, data_path="-", lora_r=LORA["r"], lora_alpha=LORA["alpha"],
                    lora_dropout=LORA["dropout"], lr=2e-4)  # fmt: skip
    model = load_model(Path(model_dir), dtype=dtype)
    use_varlen_attention(model)
    torch.manual_seed(0)
    model = prepare_trainable(model, config)
    model.train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], config, torch.device("cpu"))
    return model, optimizer


def packed_batches(assets: dict, count: int) -> tuple[list[dict], float]:
    from xtune.config.schema import Config
    from xtune.data.dataset import prepare_samples
    from xtune.data.packing import collate_packed, pack
    from xtune.models.load import load_tokenizer

    config = Config(llm_name_or_path=assets["model_dir"], data_path=assets["data"], dataset_format="openai",
                    max_length=MAX_LENGTH)  # fmt: skip
    samples, _ = prepare_samples(config, load_tokenizer(Path(assets["model_dir"])))
    rows = pack(samples, MAX_LENGTH, 2, shuffle_seed=0)[:count]
    started = time.perf_counter()
    batches = [collate_packed([row]) for row in rows]
    collate_s = (time.perf_counter() - started) / len(rows)
    for batch, row in zip(batches, rows):
        batch["documents"] = row.seq_lens[:-1] if row.padding else row.seq_lens
    return batches, collate_s


class Lever:
    """A model variant: `enter` switches the model to it, `exit` back to the baseline."""

    def __init__(self, name: str, model, autocast: bool = True, loss=None, enter=None, exit=None, fused="auto",
                 input_cast: bool = False):  # fmt: skip
        from xtune.engine.loss import FusedHead

        self.name, self.model, self.autocast, self.loss, self.input_cast = name, model, autocast, loss, input_cast
        self.fused = FusedHead.of(model) if fused == "auto" else fused
        self.enter, self.exit = enter or (lambda: None), exit or (lambda: None)


def full_logits_loss_sum(model, inputs, labels, autocast, fused=None):
    import torch.nn.functional as F

    with autocast:
        logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


def run_step(lever: Lever, optimizer, batch: dict) -> dict:
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "documents")}
    labels = batch["labels"]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if lever.autocast else nullcontext()
    started = time.perf_counter()
    with disable_input_dtype_casting(lever.model, active=lever.autocast and not lever.input_cast):  # as xtune's step
        loss_sum = (lever.loss or next_token_loss_sum)(lever.model, inputs, labels, autocast, lever.fused)
        num_trained = (labels[:, 1:] != -100).sum()
        forward = time.perf_counter()
        (loss_sum / num_trained).backward()
        backward = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(lever.model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = (loss_sum / num_trained).item()
    done = time.perf_counter()
    return {"forward_s": forward - started, "backward_s": backward - forward, "optimizer_s": done - backward,
            "step_s": done - started, "loss": loss}  # fmt: skip


def block_mask_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None, **kwargs):
    """A packed row in one SDPA call with a block-diagonal causal mask, instead of one call per sample."""
    from xtune.models.attention import varlen_attention_forward

    if cu_seq_lens_q is None:
        return varlen_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    tokens = query.shape[2]
    segment = torch.repeat_interleave(torch.arange(len(cu_seq_lens_q) - 1), cu_seq_lens_q.diff().long())
    position = torch.arange(tokens)
    mask = (segment[:, None] == segment[None, :]) & (position[:, None] >= position[None, :])
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def make_levers(names: list[str], model, fp32_model) -> list[Lever]:
    base = model.get_base_model()
    levers = []
    for name in names:
        if name == "baseline":
            levers.append(Lever(name, model))
        elif name == "unfused_loss":
            levers.append(Lever(name, model, fused=None))
        elif name == "full_logits_loss":
            levers.append(Lever(name, model, loss=full_logits_loss_sum, fused=None))
        elif name in ("no_lora_dropout", "peft_dropout"):
            dropouts = [(module.lora_dropout, key, drop) for module in model.modules() if hasattr(module, "lora_dropout")
                        for key, drop in module.lora_dropout.items()]  # fmt: skip
            swap = torch.nn.Identity if name == "no_lora_dropout" else lambda: torch.nn.Dropout(LORA["dropout"])

            def enter(dropouts=dropouts, swap=swap):
                for container, key, _ in dropouts:
                    container[key] = swap()

            def exit(dropouts=dropouts):
                for container, key, drop in dropouts:
                    container[key] = drop

            levers.append(Lever(name, model, enter=enter, exit=exit))
        elif name == "peft_input_cast":
            levers.append(Lever(name, model, input_cast=True))
        elif name == "gradient_checkpointing":
            levers.append(Lever(
                name, model,
                enter=lambda: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}),
                exit=lambda: model.gradient_checkpointing_disable(),
            ))  # fmt: skip
        elif name == "one_sdpa_block_mask":
            from transformers import AttentionInterface
            from xtune.models import attention

            levers.append(Lever(
                name, model,
                enter=lambda: AttentionInterface.register(attention.VARLEN, block_mask_attention),
                exit=lambda: AttentionInterface.register(attention.VARLEN, attention.varlen_attention_forward),
            ))  # fmt: skip
        elif name == "fp32":
            levers.append(Lever(name, fp32_model, autocast=False))
        elif name == "compile":
            layers = list(base.model.layers)
            compiled = [torch.compile(layer._call_impl, dynamic=True) for layer in layers]

            def enter(layers=layers, compiled=compiled):
                for layer, call in zip(layers, compiled):
                    layer._compiled_call_impl = call

            def exit(layers=layers):
                for layer in layers:
                    layer._compiled_call_impl = None

            levers.append(Lever(name, model, enter=enter, exit=exit))
        else:
            raise SystemExit(f"unknown lever {name!r}")
    return levers


def profile_step(lever: Lever, optimizer, batch: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_step(lever, optimizer, batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups = defaultdict(float)
    for event in events:
        groups[group_of(event.key)] += event.self_cpu_time_total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    return {
        "groups_share": {k: v / total for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count,
                     "ms_per_call": e.self_cpu_time_total / e.count / 1e3} for e in top],  # fmt: skip
        "self_cpu_s": total / 1e6,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="100m")
    parser.add_argument("--levers", default="baseline,unfused_loss,no_lora_dropout,gradient_checkpointing,fp32")
    parser.add_argument("--rounds", type=int, default=3, help="steps per lever; the first is a warm-up, not counted")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile", default="baseline", help="levers to attribute to operators with torch.profiler")
    parser.add_argument("--work-dir", default=str(BENCH / "runs"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.levers.split(",")

    assets = build_assets(Path(args.work_dir) / "assets", args.model, args.samples, 0)
    batches, collate_s = packed_batches(assets, args.rounds)
    model, optimizer = build(assets["model_dir"], torch.bfloat16)
    fp32_model, fp32_optimizer = build(assets["model_dir"], torch.float32) if "fp32" in names else (None, None)
    levers = make_levers(names, model, fp32_model)
    peak = matmul_peak(args.threads)
    times = defaultdict(list)
    for round_index, batch in enumerate(batches):
        for lever in levers:
            lever.enter()
            record = run_step(lever, fp32_optimizer if lever.name == "fp32" else optimizer, batch)
            lever.exit()
            record |= {"round": round_index, "tokens": int(batch["input_ids"].numel())}
            times[lever.name].append(record)
            print(json.dumps({"lever": lever.name, **record}), flush=True)
    shape = MODELS[args.model]
    summary = {}
    for name, records in times.items():
        counted = records[1:] if len(records) > 1 else records
        step_s = statistics.fmean(r["step_s"] for r in counted)
        flops = statistics.fmean(model_flops(shape, LORA["r"], batches[r["round"]]["documents"]) for r in counted)
        summary[name] = {
            "step_s": step_s, "forward_s": statistics.fmean(r["forward_s"] for r in counted),
            "backward_s": statistics.fmean(r["backward_s"] for r in counted),
            "optimizer_s": statistics.fmean(r["optimizer_s"] for r in counted),
            "tokens_per_s": statistics.fmean(r["tokens"] for r in counted) / step_s,
            "mfu": flops / step_s / (peak["bf16_gflops"] * 1e9),
            "losses": [r["loss"] for r in records],
        }  # fmt: skip
        if name == "compile":
            summary[name]["first_step_s"] = records[0]["step_s"]
    if "baseline" in summary:
        for name in summary:
            summary[name]["speedup_vs_baseline"] = summary["baseline"]["step_s"] / summary[name]["step_s"]
    report = {"model": args.model, "threads": args.threads, "peak": peak, "collate_s_per_row": collate_s,
              "summary": summary, "batches_tokens": [int(b["input_ids"].numel()) for b in batches]}  # fmt: skip
    for lever in levers if not args.no_profile else []:
        if lever.name in args.profile.split(","):
            lever.enter()
            report[f"profile_{lever.name}"] = profile_step(lever, optimizer, batches[-1])
            lever.exit()
    out = Path(args.out or Path(args.work_dir) / f"profile_{args.model}_{'_'.join(names)}.json")
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "batches_tokens"}, indent=1))


if __name__ == "__main__":
    main()
