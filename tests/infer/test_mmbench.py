"""MMBench: XTuner's prompt, the letter a reply picks, scoring per category (CircularEval copies folded in),
the files a run writes, errors that name the TSV, and a real run of the tiny LLaVA."""

import base64
import csv
import io
import json

import pytest
import torch
from PIL import Image

from xtune.data.templates import get_template
from xtune.errors import DataError
from xtune.infer import mmbench as mm

OPTIONS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}
COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


def png_base64(colour: str, image_format: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format=image_format)
    return base64.b64encode(buffer.getvalue()).decode()


def rows() -> list[dict]:
    return [
        {"index": 0, "question": "What colour is the square?", "hint": "", **OPTIONS, "answer": "A",
         "category": "colour", "l2-category": "perception", "image": png_base64("red")},
        {"index": 1, "question": "What colour is the square?", "hint": "Look closely.", **OPTIONS, "answer": "C",
         "category": "colour", "l2-category": "perception", "image": png_base64("blue", "JPEG")},
        {"index": 2, "question": "How many squares?", "hint": "", "A": "one", "B": "two", "C": "three", "D": "",
         "answer": "A", "category": "counting", "l2-category": "reasoning", "image": png_base64("green")},
        {"index": 3, "question": "Which shape?", "hint": "", "A": "square", "B": "circle", "C": "", "D": "",
         "answer": "B", "category": "counting", "l2-category": "reasoning", "image": "2"},  # shares row 2's image
    ]  # fmt: skip


def write_tsv(path, records, columns=COLUMNS):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    return path


@pytest.fixture
def tsv(tmp_path):
    return write_tsv(tmp_path / "mmbench_dev.tsv", rows())


def test_reading_skips_empty_hints_and_options_and_resolves_shared_images(tsv):
    questions = mm.read_mmbench(tsv)
    assert [q.index for q in questions] == [0, 1, 2, 3]
    assert questions[0].hint is None and questions[1].hint == "Look closely."
    assert questions[2].options == {"A": "one", "B": "two", "C": "three"}
    assert questions[3].image == questions[2].image
    assert (questions[1].answer, questions[1].category, questions[1].l2_category) == ("C", "colour", "perception")


def test_prompt_is_xtuners(tsv):
    questions = mm.read_mmbench(tsv)
    assert mm.build_prompt(questions[1]) == (
        "<image>\nLook closely.\nWhat colour is the square?\nA. red\nB. green\nC. blue\nD. yellow\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert mm.build_prompt(questions[2]) == (
        "<image>\nHow many squares?\nA. one\nB. two\nC. three\n"
        "Answer with the option's letter from the given choices directly."
    )
    chinese = mm.MMBenchQuestion(index=9, question="正方形是什么颜色？", options={"A": "红", "B": "蓝"}, image="")
    assert mm.build_prompt(chinese) == "<image>\n正方形是什么颜色？\nA. 红\nB. 蓝\n请直接回答选项字母。"


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("B", "B"), ("B.", "B"), (" (D) blue", "D"), ("C: blue", "C"), ("The answer is C", "C"),
        ("Answer: A.", "A"), ("blue", "C"), ("It is Blue.", "C"), ("A red square.", "A"),
        ("A square of some colour", None), ("", None), ("I don't know", None),
        ("B or C", None), ("E", None), ("dark red", "E2"),
    ],
)  # fmt: skip
def test_letter_extraction(reply, letter):
    options = dict(OPTIONS)
    if letter == "E2":  # a longer option text wins over one it contains
        options, letter = {"A": "red", "B": "dark red"}, "B"
    assert mm.extract_letter(reply, options) == letter


def test_run_scores_per_category_and_writes_its_files(tsv, tmp_path, monkeypatch):
    scripted = {0: "A", 1: "The answer is B", 2: "one", 3: "(B) circle"}
    seen = []

    def fake_generate(model, tokenizer, template, conversations, options, batch_size=16):
        seen.extend(conversations)
        assert options.temperature == 0 and options.max_new_tokens == 8
        for conversation in conversations:
            assert len(conversation.images) == 1
            with Image.open(conversation.images[0]) as image:
                assert image.size == (32, 32)
        return [scripted[(len(seen) - len(conversations) + i) % 4] for i in range(len(conversations))]

    monkeypatch.setattr(mm, "generate_replies", fake_generate)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / mm.RESULT_FILE).write_text("earlier run")
    result = mm.run_mmbench(None, None, get_template("internlm2_chat"), tsv, tmp_path / "work", batch_size=3)
    assert (tmp_path / "work" / mm.RESULT_FILE).read_text() == "earlier run"
    assert result.answers_path.parent.parent == tmp_path / "work"
    assert [c.turns[0].content for c in seen[:4]] == [mm.build_prompt(q) for q in mm.read_mmbench(tsv)]
    assert result.n == 4 and result.overall == 0.75
    assert result.per_category == {"colour": 0.5, "counting": 1.0}
    assert result.per_l2_category == {"perception": 0.5, "reasoning": 1.0}
    answers = [json.loads(line) for line in result.answers_path.read_text().splitlines()]
    assert [(a["index"], a["predicted"], a["answer"], a["correct"]) for a in answers] == [
        (0, "A", "A", True), (1, "B", "C", False), (2, "A", "A", True), (3, "B", "B", True)
    ]  # fmt: skip
    assert answers[1]["prediction"] == "The answer is B" and answers[1]["category"] == "colour"
    assert json.loads(result.result_path.read_text()) == {
        "overall": 0.75, "per_category": {"colour": 0.5, "counting": 1.0}, "n": 4, "data_path": str(tsv),
        "per_l2_category": {"perception": 0.5, "reasoning": 1.0},
    }  # fmt: skip
    assert sorted(p.name for p in result.answers_path.parent.iterdir()) == [mm.ANSWERS_FILE, mm.RESULT_FILE]
    again = mm.run_mmbench(None, None, get_template("internlm2_chat"), tsv, tmp_path / "work")
    assert again.answers_path.parent != result.answers_path.parent


def test_circular_copies_count_only_when_all_are_right(tmp_path, monkeypatch):
    base = rows()[0]
    copy = {**base, "index": 1_000_000, "A": "green", "B": "blue", "C": "yellow", "D": "red", "answer": "D", "image": "0"}
    tsv = write_tsv(tmp_path / "circular.tsv", [base, copy])
    monkeypatch.setattr(mm, "generate_replies", lambda m, t, tp, conversations, o, batch_size: ["A"] * len(conversations))
    result = mm.run_mmbench(None, None, get_template("internlm2_chat"), tsv, tmp_path / "work")
    assert result.n == 2 and result.overall == 0.0 and result.per_category == {"colour": 0.0}


def test_test_split_writes_predictions_without_accuracy(tmp_path, monkeypatch):
    columns = [c for c in COLUMNS if c not in ("answer", "l2-category")]
    tsv = write_tsv(tmp_path / "mmbench_test.tsv", rows()[:2], columns)
    monkeypatch.setattr(mm, "generate_replies", lambda m, t, tp, conversations, o, batch_size: ["C"] * len(conversations))
    result = mm.run_mmbench(None, None, get_template("internlm2_chat"), tsv, tmp_path / "work")
    assert result.overall is None and result.per_category == {} and result.n == 2
    answers = [json.loads(line) for line in result.answers_path.read_text().splitlines()]
    assert [(a["predicted"], a["answer"], a["correct"]) for a in answers] == [("C", None, None)] * 2
    assert json.loads(result.result_path.read_text())["overall"] is None


def test_malformed_tsv_names_the_file_row_and_column(tmp_path):
    no_question = write_tsv(tmp_path / "no_question.tsv", rows(), [c for c in COLUMNS if c != "question"])
    with pytest.raises(DataError, match=r"no_question\.tsv lacks the column\(s\) question"):
        mm.read_mmbench(no_question)
    bad_answer = write_tsv(tmp_path / "bad_answer.tsv", [rows()[0], {**rows()[2], "answer": "D"}])
    with pytest.raises(DataError, match=r"bad_answer\.tsv row 2 \(index 2\): answer 'D' is not one of its options A, B, C"):
        mm.read_mmbench(bad_answer)
    bad_image = write_tsv(tmp_path / "bad_image.tsv", [{**rows()[0], "image": "bm90IGFuIGltYWdlIGF0IGFsbA=="}])
    with pytest.raises(DataError, match=r"bad_image\.tsv row 1 \(index 0\): the image cell decodes to no image"):
        mm.decode_image(mm.read_mmbench(bad_image)[0], tmp_path, bad_image)
    dangling = write_tsv(tmp_path / "dangling.tsv", [{**rows()[0], "image": "7"}])
    with pytest.raises(DataError, match=r"dangling\.tsv row 1 \(index 0\): the image cell '7' is neither base64"):
        mm.read_mmbench(dangling)
    with pytest.raises(DataError, match="not found"):
        mm.read_mmbench(tmp_path / "missing.tsv")


def test_tiny_llava_runs_end_to_end(tsv, tmp_path):
    from xtune.config.schema import Config
    from xtune.data.images import ImagePreprocessor
    from xtune.engine.checkpoint import RUN_META
    from xtune.models.llava import build_llava
    from xtune.models.load import load_model, load_tokenizer, resolve_model_path
    from xtune.models.lora import prepare_trainable

    config = Config(
        llm_name_or_path="xtune-tiny/internlm2-chat", visual_encoder_name_or_path="xtune-tiny/clip-vision",
        data_path="-", freeze_llm=True,
    )  # fmt: skip
    llm_path = resolve_model_path(config.llm_name_or_path)
    llm = prepare_trainable(load_model(llm_path), config, others_train=True)
    preprocess = ImagePreprocessor.from_folder(resolve_model_path(config.visual_encoder_name_or_path))
    torch.manual_seed(0)
    model = build_llava(config, llm, torch.float32, torch.device("cpu"), preprocess)
    llava = tmp_path / "llava"
    model.save_pretrained(llava)
    load_tokenizer(llm_path).save_pretrained(llava)
    meta = {"prompt_template": "internlm2_chat", "llava": {"visual_select_layer": -2, "pad_image_to_square": False}}
    (llava / RUN_META).write_text(json.dumps(meta))

    result = mm.mmbench(config.llm_name_or_path, config.visual_encoder_name_or_path, llava, tsv, tmp_path / "work",
                        device="cpu", dtype="fp32")  # fmt: skip
    assert result.n == 4 and result.answers_path.is_file() and result.result_path.is_file()
    assert 0.0 <= result.overall <= 1.0 and set(result.per_category) <= {"colour", "counting"}
    assert len(result.answers_path.read_text().splitlines()) == 4
