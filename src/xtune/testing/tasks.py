"""Synthetic tasks a tiny model learns on a CPU in about a minute, with held-out prompts to score.

`antonyms`: "What is the opposite of hot?" -> "cold". Every word and every phrasing is seen in
training, but the held-out (word, phrasing) pairs never are: the model must learn the mapping from
the word, whatever the phrasing.
"""

import json
import os
import random
from pathlib import Path

from xtune.errors import XtuneError
from xtune.paths import xtune_home

ANTONYM_PAIRS = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("day", "night"),
    ("open", "closed"), ("happy", "sad"), ("light", "dark"), ("old", "new"), ("early", "late"),
    ("full", "empty"), ("hard", "soft"), ("high", "low"), ("long", "short"), ("rich", "poor"),
    ("strong", "weak"), ("wet", "dry"), ("loud", "quiet"), ("thick", "thin"),
)  # fmt: skip

ANTONYM_PHRASINGS = (
    "What is the opposite of {word}?",
    "Give the antonym of {word}.",
    "Opposite of {word}?",
    "Tell me the opposite of the word {word}.",
    "Which word means the opposite of {word}?",
    "{word}: what is its antonym?",
    'I need the antonym of "{word}".',
    "What word is the reverse of {word}?",
)

HELD_OUT_PER_WORD = 1


def antonym_examples(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held_out) as records of XTuner's `conversation` format."""
    rng = random.Random(seed)
    mapping = {a: b for a, b in ANTONYM_PAIRS} | {b: a for a, b in ANTONYM_PAIRS}
    train, held_out = [], []
    for word, answer in sorted(mapping.items()):
        phrasings = list(ANTONYM_PHRASINGS)
        rng.shuffle(phrasings)
        for index, phrasing in enumerate(phrasings):
            record = {"conversation": [{"input": phrasing.format(word=word), "output": answer}]}
            (held_out if index < HELD_OUT_PER_WORD else train).append(record)
    rng.shuffle(train)
    return train, held_out


TINY_DATASETS = {
    "antonyms": lambda: antonym_examples()[0],
    "antonyms-heldout": lambda: antonym_examples()[1],
}


def tiny_dataset_path(name: str) -> Path:
    """`xtune_home()/tiny-data/<name>.jsonl`, written on first use."""
    if name not in TINY_DATASETS:
        raise XtuneError(f"unknown tiny dataset 'xtune-tiny/{name}'; known: {', '.join(TINY_DATASETS)}.")
    path = xtune_home() / "tiny-data" / f"{name}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text("".join(json.dumps(r) + "\n" for r in TINY_DATASETS[name]()))
        os.replace(partial, path)
    return path
