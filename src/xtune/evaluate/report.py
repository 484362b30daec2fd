"""What an evaluation writes and shows: accuracy per subject and overall, every answer as JSONL, results.json, a
table and a bar chart; for `--compare`, the base and the tuned model side by side with the difference per task and
its paired standard error.

A standard error is the sample standard deviation of the per-question values over sqrt(n) (lm-evaluation-harness's
`stderr`); the difference's is the same of the per-question differences, d = tuned - base, since both models answer
the same questions: sqrt(var(d) / n), far tighter than the two errors combined when the models agree on most.
"""

import json
import math
import os
from collections import defaultdict
from pathlib import Path

from rich.table import Table

from xtune.errors import XtuneError

ANSWERS_FILE, RESULTS_FILE, CHART_FILE = "answers.jsonl", "results.json", "accuracy.png"
COMPARISON_FILE, COMPARISON_CHART = "comparison.json", "comparison.png"


def mean_and_stderr(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def choice_summary(answers: list[dict]) -> dict:
    """n, accuracy (over every answered question) and its stderr, the mean of the subjects' accuracies, and each
    subject's n and accuracy. Questions without a gold answer count in n, not in the accuracies."""
    graded = [answer for answer in answers if answer["gold"] is not None]
    accuracy, stderr = mean_and_stderr([float(answer["correct"]) for answer in graded])
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for answer in answers:
        by_subject[answer["subject"]].append(answer)
    subjects = {}
    for subject, items in sorted(by_subject.items()):
        hits = [float(item["correct"]) for item in items if item["gold"] is not None]
        subjects[subject] = {"n": len(items), "accuracy": sum(hits) / len(hits) if hits else None}
    rated = [entry["accuracy"] for entry in subjects.values() if entry["accuracy"] is not None]
    return {"kind": "choice", "n": len(answers), "graded": len(graded), "accuracy": accuracy, "stderr": stderr,
            "macro_accuracy": sum(rated) / len(rated) if rated else None, "subjects": subjects}  # fmt: skip


def generation_summary(answers: list[dict], metrics: list[str], corpus_bleu: float) -> dict:
    """Each metric's mean over the examples and its stderr; BLEU as the corpus BLEU (sentence BLEU's stderr)."""
    summary: dict = {"kind": "generation", "n": len(answers), "metrics": {}}
    for metric in metrics:
        mean, stderr = mean_and_stderr([answer["metrics"][metric] for answer in answers if metric in answer["metrics"]])
        summary["metrics"][metric] = {"value": corpus_bleu if metric == "bleu" else mean, "stderr": stderr}
    return summary


def per_question_values(answers: list[dict], summary: dict) -> dict[str, dict[str, float]]:
    """metric -> {question id -> its value}: `accuracy` (0/1) of a choice task's graded questions, or each
    generation metric."""
    if summary["kind"] == "choice":
        return {"accuracy": {a["id"]: float(a["correct"]) for a in answers if a["gold"] is not None}}
    return {metric: {a["id"]: a["metrics"][metric] for a in answers if metric in a["metrics"]}
            for metric in summary["metrics"]}  # fmt: skip


def compare(base: dict, tuned: dict) -> dict:
    """task -> metric -> {base, tuned, difference, stderr (paired), n}, from each side's {task: (answers, summary)}."""
    comparison: dict = {}
    for task, (tuned_answers, tuned_summary) in tuned.items():
        base_answers, base_summary = base[task]
        base_values, tuned_values = per_question_values(base_answers, base_summary), per_question_values(
            tuned_answers, tuned_summary
        )
        comparison[task] = {}
        for metric, values in tuned_values.items():
            ids = [key for key in values if key in base_values[metric]]
            _, stderr = mean_and_stderr([values[key] - base_values[metric][key] for key in ids])
            scores = (_headline(base_summary, metric), _headline(tuned_summary, metric))
            comparison[task][metric] = {
                "base": scores[0], "tuned": scores[1], "n": len(ids),
                "difference": None if None in scores else scores[1] - scores[0],
                "stderr": None if metric == "bleu" else stderr,  # BLEU is a corpus score, not a mean per question
            }  # fmt: skip
    return comparison


def _headline(summary: dict, metric: str) -> float | None:
    return summary["accuracy"] if summary["kind"] == "choice" else summary["metrics"][metric]["value"]


def check_output(folder: Path) -> None:
    """Refuse a folder that already holds files: nothing is overwritten."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise XtuneError(f"--output {folder} already exists and is not empty; it is never overwritten: choose a new "
                         "folder or move it.")  # fmt: skip


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("x", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_json(path: Path, value: dict) -> None:
    with path.open("x", encoding="utf-8") as out:
        out.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _percent(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1%}" if signed else f"{value:.1%}"


NOT_SHARES = ("bleu", "perplexity", "bits_per_byte")
"""Metrics that are no share of questions (BLEU's points, the harness's perplexities), shown as numbers."""


def _number(metric: str, value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    if any(name in metric for name in NOT_SHARES):
        return f"{value:+.4g}" if signed else f"{value:.4g}"
    return _percent(value, signed)


def results_table(summaries: dict[str, dict], per_subject: bool = True) -> Table:
    """One row per task and metric; a choice task's subjects below it."""
    table = Table("task", "subject", "n", "metric", "score", "± stderr")
    for task, summary in summaries.items():
        if summary["kind"] == "choice":
            table.add_row(task, "overall", str(summary["n"]), "accuracy", _percent(summary["accuracy"]),
                          _percent(summary["stderr"]))  # fmt: skip
            if per_subject and len(summary["subjects"]) > 1:
                for subject, entry in summary["subjects"].items():
                    table.add_row("", subject, str(entry["n"]), "accuracy", _percent(entry["accuracy"]), "")
        else:
            for metric, entry in summary["metrics"].items():
                table.add_row(task, "", str(summary["n"]), metric, _number(metric, entry["value"]),
                              _number(metric, entry["stderr"]) if metric != "bleu" else "")  # fmt: skip
    return table


def comparison_table(comparison: dict) -> Table:
    table = Table("task", "metric", "n", "base", "tuned", "difference", "± stderr")
    for task, metrics in comparison.items():
        for metric, entry in metrics.items():
            table.add_row(task, metric, str(entry["n"]), _number(metric, entry["base"]), _number(metric, entry["tuned"]),
                          _number(metric, entry["difference"], signed=True), _number(metric, entry["stderr"]))  # fmt: skip
    return table


def bar_chart(
    path: Path, bars: dict[str, list[tuple[float | None, float | None]]], series: list[str], title: str
) -> Path | None:
    """Horizontal bars, one group per label (a task's accuracy, or a metric), one bar per series (a model), each with
    its stderr; written aside, then renamed. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return None
    labels = [label for label in bars if any(value is not None for value, _ in bars[label])]  # C-Eval test: ungraded
    if not labels:
        return None
    height = 0.8 / len(series)
    figure, axes = pyplot.subplots(figsize=(7, 1.2 + 0.45 * len(labels) * len(series)))
    for index, name in enumerate(series):
        values = [bars[label][index][0] or 0.0 for label in labels]
        errors = [bars[label][index][1] or 0.0 for label in labels]
        positions = [row + (index - (len(series) - 1) / 2) * height for row in range(len(labels))]
        axes.barh(positions, values, height=height, xerr=errors, capsize=3, label=name)
    axes.set_yticks(range(len(labels)), labels)
    axes.invert_yaxis()
    axes.set(xlabel="score (accuracy; BLEU / 100)", title=title)
    axes.grid(axis="x", alpha=0.3)
    if len(series) > 1:
        axes.legend()
    figure.tight_layout()
    aside = path.with_name(f".{path.name}.partial")
    figure.savefig(aside, format="png", dpi=100)
    pyplot.close(figure)
    os.replace(aside, path)
    return path


def chart_bars(summary: dict) -> list[tuple[str, float | None, float | None]]:
    """(label, value in [0, 1], stderr) of one task's headline numbers: its accuracy, or each generation metric."""
    if summary["kind"] == "choice":
        return [("", summary["accuracy"], summary["stderr"])]
    bars = []
    for metric, entry in summary["metrics"].items():
        scale = 100.0 if metric == "bleu" else 1.0
        value = None if entry["value"] is None else entry["value"] / scale
        bars.append((metric, value, None if entry["stderr"] is None else entry["stderr"] / scale))
    return bars
