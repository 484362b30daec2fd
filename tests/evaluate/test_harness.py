"""lm-evaluation-harness on xtune models, with tasks of local data: a multiple-choice task scores what a plain
forward scores, a generation task answers what greedy decoding answers, an adapter's scores are the merged
model's, and chat prompts are written with the template the model was trained with."""

import json
import sys

import pytest
import torch
from peft import PeftModel

from xtune.data.formats import Conversation, Turn
from xtune.data.templates import generation_prompt, get_template
from xtune.engine.checkpoint import RUN_META
from xtune.errors import XtuneError
from xtune.evaluate import harness
from xtune.models.load import load_model, load_tokenizer, resolve_model_path
from tests.convert.test_merge import make_adapter

BASE = "xtune-tiny/internlm2-chat"
QUESTIONS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "London", "Rome"], "answer": 0},
    {"question": "Two plus two is", "choices": ["three", "four", "five"], "answer": 1},
    {"question": "The colour of the sky on a clear day is", "choices": ["green", "red", "blue"], "answer": 2},
    {"question": "Ice is water that is", "choices": ["frozen", "boiling"], "answer": 0},
    {"question": "A week has how many days?", "choices": ["five", "seven", "ten", "twelve"], "answer": 1},
    {"question": "The opposite of hot is", "choices": ["warm", "cold", "loud"], "answer": 1},
]
PROMPTS = [{"prompt": "The cat sat on the", "answer": "mat"}, {"prompt": "One, two, three,", "answer": "four"}]
MAX_NEW_TOKENS = 6
LOCAL_DATA = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
  cache_dir: {cache}
test_split: test
"""
MULTIPLE_CHOICE = """output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""
GENERATION = """output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: {max_new_tokens}, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder of two harness tasks whose data are the few lines above (`include_path`)."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install -c constraints.txt -e '.[harness]'")
    folder = tmp_path_factory.mktemp("harness_tasks")
    cache = tmp_path_factory.mktemp("harness_datasets")
    for task, records, yaml in (("tiny_mc", QUESTIONS, MULTIPLE_CHOICE), ("tiny_gen", PROMPTS, GENERATION)):
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(record) + "\n" for record in records))
        header = LOCAL_DATA.format(task=task, data=data, cache=cache)
        (folder / f"{task}.yaml").write_text(header + yaml.format(max_new_tokens=MAX_NEW_TOKENS))
    return folder


def run(model, tasks, adapter=None, names=("tiny_mc",), **options):
    return harness.run_harness(model, adapter, list(names), include_path=str(tasks), include_defaults=False,
                               device="cpu", dtype="fp32", batch_size=4, log_samples=True, **options)  # fmt: skip


@pytest.fixture(scope="module")
def base_result(tasks):
    return run(BASE, tasks, names=("tiny_mc", "tiny_gen"))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA checkpoint as a run writes it (adapter, tokenizer, xtune_run.json), with random non-zero A and B."""
    return make_adapter(tmp_path_factory.mktemp("run") / "checkpoint-3", BASE, template="vicuna")


@pytest.fixture(scope="module")
def merged(adapter, tmp_path_factory):
    folder = tmp_path_factory.mktemp("merged")
    model = PeftModel.from_pretrained(load_model(resolve_model_path(BASE)), adapter).merge_and_unload()
    model.save_pretrained(folder)
    load_tokenizer(resolve_model_path(BASE)).save_pretrained(folder)
    return folder


def log_likelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """log p(" choice" | context) of each choice, by one plain forward of context + choice."""
    context_ids = tokenizer(context).input_ids
    scores = []
    for choice in choices:
        ids = tokenizer(f"{context} {choice}").input_ids
        assert ids[: len(context_ids)] == context_ids
        with torch.no_grad():
            log_probs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        scores.append(sum(log_probs[position - 1, ids[position]].item() for position in range(len(context_ids), len(ids))))
    return scores


def samples(result, task) -> list[dict]:
    return sorted(result["raw"]["samples"][task], key=lambda sample: sample["doc_id"])


def test_a_local_multiple_choice_task_scores_what_a_plain_forward_scores(base_result):
    model, tokenizer = load_model(resolve_model_path(BASE)).eval(), load_tokenizer(resolve_model_path(BASE))
    expected = [log_likelihoods(model, tokenizer, f"Question: {q['question']}\nAnswer:", q["choices"]) for q in QUESTIONS]
    got = [[response[0] for response in sample["filtered_resps"]] for sample in samples(base_result, "tiny_mc")]
    assert torch.allclose(torch.tensor(sum(got, [])), torch.tensor(sum(expected, [])), atol=1e-4)

    picks = [max(range(len(scores)), key=scores.__getitem__) for scores in expected]
    by_length = [max(range(len(s)), key=lambda i: s[i] / len(q["choices"][i])) for s, q in zip(expected, QUESTIONS)]
    metrics = base_result["metrics"]["tiny_mc"]
    assert metrics["acc"] == pytest.approx(sum(p == q["answer"] for p, q in zip(picks, QUESTIONS)) / len(QUESTIONS))
    assert metrics["acc_norm"] == pytest.approx(sum(p == q["answer"] for p, q in zip(by_length, QUESTIONS)) / len(QUESTIONS))
    assert set(metrics) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert base_result["n_samples"] == {"tiny_mc": len(QUESTIONS), "tiny_gen": len(PROMPTS)}
    json.dumps(base_result)  # the report can write it as it is


def test_a_local_generation_task_answers_what_greedy_decoding_answers(base_result):
    model, tokenizer = load_model(resolve_model_path(BASE)).eval(), load_tokenizer(resolve_model_path(BASE))
    expected = []
    for record in PROMPTS:
        ids = tokenizer(record["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        expected.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0])
    assert [sample["filtered_resps"][0] for sample in samples(base_result, "tiny_gen")] == expected
    metrics = base_result["metrics"]["tiny_gen"]
    assert metrics["exact_match"] == sum(e == r["answer"] for e, r in zip(expected, PROMPTS)) / len(PROMPTS)


def test_an_adapter_checkpoint_scores_as_its_merged_model_and_not_as_its_base(tasks, base_result, adapter, merged):
    with_adapter = run(str(adapter), tasks)  # a LoRA checkpoint alone: loaded on the base its run recorded
    merged_result = run(str(merged), tasks)

    def scores(result):
        return torch.tensor([response[0] for sample in samples(result, "tiny_mc") for response in sample["filtered_resps"]])

    assert torch.allclose(scores(with_adapter), scores(merged_result), atol=1e-4)
    assert with_adapter["metrics"]["tiny_mc"] == pytest.approx(merged_result["metrics"]["tiny_mc"])
    assert (scores(with_adapter) - scores(base_result)).abs().max() > 1e-2
    assert with_adapter["raw"]["config"]["adapter"] == str(adapter)


def test_chat_prompts_are_written_with_the_models_training_template(tasks, tokenizer):
    result = run(BASE, tasks, apply_chat_template=True, prompt_template="vicuna", limit=1)
    question = QUESTIONS[0]["question"]
    expected = generation_prompt(Conversation((Turn("user", f"Question: {question}\nAnswer:"),)), get_template("vicuna"), tokenizer)
    assert {tuple(argument) for argument in samples(result, "tiny_mc")[0]["arguments"]} == {(expected, choice) for choice in QUESTIONS[0]["choices"]}


def test_a_checkpoint_or_run_folder_stands_for_its_adapter_on_its_base(adapter, tmp_path):
    assert harness.resolve_checkpoint(str(adapter), None) == (BASE, str(adapter))
    assert harness.resolve_checkpoint(str(adapter.parent), None) == (BASE, str(adapter))  # the run: its newest
    assert harness.resolve_checkpoint(BASE, str(adapter)) == (BASE, str(adapter))
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / RUN_META).write_text(json.dumps({"stage": "reward", "llm_name_or_path": BASE}))
    with pytest.raises(XtuneError, match="reward model"):
        harness.resolve_checkpoint(str(tmp_path), None)
    assert harness.recorded_template(str(adapter), resolve_model_path(BASE)) == "vicuna"


def test_task_names_are_checked_before_a_model_loads(tasks):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    assert harness.harness_tasks(manager, "tiny_gen, tiny_mc", tasks) == ["tiny_gen", "tiny_mc"]
    assert harness.harness_tasks(manager, ["tiny_*"], tasks) == ["tiny_gen", "tiny_mc"]
    with pytest.raises(XtuneError, match="'tiny_mcq' is not a task.*did you mean tiny_mc"):
        harness.harness_tasks(manager, ["tiny_mcq"], tasks)


def test_metrics_keep_each_filter_apart_and_a_missing_stderr_is_none():
    results = {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
                         "exact_match,flexible-extract": 0.6, "exact_match_stderr,flexible-extract": "N/A"}}  # fmt: skip
    assert harness.task_metrics(results) == {"gsm8k": {
        "exact_match/strict-match": 0.5, "exact_match/strict-match_stderr": 0.1,
        "exact_match/flexible-extract": 0.6, "exact_match/flexible-extract_stderr": None,
    }}  # fmt: skip


def test_without_lm_eval_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(XtuneError, match=r"pip install 'xtune\[harness\]'"):
        harness.run_harness(BASE, None, ["arc_easy"])


def test_xtune_eval_harness_compares_the_adapter_with_its_base_per_document(tasks, adapter, base_result, tmp_path):
    """`xtune eval --harness --compare`: both sides' results and per-document answers written, and the difference
    of each metric with its paired standard error, from the same documents."""
    import math

    from typer.testing import CliRunner

    from xtune.cli import app

    out = tmp_path / "eval"
    args = ["eval", BASE, "--adapter", str(adapter), "--harness", "tiny_mc", "--harness-include", str(tasks),
            "--compare", BASE, "--output", str(out), "--device", "cpu", "--dtype", "fp32", "--batch-size", "4"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())["tasks"]["tiny_mc"]["acc"]
    base = [json.loads(line) for line in (out / "base" / "answers.jsonl").read_text().splitlines()]
    tuned = [json.loads(line) for line in (out / "tuned" / "answers.jsonl").read_text().splitlines()]
    assert comparison["base"] == pytest.approx(base_result["metrics"]["tiny_mc"]["acc"]) and comparison["n"] == 6
    by_id = {answer["id"]: answer["metrics"]["acc"] for answer in base}
    differences = [answer["metrics"]["acc"] - by_id[answer["id"]] for answer in tuned]
    mean = sum(differences) / 6
    assert comparison["difference"] == pytest.approx(mean)
    if any(differences):
        stderr = math.sqrt(sum((d - mean) ** 2 for d in differences) / 5 / 6)
        assert comparison["stderr"] == pytest.approx(stderr)
    tuned_results = json.loads((out / "tuned" / "results.json").read_text())
    assert tuned_results["adapter"] == str(adapter) and set(tuned_results["tasks"]["tiny_mc"]["metrics"]) == {"acc", "acc_norm"}
    assert "tiny_mc" in result.output and CliRunner().invoke(app, args).exit_code != 0  # the folder is never overwritten
