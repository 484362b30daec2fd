"""LLaVA: a vision encoder's patch features, projected into the LLM's embedding space, stand in for the
`<image>` placeholders of the text.

    pixels -> visual_encoder (hidden states of `select_layer`, CLS dropped) -> projector -> patch embeddings
    input_ids with IMAGE_TOKEN_ID runs -> LLM embeddings, each run filled with one image's patch embeddings

The LLM stays an ordinary causal LM (LoRA/QLoRA, varlen attention and packing work as for text); the data
layer expands each `<image>` into `image_token_count` IMAGE_TOKEN_ID so lengths, packing and labels (-100
there) are settled before the model runs.
"""

import json
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from xtune.data.encode import IMAGE_TOKEN_ID
from xtune.errors import CheckpointError, ConfigError
from xtune.models.load import read_config

PROJECTOR = "projector"
LLM_ADAPTER, LLM_FULL = "llm_adapter", "llm"
ENCODER_ADAPTER, ENCODER_FULL = "visual_encoder_adapter", "visual_encoder"


class Projector(nn.Module):
    """XTuner's ProjectorModel: Linear(vision, llm), then (GELU, Linear(llm, llm)) `depth - 1` times."""

    def __init__(self, vision_hidden_size: int, llm_hidden_size: int, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(vision_hidden_size, llm_hidden_size)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_hidden_size, llm_hidden_size)]
        self.model = nn.Sequential(*layers)
        self.settings = {"vision_hidden_size": vision_hidden_size, "llm_hidden_size": llm_hidden_size, "depth": depth}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(self.settings, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "Projector":
        from xtune.convert.xtuner import is_xtuner_checkpoint, load_xtuner_state, projector_from_state

        if is_xtuner_checkpoint(folder):  # XTuner's stage-1 iter_N.pth (file or DeepSpeed folder)
            state = load_xtuner_state(folder)
            return projector_from_state({k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}, folder)
        folder = projector_folder(folder)
        projector = cls(**json.loads((folder / "config.json").read_text()))
        projector.load_state_dict(load_file(folder / "model.safetensors"))
        return projector


def projector_folder(path: str | Path) -> Path:
    """`pretrained_pth`: a projector folder, or a checkpoint (or pth_to_hf output) that holds one; a checkpoint
    is checked against its manifest first (LLaVA's chat and stage 2 both load through here)."""
    from xtune.engine.checkpoint import verify_checkpoint

    path = Path(path)
    verify_checkpoint(path)
    for folder in (path, path / PROJECTOR):
        if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
            return folder
    raise CheckpointError(
        f"pretrained_pth = {str(path)!r} holds no projector (projector/model.safetensors); point it at the "
        "pretrain run's checkpoint-<step> folder."
    )


def check_pretrained_pth(path: str | Path) -> None:
    """That `pretrained_pth` exists in a layout xtune reads, before any data or model loads."""
    from xtune.convert.xtuner import check_xtuner_checkpoint, is_xtuner_checkpoint

    if is_xtuner_checkpoint(path):
        check_xtuner_checkpoint(path, "pretrained_pth =")
    elif not Path(path).is_dir():
        raise CheckpointError(f"pretrained_pth = {str(path)!r}: no such folder; point it at the pretrain run's checkpoint-<step> (or XTuner's iter_N.pth).")


def has_cls_token(vision_config) -> bool:
    return vision_config.model_type.startswith("clip")


def image_token_count(vision_config) -> int:
    """Patch embeddings per image: (image_size / patch_size)^2 (CLIP's CLS token is dropped)."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def _vision_classes(path: Path):
    """(model class, config class) of a CLIP or SigLIP folder's vision tower."""
    import transformers

    model_type = read_config(path).get("model_type", "")
    for family, prefix in (("clip", "CLIP"), ("siglip", "Siglip")):
        if model_type.startswith(family):
            return getattr(transformers, f"{prefix}VisionModel"), getattr(transformers, f"{prefix}VisionConfig")
    raise ConfigError(f"the vision encoder {str(path)!r} is a {model_type!r} model; use a CLIP or SigLIP one.")


def load_visual_encoder(path: Path, dtype: torch.dtype = torch.float32, quantization: str | None = None, device=None):
    """A CLIP or SigLIP vision tower from a local folder (a whole CLIP/SigLIP checkpoint works too), in 4 or
    8 bits through bitsandbytes when `quantization` says so."""
    from xtune.models.load import pickles_of_tensors_only, quantization_config

    with pickles_of_tensors_only(path):
        if quantization is None:
            return _vision_classes(path)[0].from_pretrained(path, dtype=dtype, weights_only=True)
        return _vision_classes(path)[0].from_pretrained(
            path, dtype=dtype, quantization_config=quantization_config(quantization, dtype),
            device_map={"": device or "cpu"}, weights_only=True,
        )  # fmt: skip


def vision_config(name_or_path: str):
    """The vision encoder's config (from a vision-only or a whole CLIP/SigLIP folder)."""
    from xtune.models.load import resolve_model_path

    path = resolve_model_path(name_or_path)
    return _vision_classes(path)[1].from_pretrained(path)


class LlavaModel(nn.Module):
    def __init__(self, llm, visual_encoder, projector: Projector, select_layer: int = -2, preprocess=None):
        super().__init__()
        self.llm, self.visual_encoder, self.projector = llm, visual_encoder, projector
        self.select_layer = select_layer
        self.drop_cls = has_cls_token(visual_encoder.config)
        self.image_tokens = image_token_count(visual_encoder.config)
        self.preprocess = preprocess
        """Image paths -> pixel_values, as training prepared them (generation uses it)."""

    @property
    def config(self):
        return self.llm.config

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, patches, llm hidden] from [images, 3, H, W]."""
        dtype = next(self.visual_encoder.parameters()).dtype
        hidden = self.visual_encoder(pixel_values.to(dtype), output_hidden_states=True).hidden_states[self.select_layer]
        hidden = hidden[:, 1:] if self.drop_cls else hidden
        return self.projector(hidden.to(next(self.projector.parameters()).dtype))  # outside autocast too

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        patches = input_ids == IMAGE_TOKEN_ID
        embeddings = self.llm.get_input_embeddings()(input_ids.masked_fill(patches, 0))
        if not patches.any():
            return embeddings
        if pixel_values is None:
            raise ValueError("input_ids hold image patches but no pixel_values were given")
        features = self.image_features(pixel_values)
        if features.shape[0] * features.shape[1] != patches.sum():
            raise ValueError(
                f"{int(patches.sum())} image patch positions in input_ids but {features.shape[0]} image(s) of "
                f"{features.shape[1]} patches"
            )
        return embeddings.masked_scatter(patches.unsqueeze(-1), features.reshape(-1, features.shape[-1]).to(embeddings.dtype))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **kwargs):
        return self.llm(inputs_embeds=self.embed(input_ids, pixel_values), **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """As a text model's generate: the prompt ids followed by the new ones."""
        new = self.llm.generate(inputs_embeds=self.embed(input_ids, pixel_values), **kwargs)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.llm.gradient_checkpointing_enable(**kwargs)

    def save_pretrained(self, folder: str | Path, state_dict: dict | None = None, **_) -> None:
        """The trained parts, each in a folder of its own: projector/, llm_adapter/ or llm/, and
        visual_encoder_adapter/ or visual_encoder/ when the encoder was tuned."""
        folder = Path(folder)
        self.projector.save(folder / PROJECTOR)  # always: chat and stage 2 need it, trained or not
        for module, adapter_name, full_name in (
            (self.llm, LLM_ADAPTER, LLM_FULL), (self.visual_encoder, ENCODER_ADAPTER, ENCODER_FULL)
        ):  # fmt: skip
            if isinstance(module, PeftModel):
                from xtune.engine.checkpoint import peft_save_options

                module.save_pretrained(folder / adapter_name, **peft_save_options(module))
            elif any(p.requires_grad for p in module.parameters()):
                module.save_pretrained(folder / full_name)

    def load_trained(self, folder: Path) -> None:
        """What `save_pretrained` wrote, back into this model (to resume)."""
        from peft import set_peft_model_state_dict

        self.projector.load_state_dict(load_file(folder / PROJECTOR / "model.safetensors"))
        for module, adapter_name, full_name in (
            (self.llm, LLM_ADAPTER, LLM_FULL), (self.visual_encoder, ENCODER_ADAPTER, ENCODER_FULL)
        ):  # fmt: skip
            if (folder / adapter_name).is_dir():
                set_peft_model_state_dict(module, load_file(folder / adapter_name / "adapter_model.safetensors"))
            elif (folder / full_name).is_dir():
                state = {}
                for file in sorted((folder / full_name).glob("*.safetensors")):
                    state.update(load_file(file))
                _load_whole(module, state, folder / full_name)


def _load_whole(module: nn.Module, state: dict, folder: Path) -> None:
    """`state` into `module`, every weight: only a tied weight (the head sharing the embeddings) may be absent."""
    result = module.load_state_dict(state, strict=False)
    parameters = dict(module.named_parameters(remove_duplicate=False))
    loaded = {id(parameters[name]) for name in state if name in parameters}
    missing = [name for name in result.missing_keys if id(parameters.get(name)) not in loaded]
    if missing or result.unexpected_keys:
        problem = f"lacks {missing[:3]}" if missing else f"has weights this model does not: {result.unexpected_keys[:3]}"
        raise CheckpointError(f"{folder} {problem}; it was saved from another model or is damaged.")


VISION_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
"""The linear layers of CLIP's and SigLIP's vision transformers."""


def build_llava(config, llm, dtype: torch.dtype, device: torch.device, preprocess=None) -> LlavaModel:
    """The LLaVA model a config describes, around an LLM already made trainable (or frozen) by the caller:
    the vision encoder frozen, LoRA-tuned or fully trained, and a new projector or `pretrained_pth`'s."""
    from peft import LoraConfig

    from xtune.models.load import resolve_model_path
    from xtune.models.lora import lora_model

    trained = config.visual_encoder_lora or not config.freeze_visual_encoder
    encoder = load_visual_encoder(
        resolve_model_path(config.visual_encoder_name_or_path),
        torch.float32 if trained and not config.visual_encoder_quantization else dtype,
        config.visual_encoder_quantization,
        device,
    )
    encoder.requires_grad_(not config.freeze_visual_encoder and not config.visual_encoder_lora)
    if config.visual_encoder_lora:
        lora = LoraConfig(r=config.visual_encoder_lora_r, lora_alpha=config.visual_encoder_lora_alpha,
                          lora_dropout=config.lora_dropout, target_modules=VISION_LORA_TARGETS)  # fmt: skip
        encoder = lora_model(encoder, lora)
    vision_hidden, llm_hidden = encoder.config.hidden_size, llm.config.hidden_size
    if config.pretrained_pth:
        projector = Projector.load(config.pretrained_pth)
        if (projector.settings["vision_hidden_size"], projector.settings["llm_hidden_size"]) != (vision_hidden, llm_hidden):
            raise CheckpointError(
                f"pretrained_pth = {config.pretrained_pth!r} projects {projector.settings['vision_hidden_size']} -> "
                f"{projector.settings['llm_hidden_size']}, but this encoder and LLM need {vision_hidden} -> {llm_hidden}."
            )
    else:
        projector = Projector(vision_hidden, llm_hidden, config.projector_depth)
    projector.float().requires_grad_(not config.freeze_projector)
    return LlavaModel(llm, encoder, projector, config.visual_select_layer, preprocess).to(device)


def with_pixel_values(collate_fn, preprocess):
    """A collate function that turns the batch's image paths into `pixel_values` (picklable, for DataLoader
    workers however they start)."""
    return partial(_collate_with_pixel_values, collate_fn=collate_fn, preprocess=preprocess)


def _collate_with_pixel_values(items, collate_fn, preprocess) -> dict:
    batch = collate_fn(items)
    paths = batch.pop("images", None)
    if paths:
        batch["pixel_values"] = preprocess(paths)
    return batch


def llava_meta(config) -> dict:
    """What chat and convert need to rebuild the model: written into each checkpoint's xtune_run.json."""
    return {
        "visual_encoder_name_or_path": config.visual_encoder_name_or_path,
        "visual_select_layer": config.visual_select_layer,
        "projector_depth": config.projector_depth,
        "pad_image_to_square": config.pad_image_to_square,
        "visual_encoder_quantization": config.visual_encoder_quantization,
    }


def load_llava(
    llm: str,
    visual_encoder: str,
    llava: str | Path,
    bits: int | None = None,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
):
    """(LlavaModel in eval mode, tokenizer) from the base LLM, the base vision encoder and a LLaVA folder of
    trained parts (a checkpoint of a LLaVA run, or `pth_to_hf`'s output)."""
    from xtune.data.images import ImagePreprocessor
    from xtune.engine.checkpoint import read_run_meta
    from xtune.models.load import load_model, load_tokenizer, resolve_model_path
    from xtune.models.lora import attach_adapter

    llava = Path(llava)
    projector = Projector.load(llava)
    meta = read_run_meta(llava).get("llava", {})
    llm_path = llava / LLM_FULL if (llava / LLM_FULL).is_dir() else resolve_model_path(llm)
    quantization = {4: "4bit", 8: "8bit", None: None}[bits]
    language_model = load_model(llm_path, dtype=dtype, quantization=quantization, device=device)
    if (llava / LLM_ADAPTER).is_dir():
        language_model = attach_adapter(language_model, llava / LLM_ADAPTER, llm)
    encoder_path = resolve_model_path(visual_encoder)
    encoder = load_visual_encoder(  # quantized as in training, so a QLoRA adapter meets the weights it learned on
        llava / ENCODER_FULL if (llava / ENCODER_FULL).is_dir() else encoder_path, dtype,
        meta.get("visual_encoder_quantization"), device,
    )  # fmt: skip
    if (llava / ENCODER_ADAPTER).is_dir():
        encoder = attach_adapter(encoder, llava / ENCODER_ADAPTER, visual_encoder)
    preprocess = ImagePreprocessor.from_folder(encoder_path, meta.get("pad_image_to_square", False))
    model = LlavaModel(language_model, encoder, projector.to(dtype), meta.get("visual_select_layer", -2), preprocess)
    tokenizer_folder = llava if (llava / "tokenizer_config.json").is_file() else resolve_model_path(llm)
    return model.to(device).eval(), load_tokenizer(tokenizer_folder)
