"""A LLaVA run's checkpoint converts to its parts, and exports to a transformers LLaVA model that computes
what xtune's LlavaModel computes."""

import io
import json

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from tests.convert.shipped import as_parts, as_strings, assert_generate_stops_at_end_of_turn, assert_parts_render_as_strings, two_rounds

from xtune.config.load import load_config
from xtune.convert.pth_to_hf import pth_to_hf
from xtune.data.encode import IMAGE_TOKEN_ID, encode
from xtune.data.formats import Conversation, Turn
from xtune.data.templates import generation_prompt, get_template
from xtune.engine.train import train
from xtune.errors import CheckpointError
from xtune.models.llava import load_llava
from xtune.testing.tasks import shapes_heldout_questions

CONFIG = "tiny_llava_finetune_shapes"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("llava")
    overrides = [f"work_dir={str(work_dir)!r}", "max_steps=2", "batch_size=4", "evaluation_inputs=[]", "dtype='fp32'",
                 "visual_encoder_lora=True", "visual_encoder_lora_r=4"]  # fmt: skip
    config, _ = load_config(CONFIG, overrides)
    return train(config, Console(file=io.StringIO()))


def test_pth_to_hf_writes_the_parts_and_an_hf_llava_model_with_the_same_logits(tmp_path, run):
    out = pth_to_hf(CONFIG, run.checkpoint, tmp_path / "out", fp32=True, export="hf-llava")
    assert {"projector", "llm_adapter", "visual_encoder_adapter", "hf-llava", "xtune_run.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "training_state.json").exists()

    ours, tokenizer = load_llava("xtune-tiny/internlm2-chat", "xtune-tiny/clip-vision", out)
    image, question, _ = shapes_heldout_questions()[0]
    conversation = Conversation((Turn("user", f"<image>\n{question}"),), images=(image,))
    ids = encode(conversation, get_template("internlm2_chat"), tokenizer, image_tokens=ours.image_tokens).input_ids
    pixels = ours.preprocess([image])
    hf = LlavaForConditionalGeneration.from_pretrained(out / "hf-llava", dtype=torch.float32).eval()
    hf_ids = torch.tensor([[hf.config.image_token_index if t == IMAGE_TOKEN_ID else t for t in ids]])
    with torch.no_grad():
        expected = ours(torch.tensor([ids]), pixels).logits
        logits = hf(input_ids=hf_ids, pixel_values=pixels).logits
    assert (logits - expected).abs().max() < 1e-4

    processor = AutoProcessor.from_pretrained(out / "hf-llava")
    from PIL import Image

    inputs = processor(images=Image.open(image), text=f"<image>\n{question}", return_tensors="pt")
    assert (inputs["input_ids"] == hf.config.image_token_index).sum() == ours.image_tokens  # the processor expands it


def test_the_hf_llava_folder_stops_at_the_end_of_a_reply_and_takes_image_parts(tmp_path, run):
    from PIL import Image

    folder = pth_to_hf(CONFIG, run.checkpoint, tmp_path / "out", fp32=True, export="hf-llava") / "hf-llava"
    processor = AutoProcessor.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert processor.chat_template == tokenizer.chat_template == (folder / "chat_template.jinja").read_text()
    for renderer in (processor, tokenizer):
        assert_parts_render_as_strings(renderer, tokenizer, "internlm2_chat")
    # an image part is written as <image> where it stands, as xtune's server writes it and `xtune chat --image`
    # puts it (in front of the question): the prompt xtune's LLaVA template writes
    image, question, _ = shapes_heldout_questions()[0]
    template = get_template("internlm2_chat")
    for parts, text in (
        ([{"type": "image"}, {"type": "text", "text": question}], f"<image>\n{question}"),
        ([{"type": "text", "text": "Left"}, {"type": "image"}, {"type": "text", "text": question}], f"Left\n<image>\n{question}"),
    ):  # fmt: skip
        expected = generation_prompt(two_rounds(text), template, tokenizer)
        assert processor.apply_chat_template(as_parts(two_rounds(), parts), add_generation_prompt=True) == expected
        assert processor.apply_chat_template(as_strings(two_rounds(text)), add_generation_prompt=True) == expected
    image_first = as_parts(two_rounds(), [{"type": "image"}, {"type": "text", "text": question}])
    prompt = processor.apply_chat_template(image_first, add_generation_prompt=True)
    inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    assert isinstance(model, LlavaForConditionalGeneration)
    assert_generate_stops_at_end_of_turn(model, folder, tokenizer, **inputs)


def test_the_parts_load_back_for_chat_and_a_text_run_cannot_export(tmp_path, run):
    out = pth_to_hf(CONFIG, run.checkpoint, tmp_path / "out")
    assert json.loads((out / "xtune_run.json").read_text())["llava"]["visual_encoder_name_or_path"] == "xtune-tiny/clip-vision"
    model, _ = load_llava("xtune-tiny/internlm2-chat", "xtune-tiny/clip-vision", out)
    assert model.image_tokens == 16
    with pytest.raises(CheckpointError, match="holds no projector"):
        load_llava("xtune-tiny/internlm2-chat", "xtune-tiny/clip-vision", tmp_path)
