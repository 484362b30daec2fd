"""The training loop: forward, loss, backward, step, log, evaluate, save, in one place."""

import io
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from functools import partial
from itertools import islice
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from peft.helpers import disable_input_dtype_casting
from safetensors.torch import load_file
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from xtune.config.schema import Config
from xtune.data.encode import IGNORE_INDEX, pad_token_id
from xtune.data.dataset import config_template, prepare_kto, prepare_pairs, prepare_samples, split_validation
from xtune.data.images import BUILTIN_IMAGES, ImagePreprocessor, image_path
from xtune.data.loader import collate, length_grouped_batches, shuffled_batches
from xtune.data.packing import collate_packed, pack, pack_groups, packing_efficiency
from xtune.data.pairs import PreferenceCollator
from xtune.data.check_template import first_disagreement
from xtune.data.templates import TokenizerTemplate
from xtune.engine import sequence_parallel, zero
from xtune.engine.checkpoint import (
    TRAINING_STATE,
    TRAINING_STATE_META,
    complete_checkpoints,
    find_resume_checkpoint,
    keep_config_file,
    lock_run,
    name_as_xtuner,
    new_run_dir,
    partial_checkpoint,
    prune_checkpoints,
    read_training_state,
    save_checkpoint,
    step_of,
    write_best,
    write_training_state,
)
from xtune.engine.device import resolve_device, resolve_dtype
from xtune.engine.distributed import Ranks, all_sum, barrier, full_state_dict, my_share, share
from xtune.engine.distributed import gradient_sync, load_optimizer_state, optimizer_state
from xtune.engine.distributed import wrap as wrap_for_ranks
from xtune.engine.distributed import setup as setup_distributed
from xtune.engine.validation import BestEval, validation_loss, validation_plan
from xtune.engine.hooks import MetricSinks, evaluate_chat, memory_note, plot_loss
from xtune.engine.loss import SHIFTED, FusedHead, next_token_loss_sum, next_token_targets, pop_labels, router_aux_coefficient
from xtune.engine.optim import build_optimizer, build_scheduler
from xtune.engine.preference import cached_reference, preference_objective
from xtune.engine.reward import reward_setup
from xtune.errors import CheckpointError, ConfigError, DataError, TrainingError
from xtune.models.attention import use_varlen_attention
from xtune.models.compile import compile_decoder_layers
from xtune.models.load import load_model, load_tokenizer, read_config, resolve_model_path
from xtune.models.llava import build_llava, check_pretrained_pth, image_token_count, llava_meta, vision_config, with_pixel_values
from xtune.models.lora import count_parameters, fit_embeddings, prepare_trainable, saves_whole_model


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    losses: list[float] = field(default_factory=list)
    """Mean loss over the trained tokens of each optimizer step (with an MoE's router loss: `xtune.engine.loss`)."""
    best_checkpoint: Path | None = None
    """With save_best: the checkpoint of the lowest validation loss."""


def count_trained(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (next_token_targets(batch["labels"], batch.get(SHIFTED, False))[0]).sum()


def accumulate_gradients(
    model, batches: list[dict], device, autocast=nullcontext(), scaler=None, ranks=Ranks(), engine=None, fused=None,
    router_aux_loss_coef=0.0, objective=None,
):  # fmt: skip
    """Backward over the micro-batches of one optimizer step, so that the gradient is that of the mean
    loss over every trained token of the step on every rank (not a mean of per-micro-batch means).
    Returns this rank's (summed loss, input tokens) and the global trained-token count, as tensors:
    no host sync per micro-batch. With a DeepSpeed `engine`, it also steps: DeepSpeed counts the
    micro-batches and updates the weights on the last one. `fused`: the loss from the head's weight
    without whole logits (`xtune.engine.loss.FusedHead`). `router_aux_loss_coef`: an MoE router's load-balancing
    loss in the loss, each micro-batch's weighted by its trained tokens (`xtune.engine.loss.router_aux_coefficient`).
    `objective`: a preference stage (`xtune.engine.preference.PreferenceObjective`): its loss is a mean over the
    step's pairs, which the returned count then counts."""
    count = objective.count if objective is not None else count_trained
    if objective is not None:
        objective.begin_step(batches, device, autocast, ranks)
    num_trained = all_sum(sum(count(batch) for batch in batches).to(device), ranks)
    loss_sum = torch.zeros((), device=device)
    tokens = torch.zeros((), dtype=torch.long, device=device)
    for index, batch in enumerate(batches):
        batch = dict(batch)
        labels, shifted = pop_labels(batch)  # stays on the CPU: the loss finds the trained positions there, no sync
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k not in ("answer_ids", "group_ids") else v
                 for k, v in batch.items()}  # fmt: skip (each position's answer, each pair's place: read on the host)
        with gradient_sync(model, last=index == len(batches) - 1) if engine is None else nullcontext():
            if objective is not None:
                step_loss = objective.loss_sum(model, batch, labels, autocast)
            else:
                step_loss = next_token_loss_sum(model, batch, labels, autocast, fused, router_aux_loss_coef, shifted)
            scaled = step_loss * ranks.world / num_trained  # DDP and DeepSpeed average gradients over the ranks
            if engine is not None:
                engine.backward(scaled, scale_wrt_gas=False)
                engine.step()
            else:
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += step_loss.detach()
        tokens += batch["attention_mask"].sum()
    return loss_sum, num_trained, tokens


def batch_plan(num_items: int, batch_size: int, seed: int, lengths: list[int] | None = None) -> Iterator[tuple[int, list[int]]]:
    """(epoch, item indices) of every micro-batch, forever; each epoch a fresh seeded shuffle (grouped by
    length when `lengths` are given), so the order is reproducible and a resumed run can skip ahead."""
    epoch = 0
    while True:
        if lengths is None:
            batches = shuffled_batches(num_items, batch_size, seed + epoch)
        else:
            batches = length_grouped_batches(lengths, batch_size, seed + epoch)
        for indices in batches:
            yield epoch, indices
        epoch += 1


RESUME_MAY_CHANGE = (
    "work_dir", "max_steps", "max_epochs", "save_steps", "save_total_limit", "logging_steps", "evaluation_freq",
    "evaluation_inputs", "evaluation_max_new_tokens", "evaluation_images", "report_to", "num_proc",
    "dataloader_num_workers", "device", "gradient_checkpointing", "torch_compile", "nan_policy", "trust_remote_code",
    "eval_steps", "early_stopping_patience",
)  # fmt: skip
"""Keys that change neither what is trained nor how: a resumed run may set them anew (to train longer, save or log
otherwise, evaluate other prompts, recompute activations). Every other key must be what the run started with."""

KEYS_BEFORE_THEY_EXISTED = {"router_aux_loss_coef": 0.0, "sequence_parallel_size": 1, "warmup_steps": None,
                            "max_dataset_length": None}  # fmt: skip
"""Keys whose default trains otherwise than a run from before the key existed did: what those runs trained with."""

DATA_FINGERPRINT = "data.json"
"""In a run folder: the key of the encoded data it trained on (data files' bytes, template, tokenizer, lengths)."""


def check_resumable(config: Config, checkpoint: Path, world: int, data_key: str | None = None) -> None:
    run_config = checkpoint.parent / "config.json"
    try:
        saved = json.loads(run_config.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot resume {checkpoint}: its run's {run_config.name} is missing or damaged ({error}); a checkpoint "
            "resumes inside the run folder that wrote it, with that folder's config.json."
        ) from None
    current = json.loads(config.model_dump_json())
    saved = {**KEYS_BEFORE_THEY_EXISTED, **saved}  # a run from before a key existed trained as its old default says
    changed = [key for key in current if key not in RESUME_MAY_CHANGE and saved.get(key, current[key]) != current[key]]
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed)
        raise CheckpointError(f"cannot resume {checkpoint}: the config changed ({details}); restore them or start a new run.")
    fingerprint = checkpoint.parent / DATA_FINGERPRINT
    if data_key and fingerprint.is_file() and json.loads(fingerprint.read_text()).get("data") != data_key:
        raise CheckpointError(
            f"cannot resume {checkpoint}: the training data changed since the run started (a data file's contents, "
            "or how it is encoded); restore it, or start a new run."
        )
    later = [path.name for path in complete_checkpoints(checkpoint.parent) if step_of(path) > step_of(checkpoint)]
    if later:
        raise CheckpointError(
            f"cannot resume {checkpoint}: {', '.join(later)} came after it in the same run and would be trained over; "
            f"resume from the newest (--resume auto), or move the later checkpoints out of {checkpoint.parent} first."
        )
    state_meta = checkpoint / TRAINING_STATE_META
    saved_world = json.loads(state_meta.read_text())["progress"].get("world", 1) if state_meta.is_file() else world
    if saved_world != world:
        raise CheckpointError(
            f"cannot resume {checkpoint} on {world} processes: it was trained on {saved_world}, and the global batch, "
            f"data order and optimizer shards follow that; resume with NPROC_PER_NODE={saved_world}."
        )


def load_trainable_weights(model, checkpoint: Path, whole_model: bool) -> None:
    if whole_model:
        state = {}
        for file in sorted(checkpoint.glob("*.safetensors")):
            if file.name != TRAINING_STATE:
                state.update(load_file(file))
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        missing = sorted(set(model.load_state_dict(state, strict=False).missing_keys) - tied)
        if missing:
            raise CheckpointError(f"{checkpoint} lacks {len(missing)} of the model's weights, e.g. {missing[0]!r}.")
    else:
        set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))


def _keep_metrics_up_to(path: Path, step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint: drop what the interrupted run logged past it (and a
    last line it was killed while writing). Written aside and renamed, so a kill meanwhile loses nothing."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    draft = path.with_name(f".{path.name}.partial")
    with draft.open("w") as handle:
        handle.write("".join(line + "\n" for line in kept))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(draft, path)


def check_work_dir(work_dir: Path) -> None:
    """A work_dir runs can be written into, checked before anything loads (a file there, or a folder without write
    permission, failed only after the model had loaded)."""
    existing = next(path for path in (work_dir, *work_dir.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise ConfigError(f"work_dir = {str(work_dir)!r}: {existing} is a file, not a folder; choose another work_dir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"work_dir = {str(work_dir)!r}: {existing} is not writable by this user; choose another work_dir.")


def total_steps(config: Config, num_samples: int, world: int = 1) -> int:
    if config.max_steps is not None:
        return config.max_steps
    batches_per_epoch = math.ceil(num_samples / (config.batch_size * world))
    return math.ceil(batches_per_epoch * config.max_epochs / config.accumulative_counts)


def train(
    config: Config,
    console: Console | None = None,
    resume: str | None = None,
    trust_checkpoint: bool = False,
    config_file: Path | None = None,
) -> TrainResult:
    """Train as the config says; `resume` = "auto" or a checkpoint folder continues an earlier run.
    `trust_checkpoint`: load a DeepSpeed checkpoint's pickles even when this machine did not write it.
    `config_file`: the file the config was read from, kept with the run."""
    with zero.launcher_variables(config.deepspeed is not None):
        return _train(config, console, resume, trust_checkpoint, config_file)


def _train(
    config: Config, console: Console | None, resume: str | None, trust_checkpoint: bool, config_file: Path | None
) -> TrainResult:
    device = resolve_device(config.device)
    check_work_dir(Path(config.work_dir))
    if config.pretrained_pth:
        check_pretrained_pth(config.pretrained_pth)
    sequence_parallel.check_config(config)
    ranks = setup_distributed(device, group_of_one=config.deepspeed is not None)
    sp = sequence_parallel.setup(ranks, config.sequence_parallel_size)
    data_ranks = sp.data  # who splits each global batch: the groups of sequence_parallel_size ranks
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)
    console = (console or Console(stderr=True)) if ranks.main else Console(file=io.StringIO())
    torch.manual_seed(config.seed)
    dtype = resolve_dtype(config.dtype, device)
    ds_settings = zero.deepspeed_config(config, ranks.world, dtype) if config.deepspeed else None

    model_path = resolve_model_path(config.llm_name_or_path)
    sequence_parallel.check_heads(sp.size, read_config(model_path))
    tokenizer = load_tokenizer(model_path, trust_remote_code=config.trust_remote_code)
    template = config_template(config)
    if ranks.main:
        _warn_of_another_format(tokenizer, template, config, console)
    llava = config.visual_encoder_name_or_path is not None
    missing = [image for image in config.evaluation_images if not image_path(image).is_file()]
    if missing:
        shipped = ", ".join(f"xtune-data/{name}" for name in BUILTIN_IMAGES)
        raise ConfigError(f"evaluation_images: {missing[0]!r} is not a file; give local image paths (or {shipped}).")
    image_tokens = image_token_count(vision_config(config.visual_encoder_name_or_path)) if llava else 0
    preference = config.stage != "sft"
    if preference and (llava or (config.deepspeed and config.method == "full" and config.stage in ("dpo", "kto"))):
        raise ConfigError(f"stage = '{config.stage}' trains language models with LoRA/QLoRA, or in full without "
                          "DeepSpeed, for now; not LLaVA models or full fine-tuning under DeepSpeed.")  # fmt: skip
    kto, validation = None, []
    if config.stage == "kto":
        kto, report = prepare_kto(config, tokenizer)
        samples = [(answer,) for answer in kto.answers]
    elif preference:
        samples, report = prepare_pairs(config, tokenizer)
    else:
        samples, report = prepare_samples(config, tokenizer, image_tokens=image_tokens)
        samples, report, validation = split_validation(config, tokenizer, samples, report, image_tokens)
    console.print(
        f"data: {report.samples} samples, {report.tokens} tokens ({report.trained_tokens} trained); "
        f"{report.truncated} over max_length={config.max_length} ({report.dropped_too_long} dropped), "
        f"{report.dropped_untrained} without trained tokens dropped, {len(report.skipped)} bad records skipped"
    )
    if validation:
        where = f"val_split = {config.val_split} of the data" if config.val_split else config.val_data_path
        console.print(f"validation: {len(validation)} samples ({where}), "
                      f"{sum(sample.num_trained for sample in validation)} trained tokens")  # fmt: skip
    if not samples:
        raise DataError(
            f"no sample to train on: {report.truncated} were over max_length={config.max_length} "
            f"({report.dropped_too_long} dropped), {report.dropped_untrained} had no trained token left, "
            f"{len(report.skipped)} bad records were skipped. Raise max_length (or set truncation = 'truncate'), or "
            "check the data with `xtune check-dataset`."
        )
    checkpoint, run_lock = None, None  # checked before the model loads: a refusal costs nothing
    if resume is not None:
        checkpoint = find_resume_checkpoint(config.work_dir, resume)
        if checkpoint is None:
            console.print(f"--resume auto: no complete checkpoint under {config.work_dir} yet; starting a new run")
    if checkpoint is not None:
        check_resumable(config, checkpoint, ranks.world, Path(report.cache).name if report.cache else None)
        if ds_settings:
            zero.check_trusted(checkpoint, trust_checkpoint)
        run_lock = lock_run(checkpoint.parent) if ranks.main else None
    pad_id = pad_token_id(tokenizer)
    if config.pack_to_max_length:
        shuffle_seed = config.seed if config.shuffle_before_pack else None
        pairs = preference and kto is None
        row_length = 2 * config.max_length if pairs else config.max_length  # a pair's two answers, side by side
        items = (pack_groups if preference else pack)(samples, row_length, pad_id, shuffle_seed)
        collate_fn = collate_packed
        console.print(
            f"packed into {len(items)} rows of {row_length} tokens, "
            f"{packing_efficiency(items, row_length):.1%} of them sample tokens"
        )
    else:
        items = list(range(len(samples))) if preference else samples
        collate_fn = partial(collate, pad_token_id=pad_id)
    if preference:
        kto_data = (kto.kl, kto.desirable) if kto else ()
        collate_fn = PreferenceCollator(samples, pad_id, *kto_data, row_multiple=sp.size)  # sp: a KTO kl row splits
    grouping = report.lengths if config.group_by_length and not config.pack_to_max_length else None
    preprocess = None
    if llava:
        preprocess = ImagePreprocessor.from_folder(
            resolve_model_path(config.visual_encoder_name_or_path), config.pad_image_to_square
        )
        collate_fn = with_pixel_values(collate_fn, preprocess)
    collate_fn = sequence_parallel.sharding(collate_fn, sp)
    if config.pack_to_max_length and validation:
        validation = pack(validation, config.max_length, pad_id)
    validation_batches = validation_plan(validation, config.batch_size * data_ranks.world)

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
        sequence_parallel.use_ulysses(model, sp)
    router_aux_loss_coef = router_aux_coefficient(model, config.router_aux_loss_coef)
    if router_aux_loss_coef and sp.size > 1:
        raise ConfigError(f"sequence_parallel_size = {sp.size}: an MoE router's load-balancing loss is not split over "
                          "a row's shards yet; set router_aux_loss_coef = 0 or sequence_parallel_size = 1.")  # fmt: skip
    if router_aux_loss_coef:
        console.print(f"MoE router load-balancing loss in the training loss, coefficient {router_aux_loss_coef:g}")
    torch.manual_seed(config.seed)  # new weights (LoRA) and dropout do not depend on what ran before
    if fit_embeddings(model, tokenizer):
        console.print(f"embeddings grown to {model.get_input_embeddings().num_embeddings} rows for the tokenizer's new tokens")
        if config.method == "lora" and not config.modules_to_save:
            console.print("[yellow]new token rows stay untrained under LoRA: add embed_tokens and lm_head to modules_to_save")
    if config.stage == "reward":  # reward stage (issue 17): a score head in the output head's place
        model, objective = reward_setup(model, config, pad_id, report.margins)
    else:
        model = prepare_trainable(model, config, others_train=llava)
        objective = preference_objective(config, model)
    if objective is not None:
        objective.sequence_parallel = sp
    model = build_llava(config, model, dtype, device, preprocess) if llava else model.to(device)
    if objective is not None and config.precompute_reference and objective.reference is not None:
        objective.reference_table = cached_reference(objective, items, collate_fn, len(samples), config, report,
                                                     model_path, dtype, device, console)  # fmt: skip
        objective.reference = None  # a full fine-tune keeps no frozen copy
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.torch_compile:
        console.print(f"torch.compile: {compile_decoder_layers(model)} decoder layers (compiled at their first steps)")
    trainable, total = count_parameters(model)
    console.print(f"model: {model_path} on {device}, {dtype}; {trainable:,} of {total:,} parameters trainable")
    fsdp = ranks.world > 1 and config.strategy == "fsdp"
    engine_name = f"DeepSpeed ZeRO-{zero.zero_stage(ds_settings)}" if ds_settings else config.strategy.upper()
    if ranks.world > 1 or ds_settings:
        console.print(f"data parallel over {ranks.world} processes ({engine_name})")
    if sp.size > 1:
        console.print(f"sequence parallel: each row split over {sp.size} processes (Ulysses), "
                      f"{data_ranks.world} data-parallel groups")  # fmt: skip

    if checkpoint is not None:
        if not ds_settings:  # DeepSpeed restores the weights with its own state
            if llava:
                model.load_trained(checkpoint)
            else:
                load_trainable_weights(model, checkpoint, saves_whole_model(config))
    steps = total_steps(config, len(items), data_ranks.world)
    if not ds_settings:  # FSDP2 shards the parameters before the optimizer sees them
        forward = wrap_for_ranks(model, ranks, config.strategy, device)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], config, device)
    scheduler = build_scheduler(optimizer, config, steps)
    engine = None
    if ds_settings:
        engine = forward = zero.initialize(model, optimizer, scheduler, ds_settings)
    low_precision = dtype != torch.float32 and engine is None  # DeepSpeed holds the weights in that precision itself
    autocast = torch.autocast(device.type, dtype=dtype) if low_precision else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and engine is None)
    # weights split over the ranks: gathering them, and generating, takes every rank
    sharded = fsdp or (engine is not None and engine.zero_optimization_stage() == 3)
    fused = FusedHead.of(model) if config.fused_loss and not sharded else None  # a sharded head is not whole outside forward

    progress_state = {"step": 0, "tokens": 0, "trained_tokens": 0, "elapsed_s": 0.0}
    if checkpoint is not None:
        if engine is not None:
            zero.load_state(engine, checkpoint)
            progress_state, _ = read_training_state(checkpoint, None, None)
        else:
            progress_state, saved_optimizer = read_training_state(checkpoint, scheduler, scaler)
            load_optimizer_state(model, optimizer, saved_optimizer, ranks, config.strategy)
        run_dir = checkpoint.parent
        if ranks.main:
            _keep_metrics_up_to(run_dir / "metrics.jsonl", progress_state["step"])
        console.print(f"resuming {run_dir} from step {progress_state['step']}")
    else:
        run_dir = share(new_run_dir(config.work_dir) if ranks.main else None, ranks)
        if ranks.main:
            run_lock = lock_run(run_dir)
            (run_dir / "config.json").write_text(config.model_dump_json(indent=2))
            if config_file is not None:
                keep_config_file(Path(config_file), run_dir)
            if report.cache:
                (run_dir / DATA_FINGERPRINT).write_text(json.dumps({"data": Path(report.cache).name}) + "\n")
    meta = {
        "llm_name_or_path": config.llm_name_or_path,
        "method": "full" if saves_whole_model(config) else config.method,
        "quantization": config.quantization,
        "prompt_template": config.prompt_template,
        "SYSTEM": config.SYSTEM,
        "max_length": config.max_length,
        "stage": config.stage,  # a reward run's checkpoints export as a sequence classifier
        **({"llava": llava_meta(config)} if llava else {}),
    }
    sinks = MetricSinks(run_dir, config, main=ranks.main)
    done = progress_state["step"]
    best = BestEval(**progress_state.get("best_eval", {}))
    stopped_early = best.out_of_patience(config.early_stopping_patience)
    if stopped_early:  # a run that stopped early, resumed: it stays stopped
        steps = done
    global_batch = config.batch_size * data_ranks.world
    plan = islice(  # the micro-batches of steps done+1 .. steps
        batch_plan(len(items), global_batch, config.seed, grouping),
        done * config.accumulative_counts, steps * config.accumulative_counts,
    )
    batches = collated(items, plan, collate_fn, data_ranks, config.dataloader_num_workers, pin=device.type == "cuda")
    result = TrainResult(run_dir=run_dir, checkpoint=checkpoint or run_dir)
    model.train()
    start = time.perf_counter() - progress_state["elapsed_s"]
    seen_tokens, trained_tokens = progress_state["tokens"], progress_state["trained_tokens"]
    eval_loss = None

    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(), console=console,
    )  # fmt: skip
    # peft casts each adapter's input to its fp32 weights, and autocast casts it back for the matmul: two passes over
    # the activations per adapter that change no number (1.02-1.04x a step, benchmarks/RESULTS.md); its 4-bit layers
    # skip them under autocast already. Switched off once for the whole loop (not by a walk over every module each
    # step), so the evaluation below generates under autocast too. DoRA keeps them (its weight norm
    # is summed in fp32 then).
    casting = disable_input_dtype_casting(model, active=low_precision and not config.use_dora)
    with progress, casting:
        task = progress.add_task("train", total=steps, completed=done, status="")
        for step in range(done + 1, steps + 1):
            group = [next(batches) for _ in range(config.accumulative_counts)]
            epoch = group[-1][0]
            lr = scheduler.get_last_lr()[0]
            micro_batches = [batch for _, _, batch in group]
            loss_sum, num_trained, tokens = accumulate_gradients(
                forward, micro_batches, device, autocast, scaler, ranks, engine, fused, router_aux_loss_coef, objective
            )
            loss_sum, tokens = all_sum(loss_sum, ranks), all_sum(tokens, ranks)
            preference = []  # a preference stage counts pairs: its trained tokens and TRL's metric sums, one reduce
            if objective is not None:
                taken = objective.take_metrics()
                trained_here = sum(count_trained(batch) for batch in micro_batches).to(device).double()
                trained_here *= sp.rank == 0  # sequence parallel: a preference row's labels are whole on each rank
                preference = all_sum(torch.stack([trained_here, *(v.double() for v in taken.values())]), ranks)
            if engine is not None:  # it clipped and stepped on the last micro-batch
                grad_norm = torch.as_tensor(engine.get_global_grad_norm() or 0.0, dtype=torch.float64, device=device)
            else:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), config.max_norm if config.max_norm is not None else float("inf")
                )
            if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
                grad_norm = grad_norm.full_tensor()
            numbers = torch.stack(  # the step's one host sync, before the update
                [loss_sum / num_trained, num_trained.double(), tokens.double(), grad_norm.double(), *preference]
            ).tolist()
            loss, step_trained, step_tokens, grad_norm = numbers[:4]
            step_metrics = {}
            if objective is not None:
                step_trained = numbers[4]
                step_metrics = objective.step_metrics(dict(zip(taken, numbers[5:])), numbers[1])
            diverged = not math.isfinite(loss) or (not math.isfinite(grad_norm) and not scaler.is_enabled())
            if diverged:  # fp16's loss scaler skips steps with inf gradients by itself
                handle_divergence(config, step, epoch, [i for _, indices, _ in group for i in indices], loss, grad_norm,
                                  engine is not None, progress.console)  # fmt: skip
            if engine is None:
                if not diverged:
                    scaler.step(optimizer)
                    scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            trained_tokens += int(step_trained)
            seen_tokens += int(step_tokens)
            result.losses.append(loss)
            elapsed = time.perf_counter() - start
            record = {
                "step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens": seen_tokens, "tokens_per_s": seen_tokens / elapsed,
                "trained_tokens": trained_tokens, "trained_tokens_per_s": trained_tokens / elapsed, "elapsed_s": elapsed,
                **step_metrics, **({"skipped": True} if diverged else {}),
            }  # fmt: skip
            if step % config.logging_steps == 0 or step == steps:
                sinks.log(record)
            progress.update(
                task, advance=1,
                status=f"epoch {epoch} loss {loss:.4f} lr {lr:.2e} grad {record['grad_norm']:.2f} "
                + (f"margin {step_metrics['rewards/margins']:.3f} " if "rewards/margins" in step_metrics else "")
                + (f"acc {step_metrics['rewards/accuracies']:.2f} " if "rewards/accuracies" in step_metrics else "")
                + (f"kl {step_metrics['kl']:.3f} " if "kl" in step_metrics else "")
                + (f"val {eval_loss:.4f} " if eval_loss is not None else "")
                + f"{record['tokens_per_s']:.0f} tok/s{memory_note(device)}",
            )  # fmt: skip

            evaluate = config.evaluation_inputs and (step % config.evaluation_freq == 0 or step == steps)
            if evaluate and (ranks.main or sharded):  # sharded weights: every rank takes part in generation
                with autocast:  # the training precision: the adapters' inputs are not cast to fp32 (above)
                    answers = evaluate_chat(model, tokenizer, template, config)
                sinks.log({"step": step, "evaluation": answers})
                for item in answers:
                    progress.console.print(f"[dim]eval step {step}[/] {item['input']!r} -> {item['output']!r}")
            if validation and (step % (config.eval_steps or config.save_steps) == 0 or step == steps):
                batches_of_set = (rank_batch(validation, indices, collate_fn, data_ranks) for indices in validation_batches)
                numbers = validation_loss(forward, batches_of_set, device, autocast, ranks, fused)
                eval_loss, improved = numbers["eval_loss"], best.update(step, numbers["eval_loss"])
                sinks.log({"step": step, **numbers})
                progress.console.print(f"[dim]validation step {step}[/] loss {eval_loss:.4f} perplexity "
                                       f"{numbers['eval_perplexity']:.4f}{' (best)' if improved else ''}")  # fmt: skip
            stop = best.out_of_patience(config.early_stopping_patience)
            if step % config.save_steps == 0 or step == steps or stop or (config.save_best and best.step == step):
                position = {
                    "step": step, "tokens": seen_tokens, "trained_tokens": trained_tokens, "elapsed_s": elapsed,
                    "world": ranks.world, **(best.state() if validation else {}),
                }  # fmt: skip
                result.checkpoint = save_step(
                    model, tokenizer, run_dir, meta, position, config, ranks, optimizer, scheduler, scaler, engine
                )
                if ranks.main:
                    plot_loss(run_dir)
            if stop:
                lowest = f"{best.loss:.4f} (step {best.step})" if best.loss is not None else "no finite value"
                progress.console.print(f"early stopping at step {step}: the validation loss has not gone below "
                                       f"{lowest} for {best.evals_since} evaluations")  # fmt: skip
                break
    sinks.close()
    if run_lock is not None:
        run_lock.close()
    if done >= steps:  # a finished run resumed: nothing trained, nothing saved
        finished = f"stopped early at step {steps}" if stopped_early else f"has trained all its {steps} steps"
        console.print(f"{run_dir} {finished} already; its last checkpoint is {result.checkpoint}")
    else:
        console.print(f"saved {result.checkpoint}")
    if config.save_best and best.step is not None:
        result.best_checkpoint = run_dir / f"checkpoint-{best.step}"
        console.print(f"best: {result.best_checkpoint} (validation loss {best.loss:.4f})")
    return result


def _warn_of_another_format(tokenizer, template, config: Config, console: Console) -> None:
    """One line when the named template and the tokenizer's own chat_template write a probe conversation apart."""
    if isinstance(template, TokenizerTemplate):
        return
    differing = first_disagreement(tokenizer, template)
    if differing is not None:
        message = (
            f"prompt_template '{template.name}' and the tokenizer's own chat_template write the probe "
            f"'{differing.probe}' differently from token {differing.position} ({differing.ours} vs {differing.theirs}); "
            f"`xtune check-template {config.llm_name_or_path} --prompt-template {template.name}` shows every probe."
        )
        console.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def save_step(model, tokenizer, run_dir, meta, position, config, ranks, optimizer, scheduler, scaler, engine) -> Path:
    """checkpoint-<step>: weights (gathered when sharded), training state, then the rename. Every rank
    calls this: gathering and DeepSpeed's state are collectives; only rank 0 writes the rest."""
    step = position["step"]
    if engine is not None:
        gathered, whole_optimizer_state = zero.gathered_state_dict(engine), None
        if ranks.main:
            shutil.rmtree(partial_checkpoint(run_dir, step), ignore_errors=True)
        barrier(ranks)
        zero.save_state(engine, partial_checkpoint(run_dir, step))
        barrier(ranks)
    else:
        gathered = full_state_dict(model, ranks, config.strategy)
        whole_optimizer_state = optimizer_state(model, optimizer, ranks, config.strategy)
    if ranks.main:
        saved = save_checkpoint(
            model, tokenizer, run_dir, step, meta,
            lambda folder: write_training_state(
                folder, whole_optimizer_state, scheduler if engine is None else None, scaler, position
            ),
            state_dict=gathered, clear=engine is None,
        )  # fmt: skip
        name_as_xtuner(saved, step * config.accumulative_counts)
        best_step = position["best_eval"]["step"] if config.save_best else None
        if best_step is not None:
            write_best(run_dir, best_step, position["best_eval"]["loss"])
        prune_checkpoints(run_dir, config.save_total_limit, best_step)
    barrier(ranks)
    return run_dir / f"checkpoint-{step}"


def handle_divergence(config: Config, step: int, epoch: int, indices: list[int], loss: float, grad_norm: float,
                      stepped: bool, console: Console) -> None:
    """A NaN/Inf loss or gradient: stop before the weights change (nan_policy = "stop"; always under
    DeepSpeed, which has already stepped), or let the caller skip the update."""
    where = f"step {step} (epoch {epoch}, items {indices[:8]}{' ...' if len(indices) > 8 else ''})"
    if config.nan_policy == "stop" or stepped:
        raise TrainingError(
            f"{where}: loss {loss}, gradient norm {grad_norm}: training diverged. Nothing from this step was "
            "saved; --resume auto continues from the last checkpoint. Lower lr, check those items, or set "
            "nan_policy = 'skip'."
        )
    console.print(f"[yellow]skipped {where}: loss {loss}, gradient norm {grad_norm}; the weights are unchanged")


class _PlannedBatches(torch.utils.data.Dataset):
    """The k-th planned micro-batch, collated for this rank: what DataLoader workers build ahead."""

    def __init__(self, items, plan: list[tuple[int, list[int]]], collate_fn, ranks: Ranks):
        self.items, self.plan, self.collate_fn, self.ranks = items, plan, collate_fn, ranks

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> dict:
        return rank_batch(self.items, self.plan[k][1], self.collate_fn, self.ranks)


def collated(items, plan, collate_fn, ranks: Ranks, workers: int = 0, pin: bool = False) -> Iterator[tuple[int, list[int], dict]]:
    """(epoch, indices, this rank's batch) for each planned micro-batch, in plan order: collated here, or by
    `workers` DataLoader processes a few batches ahead."""
    if workers == 0:
        yield from ((epoch, indices, rank_batch(items, indices, collate_fn, ranks)) for epoch, indices in plan)
        return
    plan = list(plan)
    loader = torch.utils.data.DataLoader(  # its own generator: seeding workers draws nothing from dropout's
        _PlannedBatches(items, plan, collate_fn, ranks), batch_size=None, num_workers=workers, pin_memory=pin,
        generator=torch.Generator().manual_seed(0),
    )
    for (epoch, indices), batch in zip(plan, loader, strict=True):
        yield epoch, indices, batch


def rank_batch(items, indices: list[int], collate_fn, ranks: Ranks) -> dict:
    """This rank's part of a global micro-batch, collated; a stand-in part carries no loss."""
    part, real = my_share(indices, ranks)
    batch = collate_fn([items[i] for i in part])
    if not real:
        for collated_part in (batch, batch.get("kl")):  # a KTO batch's mismatched answers too
            if collated_part is not None:
                collated_part["labels"] = torch.full_like(collated_part["labels"], IGNORE_INDEX)
    return batch
