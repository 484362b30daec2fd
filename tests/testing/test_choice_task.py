"""The synthetic multiple-choice task: held-out questions unseen in training, each letter the answer equally often,
written as MMLU's CSVs and asked as `xtune eval` asks them."""

from collections import Counter

from xtune.evaluate.prompts import build_prompt
from xtune.evaluate.tasks import read_choice_task
from xtune.testing.tasks import CHOICE_ITEMS, choice_records, colour_choice_questions, write_choice_task


def test_held_out_questions_are_new_and_balanced(tmp_path):
    train, held_out = colour_choice_questions()
    assert colour_choice_questions() == (train, held_out)
    assert not set(held_out) & set(train)
    assert Counter(answer for *_, answer in held_out) == {"A": 5, "B": 5, "C": 5, "D": 5}
    items = {item for items in CHOICE_ITEMS.values() for item in items}
    assert all(any(f" {item}" in text for text, *_ in train) for item in items)  # every item is trained on

    task = read_choice_task("colours", write_choice_task(tmp_path / "colours", held_out))
    assert task.benchmark == "mmlu" and [(q.question, q.options, q.answer) for q in task.questions] == held_out
    (record,) = choice_records(held_out[:1])
    assert record["conversation"][0] == {"input": build_prompt(task.questions[0], task), "output": held_out[0][2]}
