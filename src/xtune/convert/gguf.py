"""`xtune convert gguf MODEL OUT.gguf`: a model folder (or a base and its LoRA adapter) as a GGUF file for llama.cpp
and the tools built on it (Ollama, LM Studio, llama-cpp-python).

Written with the `gguf` package, llama.cpp's own writer: its tensor name maps, its writer, its special-token
reader and its q8_0/bf16 quantizers. What is xtune's own here follows the conventions of llama.cpp's
convert_hf_to_gguf.py: which GGUF architecture a model_type is written as, the q/k permutation of the
architectures llama.cpp rotates in the interleaved (GPT-J) order, the tokenizer model ("llama" for SentencePiece,
"gpt2" for byte-level BPE) and the name of the pre-tokenizer llama.cpp must split text with.
"""

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from rich.console import Console

from xtune.engine.checkpoint import read_run_meta
from xtune.errors import CheckpointError, XtuneError
from xtune.models.internlm2 import is_internlm2
from xtune.models.load import load_model, load_tokenizer, read_config, resolve_model_path


@dataclass(frozen=True)
class GgufArchitecture:
    """How llama.cpp reads one model_type."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool
    """llama.cpp rotates this architecture's q/k in interleaved pairs (rope type "norm"); Hugging Face checkpoints
    hold them in rotate-half order, so their rows are permuted. False: llama.cpp rotates in rotate-half ("neox")
    order too."""


ARCHITECTURES: dict[str, GgufArchitecture] = {
    "llama": GgufArchitecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": GgufArchitecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),  # llama.cpp writes Mistral as Llama
    "qwen2": GgufArchitecture(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
    "internlm2": GgufArchitecture(gguf.MODEL_ARCH.INTERNLM2, permute_qk=True),
}
"""model_type -> GGUF architecture. InternLM2 is loaded in the Llama layout (its fused wqkv split) by xtune's
loader, then written with InternLM2's GGUF names."""

PROMPT_TEMPLATE_KEY = "xtune.prompt_template"
"""The xtune template the model was trained with (its folder's xtune_run.json), where known."""
OUTTYPES = ("f16", "bf16", "q8_0")
FILE_TYPES = {
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
ROPE_SCALING = {"linear": gguf.RopeScalingType.LINEAR}
"""rope_type -> how llama.cpp scales it; "default" needs none. Others (llama3, yarn, dynamic) are refused."""

PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}  # fmt: skip
"""The regular expression a byte-level BPE tokenizer.json splits text with -> llama.cpp's name for that split
(`tokenizer.ggml.pre`). A ByteLevel pre-tokenizer with its own regex is GPT-2's: "gpt-2"."""

SPM_NUL_PIECE = "🐉"
"""InternLM2's vocabulary holds the piece "\\x00", which llama.cpp's C strings would read as empty; llama.cpp's
converter writes it as this emoji instead, and so does xtune."""


@dataclass
class Vocabulary:
    model: str
    """"llama" (SentencePiece) or "gpt2" (byte-level BPE)."""
    pre: str
    tokens: list[str]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool | None = None


def convert_gguf(
    model: str,
    out: str | Path,
    adapter: str | Path | None = None,
    outtype: str = "f16",
    console: Console | None = None,
) -> Path:
    """Write OUT.gguf from MODEL (a folder or id in Hugging Face layout, e.g. `xtune convert merge`'s output), or
    from MODEL merged with ADAPTER first (xtune's merge, into 16-bit weights)."""
    console = console or Console(stderr=True)
    out = Path(out)
    if outtype not in OUTTYPES:
        raise XtuneError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}.")
    if out.exists():
        raise XtuneError(f"{out} already exists; choose another OUT.gguf or remove it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    if adapter is not None:
        from xtune.convert.merge import merge

        with tempfile.TemporaryDirectory(prefix=".xtune-merge-", dir=out.parent) as tmp:
            merged = merge(model, adapter, Path(tmp) / "merged", console=console)
            return write_gguf(merged, out, outtype, console)
    return write_gguf(resolve_model_path(model), out, outtype, console)


def write_gguf(folder: Path, out: Path, outtype: str = "f16", console: Console | None = None) -> Path:
    """The model folder `folder` as a GGUF file at `out`, written aside and renamed into place."""
    console = console or Console(stderr=True)
    config = read_config(folder)
    architecture = gguf_architecture(folder, config)
    if config.get("quantization_config"):
        raise CheckpointError(
            f"{folder / 'config.json'} describes quantized weights "
            f"({config['quantization_config'].get('quant_method', '?')}); GGUF is written from 16/32-bit weights. "
            "Convert the 16-bit base, with --adapter for a QLoRA adapter."
        )
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.get("dtype") or config.get("torch_dtype"), torch.float32)  # fmt: skip
    hf_model = load_model(folder, dtype=dtype)
    tokenizer = load_tokenizer(folder)
    hf_config = hf_model.config
    n_vocab = hf_model.get_input_embeddings().weight.shape[0]
    vocabulary = read_vocabulary(folder, tokenizer, n_vocab)

    partial = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[architecture.arch], use_temp_file=True)  # not all in memory
    write_hyperparameters(writer, hf_config, folder, outtype, console)
    write_tokenizer(writer, vocabulary, folder, tokenizer)
    if template := read_run_meta(folder).get("prompt_template"):
        writer.add_string(PROMPT_TEMPLATE_KEY, template)  # for `xtune convert ollama`
    for name, tensor, raw_dtype in gguf_tensors(hf_model.state_dict(), hf_config, architecture, outtype):
        writer.add_tensor(name, tensor, raw_dtype=raw_dtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    arch_name = gguf.MODEL_ARCH_NAMES[architecture.arch]
    console.print(f"wrote {out} ({arch_name}, {outtype}, {len(vocabulary.tokens)} tokens)", highlight=False)
    return out


def gguf_architecture(folder: Path, config: dict) -> GgufArchitecture:
    model_type = "internlm2" if is_internlm2(config) else config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise XtuneError(
            f"{folder / 'config.json'}: model_type {model_type!r} cannot be written as GGUF by xtune yet; "
            f"supported: {', '.join(ARCHITECTURES)}."
        )
    return ARCHITECTURES[model_type]


def write_hyperparameters(writer: gguf.GGUFWriter, config, folder: Path, outtype: str, console: Console) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(folder.name)
    writer.add_file_type(FILE_TYPES[outtype])
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = dict(config.rope_parameters or {})
    writer.add_rope_freq_base(rope.get("rope_theta", 10_000.0))
    rope_type = rope.get("rope_type", "default")
    if rope_type in ROPE_SCALING:
        writer.add_rope_scaling_type(ROPE_SCALING[rope_type])
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type != "default":
        raise XtuneError(
            f"{folder / 'config.json'}: rope_type {rope_type!r} is not written to GGUF by xtune yet (only default and "
            "linear); use llama.cpp's convert_hf_to_gguf.py for this model."
        )
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings and getattr(config, "use_sliding_window", True):
        console.print(
            f"[bold yellow]warning:[/] the model attends within a sliding window of {window} tokens; llama.cpp runs "
            "this architecture with full attention, so its outputs differ from transformers' past that many tokens",
            highlight=False,
        )


def gguf_tensors(state_dict: dict[str, torch.Tensor], config, architecture: GgufArchitecture, outtype: str):
    """(GGUF name, data, raw dtype or None) for each weight, in llama.cpp's names, shapes and types: matrices in
    `outtype`, vectors (norms, biases) in f32."""
    names = gguf.get_tensor_name_map(architecture.arch, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp falls back on token_embd.weight when output.weight is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise XtuneError(f"tensor {hf_name!r} has no name in GGUF's {gguf.MODEL_ARCH_NAMES[architecture.arch]} architecture")  # fmt: skip
        data = tensor.detach().to(torch.float32)
        if architecture.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = interleave_rope_rows(data, heads)
        elif architecture.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = interleave_rope_rows(data, kv_heads)
        yield (name, *encode_tensor(data.numpy(), outtype))


def interleave_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from rotate-half order (each head's first half of dimensions paired with its
    second half) to interleaved order (dimension 2i paired with 2i+1), the order llama.cpp rotates."""
    rest = weight.shape[1:]
    head_dim = weight.shape[0] // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(weight.shape)


def encode_tensor(data: np.ndarray, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    if data.ndim < 2:
        return data.astype(np.float32), None
    if outtype == "bf16":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None  # q8_0 rows not a whole number of blocks stay f16, as in llama.cpp


def read_vocabulary(folder: Path, tokenizer, n_vocab: int) -> Vocabulary:
    """The tokens as llama.cpp stores them, one per embedding row, from the tokenizer as transformers runs it (so
    that llama.cpp splits text as xtune trained on it); the SentencePiece model's own pieces and scores only where
    transformers has no fast tokenizer for it. Special added tokens are CONTROL, other added tokens USER_DEFINED,
    rows past the tokenizer's end UNUSED `[PAD<id>]`."""
    tokenizer_json = tokenizer_json_of(folder, tokenizer)
    model = (tokenizer_json or {}).get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        vocabulary = _sentencepiece_bpe_vocabulary(tokenizer_json, n_vocab)
    elif model.get("type") == "BPE" and _is_byte_level(tokenizer_json):
        vocabulary = _byte_level_vocabulary(folder, tokenizer_json, n_vocab)
    elif (folder / "tokenizer.model").is_file():
        vocabulary = _sentencepiece_vocabulary(folder / "tokenizer.model", n_vocab)
    else:
        raise XtuneError(
            f"{folder}: the tokenizer ({model.get('type', 'no tokenizer.json or tokenizer.model')}) is neither "
            "SentencePiece nor byte-level BPE; xtune writes only those two to GGUF."
        )
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if token_id < n_vocab:
            vocabulary.tokens[token_id] = added.content
            vocabulary.types[token_id] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    return vocabulary


def tokenizer_json_of(folder: Path, tokenizer) -> dict | None:
    """The tokenizer as transformers runs it: its backend's tokenizer.json. transformers 5 may rebuild a folder's
    tokenizer.json for the model_type's tokenizer class (Qwen2's splits digits apart), and the GGUF must tokenize
    as xtune trained."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else _read_json(folder / "tokenizer.json")


def _sentencepiece_vocabulary(model_file: Path, n_vocab: int) -> Vocabulary:
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2

    processor = SentencePieceProcessor(model_file=str(model_file))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    tokens, scores, types = _padding(n_vocab)
    for token_id in range(min(n_vocab, processor.vocab_size())):
        piece = processor.IdToPiece(token_id)
        tokens[token_id] = SPM_NUL_PIECE if piece == "\x00" else piece
        scores[token_id] = processor.GetScore(token_id)
        types[token_id] = (
            gguf.TokenType.UNKNOWN if processor.IsUnknown(token_id)
            else gguf.TokenType.CONTROL if processor.IsControl(token_id)
            else gguf.TokenType.UNUSED if processor.IsUnused(token_id)
            else gguf.TokenType.BYTE if processor.IsByte(token_id)
            else gguf.TokenType.NORMAL
        )  # fmt: skip
    return Vocabulary("llama", "default", tokens, scores, types, proto.normalizer_spec.add_dummy_prefix)


def _sentencepiece_bpe_vocabulary(tokenizer_json: dict, n_vocab: int) -> Vocabulary:
    """A SentencePiece BPE vocabulary that only tokenizer.json holds (transformers' conversion of it). llama.cpp's
    SentencePiece tokenizer merges the pair whose result scores highest; SentencePiece scores a merged piece by
    when it was learnt, and so does this: a piece scores minus the rank of the merge that makes it."""
    tokens, scores, types = _padding(n_vocab)
    vocab = tokenizer_json["model"]["vocab"]
    merges = tokenizer_json["model"]["merges"]
    rank_of = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank_of.setdefault(left + right, rank)
    unk = tokenizer_json["model"].get("unk_token")
    for piece, token_id in vocab.items():
        if token_id >= n_vocab:
            continue
        tokens[token_id] = SPM_NUL_PIECE if piece == "\x00" else piece
        scores[token_id] = -float(rank_of.get(piece, len(merges)))
        types[token_id] = (
            gguf.TokenType.BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", piece)
            else gguf.TokenType.UNKNOWN if piece == unk
            else gguf.TokenType.NORMAL
        )  # fmt: skip
    return Vocabulary("llama", "default", tokens, scores, types, _prepends_space(tokenizer_json))


def _byte_level_vocabulary(folder: Path, tokenizer_json: dict, n_vocab: int) -> Vocabulary:
    tokens, scores, types = _padding(n_vocab)
    for piece, token_id in tokenizer_json["model"]["vocab"].items():
        if token_id < n_vocab:
            tokens[token_id], scores[token_id], types[token_id] = piece, 0.0, gguf.TokenType.NORMAL
    return Vocabulary("gpt2", pre_tokenizer_name(folder, tokenizer_json), tokens, scores, types)


def _padding(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    return [f"[PAD{i}]" for i in range(n_vocab)], [0.0] * n_vocab, [gguf.TokenType.UNUSED] * n_vocab


def _is_byte_level(tokenizer_json: dict) -> bool:
    return (tokenizer_json.get("decoder") or {}).get("type") == "ByteLevel"


def _prepends_space(tokenizer_json: dict) -> bool:
    """llama.cpp's add_space_prefix: a "▁" written before the text at its start and after each special token, as
    a Prepend normalizer (Llama and Mistral's tokenizer.json) or Metaspace's "always" scheme does. Metaspace's
    "first" (transformers 5's rebuilt LlamaTokenizer) prepends at the start of the text only, not after a special
    token; llama.cpp has no such mode, and it is written as no prefix, which is what chat prompts (opening with a
    special token) need. A text starting with a plain word then loses the "▁" transformers gives it."""
    normalizer = tokenizer_json.get("normalizer") or {}
    if any(step.get("type") == "Prepend" and step.get("prepend") == "▁" for step in normalizer.get("normalizers", [normalizer])):  # fmt: skip
        return True
    pre = tokenizer_json.get("pre_tokenizer") or {}
    return any(
        step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") == "always"
        for step in pre.get("pretokenizers", [pre])
    )


def pre_tokenizer_name(folder: Path, tokenizer_json: dict) -> str:
    """llama.cpp's name for how this byte-level BPE tokenizer splits text before merging."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2"
    splits = [step["pattern"].get("Regex") for step in steps if step.get("type") == "Split"]
    if len(splits) == 1 and splits[0] in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[splits[0]]
    raise XtuneError(
        f"{folder / 'tokenizer.json'}: its pre-tokenizer ({json.dumps(pre)[:200]}) is not one xtune can name for "
        f"llama.cpp (known: gpt-2, {', '.join(PRE_TOKENIZERS.values())}); llama.cpp would split text differently."
    )


def write_tokenizer(writer: gguf.GGUFWriter, vocabulary: Vocabulary, folder: Path, tokenizer) -> None:
    """Tokens, scores, types and merges; the special token ids, whether BOS/EOS are added, and the chat template.
    Special ids and flags are gguf's SpecialVocab reading of the folder, checked against the tokenizer as
    transformers loads it; an end-of-turn id (`eot`) is the generation config's first stop token that is not EOS."""
    writer.add_vocab_size(len(vocabulary.tokens))
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.types)
    if vocabulary.add_space_prefix is not None:
        writer.add_add_space_prefix(vocabulary.add_space_prefix)
    special = gguf.SpecialVocab(folder, n_vocab=len(vocabulary.tokens))
    if vocabulary.model == "gpt2":
        merges = tokenizer_json_of(folder, tokenizer)["model"]["merges"]
        special.merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            special.special_token_ids[kind] = token_id
    probe = tokenizer("a").input_ids
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
    if tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    if (eot := end_of_turn_id(folder, tokenizer)) is not None:
        special.special_token_ids["eot"] = eot
    special.add_to_gguf(writer, quiet=True)


def end_of_turn_id(folder: Path, tokenizer) -> int | None:
    config = _read_json(folder / "generation_config.json") or {}
    ids = config.get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else list(ids or ())
    others = (tokenizer.eos_token_id, tokenizer.unk_token_id)
    return next((token_id for token_id in ids if token_id not in others), None)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
