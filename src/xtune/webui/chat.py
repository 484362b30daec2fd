"""Chat with a checkpoint from the browser: xtune's own loading, template choice and generation (infer/chat.py,
infer/generate.py), the reply streamed as it is written."""

import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from xtune.data.formats import Conversation, Turn, with_system
from xtune.engine.checkpoint import read_run_meta
from xtune.errors import XtuneError
from xtune.infer.chat import load_any_chat_model, pick_template, with_image
from xtune.infer.generate import GenerationOptions, generate_replies
from xtune.models.load import resolve_model_path

MAX_NEW_TOKENS = 4096
"""The longest reply one chat request may ask for: the model is busy for every other chat until it ends."""


@dataclass(frozen=True)
class ChatModel:
    """What to load for a checkpoint: a base with an adapter, a whole model folder, or LLaVA's parts."""

    model: str
    adapter: str | None = None
    visual_encoder: str | None = None
    llava: str | None = None

    @property
    def label(self) -> str:
        return self.llava or self.adapter or self.model


def chat_models(checkpoint: Path) -> tuple[ChatModel, ChatModel | None]:
    """The checkpoint as a ChatModel, and its base model (None when unknown or a LLaVA model) for side by side."""
    meta = read_run_meta(checkpoint)
    base = meta.get("llm_name_or_path")
    if "llava" in meta:
        visual = meta["llava"].get("visual_encoder_name_or_path")
        return ChatModel(base, visual_encoder=visual, llava=str(checkpoint)), None
    if (checkpoint / "adapter_config.json").is_file():
        if base is None:
            import json

            base = json.loads((checkpoint / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base is None:
            raise XtuneError(f"{checkpoint}: an adapter that names no base model.")
        return ChatModel(base, adapter=str(checkpoint)), ChatModel(base)
    if not (checkpoint / "config.json").is_file():
        raise XtuneError(f"{checkpoint}: neither an adapter nor a model folder (no adapter_config.json or config.json).")
    return ChatModel(str(checkpoint)), ChatModel(base) if base else None


class Chats:
    """Loaded models, kept until another is asked for (one at a time beside its base), and one generation at a time."""

    def __init__(self, device: str = "auto", dtype: str = "auto"):
        self.device, self.dtype = device, dtype
        self.loaded: dict[ChatModel, tuple] = {}
        self.lock = threading.Lock()

    def load(self, which: ChatModel, keep: set[ChatModel]):
        if which not in self.loaded:
            for other in [m for m in self.loaded if m not in keep]:
                del self.loaded[other]
            self.loaded[which] = load_any_chat_model(
                which.model, which.adapter, which.visual_encoder, which.llava, None, self.device, self.dtype
            )
        return self.loaded[which]

    def stream(
        self, which: ChatModel, keep: set[ChatModel], history: list[dict], system: str = "",
        prompt_template: str | None = None, image: str | None = None, options: GenerationOptions = GenerationOptions(),
    ) -> Iterator[tuple[str, str]]:  # fmt: skip
        """The reply to the conversation `history` ([{role, content}], ending with the user's turn): ("delta", text)
        as it is written, then ("reply", the whole reply cut at the stop words, as `xtune chat` prints it)."""
        from transformers import TextIteratorStreamer

        stop = threading.Event()
        self.lock.acquire()  # released by the generating thread when it ends, not when this generator is dropped
        try:
            llm, tokenizer = self.load(which, keep)
            template = pick_template(prompt_template or None, which.adapter or which.llava,
                                     resolve_model_path(which.model), tokenizer)  # fmt: skip
            turns = tuple(Turn(m["role"], m["content"], m["role"] == "assistant") for m in history)
            conversation = with_image(with_system(Conversation(turns), system), image)
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
            result: dict = {}

            def run():
                try:
                    result["reply"] = generate_replies(llm, tokenizer, template, [conversation], options,
                                                       streamer=streamer, stop=stop)[0]  # fmt: skip
                except Exception as error:  # shown in the chat, not lost in a thread
                    result["error"] = error
                    streamer.on_finalized_text("", stream_end=True)
                finally:
                    self.lock.release()

            worker = threading.Thread(target=run, daemon=True)
            worker.start()
        except BaseException:
            self.lock.release()
            raise
        try:
            for piece in streamer:
                yield "delta", piece
            worker.join()
        finally:  # also when the browser went away mid-reply (the generator closed): generation ends at its next token
            stop.set()
        if "error" in result:
            raise XtuneError(f"generation failed: {type(result['error']).__name__}: {result['error']}")
        yield "reply", result["reply"]


def template_of(checkpoint: Path) -> str | None:
    return read_run_meta(checkpoint).get("prompt_template")


def options_from(values: dict) -> GenerationOptions:
    try:
        max_new_tokens = int(values.get("max_new_tokens", 128))
        temperature = float(values.get("temperature", 0.0))
    except (TypeError, ValueError) as error:
        raise XtuneError(f"max_new_tokens and temperature are numbers ({error}).") from None
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise XtuneError(f"max_new_tokens = {max_new_tokens}: between 1 and {MAX_NEW_TOKENS}.")
    if temperature < 0:
        raise XtuneError(f"temperature = {temperature}: 0 (greedy) or more.")
    return replace(GenerationOptions(), max_new_tokens=max_new_tokens, temperature=temperature)
