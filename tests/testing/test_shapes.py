import os
from collections import Counter

import pytest
from PIL import Image

from xtune.data.loader import load_conversations
from xtune.testing.tasks import (
    COUNT_WORDS,
    SHAPE_COLOURS,
    SHAPE_IMAGE_SIZE,
    SHAPES,
    shape_scenes,
    shapes_heldout_questions,
    shapes_image_folder,
    tiny_dataset_path,
)

SIZES = {"shapes-captions": 400, "shapes-vqa": 600, "shapes-vqa-heldout": 60}
WHITE = (255, 255, 255)


@pytest.fixture(scope="module")
def datasets():
    return {name: load_conversations(f"xtune-tiny/{name}", "llava") for name in SIZES}


def colours_in(path: str) -> Counter:
    with Image.open(path) as image:
        return Counter({colour: n for n, colour in image.convert("RGB").getcolors() if colour != WHITE})


def count_blobs(path: str) -> int:
    """Shapes in the image: 4-connected regions of non-white pixels."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    size = image.size[0]
    filled = {(x, y) for x in range(size) for y in range(size) if image.getpixel((x, y)) != WHITE}
    blobs = 0
    while filled:
        blobs += 1
        stack = [filled.pop()]
        while stack:
            x, y = stack.pop()
            for neighbour in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if neighbour in filled:
                    filled.remove(neighbour)
                    stack.append(neighbour)
    return blobs


def test_datasets_load_as_llava_with_their_images(datasets):
    for name, conversations in datasets.items():
        assert len(conversations) == SIZES[name], name
        for conversation in conversations:
            assert len(conversation.images) == 1 and os.path.isabs(conversation.images[0])
            assert os.path.isfile(conversation.images[0])
            assert conversation.turns[0].content.startswith("<image>\n")
            assert sum(turn.content.count("<image>") for turn in conversation.turns) == 1


def test_records_are_pretrain_and_instruct_shaped(datasets):
    for conversation in datasets["shapes-captions"]:
        assert [turn.role for turn in conversation.turns] == ["user", "assistant"]
    for conversation in datasets["shapes-vqa"]:
        assert [turn.role for turn in conversation.turns] in (["user", "assistant"], ["user", "assistant"] * 2)
        answers = [turn.content for turn in conversation.turns if turn.role == "assistant"]
        assert all(answer.islower() and " " not in answer for answer in answers)
    assert {len(conversation.turns) for conversation in datasets["shapes-vqa"]} == {2, 4}


def test_images_are_32_pixel_pngs_on_white(datasets):
    for conversation in datasets["shapes-captions"][:50]:
        with Image.open(conversation.images[0]) as image:
            assert (image.format, image.size) == ("PNG", (SHAPE_IMAGE_SIZE, SHAPE_IMAGE_SIZE))
            pixels = {colour: n for n, colour in image.convert("RGB").getcolors()}
        assert pixels[WHITE] > SHAPE_IMAGE_SIZE**2 / 2 and len(pixels) == 2


def test_captions_name_the_colour_shape_and_count_drawn(datasets):
    several = 0
    for conversation in datasets["shapes-captions"]:
        words = conversation.turns[1].content.rstrip(".").lower().split()
        count, colour, shape = words
        count = 1 if count == "a" else {word: n for n, word in COUNT_WORDS.items()}[count]
        assert shape.removesuffix("s") in SHAPES
        assert shape.endswith("s") == (count > 1)
        assert list(colours_in(conversation.images[0])) == [SHAPE_COLOURS[colour]]  # no other colour, no blending
        assert count_blobs(conversation.images[0]) == count
        several += count > 1
    assert 50 < several < 200


def test_answers_match_the_drawing(datasets):
    counts = {word: n for n, word in COUNT_WORDS.items()}
    for conversation in datasets["shapes-vqa"] + datasets["shapes-vqa-heldout"]:
        drawn = colours_in(conversation.images[0]).most_common(1)[0][0]
        answers = [turn.content for turn in conversation.turns if turn.role == "assistant"]
        for answer in answers:
            if answer in SHAPE_COLOURS:
                assert SHAPE_COLOURS[answer] == drawn
            elif answer in counts:
                assert count_blobs(conversation.images[0]) == counts[answer]
            else:
                assert answer in SHAPES


def test_shapes_lie_inside_the_image_at_the_sizes_asked():
    train, held_out = shape_scenes()
    for scene in train + held_out:
        for left, top, side in scene.boxes:
            assert 10 <= side <= 20
            assert left >= 0 and top >= 0 and left + side <= SHAPE_IMAGE_SIZE and top + side <= SHAPE_IMAGE_SIZE
    assert {scene.count for scene in train} == {1, 2, 3} and {scene.count for scene in held_out} == {1}
    assert {(scene.shape, scene.colour) for scene in train if scene.count == 1} == {
        (shape, colour) for shape in SHAPES for colour in SHAPE_COLOURS
    }


def test_held_out_images_are_not_in_training(datasets):
    def pixels(path):
        with Image.open(path) as image:
            return image.convert("RGB").tobytes()

    training = {image for name in ("shapes-captions", "shapes-vqa") for c in datasets[name] for image in c.images}
    held_out = [image for c in datasets["shapes-vqa-heldout"] for image in c.images]
    assert not training & set(held_out)
    assert not {pixels(path) for path in training} & {pixels(path) for path in held_out}
    colours = Counter(c.turns[1].content for c in datasets["shapes-vqa-heldout"])
    assert colours == {colour: 10 for colour in SHAPE_COLOURS}


def test_heldout_questions_are_the_heldout_records(datasets):
    questions = shapes_heldout_questions()
    assert len(questions) == 60
    for (image, question, answer), conversation in zip(questions, datasets["shapes-vqa-heldout"]):
        assert conversation.images == (image,)
        assert conversation.turns[0].content == "<image>\n" + question
        assert conversation.turns[1].content == answer in SHAPE_COLOURS


def test_generation_is_deterministic_and_leaves_nothing_behind(tmp_path, monkeypatch):
    written = []
    for home in ("a", "b"):
        monkeypatch.setenv("XTUNE_HOME", str(tmp_path / home))
        for name in SIZES:
            tiny_dataset_path(name)
        folder = shapes_image_folder()
        images = {path.name: path.read_bytes() for path in sorted(folder.iterdir())}
        records = {name: tiny_dataset_path(name).read_text().replace(str(folder), "IMAGES") for name in SIZES}
        written.append((images, records))
        assert sorted(path.name for path in folder.parent.iterdir()) == sorted(
            [folder.name] + [f"{name}.jsonl" for name in SIZES]
        )
    assert written[0] == written[1]
    assert len(written[0][0]) == 660
