"""Side-by-side DPO throughput: the same LoRA DPO job under xtune (`stage = "dpo"`, packed and unpacked) and TRL's
DPOTrainer, each in its own virtual environment (TRL's: benchmarks/.venvs/trl, made by train_throughput.py's
`ensure_trl_venv`), runs interleaved.

    python benchmarks/dpo_throughput.py        # the tiny InternLM2-layout model: xtune packed, TRL, xtune unpacked
    python benchmarks/dpo_throughput.py --model 28m --max-steps 10 --threads 1   # train_throughput's 28.8M Llama
    python benchmarks/dpo_throughput.py --peers trl_precomputed,xtune_packed_precomputed,xtune_unpacked_precomputed
        # the reference's log-probabilities computed before training in both tools
    python benchmarks/dpo_throughput.py --model 28m --repeats 1 --max-steps 4 --profile-step 3
        # one step of each under torch.profiler (tables in each run's profile.txt); not a throughput figure

On a machine other processes load, pass `--threads 1` (see train_throughput.py).

What is the same for every run:
- the model: `--model tiny` is xtune's `xtune-tiny/internlm2-chat` (InternLM2 layout: fused `wqkv`; 4 layers, hidden
  256), which xtune loads as a Llama; TRL loads the same weights from the Llama-layout copy xtune writes for its
  own loaders (`xtune.models.internlm2.llama_layout_copy`), since transformers runs InternLM2 folders only through
  the checkpoint's own code, which the tiny folder does not ship. `--model 28m` / `100m`: train_throughput.py's
  Llama folders (`build_model_folder`), which both tools load as they are;
- the data: preference pairs generated once with a fixed seed into a jsonl file both tools read (`build_pairs`):
  a user turn of 16-512 tokens (log-uniform), the chosen answer echoes the user's words in order (cycled to its
  length), the rejected one is other words; each answer 32-768 tokens (log-uniform), every prompt + answer within
  `MAX_LENGTH` (nothing is truncated). The same ChatML text in both tools: xtune's `internlm2_chat`; for TRL the
  tokenizer's chat_template set to `DPO_CHAT_TEMPLATE`, which ends the answer at its `<|im_end|>`, so that both train
  the same tokens (each answer's words and `<|im_end|>`): checked pair by pair in the TRL worker (`token_agreement`);
- LoRA r=16, alpha 32 on every linear layer but the head, dropout 0 (TRL's DPOTrainer switches dropout off,
  `disable_dropout=True` by default, and xtune's DPO preset sets 0: the policy starts equal to its reference); the
  reference is the policy with the adapter disabled (TRL: `ref_model=None` with a peft model; xtune: LoRA's
  `adapter_disabled`), computed every step (`precompute_ref_log_probs=False`, TRL's default; `*_precomputed` peers:
  before training); beta 0.1, sigmoid loss,
  a mean over the step's pairs; fused AdamW, lr 2e-4, 3% warmup then cosine, clip 1.0; no gradient checkpointing
  (TRL's default is on: switched off);
- the compute dtype: what xtune's `dtype = "auto"` picks on this machine (train_throughput's `compute_dtype`: bf16
  on a CPU with AVX512-BF16 or AMX, else fp32); frozen base weights in it, autocast to it;
- the global batch: packed xtune runs take 1 row of 2 x MAX_LENGTH tokens a step (each pair's chosen and rejected
  answers two segments of a row, pairs never split); unpacked xtune and TRL take B pairs a step (2B padded rows),
  B = pairs / packed rows, so that every peer has as many steps an epoch and as many pairs a step on average. The
  unpacked runs see the same batches in the same order: xtune's length-grouped plan (`xtune.engine.train.batch_plan`),
  given to TRL as the dataset's order (every pair) with `train_sampling_strategy="sequential"`, so their loss
  curves should agree to rounding. TRL's DPOTrainer has no packing: `padding_free` falls back to padding in TRL 1.16.

Each run is a subprocess that counts the tokens of every batch its tool builds (wrapping the call that collates
each batch: xtune's `rank_batch`, TRL's data collator, both left unchanged), times every optimizer step and the
decoder stack's forward calls with and without gradients (the policy's and the reference's forwards,
`BackboneTimer`), and reports its peak RSS. Trained tokens are counted the same way for both: the chosen and
rejected answer tokens a step trains. Throughput is steady state: the first step is left out.
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

import train_throughput as harness
from train_throughput import BENCH, LORA, LR, MAX_NORM, TORCH_DTYPES, TRL_PYTHON, WARMUP_RATIO

MAX_LENGTH = 1024
"""Each answer with its prompt (both tools' max_length); xtune packs a pair into rows of 2 x MAX_LENGTH."""
PROMPT_TOKENS = (16, 512)
ANSWER_TOKENS = (32, 768)
BETA, LOSS_TYPE = 0.1, "sigmoid"
LORA_DROPOUT = 0.0
TINY = "xtune-tiny/internlm2-chat"
MODELS = ("tiny", *harness.MODELS)
PEERS = {
    "xtune_packed": "xtune", "xtune_unpacked": "xtune", "trl": "trl",
    "xtune_packed_precomputed": "xtune", "xtune_unpacked_precomputed": "xtune", "trl_precomputed": "trl",
}  # fmt: skip
"""`*_precomputed`: the reference's log-probabilities computed in one pass over the data before training (xtune's
`precompute_reference = True`, TRL's `precompute_ref_log_probs=True`), in the process's time, not in its steps: the
steps run no reference forward."""
COMPARED = [("xtune_packed", "trl"), ("xtune_unpacked", "trl"), ("xtune_packed", "trl_precomputed"),
            ("xtune_packed_precomputed", "trl_precomputed"), ("xtune_unpacked_precomputed", "trl_precomputed")]  # fmt: skip
SAME_BATCHES = [("xtune_unpacked", "trl"), ("xtune_unpacked_precomputed", "trl_precomputed")]
CHECKED_PAIRS = 40

DPO_CHAT_TEMPLATE = (  # xtune's internlm2_chat; the last assistant turn ends at <|im_end|>, so TRL trains what xtune does
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if not (loop.last and message['role'] == 'assistant') %}{{ '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------- shared setup (main venv)


def model_folders(work: Path, model: str, seed: int) -> dict:
    """What xtune loads (a name or a folder) and the Llama-layout folder TRL loads: the same weights."""
    if model == "tiny":
        from xtune.models.internlm2 import llama_layout_copy
        from xtune.paths import xtune_home
        from xtune.testing.tiny import tiny_model_path

        llama = llama_layout_copy(tiny_model_path(TINY.split("/", 1)[1]), xtune_home() / "llama-layout")
        return {"xtune_model": TINY, "trl_model": str(llama)}
    folder = harness.build_model_folder(work / "assets", model, seed)
    return {"xtune_model": str(folder), "trl_model": str(folder)}


def build_pairs(folder: Path, count: int, seed: int) -> Path:
    """`count` preference records as jsonl, built once: {"prompt": [user], "chosen": [assistant], "rejected": [...]}."""
    from xtune.testing.tiny import CORPUS, build_tokenizer

    path = folder / f"pairs_{count}_seed{seed}.jsonl"
    if path.is_file():
        return path
    tokenizer = build_tokenizer()
    words = CORPUS.read_text().split()
    probe = " ".join(random.Random(seed).choices(words, k=2000))
    tokens_per_word = len(tokenizer(probe, add_special_tokens=False).input_ids) / 2000
    rng = random.Random(seed)

    def log_uniform(low: float, high: float) -> float:
        return math.exp(rng.uniform(math.log(low), math.log(high)))

    def word_count(tokens: float) -> int:
        return max(2, round(tokens / tokens_per_word))

    lines = []
    for _ in range(count):
        prompt_tokens = log_uniform(*PROMPT_TOKENS)
        room = MAX_LENGTH - prompt_tokens - 80  # the template's tokens, and the words' token counts varying
        prompt = rng.choices(words, k=word_count(prompt_tokens))
        chosen = list(itertools.islice(itertools.cycle(prompt), word_count(min(log_uniform(*ANSWER_TOKENS), room))))
        rejected = rng.choices(words, k=word_count(min(log_uniform(*ANSWER_TOKENS), room)))
        lines.append(json.dumps({
            "prompt": [{"role": "user", "content": " ".join(prompt)}],
            "chosen": [{"role": "assistant", "content": " ".join(chosen)}],
            "rejected": [{"role": "assistant", "content": " ".join(rejected)}],
        }))  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".partial")
    staging.write_text("\n".join(lines) + "\n")
    staging.rename(path)
    return path


def xtune_config(spec: dict, **overrides):
    from xtune.config.schema import Config

    settings = dict(
        llm_name_or_path=spec["xtune_model"], data_path=spec["data"], prompt_template="internlm2_chat", stage="dpo",
        beta=BETA, loss_type=LOSS_TYPE, max_length=MAX_LENGTH, lora_r=LORA["r"], lora_alpha=LORA["alpha"],
        lora_dropout=LORA_DROPOUT, seed=0,
    )  # fmt: skip
    return Config(**(settings | overrides))


def plan_batches(assets: dict, max_steps: int | None) -> dict:
    """Encode and pack the pairs as xtune does: the unpacked batch B (as many steps an epoch as packed rows), the
    unpacked runs' batches in order (xtune's plan, which TRL is given), and the first pairs' token ids and trained
    positions for TRL's worker to compare with its own."""
    from xtune.data.packing import pack_groups, packing_efficiency
    from xtune.data.dataset import prepare_pairs
    from xtune.engine.train import batch_plan
    from xtune.models.load import load_tokenizer, resolve_model_path

    config = xtune_config(assets)
    pairs, report = prepare_pairs(config, load_tokenizer(resolve_model_path(config.llm_name_or_path)))
    records = sum(1 for line in Path(assets["data"]).read_text().splitlines() if line.strip())
    if report.truncated or report.samples != records:
        raise SystemExit(f"{assets['data']}: {report.truncated} pairs over max_length {MAX_LENGTH}, {report.samples} of "
                         f"{records} kept; the generator must keep every pair whole")  # fmt: skip
    rows = pack_groups(pairs, 2 * MAX_LENGTH, 2, shuffle_seed=0)
    batch_size = max(1, round(len(pairs) / len(rows)))
    steps = max(max_steps or 0, math.ceil(len(pairs) / batch_size))  # TRL's dataset: every pair, in xtune's order
    plan = [indices for _, indices in itertools.islice(batch_plan(len(pairs), batch_size, 0, report.lengths), steps)]
    if any(len(indices) != batch_size for indices in plan):
        raise SystemExit(f"xtune's plan has a batch of fewer than {batch_size} pairs: give --pairs a multiple of it, "
                         "so that TRL's sequential batches are xtune's")  # fmt: skip
    order = [i for indices in plan for i in indices]
    answers = [len(sample.input_ids) for pair in pairs for sample in pair]
    prompts = [next(k for k, label in enumerate(chosen.labels) if label != -100) for chosen, _ in pairs]
    checked = [
        {side: {"input_ids": sample.input_ids, "trained": [k for k, label in enumerate(sample.labels) if label != -100]}
         for side, sample in zip(("chosen", "rejected"), pairs[i])}
        for i in order[:CHECKED_PAIRS]
    ]  # fmt: skip
    return {
        "pairs": len(pairs), "tokens": sum(answers), "trained_tokens": report.trained_tokens,
        "median_prompt_and_answer": statistics.median(answers), "median_prompt": statistics.median(prompts),
        "max_prompt_and_answer": max(answers), "packed_rows": len(rows),
        "packing_efficiency": packing_efficiency(rows, 2 * MAX_LENGTH), "steps_per_epoch": len(rows),
        "unpacked_batch_size": batch_size, "order": order, "checked": checked,
    }  # fmt: skip


def dpo_flops(shape: dict, lora_r: int, documents: list[int]) -> float:
    """The policy's LoRA step (`train_throughput.model_flops`: forward and backward) plus the reference's forward:
    2 per frozen weight per token (the adapter is off) and causal attention's 2 n^2 d per layer. Padding not counted."""
    h, i, layers, vocab = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    head_dim = h // shape["num_attention_heads"]
    kv, attention_out = shape["num_key_value_heads"] * head_dim, shape["num_attention_heads"] * head_dim
    frozen = layers * (2 * h * attention_out + 2 * h * kv + 3 * h * i) + h * vocab
    reference = 2 * frozen * sum(documents) + 2 * layers * attention_out * sum(n * n for n in documents)
    return harness.model_flops(shape, lora_r, documents) + reference


# ---------------------------------------------------------------- measuring inside a worker


class BackboneTimer:
    """Wall time of the decoder stack's forward calls in each step, with gradients (the policy's) and without (the
    reference's). The CPU runs them synchronously, so the time between the hooks is the forward's."""

    def __init__(self):
        self.steps: list[dict] = []

    def attach(self, model):
        backbone = next(m for m in model.modules() if hasattr(m, "embed_tokens") and hasattr(m, "layers"))
        backbone.register_forward_pre_hook(self._start)
        backbone.register_forward_hook(self._stop)
        return model

    def next_step(self) -> None:
        self.steps.append({"policy_forward_s": 0.0, "reference_forward_s": 0.0})

    def _start(self, module, args) -> None:
        self.started = time.perf_counter()

    def _stop(self, module, args, output) -> None:
        import torch

        if self.steps:
            key = "policy_forward_s" if torch.is_grad_enabled() else "reference_forward_s"
            self.steps[-1][key] += time.perf_counter() - self.started


class StepProfiler:
    """torch.profiler over one step (`step`, 1-based); its operator tables go to `folder`/profile.txt: by self time,
    by time with what an operator calls (`aten::linear`, autograd's backward nodes, the optimizer step), and by
    input shape."""

    def __init__(self, step: int | None, folder: Path):
        self.step, self.folder, self.profile, self.top = step, folder, None, {}

    def begin(self, step: int) -> None:
        import torch

        if step == self.step:
            self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
            self.profile.__enter__()
            self.started = time.perf_counter()

    def end(self, step: int) -> None:
        if self.profile is None or step != self.step:
            return
        self.profile.__exit__(None, None, None)
        wall = time.perf_counter() - self.started
        averages = self.profile.key_averages()
        tables = [averages.table(sort_by=key, row_limit=40) for key in ("self_cpu_time_total", "cpu_time_total")]
        by_shape = self.profile.key_averages(group_by_input_shape=True)
        tables.append(by_shape.table(sort_by="self_cpu_time_total", row_limit=30))
        (self.folder / "profile.txt").write_text("\n\n".join(tables))
        total = sum(event.self_cpu_time_total for event in averages)

        def rows(key: str) -> list[dict]:
            ranked = sorted(averages, key=lambda event: -getattr(event, key))[:25]
            return [{"op": event.key, "self_ms": event.self_cpu_time_total / 1e3, "total_ms": event.cpu_time_total / 1e3,
                     "share": getattr(event, key) / total, "calls": event.count} for event in ranked]  # fmt: skip

        self.top = {"wall_s": wall, "self_ms": total / 1e3, "by_self": rows("self_cpu_time_total"),
                    "by_total": rows("cpu_time_total")}  # fmt: skip
        self.profile = None


def _count(input_ids, trained_mask, documents: list[int]) -> dict:
    """The tokens of a batch, as train_throughput counts them: sample tokens, what the model ran over (padding
    included), and the trained tokens (positions predicted: the first position never is)."""
    return {"tokens": int(sum(documents)), "processed": int(input_ids.numel()),
            "trained": int(trained_mask[:, 1:].sum()), "documents": [int(n) for n in documents]}  # fmt: skip


# ---------------------------------------------------------------- workers (run inside each tool's venv)


def xtune_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import xtune.engine.train as engine
    from rich.console import Console

    batches, timer, profiler = [], BackboneTimer(), StepProfiler(spec.get("profile_step"), Path(spec["work_dir"]))
    rank_batch, prepare_trainable = engine.rank_batch, engine.prepare_trainable

    def counting(*args, **kwargs):  # the loop collates each step's batch as the step begins
        profiler.end(len(batches))
        timer.next_step()
        profiler.begin(len(batches) + 1)
        batch = rank_batch(*args, **kwargs)
        answers = batch["answer_ids"].flatten()  # each position's answer, packed or not; -1 on padding
        documents = torch.bincount(answers[answers >= 0]).tolist()
        batches.append(_count(batch["input_ids"], batch["labels"] != -100, documents))
        return batch

    engine.rank_batch = counting
    engine.prepare_trainable = lambda model, *args, **kwargs: timer.attach(prepare_trainable(model, *args, **kwargs))
    precompute = {"precompute_reference": True} if spec["precompute"] else {}
    config = xtune_config(
        spec, **precompute, pack_to_max_length=spec["packed"], batch_size=spec["batch_size"], accumulative_counts=1,
        max_epochs=1, max_steps=spec["max_steps"], lr=LR, warmup_ratio=WARMUP_RATIO, max_norm=MAX_NORM,
        dtype=spec["dtype"], gradient_checkpointing=False, work_dir=spec["work_dir"], save_steps=10**9, logging_steps=1,
        evaluation_inputs=[], device="cpu",
    )  # fmt: skip
    started = time.perf_counter()
    result = engine.train(config, Console(file=open(os.devnull, "w")))
    wall = time.perf_counter() - started
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    return {
        "steps": [
            {"loss": m["loss"], "end_s": m["elapsed_s"], "margin": m.get("rewards/margins"),
             "accuracy": m.get("rewards/accuracies"), **batches[k], **timer.steps[k]}
            for k, m in enumerate(steps)
        ],
        "train_call_s": wall, "dtype": str(engine.resolve_dtype(config.dtype, torch.device("cpu"))), "profile": profiler.top,
    }  # fmt: skip


def trl_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    timer, profiler = BackboneTimer(), StepProfiler(spec.get("profile_step"), Path(spec["work_dir"]))
    step_ends, logged = [], []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            timer.next_step()
            profiler.begin(state.global_step + 1)

        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter() - self.start)
            profiler.end(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged.append(logs)

    dtype = getattr(torch, TORCH_DTYPES[spec["dtype"]])
    tokenizer = AutoTokenizer.from_pretrained(spec["trl_model"])
    tokenizer.chat_template = DPO_CHAT_TEMPLATE
    dataset = load_dataset("json", data_files=spec["data"], split="train").select(spec["order"])
    args = DPOConfig(
        output_dir=spec["work_dir"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        num_train_epochs=1, max_steps=spec["max_steps"] or -1, learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=round(WARMUP_RATIO * (spec["max_steps"] or spec["steps_per_epoch"])), weight_decay=0.0,
        max_grad_norm=MAX_NORM, optim="adamw_torch_fused", bf16=spec["dtype"] == "bf16", fp16=spec["dtype"] == "fp16",
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[], max_length=MAX_LENGTH,
        padding_free=False, precompute_ref_log_probs=spec["precompute"], beta=BETA, loss_type=[LOSS_TYPE],
        train_sampling_strategy="sequential", seed=0, use_cpu=True, model_init_kwargs={"dtype": dtype},
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA_DROPOUT, target_modules="all-linear",
                             task_type="CAUSAL_LM")  # fmt: skip
    trainer = DPOTrainer(model=spec["trl_model"], args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Timer()])  # fmt: skip
    agreement = token_agreement(trainer.train_dataset, spec["checked"])
    timer.attach(trainer.model)
    batches, collator = [], trainer.data_collator

    def counting(examples):
        batch = collator(examples)
        batches.append(_count(batch["input_ids"], batch["completion_mask"].bool(), batch["attention_mask"].sum(1).tolist()))
        return batch

    trainer.data_collator = counting
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    return {
        "steps": [
            {"loss": log["loss"], "end_s": end, "margin": log.get("rewards/margins"),
             "accuracy": log.get("rewards/accuracies"), **batches[k], **timer.steps[k]}
            for k, (log, end) in enumerate(zip(logged, step_ends))
        ],
        "train_call_s": wall, "dtype": f"{dtype} weights; bf16/fp16=True: autocast", "token_agreement": agreement,
        "model_dtype": str(next(trainer.model.parameters()).dtype), "profile": profiler.top,
    }  # fmt: skip


def token_agreement(dataset, checked: list[dict]) -> dict:
    """Of the first pairs TRL will train (its tokenized dataset, in order), how many have exactly xtune's token ids and
    trained positions in both answers. xtune's rows also hold the newline after the answer's <|im_end|>, untrained."""
    same = 0
    for row, xtune in zip(dataset, checked):
        agree = True
        for side in ("chosen", "rejected"):
            ids = row["prompt_ids"] + row[f"{side}_ids"]
            trained = list(range(len(row["prompt_ids"]), len(ids)))
            theirs = xtune[side]
            agree &= ids == theirs["input_ids"][: len(ids)] and trained == theirs["trained"]
        same += agree
    return {"checked": len(checked), "same": same}


def worker_main(kind: str, spec_path: str) -> None:
    started = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    result = {"xtune": xtune_worker, "trl": trl_worker}[kind](spec)
    result["process_s"] = time.perf_counter() - started
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------- orchestration


def run_one(name: str, repeat: int, assets: dict, plan: dict, args, out_dir: Path, compute: str, home: Path) -> dict:
    tool = PEERS[name]
    work_dir = out_dir / f"{name}_{repeat}"
    work_dir.mkdir(parents=True, exist_ok=True)
    packed = name.startswith("xtune_packed")
    spec = {
        **assets, "packed": packed, "threads": args.threads, "work_dir": str(work_dir), "dtype": compute,
        "batch_size": 1 if packed else plan["unpacked_batch_size"], "max_steps": args.max_steps,
        "steps_per_epoch": plan["steps_per_epoch"], "order": plan["order"], "checked": plan["checked"],
        "result": str(work_dir / "result.json"), "profile_step": args.profile_step,
        "precompute": name.endswith("_precomputed"),
    }  # fmt: skip
    (work_dir / "spec.json").write_text(json.dumps(spec))
    python = TRL_PYTHON if tool == "trl" else harness.MAIN_PYTHON
    env = {**os.environ, "XTUNE_HOME": str(home), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}  # fmt: skip
    load = os.getloadavg()
    started = time.perf_counter()
    with open(work_dir / "log.txt", "w") as log:
        code = subprocess.call([str(python), __file__, "--worker", tool, "--spec", str(work_dir / "spec.json")],
                               stdout=log, stderr=log, env=env)  # fmt: skip
    wall = time.perf_counter() - started
    if code != 0:
        tail = (work_dir / "log.txt").read_text()[-3000:]
        raise SystemExit(f"{name} (repeat {repeat}) failed with exit code {code}; log {work_dir / 'log.txt'}:\n{tail}")
    result = json.loads((work_dir / "result.json").read_text())
    return summarize(name, repeat, result, wall, load, assets["shape"])


def summarize(name: str, repeat: int, result: dict, wall: float, load: tuple, shape: dict) -> dict:
    steps = result["steps"]
    steady = steps[1:]  # the first step warms up allocators and kernels
    seconds = steps[-1]["end_s"] - steps[0]["end_s"]
    flops = sum(dpo_flops(shape, LORA["r"], s["documents"]) for s in steady)
    return {
        "peer": name, "repeat": repeat, "steps": len(steps), "steady_seconds": seconds,
        "step_s": seconds / len(steady), "pairs_per_step": statistics.fmean(len(s["documents"]) / 2 for s in steps),
        "tokens_per_s": sum(s["tokens"] for s in steady) / seconds,
        "trained_tokens_per_s": sum(s["trained"] for s in steady) / seconds,
        "padding_share": 1 - sum(s["tokens"] for s in steps) / sum(s["processed"] for s in steps),
        "model_tflops_per_s": flops / seconds / 1e12,
        "policy_forward_share": sum(s["policy_forward_s"] for s in steady) / seconds,
        "reference_forward_share": sum(s["reference_forward_s"] for s in steady) / seconds,
        "losses": [s["loss"] for s in steps], "margins": [s["margin"] for s in steps],
        "accuracies": [s["accuracy"] for s in steps], "trained_per_step": [s["trained"] for s in steps],
        "peak_rss_gib": result["peak_rss_gib"], "process_wall_s": wall, "train_call_s": result["train_call_s"],
        "load_avg_at_start": load, "dtype": result.get("dtype"), "token_agreement": result.get("token_agreement"),
        "profile": result.get("profile"),
    }  # fmt: skip


MEANS = ("step_s", "pairs_per_step", "tokens_per_s", "trained_tokens_per_s", "padding_share", "model_tflops_per_s",
         "policy_forward_share", "reference_forward_share", "peak_rss_gib", "process_wall_s")  # fmt: skip


def aggregate(runs: list[dict], peak_gflops: float) -> dict:
    by_peer = {}
    for name in PEERS:
        mine = [r for r in runs if r["peer"] == name]
        if mine:
            by_peer[name] = {key: statistics.fmean(r[key] for r in mine) for key in MEANS}
            by_peer[name]["mfu"] = by_peer[name]["model_tflops_per_s"] * 1e3 / peak_gflops
            by_peer[name]["runs"] = len(mine)
            by_peer[name]["losses"] = [statistics.fmean(values) for values in zip(*(r["losses"] for r in mine))]
    ratios = {}
    for name, peer in COMPARED:
        if name in by_peer and peer in by_peer:
            ours, theirs = by_peer[name], by_peer[peer]
            ratios[f"{name} / {peer} trained tokens/s"] = ours["trained_tokens_per_s"] / theirs["trained_tokens_per_s"]
            ratios[f"{name} / {peer} peak RSS"] = ours["peak_rss_gib"] / theirs["peak_rss_gib"]
            pairs = [(o, t) for o in runs for t in runs if o["peer"] == name and t["peer"] == peer and o["repeat"] == t["repeat"]]
            ratios[f"{name} / {peer} trained tokens/s per repeat"] = [
                o["trained_tokens_per_s"] / t["trained_tokens_per_s"] for o, t in pairs
            ]
    return {"by_peer": by_peer, "ratios": ratios}


def loss_comparison(runs: list[dict]) -> dict:
    """xtune unpacked vs TRL, the same batches in the same order: the largest step-to-step difference of their loss
    curves, against how far the loss moved from log 2 (where both start: the policy is its reference)."""
    found = {}
    mine = {name: [r for r in runs if r["peer"] == name] for name in PEERS}
    for name, peer in SAME_BATCHES:
        if mine[name] and mine[peer]:
            ours, theirs = mine[name][0]["losses"], mine[peer][0]["losses"]
            found[f"{name} vs {peer}: max abs difference of the losses"] = max(abs(a - b) for a, b in zip(ours, theirs))
            found[f"{name} vs {peer}: steps"] = min(len(ours), len(theirs))
            found[f"{name} vs {peer}: largest move from log 2"] = max(abs(v - math.log(2)) for v in ours + theirs)
            found[f"{name} vs {peer}: same trained tokens every step"] = (
                mine[name][0]["trained_per_step"] == mine[peer][0]["trained_per_step"]
            )
    for name, same in mine.items():  # different batches (packed rows): compare the mean loss after the first step
        if same and len(same[0]["losses"]) > 2:
            losses = same[0]["losses"][1:]
            found[f"{name}_mean_loss_after_step_1"] = statistics.fmean(losses)
            found[f"{name}_its_standard_error"] = statistics.stdev(losses) / math.sqrt(len(losses))
    for name, same in mine.items():  # repeats of a configuration should be deterministic
        if len(same) > 1:
            found[f"{name}_repeat_max_abs_difference"] = max(
                abs(a - b) for r in same[1:] for a, b in zip(same[0]["losses"], r["losses"])
            )
    return found


def markdown(report: dict) -> str:
    args, plan, dtype = report["args"], report["plan"], report["dtype"]
    summary = report["summary"]["by_peer"]
    lines = [
        f"`{report['command']}` ({report['machine']}; {harness.cpu_flags_text(report['cpu']['flags'])}; torch threads "
        f"{args['threads']}; compute dtype {dtype}; {dtype} matmul peak {report['peak'][f'{dtype}_gflops']:.0f} GFLOP/s; "
        f"load average {report['load_before']} before, {report['load_after']} after)",
        "",
        f"Data: {plan['pairs']} pairs, {plan['tokens']:,} tokens in their {2 * plan['pairs']} prompt + answer sequences "
        f"({plan['trained_tokens']:,} answer tokens trained), prompt + answer median {plan['median_prompt_and_answer']:.0f}, "
        f"max {plan['max_prompt_and_answer']}; packed: {plan['packed_rows']} rows of {2 * MAX_LENGTH} "
        f"({plan['packing_efficiency']:.1%} sample tokens), 1 a step; unpacked: {plan['unpacked_batch_size']} pairs a step.",
        "",
        "| run | steps | pairs/step | step s | tokens/s | trained tokens/s | padding | MFU | policy fwd | reference fwd "
        "| peak RSS | first loss | last loss | process s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = report["runs"]
    for name, row in summary.items():
        steps = next(r["steps"] for r in runs if r["peer"] == name)
        lines.append(
            f"| {name} | {steps} | {row['pairs_per_step']:.2f} | {row['step_s']:.2f} | {row['tokens_per_s']:,.0f} | "
            f"{row['trained_tokens_per_s']:,.0f} | {row['padding_share']:.1%} | {row['mfu']:.1%} | "
            f"{row['policy_forward_share']:.0%} | {row['reference_forward_share']:.0%} | {row['peak_rss_gib']:.2f} GiB | "
            f"{row['losses'][0]:.4f} | {row['losses'][-1]:.4f} | {row['process_wall_s']:.0f} |"
        )
    lines.append("")
    lines += harness.ratio_lines(report["summary"]["ratios"])
    for key, value in report["loss_comparison"].items():
        lines.append(f"- {key}: {value:.4g}" if isinstance(value, float) else f"- {key}: {value}")
    agreement = next((r["token_agreement"] for r in runs if r.get("token_agreement")), None)
    if agreement:
        lines.append(f"- TRL's tokens vs xtune's: {agreement['same']} of {agreement['checked']} pairs the same ids and trained positions")
    names = list(summary)
    lines += ["", "| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in range(max(len(summary[n]["losses"]) for n in names)):
        cells = [f"{summary[n]['losses'][k]:.4f}" if k < len(summary[n]["losses"]) else "" for n in names]
        lines.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def source_state() -> dict:
    """The commit the xtune runs imported, and the files of src/ that differed from it (others' edits in progress)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=harness.ROOT, capture_output=True, text=True).stdout

    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "changed": git("status", "--short", "src").splitlines()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--peers", default="xtune_packed,trl,xtune_unpacked")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=240, help="pairs generated (a multiple of the unpacked batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=12, help="stop each run after this many steps (0: one epoch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["auto", *TORCH_DTYPES], default="auto",
                        help="compute dtype of every peer; auto: what xtune's dtype = 'auto' picks here")  # fmt: skip
    parser.add_argument("--profile-step", type=int, default=None, help="profile this step (1-based) of every run")
    parser.add_argument("--work-dir", default=str(BENCH / "runs"))
    parser.add_argument("--out", default=None, help="JSON report (default: <work-dir>/dpo_throughput_<model>.json)")
    parser.add_argument("--worker", choices=["xtune", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker, args.spec)
    args.max_steps = args.max_steps or None
    if args.max_steps is not None and args.max_steps < 2:
        parser.error("--max-steps: at least 2 (the first step is left out of the throughput)")
    peers = args.peers.split(",")
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {sorted(PEERS)}")
    if "trl" in peers:
        harness.ensure_trl_venv("cpu")
    work = Path(args.work_dir)
    home = work / "xtune_home"
    os.environ["XTUNE_HOME"] = str(home)  # the tiny model, and its Llama-layout copy, where the workers find them
    assets = model_folders(work, args.model, args.seed) | {"data": str(build_pairs(work / "assets", args.pairs, args.seed))}
    assets["shape"] = json.loads((Path(assets["trl_model"]) / "config.json").read_text())
    plan = plan_batches(assets, args.max_steps)
    print(json.dumps({k: v for k, v in plan.items() if k not in ("order", "checked")}), flush=True)
    from xtune.engine.device import cpu_flags

    compute = harness.compute_dtype("cpu", args.dtype)
    cpu = {"model": harness.cpu_name(), "flags": sorted(cpu_flags() & set(harness.CPU_FLAGS), key=harness.CPU_FLAGS.index)}
    print(json.dumps({"dtype": compute, "cpu": cpu}), flush=True)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    peaks = [harness.matmul_peak(args.threads, harness.peak_dtypes(compute))]
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    out_dir = work / f"dpo_{args.model}_{stamp}"
    runs = []
    for repeat in range(args.repeats):
        for name in peers:
            summary = run_one(name, repeat, assets, plan, args, out_dir, compute, home)
            runs.append(summary)
            print(json.dumps({k: v for k, v in summary.items() if k not in ("profile", "margins", "accuracies")}), flush=True)
    peaks.append(harness.matmul_peak(args.threads, harness.peak_dtypes(compute)))
    peak = {key: max(p[key] for p in peaks) for key in peaks[0]}
    report = {
        "date": datetime.date.today().isoformat(), "load_before": " ".join(load_before),
        "load_after": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "command": "python benchmarks/dpo_throughput.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {harness.cpu_name()}", "cpu": cpu, "dtype": compute,
        "args": {**vars(args), "peers": peers}, "plan": {k: v for k, v in plan.items() if k != "checked"},
        "peak": peak, "peaks": peaks, "runs": runs, "summary": aggregate(runs, peak[f"{compute}_gflops"]),
        "loss_comparison": loss_comparison(runs), "versions": harness.versions(), "xtune_source": source_state(),
    }  # fmt: skip
    out = Path(args.out) if args.out else work / f"dpo_throughput_{args.model}.json"
    out.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    for run in runs:
        if run["profile"]:
            profile = run["profile"]
            print(f"\nprofile of step {args.profile_step}, {run['peer']} (repeat {run['repeat']}): {profile['wall_s']:.2f} s "
                  f"wall, {profile['self_ms'] / 1e3:.2f} s of operator self time")
            for title, key in (("by self time", "by_self"), ("with what they call", "by_total")):
                print(f"  top operators {title}:")
                for row in profile[key][:15]:
                    print(f"    {row['op'][:55]:<55} self {row['self_ms']:8.1f} ms, total {row['total_ms']:8.1f} ms "
                          f"({row['share']:6.1%}), {row['calls']:5d} calls")

if __name__ == "__main__":
    main()
