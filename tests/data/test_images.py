import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionModel

from xtune.data.images import BUILTIN_IMAGES, ImagePreprocessor, background_of, image_path, load_image, pad_to_square
from xtune.errors import DataError, ModelNotFoundError
from xtune.models.load import resolve_model_path
from xtune.testing.tiny import build_tiny_model, tiny_model_path

RED = (255, 0, 0)
CLIP_MEAN_COLOUR = (122, 116, 104)


@pytest.fixture(scope="module")
def clip_vision():
    return resolve_model_path("xtune-tiny/clip-vision")


@pytest.fixture(scope="module")
def preprocessor(clip_vision):
    return ImagePreprocessor.from_folder(clip_vision)


@pytest.fixture
def wide_png(tmp_path):
    path = tmp_path / "wide.png"
    image = Image.new("RGB", (40, 20), RED)
    image.paste((0, 0, 255), (0, 0, 10, 20))  # a blue left edge, which a center crop cuts off
    image.save(path)
    return path


# The tiny vision encoder ----------------------------------------------------------------------------


def test_tiny_clip_vision_loads_with_transformers(clip_vision):
    assert clip_vision == tiny_model_path("clip-vision")
    model = CLIPVisionModel.from_pretrained(clip_vision)
    processor = CLIPImageProcessor.from_pretrained(clip_vision)
    config = model.config
    assert (config.image_size, config.patch_size, config.hidden_size, config.intermediate_size) == (32, 8, 64, 128)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_channels) == (2, 4, 3)
    assert config.projection_dim == 64 and config.model_type == "clip_vision_model"
    assert processor.size == {"shortest_edge": 32} or processor.size.shortest_edge == 32
    assert tuple(processor.image_mean) == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    pixel_values = processor(images=[Image.new("RGB", (50, 30), RED)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = model(pixel_values=pixel_values, output_hidden_states=True)
    assert output.last_hidden_state.shape == (1, 17, 64)  # 16 patches and CLS
    assert torch.isfinite(output.hidden_states[-2]).all()


def test_tiny_clip_vision_tells_colours_apart(clip_vision):
    model = CLIPVisionModel.from_pretrained(clip_vision).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_vision)
    colours = [RED, (0, 160, 0), (0, 0, 255), (250, 5, 5)]
    pixel_values = processor(images=[Image.new("RGB", (32, 32), c) for c in colours], return_tensors="pt")
    with torch.no_grad():
        features = model(**pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:].mean(dim=1)
    distances = torch.cdist(features, features)
    assert distances[0, 3] < distances[0, 1] / 10 and distances[0, 3] < distances[0, 2] / 10


def test_tiny_clip_vision_build_is_deterministic(tmp_path):
    first = build_tiny_model("clip-vision", tmp_path / "first")
    second = build_tiny_model("clip-vision", tmp_path / "second")
    files = ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert sorted(file.name for file in first.iterdir()) == files
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert (first / "preprocessor_config.json").read_text() == (second / "preprocessor_config.json").read_text()
    assert torch.all(a["pre_layrnorm.weight"] == 1) and torch.all(a["encoder.layers.0.mlp.fc1.bias"] == 0)


# Loading and padding ---------------------------------------------------------------------------------


def test_load_image_converts_to_rgb(tmp_path):
    Image.new("L", (8, 4), 200).save(tmp_path / "grey.png")
    Image.new("RGBA", (8, 4), (10, 20, 30, 255)).save(tmp_path / "alpha.png")
    assert load_image(tmp_path / "grey.png").mode == "RGB"
    assert load_image(str(tmp_path / "alpha.png")).getpixel((0, 0)) == (10, 20, 30)


def test_a_missing_image_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="nope.png.*not found"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize("content", [b"not an image at all", b""])
def test_a_corrupt_image_is_a_data_error_naming_it(tmp_path, content):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(DataError, match=r"x\.png is not an image file"):
        load_image(tmp_path / "x.png")


def test_a_truncated_image_is_a_data_error_naming_it(tmp_path):
    Image.new("RGB", (64, 64), RED).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    with pytest.raises(DataError, match="cut.png"):
        load_image(tmp_path / "cut.png")


def test_pad_to_square_centers_a_wide_image_on_the_background():
    padded = pad_to_square(Image.new("RGB", (40, 20), RED), CLIP_MEAN_COLOUR)
    assert padded.size == (40, 40)
    for y in (0, 9, 30, 39):
        assert {padded.getpixel((x, y)) for x in range(40)} == {CLIP_MEAN_COLOUR}
    for y in (10, 29):
        assert {padded.getpixel((x, y)) for x in range(40)} == {RED}


def test_pad_to_square_centers_a_tall_image():
    padded = pad_to_square(Image.new("RGB", (3, 8), RED), (0, 0, 0))
    assert padded.size == (8, 8)
    assert [padded.getpixel((x, 4)) for x in range(8)] == [(0, 0, 0)] * 2 + [RED] * 3 + [(0, 0, 0)] * 3


def test_pad_to_square_keeps_a_square_image():
    image = Image.new("RGB", (5, 5), RED)
    assert pad_to_square(image, (0, 0, 0)) is image


def test_background_is_the_processor_mean_colour(preprocessor):
    assert background_of(preprocessor.processor) == CLIP_MEAN_COLOUR


# Pixel values ----------------------------------------------------------------------------------------


def test_pixel_values_shape_and_dtype(preprocessor, wide_png):
    pixel_values = preprocessor([str(wide_png), wide_png, Image.new("RGB", (32, 32), RED)])
    assert pixel_values.shape == (3, 3, 32, 32) and pixel_values.dtype == torch.float32
    assert torch.equal(pixel_values[0], pixel_values[1])


def test_no_images_give_an_empty_batch_of_the_right_shape(preprocessor):
    assert preprocessor([]).shape == (0, 3, 32, 32)
    assert preprocessor([]).dtype == torch.float32


def test_open_images_and_paths_give_the_same_pixels(preprocessor, wide_png):
    with Image.open(wide_png) as image:
        assert torch.equal(preprocessor([image]), preprocessor([wide_png]))


def test_padding_keeps_the_whole_image(clip_vision, preprocessor, wide_png):
    padding = ImagePreprocessor.from_folder(clip_vision, pad_image_to_square=True)
    cropped, padded = preprocessor([wide_png]), padding([wide_png])
    assert not torch.allclose(cropped, padded)
    # A center crop loses the blue left edge; padding keeps it, and its bands normalize to about zero.
    blue = padded[0, 2, 16, 1] > padded[0, 0, 16, 1]
    assert blue and not cropped[0, 2, 16, 1] > cropped[0, 0, 16, 1]
    assert padded[0, :, 0, :].abs().max() < 0.02 and padded[0, :, -1, :].abs().max() < 0.02


def test_padding_leaves_square_images_alone(clip_vision, preprocessor):
    padding = ImagePreprocessor.from_folder(clip_vision, pad_image_to_square=True)
    image = Image.new("RGB", (48, 48), RED)
    assert torch.equal(padding([image]), preprocessor([image]))


def test_a_bad_image_in_a_batch_names_it(preprocessor, tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="x.png"):
        preprocessor([tmp_path / "x.png"])


def test_siglip_processor_works_through_the_auto_class(tmp_path):
    config = {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": 24, "width": 24},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    preprocessor = ImagePreprocessor.from_folder(tmp_path, pad_image_to_square=True)
    assert background_of(preprocessor.processor) == (127, 127, 127)
    assert preprocessor([Image.new("RGB", (40, 20), RED)]).shape == (1, 3, 24, 24)
    assert preprocessor([]).shape == (0, 3, 24, 24)


def test_a_folder_without_an_image_processor_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="preprocessor_config.json"):
        ImagePreprocessor.from_folder(tmp_path)


def test_a_record_whose_image_is_not_an_image_is_a_bad_record(tmp_path):
    import json

    from xtune.data.sources import SourceSpec, load_sources
    from xtune.errors import DataError

    from PIL import Image

    Image.new("RGB", (4, 4), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    records = [
        {"id": "a", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "red"}]},
        {"id": "b", "image": "broken.png", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "?"}]},
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    spec = SourceSpec(str(data), "llava", image_folder=str(tmp_path))
    with pytest.raises(DataError, match=r"broken.png' of record id 'b' cannot be read as an image"):
        load_sources([spec])
    loaded = load_sources([spec], skip_bad_records=True)
    assert len(loaded.conversations) == 1 and len(loaded.skipped) == 1


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_a_truncated_image_with_a_valid_header_is_a_bad_record_skipped_and_counted(tmp_path, kind):
    import io
    import json
    import random

    from PIL import Image

    from xtune.data.sources import SourceSpec, load_sources
    from xtune.errors import DataError

    noise = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format=kind.upper())
    (tmp_path / f"ok.{kind}").write_bytes(buffer.getvalue())
    (tmp_path / f"cut.{kind}").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with Image.open(tmp_path / f"cut.{kind}") as header_only:
        assert header_only.size == (64, 64)  # the header alone looks fine
    records = [
        {"id": name, "image": f"{name}.{kind}", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "x"}]}
        for name in ("ok", "cut")
    ]  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps(records))
    spec = SourceSpec(str(tmp_path / "data.json"), "llava", image_folder=str(tmp_path))
    with pytest.raises(DataError, match=rf"cut.{kind}' of record id 'cut' cannot be read as an image"):
        load_sources([spec])
    loaded = load_sources([spec], skip_bad_records=True)
    assert len(loaded.conversations) == 1 and len(loaded.skipped) == 1


def test_an_image_over_pillows_pixel_limit_is_a_bad_record_not_a_traceback(tmp_path, monkeypatch):
    import json

    from PIL import Image

    from xtune.data.sources import SourceSpec, load_sources

    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,600 pixels is then a bomb, as 178 Mpx is by default
    record = {"id": "b", "image": "big.png", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "x"}]}
    fine = {**record, "id": "f", "image": "small.png"}
    Image.new("RGB", (5, 5)).save(tmp_path / "small.png")
    (tmp_path / "data.json").write_text(json.dumps([record, fine]))
    loaded = load_sources([SourceSpec(str(tmp_path / "data.json"), "llava", image_folder=str(tmp_path))], skip_bad_records=True)
    assert len(loaded.conversations) == 1 and "too large to decode" in loaded.skipped[0].message


def test_the_shipped_evaluation_image_is_what_the_llava_configs_ask_about(tmp_path):
    from xtune.config.load import load_config

    assert image_path("xtune-data/view.png").is_file() and set(BUILTIN_IMAGES) == {"view.png"}
    assert load_image(image_path("xtune-data/view.png")).size == (336, 336)
    assert image_path(tmp_path / "mine.png") == tmp_path / "mine.png"  # a user's path as it is
    assert image_path("xtune-data/nothing.png") == Path("xtune-data/nothing.png")  # not shipped: a plain path
    for name in ("llava_internlm2_chat_1_8b_clip_vit_large_p14_336_e1_gpu8_pretrain",
                 "llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune"):  # fmt: skip
        assert load_config(name)[0].evaluation_images == ["xtune-data/view.png"]
