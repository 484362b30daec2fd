"""`xtune convert gguf`, read back with gguf's own reader: every tensor under llama.cpp's name with its shape, dtype
and values (q/k rows permuted for rope), the architecture's keys, the tokenizer (tokens, merges, scores, types,
special ids) and the chat template, for each architecture; bad input refused by name."""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from xtune.convert.gguf import convert_gguf, write_gguf
from xtune.engine.checkpoint import RUN_META
from xtune.errors import XtuneError
from xtune.models.load import load_model, load_tokenizer
from xtune.models.publish import save_tokenizer
from xtune.testing.families import save_family_model
from xtune.models.internlm2 import save_internlm2
from xtune.testing.tiny import TinySpec, build_model, generation_config, tiny_model_path

from tests.conftest import SHARED_TOKENIZERS

LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip
"""Hugging Face Llama-layout names -> llama.cpp's, written out here rather than taken from gguf's maps."""
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}  # fmt: skip
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "internlm2": "internlm2"}
PERMUTED = {"llama": True, "mistral": True, "qwen2": False, "internlm2": True}


def gguf_name(hf_name: str) -> str:
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, _, kind = rest.rpartition(".")
    return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"


def interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Row (head h, pair i, member j) of llama.cpp's order is row h*d + j*d/2 + i of Hugging Face's."""
    head_dim = weight.shape[0] // heads
    order = [h * head_dim + j * head_dim // 2 + i for h in range(heads) for i in range(head_dim // 2) for j in (0, 1)]
    return weight[order]


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def internlm2_with_real_tokenizer(folder):
    """An InternLM2-Chat folder as its repository ships it: InternLM2's layout (fused wqkv) and its SentencePiece
    tokenizer.model with the remote-code tokenizer_config.json (no tokenizer.json); a tiny model of its vocabulary."""
    tokenizer = load_tokenizer(SHARED_TOKENIZERS / "internlm2")
    spec = TinySpec("internlm2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    save_internlm2(build_model(spec, vocab_size=len(tokenizer)), folder)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SHARED_TOKENIZERS / "internlm2" / name, folder)
    generation_config(tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """model name -> (model_type, folder): the tiny families with xtune's tiny byte-level BPE, InternLM2 in its own
    (wqkv) layout, and Llama with real SentencePiece vocabularies (with and without tokenizer.model)."""
    root = tmp_path_factory.mktemp("gguf_models")
    made = {name: (name, save_family_model(name, root / name)) for name in ("llama", "qwen2", "mistral")}
    made["internlm2"] = ("internlm2", tiny_model_path("internlm2-chat"))
    for name in ("mistral", "llama2"):
        if (SHARED_TOKENIZERS / name).is_dir():
            folder = save_family_model("llama", root / f"llama-{name}-spm", load_tokenizer(SHARED_TOKENIZERS / name))
            if (SHARED_TOKENIZERS / name / "tokenizer.model").is_file():
                shutil.copy(SHARED_TOKENIZERS / name / "tokenizer.model", folder)
            made[f"spm-{name}"] = ("llama", folder)
    if (SHARED_TOKENIZERS / "internlm2").is_dir():
        made["spm-internlm2"] = ("internlm2", internlm2_with_real_tokenizer(root / "internlm2-spm"))
    return made


@pytest.fixture(scope="session")
def written(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_files")
    return {name: write_gguf(folder, root / f"{name}.gguf") for name, (_, folder) in folders.items()}


ALL = ["llama", "qwen2", "mistral", "internlm2", "spm-mistral", "spm-llama2", "spm-internlm2"]


def _need(name, folders):
    if name not in folders:
        pytest.skip(f"no real tokenizer for {name} in {SHARED_TOKENIZERS}")


@pytest.mark.parametrize("name", ALL)
def test_every_tensor_has_llama_cpp_name_shape_dtype_and_values(name, folders, written):
    _need(name, folders)
    model_type, folder = folders[name]
    model = load_model(folder)  # InternLM2's wqkv split into q, k, v by xtune's loader
    config = model.config
    reader = gguf.GGUFReader(written[name])
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    state = model.state_dict()
    assert set(tensors) == {gguf_name(key) for key in state}
    for key, weight in state.items():
        tensor = tensors[gguf_name(key)]
        assert tuple(tensor.shape) == tuple(reversed(weight.shape)), key
        assert tensor.tensor_type == (gguf.GGMLQuantizationType.F16 if weight.dim() == 2 else gguf.GGMLQuantizationType.F32), key  # fmt: skip
        expected = weight
        if PERMUTED[model_type] and ".q_proj." in key:
            expected = interleaved(weight, config.num_attention_heads)
        elif PERMUTED[model_type] and ".k_proj." in key:
            expected = interleaved(weight, config.num_key_value_heads)
        data = np.asarray(tensor.data, dtype=np.float32).reshape(weight.shape)
        np.testing.assert_allclose(data, expected.to(torch.float16).float().numpy(), rtol=0, atol=0, err_msg=key)


@pytest.mark.parametrize("name", ALL)
def test_architecture_keys(name, folders, written):
    _need(name, folders)
    model_type, folder = folders[name]
    config = load_model(folder).config
    reader = gguf.GGUFReader(written[name])
    arch = GGUF_ARCH[model_type]
    assert field(reader, "general.architecture") == arch
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    expected = {
        "block_count": config.num_hidden_layers, "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size, "context_length": config.max_position_embeddings,
        "attention.head_count": config.num_attention_heads, "attention.head_count_kv": config.num_key_value_heads,
        "rope.dimension_count": config.hidden_size // config.num_attention_heads, "vocab_size": config.vocab_size,
    }  # fmt: skip
    for key, value in expected.items():
        assert field(reader, f"{arch}.{key}") == value, key
    assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)


@pytest.mark.parametrize("name", ALL)
def test_tokenizer_and_chat_template(name, folders, written):
    _need(name, folders)
    _, folder = folders[name]
    tokenizer = load_tokenizer(folder)
    reader = gguf.GGUFReader(written[name])
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    n_vocab = load_model(folder).get_input_embeddings().weight.shape[0]
    assert len(tokens) == len(types) == len(field(reader, "tokenizer.ggml.scores")) == n_vocab
    real = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    real = ["🐉" if token == "\x00" else token for token in real]  # as llama.cpp writes InternLM2's NUL piece
    assert tokens[: len(tokenizer)] == real
    assert tokens[len(tokenizer) :] == [f"[PAD{i}]" for i in range(len(tokenizer), n_vocab)]
    assert set(types[len(tokenizer) :]) <= {gguf.TokenType.UNUSED}
    for token_id, added in tokenizer.added_tokens_decoder.items():
        assert types[token_id] == (gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if name.startswith("spm-"):
        assert field(reader, "tokenizer.ggml.model") == "llama"
        assert "tokenizer.ggml.merges" not in reader.fields
        # Mistral's tokenizer.json prepends "▁" to each text segment, as llama.cpp does; transformers 5 rebuilds
        # Llama 2's to prepend at the text's start only, which llama.cpp cannot: written as no prefix.
        assert field(reader, "tokenizer.ggml.add_space_prefix") is (name == "spm-mistral")
        byte_ids = [tokenizer.convert_tokens_to_ids(f"<0x{byte:02X}>") for byte in range(256)]
        assert {types[token_id] for token_id in byte_ids} == {gguf.TokenType.BYTE}
    else:
        assert field(reader, "tokenizer.ggml.model") == "gpt2"
        pre = "qwen2" if name == "qwen2" else "gpt-2"  # transformers runs Qwen2's folder with Qwen2's digit split
        assert field(reader, "tokenizer.ggml.pre") == pre
        merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in backend["merges"]]
        assert field(reader, "tokenizer.ggml.merges") == merges
        assert set(types[: len(tokenizer)]) == {gguf.TokenType.NORMAL, gguf.TokenType.CONTROL}
    if name in ("internlm2", "spm-internlm2"):  # its generation config stops at <|im_end|>: llama.cpp's end of turn
        assert field(reader, "tokenizer.ggml.eot_token_id") == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_a_sentencepiece_model_without_fast_tokenizer_gives_its_own_scores_and_types(folders):
    """The fallback for a tokenizer transformers runs without a tokenizer.json (a slow SentencePiece tokenizer)."""
    _need("spm-mistral", folders)
    from sentencepiece import SentencePieceProcessor

    from xtune.convert.gguf import _sentencepiece_vocabulary

    model_file = folders["spm-mistral"][1] / "tokenizer.model"
    processor = SentencePieceProcessor(model_file=str(model_file))
    vocabulary = _sentencepiece_vocabulary(model_file, processor.vocab_size() + 2)
    assert vocabulary.model == "llama" and vocabulary.add_space_prefix is True
    assert vocabulary.tokens[:-2] == [processor.IdToPiece(i) for i in range(processor.vocab_size())]
    assert vocabulary.scores[:-2] == pytest.approx([processor.GetScore(i) for i in range(processor.vocab_size())])
    assert vocabulary.types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert vocabulary.types[3:259] == [gguf.TokenType.BYTE] * 256
    assert vocabulary.tokens[-2:] == [f"[PAD{processor.vocab_size()}]", f"[PAD{processor.vocab_size() + 1}]"]


@pytest.mark.parametrize("name", ["spm-mistral", "spm-llama2"])
def test_sentencepiece_scores_follow_transformers_merges(name, folders, written):
    """A merged piece scores minus the rank of the merge that makes it: llama.cpp then merges in transformers'
    order (tokenizer.model's own scores rank "▁▁" last, where transformers merges it first)."""
    _need(name, folders)
    tokenizer = load_tokenizer(folders[name][1])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    reader = gguf.GGUFReader(written[name])
    scores = field(reader, "tokenizer.ggml.scores")
    pieces = ["".join(merge.split(" ") if isinstance(merge, str) else merge) for merge in merges]
    for rank in (0, 1, 100, len(merges) - 1):
        first = pieces.index(pieces[rank])  # the earliest merge making the same piece
        assert scores[tokenizer.convert_tokens_to_ids(pieces[rank])] == -first
    single = tokenizer.convert_tokens_to_ids("a")  # not made by a merge: below every merged piece
    assert scores[single] == -len(merges)


@pytest.mark.parametrize("outtype, kind, tolerance", [("bf16", gguf.GGMLQuantizationType.BF16, 1e-2), ("q8_0", gguf.GGMLQuantizationType.Q8_0, 1e-2)])  # fmt: skip
def test_bf16_and_q8_0_matrices(outtype, kind, tolerance, folders, tmp_path):
    folder = folders["qwen2"][1]
    out = write_gguf(folder, tmp_path / "model.gguf", outtype)
    reader = gguf.GGUFReader(out)
    state = load_model(folder).state_dict()
    assert field(reader, "general.file_type") == {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]  # fmt: skip
    for tensor in reader.tensors:
        hf_name = next(key for key in state if gguf_name(key) == tensor.name)
        weight = state[hf_name]
        assert tensor.tensor_type == (kind if weight.dim() == 2 else gguf.GGMLQuantizationType.F32), tensor.name
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
        np.testing.assert_allclose(values, weight.numpy(), atol=tolerance * float(weight.abs().max()), rtol=0)


def test_adapter_is_merged_first(folders, tmp_path):
    base = folders["llama"][1]
    model = load_model(base)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    load_tokenizer(base).save_pretrained(adapter)
    (adapter / RUN_META).write_text(json.dumps({"llm_name_or_path": str(base), "method": "lora", "prompt_template": "internlm2_chat"}))  # fmt: skip
    merged_v = peft_model.merge_and_unload().model.layers[0].self_attn.v_proj.weight.detach()
    out = convert_gguf(str(base), tmp_path / "merged.gguf", adapter=adapter)
    reader = gguf.GGUFReader(out)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    v = np.asarray(tensors["blk.0.attn_v.weight"].data, dtype=np.float32).reshape(merged_v.shape)
    np.testing.assert_allclose(v, merged_v.to(torch.float16).float().numpy(), atol=0, rtol=0)
    assert not np.allclose(v, load_model(base).model.layers[0].self_attn.v_proj.weight.detach().numpy(), atol=1e-3)
    assert field(reader, "xtune.prompt_template") == "internlm2_chat"
    assert "<|im_start|>assistant" in field(reader, "tokenizer.chat_template")  # the merged folder's template
    assert not list(tmp_path.glob(".xtune-merge-*"))  # the merged folder is removed


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    folder = save_family_model("gemma", tmp_path / "gemma")
    with pytest.raises(XtuneError, match=r"model_type 'gemma' cannot be written as GGUF.*llama, mistral, qwen2, internlm2"):  # fmt: skip
        write_gguf(folder, tmp_path / "gemma.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.partial"))


def test_existing_output_and_bad_outtype_are_refused(folders, tmp_path):
    out = tmp_path / "taken.gguf"
    out.write_text("mine")
    with pytest.raises(XtuneError, match="already exists"):
        convert_gguf(str(folders["llama"][1]), out)
    with pytest.raises(XtuneError, match="--outtype 'q4'"):
        convert_gguf(str(folders["llama"][1]), tmp_path / "new.gguf", outtype="q4")
    assert out.read_text() == "mine"


def test_cli_writes_the_gguf(folders, tmp_path):
    from typer.testing import CliRunner

    from xtune.cli import app

    folder = tmp_path / "chat"
    shutil.copytree(folders["qwen2"][1], folder)
    save_tokenizer(load_tokenizer(folder), folder, "qwen_chat")
    result = CliRunner().invoke(app, ["convert", "gguf", str(folder), str(tmp_path / "out.gguf"), "--outtype", "q8_0"])
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(tmp_path / "out.gguf")
    assert field(reader, "general.architecture") == "qwen2"
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")


@pytest.mark.parametrize("name, pre", [("llama3", "llama-bpe"), ("qwen2", "qwen2")])
def test_real_byte_level_tokenizers_get_llama_cpps_pre_tokenizer_names(name, pre, real_tokenizer, tmp_path):
    from xtune.convert.gguf import pre_tokenizer_name, tokenizer_json_of

    tokenizer = real_tokenizer(name)
    assert pre_tokenizer_name(tmp_path, tokenizer_json_of(tmp_path, tokenizer)) == pre


def test_an_unknown_pre_tokenizer_is_refused(tmp_path):
    from xtune.convert.gguf import pre_tokenizer_name

    split = {"type": "Split", "pattern": {"Regex": r"\p{L}+|\s+"}, "behavior": "Isolated", "invert": False}
    tokenizer_json = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel", "use_regex": False}]}}  # fmt: skip
    with pytest.raises(XtuneError, match="not one xtune can name for llama.cpp"):
        pre_tokenizer_name(tmp_path, tokenizer_json)


def test_quantized_weights_and_unwritten_rope_scaling_are_refused_and_linear_scaling_written(folders, tmp_path):
    def variant(name: str, **changes) -> "Path":
        folder = tmp_path / name
        shutil.copytree(folders["llama"][1], folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        return folder

    quantized = variant("quantized", quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(XtuneError, match="describes quantized weights \\(bitsandbytes\\)"):
        write_gguf(quantized, tmp_path / "q.gguf")
    llama3 = variant("llama3", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})  # fmt: skip
    with pytest.raises(XtuneError, match="rope_type 'llama3' is not written to GGUF by xtune yet"):
        write_gguf(llama3, tmp_path / "l3.gguf")
    assert not list(tmp_path.glob("*.gguf"))
    linear = variant("linear", rope_scaling={"rope_type": "linear", "factor": 4.0})
    write_gguf(linear, tmp_path / "linear.gguf")
    reader = gguf.GGUFReader(tmp_path / "linear.gguf")
    assert field(reader, "llama.rope.scaling.factor") == pytest.approx(4.0)


def test_a_sliding_window_model_is_written_with_a_warning(folders, tmp_path):
    import io

    from rich.console import Console

    folder = tmp_path / "windowed"
    shutil.copytree(folders["mistral"][1], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sliding_window": 16, "max_position_embeddings": 512}))
    output = io.StringIO()
    convert_gguf(str(folder), tmp_path / "windowed.gguf", console=Console(file=output, width=300))
    assert "attends within a sliding window of 16 tokens" in output.getvalue()
