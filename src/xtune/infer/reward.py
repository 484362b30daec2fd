"""`xtune reward score`: a reward model's scores of both answers of preference pairs, and how often it scores the
chosen one higher. The pairs are read and rendered as training reads them (any preference format, the chat template
recorded with the model); each answer is scored as transformers' sequence classifier scores a row: its score head
at the last token that is not padding."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from xtune.data.encode import Encoded, pad_token_id
from xtune.data.loader import collate
from xtune.data.pairs import PreferencePair, encode_pair, load_pairs
from xtune.data.sources import SourceSpec
from xtune.data.templates import Template
from xtune.engine.checkpoint import read_run_meta
from xtune.engine.device import resolve_device, resolve_dtype
from xtune.errors import XtuneError
from xtune.infer.chat import pick_template
from xtune.models.load import (
    check_model_code,
    check_weights,
    load_tokenizer,
    pickles_of_tensors_only,
    read_config,
    resolve_model_path,
)
from xtune.models.reward import is_reward_checkpoint, load_reward_checkpoint


@dataclass(frozen=True)
class PairScore:
    location: str
    """`file:line` of the record."""
    chosen: float
    rejected: float


def accuracy(scores: list[PairScore]) -> float:
    """The share of pairs whose chosen answer scores higher (TRL's reward accuracy)."""
    return sum(score.chosen > score.rejected for score in scores) / len(scores)


def load_reward_model(model: str, device: str = "auto", dtype: str = "auto"):
    """(a sequence classifier in eval mode, its tokenizer, its folder): an `AutoModelForSequenceClassification`
    folder (what `xtune convert merge` writes from a reward run), or a reward run's checkpoint-<step>."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    folder = Path(model)
    if folder.is_dir() and is_reward_checkpoint(folder) and not _is_classifier(folder):
        classifier, tokenizer = load_reward_checkpoint(folder, torch_dtype, torch_device)
        return classifier.to(torch_device).eval(), tokenizer, folder
    path = resolve_model_path(model)
    config = read_config(path)
    if not _is_classifier(path):
        raise XtuneError(
            f"{path} is not a reward model: its config.json names {config.get('architectures')}, not a "
            "*ForSequenceClassification. Give the folder `xtune convert merge BASE CHECKPOINT DIR` writes from a "
            "reward run, or the run's checkpoint-<step>."
        )
    check_model_code(path, config, trust_remote_code=False)
    check_weights(path)
    with pickles_of_tensors_only(path):
        classifier = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype, device_map={"": torch_device}, weights_only=True
        )
    tokenizer = load_tokenizer(path)
    if classifier.config.pad_token_id is None:  # where its last token is read in a padded batch
        classifier.config.pad_token_id = pad_token_id(tokenizer)
    return classifier.eval(), tokenizer, path


def _is_classifier(folder: Path) -> bool:
    """Whether a model folder holds a transformers sequence classifier (a reward run's checkpoint holds a causal LM
    with the score head in its output head's place, or a LoRA adapter)."""
    if not (folder / "config.json").is_file():
        return False
    return any(name.endswith("ForSequenceClassification") for name in read_config(folder).get("architectures") or [])


def sequence_rewards(model, samples: list[Encoded], pad_token_id: int, batch_size: int = 8) -> list[float]:
    """The reward of each sample (a prompt and its answer), in order: right-padded batches through the classifier."""
    rewards = []
    device = next(model.parameters()).device
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start : start + batch_size], pad_token_id)
        inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
        with torch.no_grad():
            logits = model(**inputs).logits
        rewards += logits[:, 0].float().tolist()
    return rewards


def score_pairs(model, tokenizer, template: Template, pairs: list[tuple[str, PreferencePair]],
                max_length: int | None = None, batch_size: int = 8) -> list[PairScore]:  # fmt: skip
    """Both answers of every (location, pair) scored."""
    samples = [sample for _, pair in pairs for sample in encode_pair(pair, template, tokenizer, max_length)]
    rewards = sequence_rewards(model, samples, model.config.pad_token_id, batch_size)
    return [PairScore(location, chosen, rejected)
            for (location, _), chosen, rejected in zip(pairs, rewards[0::2], rewards[1::2])]  # fmt: skip


def score_file(model: str, input: str | Path, prompt_template: str | None = None, system: str | None = None,
               max_length: int | None = None, batch_size: int = 8, device: str = "auto", dtype: str = "auto",
               output: Path | None = None) -> list[PairScore]:  # fmt: skip
    """Score the pairs of `input` (a file or folder of preference records in any format training reads) with the
    reward model `model`, in the chat template and system prompt recorded with it unless given, each answer whole
    unless `max_length` cuts it (as training does); `output`: a new JSONL file of {location, chosen, rejected}. A bad
    record is an error naming its file and line."""
    if output is not None and output.exists():
        raise XtuneError(f"--output {output} already exists; it is never overwritten: choose another file or move it.")
    recorded = read_run_meta(Path(model)) if Path(model).is_dir() else {}
    if system is None:
        system = recorded.get("SYSTEM", "")
    pairs, _ = load_pairs([SourceSpec(str(input))], system=system)  # before a model that may take minutes to load
    classifier, tokenizer, folder = load_reward_model(model, device, dtype)
    template = pick_template(prompt_template, None, folder, tokenizer)
    scores = score_pairs(classifier, tokenizer, template, pairs, max_length, batch_size)
    if output is not None:
        with output.open("x", encoding="utf-8") as out:
            for score in scores:
                record = {"location": score.location, "chosen": score.chosen, "rejected": score.rejected}
                out.write(json.dumps(record) + "\n")
    return scores
