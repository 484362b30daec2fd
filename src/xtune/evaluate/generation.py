"""Generation tasks: prompts and references, the model's greedy replies scored against them.

A task is a file (or folder) of records: `{"prompt": ..., "reference": ...}` (and an optional `"system"`), or a
record in any format training reads (alpaca, conversation, openai messages, sharegpt, ...), whose last assistant
turn is the reference and whatever comes before it the prompt. So the held-out part of the data a model was tuned on
is a task as it is.

Metrics, each per example and averaged over the task:
- `exact_match`: the reply and the reference equal once surrounding whitespace is stripped (case counts).
- `rouge_l`: ROUGE-L F1 (Google's rouge-score), on lower-cased words of letters and digits as rouge-score's own
  tokenizer splits them, and on each CJK character as a word of its own (rouge-score's would drop them).
- `bleu`: sacreBLEU, the corpus BLEU of the task (0-100; sentence BLEU per example in the answers), tokenized `13a`,
  or `zh` when a reference has CJK characters.
- `--scorer pkg.mod:fn`: `fn(prediction, reference)` returns a number (averaged under the function's name) or a dict
  of named numbers.
"""

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from xtune.data.formats import FORMATS, Conversation, RecordError, Turn, detect_format
from xtune.errors import DataError, XtuneError

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
_WORDS = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]|[a-z0-9]+")
METRICS = ("exact_match", "rouge_l", "bleu")


@dataclass(frozen=True)
class GenerationExample:
    id: str
    """The record's location, `file:line` (or `file row N`)."""
    prompt: Conversation
    """Ends with the user's turn the reply answers."""
    reference: str


@dataclass(frozen=True)
class GenerationTask:
    name: str
    path: Path
    examples: list[GenerationExample]


def read_generation_task(name: str, path: Path) -> GenerationTask:
    """Every record of the file or folder; a record with neither prompt and reference nor a final assistant turn is
    a DataError naming its location."""
    from xtune.data.sources import BadRecord, data_files, read_records

    examples = []
    for file in data_files(Path(path)):
        for item in read_records(file):
            if isinstance(item, BadRecord):
                raise DataError(f"task {name}: {item}.")
            location, record = item
            examples.append(_example(record, location))
    return GenerationTask(name, Path(path), examples)


def _example(record, location: str) -> GenerationExample:
    if isinstance(record, dict) and "prompt" in record:
        prompt, reference, system = record.get("prompt"), record.get("reference"), record.get("system")
        if not isinstance(prompt, str) or not isinstance(reference, str):
            raise DataError(f"{location}: prompt and reference must both be text, got {type(prompt).__name__} and "
                            f"{type(reference).__name__}; write {{\"prompt\": \"...\", \"reference\": \"...\"}}.")  # fmt: skip
        turns = (*((Turn("system", system),) if isinstance(system, str) and system else ()), Turn("user", prompt))
        return GenerationExample(location, Conversation(turns), reference)
    try:
        conversation = FORMATS[detect_format(record)](record)
    except RecordError as error:
        raise DataError(f"{location}: {error}; a generation task's record is {{\"prompt\": ..., \"reference\": ...}} "
                        "or a record of a training format ending with the assistant's answer.") from None  # fmt: skip
    turns = conversation.turns
    if conversation.raw or len(turns) < 2 or turns[-1].role != "assistant" or turns[-2].role not in ("user", "tool"):
        raise DataError(f"{location}: the record does not end with a user's turn and the assistant's answer, "
                        "which would be the prompt and its reference.")  # fmt: skip
    prompt = Conversation(tuple(replace(turn, trainable=False) for turn in turns[:-1]), tools=conversation.tools)
    return GenerationExample(location, prompt, turns[-1].content)


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


class _Words:
    """rouge-score's tokenizer interface: rouge-score's own words, and each CJK character as one."""

    def tokenize(self, text: str) -> list[str]:
        return _WORDS.findall(text.lower())


@cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())


def rouge_l(prediction: str, reference: str) -> float:
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def bleu_tokenize(references: list[str]) -> str:
    return "zh" if any(CJK.search(reference) for reference in references) else "13a"


def sentence_bleu(prediction: str, reference: str, tokenize: str = "13a") -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(prediction, [reference], tokenize=tokenize).score


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(predictions, [references], tokenize=bleu_tokenize(references)).score


def load_scorer(path: str) -> Callable[[str, str], float | dict[str, float]]:
    """`pkg.mod:fn` (or `pkg.mod.fn`) imported: the user's own code, named on their command line."""
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attribute:
        raise XtuneError(f"--scorer {path}: name a function as package.module:function.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise XtuneError(f"--scorer {path}: cannot import {module_name} ({error}); install it or add its folder to "
                         "PYTHONPATH.") from error  # fmt: skip
    function = getattr(module, attribute, None)
    if not callable(function):
        raise XtuneError(f"--scorer {path}: {module_name} has no function {attribute}.")
    return function


def score_example(prediction: str, reference: str, tokenize: str, scorer=None, where: str = "") -> dict[str, float]:
    """The per-example metrics (BLEU as sentence BLEU), and the user's scorer's."""
    metrics = {
        "exact_match": exact_match(prediction, reference),
        "rouge_l": rouge_l(prediction, reference),
        "bleu": sentence_bleu(prediction, reference, tokenize),
    }
    if scorer is not None:
        metrics |= _user_metrics(scorer, prediction, reference, where)
    return metrics


def _user_metrics(scorer, prediction: str, reference: str, where: str) -> dict[str, float]:
    name = getattr(scorer, "__name__", "scorer")
    try:
        value = scorer(prediction, reference)
    except Exception as error:
        raise XtuneError(f"--scorer {name} raised {type(error).__name__}: {error} (on {where}).") from error
    values = value if isinstance(value, dict) else {name: value}
    for key, number in values.items():
        if isinstance(number, bool):
            values[key] = float(number)
        elif not isinstance(number, (int, float)) or not math.isfinite(number):
            raise XtuneError(f"--scorer {name} returned {number!r} for {key} on {where}; return a finite number or a "
                             "dict of them.")  # fmt: skip
    return {key: float(number) for key, number in values.items()}
