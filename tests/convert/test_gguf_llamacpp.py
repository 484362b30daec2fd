"""The GGUF that `xtune convert gguf` writes, run by llama.cpp itself (llama-cpp-python, `pip install -e
'.[llamacpp]'`): the same tokens, logits and greedy continuation as transformers on the same prompt, and the chat
template in the file renders the prompts xtune trains with."""

import shutil

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: pip install -c constraints.txt -e '.[llamacpp]' (compiles llama.cpp, ~10 min)"  # fmt: skip
)

from xtune.convert.gguf import write_gguf  # noqa: E402
from xtune.data.formats import Conversation, Turn  # noqa: E402
from xtune.data.templates import generation_prompt, get_template  # noqa: E402
from xtune.models.load import load_model, load_tokenizer  # noqa: E402
from xtune.models.publish import save_tokenizer  # noqa: E402
from xtune.testing.families import build_family_model, save_family_model  # noqa: E402
from xtune.testing.tiny import generation_config, tiny_model_path  # noqa: E402

from tests.conftest import SHARED_TOKENIZERS  # noqa: E402
from tests.convert.test_gguf import internlm2_with_real_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow

CONVERSATION = Conversation(
    turns=(
        Turn("system", "You are terse."),
        Turn("user", "Name three colours, 1234 and 56."),
        Turn("assistant", "Red, green and  blue."),
        Turn("user", "And\n\ntwo more?"),
    )
)
TOLERANCE = {"f16": 0.02, "bf16": 0.15, "q8_0": 0.25}
"""Largest |logit difference| allowed, on logits of magnitude ~4. Measured: f16 0.003-0.007, bf16 0.03-0.05, q8_0 0.11-0.13 (llama.cpp
also rounds the activations to 8 bits for q8_0 products)."""
NEW_TOKENS = 8


def _mistral_with_full_attention(folder):
    """Tiny Mistral without its 8-token sliding window: llama.cpp runs Mistral (as Llama) with full attention."""
    save_family_model("mistral", folder)
    model = build_family_model("mistral", vocab_size=load_model(folder).config.vocab_size)
    model.config.sliding_window = None
    model.save_pretrained(folder)
    return folder


def _real_tokenizer(model_type, folder, name):
    """A tiny `model_type` model with a family's real byte-level BPE tokenizer (Llama 3's, Qwen2's)."""
    from transformers import GenerationConfig

    tokenizer = load_tokenizer(SHARED_TOKENIZERS / name)
    save_family_model(model_type, folder, tokenizer)
    stops = [tokenizer.convert_tokens_to_ids(token) for token in ("<|im_end|>", "<|eot_id|>") if token in tokenizer.get_vocab()]  # fmt: skip
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, *stops], pad_token_id=tokenizer.eos_token_id).save_pretrained(folder)  # fmt: skip
    return folder


def _spm_llama(folder, name):
    tokenizer = load_tokenizer(SHARED_TOKENIZERS / name)
    save_family_model("llama", folder, tokenizer)
    generation_config(tokenizer).save_pretrained(folder)
    if (SHARED_TOKENIZERS / name / "tokenizer.model").is_file():
        shutil.copy(SHARED_TOKENIZERS / name / "tokenizer.model", folder)
    return folder


CASES = {
    "llama": ("internlm2_chat", lambda root: save_family_model("llama", root / "llama")),
    "qwen2": ("qwen_chat", lambda root: save_family_model("qwen2", root / "qwen2")),
    "mistral": ("internlm2_chat", lambda root: _mistral_with_full_attention(root / "mistral")),
    "internlm2": ("internlm2_chat", lambda root: shutil.copytree(tiny_model_path("internlm2-chat"), root / "internlm2")),
    "spm-mistral": ("mistral", lambda root: _spm_llama(root / "spm-mistral", "mistral")),
    "spm-llama2": ("llama2_chat", lambda root: _spm_llama(root / "spm-llama2", "llama2")),
    "spm-internlm2": ("internlm2_chat", lambda root: internlm2_with_real_tokenizer(root / "spm-internlm2")),
    "bpe-llama3": ("llama3_chat", lambda root: _real_tokenizer("llama", root / "bpe-llama3", "llama3")),
    "bpe-qwen2": ("qwen_chat", lambda root: _real_tokenizer("qwen2", root / "bpe-qwen2", "qwen2")),
}
"""name -> (the xtune template its chat template is saved from, how its folder is made)."""


def _load(path, outtype):
    """llama.cpp on the CPU. q8_0 is read without llama.cpp's CPU weight repacking: on this machine's AVX-512/AMX
    CPU, llama.cpp 0.3.36's repacked q8_0 path crashes even on a tiny model (an upstream issue, not the file's)."""
    if outtype != "q8_0":
        return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1)
    default = llama_cpp.llama_model_default_params

    def without_repacking():
        params = default()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", without_repacking)
        return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1)


@pytest.mark.parametrize(
    "name, outtype",
    [(name, "f16") for name in CASES] + [("llama", "bf16"), ("llama", "q8_0"), ("internlm2", "q8_0")],
)
def test_llama_cpp_reads_the_gguf_as_transformers_runs_the_model(name, outtype, tmp_path):
    if name.startswith(("spm-", "bpe-")) and not (SHARED_TOKENIZERS / name[4:]).is_dir():
        pytest.skip(f"no real tokenizer at {SHARED_TOKENIZERS}")
    template_name, make = CASES[name]
    folder = make(tmp_path)
    tokenizer = load_tokenizer(folder)
    save_tokenizer(tokenizer, folder, template_name)
    tokenizer = load_tokenizer(folder)
    out = write_gguf(folder, tmp_path / "model.gguf", outtype)
    llm = _load(out, outtype)
    try:
        conversation = CONVERSATION
        prompt = generation_prompt(conversation, get_template(template_name), tokenizer)

        # the chat template in the file, rendered as llama-cpp-python renders it, writes xtune's prompt
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        vocab = llm.metadata
        formatter = Jinja2ChatFormatter(vocab["tokenizer.chat_template"], eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token)  # fmt: skip
        messages = [{"role": turn.role, "content": turn.content} for turn in conversation.turns]
        assert formatter(messages=messages).prompt == prompt

        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids

        model = load_model(folder)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)])
        difference = float(np.abs(logits - expected).max())
        print(f"{name} {outtype}: max |logit difference| {difference:.4f} over {len(ids)} tokens")
        assert difference < TOLERANCE[outtype]

        if outtype == "f16":  # greedy: near-ties may flip under coarser weights
            with torch.no_grad():
                greedy = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)  # fmt: skip
            continuation = []
            for _ in range(NEW_TOKENS):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                continuation.append(token)
                llm.eval([token])
            assert continuation == greedy[0, len(ids) :].tolist()
    finally:
        llm.close()
