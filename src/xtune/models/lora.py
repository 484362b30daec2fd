"""Adapters through peft: which weights train."""

import copy
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import ParamWrapper
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from xtune.config.schema import Config
from xtune.engine.checkpoint import read_run_meta, verify_checkpoint
from xtune.errors import CheckpointError, ConfigError, XtuneError
from xtune.models.internlm2 import (
    internlm2_to_llama_adapter,
    is_internlm2,
    is_internlm2_adapter,
    llama_to_internlm2_adapter,
)


def lora_config(config: Config) -> LoraConfig:
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        use_dora=config.use_dora,
        modules_to_save=config.modules_to_save or None,
        use_rslora=config.use_rslora,
        task_type="CAUSAL_LM",
    )


def prepare_trainable(model: PreTrainedModel, config: Config, others_train: bool = False) -> PreTrainedModel | PeftModel:
    """LoRA adapters on a frozen base, every weight trainable for full fine-tuning, or with
    `freeze_llm` only the `modules_to_save` (saved as a whole model). `others_train`: parts beside the LLM
    train (LLaVA's projector), so a wholly frozen LLM is fine."""
    if config.freeze_llm and others_train and not config.modules_to_save:
        return model.requires_grad_(False)
    if config.freeze_llm:
        model.requires_grad_(False)
        chosen = [(name, module) for name, module in model.named_modules() if _named_in(name, config.modules_to_save)]
        missing = set(config.modules_to_save) - {name.rsplit(".", 1)[-1] for name, _ in chosen}
        if not config.modules_to_save or missing:
            problem = f"the model has no module named {sorted(missing)[0]!r}" if missing else "modules_to_save is empty"
            raise ConfigError(
                f"freeze_llm = True trains only modules_to_save, but {problem}; name the modules to train, "
                "e.g. modules_to_save = ['embed_tokens', 'lm_head']."
            )
        for _, module in chosen:
            module.float().requires_grad_(True)  # trained weights in fp32; autocast computes in low precision
        return model
    if config.method == "full":
        model.requires_grad_(True)
        return model
    names = [name for name, _ in model.named_modules()]
    targets = [] if config.lora_target_modules == "all-linear" else config.lora_target_modules
    for key, wanted in (("modules_to_save", config.modules_to_save), ("lora_target_modules", targets)):
        missing = sorted(w for w in wanted if not any(n == w or n.endswith("." + w) for n in names))  # peft's matching
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ConfigError(
                f"{key}: the model has no module named {missing[0]!r}; its linear layers are {', '.join(linear)} "
                "(and embed_tokens, lm_head for modules_to_save)."
            )
    lora = lora_config(config)
    if config.lora_target_modules == "all-linear":
        lora.target_parameters = fused_parameters(model) or None
    peft_model = lora_model(model, lora)
    # What the user named (an id or a folder), never the folder it resolved to (for InternLM2 under 4/8 bits, xtune's
    # private Llama-layout copy) nor null (peft's, for InternLM2 built from its config): AutoPeftModel* loads it.
    peft_model.peft_config["default"].base_model_name_or_path = config.llm_name_or_path
    return peft_model


def fused_parameters(model: PreTrainedModel) -> list[str]:
    """What `all-linear` reaches beyond `nn.Linear` in transformers 5, as peft's `target_parameters`: each MoE's fused
    experts (its `*Experts` module's 3-D parameters, e.g. `experts.gate_up_proj`) and its router's weight (a
    `*Router` module, e.g. `gate.weight`). peft finds these itself for Mixtral and Qwen3-MoE, not for Qwen2-MoE."""
    names = set()
    for name, module in model.named_modules():
        kind = type(module).__name__
        for parameter_name, parameter in module.named_parameters(recurse=False):
            experts = kind.endswith("Experts") and parameter.dim() == 3
            if experts or (kind.endswith("Router") and parameter_name == "weight"):
                names.add(f"{name.rsplit('.', 1)[-1]}.{parameter_name}")
    return sorted(names)


def lora_model(model, lora: LoraConfig) -> PeftModel:
    """peft's LoRA model around `model`, its adapters' dropout sampled by `FastDropout`.

    peft's adapters on a parameter rather than a layer (`ParamWrapper`: in transformers 5 an MoE's fused experts and
    its router, which `all-linear` reaches) refuse any dropout, and its LoRA config has one dropout for all. So the
    adapters are built without, and each layer's adapter gets `lora_dropout` afterwards; the parameters' adapters
    train without. The adapter_config.json of such a model then says lora_dropout 0, which peft can load again."""
    dropout, lora = lora.lora_dropout, copy.deepcopy(lora)
    lora.lora_dropout = 0.0
    peft_model = get_peft_model(model, lora)
    if not any(isinstance(module, ParamWrapper) for module in peft_model.modules()):
        lora.lora_dropout = dropout  # what was trained, in adapter_config.json
    for module in peft_model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if dropout and isinstance(dropouts, torch.nn.ModuleDict) and not isinstance(module, ParamWrapper):
            for name in dropouts:
                dropouts[name] = FastDropout(dropout)
    return peft_model


class FastDropout(torch.nn.Module):
    """Dropout with the distribution of `nn.Dropout(p)`, cheaper to sample on a CPU.

    PyTorch's CPU dropout draws one Mersenne-Twister number per element (`bernoulli_`), which took 27% of
    a LoRA training step of a 28M model (benchmarks/RESULTS.md): each of a layer's seven adapters drops out
    its whole input. Here one 64-bit draw gives four 15-bit uniforms, and an element is kept when its
    uniform is at least `round(p * 2**15)`: p is rounded to a multiple of 2**-15 (0.1 -> 0.100006), and
    kept elements are scaled by the inverse of the rounded keep probability, so the expectation is exact.
    Draws come from torch's default generator: seeded, saved in checkpoints, and replayed by activation
    checkpointing like any other. Off the CPU, `F.dropout` (already fast there)."""

    RESOLUTION = 1 << 15

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = min(round(p * self.RESOLUTION), self.RESOLUTION - 1)  # p -> 1 keeps 1 in 2**15

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_()
        uniforms = draws.view(torch.int16)[: x.numel()].view(x.shape) & (self.RESOLUTION - 1)
        scale = self.RESOLUTION / (self.RESOLUTION - self.threshold)
        return torch.where(uniforms >= self.threshold, x * scale, 0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _named_in(name: str, short_names: list[str]) -> bool:
    return bool(name) and name.rsplit(".", 1)[-1] in short_names


def saves_whole_model(config: Config) -> bool:
    """Whether checkpoints hold the whole model (full fine-tuning, freeze_llm) rather than an adapter."""
    return config.method == "full" or config.freeze_llm


def fit_embeddings(model: PreTrainedModel, tokenizer) -> bool:
    """Grow the embedding and output matrices when the tokenizer has more tokens than the model
    (new special tokens); returns whether it did. New rows are initialised by transformers."""
    if len(tokenizer) <= model.get_input_embeddings().num_embeddings:
        return False
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    return True


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def other_base_warning(adapter: str | Path, base: str | Path) -> str | None:
    """A warning when the adapter's run recorded a base other than `base` (by folder or repository name, so the
    same model under another path passes): LoRA shapes may fit another model of the same size, and then nothing
    else would tell."""
    adapter = Path(adapter)
    trained_on = read_run_meta(adapter).get("llm_name_or_path")
    if trained_on is None and (adapter / "adapter_config.json").is_file():
        trained_on = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not trained_on or Path(str(trained_on).rstrip("/")).name == Path(str(base).rstrip("/")).name:
        return None
    return (
        f"the adapter {adapter} was trained on {trained_on!r}, and the base given is {str(base)!r}; unless they are "
        "the same model, its answers will be wrong."
    )


def attach_adapter(model: PreTrainedModel, adapter: str | Path, base: str | Path) -> PeftModel:
    """The model with the LoRA adapter folder `adapter` loaded on it; an adapter made for another base (its
    shapes do not fit) or a folder that is not an adapter is a clear error, not a stack trace."""
    adapter = Path(adapter)
    if adapter.name.endswith(".partial"):
        raise CheckpointError(f"{adapter} is a checkpoint whose save was interrupted; use a complete checkpoint-<step>.")
    if not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(f"{adapter} has no adapter_config.json: it is not a LoRA adapter (a checkpoint-<step> of a LoRA run is).")
    if not (adapter / "adapter_model.safetensors").is_file():
        if (adapter / "adapter_model.bin").is_file():
            raise CheckpointError(
                f"{adapter} holds its weights as adapter_model.bin, a pickle, which can run code when loaded; xtune "
                "reads safetensors only. Convert it where you trust it: PeftModel.from_pretrained(...).save_pretrained(DIR)."
            )
        raise CheckpointError(f"{adapter} has no adapter_model.safetensors: the adapter folder is incomplete.")
    verify_checkpoint(adapter)
    try:
        with llama_layout_adapter(model, adapter) as folder:
            return PeftModel.from_pretrained(model, folder)
    except RuntimeError as error:
        mismatch = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), None)
        if mismatch is None:
            raise
        raise CheckpointError(
            f"the adapter {adapter} does not fit the base model {base} ({mismatch.rstrip('.')}); "
            "was it trained on another model? Pass the base it was trained on."
        ) from None


@contextmanager
def llama_layout_adapter(model: PreTrainedModel, adapter: Path):
    """`adapter`, or, when it names InternLM2's modules (an adapter exported for InternLM2's own code, or XTuner's)
    and `model` is xtune's Llama-layout InternLM2, a temporary copy of it in the Llama layout."""
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    if not is_internlm2_adapter(adapter_config) or any(name.endswith(".wqkv") for name, _ in model.named_modules()):
        yield adapter
        return
    weights = load_file(adapter / "adapter_model.safetensors")
    weights, adapter_config = internlm2_to_llama_adapter(weights, adapter_config, model.config.to_dict())
    with tempfile.TemporaryDirectory(prefix="xtune-adapter-") as folder:
        (Path(folder) / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        save_file(weights, Path(folder) / "adapter_model.safetensors", metadata={"format": "pt"})
        yield Path(folder)


def published_adapter(
    folder: Path, base_config: dict, base_name: str, meta: dict, console
) -> tuple[dict, dict, str]:
    """A LoRA checkpoint's adapter as others load it: `base_model_name_or_path` is `base_name` (what the run's config
    named), and on an InternLM2 base the modules are InternLM2's (wqkv, wo, w1..w3), as XTuner's pth_to_hf writes them
    and InternLM2's own code and LMDeploy load them. Returns the weights, adapter_config.json and what they are."""
    weights = load_file(folder / "adapter_model.safetensors")
    adapter_config = json.loads((folder / "adapter_config.json").read_text()) | {"base_model_name_or_path": base_name}
    if not is_internlm2(base_config) or meta.get("stage") == "reward" or is_internlm2_adapter(adapter_config):
        return weights, adapter_config, "PEFT adapter"
    try:
        weights, adapter_config = llama_to_internlm2_adapter(weights, adapter_config, base_config)
    except XtuneError as error:
        console.print(f"[yellow]{error}")
        return weights, adapter_config, "PEFT adapter (in xtune's Llama layout)"
    return weights, adapter_config, "PEFT adapter in InternLM2's module names"
