"""Tiny real models and a tokenizer, built locally and deterministically, for tests and demos.

`tiny_model_path("internlm2-chat")` gives a complete Hugging Face model folder of a few MB: the same files
and layout as the real checkpoint, with random weights and a byte-level BPE tokenizer trained on a shipped
English corpus. `tiny_model_path("clip-vision")` gives a CLIP vision encoder (32x32 images, 8x8 patches) and
its image processor, the vision tower of a tiny LLaVA.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from xtune.errors import ModelNotFoundError, XtuneError
from xtune.models.internlm2 import save_internlm2
from xtune.paths import xtune_home

CORPUS = Path(__file__).with_name("assets") / "corpus.txt"
BPE_VOCAB_SIZE = 2560
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
INTERNLM2_SPECIAL_TOKENS = [
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
]
INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB_MULTIPLE = 64
INITIALIZER_RANGE = 0.02
OUTPUT_INITIALIZER_RANGE = 0.1
"""The output head's init std. With 0.02 and a unit-RMS final norm, logits cannot exceed about 5, too flat
for any task to be fitted; a pretrained head is far sharper."""
TINY_VERSION = 3
"""Bump when a spec, the init or the tokenizer changes, so that folders built before are not reused."""
RMS_NORM_EPS = 1e-6


@dataclass(frozen=True)
class TinySpec:
    """The shape of a tiny model; `architecture` is its model_type: "internlm2", "llama" or "qwen2"."""

    architecture: str
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    rope_theta: float = 1_000_000.0
    seed: int = 0


TINY_MODELS: dict[str, TinySpec] = {
    "internlm2-chat": TinySpec("internlm2", seed=0),
    "llama": TinySpec("llama", rope_theta=10_000.0, seed=1),
    "qwen2": TinySpec("qwen2", seed=2),
}
"""Tiny language models: a tokenizer, a causal LM and a generation config per folder."""


@dataclass(frozen=True)
class TinyVisionSpec:
    """The shape of a tiny CLIP vision encoder: 16 patches and a CLS token per image, as in LLaVA's tower."""

    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_channels: int = 3
    projection_dim: int = 64
    seed: int = 0
    architecture: str = "clip_vision_model"


TINY_VISION_MODELS: dict[str, TinyVisionSpec] = {
    "clip-vision": TinyVisionSpec(seed=3),
}
"""Tiny vision encoders: a `CLIPVisionModel` and its `CLIPImageProcessor` per folder, no tokenizer."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with InternLM2's special tokens, trained on the shipped corpus."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(),
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        extra_special_tokens=INTERNLM2_SPECIAL_TOKENS,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = INTERNLM2_CHAT_TEMPLATE
    return tokenizer


def _train_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(CORPUS)], trainer)
    return tokenizer


def tiny_spec(name: str) -> TinySpec | TinyVisionSpec:
    specs = TINY_MODELS | TINY_VISION_MODELS
    if name not in specs:
        raise ModelNotFoundError(
            f"there is no tiny model {name!r}; the tiny models are {', '.join(specs)} "
            f"(e.g. xtune-tiny/{next(iter(specs))})"
        )
    return specs[name]


def tiny_model_path(name: str) -> Path:
    """`$XTUNE_HOME/tiny/<name>`, built on first use."""
    tiny_spec(name)
    path = xtune_home() / "tiny" / f"v{TINY_VERSION}" / name
    if not (path / "config.json").is_file():
        build_tiny_model(name, path)
    return path


def build_tiny_model(name: str, dest: Path) -> Path:
    """Writes a complete model folder to `dest`; a folder there is only ever complete.

    The files are written to a hidden sibling folder renamed to `dest` at the end. When another process
    finished `dest` first, its folder is kept and ours is dropped.
    """
    spec = tiny_spec(name)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        _write_model_folder(spec, staging)
        staging.chmod(0o755)
        _publish(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _publish(staging: Path, dest: Path) -> None:
    try:
        os.rename(staging, dest)
    except OSError as error:
        if not (dest / "config.json").is_file():
            raise XtuneError(f"{dest} exists and is not a model folder; remove it and try again") from error


def _write_model_folder(spec: TinySpec | TinyVisionSpec, folder: Path) -> None:
    if isinstance(spec, TinyVisionSpec):
        build_vision_model(spec).save_pretrained(folder)
        image_processor(spec).save_pretrained(folder)
        return
    tokenizer = build_tokenizer()
    model = build_model(spec, vocab_size=_round_up(len(tokenizer), VOCAB_MULTIPLE))
    if spec.architecture == "internlm2":
        save_internlm2(model, folder)
    else:
        model.save_pretrained(folder)
    generation_config(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_model(spec: TinySpec, vocab_size: int) -> PreTrainedModel:
    """A model with deterministic weights: normal(0, 0.02), the output head normal(0, 0.1), norms at one."""
    config = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        rms_norm_eps=RMS_NORM_EPS,
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state as it was
        if spec.architecture == "qwen2":
            model = Qwen2ForCausalLM(Qwen2Config(**config))
        else:
            model = LlamaForCausalLM(LlamaConfig(**config))
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            elif name == "lm_head.weight":
                parameter.normal_(0.0, OUTPUT_INITIALIZER_RANGE, generator=generator)
            else:
                parameter.normal_(0.0, INITIALIZER_RANGE, generator=generator)
    return model.eval()


def build_vision_model(spec: TinyVisionSpec) -> CLIPVisionModel:
    """A CLIP vision encoder with deterministic weights: normal(0, 0.02), layer norms at one, biases at zero."""
    config = CLIPVisionConfig(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_channels=spec.num_channels,
        projection_dim=spec.projection_dim,
        initializer_range=INITIALIZER_RANGE,
    )
    with torch.random.fork_rng(devices=[]):
        model = CLIPVisionModel(config)
    generator = torch.Generator().manual_seed(spec.seed)
    norms = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in norms:
                parameter.fill_(1.0)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.normal_(0.0, INITIALIZER_RANGE, generator=generator)
    return model.eval()


def image_processor(spec: TinyVisionSpec) -> CLIPImageProcessorPil:
    """OpenAI CLIP's preprocessing at the tiny size: shortest edge resized, center crop, CLIP mean and std."""
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": spec.image_size},
        do_center_crop=True,
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=tokenizer.pad_token_id,
    )


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
