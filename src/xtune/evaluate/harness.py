"""EleutherAI's lm-evaluation-harness on an xtune model: any harness task (its own YAML tasks, or yours through
`include_path`) run by lm_eval's `HFLM` around the model as xtune loads it: from a local folder or cache, never
downloaded, with xtune's checks on weights and remote code, and the LoRA adapter applied. The tasks' data are
lm_eval's affair: its own tasks fetch their datasets from the Hugging Face hub, so offline only tasks whose YAML
points at local files run.

lm_eval is an optional extra (`pip install 'xtune[harness]'`); nothing here imports it until a harness run starts.
"""

import difflib
import json
import logging
from pathlib import Path

from xtune.convert.folder import find_checkpoint
from xtune.data.templates import chat_template_jinja
from xtune.engine.checkpoint import RUN_META, read_run_meta
from xtune.errors import CheckpointError, XtuneError
from xtune.infer.chat import load_chat_model
from xtune.models.load import resolve_model_path

LM_EVAL_VERSION = "0.4.13"
INSTALL = "pip install 'xtune[harness]' (from a checkout: pip install -c constraints.txt -e '.[harness]')"
NO_FILTER = "none"
"""lm_eval's name for a metric computed on the model's raw responses (keys are "acc,none")."""


def run_harness(
    model: str,
    adapter: str | None,
    tasks: list[str] | str,
    *,
    include_path: str | list[str] | None = None,
    include_defaults: bool = True,
    num_fewshot: int | None = None,
    batch_size: int | str = 1,
    limit: int | float | None = None,
    device: str = "auto",
    dtype: str = "auto",
    bits: int | None = None,
    trust_remote_code: bool = False,
    apply_chat_template: bool = False,
    prompt_template: str | None = None,
    system_instruction: str | None = None,
    gen_kwargs: dict | None = None,
    max_length: int | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 100_000,
) -> dict:
    """Runs the harness `tasks` (names, glob patterns or YAML files) on `model` (+ `adapter`) and returns
    `{"metrics": {task: {metric: value, metric_stderr: value}}, "n_samples": {task: count}, "raw": results}`.

    `model` is what `xtune chat` takes (a folder, a cached repo id, `xtune-tiny/<name>`), or an xtune run's
    checkpoint (a LoRA one is loaded on the base it recorded) or run folder (its newest complete checkpoint).
    A metric of one of a task's filters other than the raw responses is named `metric/filter` (gsm8k's
    `exact_match/strict-match`); a stderr the harness could not compute is None. `raw` is lm_eval's results,
    JSON-safe (with each sample's requests and responses when `log_samples`).

    With `apply_chat_template`, prompts are written with the tokenizer's chat_template, or, where the model was
    trained with one of xtune's templates (`prompt_template`, else the one recorded with the adapter or model),
    with that template's jinja. `dtype` and `device` take xtune's names (auto, bf16, fp16, fp32; auto, cpu, cuda:N).
    """
    lm_eval, HFLM, TaskManager = _lm_eval()
    task_manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    task_names = harness_tasks(task_manager, tasks, include_path)
    model, adapter = resolve_checkpoint(model, adapter)
    llm, tokenizer = load_chat_model(model, adapter, bits, device, dtype, trust_remote_code)
    if apply_chat_template:
        use_xtune_template(tokenizer, prompt_template or recorded_template(adapter, resolve_model_path(model)))
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    hf_logger.addFilter(_drop_notes_on_passed_models)
    try:
        lm = HFLM(pretrained=llm, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    finally:
        hf_logger.removeFilter(_drop_notes_on_passed_models)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=task_names,
        task_manager=task_manager,
        num_fewshot=num_fewshot,
        limit=limit,
        apply_chat_template=apply_chat_template,
        system_instruction=system_instruction,
        gen_kwargs=gen_kwargs,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
    )
    raw = json.loads(json.dumps(results, default=lm_eval.utils.handle_non_serializable))  # a dtype as its str
    raw["config"].update(model=model, adapter=adapter)  # lm_eval knows the model only as an object
    n_samples = {task: counts["effective"] for task, counts in raw.get("n-samples", {}).items()}
    return {"metrics": task_metrics(raw["results"]), "n_samples": n_samples, "raw": raw}


def check_harness_tasks(tasks: list[str] | str, include_path: str | None = None) -> list[str]:
    """The harness tasks `run_harness` would run, or the error it would raise (lm_eval missing, a task unknown),
    without a model: for a command to fail before its other work."""
    _, _, TaskManager = _lm_eval()
    return harness_tasks(TaskManager(include_path=include_path), tasks, include_path)


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.utils
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise XtuneError(
            f"harness tasks run in EleutherAI's lm-evaluation-harness, which is not installed ({error}); install "
            f"it (lm_eval=={LM_EVAL_VERSION}) with {INSTALL}"
        ) from None
    return lm_eval, HFLM, TaskManager


def _drop_notes_on_passed_models(record: logging.LogRecord) -> bool:
    """HFLM warns that a model passed as an object may ignore its other arguments and must not be launched with
    accelerate: that is how xtune passes every model, and no argument of the user's is ignored."""
    notes = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")
    return not record.getMessage().startswith(notes)


def harness_tasks(task_manager, tasks: list[str] | str, include_path) -> list[str]:
    """The tasks to run, checked before any model loads: "a,b" and lists of names, glob patterns ("mmlu_*")
    expanded, YAML files kept; an unknown name is an error naming the closest known ones."""
    given = [name.strip() for item in ([tasks] if isinstance(tasks, str) else tasks) for name in item.split(",")]
    given = [name for name in given if name]
    if not given:
        raise XtuneError("no harness task given; name one or more, e.g. --harness arc_easy,hellaswag")
    known = set(task_manager.all_tasks)
    chosen = []
    for name in given:
        if name in known or Path(name).is_file():
            chosen.append(name)
        elif any(char in name for char in "*?[") and (matched := task_manager.match_tasks([name])):
            chosen.extend(matched)
        else:
            close = difflib.get_close_matches(name, known, n=3)
            where = f" or in {include_path}" if include_path else " (pass --include-path for tasks of your own)"
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise XtuneError(f"harness task {name!r} is not a task, group or tag known to lm_eval{where}{hint}")
    return list(dict.fromkeys(chosen))


def resolve_checkpoint(model: str, adapter: str | None) -> tuple[str, str | None]:
    """(model, adapter) as `load_chat_model` takes them. An xtune run folder stands for its newest complete
    checkpoint; a LoRA checkpoint (or any peft adapter folder) given as the model is the adapter on the base its
    run recorded (xtune_run.json's llm_name_or_path, else adapter_config.json's base_model_name_or_path)."""
    folder = Path(model).expanduser()
    if adapter is not None or not folder.is_dir() or (folder / "config.json").is_file():
        return model, adapter
    if not (folder / "adapter_config.json").is_file():
        folder = find_checkpoint(folder)
        if (folder / "config.json").is_file():
            return str(folder), None  # a full fine-tune's checkpoint is a model folder
    meta = read_run_meta(folder)
    if meta.get("stage") == "reward":
        raise XtuneError(f"{folder} is a reward model's checkpoint: it scores answers, it is not a language model "
                         "to run harness tasks on; use `xtune reward score`.")  # fmt: skip
    base = meta.get("llm_name_or_path") or _adapter_base(folder)
    if not base:
        raise CheckpointError(
            f"{folder} is a LoRA adapter, but neither its {RUN_META} nor its adapter_config.json names the base "
            "model it was trained on; pass the base as the model and this folder as the adapter."
        )
    return base, str(folder)


def _adapter_base(folder: Path) -> str | None:
    config = folder / "adapter_config.json"
    return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path") if config.is_file() else None


def recorded_template(adapter: str | None, model_path: Path) -> str | None:
    """The template the adapter's run recorded, else the model folder's (merged and converted models carry it)."""
    for folder in (adapter, model_path):
        if folder is not None and (name := read_run_meta(Path(folder)).get("prompt_template")):
            return name
    return None


def use_xtune_template(tokenizer, name: str | None) -> None:
    """The harness writes chat prompts with `tokenizer.apply_chat_template`: give it the jinja of the xtune
    template the model was trained with ("hf" keeps the tokenizer's own)."""
    if name is not None and name != "hf":
        tokenizer.chat_template = chat_template_jinja(name)
    elif not getattr(tokenizer, "chat_template", None):
        raise XtuneError(
            "apply_chat_template: no chat template is known for this model (none recorded with it, and its "
            "tokenizer has no chat_template); pass --prompt-template (e.g. internlm2_chat), or leave the chat "
            "template off."
        )


def task_metrics(results: dict) -> dict[str, dict[str, float | None]]:
    """lm_eval's `results` ({task: {"acc,none": v, "acc_stderr,none": s, "alias": ...}}) as
    {task: {"acc": v, "acc_stderr": s}}; a filter's metrics as "exact_match/strict-match", with
    "exact_match/strict-match_stderr"; groups (mmlu) carry their aggregate the same way."""
    metrics = {}
    for task, values in results.items():
        plain = {}
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            if not comma:
                continue  # alias, name, sample_len
            stderr = metric.endswith("_stderr")
            name = metric.removesuffix("_stderr")
            name = name if filter_name == NO_FILTER else f"{name}/{filter_name}"
            plain[f"{name}_stderr" if stderr else name] = value if isinstance(value, (int, float)) else None
        metrics[task] = plain
    return metrics



def harness_summaries(result: dict) -> dict[str, dict]:
    """`run_harness`'s result as `xtune eval`'s report writes task results: {task: {"kind": "harness", "n",
    "metrics": {metric: {"value", "stderr"}}}}."""
    summaries = {}
    for task, values in result["metrics"].items():
        metrics = {name: {"value": value, "stderr": values.get(f"{name}_stderr")}
                   for name, value in values.items() if not name.endswith("_stderr")}  # fmt: skip
        summaries[task] = {"kind": "harness", "n": result["n_samples"].get(task), "metrics": metrics}
    return summaries


def harness_answers(result: dict) -> dict[str, list[dict]]:
    """Each task's samples (run with `log_samples`) as report answers: {"task", "id" (the harness's doc_id),
    "metrics": {metric: value}}, one per document, its filters' metrics named as in `task_metrics`."""
    answers: dict[str, list[dict]] = {}
    for task, samples in result["raw"].get("samples", {}).items():
        by_document: dict = {}
        for sample in samples:
            filter_name = sample.get("filter", NO_FILTER)
            record = by_document.setdefault(sample["doc_id"], {"task": task, "id": sample["doc_id"], "metrics": {}})
            for metric in sample.get("metrics", []):
                value = sample.get(metric)
                if isinstance(value, (int, float)):
                    record["metrics"][metric if filter_name == NO_FILTER else f"{metric}/{filter_name}"] = float(value)
        answers[task] = list(by_document.values())
    return answers


def harness_eval(model: str, adapter: str | None, tasks: list[str] | str, output: Path,
                 compare_with: str | None = None, **options) -> tuple[dict[str, dict], dict | None]:  # fmt: skip
    """`xtune eval --harness`: the harness `tasks` on the model (and on `compare_with`, the base), written into
    `output` (a new folder) as results.json and answers.jsonl per side, with comparison.json (the paired difference
    of every metric, as for xtune's own tasks); returns (the model's task results, the comparison or None)."""
    from xtune.evaluate import report

    report.check_output(output)
    if options.get("apply_chat_template") and compare_with and not options.get("prompt_template"):
        resolved, resolved_adapter = resolve_checkpoint(model, adapter)  # the base is asked as the tuned model is
        options["prompt_template"] = recorded_template(resolved_adapter, resolve_model_path(resolved))
    sides = [("tuned", model, adapter), ("base", compare_with, None)] if compare_with else [("model", model, adapter)]
    answers, summaries = {}, {}
    for side, name, side_adapter in sides:
        result = run_harness(name, side_adapter, tasks, log_samples=True, **options)
        summaries[side], answers[side] = harness_summaries(result), harness_answers(result)
        folder = output / side if compare_with else output
        folder.mkdir(parents=True, exist_ok=True)
        report.write_jsonl(folder / report.ANSWERS_FILE, [a for task in answers[side].values() for a in task])
        report.write_json(folder / report.RESULTS_FILE, {"model": name, "adapter": side_adapter, "harness": lm_eval_version(),
                                                         "tasks": summaries[side], "config": result["raw"].get("config")})  # fmt: skip
    if compare_with is None:
        return summaries["model"], None
    comparison = report.compare(
        {task: (answers["base"].get(task, []), summary) for task, summary in summaries["base"].items()},
        {task: (answers["tuned"].get(task, []), summary) for task, summary in summaries["tuned"].items()},
    )
    report.write_json(output / report.COMPARISON_FILE, {"base": compare_with, "model": model, "adapter": adapter,
                                                         "tasks": comparison})  # fmt: skip
    return summaries["tuned"], comparison


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
