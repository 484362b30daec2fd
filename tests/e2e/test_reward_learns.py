"""A reward model learns a preference it carries to prompts it never saw: the antonym in lower case scored above it
shouted ("cold" over "COLD!"), from pairs alone; `xtune convert merge` and `xtune reward score` then rank held-out
pairs as it was trained to."""

import io

import pytest
import torch
from rich.console import Console

from xtune.config.load import load_config
from xtune.convert.merge import merge
from xtune.data.dataset import prepare_pairs
from xtune.data.encode import pad_token_id
from xtune.data.pairs import PreferenceCollator
from xtune.engine.reward import answer_rewards
from xtune.engine.train import train
from xtune.infer.reward import accuracy, score_file
from xtune.models.load import load_model, load_tokenizer, resolve_model_path
from xtune.models.reward import with_score_head
from xtune.testing.tasks import tiny_dataset_path

CONFIG = "tiny_internlm2_chat_lora_reward_antonyms"


def untrained_accuracy(config, seed: int) -> float:
    """Held-out accuracy of the model training starts from: the base, a score head drawn from `seed`."""
    path = resolve_model_path(config.llm_name_or_path)
    tokenizer = load_tokenizer(path)
    pairs, _ = prepare_pairs(config.model_copy(update={"data_path": "xtune-tiny/antonym-pairs-heldout"}), tokenizer)
    pad = pad_token_id(tokenizer)
    batch = PreferenceCollator(pairs, pad)(list(range(len(pairs))))
    answers = batch.pop("answer_ids")
    del batch["labels"], batch["group_ids"]
    model = with_score_head(load_model(path), seed).eval()
    with torch.no_grad():
        rewards = answer_rewards(model, batch, answers, pad)
    return (rewards[0::2] > rewards[1::2]).float().mean().item()


@pytest.mark.slow
def test_a_reward_model_ranks_held_out_pairs_after_training_and_not_before(tmp_path):
    config, _ = load_config(CONFIG, [f"work_dir={str(tmp_path)!r}"])
    before = [untrained_accuracy(config, seed) for seed in range(6)]
    # an untrained head prefers one style or the other by chance (seed 0: mostly the shouted one): no skill on average
    assert before[0] < 0.5 and 0.25 < sum(before) / len(before) < 0.75
    result = train(config, Console(file=io.StringIO()))
    assert len(result.losses) == 16 and result.losses[-1] < 0.1 < result.losses[0]
    merged = merge(config.llm_name_or_path, result.checkpoint, tmp_path / "merged", fp32=True)
    scores = score_file(str(merged), tiny_dataset_path("antonym-pairs-heldout"), dtype="fp32")
    assert len(scores) == 38  # one phrasing per word, never trained on
    assert accuracy(scores) >= 0.95
