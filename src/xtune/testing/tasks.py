"""Synthetic tasks a tiny model learns on a CPU in about a minute, with held-out prompts to score.

`antonyms`: "What is the opposite of hot?" -> "cold". Every word and every phrasing is seen in
training, but the held-out (word, phrasing) pairs never are: the model must learn the mapping from
the word, whatever the phrasing.

`antonym-pairs`: the same questions as preference pairs, the antonym chosen over it shouted ("COLD!").
`antonym-kto`: each of those pairs as two unpaired KTO examples, the antonym desirable, the shout not.
`antonyms-both-styles`: the training questions answered half one way, half the other ("cold", "COLD!"): an SFT
start for DPO that answers held-out prompts in either style.

`colour-choice`: multiple choice, an item's colour ("What colour is a lemon?\nA. red\nB. green\nC. blue\nD. yellow"
-> "D"), asked as `xtune eval` asks MMLU's; `write_choice_task` writes the held-out questions as an MMLU task folder.

`calculator`: tool use. "What is 37 * 41?" -> the assistant calls `calculate` with {"expression": "37 * 41"}, the
tool answers "1517", the assistant answers "1517". `calculator-heldout` asks about (number, operator, number)
triples no training record has: the model must copy the numbers into the call and the tool's result into its
answer, which `calculator_correct` checks. The numbers are chosen so that each copy is token for token (see
`calculator_problems`), which a tiny model learns in a few hundred steps.

`shapes-captions`, `shapes-vqa`: 32x32 drawings of circles, squares and triangles in six colours, for a
tiny LLaVA. The captions ("A red circle.", "Two blue squares.") are LLaVA-Pretrain records, the questions
("What colour is the circle?" -> "red", "How many squares are there?" -> "two") LLaVA-Instruct ones.
`shapes-vqa-heldout` asks the colour of shapes drawn on images no training record shows. The records name
their images by absolute path, in `xtune_home()/tiny-data/shapes-v1/`, so no image_folder is needed.
"""

import functools
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from xtune.errors import XtuneError
from xtune.paths import xtune_home

ANTONYM_PAIRS = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("day", "night"),
    ("open", "closed"), ("happy", "sad"), ("light", "dark"), ("old", "new"), ("early", "late"),
    ("full", "empty"), ("hard", "soft"), ("high", "low"), ("long", "short"), ("rich", "poor"),
    ("strong", "weak"), ("wet", "dry"), ("loud", "quiet"), ("thick", "thin"),
)  # fmt: skip

ANTONYM_PHRASINGS = (
    "What is the opposite of {word}?",
    "Give the antonym of {word}.",
    "Opposite of {word}?",
    "Tell me the opposite of the word {word}.",
    "Which word means the opposite of {word}?",
    "{word}: what is its antonym?",
    'I need the antonym of "{word}".',
    "What word is the reverse of {word}?",
)

HELD_OUT_PER_WORD = 1


def antonym_examples(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held_out) as records of XTuner's `conversation` format."""
    rng = random.Random(seed)
    mapping = {a: b for a, b in ANTONYM_PAIRS} | {b: a for a, b in ANTONYM_PAIRS}
    train, held_out = [], []
    for word, answer in sorted(mapping.items()):
        phrasings = list(ANTONYM_PHRASINGS)
        rng.shuffle(phrasings)
        for index, phrasing in enumerate(phrasings):
            record = {"conversation": [{"input": phrasing.format(word=word), "output": answer}]}
            (held_out if index < HELD_OUT_PER_WORD else train).append(record)
    rng.shuffle(train)
    return train, held_out


def antonym_pairs(records: list[dict]) -> list[dict]:
    """Preference pairs from antonym records: the antonym in lower case chosen over it shouted ("COLD!"), a rule a
    tiny model learns from preferences alone and carries to held-out prompts. (The asked word echoed back is a
    poor rejected answer for a tiny model: each word is the chosen answer of another question, so a preference
    that does not read the question cancels out.)"""
    pairs = []
    for record in records:
        (turn,) = record["conversation"]
        pairs.append({"prompt": turn["input"], "chosen": turn["output"], "rejected": turn["output"].upper() + "!"})
    return pairs


def kto_examples(pairs: list[dict]) -> list[dict]:
    """TRL's unpaired form of preference pairs: {prompt, completion, label}, the chosen answer labelled true and the
    rejected one false, as separate examples."""
    return [{"prompt": pair["prompt"], "completion": pair[key], "label": key == "chosen"}
            for pair in pairs for key in ("chosen", "rejected")]  # fmt: skip


def antonyms_in_both_styles(records: list[dict]) -> list[dict]:
    """SFT records from antonym records, every other one answered as `antonym_pairs` rejects ("COLD!"), the rest
    as it prefers ("cold"): a model trained on them knows the antonyms and answers a prompt in either style,
    which DPO on `antonym-pairs` then has to settle."""
    pairs = antonym_pairs(records)
    return [
        {"conversation": [{"input": pair["prompt"], "output": pair["rejected" if index % 2 else "chosen"]}]}
        for index, pair in enumerate(pairs)
    ]


CALCULATOR_PHRASINGS = (
    "What is {a} {op} {b}?",
    "Calculate {a} {op} {b}.",
    "How much is {a} {op} {b}?",
    "Please work out {a} {op} {b}.",
    "Compute {a} {op} {b}.",
    "Tell me {a} {op} {b}.",
)
CALCULATOR_OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
CALCULATOR_HELDOUT = 40


@dataclass(frozen=True)
class CalculatorQuestion:
    question: str
    expression: str
    answer: str


@functools.cache
def calculator_problems() -> tuple[tuple[int, str, int], ...]:
    """Every (a, op, b) whose copies the tiny tokenizer writes token for token.

    The operands are the two-digit numbers written as two tokens, a digit then the rest, both after a space (in the
    question: " 37" -> "Ġ3" "7") and after a quote (first in the call's JSON: '"37' -> '"' "3" "7"), so a copy
    changes at most the first digit's token, one of nine; a number such as 24 is one token after a space and
    another without, a mapping of its own that no held-out question could be answered by. The results are written
    in two tokens, so the answer copies them position for position. `a - b` has a >= b: no negative results.
    """
    from xtune.testing.tiny import build_tokenizer

    tokenizer = build_tokenizer()

    def pieces(text: str) -> list[str]:
        return tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))

    operands = [
        n for n in range(10, 100) if pieces(f" {n}") == [f"Ġ{str(n)[0]}", str(n)[1]] and pieces(str(n)) == list(str(n))
    ]
    return tuple(
        (a, op, b)
        for op, operation in CALCULATOR_OPERATIONS.items()
        for a in operands
        for b in operands
        if not (op == "-" and a < b) and len(pieces(str(operation(a, b)))) == 2
    )


def calculator_questions(seed: int = 0) -> tuple[list[CalculatorQuestion], list[CalculatorQuestion]]:
    """(train, held_out): every problem of `calculator_problems` once, in a random phrasing; CALCULATOR_HELDOUT
    of them held out."""
    rng = random.Random(seed)
    problems = list(calculator_problems())
    rng.shuffle(problems)
    questions = [
        CalculatorQuestion(
            question=rng.choice(CALCULATOR_PHRASINGS).format(a=a, op=op, b=b),
            expression=f"{a} {op} {b}",
            answer=str(CALCULATOR_OPERATIONS[op](a, b)),
        )
        for a, op, b in problems
    ]
    return questions[CALCULATOR_HELDOUT:], questions[:CALCULATOR_HELDOUT]


def calculator_record(question: CalculatorQuestion) -> dict:
    """An OpenAI-format record: the question, the assistant's call, the tool's result, the answer. It lists no tools,
    which keeps the tiny model's prompts short (listing `calculate` as InternLM2 does takes five times the tokens
    of the rest): the model learns its one tool by heart, and is run offering none (`run_agent(..., tools=())`,
    `xtune chat --with-plugins calculate --no-list-tools`)."""
    arguments = json.dumps({"expression": question.expression})
    call = {"type": "function", "function": {"name": "calculate", "arguments": arguments}}
    return {
        "messages": [
            {"role": "user", "content": question.question},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "calculate", "content": question.answer},
            {"role": "assistant", "content": question.answer},
        ]
    }


def calculator_correct(steps, question: CalculatorQuestion) -> bool:
    """Whether an agent episode (its `AgentStep`s) called `calculate` well (one call, read and run without error)
    and then answered the right number."""
    if len(steps) != 2 or len(steps[0].calls) != 1 or steps[0].calls[0].name != "calculate":
        return False
    if steps[0].results[0].startswith("error:") or not steps[1].is_answer:
        return False
    return steps[1].content.strip().rstrip(".") == question.answer


SHAPES = ("circle", "square", "triangle")
SHAPE_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 20),
}
"""Colour name -> the RGB the shapes are filled with, far apart from each other and from the white background."""
SHAPE_IMAGE_SIZE = 32
SHAPE_SIZES = {1: (10, 20), 2: (10, 14), 3: (10, 12)}
"""Shapes per image -> the range of a shape's side in pixels; smaller when several must fit side by side."""
SHAPE_GAP = 2
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SHAPES_VERSION = 1
"""Bump when the drawings change, so that images written before are not reused."""
SHAPES_TRAIN_IMAGES, SHAPES_CAPTION_IMAGES, SHAPES_HELDOUT_IMAGES = 600, 400, 60
SEVERAL_SHAPES_FRACTION = 0.25

CAPTION_QUESTIONS = (
    "Describe the image.",
    "What is in the picture?",
    "Give a short caption for the image.",
    "What do you see?",
)
COLOUR_QUESTIONS = ("What colour is the {shape}?", "What color is the shape?", "Which colour is the {shape}?")
SEVERAL_COLOUR_QUESTIONS = ("What colour are the {shapes}?", "What color are the shapes?")


@dataclass(frozen=True)
class ShapeScene:
    """One image: shapes of one kind and colour, each in a square box (left, top, side) of the white canvas."""

    shape: str
    colour: str
    boxes: tuple[tuple[int, int, int], ...]

    @property
    def count(self) -> int:
        return len(self.boxes)


def random_scene(rng: random.Random, shape: str, colour: str, count: int) -> ShapeScene:
    """`count` shapes at random places and sizes, wholly inside the image and `SHAPE_GAP` pixels apart."""
    low, high = SHAPE_SIZES[count]
    while True:
        boxes: list[tuple[int, int, int]] = []
        for _ in range(100):
            side = rng.randint(low, high)
            box = (rng.randint(0, SHAPE_IMAGE_SIZE - side), rng.randint(0, SHAPE_IMAGE_SIZE - side), side)
            if all(_apart(box, other) for other in boxes):
                boxes.append(box)
                if len(boxes) == count:
                    return ShapeScene(shape, colour, tuple(boxes))


def _apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (ax, ay, aside), (bx, by, bside) = a, b
    apart_x = ax + aside + SHAPE_GAP <= bx or bx + bside + SHAPE_GAP <= ax
    return apart_x or ay + aside + SHAPE_GAP <= by or by + bside + SHAPE_GAP <= ay


def draw_scene(scene: ShapeScene) -> Image.Image:
    """The scene on a white 32x32 canvas, drawn without antialiasing: every pixel is white or the colour."""
    image = Image.new("RGB", (SHAPE_IMAGE_SIZE, SHAPE_IMAGE_SIZE), "white")
    draw = ImageDraw.Draw(image)
    fill = SHAPE_COLOURS[scene.colour]
    for left, top, side in scene.boxes:
        right, bottom = left + side - 1, top + side - 1
        if scene.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif scene.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:
            draw.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=fill)
    return image


def shape_scenes(seed: int = 0) -> tuple[list[ShapeScene], list[ShapeScene]]:
    """(train, held_out): a quarter of the training images hold two or three shapes; the held-out ones hold
    one shape each, every colour equally often, and none is drawn the same as a training image."""
    rng = random.Random(seed)
    train = []
    for _ in range(SHAPES_TRAIN_IMAGES):
        count = rng.choice((2, 3)) if rng.random() < SEVERAL_SHAPES_FRACTION else 1
        train.append(random_scene(rng, rng.choice(SHAPES), rng.choice(list(SHAPE_COLOURS)), count))
    seen = set(train)
    held_out = []
    colours = list(SHAPE_COLOURS)
    while len(held_out) < SHAPES_HELDOUT_IMAGES:
        index = len(held_out)
        scene = random_scene(rng, SHAPES[index // len(colours) % len(SHAPES)], colours[index % len(colours)], 1)
        if scene not in seen:
            seen.add(scene)
            held_out.append(scene)
    return train, held_out


def caption(scene: ShapeScene) -> str:
    if scene.count == 1:
        return f"A {scene.colour} {scene.shape}."
    return f"{COUNT_WORDS[scene.count].capitalize()} {scene.colour} {scene.shape}s."


def scene_questions(scene: ShapeScene) -> dict[str, list[tuple[str, str]]]:
    """Kind of question ("colour", "shape", "count") -> the (question, one-word answer) pairs the scene answers."""
    shapes = f"{scene.shape}s"
    if scene.count == 1:
        colour = [(question.format(shape=scene.shape), scene.colour) for question in COLOUR_QUESTIONS]
        shape = [("What shape is it?", scene.shape)]
    else:
        colour = [(question.format(shapes=shapes), scene.colour) for question in SEVERAL_COLOUR_QUESTIONS]
        shape = [("What shape are they?", scene.shape)]
    return {"colour": colour, "shape": shape, "count": [(f"How many {shapes} are there?", COUNT_WORDS[scene.count])]}


def _ask(rng: random.Random, scene: ShapeScene) -> list[tuple[str, str]]:
    """One question of any kind, or a colour question and one of another kind in random order."""
    questions = scene_questions(scene)
    if rng.random() < 0.5:
        return [rng.choice(questions[rng.choice(sorted(questions))])]
    pair = [rng.choice(questions["colour"]), rng.choice(questions[rng.choice(("count", "shape"))])]
    rng.shuffle(pair)
    return pair


def _llava_record(record_id: str, image: str, pairs: list[tuple[str, str]]) -> dict:
    conversations = []
    for index, (question, answer) in enumerate(pairs):
        conversations.append({"from": "human", "value": ("<image>\n" if index == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": record_id, "image": image, "conversations": conversations}


def shape_examples(image_folder: Path, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """(captions, vqa, held_out) as LLaVA records naming the images of `write_shape_images(image_folder)`."""
    train, held_out = shape_scenes(seed)
    rng = random.Random(f"{seed}/questions")

    def record(prefix: str, index: int, pairs: list[tuple[str, str]]) -> dict:
        name = f"{prefix}-{index:04d}"
        return _llava_record(f"shapes-{name}", str(image_folder / f"{name}.png"), pairs)

    captions = [
        record("train", index, [(rng.choice(CAPTION_QUESTIONS), caption(scene))])
        for index, scene in enumerate(train[:SHAPES_CAPTION_IMAGES])
    ]
    vqa = [record("train", index, _ask(rng, scene)) for index, scene in enumerate(train)]
    held_out_records = [
        record("heldout", index, [(rng.choice(COLOUR_QUESTIONS).format(shape=scene.shape), scene.colour)])
        for index, scene in enumerate(held_out)
    ]
    return captions, vqa, held_out_records


def write_shape_images(folder: Path, seed: int = 0) -> None:
    """`train-NNNN.png` and `heldout-NNNN.png` for the scenes of `shape_scenes(seed)`."""
    train, held_out = shape_scenes(seed)
    for prefix, scenes in (("train", train), ("heldout", held_out)):
        for index, scene in enumerate(scenes):
            draw_scene(scene).save(folder / f"{prefix}-{index:04d}.png")


def shapes_image_folder() -> Path:
    """`xtune_home()/tiny-data/shapes-v<N>/`, drawn on first use; a folder there is only ever complete."""
    folder = xtune_home() / "tiny-data" / f"shapes-v{SHAPES_VERSION}"
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        write_shape_images(staging)
        staging.chmod(0o755)
        try:
            os.rename(staging, folder)
        except OSError:
            if not folder.is_dir():  # else another process finished it first: the same images
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def shapes_heldout_questions() -> list[tuple[str, str, str]]:
    """(image path, question, answer) of each `shapes-vqa-heldout` record, for scoring."""
    held_out = shape_examples(shapes_image_folder())[2]
    questions = []
    for record in held_out:
        question, answer = (turn["value"] for turn in record["conversations"])
        questions.append((record["image"], question.removeprefix("<image>\n"), answer))
    return questions


CHOICE_OPTIONS = ("red", "green", "blue", "yellow")
CHOICE_ITEMS = {
    "red": ("tomato", "cherry", "strawberry", "ruby", "fire engine"),
    "green": ("grass", "leaf", "frog", "lime", "cucumber"),
    "blue": ("sky", "sea", "sapphire", "blueberry", "ocean"),
    "yellow": ("banana", "lemon", "sunflower", "corn", "canary"),
}
CHOICE_PHRASINGS = (
    "What colour is a {item}?",
    "Which colour is the {item}?",
    "A {item} is usually which colour?",
    "Pick the colour of a {item}.",
    "What is the colour of the {item}?",
    "Name the colour of a {item}.",
    "Tell me the colour of the {item}.",
    "Say which colour a {item} is.",
)
CHOICE_SUBJECT = "colours"
CHOICE_HELDOUT_PER_ITEM = 1


def colour_choice_questions(seed: int = 0) -> tuple[list[tuple], list[tuple]]:
    """(train, held_out) multiple-choice questions (question, (A, B, C, D), answer letter): an item's colour, the
    options red, green, blue, yellow in that order, so the letter follows from the item (locating an answer among
    shuffled options takes a tiny model far more steps). Every item and phrasing is trained on, the held-out (item,
    phrasing) pairs never are, and the answers of those are each letter equally often: a model that always writes
    one letter scores 25%."""
    rng = random.Random(f"{seed}/colour-choice")
    train, held_out = [], []
    for colour, items in CHOICE_ITEMS.items():
        for item in items:
            phrasings = list(CHOICE_PHRASINGS)
            rng.shuffle(phrasings)
            for index, phrasing in enumerate(phrasings):
                question = (phrasing.format(item=item), CHOICE_OPTIONS, "ABCD"[CHOICE_OPTIONS.index(colour)])
                (held_out if index < CHOICE_HELDOUT_PER_ITEM else train).append(question)
    rng.shuffle(train)
    return train, held_out


def write_choice_task(folder: Path, questions: list[tuple], split: str = "test") -> Path:
    """The questions as an MMLU task folder (hendrycks/test's layout): `<split>/colours_<split>.csv`, no header."""
    import csv

    (folder / split).mkdir(parents=True, exist_ok=True)
    with (folder / split / f"{CHOICE_SUBJECT}_{split}.csv").open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([[text, *options, answer] for text, options, answer in questions])
    return folder


def choice_records(questions: list[tuple]) -> list[dict]:
    """Training records: the zero-shot MMLU prompt `xtune eval` asks as the user's turn, the letter as the answer."""
    from xtune.evaluate.prompts import build_prompt
    from xtune.evaluate.tasks import ChoiceTask, Question

    task = ChoiceTask("colour-choice", "mmlu", Path("."), "train", [])
    records = []
    for index, (text, options, answer) in enumerate(questions):
        prompt = build_prompt(Question(CHOICE_SUBJECT, text, options, answer, str(index), ""), task)
        records.append({"conversation": [{"input": prompt, "output": answer}]})
    return records


TINY_DATASETS = {
    "antonyms": lambda: antonym_examples()[0],
    "antonyms-heldout": lambda: antonym_examples()[1],
    "antonym-pairs": lambda: antonym_pairs(antonym_examples()[0]),
    "antonym-pairs-heldout": lambda: antonym_pairs(antonym_examples()[1]),
    "antonym-kto": lambda: kto_examples(antonym_pairs(antonym_examples()[0])),
    "antonyms-both-styles": lambda: antonyms_in_both_styles(antonym_examples()[0]),
    "colour-choice": lambda: choice_records(colour_choice_questions()[0]),
    "calculator": lambda: [calculator_record(q) for q in calculator_questions()[0]],
    "calculator-heldout": lambda: [calculator_record(q) for q in calculator_questions()[1]],
    "shapes-captions": lambda: shape_examples(shapes_image_folder())[0],
    "shapes-vqa": lambda: shape_examples(shapes_image_folder())[1],
    "shapes-vqa-heldout": lambda: shape_examples(shapes_image_folder())[2],
}


def tiny_dataset_path(name: str) -> Path:
    """`xtune_home()/tiny-data/<name>.jsonl`, written on first use."""
    if name not in TINY_DATASETS:
        raise XtuneError(f"unknown tiny dataset 'xtune-tiny/{name}'; known: {', '.join(TINY_DATASETS)}.")
    path = xtune_home() / "tiny-data" / f"{name}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text("".join(json.dumps(r) + "\n" for r in TINY_DATASETS[name]()))
        os.replace(partial, path)
    return path
