"""Zero- and few-shot prompts pinned as exact strings, in MMLU's, C-Eval's and CMMLU's formats."""

import json

from xtune.evaluate.prompts import answer_texts, build_prompt
from xtune.evaluate.tasks import read_choice_task


def test_mmlu_zero_shot(layout_folder):
    task = read_choice_task("mmlu", layout_folder("mmlu-csv"))
    assert build_prompt(task.questions[0], task) == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "How many moons does Earth have?\nA. Two\nB. One\nC. None\nD. Four\nAnswer:"
    )
    assert answer_texts(task.questions[0], "mmlu", chat=False) == [" A", " B", " C", " D"]
    assert answer_texts(task.questions[0], "mmlu", chat=True) == ["A", "B", "C", "D"]


def test_mmlu_two_shots_from_the_subjects_dev_split(layout_folder):
    task = read_choice_task("mmlu", layout_folder("mmlu-csv"), shots=2)
    virology = next(q for q in task.questions if q.subject == "virology")
    assert build_prompt(virology, task) == (
        "The following are multiple choice questions (with answers) about virology.\n\n"
        "What does a virus need to copy itself?\nA. Soil\nB. Water\nC. A host cell\nD. Sunlight\nAnswer: C\n\n"
        "Which is smaller, usually?\nA. A virus\nB. A cell\nC. A frog\nD. A tree\nAnswer: A\n\n"
        "What protects a virus's genes?\nA. A wall\nB. A capsid\nC. A shell of wood\nD. Fur\nAnswer:"
    )


def test_the_parquet_layout_asks_the_same(layout_folder):
    from_csv = read_choice_task("mmlu", layout_folder("mmlu-csv"), shots=2)
    from_parquet = read_choice_task("mmlu", layout_folder("mmlu-parquet"), shots=2)
    assert [build_prompt(q, from_parquet) for q in from_parquet.questions] == [
        build_prompt(q, from_csv) for q in from_csv.questions
    ]


def test_ceval_one_shot(layout_folder):
    task = read_choice_task("ceval", layout_folder("ceval-csv"), shots=1)
    logic = next(q for q in task.questions if q.subject == "logic")
    assert build_prompt(logic, task) == (
        "以下是中国关于logic考试的单项选择题，请选出其中的正确答案。\n\n"
        "如果所有的猫都是动物，那么：\nA. 有些动物是猫\nB. 没有动物\nC. 猫不是动物\nD. 都不对\n答案：A\n\n"
        "一加一等于几？\nA. 一\nB. 二\nC. 三\nD. 四\n答案："
    )
    assert answer_texts(logic, "ceval", chat=False) == ["A", "B", "C", "D"]


def test_cmmlu_zero_and_one_shot(layout_folder):
    folder = layout_folder("cmmlu-csv")
    zero, one = read_choice_task("cmmlu", folder), read_choice_task("cmmlu", folder, shots=1)
    agronomy = zero.questions[0]
    assert build_prompt(agronomy, zero) == (
        "以下是关于agronomy的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：水稻主要种在哪里？\nA. 沙漠\nB. 水田\nC. 冰川\nD. 海底\n答案是："
    )
    assert build_prompt(agronomy, one) == (
        "以下是关于agronomy的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：种子发芽需要什么？\nA. 水分\nB. 石油\nC. 塑料\nD. 玻璃\n答案是：A\n\n"
        "题目：水稻主要种在哪里？\nA. 沙漠\nB. 水田\nC. 冰川\nD. 海底\n答案是："
    )


def test_a_subject_mapping_names_the_subject(layout_folder):
    folder = layout_folder("ceval-csv")
    (folder / "subject_mapping.json").write_text(json.dumps({"logic": ["Logic", "逻辑学", "Humanities"]}))
    task = read_choice_task("ceval", folder)
    logic = next(q for q in task.questions if q.subject == "logic")
    assert build_prompt(logic, task).startswith("以下是中国关于逻辑学考试的单项选择题，请选出其中的正确答案。\n\n一加一")
    agronomy = next(q for q in task.questions if q.subject == "agronomy")
    assert build_prompt(agronomy, task).startswith("以下是中国关于agronomy考试")
