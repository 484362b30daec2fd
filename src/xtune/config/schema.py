"""The one typed schema every config is loaded into.

Field names follow XTuner's where XTuner has one, so edits of an XTuner config carry over verbatim.
A config is data: code reads it and builds objects; the config never builds anything itself.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ALIASES = {"pretrained_model_name_or_path": "llm_name_or_path", "dpo_loss_type": "loss_type", "loss_beta": "beta",
           "dataset_map_fn": "dataset_format", "alpaca_en_path": "data_path", "penalty_type": "reward_penalty",
           "penalty_weight": "reward_penalty_weight"}
"""Other names users know for a field (XTuner's own alternatives) -> our field name."""

OTHER_TOOLS_NAMES = {
    "learning_rate": "lr", "num_train_epochs": "max_epochs", "epochs": "max_epochs",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "accumulative_counts", "max_grad_norm": "max_norm", "max_seq_length": "max_length",
    "cutoff_len": "max_length", "model_name_or_path": "llm_name_or_path", "output_dir": "work_dir",
    "lora_rank": "lora_r", "lora_target": "lora_target_modules", "target_modules": "lora_target_modules",
    "packing": "pack_to_max_length", "template": "prompt_template", "dataset": "data_path",
    "optim": "optim_type", "max_steps_per_epoch": "max_steps", "bf16": "dtype", "fp16": "dtype",
    "moe_aux_loss_coef": "router_aux_loss_coef", "val_size": "val_split", "eval_dataset": "val_data_path",
    "evaluation_dataset": "val_data_path", "metric_for_best_model": "save_best", "load_best_model_at_end": "save_best",
    "use_varlen_attn": "pack_to_max_length", "max_iters": "max_steps", "every_n_iters": "evaluation_freq",
    "max_keep_ckpts": "save_total_limit",
}  # fmt: skip
"""Names of the same settings in Hugging Face's Trainer, TRL, LLaMA-Factory and torchtune -> ours: suggested in
the unknown-key error, not accepted (a config reads one way)."""


class DatasetSource(BaseModel):
    """One source of a mix of datasets."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)
    path: str
    """A file (.json, .jsonl, .parquet, .csv, .txt), a folder of them, a saved Hugging Face dataset
    folder, or `xtune-tiny/<name>`."""
    format: str = "auto"
    """Record format, as `dataset_format`."""
    repeats: float = Field(1.0, ge=0)
    """How often each record is used: 2 = twice, 0.5 = a seeded random half."""
    image_folder: str | None = None
    """Folder relative image paths of this source are read from."""
    max_dataset_length: int | None = Field(None, gt=0)
    """Use a random this many of the source's records (drawn with `seed`), before repeats; None uses all."""


class Config(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, use_attribute_docstrings=True, validate_assignment=True
    )

    # Model
    llm_name_or_path: str
    """Base model: a local folder in Hugging Face layout, a hub id found in the local Hugging Face or
    ModelScope cache, or `xtune-tiny/<name>` for a tiny model xtune builds itself."""
    trust_remote_code: bool = False
    """Run Python code shipped inside the model folder. Off unless you trust the folder's author."""
    method: Literal["lora", "full"] = "lora"
    """`lora`: train LoRA adapters on a frozen base (QLoRA when `quantization` is set); `full`: train
    every weight."""
    stage: Literal["sft", "dpo", "simpo", "orpo", "kto", "reward"] = "sft"
    """What is learned: `sft` next tokens of the answers; `dpo`, `simpo`, `orpo` a preference between two answers
    to the same prompt, from {prompt, chosen, rejected} records; `kto` desirable and undesirable answers from
    {prompt, completion, label} records; `reward` a scalar reward model on pairs (docs/preference.md)."""
    quantization: Literal["4bit", "8bit"] | None = None
    """Load the frozen base in 4-bit NF4 (QLoRA, double quantization) or 8 bits; None keeps it whole."""
    lora_r: int = Field(64, gt=0, le=65536)
    """LoRA rank."""
    lora_alpha: float = Field(16, gt=0)
    """LoRA scaling numerator: the update is scaled by lora_alpha / lora_r."""
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout on the LoRA branch's input."""
    lora_target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt; `all-linear` means every linear layer but the output head."""
    modules_to_save: list[str] = []
    """Modules trained in full next to the adapters, e.g. ["embed_tokens", "lm_head"] when new special
    tokens were added to the tokenizer."""
    use_dora: bool = False
    """DoRA: learn each adapted weight's magnitude apart from its direction (peft)."""
    use_rslora: bool = False
    """rsLoRA: scale the update by lora_alpha / sqrt(lora_r), which keeps high ranks stable (peft)."""
    freeze_llm: bool = False
    """Train no weight of the language model except `modules_to_save` (no adapters on it): e.g. only the
    embeddings of new tokens, or, for LLaVA, only the projector."""

    # Multimodal (LLaVA): set visual_encoder_name_or_path to train a vision-language model
    visual_encoder_name_or_path: str | None = None
    """A CLIP or SigLIP vision encoder (local folder, cached hub id, or `xtune-tiny/clip-vision`). Its patch
    features, projected into the LLM, take the place of each `<image>` in the text."""
    visual_select_layer: int = -2
    """Hidden layer of the vision encoder whose patch features are used (CLIP's CLS token dropped)."""
    projector_depth: int = Field(2, gt=0)
    """Linear layers of the projector (Linear, then GELU + Linear per extra layer)."""
    pretrained_pth: str | None = None
    """A trained projector to start from: the pretrain run's checkpoint-<step> folder (or its projector/)."""
    freeze_projector: bool = False
    """Keep the projector's weights fixed (e.g. tuning only the LLM after stage 2)."""
    freeze_visual_encoder: bool = True
    """Keep the vision encoder's weights fixed (unless visual_encoder_lora)."""
    visual_encoder_lora: bool = False
    """LoRA adapters on the vision encoder's linear layers."""
    visual_encoder_quantization: Literal["4bit", "8bit"] | None = None
    """Load the vision encoder in 4-bit NF4 or 8 bits (QLoRA on it with visual_encoder_lora)."""
    visual_encoder_lora_r: int = Field(64, gt=0, le=65536)
    """LoRA rank on the vision encoder."""
    visual_encoder_lora_alpha: float = Field(16, gt=0)
    """LoRA scaling numerator on the vision encoder."""
    pad_image_to_square: bool = False
    """Pad images to a square with the processor's mean colour before resizing (LLaVA's finetune stage),
    instead of the processor's resize and centre crop."""
    evaluation_images: list[str] = []
    """Images for evaluation_inputs: one per input, or one for all; each input gets `<image>` put in front
    of it when it has none."""

    # Data
    data_root: str = "./data/"
    """Folder the data paths are usually written relative to (`data_path = data_root + 'x.json'`)."""
    data_path: str | None = None
    """Training data: a file (.json, .jsonl, .parquet, .csv, .txt), a folder of them, a saved Hugging
    Face dataset folder, or `xtune-tiny/<name>` for a dataset xtune generates itself."""
    dataset_format: str = "auto"
    """Record format: `auto` (detected per file from its first record), `conversation` (XTuner),
    `alpaca`, `openai` (messages), `sharegpt`, `llava`, `text` (pretraining), XTuner's dataset names (`alpaca_zh`,
    `sql`, ... or `alpaca_zh_map_fn`; `xtune list-dataset-format` lists them; `dataset_map_fn` is another name for
    this key; None, as XTuner writes it, is `conversation`), or the dotted path of your own map function from a raw
    record to a Conversation,
    `package.module:function`."""
    datasets: list[DatasetSource] = []
    """Several sources mixed, each with its own format and repeats; used with or instead of data_path."""
    max_dataset_length: int | None = Field(None, gt=0)
    """Use a random this many records of each source (drawn with `seed`, before repeats), as XTuner's key does; a
    source in `datasets` may set its own. None uses all."""
    image_folder: str | None = None
    """Folder relative image paths in the data are read from; None reads them from the current folder."""
    skip_bad_records: bool = False
    """Leave out records that do not fit their format, and count them, instead of stopping at the first."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """What to do with samples longer than max_length: cut them, or leave them out. Both are counted."""
    train_on_last_turn_only: bool = False
    """Take the loss on the last assistant turn only, instead of on every assistant turn."""
    split_rounds: bool = False
    """Each trained answer of a multi-round record becomes a sample of its own, the turns before it as context (for
    qwen3 / deepseek_r1, whose history drops earlier reasoning, so only an answer to the last question is trained)."""
    group_by_length: bool = True
    """Unpacked training: batch samples of similar length together (seeded), to cut padding."""
    num_proc: int = Field(1, gt=0)
    """Processes that tokenize the data (`xtune preprocess` and the first run build a cache)."""
    split_special_tokens: bool = False
    """Read a special token's text inside the data's messages (`<|im_end|>` typed in a reply) as plain text, as
    chat and serve always read what users type; False keeps it the control token, as most trainers do."""
    prompt_template: str = "internlm2_chat"
    """Chat template the samples are rendered with, and chat later uses."""
    enable_thinking: bool = True
    """False: no reasoning block is trained, and templates with the switch (qwen3; `hf` passes it to the jinja)
    write the empty block into the prompt, as their non-thinking generation prompt does. A record's own
    `enable_thinking` decides for it. Reasoning blocks are `reasoning_content` given apart, and a `<think>` in an
    answer for the templates that think (qwen3, deepseek_r1) and `hf`; for other templates a `<think>` typed in an
    answer is the answer's text."""
    train_on_thinking: bool = True
    """False: reasoning blocks (see enable_thinking) are written but not trained; the answer after each is."""
    SYSTEM: str = ""
    """System prompt put in front of every training sample that has none, and used by evaluation."""
    data_placeholders: dict[str, str] = {}
    """`{{KEY}}` in the data's texts becomes VALUE, e.g. {"name": "Aria", "author": "Acme"} for
    xtune-data/self_cognition or LLaMA-Factory's identity.json."""
    max_length: int = Field(2048, gt=1, le=16_777_216)
    """Longest sample in tokens; longer ones are truncated."""
    pack_to_max_length: bool = False
    """Concatenate samples into rows of exactly max_length tokens without attention across samples."""
    shuffle_before_pack: bool = True
    """Shuffle samples (seeded) before packing them, so that a row holds unrelated samples."""
    dataloader_num_workers: int = Field(0, ge=0, le=256)
    """Processes that collate the batches ahead of the training step (LLaVA: read and preprocess the
    images), so that the step never waits on them; 0 collates in the training process. The batches, and so
    the run, are the same either way."""

    # Optimisation
    batch_size: int = Field(1, gt=0, le=65536)
    """Samples per device per micro-batch."""
    accumulative_counts: int = Field(16, gt=0, le=65536)
    """Micro-batches accumulated into one optimizer step."""
    max_epochs: int = Field(3, gt=0, le=1_000_000)
    """Passes over the dataset."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps; overrides max_epochs when set."""
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate, reached at the end of warmup."""
    optim_type: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """AdamW (fused where available), or bitsandbytes' 8-bit AdamW, optionally paged (state pages to
    host memory under GPU memory pressure): a quarter of AdamW's optimizer memory."""
    betas: tuple[float, float] = Field((0.9, 0.999), strict=False)
    """AdamW betas, each in [0, 1)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    max_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient norm to this value; None to not clip."""
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    """Share of the steps over which the learning rate rises linearly from 0 to lr."""
    warmup_steps: int | None = Field(None, ge=0)
    """Optimizer steps over which the learning rate rises linearly from 0 to lr; set, it replaces warmup_ratio."""
    lr_min_ratio: float = Field(0.0, ge=0, le=1)
    """Cosine decay floor, as a share of lr."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute precision: `auto` is bf16 where the device runs it fast (recent GPUs, CPUs with
    AVX512-BF16 or AMX), else fp32 on CPU and fp16 on older GPUs."""
    sequence_parallel_size: int = Field(1, ge=1)
    """Split each packed row over this many processes (DeepSpeed-Ulysses, XTuner's key): each holds 1/N of the row's
    tokens, attention trades heads for tokens between them, so a row N times longer fits; the processes
    (NPROC_PER_NODE) form groups of N, data parallel between the groups. Needs pack_to_max_length (SFT or a
    preference stage; not LLaVA), and head and key/value head counts divisible by N."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How several processes (NPROC_PER_NODE > 1) share the work: `ddp` keeps a whole model on each;
    `fsdp` (PyTorch FSDP2, one shard unit per decoder layer) shards weights, gradients and optimizer
    state across them."""
    deepspeed: str | None = None
    """Run through DeepSpeed ZeRO instead: a shipped config (deepspeed_zero1, deepspeed_zero2,
    deepspeed_zero2_offload, deepspeed_zero3, deepspeed_zero3_offload) or a DeepSpeed JSON file whose
    "auto" values xtune fills from this config. `xtune train --deepspeed NAME` sets it."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """When a step's loss or gradient norm is NaN/Inf: `stop` (before the weights change; the run resumes
    from its last checkpoint) or `skip` the step (its batch is logged, the weights untouched)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    torch_compile: bool = False
    """Compile each decoder layer with torch.compile (dynamic shapes). The first steps wait for the
    compiler (a minute or more); whether later steps are faster depends on the device: measure with
    benchmarks/profile_train_step.py --levers baseline,compile."""
    fused_loss: bool = True
    """Compute the output head and the cross-entropy together, chunk by chunk, so the [tokens, vocab] logits
    never exist whole (0.76 GB in fp32 for 2,048 tokens of InternLM2's 92,544-token vocab, and as much for
    their gradient). Applies where the head is a plain linear layer whose output the model uses as it is
    (Llama/InternLM2, Mistral, Mixtral, Qwen2/3, Phi-3) and the model is not sharded (not with FSDP or ZeRO-3);
    elsewhere logits are made for the trained positions only. False: always that way."""
    router_aux_loss_coef: float | None = Field(None, ge=0)
    """MoE models (Mixtral, Qwen2/3-MoE, OLMoE, ...): weight of the router's load-balancing loss, added to the training
    (and logged) loss as transformers adds it; None takes the model's own (its config.json's router_aux_loss_coef),
    whether or not that sets output_router_logits, 0 leaves it out. Models that compute none (dense ones, DeepSeek-V2
    in transformers) refuse a value > 0."""
    seed: int = Field(0, ge=0, lt=2**63)
    """Seed for weights of new layers, data order and dropout."""

    # Preference stages (stage = "dpo" | "simpo" | "orpo" | "kto" | "reward"), XTuner's and TRL's names
    beta: float = Field(0.1, gt=0)
    """DPO and SimPO: the inverse temperature of the implicit reward beta * log(pi / pi_ref)."""
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "kto_pair", "bco_pair", "sppo_hard", "nca_pair"] = "sigmoid"
    """DPO's loss of the reward margin (xtune.engine.preference.dpo_losses)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """DPO `sigmoid`/`robust` and SimPO: the assumed share of pairs whose preference is flipped."""
    rpo_alpha: float | None = Field(None, ge=0)
    """DPO: add this times the chosen answer's per-token NLL (RPO); None leaves it out."""
    reference_free: bool = False
    """DPO against a uniform reference (log pi_ref = 0): no reference forward."""
    simpo_gamma: float = 0.5
    """SimPO: the target margin between the answers' length-normalised rewards."""
    orpo_alpha: float = Field(0.1, ge=0)
    """ORPO: the weight of the odds-ratio term next to the chosen answer's NLL."""
    desirable_weight: float = Field(1.0, gt=0)
    """KTO: the weight of a desirable answer's loss (raise it when desirable answers are the fewer)."""
    undesirable_weight: float = Field(1.0, gt=0)
    """KTO: the weight of an undesirable answer's loss."""
    reward_loss: Literal["ranking", "focal"] = "ranking"
    """Reward models: `ranking`, Bradley-Terry's -log s(r_chosen - r_rejected); `focal`, InternLM2's focal ranking
    loss, that times (1 - p)^2 with p = 2 relu(s(r_chosen - r_rejected) - 1/2), which weighs pairs already ranked
    with confidence less (XTuner's loss_type)."""
    reward_penalty: Literal["none", "log_barrier", "L2"] = "none"
    """Reward models: a penalty on each reward's size, added per pair with `reward_penalty_weight`: `log_barrier`,
    InternLM2's -log(5 - r) - log(r + 5) (r clamped within 1e-3 of -5 and 5), which keeps rewards within (-5, 5);
    `L2`, r^2 (XTuner's penalty_type)."""
    reward_penalty_weight: float = Field(0.01, ge=0)
    """Reward models: the weight of `reward_penalty` (XTuner's penalty_weight)."""
    precompute_reference: bool = False
    """DPO and KTO: compute the reference log-probabilities in one pass over the data before training and cache
    them beside the data cache, so that training keeps no reference model (a full fine-tune then needs no frozen
    copy) and runs no reference forward."""

    # Saving, logging, evaluation
    work_dir: str | None = None
    """Where runs are written; defaults to ./work_dirs/<config file name>. Each run gets its own
    timestamped folder inside."""
    save_steps: int = Field(500, gt=0)
    """Save a checkpoint every this many optimizer steps (and at the end)."""
    save_total_limit: int = Field(2, ge=-1)
    """Keep at most this many checkpoints, deleting the oldest complete ones; -1 keeps all."""
    logging_steps: int = Field(1, gt=0)
    """Write metrics every this many optimizer steps."""
    evaluation_freq: int = Field(500, gt=0)
    """Generate answers to evaluation_inputs every this many optimizer steps (and at the end)."""
    evaluation_inputs: list[str] = []
    """Prompts answered and logged during training, to watch what the model learns."""
    evaluation_max_new_tokens: int = Field(64, gt=0)
    """Answer length limit for evaluation_inputs."""
    val_data_path: str | None = None
    """Validation data (stage = "sft"), anything data_path takes: encoded as the training samples are (template,
    max_length, packing, the data cache) and never trained on; its loss is computed every eval_steps."""
    val_dataset_format: str = "auto"
    """Record format of val_data_path, as dataset_format."""
    val_split: float | None = Field(None, gt=0, lt=1)
    """Instead of val_data_path: hold this share of the distinct training samples out as validation data, picked
    with `seed` (the same for a resumed run and on any number of processes); identical samples (a record's
    repeats) stay on one side."""
    eval_steps: int | None = Field(None, gt=0)
    """Compute the validation loss every this many optimizer steps (and at the end); None: every save_steps."""
    save_best: Literal["eval_loss"] | None = None
    """`eval_loss`: also save a checkpoint at each evaluation that lowers the validation loss, and keep the best one
    besides the newest save_total_limit (pruning never deletes it); the run folder's best.json names it."""
    early_stopping_patience: int | None = Field(None, gt=0)
    """Stop training after this many evaluations in a row without a lower validation loss, saving a checkpoint."""
    report_to: list[Literal["tensorboard", "wandb"]] = []
    """Also send metrics to TensorBoard (events in the run folder) and/or Weights & Biases (project from
    WANDB_PROJECT, default xtune). metrics.jsonl and loss.png are always written."""
    device: str = "auto"
    """`auto` (cuda if available, else cpu), `cpu`, `cuda` or `cuda:N`."""


    @model_validator(mode="before")
    @classmethod
    def _no_map_function(cls, values: Any) -> Any:
        """`dataset_format = None` (XTuner's `dataset_map_fn = None`): the records are XTuner's conversation format
        already, or for a preference stage its pairs as they are."""
        if isinstance(values, dict) and "dataset_format" in values and values["dataset_format"] is None:
            values = {**values, "dataset_format": "conversation" if values.get("stage", "sft") == "sft" else "auto"}
        return values

    @model_validator(mode="after")
    def _has_data(self) -> "Config":
        if self.data_path is None and not self.datasets:
            raise ValueError("no training data: set data_path, or datasets = [{'path': ...}, ...]")
        return self

    @model_validator(mode="after")
    def _one_engine(self) -> "Config":
        if self.deepspeed is not None and self.strategy == "fsdp":
            raise ValueError("deepspeed and strategy = 'fsdp' both shard the model; choose one")
        return self

    @model_validator(mode="after")
    def _images_need_an_encoder(self) -> "Config":
        if self.visual_encoder_quantization and not self.freeze_visual_encoder and not self.visual_encoder_lora:
            raise ValueError("a quantized vision encoder cannot be trained in full; set visual_encoder_lora = True")
        if self.visual_encoder_name_or_path is not None and self.strategy == "fsdp":
            raise ValueError("LLaVA models train with strategy = 'ddp' or deepspeed = 'deepspeed_zero2', not fsdp yet")
        if self.evaluation_images and self.visual_encoder_name_or_path is None:
            raise ValueError("evaluation_images needs visual_encoder_name_or_path (a LLaVA model)")
        if len(self.evaluation_images) not in (0, 1, len(self.evaluation_inputs)):
            raise ValueError(
                f"evaluation_images has {len(self.evaluation_images)} images for {len(self.evaluation_inputs)} "
                "evaluation_inputs; give one per input, or one for all"
            )
        return self

    @model_validator(mode="after")
    def _validation_has_data(self) -> "Config":
        if self.val_split is not None and self.val_data_path is not None:
            raise ValueError("val_split and val_data_path are both set; validate on a share of the training data or "
                             "on a file of its own, not both")  # fmt: skip
        validating = self.val_split is not None or self.val_data_path is not None
        needing = [key for key in ("eval_steps", "save_best", "early_stopping_patience") if getattr(self, key)]
        if needing and not validating:
            raise ValueError(f"{needing[0]} needs validation data: set val_data_path, or val_split = 0.05 (say)")
        if validating and self.stage != "sft":
            raise ValueError(f"validation (val_data_path, val_split) computes the SFT loss; stage = '{self.stage}' "
                             "cannot use it yet: leave val_data_path and val_split unset")  # fmt: skip
        return self

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError(f"each beta must be in [0, 1), got {value}")
        return value

    @field_validator("save_total_limit")
    @classmethod
    def _keep_some(cls, value: int) -> int:
        if value == 0:
            raise ValueError("0 would delete every checkpoint; use -1 to keep all or N >= 1")
        return value


FIELD_NAMES = tuple(Config.model_fields)


def names_code(dataset_format: str) -> bool:
    """Whether a dataset format is the dotted path of a user's map function (code to import), not a format name."""
    return ":" in dataset_format or "." in dataset_format
