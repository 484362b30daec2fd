"""InternLM2 checkpoints as Llama models, without running the checkpoint's own code.

InternLM2 is Llama with other weight names and a fused `wqkv` projection. The fused rows are grouped by
key/value head: for each of the `num_key_value_heads` groups come its `num_attention_heads /
num_key_value_heads` query heads, then one key head, then one value head, each `head_dim` rows.
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from xtune.errors import CheckpointError, XtuneError
from xtune.paths import write_failure

AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"

# Defaults of the reference InternLM2Config, used where a config.json leaves a field out.
INTERNLM2_DEFAULTS = {
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "bias": True,
    "rope_theta": 10000,
    "rope_scaling": None,
}
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
ROPE_SCALING_TYPES = ("linear", "dynamic")

TOP_LEVEL_NAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wo.bias": "self_attn.o_proj.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
WQKV = re.compile(r"attention\.wqkv\.(weight|bias)")
Q_PROJ = re.compile(r"self_attn\.q_proj\.(weight|bias)")
KV_PROJ = re.compile(r"self_attn\.[kv]_proj\.(weight|bias)")


def is_internlm2(config: dict) -> bool:
    return config.get("model_type") == "internlm2" or "InternLM2ForCausalLM" in (config.get("architectures") or [])


def internlm2_to_llama_config(config: dict) -> LlamaConfig:
    missing = [field for field in REQUIRED_FIELDS if field not in config]
    if missing:
        raise CheckpointError(f"InternLM2 config.json has no {', '.join(map(repr, missing))}; the folder is incomplete")
    config = {**INTERNLM2_DEFAULTS, **config}
    return LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        hidden_act=config["hidden_act"],
        max_position_embeddings=config["max_position_embeddings"],
        initializer_range=config["initializer_range"],
        rms_norm_eps=config["rms_norm_eps"],
        use_cache=config["use_cache"],
        pad_token_id=config["pad_token_id"],
        bos_token_id=config["bos_token_id"],
        eos_token_id=config["eos_token_id"],
        tie_word_embeddings=config["tie_word_embeddings"],
        attention_bias=config["bias"],
        rope_parameters=rope_parameters(config["rope_theta"], config["rope_scaling"]),
        dtype=config.get("torch_dtype"),
    )


def rope_parameters(rope_theta: float, rope_scaling: dict | None) -> dict:
    """InternLM2's `rope_theta` and `rope_scaling` as transformers 5 `rope_parameters`."""
    if rope_scaling is None:
        return {"rope_type": "default", "rope_theta": rope_theta}
    rope_type = rope_scaling.get("type")
    if rope_type not in ROPE_SCALING_TYPES:
        raise CheckpointError(
            f"InternLM2 config.json has rope_scaling type {rope_type!r}; InternLM2 knows "
            + ", ".join(ROPE_SCALING_TYPES)
        )
    return {"rope_type": rope_type, "factor": rope_scaling["factor"], "rope_theta": rope_theta}


def llama_to_internlm2_config(config: LlamaConfig) -> dict:
    head_dim = config.hidden_size // config.num_attention_heads
    if config.head_dim != head_dim or config.mlp_bias:
        raise XtuneError(
            f"InternLM2 cannot express head_dim={config.head_dim} (it is always hidden_size / num_attention_heads = "
            f"{head_dim}) or mlp_bias={config.mlp_bias}; save this model with save_pretrained instead"
        )
    rope = config.rope_parameters
    if rope["rope_type"] not in ("default", *ROPE_SCALING_TYPES):
        raise XtuneError(f"InternLM2 cannot express rope_type {rope['rope_type']!r}; it knows linear and dynamic")
    rope_scaling = None if rope["rope_type"] == "default" else {"type": rope["rope_type"], "factor": rope["factor"]}
    internlm2 = {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": dict(AUTO_MAP),
        "model_type": "internlm2",
        "attn_implementation": "eager",
        "bias": config.attention_bias,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "hidden_act": config.hidden_act,
        "hidden_size": config.hidden_size,
        "initializer_range": config.initializer_range,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": rope_scaling,
        "rope_theta": rope["rope_theta"],
        "tie_word_embeddings": config.tie_word_embeddings,
        "use_cache": config.use_cache,
        "vocab_size": config.vocab_size,
    }
    if config.dtype is not None:
        internlm2["torch_dtype"] = str(config.dtype).removeprefix("torch.")
    return internlm2


def attention_shape(config: dict) -> tuple[int, int, int]:
    """(num_attention_heads, num_key_value_heads, head_dim) from an InternLM2 or Llama config dict."""
    num_heads = config["num_attention_heads"]
    num_kv_heads = config.get("num_key_value_heads") or num_heads
    return num_heads, num_kv_heads, config["hidden_size"] // num_heads


def split_wqkv(wqkv: Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    rest = wqkv.shape[1:]
    groups = wqkv.reshape(num_kv_heads, num_heads // num_kv_heads + 2, head_dim, *rest)
    q = groups[:, :-2].reshape(num_heads * head_dim, *rest)
    k = groups[:, -2].reshape(num_kv_heads * head_dim, *rest)
    v = groups[:, -1].reshape(num_kv_heads * head_dim, *rest)
    return q, k, v


def fuse_wqkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> Tensor:
    rest = q.shape[1:]
    q = q.reshape(num_kv_heads, num_heads // num_kv_heads, head_dim, *rest)
    k = k.reshape(num_kv_heads, 1, head_dim, *rest)
    v = v.reshape(num_kv_heads, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def internlm2_to_llama_state_dict(sd: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """Renames InternLM2 weights to Llama's and splits `wqkv`; names it does not know pass through unchanged."""
    shape = attention_shape(config)
    llama = {}
    for name, tensor in sd.items():
        layer = LAYER_KEY.fullmatch(name)
        wqkv = WQKV.fullmatch(layer[2]) if layer else None
        if wqkv:
            prefix, kind = f"model.layers.{layer[1]}.self_attn", wqkv[1]
            q, k, v = split_wqkv(tensor, *shape)
            llama |= {f"{prefix}.q_proj.{kind}": q, f"{prefix}.k_proj.{kind}": k, f"{prefix}.v_proj.{kind}": v}
        elif layer and layer[2] in LAYER_NAMES:
            llama[f"model.layers.{layer[1]}.{LAYER_NAMES[layer[2]]}"] = tensor
        else:
            llama[TOP_LEVEL_NAMES.get(name, name)] = tensor
    return llama


def llama_to_internlm2_state_dict(sd: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """Exact inverse of `internlm2_to_llama_state_dict`."""
    shape = attention_shape(config)
    to_internlm2_top = {llama: internlm2 for internlm2, llama in TOP_LEVEL_NAMES.items()}
    to_internlm2_layer = {llama: internlm2 for internlm2, llama in LAYER_NAMES.items()}
    internlm2 = {}
    for name, tensor in sd.items():
        layer = LAYER_KEY.fullmatch(name)
        q_proj = Q_PROJ.fullmatch(layer[2]) if layer else None
        if q_proj:
            prefix, kind = f"model.layers.{layer[1]}", q_proj[1]
            k, v = sd[f"{prefix}.self_attn.k_proj.{kind}"], sd[f"{prefix}.self_attn.v_proj.{kind}"]
            internlm2[f"{prefix}.attention.wqkv.{kind}"] = fuse_wqkv(tensor, k, v, *shape)
        elif layer and KV_PROJ.fullmatch(layer[2]):
            continue
        elif layer and layer[2] in to_internlm2_layer:
            internlm2[f"model.layers.{layer[1]}.{to_internlm2_layer[layer[2]]}"] = tensor
        else:
            internlm2[to_internlm2_top.get(name, name)] = tensor
    return internlm2


def save_internlm2(model: LlamaForCausalLM, dest: Path, max_shard_size: int | str = "5GB") -> Path:
    """Writes `model` as an InternLM2 folder: config.json and safetensors in InternLM2 names."""
    dest = Path(dest)
    config = llama_to_internlm2_config(model.config) | {"torch_dtype": str(model.dtype).removeprefix("torch.")}
    state_dict = llama_to_internlm2_state_dict(model.state_dict(), config)
    if config["tie_word_embeddings"]:
        state_dict.pop("output.weight", None)
    state_dict = {name: tensor.detach().contiguous() for name, tensor in state_dict.items()}
    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    dest.mkdir(parents=True, exist_ok=True)
    _write_json(dest / "config.json", config)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state_dict[name] for name in names}, dest / filename, metadata={"format": "pt"})
    if split.is_sharded:
        _write_json(dest / SAFETENSORS_INDEX_FILE, {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
    return dest


def load_internlm2_as_llama(path: Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    path = Path(path)
    config = _read_json(path / "config.json")
    llama_config = internlm2_to_llama_config(config)
    llama_config.dtype = dtype
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(llama_config)
    checkpoint, origin = _read_safetensors(path, dtype)
    expected = set(llama_to_internlm2_state_dict(model.state_dict(), config))
    if llama_config.tie_word_embeddings:
        expected.discard("output.weight")
    _check_names(path, expected, origin)
    state_dict = internlm2_to_llama_state_dict(checkpoint, config)
    if llama_config.tie_word_embeddings:
        state_dict.setdefault("lm_head.weight", state_dict["model.embed_tokens.weight"])
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"the weights in {path} do not fit its config.json: {error}") from error
    if llama_config.tie_word_embeddings:
        model.tie_weights()
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def llama_layout_copy(path: Path, cache: Path) -> Path:
    """A Llama-layout copy of an InternLM2 folder, written once under `cache`, for loaders that need
    a standard folder (bitsandbytes quantizes while `from_pretrained` loads). Keyed by the folder and
    its files' sizes and modification times, written aside and renamed into place."""
    path = Path(path).resolve()
    files = sorted(p for p in path.iterdir() if p.is_file())
    stamp = "".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in files)
    dest = cache / hashlib.sha256(f"{path}|{stamp}".encode()).hexdigest()[:20]
    if (dest / "config.json").is_file():
        return dest
    dtype = getattr(torch, str(_read_json(path / "config.json").get("torch_dtype", "float32")), torch.float32)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model = load_internlm2_as_llama(path, dtype)
    others = [  # the tokenizer's files and the like
        file for file in files
        if file.suffix not in (".safetensors", ".bin", ".py") and file.name not in ("config.json", SAFETENSORS_INDEX_FILE)
    ]  # fmt: skip
    try:
        model.save_pretrained(partial, max_shard_size="2GB")
        for file in others:
            shutil.copy2(file, partial / file.name)
    except (OSError, SafetensorError) as error:  # e.g. a full $XTUNE_HOME
        shutil.rmtree(partial, ignore_errors=True)
        raise XtuneError(
            f"could not write {dest}, the Llama-layout copy of {path} that quantized loading reads: "
            f"{write_failure(error)}. Nothing earlier is lost ({path} and the other copies there are as they were); "
            "free space there, or set XTUNE_HOME to a folder on a disk with room."
        ) from error
    try:
        os.replace(partial, dest)
    except OSError:  # another process finished the same copy first
        shutil.rmtree(partial, ignore_errors=True)
    return dest


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of an InternLM2 folder, from its index when it is sharded."""
    index = path / SAFETENSORS_INDEX_FILE
    if index.is_file():
        files = sorted({path / filename for filename in _read_json(index)["weight_map"].values()})
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index} lists {file.name}, which is missing; download the model again")
        return files
    if (path / SAFETENSORS_FILE).is_file():
        return [path / SAFETENSORS_FILE]
    raise CheckpointError(
        f"{path} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX_FILE}; xtune reads InternLM2 weights as "
        "safetensors: download the safetensors files of the model"
    )


def _read_safetensors(path: Path, dtype: torch.dtype) -> tuple[dict[str, Tensor], dict[str, Path]]:
    tensors, origin = {}, {}
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt") as weights:
            for name in weights.keys():
                tensors[name] = weights.get_tensor(name).to(dtype)
                origin[name] = file
    return tensors, origin


def _check_names(path: Path, expected: set[str], origin: dict[str, Path]) -> None:
    source = path / SAFETENSORS_INDEX_FILE if (path / SAFETENSORS_INDEX_FILE).is_file() else path / SAFETENSORS_FILE
    missing = sorted(expected - origin.keys())
    if missing:
        raise CheckpointError(
            f"{source} has no tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
            + "; the checkpoint is incomplete or does not match config.json: download the model again"
        )
    unexpected = sorted(origin.keys() - expected)
    if unexpected:
        raise CheckpointError(
            f"{origin[unexpected[0]]} holds tensor {unexpected[0]!r}, which an InternLM2 model with this config.json "
            "does not have; the weights and config.json come from different models"
        )


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise CheckpointError(f"{file} is missing; the model folder is incomplete") from error
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file} is not valid JSON (line {error.lineno}): {error.msg}") from error


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# LoRA adapters in either layout. PEFT names an adapter's weights `base_model.model.<module>.lora_A.weight`. A LoRA on
# q_proj, k_proj and v_proj (each rank r) is a LoRA on the fused wqkv of rank 3r: its A stacks the three A's, its B
# holds each B in that projection's rows (grouped as wqkv's are) and in the columns of that projection's A.
ADAPTER_MODULES = {
    "q_proj": "wqkv", "k_proj": "wqkv", "v_proj": "wqkv", "o_proj": "wo",
    "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2", "embed_tokens": "tok_embeddings", "lm_head": "output",
}  # fmt: skip
ADAPTER_LAYER_KEY = re.compile(r"(base_model\.model\.model\.layers\.\d+)\.(self_attn|mlp)\.(\w+)\.(lora_[AB])\.weight")
ADAPTER_TOP_LEVEL = {
    "base_model.model.model.embed_tokens.weight": "base_model.model.model.tok_embeddings.weight",
    "base_model.model.lm_head.weight": "base_model.model.output.weight",
}
QKV = ("q_proj", "k_proj", "v_proj")


def llama_to_internlm2_adapter(weights: dict[str, Tensor], adapter_config: dict, config: dict) -> tuple[dict, dict]:
    """A PEFT LoRA adapter (weights, adapter_config.json) trained on the Llama layout, in InternLM2's module names,
    so that it applies to InternLM2's own code (and LMDeploy) with the same outputs. `config` is the base's config.json."""
    problem = next((key for key in ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "layers_to_transform")
                    if adapter_config.get(key)), None)  # fmt: skip
    if problem:
        raise XtuneError(
            f"the adapter has {problem} = {adapter_config[problem]!r}, which xtune does not carry into InternLM2's fused "
            "wqkv; it stays in xtune's Llama layout (load it on xtune's Llama-layout model, or merge it)."
        )
    targets = adapter_config.get("target_modules") or []
    names = (targets if isinstance(targets, list) else [targets]) + list(adapter_config.get("modules_to_save") or [])
    unknown = [name for name in names if _internlm2_module(name) is None]
    if unknown:
        raise XtuneError(f"InternLM2 has no module for {unknown[0]!r}; the adapter stays in xtune's Llama layout.")
    num_heads, num_kv_heads, head_dim = attention_shape(config)
    rows = {"q_proj": num_heads * head_dim, "k_proj": num_kv_heads * head_dim, "v_proj": num_kv_heads * head_dim}
    to_internlm2 = {llama: internlm2 for internlm2, llama in LAYER_NAMES.items()}
    internlm2, qkv = {}, {}
    for name, tensor in weights.items():
        layer = ADAPTER_LAYER_KEY.fullmatch(name)
        if layer and layer[3] in QKV:
            qkv.setdefault(layer[1], {})[layer[3], layer[4]] = tensor
        elif layer and f"{layer[2]}.{layer[3]}.weight" in to_internlm2:
            module = to_internlm2[f"{layer[2]}.{layer[3]}.weight"].removesuffix(".weight")
            internlm2[f"{layer[1]}.{module}.{layer[4]}.weight"] = tensor
        elif name in ADAPTER_TOP_LEVEL:
            internlm2[ADAPTER_TOP_LEVEL[name]] = tensor
        else:
            raise XtuneError(f"the adapter holds {name!r}, which xtune cannot place in InternLM2's layout")
    ranks = set()
    for prefix, factors in qkv.items():
        present = [projection for projection in QKV if (projection, "lora_A") in factors]
        lora_a = torch.cat([factors[projection, "lora_A"] for projection in present])
        blocks, start = {}, 0
        for projection in QKV:
            block = lora_a.new_zeros(rows[projection], lora_a.shape[0])
            if projection in present:
                b = factors[projection, "lora_B"]
                block[:, start : start + b.shape[1]] = b
                start += b.shape[1]
            blocks[projection] = block
        internlm2[f"{prefix}.attention.wqkv.lora_A.weight"] = lora_a
        internlm2[f"{prefix}.attention.wqkv.lora_B.weight"] = fuse_wqkv(
            blocks["q_proj"], blocks["k_proj"], blocks["v_proj"], num_heads, num_kv_heads, head_dim
        )
        ranks.add(lora_a.shape[0])
    rank, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    internlm2_config = {
        **adapter_config,
        "target_modules": sorted({_internlm2_module(name) for name in targets}),
        "modules_to_save": [_internlm2_module(name) for name in adapter_config.get("modules_to_save") or []] or None,
    }
    if ranks and ranks != {rank}:  # wqkv's rank is 3r (or 2r); its lora_alpha keeps the scaling alpha / r
        (fused_rank,) = ranks
        ratio = fused_rank / rank
        internlm2_config["rank_pattern"] = {"wqkv": fused_rank}
        internlm2_config["alpha_pattern"] = {"wqkv": alpha * (ratio**0.5 if adapter_config.get("use_rslora") else ratio)}
    return internlm2, internlm2_config


def internlm2_to_llama_adapter(weights: dict[str, Tensor], adapter_config: dict, config: dict) -> tuple[dict, dict]:
    """A LoRA adapter in InternLM2's module names (xtune's export, or XTuner's) in the Llama layout xtune loads
    InternLM2 in: wqkv's A serves q, k and v, and its B's rows split as wqkv's do, so each projection's update is
    exactly its rows of wqkv's."""
    shape = attention_shape(config)
    to_llama_top = {internlm2: llama for llama, internlm2 in ADAPTER_TOP_LEVEL.items()}
    layer_key = re.compile(
        r"(.*\.layers\.\d+)\.(attention\.wqkv|attention\.wo|feed_forward\.w[123])\.(lora_[AB])\.weight"
    )
    llama = {}
    for name, tensor in weights.items():
        layer = layer_key.fullmatch(name)
        if layer and layer[2] == "attention.wqkv":
            pieces = (tensor,) * 3 if layer[3] == "lora_A" else split_wqkv(tensor, *shape)
            for projection, piece in zip(QKV, pieces):
                llama[f"{layer[1]}.self_attn.{projection}.{layer[3]}.weight"] = piece.clone()
        elif layer:
            module = LAYER_NAMES[f"{layer[2]}.weight"].removesuffix(".weight")
            llama[f"{layer[1]}.{module}.{layer[3]}.weight"] = tensor
        else:
            llama[to_llama_top.get(name, name)] = tensor
    def renamed(names):
        return sorted({llama_name for name in names for llama_name in _llama_modules(name)})

    def pattern(values: dict) -> dict:
        return {llama_name: value for name, value in values.items() for llama_name in _llama_modules(name)}

    targets = adapter_config.get("target_modules") or []
    llama_config = {
        **adapter_config,
        "target_modules": renamed(targets) if isinstance(targets, list) else targets,
        "modules_to_save": renamed(adapter_config.get("modules_to_save") or []) or None,
        "rank_pattern": pattern(adapter_config.get("rank_pattern") or {}),
        "alpha_pattern": pattern(adapter_config.get("alpha_pattern") or {}),
    }
    return llama, llama_config


def is_internlm2_adapter(adapter_config: dict) -> bool:
    """Whether an adapter_config.json names InternLM2's modules (wqkv, wo, w1..w3, tok_embeddings, output)."""
    names = adapter_config.get("target_modules") or []
    names = (list(names) if not isinstance(names, str) else []) + list(adapter_config.get("modules_to_save") or [])
    return any(name.rsplit(".", 1)[-1] in LLAMA_MODULES for name in names)


LLAMA_MODULES = {"wqkv": QKV, "wo": ("o_proj",), "w1": ("gate_proj",), "w3": ("up_proj",), "w2": ("down_proj",),
                 "tok_embeddings": ("embed_tokens",), "output": ("lm_head",)}  # fmt: skip
LLAMA_PARENTS = {"self_attn": "attention", "mlp": "feed_forward"}


def _internlm2_module(name: str) -> str | None:
    """A module name as peft writes it (`q_proj`, or a path `model.layers.0.self_attn.q_proj`) in InternLM2's names;
    None when InternLM2 has no such module."""
    *path, last = name.split(".")
    if last not in ADAPTER_MODULES or (path and last not in ("embed_tokens", "lm_head") and path[-1] not in LLAMA_PARENTS):
        return None
    return ".".join([*path[:-1], LLAMA_PARENTS[path[-1]]] if path and path[-1] in LLAMA_PARENTS else path) + (
        "." if path else ""
    ) + ADAPTER_MODULES[last]


def _llama_modules(name: str) -> list[str]:
    """The Llama-layout modules an InternLM2 module name (short, or a path) stands for; other names as they are."""
    *path, last = name.split(".")
    if last not in LLAMA_MODULES:
        return [name]
    parents = {internlm2: llama for llama, internlm2 in LLAMA_PARENTS.items()}
    path = [*path[:-1], parents.get(path[-1], path[-1])] if path else []
    return [".".join([*path, llama]) for llama in LLAMA_MODULES[last]]
