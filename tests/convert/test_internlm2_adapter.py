"""Adapters in the base's own layout (issue 19): an adapter trained on xtune's Llama-layout InternLM2, exported in
InternLM2's module names (wqkv, wo, w1..w3), gives InternLM2's own modelling the logits xtune's model gives."""

import io
import json
from types import SimpleNamespace

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from xtune.config.load import load_config
from xtune.convert.pth_to_hf import pth_to_hf
from xtune.engine.train import train
from xtune.errors import XtuneError
from xtune.models.internlm2 import llama_to_internlm2_adapter, save_internlm2
from xtune.models.load import load_model, resolve_model_path
from xtune.models.lora import attach_adapter, prepare_trainable, published_adapter

INPUT = torch.tensor([[1, 30, 31, 32, 40, 50, 7, 8, 90, 3]])
CONFIG = "tiny_internlm2_chat_lora_antonyms"


class InternLM2Reference(nn.Module):
    """InternLM2 as its own modeling_internlm2.py computes it (eager attention, default RoPE), with its module names,
    written here because the tiny InternLM2 folder carries no remote code. Its attention reads the fused wqkv as the
    reference does: `rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=2 + num_key_value_groups)`, the group's query
    heads first, then its key head, then its value head."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = SimpleNamespace(**{"tie_word_embeddings": False, **config, "use_return_dict": True})
        hidden, self.num_heads = config["hidden_size"], config["num_attention_heads"]
        self.num_kv_heads, self.head_dim = config["num_key_value_heads"], hidden // self.num_heads
        self.eps, self.rope_theta = config["rms_norm_eps"], config["rope_theta"]
        self.model = nn.Module()
        self.model.tok_embeddings = nn.Embedding(config["vocab_size"], hidden)
        self.model.layers = nn.ModuleList(self._layer(config) for _ in range(config["num_hidden_layers"]))
        self.model.norm = nn.Module()
        self.model.norm.weight = nn.Parameter(torch.ones(hidden))
        self.output = nn.Linear(hidden, config["vocab_size"], bias=False)

    def _layer(self, config: dict) -> nn.Module:
        hidden, inner, bias = config["hidden_size"], config["intermediate_size"], config["bias"]
        layer, layer.attention, layer.feed_forward = nn.Module(), nn.Module(), nn.Module()
        layer.attention.wqkv = nn.Linear(hidden, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=bias)
        layer.attention.wo = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        layer.feed_forward.w1 = nn.Linear(hidden, inner, bias=False)
        layer.feed_forward.w3 = nn.Linear(hidden, inner, bias=False)
        layer.feed_forward.w2 = nn.Linear(inner, hidden, bias=False)
        layer.attention_norm, layer.ffn_norm = nn.Module(), nn.Module()
        layer.attention_norm.weight, layer.ffn_norm.weight = nn.Parameter(torch.ones(hidden)), nn.Parameter(torch.ones(hidden))
        return layer

    def rms_norm(self, x, norm):
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def attention(self, x, attention, cos, sin):
        batch, length, _ = x.shape
        groups = self.num_heads // self.num_kv_heads
        qkv = attention.wqkv(x).view(batch, length, self.num_kv_heads, groups + 2, self.head_dim)
        q = qkv[..., :groups, :].reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (qkv[..., i, :].transpose(1, 2) for i in (-2, -1))

        def rotate(t):
            half = t.shape[-1] // 2
            return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin

        q, k = rotate(q), rotate(k)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = q @ k.transpose(-1, -2) / self.head_dim**0.5
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)
        return attention.wo(out)

    def forward(self, input_ids, **_):
        x = self.model.tok_embeddings(input_ids)
        inv_freq = 1.0 / self.rope_theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        freqs = torch.outer(torch.arange(input_ids.shape[1]).float(), inv_freq)
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
        for layer in self.model.layers:
            x = x + self.attention(self.rms_norm(x, layer.attention_norm), layer.attention, cos, sin)
            h = self.rms_norm(x, layer.ffn_norm)
            ff = layer.feed_forward
            x = x + ff.w2(nn.functional.silu(ff.w1(h)) * ff.w3(h))
        return SimpleNamespace(logits=self.output(self.rms_norm(x, self.model.norm)))

    def prepare_inputs_for_generation(self, *args, **kwargs):  # peft's causal-LM wrapper keeps a reference to it
        raise NotImplementedError


def internlm2_base(tmp_path, num_key_value_heads: int, attention_bias: bool = False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=num_key_value_heads, attention_bias=attention_bias,
                         rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    return save_internlm2(model, tmp_path / "base")


def reference_model(base) -> InternLM2Reference:
    model = InternLM2Reference(json.loads((base / "config.json").read_text()))
    model.load_state_dict(load_file(base / "model.safetensors"), strict=True)
    return model.eval()


def trained_adapter(base, overrides: list[str], seed: int = 1):
    """xtune's LoRA model on the Llama-layout base, every adapter weight random and non-zero."""
    config, _ = load_config(CONFIG, [f"llm_name_or_path={str(base)!r}", "lora_r=4", "lora_alpha=8", *overrides])
    model = prepare_trainable(load_model(base), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def export(model, base, tmp_path):
    llama_dir, internlm2_dir = tmp_path / "llama-adapter", tmp_path / "internlm2-adapter"
    model.save_pretrained(llama_dir)
    base_config = json.loads((base / "config.json").read_text())
    weights, adapter_config, kind = published_adapter(llama_dir, base_config, str(base), {}, Console(file=io.StringIO()))
    internlm2_dir.mkdir()
    save_file(weights, internlm2_dir / "adapter_model.safetensors")
    (internlm2_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
    return internlm2_dir, kind


@pytest.mark.parametrize("num_key_value_heads, attention_bias", [(2, False), (1, True), (4, False)])
@pytest.mark.parametrize("extra", [[], ["use_rslora=True"], ["modules_to_save=['embed_tokens', 'lm_head']"],
                                   ["lora_target_modules=['q_proj', 'v_proj', 'down_proj']"]])  # fmt: skip
def test_internlm2_names_give_internlm2s_own_modelling_the_same_logits(tmp_path, num_key_value_heads, attention_bias, extra):
    base = internlm2_base(tmp_path, num_key_value_heads, attention_bias)
    model = trained_adapter(base, ["lora_dropout=0.0", *extra])
    internlm2_dir, kind = export(model, base, tmp_path)
    assert kind == "PEFT adapter in InternLM2's module names"
    saved = json.loads((internlm2_dir / "adapter_config.json").read_text())
    modules = {name.rsplit(".", 1)[-1] for name in saved["target_modules"]}  # peft writes short names or paths
    assert modules <= {"wqkv", "wo", "w1", "w2", "w3"} and "wqkv" in modules
    assert not any("proj" in name for name in load_file(internlm2_dir / "adapter_model.safetensors"))
    if "embed_tokens" in str(extra):
        assert saved["modules_to_save"] == ["tok_embeddings", "output"]
    expected = logits(model)
    theirs = logits(PeftModel.from_pretrained(reference_model(base), internlm2_dir).eval())
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)
    # and back: xtune's own Llama-layout model takes the InternLM2-named adapter (chat, merge, eval)
    back = attach_adapter(load_model(base), internlm2_dir, base).eval()
    torch.testing.assert_close(logits(back), expected, rtol=1e-5, atol=1e-5)


def test_the_fused_wqkv_keeps_each_projections_update_in_its_own_rows(tmp_path):
    base = internlm2_base(tmp_path, 2)
    model = trained_adapter(base, ["lora_target_modules=['q_proj', 'k_proj', 'v_proj']"])
    internlm2_dir, _ = export(model, base, tmp_path)
    weights = load_file(internlm2_dir / "adapter_model.safetensors")
    saved = json.loads((internlm2_dir / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["rank_pattern"] == {"wqkv": 12} and saved["alpha_pattern"] == {"wqkv": 24}
    prefix = "base_model.model.model.layers.0.attention.wqkv"
    assert weights[f"{prefix}.lora_A.weight"].shape == (12, 64) and weights[f"{prefix}.lora_B.weight"].shape == (128, 12)


def test_dora_stays_in_xtunes_layout_with_a_message(tmp_path):
    base = internlm2_base(tmp_path, 2)
    model = trained_adapter(base, ["use_dora=True"])
    model.save_pretrained(tmp_path / "dora")
    adapter_config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    with pytest.raises(XtuneError, match="use_dora"):
        llama_to_internlm2_adapter(load_file(tmp_path / "dora" / "adapter_model.safetensors"), adapter_config, {})
    console = Console(file=io.StringIO(), width=200)
    base_config = json.loads((base / "config.json").read_text())
    _, _, kind = published_adapter(tmp_path / "dora", base_config, str(base), {}, console)
    assert kind == "PEFT adapter (in xtune's Llama layout)" and "use_dora" in console.file.getvalue()


def test_base_model_name_or_path_is_what_the_user_named_and_auto_peft_loads_it(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "my-llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)  # fmt: skip
    model = trained_adapter(folder, [])
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folder)
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("run")
    short = ["max_steps=2", "save_steps=2", "accumulative_counts=1", "evaluation_inputs=[]", "dtype='fp32'"]
    config, _ = load_config(CONFIG, [f"work_dir={str(work_dir)!r}", *short])
    return train(config, Console(file=io.StringIO()))


def test_a_runs_checkpoint_names_the_base_as_given(lora_run):
    saved = json.loads((lora_run.checkpoint / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "xtune-tiny/internlm2-chat"


def test_pth_to_hf_writes_an_internlm2_run_in_internlm2s_names(tmp_path, lora_run):
    out = pth_to_hf(CONFIG, lora_run.checkpoint, tmp_path / "hf", fp32=True, console=Console(file=io.StringIO()))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "xtune-tiny/internlm2-chat"
    assert any(name.endswith("wqkv") for name in saved["target_modules"])
    assert not any("proj" in name for name in saved["target_modules"])
    assert any(".attention.wqkv.lora_B." in name for name in load_file(out / "adapter_model.safetensors"))
    base = load_model(resolve_model_path("xtune-tiny/internlm2-chat"))
    trained = PeftModel.from_pretrained(load_model(resolve_model_path("xtune-tiny/internlm2-chat")), lora_run.checkpoint)
    exported = attach_adapter(base, out, "xtune-tiny/internlm2-chat")
    torch.testing.assert_close(logits(exported.eval()), logits(trained.eval()), rtol=1e-5, atol=1e-5)
    reference = PeftModel.from_pretrained(reference_model(resolve_model_path("xtune-tiny/internlm2-chat")), out).eval()
    torch.testing.assert_close(logits(reference), logits(trained), rtol=1e-5, atol=1e-5)
