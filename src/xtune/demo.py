"""`xtune demo`: train the tiny InternLM2-layout model with LoRA on a synthetic task it can learn on
a CPU in about a minute, and score its answers to held-out prompts before and after."""

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from xtune.config.load import load_config
from xtune.data.formats import Conversation, Turn
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


LLAVA_PRETRAIN, LLAVA_FINETUNE = "tiny_llava_pretrain_shapes", "tiny_llava_finetune_shapes"


def run_llava_demo(
    work_dir: str = "work_dirs/demo_llava", console: Console | None = None, finetune_overrides: list[str] = ()
) -> DemoResult:
    """LLaVA's two stages on a CPU: the projector learns from captions (LLM and encoder frozen), then LoRA on
    the LLM learns to answer questions about the images; scored on held-out colour questions after stage 1
    (`before`) and after stage 2 (`after`)."""
    from xtune.engine.device import resolve_device, resolve_dtype
    from xtune.models.llava import load_llava
    from xtune.testing.tasks import shapes_heldout_questions

    console = console or Console()
    held_out = shapes_heldout_questions()
    shown = f"evaluation_images={[str(held_out[0][0])]!r}"  # the end-of-stage answer, about a held-out drawing
    pretrain, _ = load_config(LLAVA_PRETRAIN, [f"work_dir={work_dir + '/pretrain'!r}", shown])
    questions = [Conversation((Turn("user", f"<image>\n{q}"),), images=(image,)) for image, q, _ in held_out]
    expected = [answer for _, _, answer in held_out]
    template = get_template(pretrain.prompt_template)
    options = GenerationOptions(max_new_tokens=6)
    device = resolve_device(pretrain.device)
    dtype = resolve_dtype(pretrain.dtype, device)

    def answers(checkpoint) -> list[str]:
        model, tokenizer = load_llava(pretrain.llm_name_or_path, pretrain.visual_encoder_name_or_path, checkpoint,
                                      device=device, dtype=dtype)  # fmt: skip
        return [reply.rstrip(".").lower() for reply in answer_all(model, tokenizer, template, questions, "", options)]

    console.rule(f"xtune LLaVA demo, stage 1: {LLAVA_PRETRAIN} (projector only)")
    stage1 = train(pretrain, console)
    before = answers(stage1.checkpoint)
    console.rule(f"stage 2: {LLAVA_FINETUNE} (LoRA on the LLM, projector from stage 1)")
    finetune, _ = load_config(LLAVA_FINETUNE, [f"work_dir={work_dir + '/finetune'!r}",
                                               f"pretrained_pth={str(stage1.checkpoint)!r}", shown, *finetune_overrides])  # fmt: skip
    stage2 = train(finetune, console)
    after = answers(stage2.checkpoint)
    demo = DemoResult([c.turns[-1].content.split("\n", 1)[1] for c in questions], expected, before, after, stage2)
    console.print(demo_table(demo))
    console.print(
        f"held-out colour questions: after stage 1 {demo.accuracy_before:.0%}, after stage 2 {demo.accuracy_after:.0%} "
        f"({len(expected)} images never seen in training)."
    )
    console.print(
        f"chat about an image: xtune chat {pretrain.llm_name_or_path} --visual-encoder "
        f"{pretrain.visual_encoder_name_or_path} --llava {stage2.checkpoint} --image {held_out[0][0]}"
    )
    return demo
