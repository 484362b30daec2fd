"""Generation tasks: records in the simple and the training formats, and the metrics against hand-computed values
and the libraries' own defaults."""

import json
import sys

import pytest
from rouge_score import rouge_scorer

from xtune.errors import DataError, XtuneError
from xtune.evaluate import generation as g


def test_records_of_prompt_and_reference_or_of_a_training_format(tmp_path):
    path = tmp_path / "task.jsonl"
    records = [
        {"prompt": "Opposite of hot?", "reference": "cold"},
        {"prompt": "Opposite of up?", "reference": "down", "system": "Answer in one word."},
        {"instruction": "Opposite of", "input": "big", "output": "small"},
        {"conversation": [{"input": "Opposite of day?", "output": "night"}]},
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    task = g.read_generation_task("antonyms", path)
    assert [e.reference for e in task.examples] == ["cold", "down", "small", "night"]
    assert [[(t.role, t.content) for t in e.prompt.turns] for e in task.examples] == [
        [("user", "Opposite of hot?")], [("system", "Answer in one word."), ("user", "Opposite of up?")],
        [("user", "Opposite of\nbig")], [("user", "Opposite of day?")],
    ]  # fmt: skip
    assert task.examples[2].id == f"{path}:3"
    assert not any(t.trainable for e in task.examples for t in e.prompt.turns)


def test_bad_records_name_their_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "a", "reference": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: prompt and reference must both be text"):
        g.read_generation_task("bad", path)
    path.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: unknown record format"):
        g.read_generation_task("bad", path)
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: .*the last turn must be the assistant's"):
        g.read_generation_task("bad", path)


def test_exact_match_strips_whitespace_only():
    assert g.exact_match(" cold\n", "cold") == 1.0
    assert g.exact_match("Cold", "cold") == 0.0


def test_rouge_l_by_hand_and_as_rouge_score_on_english():
    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat: 5 of 6 words each way
    assert g.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    default = rouge_scorer.RougeScorer(["rougeL"])
    for prediction, reference in [("A red, red rose!", "a red rose"), ("Nothing alike", "at all"), ("x 12 y", "12")]:
        assert g.rouge_l(prediction, reference) == pytest.approx(default.score(reference, prediction)["rougeL"].fmeasure)
    # CJK characters are words: LCS(猫坐在垫子上, 猫在垫子上) = 5; P = 5/6, R = 5/5
    assert g.rouge_l("猫坐在垫子上", "猫在垫子上") == pytest.approx(2 * (5 / 6) * 1 / (5 / 6 + 1))


def test_bleu_is_sacrebleus():
    import sacrebleu

    predictions, references = ["the cat sat on the mat", "a dog"], ["the cat is on the mat", "a dog"]
    assert g.corpus_bleu(predictions, references) == pytest.approx(
        sacrebleu.corpus_bleu(predictions, [references]).score
    )
    assert g.sentence_bleu("a dog", "a dog") == pytest.approx(100.0)
    assert g.bleu_tokenize(["猫在垫子上"]) == "zh" and g.bleu_tokenize(["the mat"]) == "13a"


def test_a_users_scorer(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "def starts_right(prediction, reference):\n    return prediction.startswith(reference[:1])\n"
        "def two(prediction, reference):\n    return {'length': len(prediction), 'same': prediction == reference}\n"
        "def broken(prediction, reference):\n    return 'good'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_metrics", raising=False)
    starts_right = g.load_scorer("my_metrics:starts_right")
    assert g.score_example("cold", "cat", "13a", starts_right)["starts_right"] == 1.0
    assert g.score_example("hot", "hot", "13a", g.load_scorer("my_metrics.two")) == {
        "exact_match": 1.0, "rouge_l": 1.0, "bleu": pytest.approx(100.0), "length": 3.0, "same": 1.0
    }  # fmt: skip
    with pytest.raises(XtuneError, match=r"--scorer broken returned 'good' for broken on f:1"):
        g.score_example("a", "b", "13a", g.load_scorer("my_metrics:broken"), "f:1")
    with pytest.raises(XtuneError, match="cannot import no_such_module"):
        g.load_scorer("no_such_module:fn")
    with pytest.raises(XtuneError, match="has no function missing"):
        g.load_scorer("my_metrics:missing")
