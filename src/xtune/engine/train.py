"""The training loop: forward, loss, backward, step, log, evaluate, save, in one place."""

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from xtune.config.schema import Config
from xtune.data.encode import IGNORE_INDEX
from xtune.data.formats import Conversation, Turn
from xtune.data.dataset import prepare_samples
from xtune.data.loader import collate, length_grouped_batches, shuffled_batches
from xtune.data.packing import collate_packed, pack, packing_efficiency
from xtune.data.templates import ChatTemplate, get_template
from xtune.engine.checkpoint import new_run_dir, prune_checkpoints, save_checkpoint
from xtune.engine.device import resolve_device, resolve_dtype
from xtune.engine.optim import build_optimizer, build_scheduler
from xtune.infer.generate import GenerationOptions, generate_replies
from xtune.models.attention import use_varlen_attention
from xtune.models.load import load_model, load_tokenizer, resolve_model_path
from xtune.models.lora import count_parameters, prepare_trainable


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    losses: list[float] = field(default_factory=list)
    """Mean loss over the trained tokens of each optimizer step."""


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions (labels are aligned with inputs)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def count_trained(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def micro_batches(
    items: Sequence, batch_size: int, seed: int, collate_fn: Callable, lengths: list[int] | None = None
) -> Iterator[tuple[int, dict]]:
    """(epoch, batch) forever; each epoch is a fresh seeded shuffle (grouped by length when `lengths`
    are given), so the order is reproducible."""
    epoch = 0
    while True:
        if lengths is None:
            batches = shuffled_batches(len(items), batch_size, seed + epoch)
        else:
            batches = length_grouped_batches(lengths, batch_size, seed + epoch)
        for indices in batches:
            yield epoch, collate_fn([items[i] for i in indices])
        epoch += 1


def total_steps(config: Config, num_samples: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    batches_per_epoch = math.ceil(num_samples / config.batch_size)
    return math.ceil(batches_per_epoch * config.max_epochs / config.accumulative_counts)


def train(config: Config, console: Console | None = None) -> TrainResult:
    console = console or Console(stderr=True)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)

    model_path = resolve_model_path(config.llm_name_or_path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=config.trust_remote_code)
    template = get_template(config.prompt_template)
    samples, report = prepare_samples(config, tokenizer)
    console.print(
        f"data: {report.samples} samples, {report.tokens} tokens ({report.trained_tokens} trained); "
        f"{report.truncated} over max_length={config.max_length} ({report.dropped_too_long} dropped), "
        f"{report.dropped_untrained} without trained tokens dropped, {len(report.skipped)} bad records skipped"
    )
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if config.pack_to_max_length:
        shuffle_seed = config.seed if config.shuffle_before_pack else None
        items = pack(samples, config.max_length, pad_token_id, shuffle_seed)
        collate_fn = collate_packed
        console.print(
            f"packed into {len(items)} rows of {config.max_length} tokens, "
            f"{packing_efficiency(items, config.max_length):.1%} of them sample tokens"
        )
    else:
        items, collate_fn = samples, partial(collate, pad_token_id=pad_token_id)
    grouping = report.lengths if config.group_by_length and not config.pack_to_max_length else None

    base_dtype = torch.float32 if config.method == "full" else dtype
    model = load_model(
        model_path,
        dtype=base_dtype,
        quantization=config.quantization,
        device=device,
        trust_remote_code=config.trust_remote_code,
    )
    if config.pack_to_max_length:
        use_varlen_attention(model)
    model = prepare_trainable(model, config).to(device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = count_parameters(model)
    console.print(f"model: {model_path} on {device}, {dtype}; {trainable:,} of {total:,} parameters trainable")

    steps = total_steps(config, len(items))
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], config, device)
    scheduler = build_scheduler(optimizer, config, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    )

    run_dir = new_run_dir(config.work_dir)
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2))
    meta = {
        "llm_name_or_path": config.llm_name_or_path,
        "method": config.method,
        "quantization": config.quantization,
        "prompt_template": config.prompt_template,
        "SYSTEM": config.SYSTEM,
        "max_length": config.max_length,
    }
    metrics = (run_dir / "metrics.jsonl").open("a")
    batches = micro_batches(items, config.batch_size, config.seed, collate_fn, grouping)
    result = TrainResult(run_dir=run_dir, checkpoint=run_dir)
    model.train()
    start = time.perf_counter()
    seen_tokens = trained_tokens = 0

    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(), console=console,
    )  # fmt: skip
    with progress:
        task = progress.add_task("train", total=steps, status="")
        for step in range(1, steps + 1):
            group = [next(batches) for _ in range(config.accumulative_counts)]
            epoch = group[-1][0]
            num_trained = sum(count_trained(batch) for _, batch in group)
            loss_sum = torch.zeros((), device=device)
            for _, batch in group:
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                labels = batch.pop("labels")
                with autocast:
                    logits = model(**batch, use_cache=False).logits
                step_loss = causal_lm_loss_sum(logits, labels)
                scaler.scale(step_loss / num_trained).backward()
                loss_sum += step_loss.detach()
                seen_tokens += int(batch["attention_mask"].sum())
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), config.max_norm if config.max_norm is not None else float("inf")
            )
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()

            loss = (loss_sum / num_trained).item()
            trained_tokens += int(num_trained)
            result.losses.append(loss)
            elapsed = time.perf_counter() - start
            record = {
                "step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                "tokens": seen_tokens, "tokens_per_s": seen_tokens / elapsed,
                "trained_tokens": trained_tokens, "trained_tokens_per_s": trained_tokens / elapsed, "elapsed_s": elapsed,
            }  # fmt: skip
            if step % config.logging_steps == 0 or step == steps:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            progress.update(
                task, advance=1,
                status=f"epoch {epoch} loss {loss:.4f} lr {lr:.2e} {record['tokens_per_s']:.0f} tok/s",
            )  # fmt: skip

            if config.evaluation_inputs and (step % config.evaluation_freq == 0 or step == steps):
                answers = evaluate_chat(model, tokenizer, template, config)
                metrics.write(json.dumps({"step": step, "evaluation": answers}) + "\n")
                for item in answers:
                    progress.console.print(f"[dim]eval step {step}[/] {item['input']!r} -> {item['output']!r}")
            if step % config.save_steps == 0 or step == steps:
                result.checkpoint = save_checkpoint(model, tokenizer, run_dir, step, meta)
                prune_checkpoints(run_dir, config.save_total_limit)
    metrics.close()
    console.print(f"saved {result.checkpoint}")
    return result


def evaluate_chat(model, tokenizer, template: ChatTemplate, config: Config) -> list[dict[str, str]]:
    """Answers to `evaluation_inputs`, in eval mode, restoring train mode afterwards."""
    system = (Turn("system", config.SYSTEM),) if config.SYSTEM else ()
    conversations = [Conversation((*system, Turn("user", text))) for text in config.evaluation_inputs]
    model.eval()
    replies = generate_replies(
        model, tokenizer, template, conversations, GenerationOptions(max_new_tokens=config.evaluation_max_new_tokens)
    )
    model.train()
    return [{"input": text, "output": reply} for text, reply in zip(config.evaluation_inputs, replies)]
