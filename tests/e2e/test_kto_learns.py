"""KTO teaches a tiny model, from unpaired examples (each answer desirable or not, never two answers side by side), a
preference it carries to prompts it never saw: the antonym in lower case over it shouted ("cold" over "COLD!"). As
KTO is meant to run, its reference is an SFT model: one that knows the antonyms and answers in either style (trained
on xtune-tiny/antonyms-both-styles and merged, as for the greedy DPO test), which KTO on xtune-tiny/antonym-kto then
settles."""

import io
import json

import pytest
import torch
from rich.console import Console

from xtune.config.load import load_config
from xtune.convert.merge import merge
from xtune.data.dataset import prepare_pairs
from xtune.data.encode import pad_token_id
from xtune.data.pairs import collate_pairs
from xtune.engine.preference import answer_logps
from xtune.engine.train import train
from xtune.infer.chat import load_chat_model
from xtune.models.load import load_model, load_tokenizer
from xtune.models.lora import prepare_trainable

CONFIG = "tiny_internlm2_chat_lora_kto_antonyms"


def held_out_preferences(model, tokenizer, pairs, beta: float) -> dict[str, float]:
    """The shares of held-out pairs whose desirable answer ("cold") wins over the undesirable one ("COLD!"), by the
    implicit reward beta (log pi - log pi_ref) (`reward`), by the policy's log-probability (`policy`) and by the
    reference's (`reference`: the SFT model, the LoRA adapter switched off)."""
    batch = collate_pairs(pairs, pad_token_id(tokenizer))
    labels, answers = batch.pop("labels"), batch.pop("answer_ids")
    with torch.no_grad():
        policy, _ = answer_logps(model, batch, labels, answers)
        with model.disable_adapter():
            reference, _ = answer_logps(model, batch, labels, answers)
    reward = beta * (policy - reference)
    share = lambda values: (values[0::2] > values[1::2]).float().mean().item()  # noqa: E731
    return {"reward": share(reward), "policy": share(policy), "reference": share(reference)}


@pytest.mark.slow
def test_kto_from_an_sft_model_rewards_the_desirable_style_on_held_out_prompts(tmp_path):
    sft, _ = load_config("tiny_internlm2_chat_lora_antonyms", [
        f"work_dir={str(tmp_path / 'sft')!r}", "data_path='xtune-tiny/antonyms-both-styles'", "max_epochs=16",
        "dtype='fp32'", "evaluation_inputs=[]"])  # fmt: skip
    sft_model = merge(sft.llm_name_or_path, train(sft, Console(file=io.StringIO())).checkpoint, tmp_path / "sft-merged",
                      fp32=True, console=Console(file=io.StringIO()))  # fmt: skip
    kto, _ = load_config(CONFIG, [
        f"work_dir={str(tmp_path / 'kto')!r}", f"llm_name_or_path={str(sft_model)!r}", "max_epochs=1", "dtype='fp32'",
        "evaluation_inputs=[]"])  # fmt: skip
    held_out_config = kto.model_copy(update={"data_path": "xtune-tiny/antonym-pairs-heldout"})
    tokenizer = load_tokenizer(sft_model)
    pairs, _ = prepare_pairs(held_out_config, tokenizer)
    assert len(pairs) == 38  # one phrasing per word, never trained on

    # Before: the policy training starts from (the SFT model, a LoRA adapter whose B is zero) is its reference, so
    # no desirable answer has the higher implicit reward; the SFT model itself favours neither style much.
    start = prepare_trainable(load_model(sft_model), kto).eval()
    before = held_out_preferences(start, tokenizer, pairs, kto.beta)
    assert before["reward"] == 0.0
    assert before["policy"] == before["reference"] <= 0.7  # 23 of 38 for this SFT (seed 0)

    result = train(kto, Console(file=io.StringIO()))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-6) and records[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    model, tokenizer = load_chat_model(str(sft_model), str(result.checkpoint), dtype="fp32")
    after = held_out_preferences(model, tokenizer, pairs, kto.beta)
    assert after["reference"] == before["reference"]  # the adapter switched off is still the SFT model
    assert after["reward"] >= 0.95
    assert after["policy"] >= 0.95  # the trained model itself now ranks the desirable answer first
