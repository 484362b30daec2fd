"""`xtune demo`: train the tiny InternLM2-layout model with LoRA on a synthetic task it can learn on
a CPU in about a minute, and score its answers to held-out prompts before and after."""

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from xtune.config.load import load_config
from xtune.data.formats import Conversation
from xtune.data.loader import load_conversations
from xtune.engine.train import TrainResult, train
from xtune.infer.chat import answer_all, load_chat_model
from xtune.infer.generate import GenerationOptions
from xtune.data.templates import get_template
from xtune.testing.tasks import tiny_dataset_path

DEMO_CONFIG = "tiny_internlm2_chat_lora_antonyms"


@dataclass
class DemoResult:
    prompts: list[str]
    expected: list[str]
    before: list[str]
    after: list[str]
    training: TrainResult

    @staticmethod
    def accuracy(answers: list[str], expected: list[str]) -> float:
        return sum(a == e for a, e in zip(answers, expected)) / len(expected)

    @property
    def accuracy_before(self) -> float:
        return self.accuracy(self.before, self.expected)

    @property
    def accuracy_after(self) -> float:
        return self.accuracy(self.after, self.expected)


def run_demo(work_dir: str = "work_dirs/demo", console: Console | None = None, overrides: list[str] = ()) -> DemoResult:
    console = console or Console()
    config, _ = load_config(DEMO_CONFIG, [f"work_dir={work_dir!r}", *overrides])
    held_out = load_conversations(tiny_dataset_path("antonyms-heldout"))
    questions = [Conversation(c.turns[:-1]) for c in held_out]
    expected = [c.turns[-1].content for c in held_out]
    template = get_template(config.prompt_template)
    options = GenerationOptions(max_new_tokens=8)

    console.rule(f"xtune demo: LoRA on {config.llm_name_or_path}, config {DEMO_CONFIG}")
    model, tokenizer = load_chat_model(config.llm_name_or_path, device=config.device, dtype=config.dtype)
    before = answer_all(model, tokenizer, template, questions, config.SYSTEM, options)
    result = train(config, console)
    model, tokenizer = load_chat_model(
        config.llm_name_or_path, adapter=str(result.checkpoint), device=config.device, dtype=config.dtype
    )
    after = answer_all(model, tokenizer, template, questions, config.SYSTEM, options)
    demo = DemoResult([q.turns[-1].content for q in questions], expected, before, after, result)
    console.print(demo_table(demo))
    console.print(
        f"held-out accuracy: before {demo.accuracy_before:.0%}, after {demo.accuracy_after:.0%} "
        f"({len(expected)} prompts never seen in training). Loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}."
    )
    console.print(f"adapter: {result.checkpoint}")
    console.print(
        f"chat with it: xtune chat {config.llm_name_or_path} --adapter {result.checkpoint} "
        f"--prompt-template {config.prompt_template}"
    )
    return demo


def demo_table(demo: DemoResult) -> Table:
    table = Table(title="held-out prompts")
    for column in ("prompt", "expected", "before", "after"):
        table.add_column(column)
    for prompt, expected, before, after in zip(demo.prompts, demo.expected, demo.before, demo.after):
        mark = "[green]" if after == expected else "[red]"
        table.add_row(prompt, expected, before[:30], f"{mark}{after[:30]}")
    return table
