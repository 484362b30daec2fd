"""A reward model's score head: initialised as transformers initialises one, seeded; and a reward run's checkpoint
exported as a folder that plain transformers loads as AutoModelForSequenceClassification and that scores as xtune's
head does (`convert merge` of a LoRA run, `convert pth_to_hf` of a full one)."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from xtune.config.load import load_config
from xtune.convert.merge import merge
from xtune.convert.pth_to_hf import pth_to_hf
from xtune.data.dataset import prepare_pairs
from xtune.data.encode import pad_token_id
from xtune.data.pairs import PreferenceCollator
from xtune.engine.checkpoint import save_checkpoint
from xtune.engine.reward import answer_rewards, reward_setup
from xtune.errors import CheckpointError, ConfigError
from xtune.models.load import load_model, load_tokenizer, resolve_model_path
from xtune.models.reward import with_score_head

CONFIG = "tiny_internlm2_chat_lora_reward_antonyms"
BASE = "xtune-tiny/internlm2-chat"


def test_the_score_head_is_drawn_as_transformers_draws_a_classifier_from_the_seed_alone():
    path = resolve_model_path(BASE)
    state = torch.get_rng_state()
    heads = [with_score_head(load_model(path), seed).get_output_embeddings() for seed in (0, 0, 1)]
    assert torch.equal(torch.get_rng_state(), state)  # the LoRA weights drawn next are the seed's, as in any stage
    assert heads[0].weight.shape == (1, 256) and heads[0].bias is None and heads[0].weight.dtype == torch.float32
    assert torch.equal(heads[0].weight, heads[1].weight) and not torch.equal(heads[0].weight, heads[2].weight)
    assert 0.015 < heads[0].weight.std().item() < 0.025  # N(0, initializer_range = 0.02)


def test_a_tied_models_score_head_stays_its_own_through_saving(tmp_path):
    model = load_model(resolve_model_path("xtune-tiny/llama"))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    with_score_head(model)
    model.tie_weights()  # as transformers calls it when it loads or resizes
    head = model.get_output_embeddings().weight
    assert head.shape == (1, 256) and head.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "model.safetensors")["lm_head.weight"], head)


def trained_reward_checkpoint(run_dir, method, base=BASE, template="internlm2_chat"):
    """A reward run's checkpoint-1 whose adapter (or weights) and head are far from where training starts."""
    config, _ = load_config(CONFIG, ["dtype='fp32'", f"method={method!r}", f"llm_name_or_path={base!r}",
                                     f"prompt_template={template!r}"])  # fmt: skip
    path = resolve_model_path(base)
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    model, _ = reward_setup(load_model(path), config, pad_token_id(tokenizer))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lm_head" in name or (method == "full" and "mlp" in name):
                parameter.add_(torch.randn_like(parameter) * 0.05)
    meta = {"llm_name_or_path": base, "method": method, "quantization": None, "prompt_template": template,
            "SYSTEM": "", "max_length": 64, "stage": "reward"}  # fmt: skip
    checkpoint = save_checkpoint(model, tokenizer, run_dir, 1, meta)
    return model.eval(), tokenizer, checkpoint, config


def xtune_and_transformers_scores(model, tokenizer, config, folder):
    pairs, _ = prepare_pairs(config, tokenizer)
    pad = pad_token_id(tokenizer)
    batch = PreferenceCollator(pairs, pad)(list(range(8)))
    answers = batch.pop("answer_ids")
    del batch["labels"], batch["group_ids"]
    with torch.no_grad():
        ours = answer_rewards(model, batch, answers, pad)
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return ours, theirs


@pytest.mark.parametrize("base, template, architecture", [
    (BASE, "internlm2_chat", "LlamaForSequenceClassification"),  # InternLM2 is written in the Llama layout
    ("xtune-tiny/qwen2", "qwen_chat", "Qwen2ForSequenceClassification"),
])  # fmt: skip
def test_convert_merge_of_a_lora_reward_run_writes_a_sequence_classifier_that_scores_as_xtune_does(
    tmp_path, base, template, architecture
):  # fmt: skip
    model, tokenizer, checkpoint, config = trained_reward_checkpoint(tmp_path / "run", "lora", base, template)
    merged = merge(base, checkpoint, tmp_path / "merged", fp32=True)
    saved = json.loads((merged / "config.json").read_text())
    assert saved["architectures"] == [architecture] and saved["pad_token_id"] == pad_token_id(tokenizer)
    assert len(saved["id2label"]) == 1 and not (merged / "generation_config.json").exists()
    ours, theirs = xtune_and_transformers_scores(model, tokenizer, config, merged)
    assert theirs.shape == (16, 1) and (ours - theirs[:, 0]).abs().max() < 1e-4
    assert ours.std() > 1e-2  # scores that differ from answer to answer
    assert json.loads((merged / "xtune_run.json").read_text())["prompt_template"] == template
    if base == BASE:
        with pytest.raises(CheckpointError, match="--keep-layout: a reward model"):
            merge(BASE, checkpoint, tmp_path / "kept", fp32=True, keep_layout=True)


def test_a_model_whose_logits_are_not_its_heads_is_refused_for_the_reward_stage():
    config, _ = load_config(CONFIG)
    model = load_model(resolve_model_path(BASE))
    model.config.model_type = "gemma2"  # soft-caps its logits after the head
    with pytest.raises(ConfigError, match="not 'gemma2' yet"):
        reward_setup(model, config, 2)


def test_pth_to_hf_of_a_full_reward_run_writes_the_sequence_classifier(tmp_path):
    model, tokenizer, checkpoint, config = trained_reward_checkpoint(tmp_path / "run", "full")
    folder = pth_to_hf(CONFIG, checkpoint, tmp_path / "hf", fp32=True)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    ours, theirs = xtune_and_transformers_scores(model, tokenizer, config, folder)
    assert (ours - theirs[:, 0]).abs().max() < 1e-4 and ours.std() > 1e-2
