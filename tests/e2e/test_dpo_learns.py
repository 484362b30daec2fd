"""DPO teaches a tiny model a preference it carries to prompts it never saw: the antonym in lower case over it
shouted ("cold" over "COLD!"), from preferences alone (no SFT first); and after an SFT that answers in both
styles, DPO from the merged SFT model makes its greedy answers follow the preferred one. QLoRA DPO trains against
its 4-bit base."""

import io
import json
import math

import pytest
import torch
from rich.console import Console

from xtune.config.load import load_config
from xtune.convert.merge import merge
from xtune.data.dataset import prepare_pairs
from xtune.data.encode import pad_token_id
from xtune.data.formats import Conversation
from xtune.data.loader import load_conversations
from xtune.data.pairs import collate_pairs
from xtune.data.templates import get_template
from xtune.engine.preference import answer_logps
from xtune.engine.train import train
from xtune.infer.chat import answer_all, load_chat_model
from xtune.infer.generate import GenerationOptions
from xtune.testing.tasks import ANTONYM_PAIRS, tiny_dataset_path


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


def test_qlora_dpo_trains_against_the_adapter_disabled_4bit_base(tmp_path):
    """QLoRA DPO on the CPU (bitsandbytes' 4-bit kernels run there): the reference is the quantized base with the
    adapter switched off, so the first step's loss is log 2 exactly (policy = reference while LoRA's B is zero), and
    a few steps lift the chosen answers' implicit reward over the rejected ones', on held-out pairs too."""
    pytest.importorskip("bitsandbytes")
    options = [f"work_dir={str(tmp_path)!r}", "quantization='4bit'", "max_steps=4", "batch_size=4", "evaluation_inputs=[]"]
    config, _ = load_config("tiny_internlm2_chat_lora_dpo_antonyms", options)
    result = train(config, Console(file=io.StringIO()))
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6) and result.losses[-1] < 0.5 * result.losses[0]
    assert json.loads((result.checkpoint / "xtune_run.json").read_text())["quantization"] == "4bit"
    model, tokenizer = load_chat_model(config.llm_name_or_path, str(result.checkpoint), bits=4)
    assert any(type(module).__name__ == "Linear4bit" for module in model.modules())
    pairs, _ = prepare_pairs(config.model_copy(update={"data_path": "xtune-tiny/antonym-pairs-heldout"}), tokenizer)
    assert held_out_accuracy(model, tokenizer, pairs) >= 0.9


def greedy_held_out_answers(model_folder) -> tuple[list[str], list[str]]:
    """(greedy replies, antonyms) for the held-out antonym prompts, no training pair's (word, phrasing)."""
    held_out = load_conversations(tiny_dataset_path("antonyms-heldout"))
    model, tokenizer = load_chat_model(str(model_folder), dtype="fp32")
    questions = [Conversation(c.turns[:-1]) for c in held_out]
    options = GenerationOptions(max_new_tokens=8)
    replies = answer_all(model, tokenizer, get_template("internlm2_chat"), questions, "", options)
    return replies, [c.turns[-1].content for c in held_out]


def rates(replies: list[str], antonyms: list[str]) -> tuple[float, float, float]:
    """The shares of replies in the preferred style (a word of the task in lower case, as the chosen answers), in
    the rejected one (a word shouted, "COLD!"), and the right antonym in the preferred style (the chosen answer)."""
    words = {word for pair in ANTONYM_PAIRS for word in pair}
    preferred = sum(reply in words for reply in replies) / len(replies)
    rejected = sum(reply in {word.upper() + "!" for word in words} for reply in replies) / len(replies)
    chosen = sum(reply == antonym for reply, antonym in zip(replies, antonyms)) / len(replies)
    return preferred, rejected, chosen


@pytest.mark.slow
def test_greedy_answers_follow_the_preferred_style_after_sft_then_dpo(tmp_path):
    """SFT on the questions answered half in each style ("cold", "COLD!"), merged into a model folder; then DPO from
    that folder, its reference, on the pairs preferring the lower case. Greedy answers to held-out prompts take
    either style after the SFT, about half each, and the preferred one after DPO. With the RPO term (rpo_alpha, the
    chosen answers' NLL): plain DPO lowers both answers' log-probabilities as the margin grows, and this tiny model's
    greedy replies then degenerate (beta = 0.1) or lose words (beta = 2: 89-97% of them in lower case over three
    seeds); with it, all 38 are in lower case for each of those seeds."""
    sft, _ = load_config("tiny_internlm2_chat_lora_antonyms", [
        f"work_dir={str(tmp_path / 'sft')!r}", "data_path='xtune-tiny/antonyms-both-styles'", "max_epochs=16",
        "dtype='fp32'", "evaluation_inputs=[]"])  # fmt: skip
    sft_model = merge(sft.llm_name_or_path, train(sft, Console(file=io.StringIO())).checkpoint, tmp_path / "sft-merged",
                      fp32=True, console=Console(file=io.StringIO()))  # fmt: skip
    before = rates(*greedy_held_out_answers(sft_model))
    assert before[0] <= 0.7 and before[1] >= 0.2  # both styles
    dpo, _ = load_config("tiny_internlm2_chat_lora_dpo_antonyms", [
        f"work_dir={str(tmp_path / 'dpo')!r}", f"llm_name_or_path={str(sft_model)!r}", "rpo_alpha=1.0", "lr=8e-4",
        "max_epochs=2", "dtype='fp32'", "evaluation_inputs=[]"])  # fmt: skip
    result = train(dpo, Console(file=io.StringIO()))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # the merged SFT model is the reference
    assert records[-1]["rewards/margins"] > 0.5 and records[-1]["rewards/accuracies"] >= 0.9
    dpo_model = merge(str(sft_model), result.checkpoint, tmp_path / "dpo-merged", fp32=True,
                      console=Console(file=io.StringIO()))  # fmt: skip
    after = rates(*greedy_held_out_answers(dpo_model))
    assert after[0] >= 0.9 and after[1] <= 0.05
    # The words are the SFT's (both answers of a pair name the same one), so DPO cannot add any; most stay right.
    assert after[2] >= 0.7 and after[2] > before[2]
