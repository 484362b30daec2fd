"""Accuracy per subject and overall, standard errors and the paired difference, computed by hand."""

import io
import math

import pytest
from rich.console import Console

from xtune.errors import XtuneError
from xtune.evaluate import report


def answer(subject, qid, gold, predicted):
    return {"subject": subject, "id": qid, "gold": gold, "predicted": predicted,
            "correct": None if gold is None else gold == predicted}  # fmt: skip


def test_stderr_is_the_sample_standard_deviation_over_root_n():
    assert report.mean_and_stderr([]) == (None, None)
    assert report.mean_and_stderr([1.0]) == (1.0, None)
    mean, stderr = report.mean_and_stderr([1.0, 0.0, 1.0, 1.0])  # mean 3/4, sample variance 1/4
    assert mean == 0.75 and stderr == pytest.approx(math.sqrt(0.25 / 4))


def test_choice_summary_per_subject_and_overall():
    answers = [answer("a", "a/0", "A", "A"), answer("a", "a/1", "B", "A"), answer("a", "a/2", "C", "C"),
               answer("b", "b/0", "D", "D"), answer("b", "b/1", None, "A")]  # fmt: skip
    summary = report.choice_summary(answers)
    assert summary["n"] == 5 and summary["graded"] == 4
    assert summary["accuracy"] == 0.75  # 3 of the 4 graded
    assert summary["subjects"] == {"a": {"n": 3, "accuracy": 2 / 3}, "b": {"n": 2, "accuracy": 1.0}}
    assert summary["macro_accuracy"] == pytest.approx((2 / 3 + 1) / 2)


def test_the_paired_difference_and_its_stderr():
    base = [answer("s", f"s/{i}", "A", p) for i, p in enumerate("AABBB")]  # right: 1 1 0 0 0
    tuned = [answer("s", f"s/{i}", "A", p) for i, p in enumerate("ABAAA")]  # right: 1 0 1 1 1
    sides = [{"t": (answers, report.choice_summary(answers))} for answers in (base, tuned)]
    comparison = report.compare(*sides)
    entry = comparison["t"]["accuracy"]
    # d = 0, -1, 1, 1, 1: mean 2/5, sample variance (0.16 + 1.96 + 3 * 0.36) / 4 = 0.8
    assert (entry["base"], entry["tuned"], entry["n"]) == (0.4, 0.8, 5)
    assert entry["difference"] == pytest.approx(0.4)
    assert entry["stderr"] == pytest.approx(math.sqrt(0.8 / 5))


def test_generation_comparison_keeps_corpus_bleu_without_a_stderr():
    def records(values):
        return [{"id": str(i), "metrics": {"exact_match": v, "bleu": 100 * v}} for i, v in enumerate(values)]

    base = report.generation_summary(records([0, 1]), ["exact_match", "bleu"], 40.0)
    tuned = report.generation_summary(records([1, 1]), ["exact_match", "bleu"], 90.0)
    comparison = report.compare({"g": (records([0, 1]), base)}, {"g": (records([1, 1]), tuned)})
    assert comparison["g"]["exact_match"] == {"base": 0.5, "tuned": 1.0, "n": 2, "difference": 0.5,
                                              "stderr": pytest.approx(0.5)}  # fmt: skip
    assert comparison["g"]["bleu"] == {"base": 40.0, "tuned": 90.0, "n": 2, "difference": 50.0, "stderr": None}


def test_tables_and_the_chart(tmp_path):
    answers = [answer("a", "a/0", "A", "A"), answer("b", "b/0", "A", "B")]
    summary = report.choice_summary(answers)
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(report.results_table({"mmlu": summary}))
    text = console.export_text()
    assert "mmlu" in text and "50.0%" in text and "a " in text and "100.0%" in text
    path = report.bar_chart(tmp_path / "chart.png", {"mmlu": [(0.5, 0.1)], "ceval": [(0.25, None)]}, ["model"], "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*partial"))


def test_an_output_folder_with_files_is_refused(tmp_path):
    report.check_output(tmp_path / "new")
    report.check_output(tmp_path)  # empty
    (tmp_path / "answers.jsonl").write_text("earlier")
    with pytest.raises(XtuneError, match="already exists and is not empty; it is never overwritten"):
        report.check_output(tmp_path)
