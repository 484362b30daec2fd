"""What the loop calls at its named points: log a step, evaluate by chatting, plot the loss.

Plain functions and one small class; the loop in train.py decides when each runs.
"""

import io
import json
import os
import secrets
from pathlib import Path

import torch

from xtune.config.schema import Config
from xtune.data.formats import IMAGE_PLACEHOLDER, Conversation, Turn
from xtune.data.images import image_path
from xtune.data.templates import ChatTemplate
from xtune.errors import ConfigError
from xtune.infer.generate import GenerationOptions, generate_replies

SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens_per_s")
"""Metrics sent to TensorBoard and W&B each logged step, as `train/<name>` (metrics.jsonl holds every field)."""

EVAL_SCALARS = {"eval_loss": "eval/loss", "eval_perplexity": "eval/perplexity"}
"""Validation metrics (metrics.jsonl's names) -> their TensorBoard and W&B names, at each evaluation."""


class MetricSinks:
    """metrics.jsonl in the run folder, plus TensorBoard and W&B when `report_to` names them."""

    def __init__(self, run_dir: Path, config: Config, main: bool = True):
        """Only the main rank writes; the others get sinks that keep nothing."""
        self.jsonl = (run_dir / "metrics.jsonl").open("a") if main else io.StringIO()
        self.tensorboard = self.wandb = None
        if not main:
            return
        if "tensorboard" in config.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("report_to names tensorboard, which is not installed: pip install tensorboard.") from None
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in config.report_to:
            try:
                import wandb
            except ImportError:
                raise ConfigError("report_to names wandb, which is not installed: pip install wandb.") from None
            id_file = run_dir / "wandb_id"  # a resumed run continues the same W&B run
            if not id_file.is_file():
                id_file.write_text(secrets.token_hex(8))
            self.wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "xtune"), name=run_dir.name, id=id_file.read_text(),
                resume="allow", dir=str(run_dir), config=config.model_dump(),
            )  # fmt: skip

    def log(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record["step"]
        scalars = {f"train/{name}": record[name] for name in SCALARS if name in record}
        scalars |= {tag: record[name] for name, tag in EVAL_SCALARS.items() if name in record}
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
            for item in record.get("evaluation", []):
                self.tensorboard.add_text("evaluation", f"**{item['input']}**\n\n{item['output']}", step)
        if self.wandb is not None:
            logged = dict(scalars)
            if "evaluation" in record:
                logged["evaluation"] = self.wandb_table(record["evaluation"])
            self.wandb.log(logged, step=step)

    def wandb_table(self, answers: list[dict]):
        import wandb

        return wandb.Table(columns=["input", "output"], data=[[item["input"], item["output"]] for item in answers])

    def close(self) -> None:
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_loss(run_dir: Path) -> Path | None:
    """loss.png in the run folder from metrics.jsonl, the validation loss beside the training loss (written aside,
    then renamed); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return None
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    points = [(record["step"], record["loss"]) for record in records if "loss" in record]
    validation = [(record["step"], record["eval_loss"]) for record in records if "eval_loss" in record]
    figure, axes = pyplot.subplots(figsize=(7, 4))
    axes.plot([step for step, _ in points], [loss for _, loss in points], linewidth=1.2, label="train")
    if validation:
        axes.plot([step for step, _ in validation], [loss for _, loss in validation], marker="o", markersize=3,
                  linewidth=1.2, label="validation")  # fmt: skip
        axes.legend()
    axes.set(xlabel="optimizer step", ylabel="loss (mean over trained tokens)", title=run_dir.name)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    target, aside = run_dir / "loss.png", run_dir / ".loss.png.partial"
    figure.savefig(aside, format="png", dpi=100)
    pyplot.close(figure)
    os.replace(aside, target)
    return target


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return f" {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    return ""


def evaluate_chat(model, tokenizer, template: ChatTemplate, config: Config) -> list[dict[str, str]]:
    """Answers to `evaluation_inputs` (with `evaluation_images` for LLaVA), in eval mode, restoring train mode
    afterwards."""
    system = (Turn("system", config.SYSTEM),) if config.SYSTEM else ()
    images = [str(image_path(image)) for image in config.evaluation_images]
    images = images * len(config.evaluation_inputs) if len(images) == 1 else images
    conversations = []
    for index, text in enumerate(config.evaluation_inputs):
        if not images:
            conversations.append(Conversation((*system, Turn("user", text))))
            continue
        text = text if IMAGE_PLACEHOLDER in text else f"{IMAGE_PLACEHOLDER}\n{text}"
        conversations.append(Conversation((*system, Turn("user", text)), images=(images[index],)))
    model.eval()
    replies = generate_replies(
        model, tokenizer, template, conversations, GenerationOptions(max_new_tokens=config.evaluation_max_new_tokens)
    )
    model.train()
    return [{"input": text, "output": reply} for text, reply in zip(config.evaluation_inputs, replies)]
