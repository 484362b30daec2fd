"""Hand-written questions (none from the benchmarks) in each benchmark's own file layout."""

import csv

import pytest

# (subject, question, options A-D, answer); dev questions first, then the scored ones
ENGLISH = {
    "dev": [
        ("astronomy", "Which planet is closest to the Sun?", ("Venus", "Mercury", "Mars", "Earth"), "B"),
        ("astronomy", "What does a telescope collect?", ("Light", "Sound", "Heat", "Dust"), "A"),
        ("virology", "What does a virus need to copy itself?", ("Soil", "Water", "A host cell", "Sunlight"), "C"),
        ("virology", "Which is smaller, usually?", ("A virus", "A cell", "A frog", "A tree"), "A"),
    ],
    "test": [
        ("astronomy", "How many moons does Earth have?", ("Two", "One", "None", "Four"), "B"),
        ("astronomy", "What is the Sun?", ("A planet", "A moon", "A comet", "A star"), "D"),
        ("astronomy", "Which is a gas giant?", ("Jupiter", "Mercury", "Mars", "Venus"), "A"),
        ("virology", "What protects a virus's genes?", ("A wall", "A capsid", "A shell of wood", "Fur"), "B"),
        ("virology", "Antibiotics act on what?", ("Viruses", "Bacteria", "Rocks", "Light"), "B"),
    ],
    "val": [
        ("astronomy", "What orbits a planet?", ("A moon", "A star", "A galaxy", "A nebula"), "A"),
    ],
}
"""Scored as always-B: astronomy 1/3, virology 2/2, overall 3/5 (test); val 0/1."""

CHINESE = {
    "dev": [
        ("logic", "如果所有的猫都是动物，那么：", ("有些动物是猫", "没有动物", "猫不是动物", "都不对"), "A"),
        ("logic", "甲比乙高，乙比丙高，那么：", ("丙最高", "甲比丙高", "乙最高", "无法判断"), "B"),
        ("agronomy", "种子发芽需要什么？", ("水分", "石油", "塑料", "玻璃"), "A"),
    ],
    "val": [
        ("logic", "一加一等于几？", ("一", "二", "三", "四"), "B"),
        ("logic", "三角形有几条边？", ("三", "四", "五", "六"), "A"),
        ("logic", "一周有几天？", ("五", "六", "七", "八"), "C"),
        ("agronomy", "水稻主要种在哪里？", ("沙漠", "水田", "冰川", "海底"), "B"),
    ],
    "test": [
        ("logic", "二加二等于几？", ("三", "四", "五", "六"), "B"),
        ("agronomy", "小麦是什么？", ("粮食作物", "石头", "金属", "鱼"), "A"),
    ],
}
"""Scored as always-B: C-Eval's val has logic 1/3, agronomy 1/1, overall 2/4; CMMLU has no val, its test is val +
test here: logic 2/4, agronomy 1/2, overall 3/6."""


def rows(questions, split, subject):
    return [q for q in questions[split] if q[0] == subject]


def write_csv(path, records, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(header)
        writer.writerows(records)
    return path


def write_parquet(path, columns: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def subjects(questions, split):
    return sorted({q[0] for q in questions[split]})


def mmlu_csv(root):
    """hendrycks/test: data/{dev,val,test}/<subject>_<split>.csv, no header."""
    for split in ("dev", "val", "test"):
        for subject in subjects(ENGLISH, split):
            records = [[q, *options, answer] for _, q, options, answer in rows(ENGLISH, split, subject)]
            write_csv(root / "data" / split / f"{subject}_{split}.csv", records)
    return root


def ceval_csv(root):
    """C-Eval: {dev,val,test}/<subject>_<split>.csv, header id,question,A,B,C,D,answer (dev: + explanation; test:
    no answer)."""
    for split in ("dev", "val", "test"):
        for subject in subjects(CHINESE, split):
            found = rows(CHINESE, split, subject)
            if split == "dev":
                header, records = ["id", "question", "A", "B", "C", "D", "answer", "explanation"], [
                    [i, q, *o, a, "因为如此。"] for i, (_, q, o, a) in enumerate(found)
                ]
            elif split == "val":
                header, records = ["id", "question", "A", "B", "C", "D", "answer"], [[i, q, *o, a] for i, (_, q, o, a) in enumerate(found)]
            else:
                header, records = ["id", "question", "A", "B", "C", "D"], [[i, q, *o] for i, (_, q, o, _a) in enumerate(found)]
            write_csv(root / split / f"{subject}_{split}.csv", records, header)
    return root


def cmmlu_csv(root):
    """CMMLU: {dev,test}/<subject>.csv, header ,Question,A,B,C,D,Answer; its test is our val + test."""
    for split, sources in (("dev", ["dev"]), ("test", ["val", "test"])):
        for subject in sorted({q[0] for source in sources for q in CHINESE[source]}):
            found = [q for source in sources for q in rows(CHINESE, source, subject)]
            records = [[i, q, *o, a] for i, (_, q, o, a) in enumerate(found)]
            write_csv(root / split / f"{subject}.csv", records, ["", "Question", "A", "B", "C", "D", "Answer"])
    return root


def mmlu_parquet(root):
    """cais/mmlu: <subject>/{dev,validation,test}-00000-of-00001.parquet (and all/, every subject)."""
    for split, name in (("dev", "dev"), ("val", "validation"), ("test", "test")):
        for subject in [*subjects(ENGLISH, split), "all"]:
            found = ENGLISH[split] if subject == "all" else rows(ENGLISH, split, subject)
            write_parquet(root / subject / f"{name}-00000-of-00001.parquet", {
                "question": [q for _, q, _, _ in found], "subject": [s for s, _, _, _ in found],
                "choices": [list(o) for _, _, o, _ in found], "answer": ["ABCD".index(a) for *_, a in found],
            })  # fmt: skip
    return root


def ceval_parquet(root):
    """ceval/ceval-exam: <subject>/{dev,val,test}-00000-of-00001.parquet; test's answers empty."""
    for split in ("dev", "val", "test"):
        for subject in subjects(CHINESE, split):
            found = rows(CHINESE, split, subject)
            write_parquet(root / subject / f"{split}-00000-of-00001.parquet", {
                "id": list(range(len(found))), "question": [q for _, q, _, _ in found],
                **{letter: [o[i] for _, _, o, _ in found] for i, letter in enumerate("ABCD")},
                "answer": ["" if split == "test" else a for *_, a in found],
                "explanation": ["因为如此。" if split == "dev" else "" for _ in found],
            })  # fmt: skip
    return root


def cmmlu_parquet(root):
    """haonan-li/cmmlu as Hugging Face's parquet conversion writes it: <subject>/cmmlu-{dev,test}.parquet."""
    for split, sources in (("dev", ["dev"]), ("test", ["val", "test"])):
        for subject in sorted({q[0] for source in sources for q in CHINESE[source]}):
            found = [q for source in sources for q in rows(CHINESE, source, subject)]
            write_parquet(root / subject / f"cmmlu-{split}.parquet", {
                "Question": [q for _, q, _, _ in found],
                **{letter: [o[i] for _, _, o, _ in found] for i, letter in enumerate("ABCD")},
                "Answer": [a for *_, a in found],
            })  # fmt: skip
    return root


LAYOUTS = {
    "mmlu-csv": ("mmlu", mmlu_csv), "ceval-csv": ("ceval", ceval_csv), "cmmlu-csv": ("cmmlu", cmmlu_csv),
    "mmlu-parquet": ("mmlu", mmlu_parquet), "ceval-parquet": ("ceval", ceval_parquet),
    "cmmlu-parquet": ("cmmlu", cmmlu_parquet),
}  # fmt: skip


@pytest.fixture
def layout_folder(tmp_path):
    """layout_folder("mmlu-csv") -> a fresh folder in that layout."""

    def make(layout: str):
        return LAYOUTS[layout][1](tmp_path / layout)

    return make
