"""`xtune eval`: read every task before a model loads, answer them with the model (and with the base model for
`--compare`), then write answers, results, tables and charts.

Under torchrun (`NPROC_PER_NODE=N xtune eval ...`) every process loads the model and answers every N-th question of
each task; rank 0 gathers the answers, in the tasks' order, and writes everything.

The model is scored here by xtune's own scorer; lm-evaluation-harness (`--harness`, to come) is to be a second
backend of `answer_tasks`, taking the same tasks and returning answers of the same shape.
"""

import gc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from xtune.data.formats import with_system
from xtune.data.templates import Template
from xtune.engine.checkpoint import new_run_dir
from xtune.engine.device import resolve_device
from xtune.engine.distributed import Ranks, barrier, setup
from xtune.errors import XtuneError
from xtune.evaluate import report
from xtune.evaluate.generation import (
    METRICS,
    GenerationTask,
    bleu_tokenize,
    corpus_bleu,
    load_scorer,
    read_generation_task,
    score_example,
)
from xtune.evaluate.prompts import PLAIN_TEXT, answer_texts, as_conversation, build_prompt
from xtune.evaluate.score import packs, score_choices
from xtune.evaluate.tasks import ChoiceTask, parse_data_options, read_choice_task, task_folder
from xtune.infer.generate import GenerationOptions, generate_replies
from xtune.infer.mmbench import extract_letter

Task = ChoiceTask | GenerationTask
SCORING = ("loglikelihood", "generation")
LETTER_TOKENS = 16
"""New tokens a model may write before the letter it picks is read (scoring by generation)."""
DEFAULT_OUTPUT = Path("work_dirs/eval")


@dataclass(frozen=True)
class EvalOptions:
    tasks: tuple[str, ...]
    """Benchmark names (mmlu, ceval, cmmlu), names given a folder with --data NAME=PATH, or paths of generation
    tasks (a .jsonl file, or any file or folder of records)."""
    data: tuple[str, ...] = ()
    """`--data` values: NAME=PATH, or one folder holding a folder per task."""
    split: str | None = None
    """The split scored; default: each benchmark's with public answers (MMLU test, C-Eval val, CMMLU test)."""
    shots: int = 0
    """Answered dev questions of the same subject before each question."""
    chat: bool | None = None
    """Render prompts with the chat template; None: multiple choice as plain text, generation tasks as chats."""
    scoring: str = "loglikelihood"
    """Multiple choice by each option's log-likelihood, or by the letter the model writes (`generation`)."""
    prompt_template: str | None = None
    system: str = ""
    """System prompt of chat-rendered prompts."""
    scorer: str | None = None
    """`pkg.mod:fn`: a user's metric of generation tasks."""
    limit: int | None = None
    """Only the first N questions of each task."""
    max_new_tokens: int = 256
    batch_size: int = 16
    """Prompts generated together."""
    tokens_per_batch: int = 8192
    """Tokens of one packed forward when scoring by log-likelihood."""
    bits: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False


@dataclass
class EvalResult:
    output: Path
    summaries: dict[str, dict]
    """Task -> its results (report.choice_summary / generation_summary) for the model (the tuned one)."""
    base_summaries: dict[str, dict] | None = None
    comparison: dict | None = None
    """Task -> metric -> base, tuned, difference and its paired stderr (with --compare)."""


def load_tasks(options: EvalOptions) -> list[Task]:
    """Every task read and checked; a generation task's path is a file, or a folder of records, not a benchmark's."""
    if options.scoring not in SCORING:
        raise XtuneError(f"--scoring {options.scoring!r}: use {' or '.join(SCORING)}.")
    if not options.tasks:
        raise XtuneError("no tasks: pass --tasks mmlu,ceval,... or the path of a generation task (.jsonl).")
    named, default = parse_data_options(list(options.data))
    unused = sorted(set(named) - set(options.tasks))
    if unused:
        raise XtuneError(f"--data names {', '.join(unused)}, which --tasks does not list.")
    tasks: list[Task] = []
    for entry in options.tasks:
        path = Path(entry).expanduser()
        if path.is_file() or (path.suffix in (".jsonl", ".json") and entry not in named):
            tasks.append(read_generation_task(path.stem, path))
            continue
        folder = task_folder(entry, named, default, len(options.tasks))
        if folder.is_file():
            tasks.append(read_generation_task(entry, folder))
        else:
            tasks.append(read_choice_task(entry, folder, options.split, options.shots))
    names = [task.name for task in tasks]
    if len(set(names)) < len(names):
        raise XtuneError(f"--tasks names a task twice: {', '.join(names)}.")
    return tasks


def run_eval(
    model: str, adapter: str | None, options: EvalOptions, output: Path | None = None, compare_with: str | None = None,
    console: Console | None = None,
) -> EvalResult | None:  # fmt: skip
    """Answer every task with `model` (+ `adapter`), and with `compare_with` (the base) too; write into `output` (a
    new folder; default work_dirs/eval/<time>). Rank 0 returns the results, other ranks None."""
    from xtune.infer.chat import load_chat_model, pick_template
    from xtune.models.load import resolve_model_path

    if output is not None:
        report.check_output(Path(output))
    tasks = load_tasks(options)  # before a model that may take minutes to load
    scorer = load_scorer(options.scorer) if options.scorer else None
    device = resolve_device(options.device)
    ranks = setup(device)
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)
    console = console if ranks.main else None
    sides = [("tuned", model, adapter), ("base", compare_with, None)] if compare_with else [("model", model, adapter)]
    template: Template | None = None
    answers: dict[str, dict[str, list[dict]]] = {}
    for side, name, side_adapter in sides:
        llm, tokenizer = load_chat_model(name, side_adapter, options.bits, str(device), options.dtype,
                                         options.trust_remote_code)  # fmt: skip
        if template is None and _chats(tasks, options):  # the base is asked as the tuned model is
            template = pick_template(options.prompt_template, adapter, resolve_model_path(model), tokenizer)
        answers[side] = answer_tasks(llm, tokenizer, template, tasks, options, ranks, console, scorer, side)
        del llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    barrier(ranks)
    if not ranks.main:
        return None
    return _write(answers, tasks, options, model, adapter, compare_with, output)


def _chats(tasks: list[Task], options: EvalOptions) -> bool:
    return any(_chat(task, options) for task in tasks)


def _chat(task: Task, options: EvalOptions) -> bool:
    return options.chat if options.chat is not None else isinstance(task, GenerationTask)


def answer_tasks(
    model, tokenizer, template: Template | None, tasks: list[Task], options: EvalOptions, ranks: Ranks = Ranks(),
    console: Console | None = None, scorer=None, label: str = "model",
) -> dict[str, list[dict]]:  # fmt: skip
    """Task -> the answer record of each question, in order (on rank 0; this rank's share elsewhere)."""
    packed = options.scoring == "loglikelihood" and any(isinstance(task, ChoiceTask) for task in tasks) and packs(model)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    answers = {}
    with Progress(*columns, console=console, disable=console is None) as progress:
        for task in tasks:
            items = (task.questions if isinstance(task, ChoiceTask) else task.examples)[: options.limit]
            mine = list(range(ranks.rank, len(items), ranks.world))
            bar = progress.add_task(f"{label} {task.name}", total=len(items))
            advance = lambda n, bar=bar: progress.update(bar, advance=n * ranks.world)  # noqa: E731
            chat_template = template if _chat(task, options) else PLAIN_TEXT
            if isinstance(task, ChoiceTask):
                records = _answer_choices(model, tokenizer, chat_template, task, [items[i] for i in mine], options,
                                          packed, advance)  # fmt: skip
            else:
                tokenize = bleu_tokenize([example.reference for example in items])
                records = _answer_generation(model, tokenizer, chat_template, task, [items[i] for i in mine], options,
                                             scorer, tokenize, advance)  # fmt: skip
            answers[task.name] = _gather(list(zip(mine, records)), ranks)
    return answers


def _answer_choices(model, tokenizer, template, task: ChoiceTask, questions, options: EvalOptions, packed: bool,
                    advance: Callable[[int], None]) -> list[dict]:  # fmt: skip
    prompts = [build_prompt(question, task) for question in questions]
    chat = template is not PLAIN_TEXT
    records = []
    if options.scoring == "loglikelihood":
        answers = [answer_texts(question, task.benchmark, chat) for question in questions]
        scores = score_choices(model, tokenizer, template, prompts, answers, options.tokens_per_batch, packed,
                               advance=advance, system=options.system if chat else "")  # fmt: skip
        for question, values in zip(questions, scores, strict=True):
            predicted = question.letters[max(range(len(values)), key=values.__getitem__)]
            records.append(_choice_record(task, question, predicted) | {"scores": dict(zip(question.letters, values))})
        return records
    generation = GenerationOptions(max_new_tokens=LETTER_TOKENS, temperature=0.0)
    for start in range(0, len(questions), options.batch_size):
        batch = questions[start : start + options.batch_size]
        conversations = [with_system(as_conversation(prompt), options.system if chat else "")
                         for prompt in prompts[start : start + options.batch_size]]  # fmt: skip
        replies = generate_replies(model, tokenizer, template, conversations, generation, batch_size=options.batch_size)
        for question, reply in zip(batch, replies, strict=True):
            first_line = next(iter(reply.strip().splitlines()), "")
            predicted = extract_letter(first_line, dict(zip(question.letters, question.options)))
            records.append(_choice_record(task, question, predicted) | {"reply": reply})
        advance(len(batch))
    return records


def _choice_record(task: ChoiceTask, question, predicted: str | None) -> dict:
    return {"task": task.name, "subject": question.subject, "id": question.id, "location": question.location,
            "predicted": predicted, "gold": question.answer,
            "correct": None if question.answer is None else predicted == question.answer}  # fmt: skip


def _answer_generation(model, tokenizer, template, task: GenerationTask, examples, options: EvalOptions, scorer,
                       tokenize: str, advance: Callable[[int], None]) -> list[dict]:  # fmt: skip
    generation = GenerationOptions(max_new_tokens=options.max_new_tokens, temperature=0.0)
    system = options.system if template is not PLAIN_TEXT else ""
    records = []
    for start in range(0, len(examples), options.batch_size):
        batch = examples[start : start + options.batch_size]
        conversations = [with_system(example.prompt, system) for example in batch]
        replies = generate_replies(model, tokenizer, template, conversations, generation, batch_size=options.batch_size)
        for example, reply in zip(batch, replies, strict=True):
            metrics = score_example(reply, example.reference, tokenize, scorer, example.id)
            records.append({"task": task.name, "id": example.id, "prompt": example.prompt.turns[-1].content,
                            "reply": reply, "reference": example.reference, "metrics": metrics})  # fmt: skip
        advance(len(batch))
    return records


def _gather(indexed: list[tuple[int, dict]], ranks: Ranks) -> list[dict]:
    """Every rank's (index, record) on rank 0, in index order; this rank's records elsewhere."""
    if ranks.world > 1:
        boxes: list = [None] * ranks.world
        dist.all_gather_object(boxes, indexed)
        indexed = sorted((pair for box in boxes for pair in box), key=lambda pair: pair[0])
    return [record for _, record in indexed]


def summarize(task: Task, records: list[dict]) -> dict:
    if isinstance(task, ChoiceTask):
        summary = report.choice_summary(records)
        return summary | {"split": task.split, "benchmark": task.benchmark, "folder": str(task.folder)}
    metrics = list(dict.fromkeys(name for record in records for name in record["metrics"])) or list(METRICS)
    bleu = corpus_bleu([r["reply"] for r in records], [r["reference"] for r in records]) if records else None
    return report.generation_summary(records, metrics, bleu) | {"path": str(task.path)}


def _write(answers, tasks, options, model, adapter, compare_with, output) -> EvalResult:
    output = Path(output) if output is not None else new_run_dir(DEFAULT_OUTPUT)
    output.mkdir(parents=True, exist_ok=True)
    summaries = {side: {task.name: summarize(task, answers[side][task.name]) for task in tasks} for side in answers}
    settings = asdict(options)
    for side, folder in (("model", output), ("tuned", output / "tuned"), ("base", output / "base")):
        if side not in answers:
            continue
        folder.mkdir(exist_ok=True)
        names = {"model": (model, adapter), "tuned": (model, adapter), "base": (compare_with, None)}[side]
        report.write_jsonl(folder / report.ANSWERS_FILE, [r for task in tasks for r in answers[side][task.name]])
        report.write_json(folder / report.RESULTS_FILE,
                          {"model": names[0], "adapter": names[1], "options": settings, "tasks": summaries[side]})  # fmt: skip
    if compare_with is None:
        result = EvalResult(output, summaries["model"])
        report.bar_chart(output / report.CHART_FILE, _bars([summaries["model"]]), [model], "xtune eval")
    else:
        comparison = report.compare(
            {name: (answers["base"][name], summaries["base"][name]) for name in summaries["base"]},
            {name: (answers["tuned"][name], summaries["tuned"][name]) for name in summaries["tuned"]},
        )
        report.write_json(output / report.COMPARISON_FILE, {"base": compare_with, "model": model, "adapter": adapter,
                                                             "tasks": comparison})  # fmt: skip
        report.bar_chart(output / report.COMPARISON_CHART, _bars([summaries["base"], summaries["tuned"]]),
                         ["base", "tuned"], "base vs tuned")  # fmt: skip
        result = EvalResult(output, summaries["tuned"], summaries["base"], comparison)
    return result


def _bars(sides: list[dict[str, dict]]) -> dict[str, list[tuple[float | None, float | None]]]:
    """Chart label -> (value, stderr) of each side."""
    bars: dict[str, list] = {}
    for summaries in sides:
        for task, summary in summaries.items():
            for metric, value, stderr in report.chart_bars(summary):
                bars.setdefault(f"{task} {metric}".strip(), []).append((value, stderr))
    return bars
