"""`xtune eval` end to end: accuracies on each layout's fixtures against hand-computed ones (the model's scores
scripted), the files written, --compare, generation tasks, the CLI on the tiny model, and two gloo processes."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tests.evaluate.conftest import LAYOUTS
from xtune.cli import app
from xtune.evaluate import report, run
from xtune.evaluate.run import EvalOptions

MODEL = "xtune-tiny/internlm2-chat"
HAND_COMPUTED = {  # always answering B (conftest's docstrings)
    "mmlu": (3 / 5, {"astronomy": 1 / 3, "virology": 1.0}),
    "ceval": (2 / 4, {"agronomy": 1.0, "logic": 1 / 3}),
    "cmmlu": (3 / 6, {"agronomy": 1 / 2, "logic": 2 / 4}),
}


def scripted(letter_of):
    """score_choices that prefers `letter_of(prompt, letters)` for each prompt."""

    def score_choices(model, tokenizer, template, prompts, answers, *args, advance=None, **kwargs):
        scores = []
        for prompt, texts in zip(prompts, answers):
            letters = [text.strip() for text in texts]
            chosen = letter_of(prompt, letters)
            scores.append([0.0 if letter == chosen else -1.0 - index for index, letter in enumerate(letters)])
        if advance:
            advance(len(prompts))
        return scores

    return score_choices


@pytest.fixture(scope="module")
def tiny_model(xtune_home):
    from xtune.infer.chat import load_chat_model

    return load_chat_model(MODEL, device="cpu", dtype="fp32")


@pytest.fixture
def no_model(monkeypatch, tiny_model):
    monkeypatch.setattr("xtune.infer.chat.load_chat_model", lambda *args, **kwargs: tiny_model)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_accuracy_per_subject_and_overall_on_each_layout(layout, layout_folder, tmp_path, monkeypatch, no_model):
    benchmark = LAYOUTS[layout][0]
    monkeypatch.setattr(run, "score_choices", scripted(lambda prompt, letters: "B"))
    options = EvalOptions(tasks=(benchmark,), data=(f"{benchmark}={layout_folder(layout)}",), shots=1)
    result = run.run_eval(MODEL, None, options, tmp_path / "out")
    summary = result.summaries[benchmark]
    overall, subjects = HAND_COMPUTED[benchmark]
    assert summary["accuracy"] == pytest.approx(overall)
    assert {name: entry["accuracy"] for name, entry in summary["subjects"].items()} == pytest.approx(subjects)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([report.CHART_FILE, report.ANSWERS_FILE, report.RESULTS_FILE])
    answers = [json.loads(line) for line in (tmp_path / "out" / report.ANSWERS_FILE).read_text().splitlines()]
    assert len(answers) == summary["n"] and {a["predicted"] for a in answers} == {"B"}
    assert set(answers[0]) == {"task", "subject", "id", "location", "scores", "predicted", "gold", "correct"}
    assert list(answers[0]["scores"]) == ["A", "B", "C", "D"]
    saved = json.loads((tmp_path / "out" / report.RESULTS_FILE).read_text())
    assert saved["tasks"][benchmark]["accuracy"] == pytest.approx(overall) and saved["options"]["shots"] == 1


def test_compare_pairs_the_questions(layout_folder, tmp_path, monkeypatch, no_model):
    folder = layout_folder("mmlu-csv")
    golds = {"How many moons": "B", "What is the Sun": "D", "Which is a gas giant": "A", "What protects": "B",
             "Antibiotics": "B"}  # fmt: skip
    calls = []

    def letter_of(prompt, letters):  # the first call is the tuned model (always right), the second the base (B)
        calls.append(prompt)
        tuned = len(calls) <= 5
        return next(g for start, g in golds.items() if start in prompt.rsplit("\n\n", 1)[-1]) if tuned else "B"

    monkeypatch.setattr(run, "score_choices", lambda *a, advance=None, **k: scripted(letter_of)(*a, advance=advance))
    result = run.run_eval(MODEL, None, EvalOptions(tasks=("mmlu",), data=(str(folder),)), tmp_path / "out", compare_with=MODEL)
    entry = result.comparison["mmlu"]["accuracy"]
    # d = 0, 1, 1, 0, 0 (base right on the B questions): mean 2/5, sample variance 0.3
    assert (entry["base"], entry["tuned"], entry["n"]) == (pytest.approx(0.6), 1.0, 5)
    assert entry["difference"] == pytest.approx(0.4) and entry["stderr"] == pytest.approx((0.3 / 5) ** 0.5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["base", report.COMPARISON_CHART, report.COMPARISON_FILE, "tuned"])
    assert json.loads((tmp_path / "out" / "base" / report.RESULTS_FILE).read_text())["tasks"]["mmlu"]["accuracy"] == 0.6


def test_generation_tasks_and_scoring_by_the_written_letter(layout_folder, tmp_path, monkeypatch, no_model):
    task = tmp_path / "antonyms.jsonl"
    task.write_text('{"prompt": "Opposite of hot?", "reference": "cold"}\n{"prompt": "Opposite of up?", "reference": "down"}\n')
    replies = {"Opposite of hot?": "cold", "Opposite of up?": "not down"}
    seen_templates = []

    def generate(model, tokenizer, template, conversations, options, batch_size=16):
        seen_templates.append(template.name)
        return [replies.get(c.turns[-1].content, " B\n\nThe next question") for c in conversations]

    monkeypatch.setattr(run, "generate_replies", generate)
    options = EvalOptions(tasks=("mmlu", str(task)), data=(f"mmlu={layout_folder('mmlu-csv')}",), scoring="generation")
    result = run.run_eval(MODEL, None, options, tmp_path / "out")
    assert seen_templates == ["plain", "hf"]  # multiple choice as plain text, generation as a chat by default
    assert result.summaries["mmlu"]["accuracy"] == pytest.approx(3 / 5)
    metrics = result.summaries["antonyms"]["metrics"]
    assert metrics["exact_match"]["value"] == 0.5
    assert metrics["rouge_l"]["value"] == pytest.approx((1 + 2 * 0.5 * 1 / 1.5) / 2)  # "not down": P 1/2, R 1
    answers = [json.loads(line) for line in (tmp_path / "out" / report.ANSWERS_FILE).read_text().splitlines()]
    assert answers[0]["reply"] == " B\n\nThe next question" and answers[0]["predicted"] == "B"
    assert answers[-1] == {"task": "antonyms", "id": f"{task}:2", "prompt": "Opposite of up?", "reply": "not down",
                           "reference": "down", "metrics": answers[-1]["metrics"]}  # fmt: skip


def test_the_cli_on_the_tiny_model(layout_folder, tmp_path):
    folder = layout_folder("mmlu-csv")
    runner = CliRunner()
    args = ["eval", MODEL, "--tasks", "mmlu", "--data", f"mmlu={folder}", "--shots", "1", "--device", "cpu",
            "--dtype", "fp32", "--output", str(tmp_path / "out")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "astronomy" in result.output
    answers = [json.loads(line) for line in (tmp_path / "out" / report.ANSWERS_FILE).read_text().splitlines()]
    assert len(answers) == 5 and all(a["predicted"] in "ABCD" and len(a["scores"]) == 4 for a in answers)
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and "never overwritten" in str(again.exception)


@pytest.mark.slow
def test_two_gloo_processes_answer_as_one(layout_folder, tmp_path):
    folder = layout_folder("cmmlu-csv")

    def xtune_eval(output, processes):
        environment = {**os.environ, "NPROC_PER_NODE": str(processes), "PORT": "29583", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "xtune.cli", "eval", MODEL, "--tasks", "cmmlu", "--data", str(folder),
                   "--device", "cpu", "--dtype", "fp32", "--output", str(output)]  # fmt: skip
        completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
        return [json.loads(line) for line in (output / report.ANSWERS_FILE).read_text().splitlines()]

    one, two = xtune_eval(tmp_path / "one", 1), xtune_eval(tmp_path / "two", 2)
    assert [a["id"] for a in two] == [a["id"] for a in one] and len(one) == 6
    for mine, theirs in zip(two, one):
        assert mine["predicted"] == theirs["predicted"]
        assert mine["scores"] == pytest.approx(theirs["scores"], abs=1e-4)
