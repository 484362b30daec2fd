"""Talk to a model: an interactive streaming REPL, or prompts in and answers out for scripts."""

import json
import sys
from dataclasses import replace
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from transformers import TextStreamer

from xtune.data.formats import IMAGE_PLACEHOLDER, Conversation, Turn, with_system
from xtune.data.templates import SYSTEM_TEMPLATES, ChatTemplate, Template, get_template
from xtune.engine.checkpoint import read_run_meta
from xtune.engine.device import resolve_device, resolve_dtype
from xtune.errors import XtuneError
from xtune.infer.generate import GenerationOptions, generate_replies
from xtune.models.load import load_model, load_tokenizer, resolve_model_path
from xtune.models.lora import attach_adapter

RESET, EXIT = "RESET", "EXIT"


def load_chat_model(
    model: str,
    adapter: str | None = None,
    bits: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
):
    """(model in eval mode, tokenizer). The tokenizer saved with the adapter wins over the base's."""
    torch_device = resolve_device(device)
    base_path = resolve_model_path(model)
    quantization = {4: "4bit", 8: "8bit", None: None}[bits]
    llm = load_model(
        base_path,
        dtype=resolve_dtype(dtype, torch_device),
        quantization=quantization,
        device=torch_device,
        trust_remote_code=trust_remote_code,
    )
    tokenizer_path = base_path
    if adapter is not None:
        adapter_path = Path(adapter)
        llm = attach_adapter(llm, adapter_path, base_path)
        if (adapter_path / "tokenizer_config.json").is_file():
            tokenizer_path = adapter_path
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
    return llm.to(torch_device).eval(), tokenizer


def load_any_chat_model(
    model: str, adapter: str | None, visual_encoder: str | None, llava: str | None, bits: int | None = None,
    device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False, what: str = "chat",
):  # fmt: skip
    """`load_chat_model`, or with `visual_encoder` and `llava` (both or neither) the LLaVA model `load_llava` builds."""
    if (visual_encoder is None) != (llava is None):
        raise XtuneError(f"a LLaVA {what} needs both --visual-encoder and --llava.")
    if llava is not None and adapter is not None:
        raise XtuneError(f"--adapter with --llava: a LLaVA {what} takes its LLM's adapter from the LLaVA folder "
                         "(llm_adapter/); leave --adapter out.")  # fmt: skip
    if llava is None:
        return load_chat_model(model, adapter, bits, device, dtype, trust_remote_code)
    from xtune.models.llava import load_llava

    torch_device = resolve_device(device)
    return load_llava(model, visual_encoder, llava, bits, torch_device, resolve_dtype(dtype, torch_device))


def pick_template(
    prompt_template: str | None, adapter: str | None, model: str | Path | None = None, tokenizer=None
) -> Template:
    """The template named on the command line; else the one recorded with the adapter, or with the model
    folder (merged and converted models carry xtune_run.json); else the tokenizer's own chat_template."""
    name = prompt_template
    for folder in (adapter, model):
        if name is None and folder is not None and Path(folder).is_dir():
            name = read_run_meta(Path(folder)).get("prompt_template")
    if name is None and getattr(tokenizer, "chat_template", None):
        name = "hf"
    if name is None:
        raise XtuneError(
            "no chat template known for this model (none recorded with it, and its tokenizer has no chat_template); "
            "pass --prompt-template (e.g. internlm2_chat)."
        )
    return get_template(name)


def system_prompt(system: str, system_template: str | None) -> str:
    """`--system TEXT` or `--system-template NAME` (XTuner's named system prompts)."""
    if system and system_template:
        raise XtuneError("pass --system or --system-template, not both.")
    if system_template is None:
        return system
    if system_template not in SYSTEM_TEMPLATES:
        raise XtuneError(f"unknown system template {system_template!r}; known: {', '.join(SYSTEM_TEMPLATES)}.")
    return SYSTEM_TEMPLATES[system_template]


def read_prompts(lines: Iterable[str], image: str | None = None) -> list[Conversation]:
    """One prompt per line; a line holding a JSON object with `messages` is a whole conversation (with its own
    `"image"` for a LLaVA model). `image` goes with every conversation that names none."""
    conversations = []
    for number, line in enumerate(lines, start=1):
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.lstrip().startswith("{"):
            conversation, own_image = _messages_to_conversation(text, number)
        else:
            conversation, own_image = Conversation((Turn("user", text),)), None
        conversations.append(with_image(conversation, own_image or image))
    return conversations


def read_input(input: str, image: str | None = None) -> list[Conversation]:
    """`--input`: the prompts (as `read_prompts` reads them) of a file, or of stdin for "-". Stdin is left open: it
    is not ours to close."""
    if input == "-":
        return read_prompts(sys.stdin, image)
    try:
        with open(input, encoding="utf-8") as lines:
            return read_prompts(lines, image)
    except OSError as error:
        raise XtuneError(f"cannot read the prompts file {input}: {error.strerror or error}.") from None


def with_image(conversation: Conversation, image: str | None) -> Conversation:
    """The conversation about `image`: `<image>` put in front of the first user turn unless the text has one."""
    if image is None:
        return conversation
    turns = list(conversation.turns)
    if not any(IMAGE_PLACEHOLDER in turn.content for turn in turns):
        first = next(index for index, turn in enumerate(turns) if turn.role == "user")
        turns[first] = replace(turns[first], content=f"{IMAGE_PLACEHOLDER}\n{turns[first].content}")
    return replace(conversation, turns=tuple(turns), images=(image,))


def _messages_to_conversation(text: str, number: int) -> tuple[Conversation, str | None]:
    try:
        record = json.loads(text)
        turns = tuple(Turn(m["role"], m["content"], m["role"] == "assistant") for m in record["messages"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise XtuneError(f"input line {number}: expected a prompt or {{\"messages\": [...]}}: {error}") from None
    return Conversation(turns), record.get("image")


def answer_all(model, tokenizer, template, conversations: list[Conversation], system: str, options) -> list[str]:
    conversations = [with_system(c, system) for c in conversations]
    return generate_replies(model, tokenizer, template, conversations, options)


def chat_loop(
    title: str,
    answer: Callable[[tuple[Turn, ...], str], tuple[Turn, ...]],
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> None:
    """The interactive loop under `repl` and the agent's: `answer(history, text)` replies to the user's `text`
    and returns the history to keep. RESET clears the history, EXIT (or end of input) quits, Ctrl-C stops the
    answer being written and keeps the history as it was."""
    out = out or sys.stdout
    out.write(f"{title}. {RESET} clears the history, {EXIT} quits.\n")
    history: tuple[Turn, ...] = ()
    while True:
        try:
            text = read("\n>>> ")
        except EOFError:
            return
        if text.strip() == EXIT:
            return
        if text.strip() == RESET:
            history = ()
            out.write("(history cleared)\n")
            continue
        try:
            history = answer(history, text)
        except KeyboardInterrupt:
            out.write("\n(stopped)\n")


def repl(
    model,
    tokenizer,
    template: ChatTemplate,
    system: str,
    options: GenerationOptions,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
    stream: bool = True,
    image: str | None = None,
) -> None:
    """Multi-turn chat with streamed answers; RESET clears the history, EXIT (or end of input) quits,
    Ctrl-C stops the answer being written."""
    out = out or sys.stdout

    def answer(history: tuple[Turn, ...], text: str) -> tuple[Turn, ...]:
        turns = (*history, Turn("user", text))
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        conversation = with_image(with_system(Conversation(turns), system), image)
        (reply,) = generate_replies(model, tokenizer, template, [conversation], options, streamer=streamer)
        if not stream:
            out.write(reply + "\n")
        return (*turns, Turn("assistant", reply, trainable=True))

    chat_loop(f"Chat with {template.name}", answer, read, out)
