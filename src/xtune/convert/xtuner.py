"""XTuner 0.1.x checkpoints (`work_dirs/<cfg>/iter_N.pth`) read safely and renamed into xtune's layout.

XTuner writes either a file (mmengine's `{'meta', 'state_dict', 'message_hub', ...}`, or a plain state dict) or,
under DeepSpeed, a folder `iter_N.pth/`: ZeRO-1/2's `mp_rank_00_model_states.pt` holds the weights under 'module';
ZeRO-3's `zero_pp_rank_<r>_mp_rank_00_model_states.pt` hold only their names and shapes, the weights being split over
the ranks' optimizer files (`[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, fp32). The weights are what
XTuner's models return from `state_dict()`: only the trained parts, named

    llm.base_model.model.<HF name>.lora_A.default.weight     a LoRA adapter on the LLM (InternLM2: its own names)
    llm.<HF name>                                            the LLM trained in full
    projector.model.<i>.weight / .bias                       LLaVA's projector (xtune's Projector has the same shape)
    visual_encoder.base_model.model.<HF name>.lora_*         a LoRA adapter on the vision encoder

Everything is read with torch.load(weights_only=True): no pickled code runs. mmengine's bookkeeping (its message
hub keeps numpy arrays and HistoryBuffer objects) and DeepSpeed's (its loss scaler, its ZeRO stage enum) are read as
inert stand-ins and dropped.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from xtune.engine.checkpoint import RUN_META
from xtune.errors import CheckpointError

DEEPSPEED_MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
"""Rank 0's ZeRO-3 model states: the trained parameters' names and shapes (every rank's copy holds the same)."""
_ZERO3_OPTIM_STATES = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")
_ZERO3_MODEL_STATES = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt")
PTH_SUFFIXES = (".pth", ".pt")


def is_xtuner_checkpoint(path: str | Path) -> bool:
    """A path in XTuner's layout (or meant to be: a `.pth` name that does not exist yet), not an xtune folder."""
    path = Path(path)
    if path.is_dir():
        return not (path / RUN_META).is_file() and (_model_states(path) is not None or path.suffix in PTH_SUFFIXES)
    return path.suffix in PTH_SUFFIXES


def check_xtuner_checkpoint(path: str | Path, what: str = "checkpoint") -> Path:
    """The file holding the weights, after checking the path exists in one of XTuner's layouts; nothing is loaded."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {str(path)!r}: no such file or folder; give an existing iter_N.pth (XTuner) or checkpoint-<step> (xtune).")
    if path.is_file():
        return path
    states = _model_states(path)
    if states is None:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:4]) or "nothing"
        raise CheckpointError(
            f"{what} {str(path)!r} is a folder but not a DeepSpeed checkpoint (no {DEEPSPEED_MODEL_STATES} nor "
            f"{ZERO3_MODEL_STATES}; it holds {found}) nor an xtune checkpoint (no {RUN_META})."
        )
    if states.name == ZERO3_MODEL_STATES:
        _zero3_optim_files(states.parent)
    return states


def xtuner_config_beside(checkpoint: str | Path) -> Path | None:
    """The XTuner config in the work_dir holding `checkpoint` (XTuner writes `work_dirs/<cfg>/<cfg>.py` beside its
    iter_N.pth), when there is exactly one."""
    from xtune.config.xtuner import is_xtuner_config

    found = [path for path in sorted(Path(checkpoint).absolute().parent.glob("*.py")) if is_xtuner_config(path)]
    return found[0] if len(found) == 1 else None


def _model_states(folder: Path) -> Path | None:
    for name in (DEEPSPEED_MODEL_STATES, ZERO3_MODEL_STATES):
        for candidate in (folder / name, *sorted(folder.glob(f"*/{name}"))):
            if candidate.is_file():
                return candidate
    return None


def _ranks(folder: Path, pattern: re.Pattern) -> dict[int, Path]:
    return {int(match[1]): file for file in folder.iterdir() if (match := pattern.fullmatch(file.name))}


def _zero3_optim_files(folder: Path) -> list[Path]:
    """Every rank's ZeRO-3 optimizer file, in rank order, after checking that none is missing (nothing is loaded)."""
    optim, model = _ranks(folder, _ZERO3_OPTIM_STATES), _ranks(folder, _ZERO3_MODEL_STATES)
    if not optim:
        raise CheckpointError(
            f"{folder} is a ZeRO-3 checkpoint without its optimizer files (zero_pp_rank_<r>_mp_rank_00_optim_states.pt), "
            "which hold ZeRO-3's weights; copy the whole iter_N.pth folder."
        )
    if sorted(optim) != list(range(len(optim))) or sorted(optim) != sorted(model):
        raise CheckpointError(
            f"{folder}: ZeRO-3 keeps each rank's share of the weights in its own file, but it holds optimizer files "
            f"of ranks {sorted(optim)} and model states of ranks {sorted(model)}; a rank's files are missing (copy "
            "the whole iter_N.pth folder)."
        )
    return [optim[rank] for rank in sorted(optim)]


class _Inert:
    """Stands in for a pickled object of mmengine's or numpy's bookkeeping: takes its state and does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _inert(*args, **kwargs) -> _Inert:
    return _Inert()


INERT_GLOBALS = {
    "mmengine.logging.history_buffer.HistoryBuffer": _Inert,
    "mmengine.config.config.ConfigDict": dict,
    "numpy.core.multiarray._reconstruct": _inert,
    "numpy._core.multiarray._reconstruct": _inert,
    "numpy.core.multiarray.scalar": _inert,
    "numpy._core.multiarray.scalar": _inert,
    "numpy.ndarray": _Inert,
    "numpy.dtype": _inert,
    "deepspeed.runtime.zero.config.ZeroStageEnum": int,  # an IntEnum: ZeroStageEnum(3) reads as 3
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": _Inert,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": _Inert,
}
"""Objects mmengine and DeepSpeed keep beside the weights, read as stand-ins (never the real classes)."""
_NUMPY_DTYPE = re.compile(r"numpy\.dtypes\.\w+DType")


def _load(file: Path, mmap: bool = False):
    """torch.load(weights_only=True) with the bookkeeping stand-ins; any other pickled object is refused by name."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    unknown = [name for name in names if name not in INERT_GLOBALS and not _NUMPY_DTYPE.fullmatch(name)]
    if unknown:
        trusted = ("gather its folder with DeepSpeed's zero_to_fp32.py into a .pth file" if file.name.endswith("_states.pt")
                   else "save its weights alone: torch.save(torch.load(F, weights_only=False)['state_dict'], 'weights.pth')")  # fmt: skip
        raise CheckpointError(
            f"{file} holds pickled objects of {', '.join(unknown[:3])} besides weights; xtune reads checkpoints with "
            f"weights_only=True and runs no pickled code. Where you trust the file, {trusted}."
        )
    stand_ins = [(INERT_GLOBALS.get(name, _inert), name) for name in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # a truncated file, or a pickle weights_only refuses
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{file} cannot be read as a checkpoint: {first}") from None


def load_xtuner_state(path: str | Path) -> dict[str, Tensor]:
    """The weights of an XTuner checkpoint (file or DeepSpeed folder), as XTuner named them."""
    file = check_xtuner_checkpoint(path)
    if file.name == ZERO3_MODEL_STATES:
        state = zero3_state(file)
    elif file.name == DEEPSPEED_MODEL_STATES:
        data = _load(file)
        state = data.get("module") if isinstance(data, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError(f"{file} has no 'module' (the weights DeepSpeed saves); the checkpoint is damaged.")
        if any(torch.is_tensor(t) and t.numel() == 0 for t in state.values()):
            raise CheckpointError(
                f"{file} holds ZeRO-3 placeholders (empty tensors), not weights, and the folder has no ZeRO-3 "
                f"{ZERO3_MODEL_STATES} beside the optimizer files that hold them; copy the whole iter_N.pth folder."
            )
    else:
        data = _load(file)
        state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{file} holds no state dict of named tensors (XTuner's 'state_dict', or the tensors themselves).")
    return state


def zero3_state(model_states: Path) -> dict[str, Tensor]:
    """The trained parameters of a ZeRO-3 folder, gathered from every rank's fp32 share, with its buffers.

    Each rank's optimizer file holds `fp32_flat_groups`: flat tensors that, joined, hold that rank's share of every
    trained parameter in `param_shapes` order. A parameter of numel n is flattened, padded to world * s elements
    (s = ceil(n / world)), and rank r holds its elements r * s to (r + 1) * s - 1. Frozen parameters
    (`frozen_param_fragments`, a LoRA run's base) are left out, as XTuner's state_dict() leaves them out: they are
    the base model CONFIG names."""
    # Gathered here, not by deepspeed.utils.zero_to_fp32: its readers unpickle with weights_only=False, its merging
    # helpers are private, and converting should not need DeepSpeed installed.
    model = _load(model_states, mmap=True)
    shapes = model.get("param_shapes") if isinstance(model, dict) else None
    if not isinstance(shapes, list) or not all(isinstance(group, dict) for group in shapes):
        raise CheckpointError(f"{model_states} has no 'param_shapes' (the trained parameters' names); the checkpoint is damaged.")
    shapes = {name: torch.Size(shape) for group in shapes for name, shape in group.items()}
    files = _zero3_optim_files(model_states.parent)
    world = len(files)
    shares = [-(-shape.numel() // world) for shape in shapes.values()]  # ceil(numel / world)
    flat = []
    for file in files:
        optimizer = _load(file, mmap=True)
        optimizer = optimizer.get("optimizer_state_dict") if isinstance(optimizer, dict) else None
        groups = optimizer.get("fp32_flat_groups") if isinstance(optimizer, dict) else None
        if not isinstance(groups, list) or not groups or not all(torch.is_tensor(group) for group in groups):
            raise CheckpointError(f"{file} holds no 'fp32_flat_groups' (ZeRO-3's share of the weights); the checkpoint is damaged.")
        if optimizer.get("zero_stage") != 3 or optimizer.get("partition_count") != world:
            raise CheckpointError(
                f"{file} is ZeRO stage {optimizer.get('zero_stage')} over {optimizer.get('partition_count')} ranks, but "
                f"the folder holds ZeRO-3 files of {world} ranks; a rank's files are missing or come from another run."
            )
        joined = torch.cat([group.reshape(-1) for group in groups]) if len(groups) > 1 else groups[0].reshape(-1)
        if joined.numel() != sum(shares):
            raise CheckpointError(
                f"{file} holds {joined.numel()} weights, but the {len(shapes)} parameters in {model_states.name} "
                f"take {sum(shares)} on each of {world} ranks; the files do not belong together."
            )
        flat.append(joined.split(shares))
    state = {}
    for index, (name, shape) in enumerate(shapes.items()):
        state[name] = torch.cat([rank[index] for rank in flat])[: shape.numel()].view(shape).clone()
    module = model.get("module") or {}
    state |= {name: module[name] for name in model.get("buffer_names") or [] if torch.is_tensor(module.get(name))}
    for alias, source in (model.get("shared_params") or {}).items():  # tied weights are saved once
        if source in state:
            state[alias] = state[source]
    return state


@dataclass
class XtunerParts:
    """An XTuner checkpoint's weights in xtune's names: PEFT adapter keys (no `.default`), HF model keys."""

    llm_adapter: dict[str, Tensor] = field(default_factory=dict)
    llm: dict[str, Tensor] = field(default_factory=dict)
    projector: dict[str, Tensor] = field(default_factory=dict)
    visual_encoder_adapter: dict[str, Tensor] = field(default_factory=dict)


def xtune_parts(state: dict[str, Tensor], llm_config: dict) -> XtunerParts:
    """XTuner's names -> xtune's. An InternLM2 LLM's full weights (xtune runs it in the Llama layout) are renamed and
    its fused `wqkv` split into q/k/v; its LoRA factors keep InternLM2's names (a PEFT adapter on wqkv, wo, w1-w3, as
    XTuner's pth_to_hf writes it), which `internlm2_lora_as_llama` maps where the Llama layout is needed."""
    from xtune.models.internlm2 import internlm2_to_llama_state_dict, is_internlm2

    parts = XtunerParts()
    full_llm = {}
    for name, tensor in state.items():
        part, _, rest = name.partition(".")
        if part == "projector":
            parts.projector[rest] = tensor
        elif part == "visual_encoder" and "lora_" in rest:
            parts.visual_encoder_adapter[rest.replace(".default.", ".")] = tensor
        elif part == "llm" and "lora_" in rest:
            parts.llm_adapter[rest.replace(".default.", ".")] = tensor
        elif part == "llm":
            full_llm[rest] = tensor
        else:
            raise CheckpointError(
                f"the checkpoint holds {name!r}, which is none of XTuner's llm., projector. or visual_encoder. LoRA "
                "weights xtune knows how to read."
            )
    if is_internlm2(llm_config):
        full_llm = internlm2_to_llama_state_dict(full_llm, llm_config)  # an adapter keeps XTuner's names
    parts.llm = full_llm
    return parts


def internlm2_lora_as_llama(adapter: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """XTuner's LoRA factors on InternLM2's modules (wqkv, wo, w1-w3) in the Llama layout xtune loads it in."""
    from xtune.models.internlm2 import internlm2_to_llama_adapter

    return internlm2_to_llama_adapter(adapter, {}, config)[0]


def lora_rank(adapter: dict[str, Tensor]) -> int:
    ranks = {tensor.shape[0] for name, tensor in adapter.items() if ".lora_A." in name}
    if len(ranks) != 1:
        raise CheckpointError(f"the LoRA factors have ranks {sorted(ranks)}; xtune reads adapters of one rank.")
    return ranks.pop()


def target_modules(adapter: dict[str, Tensor]) -> list[str]:
    return sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapter})


def write_adapter(adapter: dict[str, Tensor], folder: Path, alpha: float, base: str, dropout: float = 0.0, task_type: str | None = "CAUSAL_LM") -> None:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) from adapter weights in PEFT's names."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = LoraConfig(r=lora_rank(adapter), lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules(adapter),
                        task_type=task_type, base_model_name_or_path=base)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file({name: tensor.detach().contiguous() for name, tensor in adapter.items()}, folder / "adapter_model.safetensors")


def projector_from_state(projector: dict[str, Tensor], source: str | Path):
    """xtune's Projector holding XTuner's `projector.model.<i>` weights (its depth and sizes read off them)."""
    from xtune.models.llava import Projector

    weights = sorted((int(name.split(".")[1]), tensor) for name, tensor in projector.items() if name.endswith(".weight"))
    if not weights:
        raise CheckpointError(f"{source} holds no projector (projector.model.0.weight); is it a LLaVA pretrain checkpoint?")
    model = Projector(weights[0][1].shape[1], weights[0][1].shape[0], depth=len(weights))
    try:
        model.load_state_dict(projector)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: the projector's weights do not form XTuner's ProjectorModel: {str(error).splitlines()[0]}") from None
    return model


def xtuner_to_hf(config, checkpoint: str | Path, save_dir: str | Path, fp32: bool = False,
                 max_shard_size: str = "2GB") -> tuple[Path, str]:  # fmt: skip
    """`pth_to_hf` of an XTuner checkpoint: SAVE_DIR as xtune writes it from its own checkpoints (a PEFT adapter,
    or a LLaVA run's projector/, llm_adapter/, visual_encoder_adapter/), LoRA alphas taken from `config` (XTuner's
    .pth holds the factors only). Returns (SAVE_DIR, what was written)."""
    from xtune.convert.folder import new_folder, save_dtype, write_meta
    from xtune.models.llava import ENCODER_ADAPTER, LLM_ADAPTER, PROJECTOR, llava_meta
    from xtune.models.internlm2 import is_internlm2
    from xtune.models.load import load_model, load_tokenizer, read_config, resolve_model_path
    from xtune.models.publish import generation_config_of, save_tokenizer, write_generation_config

    base_path = resolve_model_path(config.llm_name_or_path)
    base_config = read_config(base_path)
    dtype = save_dtype(base_config.get("dtype") or base_config.get("torch_dtype"), fp32)
    state = load_xtuner_state(checkpoint)
    parts = xtune_parts(state, base_config)
    if parts.llm and (parts.llm_adapter or parts.projector or parts.visual_encoder_adapter):
        raise CheckpointError(
            f"{checkpoint} holds a LLaVA model's fully trained LLM (llm.model.*) beside its other parts; xtune converts "
            "an XTuner LLM's full weights alone, or LoRA adapters and projectors, for now."
        )
    cast = lambda weights: {name: t.to(dtype) if t.is_floating_point() else t for name, t in weights.items()}  # noqa: E731
    if is_internlm2(base_config) and parts.projector:  # a LLaVA run's llm_adapter/ is read in the Llama layout
        parts.llm_adapter = internlm2_lora_as_llama(parts.llm_adapter, base_config)
    template = config.prompt_template
    meta = {"llm_name_or_path": config.llm_name_or_path, "method": config.method, "prompt_template": template,
            "converted_from": str(checkpoint), "converted_from_format": "xtuner"}  # fmt: skip
    tokenizer = load_tokenizer(base_path)
    with new_folder(save_dir) as folder:
        if parts.projector or parts.visual_encoder_adapter:
            written = [PROJECTOR]
            projector_from_state(parts.projector, checkpoint).to(dtype).save(folder / PROJECTOR)
            if parts.llm_adapter:
                write_adapter(cast(parts.llm_adapter), folder / LLM_ADAPTER, config.lora_alpha, config.llm_name_or_path, config.lora_dropout)
                written.append(LLM_ADAPTER)
            if parts.visual_encoder_adapter:
                write_adapter(cast(parts.visual_encoder_adapter), folder / ENCODER_ADAPTER, config.visual_encoder_lora_alpha,
                              config.visual_encoder_name_or_path, config.lora_dropout, task_type=None)  # fmt: skip
                written.append(ENCODER_ADAPTER)
            meta["llava"] = llava_meta(config)
            kind = "LLaVA parts (" + ", ".join(written) + ")"
        elif parts.llm:
            model = load_model(base_path, dtype=dtype)
            result = model.load_state_dict(cast(parts.llm), strict=False)
            tied = {"lm_head.weight"} if base_config.get("tie_word_embeddings") else set()
            missing = [name for name in result.missing_keys if name not in tied]
            if missing or result.unexpected_keys:
                first = (missing or result.unexpected_keys)[0]
                raise CheckpointError(
                    f"{checkpoint}: the LLM's full weights do not fit {config.llm_name_or_path} ({len(missing)} missing, "
                    f"{len(result.unexpected_keys)} unexpected, e.g. {first!r}); is CONFIG's llm_name_or_path the model "
                    "XTuner trained?"
                )
            model.save_pretrained(folder, max_shard_size=max_shard_size)
            write_generation_config(folder, generation_config_of(model), tokenizer, template)
            kind = "model (full weights)"
        elif parts.llm_adapter:
            write_adapter(cast(parts.llm_adapter), folder, config.lora_alpha, config.llm_name_or_path, config.lora_dropout)
            write_generation_config(folder, generation_config_of(base_path), tokenizer, template)
            kind = "PEFT adapter"
        else:
            raise CheckpointError(f"{checkpoint} holds no LoRA adapter and no projector.")
        save_tokenizer(tokenizer, folder, template)
        write_meta(folder, meta)
    return Path(save_dir), f"{kind} from XTuner's {checkpoint}"
