"""DPO teaches a tiny model a preference it carries to prompts it never saw: the antonym in lower case over it
shouted ("cold" over "COLD!"), from preferences alone (no SFT first)."""

import io

import pytest
import torch
from rich.console import Console

from xtune.config.load import load_config
from xtune.data.dataset import prepare_pairs
from xtune.data.encode import pad_token_id
from xtune.data.pairs import collate_pairs
from xtune.engine.preference import answer_logps
from xtune.engine.train import train
from xtune.infer.chat import load_chat_model


def held_out_accuracy(model, tokenizer, pairs) -> float:
    """The share of pairs whose chosen answer's implicit reward, log pi - log pi_ref, beats the rejected one's."""
    batch = collate_pairs(pairs, pad_token_id(tokenizer))
    labels, answers = batch.pop("labels"), batch.pop("answer_ids")
    with torch.no_grad():
        policy, _ = answer_logps(model, batch, labels, answers)
        with model.disable_adapter():
            reference, _ = answer_logps(model, batch, labels, answers)
    ratio = policy - reference
    return (ratio[0::2] > ratio[1::2]).float().mean().item()


@pytest.mark.slow
def test_dpo_prefers_the_chosen_style_on_held_out_prompts(tmp_path):
    config, _ = load_config("tiny_internlm2_chat_lora_dpo_antonyms", [f"work_dir={str(tmp_path)!r}",
                                                                      "evaluation_inputs=[]"])  # fmt: skip
    result = train(config, Console(file=io.StringIO()))
    assert result.losses[0] == pytest.approx(0.6931, abs=1e-3) and result.losses[-1] < 0.05
    held_out_config = config.model_copy(update={"data_path": "xtune-tiny/antonym-pairs-heldout"})
    model, tokenizer = load_chat_model(config.llm_name_or_path, str(result.checkpoint), dtype="fp32")
    pairs, _ = prepare_pairs(held_out_config, tokenizer)
    assert len(pairs) == 38  # one phrasing per word, never trained on
    assert held_out_accuracy(model, tokenizer, pairs) >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("stage, options", [("simpo", ["beta=2.0"]), ("orpo", [])])
def test_simpo_and_orpo_learn_the_preference_without_a_reference(tmp_path, stage, options):
    """SimPO and ORPO start from the model itself (no SFT, no reference): afterwards the chosen answer's per-token
    log-probability beats the rejected one's on held-out prompts."""
    config, _ = load_config("tiny_internlm2_chat_lora_dpo_antonyms", [
        f"work_dir={str(tmp_path)!r}", "evaluation_inputs=[]", f"stage={stage!r}", "max_epochs=2", *options])  # fmt: skip
    result = train(config, Console(file=io.StringIO()))
    model, tokenizer = load_chat_model(config.llm_name_or_path, str(result.checkpoint), dtype="fp32")
    pairs, _ = prepare_pairs(config.model_copy(update={"data_path": "xtune-tiny/antonym-pairs-heldout"}), tokenizer)
    batch = collate_pairs(pairs, pad_token_id(tokenizer))
    labels, answers = batch.pop("labels"), batch.pop("answer_ids")
    with torch.no_grad():
        sums, counts = answer_logps(model, batch, labels, answers)
    means = sums / counts
    assert (means[0::2] > means[1::2]).float().mean().item() >= 0.95
