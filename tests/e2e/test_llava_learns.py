"""LLaVA's two stages on a CPU: after stage 1 (projector on captions) the model cannot answer colour
questions about held-out drawings; after stage 2 (LoRA on the LLM) it answers most of them."""

import io

import pytest
from rich.console import Console

from xtune.demo import run_llava_demo

pytestmark = pytest.mark.slow


def test_finetuned_llava_answers_colour_questions_about_unseen_images(tmp_path):
    demo = run_llava_demo(str(tmp_path), Console(file=io.StringIO()), finetune_overrides=["max_epochs=3"])
    assert len(demo.expected) == 60 and set(demo.expected) == {"red", "green", "blue", "yellow", "purple", "orange"}
    assert demo.accuracy_before <= 0.2
    assert demo.accuracy_after >= 0.8
    assert (demo.training.checkpoint / "projector" / "model.safetensors").is_file()
    assert (demo.training.checkpoint / "llm_adapter" / "adapter_model.safetensors").is_file()
