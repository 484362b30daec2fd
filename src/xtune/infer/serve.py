"""An OpenAI-compatible chat server, so that OpenAI clients (the `openai` package, chat UIs, agent
frameworks) can talk to an xtune model: `GET /v1/models` and `POST /v1/chat/completions`, streamed or not.

A reply is the one `xtune chat` gives for the same conversation and options: the same template, prompt
ids, stop words and final strip as `generate.generate_replies`. A streamed reply comes as server-sent
events of `chat.completion.chunk` objects whose text, joined, is the non-streamed reply (see
`streamable_prefix`).

One model is served; a request naming another gets 404 (the name may be left out). Concurrent requests are
generated together by continuous batching (`batching.Batcher`): in float32 a greedy reply is token for token the
one the request gets alone (in bfloat16 a padded row rounds differently, which may flip a near tie).

Tools: a request's `tools` are written by the template's tool format (the agent's: InternLM2's, Qwen's, ...,
ReAct style for a template without one), and the reply's calls are read back by the agent's `parse_reply` into
OpenAI `tool_calls`; `tool` messages and assistant messages with `tool_calls` are the template's tool turns. A
LLaVA model reads `image_url` parts (data URLs; local paths with `allow_local_images`).

What one client can ask of the server is bounded, so that no request can take it down: a request body
over `max_body_bytes` is refused with 413 before it is parsed; `max_tokens` over `max_tokens_limit`, or a
prompt and max_tokens over the model's context, with 400 as OpenAI does (a request's max_tokens is never
lowered silently; the server's default is, to fit the context); and a request arriving while
`max_queued_requests` already wait behind the batch with 503 and `Retry-After`, which OpenAI clients retry by
themselves. Every error, 404 and 405 included, has OpenAI's error body.
"""

import asyncio
import base64
import io
import ipaddress
import json
import logging
import re
import secrets
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from xtune.data.encode import IMAGE_TOKEN_ID, pad_token_id
from xtune.data.formats import IMAGE_PLACEHOLDER, Conversation, RecordError, ToolCall, openai_to_standard, with_system
from xtune.data.images import load_image
from xtune.data.templates import Template, TokenizerTemplate, ToolFormat, with_tool_format
from xtune.errors import DataError, XtuneError
from xtune.infer.agent import parse_reply
from xtune.infer.batching import MAX_BATCH_SIZE, Batcher, Sequence as BatchSequence
from xtune.infer.chat import load_any_chat_model, pick_template
from xtune.infer.generate import GenerationOptions, cut_at_stop_words, generation_kwargs, prompt_ids
from xtune.models.load import resolve_model_path

logger = logging.getLogger(__name__)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
"""Request roles and the conversation roles they become; OpenAI's newer `developer` is a system message."""

MAX_BODY_BYTES = 1 << 20
"""Default limit of a request body: 1 MiB holds a conversation of some 250k words."""
MAX_TOKENS_LIMIT = 4096
"""Default ceiling of a request's max_tokens."""
MAX_QUEUED_REQUESTS = 32
"""Default number of replies that may wait for room in the batch being generated."""
RETRY_AFTER_SECONDS = 1


class ApiError(XtuneError):
    """A request the server refuses, answered with this HTTP status and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.error_type, self.code, self.headers, self.param = status, error_type, code, headers, param

    def body(self) -> dict:
        """OpenAI's error object; `param` names the request field at fault, where there is one."""
        return {"error": {"message": str(self), "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: str
    text: str | None = None
    image_url: ImageUrl | None = None


class Message(BaseModel):
    role: str
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None
    """An earlier answer's reasoning (DeepSeek's and vLLM's name), written as the template writes reasoning."""
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """An earlier answer's calls, OpenAI's [{"id", "type": "function", "function": {"name", "arguments"}}]."""
    tool_call_id: str | None = None
    """A tool message's: the id of the call it answers."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's request body that the server reads; others (logprobs, ...) are ignored."""

    model: str = ""
    """The served model's name; "" (left out) means it too. Any other name is a 404."""
    messages: list[Message]
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens; wins when both are given."""
    temperature: float | None = Field(None, ge=0, le=2)
    """0 is greedy; a positive value below MIN_TEMPERATURE is refused (its scaled scores overflow)."""
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    """OpenAI's seed is a 64-bit integer; choice i of n samples with seed + i."""
    n: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    """"auto" (the default), "none" (the tools are not offered), or {"type": "function", "function": {"name"}}
    (only that tool is offered; the model is not forced to call it). "required" is refused."""
    stream_options: StreamOptions | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM's extension: {"enable_thinking": false} makes a Qwen3-style template answer without reasoning."""


ImageReader = Callable[[str, str], Image.Image]
"""(an image_url part's url, the part's name in the request) -> the image; an ApiError naming the part if it is
refused."""


def request_conversation(
    messages: Sequence[Message], tools: Sequence[dict] = (), read_image: ImageReader | None = None
) -> tuple[Conversation, list[Image.Image]]:
    """The conversation a request's messages hold (an optional system message first, a user or tool message last)
    and the images of its `image_url` parts, each written as `<image>` where it stands.

    The messages are read as a training record in OpenAI's format is, by `openai_to_standard`, with the reply to
    come as its last turn: the same roles, tool calls, tool results and checks of their order. Without
    `read_image` (a text model), an image part is refused.
    """
    if not messages:
        message = "messages is empty: send at least one message, the last one from the user."
        raise ApiError(400, message, param="messages")
    records, images = [], []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = ROLES.get(message.role)
        if role is None:
            raise ApiError(400, f"{where}: role {message.role!r} is not supported; use system, user, assistant or "
                           "tool.", param=f"{where}.role")  # fmt: skip
        if role == "system" and index > 0:
            raise ApiError(400, f"{where}: a system message may only come first.", param=f"{where}.role")
        record = {"role": role, "content": _content_text(message.content, where, images, read_image, role)}
        if role == "assistant":
            record.update(tool_calls=message.tool_calls, reasoning_content=message.reasoning_content)
        if role == "tool":
            record.update(tool_call_id=message.tool_call_id, name=message.name)
        records.append({key: value for key, value in record.items() if value is not None})
    if records[-1]["role"] not in ("user", "tool"):
        last = len(records) - 1
        raise ApiError(
            400,
            f"messages[{last}]: the last message must be from the user or a tool, not the {records[-1]['role']}; "
            "the model answers the user's last message (or the tools' results).",
            param=f"messages[{last}].role",
        )
    record = {"messages": [*records, {"role": "assistant", "content": ""}], "tools": list(tools) or None}
    try:
        conversation = openai_to_standard(record)
    except RecordError as error:
        named = re.search(r"'((?:messages|tools)\[\d+\][^' ]*)'", str(error))
        param = named.group(1) if named else "messages"
        raise ApiError(400, f"{error}.", param=param) from None
    return replace(conversation, turns=conversation.turns[:-1]), images


MIN_TEMPERATURE = 1e-3
MAX_STOP_WORDS, MAX_STOP_CHARS = 4, 256
"""OpenAI's limit on stop sequences; each one is also matched against the tokenizer's whole vocabulary, so 1,000
of them held the model lock for minutes and their matching tables stayed in memory."""
MAX_CHOICES = 8
"""The most choices (`n`) one request may ask for."""
MAX_IMAGES = 8
"""Images in one request: each is decoded and run through the vision encoder before the reply starts."""
MAX_IMAGE_PIXELS = 4096 * 4096
"""Pixels in one image, checked on its header before decoding (Pillow's own guard stops only at 179M)."""


def _content_text(
    content: str | list[ContentPart] | None,
    where: str,
    images: list[Image.Image],
    read_image: ImageReader | None,
    role: str,
) -> str | None:
    """A message's text; the parts of a list are joined by newlines, as vLLM does, an image part as `<image>`."""
    if content is None:
        if role == "assistant":  # its tool_calls say what it did; openai_to_standard checks that it has some
            return None
        raise ApiError(400, f"{where}: content is missing; send the message's text.", param=f"{where}.content")
    if isinstance(content, str):
        return _unicode(content, f"{where}.content")
    texts = []
    for index, part in enumerate(content):
        name = f"{where}.content[{index}]"
        if part.type == "text" and part.text is not None:
            texts.append(_unicode(part.text, f"{name}.text"))
        elif part.type == "image_url" and role == "user":
            if read_image is None:
                raise ApiError(400, f"{name}: this model takes no images; image_url parts need a LLaVA model.",
                               param=f"{name}.type")  # fmt: skip
            if part.image_url is None:
                raise ApiError(400, f"{name}: an image_url part needs \"image_url\": {{\"url\": ...}}.",
                               param=f"{name}.image_url")  # fmt: skip
            if len(images) == MAX_IMAGES:
                raise ApiError(400, f"{name}: at most {MAX_IMAGES} images per request.", param=name)
            images.append(read_image(part.image_url.url, f"{name}.image_url"))
            texts.append(IMAGE_PLACEHOLDER)
        else:
            supported = "text and (in user messages, for a LLaVA model) image_url" if role == "user" else "text"
            raise ApiError(400, f"{name}: a {part.type!r} part is not supported here; only {supported} parts are.",
                           param=f"{name}.type")  # fmt: skip
    return "\n".join(texts)


def local_image_reader(allowed: Path | None) -> ImageReader:
    """Reads an image_url: a data URL (`data:image/png;base64,...`), or with `allowed` a path (or file:// URL) of
    an image inside that folder. The server fetches nothing from the network."""

    def read(url: str, param: str) -> Image.Image:
        if url.startswith("data:"):
            header, comma, data = url.partition(",")
            if not comma or not header.endswith(";base64"):
                raise ApiError(400, f"{param}: a data URL must be data:image/...;base64,<data>.", param=param)
            try:
                raw = base64.b64decode(data, validate=True)
                with Image.open(io.BytesIO(raw)) as image:
                    return _small_enough(image, param).convert("RGB")
            except (ValueError, OSError, Image.DecompressionBombError) as error:
                raise ApiError(400, f"{param}: the data URL is not an image Pillow can read ({error}).",
                               param=param) from None  # fmt: skip
        if "://" in url and not url.startswith("file://"):
            raise ApiError(400, f"{param}: this server fetches no URLs; send the image as a data URL "
                           "(data:image/png;base64,...).", param=param)  # fmt: skip
        if allowed is None:
            raise ApiError(400, f"{param}: a local image path needs the server started with --allow-local-images "
                           "DIR; send the image as a data URL instead.", param=param)  # fmt: skip
        path = Path(url.removeprefix("file://")).resolve()
        if not path.is_relative_to(allowed.resolve()):
            raise ApiError(400, f"{param}: {url} is outside the folder this server reads images from.", param=param)
        try:
            with Image.open(path) as image:
                _small_enough(image, param)
            return load_image(path)
        except (DataError, OSError, Image.DecompressionBombError) as error:
            raise ApiError(400, f"{param}: {error}.", param=param) from None

    return read


def _small_enough(image: Image.Image, param: str) -> Image.Image:
    """An image of at most MAX_IMAGE_PIXELS, checked on its header before its pixels are decoded (a small PNG can
    hold a huge, uniform image: 23 KB for 432 MB of RGB)."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ApiError(400, f"{param}: a {width}x{height} image has more than {MAX_IMAGE_PIXELS:,} pixels; send a "
                       "smaller one (the vision encoder resizes it to a few hundred pixels a side anyway).", param=param)  # fmt: skip
    return image


def _unicode(text: str, param: str) -> str:
    """JSON's \\ud800 escapes decode to lone surrogates, which are no Unicode text and no tokenizer reads."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ApiError(
            400, f"{param}: character {error.start} is a lone surrogate ({text[error.start]!r}), not Unicode text; "
            "send valid UTF-8.", param=param,
        ) from None  # fmt: skip
    return text


def asked_max_tokens(request: ChatCompletionRequest) -> tuple[str, int] | None:
    """The field that sets the reply's length and its value, if the request sets one: max_completion_tokens
    wins over max_tokens."""
    if request.max_completion_tokens is not None:
        return "max_completion_tokens", request.max_completion_tokens
    if request.max_tokens is not None:
        return "max_tokens", request.max_tokens
    return None


def requested_stops(request: ChatCompletionRequest) -> list[str]:
    """The request's `stop`, one string or a list of them, as a list."""
    return [request.stop] if isinstance(request.stop, str) else request.stop or []


def request_options(request: ChatCompletionRequest, defaults: GenerationOptions) -> GenerationOptions:
    """The server's options with the request's max tokens, temperature, top_p and extra stop words."""
    stop = requested_stops(request)
    asked = asked_max_tokens(request)
    return replace(
        defaults,
        max_new_tokens=defaults.max_new_tokens if asked is None else asked[1],
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        stop_words=(*defaults.stop_words, *(word for word in stop if word)),
    )


def streamable_prefix(text: str, stop_words: Sequence[str], clean_up_spaces: bool = False) -> str:
    """The start of a partly generated reply that later tokens cannot change, so it is safe to send.

    The finished reply is the decoded text cut at its first stop word and stripped. So the prefix ends
    before any stop word and before a tail that may begin one (a stop word is never sent), before an
    unfinished UTF-8 character (decoded as U+FFFD), and has no whitespace at either end (trailing
    whitespace goes out with the next visible character). Tokenizers that clean up spaces ("it 's" ->
    "it's") may still change the text from the last space on, so that part waits when `clean_up_spaces`.
    Decoding the ids generated so far is otherwise assumed to give a prefix of decoding them all, as
    byte-level BPE and SentencePiece tokenizers do.
    """
    end = len(text)
    for word in filter(None, stop_words):
        found = text.find(word)
        if found != -1:
            end = min(end, found)
        for size in range(min(len(word) - 1, len(text)), 0, -1):
            if text.endswith(word[:size]):
                end = min(end, len(text) - size)
                break
    prefix = text[:end].rstrip("\ufffd")
    if clean_up_spaces and " " in prefix:
        prefix = prefix[: prefix.rfind(" ")]
    return prefix.strip()


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str
    """"length", when the reply ran to max tokens without a stop word or stop token; "tool_calls", when it calls
    tools; else "stop"."""
    prompt_tokens: int
    completion_tokens: int
    tool_calls: tuple[ToolCall, ...] = ()

    def usage(self) -> dict:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}

    def message(self) -> dict:
        """The reply as OpenAI's assistant message: content null when it only calls tools."""
        content = self.text if self.text or not self.tool_calls else None
        message = {"role": "assistant", "content": content}
        if self.tool_calls:
            message["tool_calls"] = [_openai_call(call) for call in self.tool_calls]
        return message


def _openai_call(call: ToolCall, index: int | None = None) -> dict:
    entry = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return entry if index is None else {"index": index, **entry}


class Generation:
    """One reply to `prompt` (token ids), generated by the server's `Batcher` among the others it is generating.

    The batcher calls `token` with each new token and `end` once, from its thread; they hand the results to the
    event loop through an asyncio queue: pieces of text as tokens come (when `stream`), then the `Reply`. The ids
    so far are decoded whole each time (quadratic in the reply's length, but decoding is cheap next to a forward
    pass), and `streamable_prefix` says what may be sent. With `tool_format` (the request offers tools), the reply
    is decoded with its special tokens (InternLM2 writes calls with them), its calls are read by the agent's
    `parse_reply`, and nothing is streamed before the end, since any text may turn out to be a call. `cancel` (the
    client went away) stops generating at the next token. `on_finish` is called when it ends, whatever the outcome.
    """

    def __init__(
        self,
        tokenizer,
        template: Template,
        prompt: list[int],
        options: GenerationOptions,
        seed: int | None = None,
        stream: bool = False,
        tool_format: ToolFormat | None = None,
        pixel_values: torch.Tensor | None = None,
        on_finish: Callable[[], None] | None = None,
    ):
        self.tokenizer, self.options, self.prompt, self.tool_format = tokenizer, options, prompt, tool_format
        self.stream, self.on_finish = stream and tool_format is None, on_finish
        kwargs = generation_kwargs(template, tokenizer, options)
        self.stop_ids = frozenset(kwargs["eos_token_id"])
        self.stop_words = (*template.stop_words, *options.stop_words)
        if options.keep_special_tokens:
            self.stop_words += tuple({tokenizer.eos_token, tokenizer.pad_token} - {None, ""})
        self.clean_up_spaces = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.sequence = BatchSequence(prompt, options.max_new_tokens, self.stop_ids, self, options, seed, pixel_values)
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sent, self.ended = "", False
        self.reply: Reply | None = None

    def cancel(self) -> None:
        self.sequence.cancelled.set()

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text in pieces as it is generated (all of it at the end unless `stream`); then `reply` is set."""
        while True:
            kind, value = await self.queue.get()
            if kind == "error":
                raise value
            if kind == "reply":
                self.reply = value
                return
            yield value

    async def result(self) -> Reply:
        async for _ in self.pieces():
            pass
        assert self.reply is not None
        return self.reply

    def _send(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: the server is shutting down
            self.cancel()

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.sequence.generated, skip_special_tokens=not self.options.keep_special_tokens)

    def token(self, token_id: int) -> bool:
        if token_id in self.stop_ids:
            return True
        decoded = self._decoded()
        if any(word and word in decoded for word in self.stop_words):
            return True
        if self.stream:
            text = streamable_prefix(decoded, self.stop_words, self.clean_up_spaces)
            if len(text) > len(self.sent) and text.startswith(self.sent):
                self._send("text", text[len(self.sent) :])
                self.sent = text
        return False

    def end(self, error: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        try:
            if error is not None:
                self._send("error", error)
            else:
                self._send("reply", self._reply())
        except Exception as failure:
            self._send("error", failure)
        finally:
            if self.on_finish is not None:
                self.on_finish()

    def _reply(self) -> Reply:
        generated = self.sequence.generated
        decoded = self._decoded()
        before_stop = cut_at_stop_words(decoded, self.stop_words)
        text = before_stop.strip()
        calls: tuple[ToolCall, ...] = ()
        if self.tool_format is not None:
            parsed = parse_reply(text, self.tool_format)
            if parsed.error is None and parsed.calls:  # a call that cannot be read is answered as the text it is
                text = parsed.content
                calls = tuple(replace(call, id=call.id or f"call_{uuid.uuid4().hex[:24]}") for call in parsed.calls)
        if text.startswith(self.sent):
            if len(text) > len(self.sent):
                self._send("text", text[len(self.sent) :])
        else:
            logger.warning("the streamed text %r is not the start of the reply %r", self.sent, text)
        stopped = len(before_stop) < len(decoded) or bool(generated and generated[-1] in self.stop_ids)
        ran_out = len(generated) >= self.options.max_new_tokens and not stopped
        finish = "tool_calls" if calls else "length" if ran_out else "stop"
        return Reply(text, finish, len(self.prompt), len(generated), calls)


def build_app(
    model,
    tokenizer,
    template: Template,
    model_name: str,
    api_key: str | None = None,
    system: str = "",
    defaults: GenerationOptions = GenerationOptions(),
    *,
    max_body_bytes: int | None = MAX_BODY_BYTES,
    max_tokens_limit: int = MAX_TOKENS_LIMIT,
    max_queued_requests: int | None = MAX_QUEUED_REQUESTS,
    max_context_tokens: int | None = None,
    max_batch_size: int = MAX_BATCH_SIZE,
    allow_local_images: str | Path | None = None,
) -> FastAPI:
    """The OpenAI-compatible app for one model.

    `system` is put in front of conversations that bring no system message. `defaults` gives the options a
    request does not set (OpenAI clients send temperature only when the user sets it). With `api_key`, each
    request must carry `Authorization: Bearer <api_key>` or is answered 401. `model_name` is what `/v1/models`
    lists and every reply reports; a request naming another model gets 404.

    Replies are generated together by one `Batcher`, up to `max_batch_size` at a time (each choice of a request is
    one). A LLaVA model (one with `image_tokens` and `preprocess`) reads image_url parts: data URLs, and with
    `allow_local_images` paths of images inside that folder.

    Limits (None: none): a body over `max_body_bytes` gets 413; `max_tokens` (or `max_completion_tokens`)
    over `max_tokens_limit` gets 400; a prompt plus max_tokens over `max_context_tokens` (default: the
    model's `max_position_embeddings`) gets 400, and when the request sets no max_tokens the default is
    lowered to fit; a request arriving while `max_queued_requests` wait behind the `max_batch_size` generating
    gets 503.
    """
    if defaults.max_new_tokens > max_tokens_limit:
        raise XtuneError(
            f"the default max_new_tokens ({defaults.max_new_tokens}) is above max_tokens_limit ({max_tokens_limit}); "
            "raise the limit or lower the default."
        )
    if max_tokens_limit < 1 or (max_body_bytes is not None and max_body_bytes < 1):
        raise XtuneError(f"max_tokens_limit and max_body_bytes must be >= 1, got {max_tokens_limit}, {max_body_bytes}.")
    if max_queued_requests is not None and max_queued_requests < 0:
        raise XtuneError(f"max_queued_requests must be >= 0 (or None: no limit), got {max_queued_requests}.")
    if max_batch_size < 1:
        raise XtuneError(f"max_batch_size must be >= 1, got {max_batch_size}.")
    if api_key is not None and not api_key.strip():
        raise XtuneError("--api-key is empty, which any client could send; give a key, or none to serve without one.")
    if allow_local_images is not None and not Path(allow_local_images).is_dir():
        raise XtuneError(f"--allow-local-images {allow_local_images}: no such folder.")
    if max_context_tokens is None:
        max_context_tokens = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    image_tokens = getattr(model, "image_tokens", 0)
    read_image = local_image_reader(None if allow_local_images is None else Path(allow_local_images))
    batcher = Batcher(model, pad_token_id(tokenizer), max_batch_size)
    # a place for each reply generating and each one waiting: taken before tokenizing, given back when it ends
    places = None if max_queued_requests is None else max_batch_size + max_queued_requests
    admitted = None if places is None else threading.BoundedSemaphore(places)
    created = int(time.time())

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), api_key.encode()):
            message = "Incorrect or missing API key: send the server's key as 'Authorization: Bearer <key>'."
            raise ApiError(401, message, code="invalid_api_key")

    documented = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title=f"xtune: {model_name}", dependencies=[Depends(check_api_key)], **documented)
    app.add_exception_handler(ApiError, lambda request, error: error.response())
    app.add_exception_handler(RequestValidationError, _invalid_request_body)
    app.add_exception_handler(HTTPException, _http_error)
    if max_body_bytes is not None:
        app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.get("/v1/models")
    async def list_models() -> dict:
        entry = {"id": model_name, "object": "model", "created": created, "owned_by": "xtune"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, http: Request):
        if request.model not in ("", model_name):
            raise ApiError(404, f"The model '{request.model}' does not exist; this server serves '{model_name}'.",
                           code="model_not_found", param="model")  # fmt: skip
        choices = request.n or 1
        if choices > MAX_CHOICES:
            raise ApiError(400, f"n={choices}: at most {MAX_CHOICES} choices per request.", param="n")
        _check_sampling(request, max_tokens_limit)
        tools, tool_template = _offered_tools(request, template)
        reader = read_image if image_tokens else None  # images are decoded off the event loop: other streams go on
        conversation, images = await asyncio.to_thread(request_conversation, request.messages, tools, reader)
        conversation = replace(with_system(conversation, system), enable_thinking=_thinking(request))
        if admitted is not None and not _take(admitted, choices):
            raise ApiError(
                503,
                f"server busy: {max_batch_size} replies are being generated and {max_queued_requests} more wait (the "
                "server's limit); retry shortly.",
                error_type="server_error",
                code="server_busy",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        release = admitted.release if admitted is not None else None
        started = 0
        try:
            prompt = await asyncio.to_thread(prompt_ids, conversation, tool_template, tokenizer, image_tokens)
            if image_tokens and prompt.count(IMAGE_TOKEN_ID) != len(images) * image_tokens:
                raise ApiError(400, f"the messages hold {prompt.count(IMAGE_TOKEN_ID) // image_tokens} "
                               f"'{IMAGE_PLACEHOLDER}' but {len(images)} image(s); leave '{IMAGE_PLACEHOLDER}' out of "
                               "the text: each image_url part stands where it is.", param="messages")  # fmt: skip
            pixel_values = await asyncio.to_thread(model.preprocess, images) if images else None
            options = _fit_context(len(prompt), request_options(request, defaults), asked_max_tokens(request),
                                   max_context_tokens)  # fmt: skip
            tool_format = tool_template.tools if tools else None
            if tool_format is not None:
                options = replace(options, stop_words=(*options.stop_words, *tool_format.stop_words),
                                  keep_special_tokens=True)  # fmt: skip
            generations = []
            for index in range(choices):
                seed = None if request.seed is None else request.seed + index
                generations.append(Generation(tokenizer, tool_template, prompt, options, seed, request.stream,
                                              tool_format, pixel_values, on_finish=release))  # fmt: skip
            # submitted here, not when the stream is first read, so that each one ends and gives back its place
            for generation in generations:
                batcher.submit(generation.sequence)
                started += 1
        except BaseException:  # a bad request, or the client went away while it was tokenized
            for _ in range(choices - started):
                if release is not None:
                    release()
            raise
        completion = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return StreamingResponse(_events(generations, completion, include_usage), media_type="text/event-stream")
        try:
            replies = await _results_while_connected(generations, http)
        except Exception as error:
            logger.exception("generation failed")
            raise ApiError(500, f"generation failed: {error}", error_type="server_error") from error
        finally:
            for generation in generations:
                generation.cancel()
        answers = [{"index": index, "message": reply.message(), "logprobs": None, "finish_reason": reply.finish_reason}
                   for index, reply in enumerate(replies)]  # fmt: skip
        usage = {**replies[0].usage(), "completion_tokens": sum(reply.completion_tokens for reply in replies)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {**completion, "object": "chat.completion", "choices": answers, "usage": usage}

    return app


def _take(places: threading.BoundedSemaphore, count: int) -> bool:
    """`count` places, or none of them."""
    taken = 0
    while taken < count and places.acquire(blocking=False):
        taken += 1
    if taken < count:
        for _ in range(taken):
            places.release()
        return False
    return True


def _check_sampling(request: ChatCompletionRequest, max_tokens_limit: int) -> None:
    stop = requested_stops(request)
    if len(stop) > MAX_STOP_WORDS or any(len(word) > MAX_STOP_CHARS for word in stop):
        message = (f"stop: at most {MAX_STOP_WORDS} stop sequences of at most {MAX_STOP_CHARS} characters each, "
                   f"got {len(stop)} (longest {max(map(len, stop))} characters).")  # fmt: skip
        raise ApiError(400, message, param="stop")
    if request.temperature is not None and 0 < request.temperature < MIN_TEMPERATURE:
        message = f"temperature={request.temperature}: use 0 (greedy) or a value from {MIN_TEMPERATURE} to 2."
        raise ApiError(400, message, param="temperature")
    asked = asked_max_tokens(request)
    if asked is not None and asked[1] > max_tokens_limit:
        raise ApiError(
            400,
            f"{asked[0]}={asked[1]} is above this server's limit of {max_tokens_limit} tokens; "
            f"ask for at most {max_tokens_limit}.",
            param=asked[0],
        )


def _thinking(request: ChatCompletionRequest) -> bool | None:
    kwargs = request.chat_template_kwargs or {}
    if set(kwargs) - {"enable_thinking"}:
        unknown = ", ".join(sorted(set(kwargs) - {"enable_thinking"}))
        raise ApiError(400, f"chat_template_kwargs: {unknown} not supported; only enable_thinking is.",
                       param="chat_template_kwargs")  # fmt: skip
    thinking = kwargs.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise ApiError(400, f"chat_template_kwargs.enable_thinking must be true or false, got {thinking!r}.",
                       param="chat_template_kwargs.enable_thinking")  # fmt: skip
    return thinking


def _offered_tools(request: ChatCompletionRequest, template: Template) -> tuple[list[dict], Template]:
    """(the tools offered to the model, as `tool_choice` says; the template that writes them and the conversation's
    tool turns). A template without a tool format of its own writes them in ReAct style, as the agent's does."""
    tools, choice = list(request.tools or ()), request.tool_choice
    if choice == "none":
        tools = []
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        offered = [tool for tool in tools if (tool.get("function") or tool).get("name") == name]
        if not offered:
            raise ApiError(400, f"tool_choice names function {name!r}, which is not among the tools.",
                           param="tool_choice")  # fmt: skip
        tools = offered
    elif choice not in (None, "auto"):
        raise ApiError(400, f"tool_choice {choice!r} is not supported; use 'auto', 'none' or a function "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}} (offered alone, not forced).",
                       param="tool_choice")  # fmt: skip
    uses_tools = bool(tools) or any(message.role == "tool" or message.tool_calls for message in request.messages)
    if not uses_tools or isinstance(template, TokenizerTemplate):
        if tools and isinstance(template, TokenizerTemplate):
            raise ApiError(400, "tools: this server's template is the tokenizer's chat_template ('hf'), whose tool "
                           "calls xtune cannot read; start it with --prompt-template NAME (e.g. qwen_chat).",
                           param="tools")  # fmt: skip
        return tools, template
    return tools, template if template.tools is not None else with_tool_format(template, "react")


DISCONNECT_POLL_S = 0.25


async def _results_while_connected(generations: list[Generation], http: Request) -> list[Reply]:
    """The generations' replies; a client that goes away meanwhile cancels them, so that the batch goes on without
    them (a disconnected client kept the model busy to the end: the next request waited 110 s)."""
    results = asyncio.ensure_future(asyncio.gather(*(generation.result() for generation in generations)))
    while not results.done():
        await asyncio.wait({results}, timeout=DISCONNECT_POLL_S)
        if not results.done() and await http.is_disconnected():
            for generation in generations:
                generation.cancel()
            logger.info("the client went away; its generation is cancelled")
    return results.result()


def _fit_context(
    prompt_tokens: int, options: GenerationOptions, asked: tuple[str, int] | None, context: int | None
) -> GenerationOptions:
    """The options, if the prompt and the reply fit in `context` tokens; a default max_new_tokens is lowered to fit."""
    if context is None or prompt_tokens + options.max_new_tokens <= context:
        return options
    room = context - prompt_tokens
    if room < 1:
        raise ApiError(
            400,
            f"the prompt is {prompt_tokens} tokens, which leaves no room for a reply in the model's context of "
            f"{context} tokens; send a shorter conversation.",
            code="context_length_exceeded",
            param="messages",
        )
    if asked is not None:
        raise ApiError(
            400,
            f"the prompt ({prompt_tokens} tokens) plus {asked[0]}={asked[1]} exceed the model's context of "
            f"{context} tokens; ask for at most {room}, or send a shorter conversation.",
            code="context_length_exceeded",
            param=asked[0],
        )
    return replace(options, max_new_tokens=room)


async def _events(generations: list[Generation], completion: dict, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: per choice the role, the text in pieces, its tool calls, its finish reason; then the
    usage if asked, and [DONE]. The choices' events interleave as their tokens come."""

    def chunk(index: int, delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _event({**completion, "object": "chat.completion.chunk", "choices": [choice]})

    merged: asyncio.Queue = asyncio.Queue()

    async def forward(index: int, generation: Generation) -> None:
        try:
            async for piece in generation.pieces():
                await merged.put((index, "text", piece))
            await merged.put((index, "reply", generation.reply))
        except Exception as error:
            await merged.put((index, "error", error))

    tasks = [asyncio.ensure_future(forward(index, generation)) for index, generation in enumerate(generations)]
    try:
        for index in range(len(generations)):
            yield chunk(index, {"role": "assistant", "content": ""})
        replies: list[Reply] = []
        while len(replies) < len(generations):
            index, kind, value = await merged.get()
            if kind == "error":
                raise value
            if kind == "text":
                yield chunk(index, {"content": value})
                continue
            replies.append(value)
            if value.tool_calls:
                calls = [_openai_call(call, position) for position, call in enumerate(value.tool_calls)]
                yield chunk(index, {"tool_calls": calls})
            yield chunk(index, {}, value.finish_reason)
        if include_usage:
            usage = {**replies[0].usage(), "completion_tokens": sum(reply.completion_tokens for reply in replies)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield _event({**completion, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    except Exception as error:  # the status line has gone out: the error goes in the stream, as OpenAI's does
        logger.exception("generation failed")
        yield _event(ApiError(500, f"generation failed: {error}", error_type="server_error").body())
    finally:
        for generation in generations:
            generation.cancel()
        for task in tasks:
            task.cancel()


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class BodyLimit:
    """ASGI middleware that refuses a request body over `max_bytes` with 413, before the app reads any of it.

    A declared Content-Length over the limit is refused at once; a chunked body is read up to the limit and
    refused when it goes over. A body within the limit is handed on whole.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send, f"{int(length)} bytes")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, f"more than {self.max_bytes} bytes")
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body, only http.disconnect comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        message = f"the request body ({size}) is over this server's limit of {self.max_bytes} bytes; send less."
        await ApiError(413, message, code="request_too_large").response()(scope, receive, send)


async def _invalid_request_body(request: Request, error: RequestValidationError) -> JSONResponse:
    problems, fields = [], []
    for problem in error.errors():
        if problem["type"] == "json_invalid":
            reason = problem.get("ctx", {}).get("error", problem["msg"])
            problems.append(f"not valid JSON ({reason} at character {problem['loc'][-1]})")
        elif problem["type"] == "model_attributes_type" and tuple(problem["loc"]) == ("body",):
            content_type = request.headers.get("content-type")
            if content_type is None or "json" not in content_type:
                problems.append(f"send a JSON object with Content-Type: application/json, not {content_type or 'none'}")
            else:
                problems.append(f"expected a JSON object, got {type(problem['input']).__name__}")
        else:
            problems.append(f"{_location(problem['loc'])}: {problem['msg']}")
            fields.append(_location(problem["loc"]))
    return ApiError(400, f"invalid request body: {'; '.join(problems)}", param=fields[0] if fields else None).response()


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own errors (404, 405, a body that cannot be parsed) with OpenAI's error body."""
    if error.status_code == 404:
        endpoints = "POST /v1/chat/completions and GET /v1/models"
        message = f"no such endpoint {request.url.path}; this server answers {endpoints}."
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}."
    elif error.status_code == 400:
        message = "invalid request body: it cannot be read as JSON (not UTF-8, or nested too deeply)."
    else:
        message = f"{error.detail}."
    error_type = "invalid_request_error" if error.status_code < 500 else "server_error"
    return ApiError(error.status_code, message, error_type, headers=getattr(error, "headers", None)).response()


def _location(loc: Sequence) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    text = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "body"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback  # [::1] as a URL writes it
    except ValueError:
        return False


def serve(
    model: str,
    adapter: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    prompt_template: str | None = None,
    system: str = "",
    bits: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    options: GenerationOptions = GenerationOptions(),
    *,
    max_body_bytes: int | None = MAX_BODY_BYTES,
    max_tokens_limit: int = MAX_TOKENS_LIMIT,
    max_queued_requests: int | None = MAX_QUEUED_REQUESTS,
    max_context_tokens: int | None = None,
    max_batch_size: int = MAX_BATCH_SIZE,
    visual_encoder: str | None = None,
    llava: str | None = None,
    allow_local_images: str | None = None,
) -> None:
    """Load the model and answer OpenAI chat requests at http://host:port/v1 until stopped (Ctrl-C).

    The model is listed under the adapter's (or LLaVA folder's) name when there is one, else the model's. With
    `visual_encoder` and `llava`, the LLaVA model is served and reads images. The limits are `build_app`'s.
    """
    if allow_local_images is not None and llava is None:
        raise XtuneError("--allow-local-images is for LLaVA models: pass --visual-encoder and --llava too.")
    llm, tokenizer = load_any_chat_model(model, adapter, visual_encoder, llava, bits, device, dtype, trust_remote_code,
                                         what="server")  # fmt: skip
    template = pick_template(prompt_template, adapter or llava, resolve_model_path(model), tokenizer)
    limits = dict(
        max_body_bytes=max_body_bytes,
        max_tokens_limit=max_tokens_limit,
        max_queued_requests=max_queued_requests,
        max_context_tokens=max_context_tokens,
        max_batch_size=max_batch_size,
        allow_local_images=allow_local_images,
    )
    app = build_app(llm, tokenizer, template, Path(adapter or llava or model).name, api_key, system, options, **limits)
    if api_key is None and not is_loopback(host):
        print(
            f"warning: serving on {host}:{port} without an API key: anyone who can reach this port can use the "
            "model. Pass --api-key KEY to require one.",
            file=sys.stderr,
        )
    uvicorn.run(app, host=host, port=port)
