"""Multiple-choice benchmarks in their own public layouts, read into one `Question` type; nothing is downloaded.

    MMLU (hendrycks/test)   [data/]{dev,val,test}/<subject>_<split>.csv    no header: question,A,B,C,D,answer
    C-Eval                  {dev,val,test}/<subject>_<split>.csv           header id,question,A,B,C,D,answer(,explanation);
                                                                           test has no answers
    CMMLU                   {dev,test}/<subject>.csv                       header ,Question,A,B,C,D,Answer (an index first)
    Hugging Face parquet    <subject>/<split>-*.parquet (or <subject>/*-<split>.parquet, <subject>/<split>/*.parquet)
      cais/mmlu             question, subject, choices (a list), answer (0-3); splits dev, validation, test
      ceval/ceval-exam      id, question, A, B, C, D, answer, explanation; splits dev, val, test
      haonan-li/cmmlu       Question, A, B, C, D, Answer; splits dev, test

A task's folder is read as whichever of these layouts its files have (the header or the columns say which); a task
named after a benchmark must hold that benchmark's layout. A repo id (`cais/mmlu`) stands for its snapshot in the
local Hugging Face hub cache (what `huggingface-cli download --repo-type dataset cais/mmlu` writes).
"""

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from xtune.errors import DataError
from xtune.models.load import REPO_ID, hf_hub_cache

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Benchmark:
    name: str
    repo: str
    """The Hugging Face dataset repo whose cached snapshot is read when no --data is given."""
    eval_split: str
    """The split scored by default: the one whose answers are public."""
    splits: tuple[str, ...]


BENCHMARKS = {
    "mmlu": Benchmark("mmlu", "cais/mmlu", "test", ("dev", "val", "test")),
    "ceval": Benchmark("ceval", "ceval/ceval-exam", "val", ("dev", "val", "test")),
    "cmmlu": Benchmark("cmmlu", "haonan-li/cmmlu", "test", ("dev", "test")),
}
SHOTS_SPLIT = "dev"
"""Where few-shot examples come from, as all three benchmarks prescribe: the first k questions of each subject's."""
SPLIT_ALIASES = {"val": ("val", "validation"), "validation": ("validation", "val")}
"""cais/mmlu names its val split `validation`."""
COMBINED_FOLDERS = ("all", "auxiliary_train")
"""cais/mmlu's folders that are not one subject: every subject together, and MMLU's training set."""
SUBJECT_MAPPING = "subject_mapping.json"
"""C-Eval's {subject: [English name, Chinese name, category]}; where a task folder holds one, prompts name the
subject by it (the Chinese name for C-Eval and CMMLU)."""


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    options: tuple[str, ...]
    """The option texts in letter order (A, B, C, D)."""
    answer: str | None
    """The right letter; None where the split keeps its answers back (C-Eval's test)."""
    id: str
    """`<subject>/<split>/<row>`: unique in a task, the key that pairs a base model's answer with a tuned one's."""
    location: str
    """`file row N` (a CSV's record N, its header row 1), `file[row N]` (a parquet file's, from 0), for messages."""

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]


@dataclass(frozen=True)
class ChoiceTask:
    name: str
    benchmark: str
    """"mmlu", "ceval" or "cmmlu": the layout its files have, and the prompt format it is asked in."""
    folder: Path
    split: str
    questions: list[Question]
    shots: dict[str, list[Question]] = field(default_factory=dict)
    """Subject -> its dev questions in file order (empty when no shots are asked for)."""
    subject_names: dict[str, str] = field(default_factory=dict)
    """Subject -> the name prompts call it by (C-Eval's subject_mapping.json); else the subject with spaces."""

    def subject_name(self, subject: str) -> str:
        return self.subject_names.get(subject) or subject.replace("_", " ")


def read_choice_task(name: str, folder: Path, split: str | None = None, shots: int = 0) -> ChoiceTask:
    """The questions of `split` (default: the benchmark's scored split) of every subject in `folder`, and the first
    `shots` dev questions of each subject. A missing folder or split, a file with other columns, an answer that is
    not an option: a DataError naming the file and row, and what the layout should be."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"task {name}: no folder {folder} (looked at {folder.absolute()}); pass --data {name}=FOLDER.")
    root = folder / "data" if (folder / "data").is_dir() and not _has_split_files(folder) else folder
    found = next(filter(None, (_split_files(root, name) for name in (split or "test", "test", "val", "dev"))), None)
    benchmark = _benchmark_of(found) if found else None  # every split has the same layout
    split = split or (BENCHMARKS[benchmark].eval_split if benchmark else "test")
    files = _split_files(root, split)
    if not files:
        raise DataError(
            f"task {name}: {root} holds no {split} split: expected {split}/<subject>_{split}.csv (MMLU, C-Eval), "
            f"{split}/<subject>.csv (CMMLU) or <subject>/{split}-*.parquet (Hugging Face); pass --split to score another."
        )
    if name in BENCHMARKS and benchmark != name:
        raise DataError(f"task {name}: {root} holds {benchmark}'s layout, not {name}'s; name the task otherwise "
                        f"(--data NAME={folder}) or point {name} at its own files.")  # fmt: skip
    questions = [q for subject, path in files for q in read_questions(path, benchmark, subject, split)]
    if not questions:
        raise DataError(f"task {name}: the {split} files in {root} hold no questions.")
    examples: dict[str, list[Question]] = {}
    if shots and split in SPLIT_ALIASES.get(SHOTS_SPLIT, (SHOTS_SPLIT,)):
        raise DataError(f"task {name}: --shots {shots} takes its examples from the {SHOTS_SPLIT} split, which is the "
                        f"split scored: each question would be shown with its own answer. Score another --split, "
                        "or pass --shots 0.")  # fmt: skip
    if shots:
        dev = dict(_split_files(root, SHOTS_SPLIT))
        for subject in sorted({q.subject for q in questions}):
            if subject not in dev:
                raise DataError(f"task {name}: --shots {shots} needs {subject}'s {SHOTS_SPLIT} split, which {root} "
                                f"lacks; add it or pass --shots 0.")  # fmt: skip
            examples[subject] = read_questions(dev[subject], benchmark, subject, SHOTS_SPLIT)
            if len(examples[subject]) < shots or any(q.answer is None for q in examples[subject][:shots]):
                raise DataError(f"task {name}: --shots {shots}, but {dev[subject]} has only "
                                f"{sum(q.answer is not None for q in examples[subject])} answered questions.")  # fmt: skip
            examples[subject] = examples[subject][:shots]
    return ChoiceTask(name, benchmark, folder, split, questions, examples, _subject_names(folder, root, benchmark))


def _has_split_files(folder: Path) -> bool:
    return any((folder / split).is_dir() for split in ("dev", "val", "test"))


def _split_files(root: Path, split: str) -> list[tuple[str, Path]]:
    """(subject, file) of each subject's file of `split`, sorted by subject."""
    found: dict[str, Path] = {}
    names = SPLIT_ALIASES.get(split, (split,))
    for name in names:
        for path in sorted((root / name).glob("*.csv")) if (root / name).is_dir() else []:
            found.setdefault(path.stem.removesuffix(f"_{name}"), path)
    folders = [child for child in sorted(root.iterdir()) if child.is_dir() and not child.name.startswith(".")]
    subjects = [child for child in folders if child.name not in COMBINED_FOLDERS] or folders
    for child in subjects:
        for name in names:
            matches = [*child.glob(f"{name}-*.parquet"), *child.glob(f"*-{name}.parquet"), *child.glob(f"{name}/*.parquet")]
            if matches:
                found.setdefault(child.name, sorted(matches)[0])
                break
    return sorted(found.items())


def _benchmark_of(files: list[tuple[str, Path]]) -> str:
    """Which benchmark's layout the first file has: its header (CSV) or its columns (parquet) say."""
    path = files[0][1]
    if path.suffix == ".parquet":
        columns = set(_parquet_columns(path))
        for benchmark, needed in PARQUET_COLUMNS.items():
            if set(needed) <= columns:
                return benchmark
        raise DataError(
            f"{path}: columns {', '.join(sorted(columns))} are none of the layouts xtune reads: "
            + "; ".join(f"{benchmark}: {', '.join(needed)}" for benchmark, needed in PARQUET_COLUMNS.items())
        )
    header = next(csv.reader(io.StringIO(_text(path), newline="")), [])
    for benchmark, expected in CSV_HEADERS.items():
        if [cell.strip() for cell in header[: len(expected)]] == list(expected):
            return benchmark
    return "mmlu"


CSV_HEADERS = {"ceval": ("id", "question", "A", "B", "C", "D"), "cmmlu": ("", "Question", "A", "B", "C", "D")}
"""The first header cells of C-Eval's and CMMLU's CSVs; MMLU's have no header."""
PARQUET_COLUMNS = {
    "mmlu": ("question", "choices", "answer"),
    "ceval": ("question", "A", "B", "C", "D", "answer"),
    "cmmlu": ("Question", "A", "B", "C", "D", "Answer"),
}
LAYOUTS = {
    "mmlu": "no header, each row question,A,B,C,D,answer (cais/mmlu parquet: question, subject, choices, answer)",
    "ceval": "a header id,question,A,B,C,D,answer (,explanation), answer left out in test",
    "cmmlu": "a header ,Question,A,B,C,D,Answer (the first column an index)",
}


def read_questions(path: Path, benchmark: str, subject: str, split: str) -> list[Question]:
    """The questions of one subject's file of `split` (a parquet file: with the other shards of its split), in file
    order. In cais/mmlu's `all` folder each question's subject is its record's."""
    if path.suffix == ".parquet":
        shards = sorted(path.parent.glob(re.sub(r"-\d{5}-of-(\d{5})", r"-*-of-\1", path.name))) or [path]
        records = [record for shard in shards for record in _parquet_records(shard)]
    else:
        records = _csv_records(path, benchmark)
    questions = []
    for row, (where, record) in enumerate(records):
        question, options, answer = _fields(record, benchmark, where)
        own = record.get("subject") if subject in COMBINED_FOLDERS and isinstance(record.get("subject"), str) else None
        questions.append(Question(own or subject, question, options, answer, f"{own or subject}/{split}/{row}", where))
    return questions


def _csv_records(path: Path, benchmark: str) -> list[tuple[str, dict]]:
    reader = csv.reader(io.StringIO(_text(path), newline=""))
    records = []
    try:
        rows = [(reader.line_num, row) for row in reader if row]
    except csv.Error as error:
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({error}).") from None
    if benchmark != "mmlu":
        if not rows:
            raise DataError(f"{path}: empty; a {benchmark} CSV has {LAYOUTS[benchmark]}.")
        (_, header), rows = rows[0], rows[1:]
        header = [cell.strip() for cell in header]
        if header[: len(CSV_HEADERS[benchmark])] != list(CSV_HEADERS[benchmark]):
            raise DataError(f"{path} row 1: the header is {','.join(header)}; a {benchmark} CSV has {LAYOUTS[benchmark]}.")
    for number, (line, row) in enumerate(rows, start=1 if benchmark == "mmlu" else 2):
        where = f"{path} row {number}"
        if benchmark == "mmlu":
            if len(row) != 6:
                raise DataError(f"{where} (line {line}): {len(row)} columns; an MMLU CSV row has {LAYOUTS['mmlu']} "
                                f"(a C-Eval CSV's header starts {','.join(CSV_HEADERS['ceval'])}, CMMLU's "
                                f"{','.join(CSV_HEADERS['cmmlu'])}).")  # fmt: skip
            record = dict(zip(("question", "A", "B", "C", "D", "answer"), row))
        else:
            if len(row) > len(header):
                raise DataError(f"{where} (line {line}): {len(row)} cells under a header of {len(header)}.")
            record = dict(zip(header, row))
        records.append((where, record))
    return records


def _parquet_records(path: Path) -> list[tuple[str, dict]]:
    from xtune.data.sources import BadRecord, read_records

    records = []
    for item in read_records(path):
        if isinstance(item, BadRecord):
            raise DataError(f"{item}.")
        location, record = item
        records.append((location, record))
    return records


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).schema_arrow.names
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({' '.join(str(error).split())}).") from None


def _fields(record: dict, benchmark: str, where: str) -> tuple[str, tuple[str, ...], str | None]:
    """(question, options, answer letter or None) of one record, checked."""
    if "choices" in record:  # cais/mmlu
        options, answer = record["choices"], record.get("answer")
        if not isinstance(options, list) or len(options) < 2:
            raise DataError(f"{where}: choices is {options!r}; it must list two or more options.")
        if isinstance(answer, int) and not isinstance(answer, bool):
            if not 0 <= answer < len(options):
                raise DataError(f"{where}: answer {answer} is not an option's index (0-{len(options) - 1}).")
            answer = LETTERS[answer]
        question = record.get("question")
    else:
        keys = {"mmlu": "question", "ceval": "question", "cmmlu": "Question"}
        missing = [key for key in (keys[benchmark], "A", "B", "C", "D") if key not in record]
        if missing:
            raise DataError(f"{where}: no {', '.join(missing)} column; a {benchmark} file has {LAYOUTS[benchmark]}.")
        question = record[keys[benchmark]]
        options = [record[letter] for letter in "ABCD"]
        answer = record.get("Answer" if benchmark == "cmmlu" else "answer")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: the question is empty.")
    for letter, option in zip(LETTERS, options):
        if not isinstance(option, str):
            raise DataError(f"{where}: option {letter} is {option!r}, not text.")
    if isinstance(answer, str):
        answer = answer.strip() or None
    if isinstance(answer, str) and len(answer) == 1:
        answer = answer.upper()
    if answer is not None and (len(answer) != 1 or answer not in LETTERS[: len(options)]):
        raise DataError(f"{where}: answer {answer!r} is not one of {', '.join(LETTERS[: len(options)])}; "
                        "write the right option's letter.")  # fmt: skip
    return question, tuple(options), answer


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8.") from None


def _subject_names(folder: Path, root: Path, benchmark: str) -> dict[str, str]:
    for place in (folder, root):
        mapping = place / SUBJECT_MAPPING
        if mapping.is_file():
            try:
                names = json.loads(mapping.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise DataError(f"{mapping} line {error.lineno}: not valid JSON ({error.msg}).") from None
            column = 0 if benchmark == "mmlu" else 1
            return {subject: entry[column] for subject, entry in names.items()
                    if isinstance(entry, list) and len(entry) > column}  # fmt: skip
    return {}


def hf_dataset_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder of a dataset repo in the Hugging Face hub cache: the one `refs/main` names, else any
    other ref's (Hugging Face's parquet conversion is `refs/convert/parquet`), else the newest."""
    repo = hf_hub_cache() / ("datasets--" + repo_id.replace("/", "--"))
    refs = [repo / "refs" / "main", *sorted((repo / "refs").rglob("*"))] if (repo / "refs").is_dir() else []
    for ref in refs:
        if ref.is_file() and (snapshot := repo / "snapshots" / ref.read_text().strip()).is_dir():
            return snapshot
    snapshots = [path for path in (repo / "snapshots").glob("*") if path.is_dir()]
    return max(snapshots, key=lambda path: path.stat().st_mtime, default=None)


def task_folder(name: str, data: dict[str, str], default: str | None, tasks: int) -> Path:
    """Where task `name`'s files are: `--data NAME=PATH`; else `--data DIR` itself (one task) or DIR/NAME; else a
    benchmark's snapshot in the Hugging Face cache. A PATH that is no folder but a repo id is read from the cache."""
    if name in data:
        path = data[name]
    elif default is not None and (Path(default) / name).is_dir():
        path = str(Path(default) / name)
    elif default is not None and tasks == 1:
        path = default
    elif default is None and name in BENCHMARKS:
        path = BENCHMARKS[name].repo
    else:
        where = f"--data {default} has no folder {name}" if default else "no --data names it"
        raise DataError(f"task {name}: {where}; pass --data {name}=FOLDER (a folder in the benchmark's layout).")
    local = Path(path).expanduser()
    if local.exists() or not REPO_ID.fullmatch(path):
        return local
    snapshot = hf_dataset_snapshot(path)
    if snapshot is None:
        raise DataError(
            f"task {name}: {path} is neither a folder nor a dataset in the Hugging Face cache "
            f"({hf_hub_cache() / ('datasets--' + path.replace('/', '--'))}). xtune downloads nothing: "
            f"huggingface-cli download --repo-type dataset {path}, or pass --data {name}=FOLDER."
        )
    return snapshot


def parse_data_options(values: list[str]) -> tuple[dict[str, str], str | None]:
    """`--data` values: NAME=PATH for one task, or one PATH holding a folder per task (or the only task's files)."""
    named: dict[str, str] = {}
    bare = [value for value in values if not re.fullmatch(r"[\w.-]+=.+", value)]
    for value in values:
        if value not in bare:
            key, _, path = value.partition("=")
            named[key] = path
    if len(bare) > 1:
        raise DataError(f"--data {' '.join(bare)}: one folder at most; name the others' tasks (--data NAME=PATH).")
    return named, bare[0] if bare else None
