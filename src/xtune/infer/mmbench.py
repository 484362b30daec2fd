"""MMBench: a LLaVA model answers multiple-choice questions about images, and is scored per category.

    TSV row -> MMBenchQuestion -> prompt (as XTuner's `xtuner mmbench`) -> greedy reply -> option letter -> score

The TSV is OpenCompass's: index, question, hint, A, B, C, D (, E ...), answer (absent in test splits),
category, l2-category (optional), image (base64 JPEG/PNG, or the index of the row whose image it shares).
Rows whose index is 1,000,000 or more are CircularEval copies of row `index % 1,000,000` with the options
rotated; as in XTuner, a question counts as right only when it and all its copies are answered right.
"""

import base64
import binascii
import csv
import io
import json
import re
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from xtune.data.formats import IMAGE_PLACEHOLDER, Conversation, Turn
from xtune.data.templates import Template
from xtune.engine.checkpoint import new_run_dir
from xtune.errors import DataError
from xtune.infer.generate import GenerationOptions, generate_replies

INSTRUCTION = "Answer with the option's letter from the given choices directly."
INSTRUCTION_CHINESE = "请直接回答选项字母。"
ANSWERS_FILE, RESULT_FILE = "mmbench_answers.jsonl", "mmbench_result.json"
REQUIRED_COLUMNS = ("index", "question", "image", "A", "B")
CIRCULAR_OFFSET = 1_000_000
_OPTION_LETTERS = tuple("ABCDEFGHIJ")
_MISSING = {"", "nan", "NaN"}
"""Empty cells, and what pandas writes for a missing value when a TSV went through `str()`."""
_IMAGE_REFERENCE_LENGTH = 16
"""A base64 image is far longer; a shorter `image` cell is the index of the row whose image it shares (XTuner)."""


@dataclass(frozen=True)
class MMBenchQuestion:
    index: int
    question: str
    options: dict[str, str]
    """Letter -> option text, only the options the row has, in letter order."""
    image: str
    """The image as base64 text (a reference to another row is already resolved)."""
    hint: str | None = None
    answer: str | None = None
    category: str | None = None
    l2_category: str | None = None
    row: int = 0
    """1-based data row in the TSV (the header is row 0), for error messages."""


@dataclass
class MMBenchResult:
    overall: float | None
    """Accuracy over the questions with an answer (CircularEval copies folded in); None for a test split."""
    per_category: dict[str, float]
    n: int
    """Rows answered."""
    answers_path: Path
    result_path: Path
    per_l2_category: dict[str, float] = field(default_factory=dict)
    """Filled when the TSV has an `l2-category` column (XTuner reports these)."""


def has_chinese(text: str) -> bool:
    return any("\u4e00" <= character <= "\u9fff" for character in text)


def build_prompt(question: MMBenchQuestion) -> str:
    """XTuner's MMBench prompt: `<image>`, the hint, the question, one `X. text` line per option, then the
    instruction to answer with the letter (in Chinese for a Chinese question)."""
    text = f"{question.hint}\n{question.question}\n" if question.hint else f"{question.question}\n"
    text += "".join(f"{letter}. {option}\n" for letter, option in question.options.items())
    text = f"{IMAGE_PLACEHOLDER}\n{text}"
    return text + (INSTRUCTION_CHINESE if has_chinese(text) else INSTRUCTION)


_LEADING_LETTER = re.compile(r"^[(\[]?([A-Z])(?:[)\].:,：]|$)")
_LONE_LETTER = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z'])")


def extract_letter(reply: str, options: dict[str, str]) -> str | None:
    """The option the reply picks, or None when it picks none or several.

    1. A reply that starts with a letter standing alone: `B`, `B.`, `(D) blue`, `C: red`.
    2. Else the one option letter written as a word anywhere (`The answer is C`); an `A` followed by a
       lowercase word is the article (`A red square`), not an option.
    3. Else the one option whose text the reply contains as words, case-insensitively (`blue` -> the option
       `blue`); an option contained in a longer matching one (`red` in `dark red`) gives way to it.
    XTuner takes the first of A-D anywhere (`re.search("[A-D]+")`), which reads `Blue` as B; these rules are
    stricter, and agree with it on replies that follow the instruction.
    """
    text = reply.strip()
    leading = _LEADING_LETTER.match(text)
    if leading and leading.group(1) in options:
        return leading.group(1)
    letters = {
        match.group(1)
        for match in _LONE_LETTER.finditer(text)
        if match.group(1) in options and not _is_article(text, match)
    }
    if len(letters) == 1:
        return letters.pop()
    if letters:
        return None
    lowered = text.casefold()
    texts = {letter: option.strip().rstrip(".").casefold() for letter, option in options.items()}
    named = {letter: text for letter, text in texts.items() if text and _contains_words(lowered, text)}
    longest = [
        letter for letter, text in named.items() if not any(text != other and text in other for other in named.values())
    ]
    return longest[0] if len(longest) == 1 else None


def _contains_words(text: str, words: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(words)}(?!\w)", text) is not None


def _is_article(text: str, match: re.Match) -> bool:
    return match.group(1) == "A" and re.match(r" [a-z]", text[match.end() : match.end() + 2]) is not None


def _cell(record: dict, column: str) -> str | None:
    value = record.get(column)
    return None if value is None or value.strip() in _MISSING else value


def read_mmbench(tsv_path: str | Path) -> list[MMBenchQuestion]:
    """The questions of an MMBench TSV; a missing column, an empty required cell, a bad index or an answer
    that is not one of the row's options is a DataError naming the file and row."""
    path = Path(tsv_path)
    try:
        header, rows = _read_tsv(path)
    except FileNotFoundError:
        raise DataError(f"MMBench file {path} not found (looked at {path.resolve()})") from None
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        raise DataError(
            f"MMBench file {path} lacks the column(s) {', '.join(missing)}; an MMBench TSV has the columns "
            f"{', '.join(REQUIRED_COLUMNS)}, C, D, hint, answer, category (found: {', '.join(header) or 'none'})"
        )
    if not rows:
        raise DataError(f"MMBench file {path} has a header but no rows")
    images: dict[int, str] = {}
    questions = []
    for row, record in rows:
        where = f"MMBench file {path} row {row}"
        try:
            index = int(float(record["index"]))
        except ValueError:
            raise DataError(f"{where}: index {record['index']!r} is not a number") from None
        where += f" (index {index})"
        question, image = _cell(record, "question"), _cell(record, "image")
        for column, value in (("question", question), ("image", image)):
            if value is None:
                raise DataError(f"{where}: the {column} cell is empty")
        options = {letter: option for letter in _OPTION_LETTERS if (option := _cell(record, letter)) is not None}
        if len(options) < 2:
            raise DataError(f"{where}: {len(options)} option(s) in the columns A, B, C, ...; it needs two or more")
        answer = _cell(record, "answer")
        answer = answer.strip() if answer else None
        if answer is not None and answer not in options:
            raise DataError(f"{where}: answer {answer!r} is not one of its options {', '.join(options)}")
        images[index] = image
        questions.append(MMBenchQuestion(
            index=index, question=question, options=options, image=image, hint=_cell(record, "hint"), answer=answer,
            category=_cell(record, "category"), l2_category=_cell(record, "l2-category"), row=row,
        ))  # fmt: skip
    return [_resolve_image(question, images, path) for question in questions]


def _read_tsv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str | None]]]]:
    limit = sys.maxsize
    while True:  # the largest field size this platform's C long takes; base64 images run to megabytes
        try:
            csv.field_size_limit(limit)
            break
        except OverflowError:
            limit //= 2
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        rows = list(enumerate(reader, start=1))
        return list(reader.fieldnames or []), rows


def _resolve_image(question: MMBenchQuestion, images: dict[int, str], path: Path) -> MMBenchQuestion:
    image = question.image
    for _ in range(len(images) + 1):  # a chain of references longer than the file is a cycle
        if len(image) >= _IMAGE_REFERENCE_LENGTH:
            break
        try:
            image = images[int(float(image))]
        except (ValueError, KeyError):
            raise DataError(
                f"MMBench file {path} row {question.row} (index {question.index}): the image cell {question.image!r} "
                "is neither base64 image data nor the index of another row"
            ) from None
    else:
        raise DataError(f"MMBench file {path} row {question.row} (index {question.index}): its image refers in a cycle")
    return replace(question, image=image) if image is not question.image else question


def decode_image(question: MMBenchQuestion, folder: Path, tsv_path: str | Path) -> Path:
    """The question's image written to `folder` as the file it was encoded from (JPEG or PNG)."""
    where = f"MMBench file {tsv_path} row {question.row} (index {question.index})"
    try:
        data = base64.b64decode(question.image, validate=False)
        with Image.open(io.BytesIO(data)) as image:
            suffix = (image.format or "img").lower()
    except (binascii.Error, ValueError) as error:
        raise DataError(f"{where}: the image cell is not base64 ({error})") from None
    except (UnidentifiedImageError, OSError):
        raise DataError(f"{where}: the image cell decodes to no image Pillow can read") from None
    file = folder / f"{question.row}.{suffix}"
    file.write_bytes(data)
    return file


def score(answers: list[dict]) -> tuple[float | None, dict[str, float], dict[str, float]]:
    """(overall, per category, per l2-category) accuracy over the answered rows that have an answer. A
    question is right when it and its CircularEval copies (index + k * 1,000,000) all are."""
    questions: dict[int, dict] = {}
    for answer in answers:
        if answer["answer"] is None:
            continue
        main = answer["index"] % CIRCULAR_OFFSET
        entry = questions.setdefault(main, {"correct": True, "category": None, "l2_category": None})
        entry["correct"] = entry["correct"] and answer["correct"]
        if answer["index"] < CIRCULAR_OFFSET or entry["category"] is None:
            entry["category"], entry["l2_category"] = answer["category"], answer.get("l2_category")
    if not questions:
        return None, {}, {}

    def accuracy_by(key: str) -> dict[str, float]:
        groups: dict[str, list[bool]] = {}
        for entry in questions.values():
            if entry[key] is not None:
                groups.setdefault(entry[key], []).append(entry["correct"])
        return {name: sum(hits) / len(hits) for name, hits in sorted(groups.items())}

    overall = sum(entry["correct"] for entry in questions.values()) / len(questions)
    return overall, accuracy_by("category"), accuracy_by("l2_category")


def run_mmbench(
    model,
    tokenizer,
    template: Template,
    tsv_path: str | Path,
    work_dir: str | Path,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    console: Console | None = None,
) -> MMBenchResult:
    """Answer every question of the TSV greedily and score the answers; writes mmbench_answers.jsonl and
    mmbench_result.json into a fresh timestamped folder of `work_dir`."""
    questions = read_mmbench(tsv_path)
    return _evaluate(model, tokenizer, template, questions, tsv_path, work_dir, batch_size, max_new_tokens, console)


def _evaluate(
    model, tokenizer, template, questions, tsv_path, work_dir, batch_size, max_new_tokens, console
) -> MMBenchResult:
    run_dir = new_run_dir(work_dir)
    answers_path, result_path = run_dir / ANSWERS_FILE, run_dir / RESULT_FILE
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0.0)
    has_l2 = any(question.l2_category is not None for question in questions)
    answers: list[dict] = []
    columns = (TextColumn("mmbench"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with (
        answers_path.open("w", encoding="utf-8") as out,
        tempfile.TemporaryDirectory(dir=run_dir, prefix="images_") as images,
        Progress(*columns, console=console, disable=console is None) as progress,
    ):
        task = progress.add_task("mmbench", total=len(questions))
        for start in range(0, len(questions), batch_size):
            batch = questions[start : start + batch_size]
            conversations = [
                Conversation((Turn("user", build_prompt(q)),), images=(str(decode_image(q, Path(images), tsv_path)),))
                for q in batch
            ]
            replies = generate_replies(model, tokenizer, template, conversations, options, batch_size=batch_size)
            for question, reply in zip(batch, replies, strict=True):
                letter = extract_letter(reply, question.options)
                answer = {
                    "index": question.index, "question": question.question, "options": question.options,
                    "prediction": reply, "predicted": letter, "answer": question.answer, "category": question.category,
                    **({"l2_category": question.l2_category} if has_l2 else {}),
                    "correct": None if question.answer is None else letter == question.answer,
                }  # fmt: skip
                answers.append(answer)
                out.write(json.dumps(answer, ensure_ascii=False) + "\n")
            for file in Path(images).iterdir():
                file.unlink()
            progress.update(task, advance=len(batch))
    overall, per_category, per_l2_category = score(answers)
    summary = {"overall": overall, "per_category": per_category, "n": len(answers), "data_path": str(tsv_path)}
    if has_l2:
        summary["per_l2_category"] = per_l2_category
    result_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return MMBenchResult(overall, per_category, len(answers), answers_path, result_path, per_l2_category)


def mmbench(
    llm: str,
    visual_encoder: str,
    llava: str | Path,
    data_path: str | Path,
    work_dir: str | Path,
    prompt_template: str | None = None,
    bits: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 8,
    max_new_tokens: int = 8,
    console: Console | None = None,
) -> MMBenchResult:
    """`xtune mmbench`: load the LLaVA model (base LLM + vision encoder + the trained parts in `llava`) and run
    MMBench on `data_path`. The template is `prompt_template`, else the one recorded with `llava`. The TSV is
    read and checked before the model loads."""
    from xtune.engine.device import resolve_device, resolve_dtype
    from xtune.infer.chat import pick_template
    from xtune.models.llava import load_llava

    questions = read_mmbench(data_path)
    torch_device = resolve_device(device)
    model, tokenizer = load_llava(llm, visual_encoder, llava, bits, torch_device, resolve_dtype(dtype, torch_device))
    template = pick_template(prompt_template, str(llava), llm, tokenizer)
    return _evaluate(model, tokenizer, template, questions, data_path, work_dir, batch_size, max_new_tokens, console)
