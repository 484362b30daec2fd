"""XTuner's dataset map functions by their names: one raw record of a well-known dataset -> a `Conversation`.

XTuner names a map function per dataset (`dataset_map_fn=alpaca_zh_map_fn`, or `alpaca_zh` in its
DATASET_FORMAT_MAPPING); a config here names the same record layout by either spelling, as `dataset_format`.
Each function is written here from the dataset's field layout; those XTuner adds a fixed system prompt to
take xtune's own named system prompts (`SYSTEM_TEMPLATES`). Where xtune already reads a layout (alpaca,
oasst1, openai, llava, msagent_react, text), XTuner's name points at that format.

Where these differ from XTuner: an empty `input` adds no empty line after the instruction (as xtune's alpaca);
consecutive human messages (WizardLM) are joined by a new line, not run together; pretraining text ends with
EOS, as xtune's `text` format does.
"""

from collections.abc import Callable
from typing import Any

from xtune.data.formats import (
    FORMATS, IMAGE_PLACEHOLDER, Conversation, RecordError, Turn, _object, _text, check_conversation,
    sharegpt_to_standard, text_to_standard,
)  # fmt: skip
from xtune.data.templates import SYSTEM_TEMPLATES


def _round(system: str, user: str, output: str, wheres: list[str]) -> Conversation:
    turns = [Turn("system", system)] if system else []
    turns += [Turn("user", user), Turn("assistant", output, trainable=True)]
    return check_conversation(Conversation(tuple(turns)), (["system"] if system else []) + wheres)


def _joined(record: dict, first: str, second: str) -> str:
    """`first`, then `second` on a new line when it is not empty."""
    extra = _text(record, second, required=False)
    return f"{_text(record, first)}\n{extra}" if extra else _text(record, first)


def alpaca_zh_to_standard(record: Any) -> Conversation:
    """silk-road/alpaca-data-gpt4-chinese: {"instruction_zh", "input_zh", "output_zh"} (the English columns are ignored)."""
    record = _object(record)
    return _round("", _joined(record, "instruction_zh", "input_zh"), _text(record, "output_zh"),
                  ["instruction_zh", "output_zh"])  # fmt: skip


def arxiv_to_standard(record: Any) -> Conversation:
    """arXiv metadata (Kaggle's arxiv-metadata-oai-snapshot): {"abstract", "title", ...}: the abstract asks for its
    title, under the `arxiv_gentile` system prompt. The snapshot's line breaks and outer spaces are stripped."""
    record = _object(record)
    abstract, title = _text(record, "abstract").strip(), " ".join(_text(record, "title").split())
    return _round(SYSTEM_TEMPLATES["arxiv_gentile"], abstract, title, ["abstract", "title"])


def code_alpaca_to_standard(record: Any) -> Conversation:
    """HuggingFaceH4/CodeAlpaca_20K: {"prompt", "completion"}, under the `coder` system prompt."""
    record = _object(record)
    return _round(SYSTEM_TEMPLATES["coder"], _text(record, "prompt"), _text(record, "completion"),
                  ["prompt", "completion"])  # fmt: skip


def colors_to_standard(record: Any) -> Conversation:
    """burkelibbey/colors: {"color": "#hex", "description": "Name: how it looks"}: the description after its first
    colon (the color's name is left out, so the model learns from how it looks) asks for the hex code, under the
    `colorist` system prompt. A description without a colon is used whole."""
    record = _object(record)
    name, colon, looks = _text(record, "description").partition(":")
    description = (looks if colon else name).strip()
    if not description:
        raise RecordError("field 'description' has nothing after its color name")
    return _round(SYSTEM_TEMPLATES["colorist"], description, _text(record, "color"), ["description", "color"])


def crime_kg_assistant_to_standard(record: Any) -> Conversation:
    """CrimeKgAssitant (清洗后_52k.json): {"input", "output"}, under the `lawyer` system prompt."""
    record = _object(record)
    return _round(SYSTEM_TEMPLATES["lawyer"], _text(record, "input"), _text(record, "output"), ["input", "output"])


def default_to_standard(record: Any) -> Conversation:
    """XTuner's default: {"input", "output"}, one round, no system prompt."""
    record = _object(record)
    return _round("", _text(record, "input"), _text(record, "output"), ["input", "output"])


def law_reference_to_standard(record: Any) -> Conversation:
    """Legal Q&A with references (训练数据_带法律依据_92k.json): {"question", "answer", "reference"?}, under the
    `lawyer` system prompt; the reference is not shown to the model."""
    record = _object(record)
    return _round(SYSTEM_TEMPLATES["lawyer"], _text(record, "question"), _text(record, "answer"),
                  ["question", "answer"])  # fmt: skip


def medical_to_standard(record: Any) -> Conversation:
    """shibing624/medical (finetune): {"instruction", "input", "output"}, under the `medical` system prompt."""
    record = _object(record)
    return _round(SYSTEM_TEMPLATES["medical"], _joined(record, "instruction", "input"), _text(record, "output"),
                  ["instruction", "output"])  # fmt: skip


def openorca_to_standard(record: Any) -> Conversation:
    """Open-Orca/OpenOrca: {"id", "system_prompt", "question", "response"}; an empty system prompt adds none."""
    record = _object(record)
    return _round(_text(record, "system_prompt", required=False), _text(record, "question"),
                  _text(record, "response"), ["question", "response"])  # fmt: skip


def sql_to_standard(record: Any) -> Conversation:
    """b-mc2/sql-create-context: {"question", "context" (CREATE TABLE ...), "answer"}: the context, then the question
    on a new line, under the `sql` system prompt."""
    record = _object(record)
    return _round(SYSTEM_TEMPLATES["sql"], _joined(record, "context", "question"), _text(record, "answer"),
                  ["context", "answer"])  # fmt: skip


def stack_exchange_to_standard(record: Any) -> Conversation:
    """Stack Exchange instructions (ArmelR/stack-exchange-instruction): {"question", "response"}, no system prompt."""
    record = _object(record)
    return _round("", _text(record, "question"), _text(record, "response"), ["question", "response"])


def tiny_codes_to_standard(record: Any) -> Conversation:
    """nampdn-ai/tiny-codes: {"prompt", "response", ...}, under the `coder` system prompt."""
    record = _object(record)
    return _round(SYSTEM_TEMPLATES["coder"], _text(record, "prompt"), _text(record, "response"),
                  ["prompt", "response"])  # fmt: skip


def _human_gpt_messages(record: dict) -> list[dict]:
    """`conversations` with any leading gpt message dropped and consecutive human messages joined by a new line."""
    messages = record.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise RecordError("field 'conversations' must be a non-empty list of {from, value} objects")
    kept: list[dict] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError(f"'conversations[{index}]' must be an object with from and value")
        sender = _text(message, "from", f"conversations[{index}].")
        if sender not in ("human", "gpt"):
            raise RecordError(f"field 'conversations[{index}].from' must be human or gpt, got {sender!r}")
        value = _text(message, "value", f"conversations[{index}].")
        if sender == "gpt" and not kept:
            continue
        if kept and sender == "human" and kept[-1]["from"] == "human":
            kept[-1] = {"from": "human", "value": f"{kept[-1]['value']}\n{value}"}
        else:
            kept.append({"from": sender, "value": value})
    return kept


def wizardlm_to_standard(record: Any) -> Conversation:
    """WizardLM evol-instruct (WizardLMTeam/WizardLM_evol_instruct_V2_196k): {"idx", "conversations": [{"from":
    human|gpt, "value"}]}; a leading gpt message is dropped, every answer trained."""
    record = _object(record)
    return sharegpt_to_standard({"conversations": _human_gpt_messages(record)})


def llava_image_only_to_standard(record: Any) -> Conversation:
    """LLaVA pretraining captions (liuhaotian/LLaVA-Pretrain): {"image", "conversations": [{"from": human, "value":
    "<image>\\nDescribe ..."}, {"from": gpt, "value": caption}]}: each question is reduced to its `<image>`
    placeholders, so the model learns to caption the image alone."""
    record = _object(record)
    messages = _human_gpt_messages(record)
    for message in messages:
        if message["from"] == "human":
            count = message["value"].count(IMAGE_PLACEHOLDER)
            if not count:
                raise RecordError(f"a human message has no '{IMAGE_PLACEHOLDER}'; llava_image_only reads image captions")
            message["value"] = IMAGE_PLACEHOLDER * count
    return sharegpt_to_standard({"conversations": messages, "image": record.get("image")})


XTUNER_FORMATS: dict[str, Callable[[Any], Conversation]] = {
    "alpaca_zh": alpaca_zh_to_standard,
    "arxiv": arxiv_to_standard,
    "code_alpaca": code_alpaca_to_standard,
    "colors": colors_to_standard,
    "crime_kg_assitant": crime_kg_assistant_to_standard,
    "default": default_to_standard,
    "law_reference": law_reference_to_standard,
    "llava_image_only": llava_image_only_to_standard,
    "medical": medical_to_standard,
    "openorca": openorca_to_standard,
    "pretrain": text_to_standard,
    "sql": sql_to_standard,
    "stack_exchange": stack_exchange_to_standard,
    "tiny_codes": tiny_codes_to_standard,
    "wizardlm": wizardlm_to_standard,
}
"""XTuner's dataset format names that xtune's FORMATS does not have -> map functions (`crime_kg_assitant` keeps
the dataset's own spelling)."""

XTUNER_NAMES = ("alpaca", "alpaca_zh", "arxiv", "code_alpaca", "colors", "crime_kg_assitant", "default", "law_reference",
                "llava_image_only", "llava", "medical", "msagent_react", "oasst1", "openai", "openorca", "pretrain", "sql",
                "stack_exchange", "tiny_codes", "wizardlm")  # fmt: skip
"""Every dataset format XTuner names; `NAME_map_fn` (XTuner's function name) resolves to `NAME`."""

OTHER_SPELLINGS = {"crime_kg_assitan": "crime_kg_assitant", "colorist": "colors"}
"""Other names for a format: XTuner's DATASET_FORMAT_MAPPING key, and the name of colors' system prompt."""

DESCRIPTIONS = {
    "conversation": "XTuner's standard: {conversation: [{system?, input, output}]}",
    "alpaca": "{instruction, input?, output} (tatsu-lab/alpaca; LLaMA-Factory's system and history too)",
    "openai": "{messages: [{role, content}], tools?} (OpenAI chat fine-tuning, tool calls)",
    "sharegpt": "{conversations: [{from: human|gpt|..., value}], system?, tools?}",
    "llava": "ShareGPT with images: {image, conversations} (<image> in the text)",
    "text": "{text}: pretraining, BOS + text + EOS, all trained (.txt files: one per line)",
    "msagent_react": "MSAgent-Bench: {conversations} with <|startofthink|> calls and <|startofexec|> results",
    "oasst1": "timdettmers/openassistant-guanaco: {text: '### Human: ... ### Assistant: ...'}",
    "alpaca_zh": "silk-road/alpaca-data-gpt4-chinese: {instruction_zh, input_zh, output_zh}",
    "arxiv": "arXiv metadata: {abstract} -> {title}, system prompt arxiv_gentile",
    "code_alpaca": "HuggingFaceH4/CodeAlpaca_20K: {prompt, completion}, system prompt coder",
    "colors": "burkelibbey/colors: {description} -> {color}, system prompt colorist",
    "crime_kg_assitant": "CrimeKgAssitant: {input, output}, system prompt lawyer",
    "default": "{input, output}, one round",
    "law_reference": "legal Q&A with references: {question, answer}, system prompt lawyer",
    "llava_image_only": "LLaVA pretraining captions: {image, conversations}, questions reduced to <image>",
    "medical": "shibing624/medical: {instruction, input, output}, system prompt medical",
    "openorca": "Open-Orca/OpenOrca: {system_prompt, question, response}",
    "pretrain": "{text}: pretraining, as text",
    "sql": "b-mc2/sql-create-context: {context, question, answer}, system prompt sql",
    "stack_exchange": "Stack Exchange instructions: {question, response}",
    "tiny_codes": "nampdn-ai/tiny-codes: {prompt, response}, system prompt coder",
    "wizardlm": "WizardLM evol-instruct: {conversations: [{from: human|gpt, value}]}",
}
"""One line per format name, for `xtune list-dataset-format`."""


def format_name(name: str) -> str | None:
    """The name in FORMATS or XTUNER_FORMATS that `name` stands for (itself, `NAME_map_fn`, another spelling), or None."""
    name = OTHER_SPELLINGS.get(name, name)
    stripped = OTHER_SPELLINGS.get(name.removesuffix("_map_fn"), name.removesuffix("_map_fn"))
    if name.endswith("_map_fn") and stripped in XTUNER_NAMES:
        name = stripped
    return name if name in FORMATS or name in XTUNER_FORMATS else None


def builtin_map_function(name: str) -> Callable[[Any], Conversation] | None:
    """The map function of a built-in format name (any spelling `format_name` reads), or None."""
    canonical = format_name(name)
    if canonical is None:
        return None
    return FORMATS.get(canonical) or XTUNER_FORMATS[canonical]
