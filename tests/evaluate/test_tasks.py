"""Each benchmark's own file layouts read into the same questions; where a task's files are found; errors that name
the file and row."""

import pytest

from tests.evaluate.conftest import ENGLISH, LAYOUTS, mmlu_csv, write_csv, write_parquet
from xtune.errors import DataError
from xtune.evaluate.tasks import parse_data_options, read_choice_task, task_folder


def questions_of(task):
    return [(q.subject, q.question, q.options, q.answer) for q in task.questions]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_into_the_same_questions(layout, layout_folder):
    benchmark = LAYOUTS[layout][0]
    task = read_choice_task(benchmark, layout_folder(layout), shots=1)
    assert task.benchmark == benchmark
    assert task.split == {"mmlu": "test", "ceval": "val", "cmmlu": "test"}[benchmark]
    csv_task = read_choice_task(benchmark, layout_folder(f"{benchmark}-csv"), shots=1)
    assert questions_of(task) == questions_of(csv_task)
    assert {subject: [q.question for q in shots] for subject, shots in task.shots.items()} == {
        subject: [q.question for q in shots] for subject, shots in csv_task.shots.items()
    }
    assert len({q.id for q in task.questions}) == len(task.questions)


def test_mmlu_in_detail(layout_folder):
    task = read_choice_task("mmlu", layout_folder("mmlu-csv"))
    assert questions_of(task) == [(s, q, o, a) for s, q, o, a in ENGLISH["test"]]
    assert task.questions[3].id == "virology/test/0"
    assert task.questions[3].location.endswith("data/test/virology_test.csv row 1")
    val = read_choice_task("mmlu", layout_folder("mmlu-parquet"), split="val")  # cais/mmlu calls it validation
    assert [q.question for q in val.questions] == ["What orbits a planet?"]


def test_ceval_test_split_has_no_answers(layout_folder):
    for layout in ("ceval-csv", "ceval-parquet"):
        task = read_choice_task("ceval", layout_folder(layout), split="test")
        assert [q.answer for q in task.questions] == [None, None], layout


def test_a_task_of_another_name_takes_any_layout_but_a_benchmark_name_its_own(layout_folder):
    folder = layout_folder("cmmlu-csv")
    assert read_choice_task("my-exam", folder).benchmark == "cmmlu"
    with pytest.raises(DataError, match="holds cmmlu's layout, not mmlu's"):
        read_choice_task("mmlu", folder)


def test_data_options_and_the_hugging_face_cache(tmp_path, monkeypatch, layout_folder):
    folder = layout_folder("mmlu-csv")
    assert parse_data_options([f"mmlu={folder}", str(tmp_path)]) == ({"mmlu": str(folder)}, str(tmp_path))
    assert task_folder("mmlu", {"mmlu": str(folder)}, None, 2) == folder
    assert task_folder("mmlu-csv", {}, str(tmp_path), 2) == tmp_path / "mmlu-csv"  # DIR/NAME
    assert task_folder("anything", {}, str(folder), 1) == folder  # one task: DIR itself
    with pytest.raises(DataError, match="--data"):
        parse_data_options([str(tmp_path), str(folder)])

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DataError, match=r"huggingface-cli download --repo-type dataset cais/mmlu"):
        task_folder("mmlu", {}, None, 1)
    repo = tmp_path / "hub" / "datasets--cais--mmlu"
    LAYOUTS["mmlu-parquet"][1](repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    snapshot = task_folder("mmlu", {}, None, 1)
    assert snapshot == repo / "snapshots" / "abc123"
    assert len(read_choice_task("mmlu", snapshot).questions) == 5


def test_missing_folder_and_split(tmp_path, layout_folder):
    with pytest.raises(DataError, match=r"task mmlu: no folder .*nowhere.*--data mmlu=FOLDER"):
        read_choice_task("mmlu", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"holds no val split.*--split"):
        read_choice_task("cmmlu", layout_folder("cmmlu-csv"), split="val")
    with pytest.raises(DataError, match=r"--shots 3, but .*astronomy_dev.csv has only 2 answered questions"):
        read_choice_task("mmlu", layout_folder("mmlu-csv"), shots=3)


def test_wrong_columns_name_the_file_and_row(tmp_path):
    root = mmlu_csv(tmp_path / "mmlu")
    write_csv(root / "data" / "test" / "virology_test.csv", [["Q?", "a", "b", "c", "d", "A"], ["Q2?", "a", "b", "c", "B"]])
    with pytest.raises(DataError, match=r"virology_test\.csv row 2 \(line 2\): 5 columns; an MMLU CSV row has no header"):
        read_choice_task("mmlu", root)

    ceval = tmp_path / "ceval"
    write_csv(ceval / "val" / "logic_val.csv", [["0", "Q?", "a", "b", "c", "d", "A"]], ["id", "question", "A", "B", "C", "answer"])
    with pytest.raises(DataError, match=r"logic_val\.csv row 2 \(line 2\): 7 columns; .*C-Eval CSV's header starts id,question,A,B,C,D"):
        read_choice_task("exam", ceval, split="val")

    parquet = tmp_path / "parquet"
    write_parquet(parquet / "logic" / "test-00000-of-00001.parquet", {"query": ["Q?"], "gold": [1]})
    with pytest.raises(DataError, match=r"test-00000-of-00001\.parquet: columns gold, query are none of the layouts"):
        read_choice_task("exam", parquet)


def test_few_shot_examples_never_come_from_the_split_scored(tmp_path):
    root = mmlu_csv(tmp_path / "mmlu")
    with pytest.raises(DataError, match="each question would be shown with its own answer"):
        read_choice_task("mmlu", root, split="dev", shots=1)


def test_answers_that_are_no_option_name_the_row(tmp_path):
    root = mmlu_csv(tmp_path / "mmlu")
    write_csv(root / "data" / "test" / "virology_test.csv", [["Q?", "a", "b", "c", "d", "A"], ["Q2?", "a", "b", "c", "d", "E"]])
    with pytest.raises(DataError, match=r"virology_test\.csv row 2: answer 'E' is not one of A, B, C, D"):
        read_choice_task("mmlu", root)

    cmmlu = tmp_path / "cmmlu"
    write_csv(cmmlu / "test" / "logic.csv", [["0", "问？", "一", "二", "三", "四", "AB"]], ["", "Question", "A", "B", "C", "D", "Answer"])
    with pytest.raises(DataError, match=r"logic\.csv row 2: answer 'AB' is not one of A, B, C, D"):
        read_choice_task("cmmlu", cmmlu)
    write_csv(cmmlu / "test" / "logic.csv", [["0", "问？", "一", "二", "三", "四", " b "]], ["", "Question", "A", "B", "C", "D", "Answer"])
    assert read_choice_task("cmmlu", cmmlu).questions[0].answer == "B"  # a lower-case letter is the letter

    parquet = tmp_path / "parquet"
    write_parquet(parquet / "astronomy" / "test-00000-of-00001.parquet",
                  {"question": ["Q?", "Q2?"], "subject": ["astronomy"] * 2, "choices": [["a", "b"], ["a", "b"]], "answer": [0, 2]})  # fmt: skip
    with pytest.raises(DataError, match=r"test-00000-of-00001\.parquet\[row 1\]: answer 2 is not an option's index \(0-1\)"):
        read_choice_task("mmlu", parquet)
