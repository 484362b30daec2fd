"""LLaVA: <image> becomes patch positions, the model fills them with projected patch features, packing gives
the same logits as separate samples, trained parts save and load back, and the learned model answers."""

import pytest
import torch
from transformers import CLIPVisionModel

from xtune.config.schema import Config
from xtune.data.encode import IGNORE_INDEX, IMAGE_TOKEN_ID, encode
from xtune.data.formats import Conversation, Turn
from xtune.data.images import ImagePreprocessor
from xtune.data.packing import build_row, collate_packed
from xtune.data.templates import get_template
from xtune.models.attention import use_varlen_attention
from xtune.models.llava import LlavaModel, Projector, build_llava, image_token_count, with_pixel_values
from xtune.models.load import load_model, load_tokenizer, resolve_model_path
from xtune.models.lora import prepare_trainable
from xtune.testing.tasks import shapes_heldout_questions

TEMPLATE = get_template("internlm2_chat")


def conversation(image: str, question: str = "What colour is the shape?", answer: str = "red") -> Conversation:
    turns = (Turn("user", f"<image>\n{question}"), Turn("assistant", answer, True))
    return Conversation(turns, images=(image,))


@pytest.fixture(scope="module")
def images():
    return [path for path, _, _ in shapes_heldout_questions()[:4]]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path("xtune-tiny/internlm2-chat"))


def test_each_image_becomes_a_run_of_untrained_patch_positions(tokenizer, images):
    encoded = encode(conversation(images[0]), TEMPLATE, tokenizer, image_tokens=16)
    start = encoded.input_ids.index(IMAGE_TOKEN_ID)
    assert encoded.input_ids[start : start + 16] == [IMAGE_TOKEN_ID] * 16
    assert encoded.input_ids.count(IMAGE_TOKEN_ID) == 16
    assert encoded.labels[start : start + 16] == [IGNORE_INDEX] * 16
    assert encoded.images == (images[0],)
    text_only = encode(conversation(images[0]), TEMPLATE, tokenizer)  # a text model keeps <image> as text
    assert IMAGE_TOKEN_ID not in text_only.input_ids and text_only.images == ()


def test_truncation_never_keeps_part_of_an_image(tokenizer, images):
    two = Conversation((Turn("user", "<image> and <image>: same colour?"), Turn("assistant", "yes", True)), images=tuple(images[:2]))
    whole = encode(two, TEMPLATE, tokenizer, image_tokens=16)
    second = len(whole.input_ids) - whole.input_ids[::-1].index(IMAGE_TOKEN_ID)  # end of the second run
    cut = encode(two, TEMPLATE, tokenizer, max_length=second - 5, image_tokens=16)
    assert cut.truncated and cut.input_ids.count(IMAGE_TOKEN_ID) == 16 and cut.images == (images[0],)
    assert cut.input_ids[-1] != IMAGE_TOKEN_ID


def tiny_llava(**overrides) -> LlavaModel:
    config = Config(**{
        "llm_name_or_path": "xtune-tiny/internlm2-chat", "visual_encoder_name_or_path": "xtune-tiny/clip-vision",
        "data_path": "-", "freeze_llm": True, **overrides,
    })  # fmt: skip
    llm = prepare_trainable(load_model(resolve_model_path(config.llm_name_or_path)), config, others_train=True)
    preprocess = ImagePreprocessor.from_folder(resolve_model_path("xtune-tiny/clip-vision"))
    torch.manual_seed(0)
    return build_llava(config, llm, torch.float32, torch.device("cpu"), preprocess).eval()


def test_patch_positions_hold_the_projected_features_of_their_image(tokenizer, images):
    model = tiny_llava()
    encoded = encode(conversation(images[1]), TEMPLATE, tokenizer, image_tokens=model.image_tokens)
    ids = torch.tensor([encoded.input_ids])
    pixels = model.preprocess([images[1]])
    embeddings = model.embed(ids, pixels)
    patches = ids[0] == IMAGE_TOKEN_ID
    encoder = CLIPVisionModel.from_pretrained(resolve_model_path("xtune-tiny/clip-vision"))
    expected = model.projector(encoder(pixels, output_hidden_states=True).hidden_states[-2][0, 1:])
    assert torch.allclose(embeddings[0, patches], expected, atol=1e-6)
    text = model.llm.get_input_embeddings()(ids[0, ~patches])
    assert torch.equal(embeddings[0, ~patches], text)
    with pytest.raises(ValueError, match="no pixel_values"):
        model.embed(ids)


def test_packed_rows_with_images_give_the_logits_of_separate_samples(tokenizer, images):
    model = tiny_llava()
    use_varlen_attention(model.llm)
    conversations = [conversation(images[0]), Conversation((Turn("user", "Hi"), Turn("assistant", "hello", True))),
                     conversation(images[2], "What shape is it?", "circle")]  # fmt: skip
    samples = [encode(c, TEMPLATE, tokenizer, image_tokens=model.image_tokens) for c in conversations]
    collate = with_pixel_values(collate_packed, model.preprocess)
    row = build_row(samples, max_length=sum(len(s.input_ids) for s in samples) + 3, pad_token_id=2)
    batch = collate([row])
    assert batch["pixel_values"].shape[0] == 2
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        start = 0
        for sample in samples:
            alone = torch.tensor([sample.input_ids])
            pixels = model.preprocess(list(sample.images)) if sample.images else None
            logits = model(alone, pixels, use_cache=False).logits[0]
            n = len(sample.input_ids)
            assert (packed[start : start + n] - logits).abs().max() < 1e-4
            start += n


def test_trained_parts_save_and_load_back(tmp_path):
    model = tiny_llava(freeze_llm=False, method="lora", lora_r=4, visual_encoder_lora=True, visual_encoder_lora_r=4)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.01)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"projector", "llm_adapter", "visual_encoder_adapter"}
    fresh = tiny_llava(freeze_llm=False, method="lora", lora_r=4, visual_encoder_lora=True, visual_encoder_lora_r=4)
    fresh.load_trained(tmp_path)
    trained = dict(model.named_parameters())
    for name, parameter in fresh.named_parameters():
        if parameter.requires_grad:
            assert torch.equal(parameter, trained[name]), name
    assert isinstance(Projector.load(tmp_path), Projector)


def test_image_token_count_of_the_tiny_encoder():
    from xtune.models.llava import vision_config

    assert image_token_count(vision_config("xtune-tiny/clip-vision")) == (32 // 8) ** 2


def test_each_part_can_be_frozen_and_unsupported_sharding_is_refused():
    from pydantic import ValidationError

    from xtune.engine.zero import deepspeed_config
    from xtune.errors import ConfigError

    model = tiny_llava(freeze_projector=True)
    assert not any(p.requires_grad for p in model.parameters())
    model = tiny_llava(freeze_visual_encoder=False)
    assert all(p.requires_grad for p in model.visual_encoder.parameters())
    assert not any(p.requires_grad for p in model.llm.parameters())
    llava = {"llm_name_or_path": "m", "data_path": "d", "visual_encoder_name_or_path": "v"}
    with pytest.raises(ValidationError, match="not fsdp"):
        Config(**llava, strategy="fsdp")
    with pytest.raises(ConfigError, match="not wired for LLaVA"):
        deepspeed_config(Config(**llava, deepspeed="zero3"), world=1, dtype=torch.float32)


def test_the_eval_chat_hook_asks_about_evaluation_images(tmp_path, images):
    import io
    import json

    from rich.console import Console

    from xtune.config.load import load_config
    from xtune.engine.train import train

    overrides = [f"work_dir={str(tmp_path)!r}", "max_steps=1", "batch_size=2", "evaluation_inputs=['What colour?', 'What shape?']",
                 "evaluation_images=['xtune-data/view.png']", "evaluation_max_new_tokens=3"]  # fmt: skip (shipped)
    config, _ = load_config("tiny_llava_finetune_shapes", overrides)
    result = train(config, Console(file=io.StringIO()))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    (evaluation,) = [r["evaluation"] for r in records if "evaluation" in r]
    assert [item["input"] for item in evaluation] == ["What colour?", "What shape?"]
    config.evaluation_images = ["/no/such/image.png"]
    from xtune.errors import ConfigError

    with pytest.raises(ConfigError, match="evaluation_images: '/no/such/image.png' is not a file"):
        train(config, Console(file=io.StringIO()))


def test_qlora_on_the_vision_encoder(images):
    pytest.importorskip("bitsandbytes")
    model = tiny_llava(visual_encoder_lora=True, visual_encoder_lora_r=4, visual_encoder_quantization="4bit")
    assert any(type(m).__name__ == "Linear4bit" for m in model.visual_encoder.modules())
    trained = [n for n, p in model.visual_encoder.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    pixels = model.preprocess(images[:2])
    model.train()
    model.image_features(pixels).float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.visual_encoder.named_parameters() if p.requires_grad}
    first_layer = {n: g for n, g in grads.items() if ".layers.0." in n}  # the last layer is past select_layer -2
    assert first_layer and all(g is not None for g in first_layer.values())
    assert all(g.abs().sum() > 0 for n, g in first_layer.items() if "lora_B" in n)  # lora_A's wait for B to move


def test_dataloader_workers_read_the_images_into_the_same_batches(tokenizer, images):
    from functools import partial

    from xtune.data.loader import collate
    from xtune.engine.distributed import Ranks
    from xtune.engine.train import collated

    preprocess = ImagePreprocessor.from_folder(resolve_model_path("xtune-tiny/clip-vision"), True)
    samples = [encode(conversation(image), TEMPLATE, tokenizer, image_tokens=4) for image in images]
    collate_fn = with_pixel_values(partial(collate, pad_token_id=2), preprocess)
    plan = [(0, [0, 1]), (0, [2, 3]), (1, [3, 0])]
    here = list(collated(samples, plan, collate_fn, Ranks()))
    ahead = list(collated(samples, plan, collate_fn, Ranks(), workers=2))
    assert [(epoch, indices) for epoch, indices, _ in ahead] == plan
    for (_, _, mine), (_, _, theirs) in zip(here, ahead, strict=True):
        assert mine.keys() == theirs.keys() and "pixel_values" in mine
        assert all(torch.equal(mine[key], theirs[key]) for key in mine)


def test_a_whole_part_missing_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from xtune.errors import CheckpointError

    model = tiny_llava(freeze_visual_encoder=False)  # the encoder trains in full: saved whole
    model.save_pretrained(tmp_path)
    fresh = tiny_llava(freeze_visual_encoder=False)
    fresh.load_trained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.visual_encoder.parameters(), model.visual_encoder.parameters()))
    (weights,) = (tmp_path / "visual_encoder").glob("*.safetensors")
    state = load_file(weights)
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=f"visual_encoder lacks \\['{dropped}'\\]"):
        fresh.load_trained(tmp_path)


def test_a_damaged_llava_checkpoint_is_refused_before_loading(tmp_path):
    from xtune.engine.checkpoint import write_manifest
    from xtune.errors import CheckpointError

    model = tiny_llava()
    model.save_pretrained(tmp_path)
    write_manifest(tmp_path)
    assert isinstance(Projector.load(tmp_path), Projector)
    weights = tmp_path / "projector" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        Projector.load(tmp_path)  # chat (load_llava) and stage 2 (pretrained_pth) both read it so
