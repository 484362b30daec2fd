"""LLaVA runs: their trained parts as a folder of their own, and (`--export hf-llava`) a transformers
`LlavaForConditionalGeneration` folder when the parts fit its shape."""

import shutil
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from xtune.data.formats import IMAGE_PLACEHOLDER
from xtune.errors import XtuneError
from xtune.models.llava import ENCODER_ADAPTER, ENCODER_FULL, LLM_ADAPTER, LLM_FULL, PROJECTOR, load_llava
from xtune.models.publish import generation_config_of, saved_chat_template, save_tokenizer, write_generation_config

PARTS = (PROJECTOR, LLM_ADAPTER, LLM_FULL, ENCODER_ADAPTER, ENCODER_FULL)


def copy_llava_parts(checkpoint: Path, folder: Path, dtype: torch.dtype) -> list[str]:
    """projector/, llm_adapter/ (or llm/), visual_encoder_adapter/ (or visual_encoder/): safetensors cast to
    `dtype`, configs as they are. Returns the parts written."""
    written = []
    for part in PARTS:
        source = checkpoint / part
        if not source.is_dir():
            continue
        (folder / part).mkdir()
        for file in source.iterdir():
            if file.suffix == ".safetensors":
                tensors = load_file(file)
                save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, folder / part / file.name)
            elif file.is_file():
                shutil.copy(file, folder / part / file.name)
        written.append(part)
    return written


def export_hf_llava(llm: str, visual_encoder: str, llava: Path, folder: Path, dtype: torch.dtype, prompt_template: str | None) -> None:
    """A `LlavaForConditionalGeneration` folder (with its processor) holding the base LLM and vision encoder
    with their adapters merged and the projector, so plain transformers runs the trained model: its chat template
    writes an image part as `<image>` where it stands, and its generation config stops where the template ends a
    reply."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    model, tokenizer = load_llava(llm, visual_encoder, llava, dtype=torch.float32)
    if model.projector.settings["depth"] != 2:
        raise XtuneError(
            f"--export hf-llava: the projector has {model.projector.settings['depth']} linear layers; transformers' "
            "LLaVA has exactly 2 (projector_depth = 2)."
        )
    language_model = model.llm.merge_and_unload() if isinstance(model.llm, PeftModel) else model.llm
    encoder = model.visual_encoder.merge_and_unload() if isinstance(model.visual_encoder, PeftModel) else model.visual_encoder
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if image_token >= language_model.get_input_embeddings().num_embeddings:
        language_model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    config = LlavaConfig(
        vision_config=encoder.config,
        text_config=language_model.config,
        image_token_index=image_token,
        image_seq_length=model.image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if model.drop_cls else "full",
        vision_feature_layer=model.select_layer,
    )
    hf = LlavaForConditionalGeneration(config)
    projector = model.projector.model
    parts = {
        hf.model.vision_tower: encoder.state_dict(),
        hf.model.multi_modal_projector: {
            "linear_1.weight": projector[0].weight, "linear_1.bias": projector[0].bias,
            "linear_2.weight": projector[2].weight, "linear_2.bias": projector[2].bias,
        },
        hf.model.language_model: language_model.model.state_dict(),
        hf.lm_head: language_model.lm_head.state_dict(),
    }  # fmt: skip
    for module, state in parts.items():
        module.load_state_dict(state)
    hf.to(dtype).save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=model.preprocess.processor,
        tokenizer=tokenizer,
        patch_size=encoder.config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if model.drop_cls else 0,
        chat_template=saved_chat_template(prompt_template, IMAGE_PLACEHOLDER),
    )
    processor.save_pretrained(folder)
    save_tokenizer(tokenizer, folder, prompt_template, IMAGE_PLACEHOLDER)
    write_generation_config(folder, generation_config_of(language_model), tokenizer, prompt_template)
