"""An OpenAI-compatible chat server, so that OpenAI clients (the `openai` package, chat UIs, agent
frameworks) can talk to an xtune model: `GET /v1/models` and `POST /v1/chat/completions`, streamed or not.

A reply is the one `xtune chat` gives for the same conversation and options: the same template, prompt
ids, stop words and final strip as `generate.generate_replies`. A streamed reply comes as server-sent
events of `chat.completion.chunk` objects whose text, joined, is the non-streamed reply (see
`streamable_prefix`).

Any `model` name in a request is accepted and answered by the one model served, since clients often
send a placeholder. The model is not thread-safe, so one reply is generated at a time; other requests
wait their turn.

What one client can ask of the server is bounded, so that no request can take it down: a request body
over `max_body_bytes` is refused with 413 before it is parsed; `max_tokens` over `max_tokens_limit`, or a
prompt and max_tokens over the model's context, with 400 as OpenAI does (a request's max_tokens is never
lowered silently; the server's default is, to fit the context); and a request arriving while
`max_queued_requests` already wait their turn with 503 and `Retry-After`, which OpenAI clients retry by
themselves. Every error, 404 and 405 included, has OpenAI's error body.
"""

import asyncio
import ipaddress
import json
import logging
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
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from xtune.data.formats import Conversation, Turn, with_system
from xtune.data.templates import ChatTemplate
from xtune.errors import XtuneError
from xtune.models.load import resolve_model_path
from xtune.infer.chat import load_chat_model, pick_template
from xtune.infer.generate import GenerationOptions, cut_at_stop_words, generation_kwargs, prompt_ids

logger = logging.getLogger(__name__)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""Request roles and the conversation roles they become; OpenAI's newer `developer` is a system message."""

MAX_BODY_BYTES = 1 << 20
"""Default limit of a request body: 1 MiB holds a conversation of some 250k words."""
MAX_TOKENS_LIMIT = 4096
"""Default ceiling of a request's max_tokens."""
MAX_QUEUED_REQUESTS = 32
"""Default number of requests that may wait for the model while one is generated."""
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


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    role: str
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None
    """An earlier answer's reasoning (DeepSeek's and vLLM's name), written as the template writes reasoning."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's request body that the server reads; others (tools, logprobs, ...) are ignored."""

    model: str = ""
    """Any name: the one model served answers."""
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
    """OpenAI's seed is a 64-bit integer."""
    n: int | None = None
    stream_options: StreamOptions | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM's extension: {"enable_thinking": false} makes a Qwen3-style template answer without reasoning."""


def request_conversation(messages: Sequence[Message]) -> Conversation:
    """The conversation a request's messages hold: an optional system message first, the user's last."""
    if not messages:
        raise ApiError(400, "messages is empty: send at least one message, the last one from the user.", param="messages")
    turns = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = ROLES.get(message.role)
        if role is None:
            raise ApiError(
                400, f"{where}: role {message.role!r} is not supported; use system, user or assistant.", param=f"{where}.role"
            )
        if role == "system" and index > 0:
            raise ApiError(400, f"{where}: a system message may only come first.", param=f"{where}.role")
        reasoning = message.reasoning_content if role == "assistant" else None
        turns.append(Turn(role, _content_text(message.content, where), role == "assistant", reasoning=reasoning))
    if turns[-1].role != "user":
        raise ApiError(
            400,
            f"messages[{len(turns) - 1}]: the last message must be from the user, not the {turns[-1].role}; "
            "the model answers the user's last message.",
            param=f"messages[{len(turns) - 1}].role",
        )
    return Conversation(tuple(turns))


MIN_TEMPERATURE = 1e-3
MAX_STOP_WORDS, MAX_STOP_CHARS = 4, 256
"""OpenAI's limit on stop sequences; each one is also matched against the tokenizer's whole vocabulary, so 1,000
of them held the model lock for minutes and their matching tables stayed in memory."""


def _content_text(content: str | list[ContentPart] | None, where: str) -> str:
    """A message's text; the texts of a list of parts are joined by newlines, as vLLM does."""
    if content is None:
        raise ApiError(400, f"{where}: content is missing; send the message's text.", param=f"{where}.content")
    if isinstance(content, str):
        return _unicode(content, f"{where}.content")
    texts = []
    for index, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise ApiError(
                400, f"{where}.content[{index}]: only text parts are supported, not {part.type!r}.",
                param=f"{where}.content[{index}].type",
            )  # fmt: skip
        texts.append(_unicode(part.text, f"{where}.content[{index}].text"))
    return "\n".join(texts)


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
    """Either "length", when the reply ran to max tokens without a stop word or stop token, or "stop"."""
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Generation(BaseStreamer):
    """One reply to `prompt` (token ids), generated in a thread of its own once that thread holds `lock`.

    The thread hands its results to the event loop through an asyncio queue: pieces of text as tokens
    come (when `stream`), then the `Reply`. It is its own streamer for `model.generate` rather than
    transformers' `TextIteratorStreamer`, which decodes in windows that restart after each newline (a
    SentencePiece token's leading space can be lost there) and knows nothing of stop words; here the ids
    so far are decoded whole each time (quadratic in the reply's length, but decoding is cheap next to a
    forward pass), and `streamable_prefix` says what may be sent. `cancel` (the client
    went away) stops generating at the next token. `on_finish` is called from the thread when it ends,
    whatever the outcome.
    """

    def __init__(
        self,
        model,
        tokenizer,
        template: ChatTemplate,
        prompt: list[int],
        options: GenerationOptions,
        lock: threading.Lock,
        seed: int | None = None,
        stream: bool = False,
        on_finish: Callable[[], None] | None = None,
    ):
        self.model, self.tokenizer, self.options, self.lock, self.seed = model, tokenizer, options, lock, seed
        self.stream, self.on_finish = stream, on_finish
        self.prompt = prompt
        self.kwargs = generation_kwargs(template, tokenizer, options)
        self.stop_words = (*template.stop_words, *options.stop_words)
        self.clean_up_spaces = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.cancelled = threading.Event()
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.prompt_skipped, self.ids, self.sent = False, [], ""
        self.reply: Reply | None = None

    def start(self) -> None:
        threading.Thread(target=self._run, name="xtune-generate", daemon=True).start()

    def cancel(self) -> None:
        self.cancelled.set()

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
            self.cancelled.set()

    def _run(self) -> None:
        try:
            with self.lock:
                if self.cancelled.is_set():
                    return
                reply = self._generate()
        except Exception as error:
            self._send("error", error)
        else:
            self._send("reply", reply)
        finally:
            if self.on_finish is not None:
                self.on_finish()

    def _generate(self) -> Reply:
        if self.seed is not None:
            torch.manual_seed(self.seed)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([self.prompt], device=device)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            streamer=self if self.stream else None,
            stopping_criteria=StoppingCriteriaList([_StopWhenSet(self.cancelled)]),
            **self.kwargs,
        )
        generated = output[0, len(self.prompt) :].tolist()
        decoded = self.tokenizer.decode(generated, skip_special_tokens=True)
        before_stop = cut_at_stop_words(decoded, self.stop_words)
        text = before_stop.strip()
        if text.startswith(self.sent):
            if len(text) > len(self.sent):
                self._send("text", text[len(self.sent) :])
        else:
            logger.warning("the streamed text %r is not the start of the reply %r", self.sent, text)
        stopped = len(before_stop) < len(decoded) or (generated and generated[-1] in self.kwargs["eos_token_id"])
        ran_out = len(generated) >= self.options.max_new_tokens and not stopped
        return Reply(text, "length" if ran_out else "stop", len(self.prompt), len(generated))

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_skipped:  # generate puts the prompt first
            self.prompt_skipped = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        decoded = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        text = streamable_prefix(decoded, self.stop_words, self.clean_up_spaces)
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self._send("text", text[len(self.sent) :])
            self.sent = text

    def end(self) -> None:
        pass


def build_app(
    model,
    tokenizer,
    template: ChatTemplate,
    model_name: str,
    api_key: str | None = None,
    system: str = "",
    defaults: GenerationOptions = GenerationOptions(),
    *,
    max_body_bytes: int | None = MAX_BODY_BYTES,
    max_tokens_limit: int = MAX_TOKENS_LIMIT,
    max_queued_requests: int | None = MAX_QUEUED_REQUESTS,
    max_context_tokens: int | None = None,
) -> FastAPI:
    """The OpenAI-compatible app for one model.

    `system` is put in front of conversations that bring no system message. `defaults` gives the options a
    request does not set (OpenAI clients send temperature only when the user sets it). With `api_key`, each
    request must carry `Authorization: Bearer <api_key>` or is answered 401. A request's `model` may name
    anything: `model_name` is what `/v1/models` lists and every reply reports.

    Limits (None: none): a body over `max_body_bytes` gets 413; `max_tokens` (or `max_completion_tokens`)
    over `max_tokens_limit` gets 400; a prompt plus max_tokens over `max_context_tokens` (default: the
    model's `max_position_embeddings`) gets 400, and when the request sets no max_tokens the default is
    lowered to fit; a request arriving while `max_queued_requests` wait behind the one generating gets 503.
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
    if api_key is not None and not api_key.strip():
        raise XtuneError("--api-key is empty, which any client could send; give a key, or none to serve without one.")
    if max_context_tokens is None:
        max_context_tokens = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    lock = threading.Lock()
    # a place for the request generating and each one waiting: taken before tokenizing, given back by the thread
    admitted = None if max_queued_requests is None else threading.BoundedSemaphore(max_queued_requests + 1)
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
        if request.n not in (None, 1):
            raise ApiError(400, f"n={request.n}: only one choice per request (n=1) is supported.", param="n")
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
        conversation = with_system(request_conversation(request.messages), system)
        kwargs = request.chat_template_kwargs or {}
        if set(kwargs) - {"enable_thinking"}:
            unknown = ", ".join(sorted(set(kwargs) - {"enable_thinking"}))
            raise ApiError(400, f"chat_template_kwargs: {unknown} not supported; only enable_thinking is.",
                           param="chat_template_kwargs")  # fmt: skip
        thinking = kwargs.get("enable_thinking")
        if thinking is not None and not isinstance(thinking, bool):
            raise ApiError(400, f"chat_template_kwargs.enable_thinking must be true or false, got {thinking!r}.",
                           param="chat_template_kwargs.enable_thinking")  # fmt: skip
        conversation = replace(conversation, enable_thinking=thinking)
        if admitted is not None and not admitted.acquire(blocking=False):
            raise ApiError(
                503,
                f"server busy: one reply is being generated and {max_queued_requests} more requests wait (the "
                "server's limit); retry shortly.",
                error_type="server_error",
                code="server_busy",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        release = admitted.release if admitted is not None else None
        try:
            prompt = await asyncio.to_thread(prompt_ids, conversation, template, tokenizer)
            options = _fit_context(len(prompt), request_options(request, defaults), asked, max_context_tokens)
            generation = Generation(
                model, tokenizer, template, prompt, options, lock, request.seed, request.stream, on_finish=release
            )
            # started here, not when the stream is first read, so that its thread always ends and gives back its place
            generation.start()
        except BaseException:  # a bad request, or the client went away while it was tokenized
            if release is not None:
                release()
            raise
        completion = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return StreamingResponse(_events(generation, completion, include_usage), media_type="text/event-stream")
        try:
            reply = await _result_while_connected(generation, http)
        except Exception as error:
            logger.exception("generation failed")
            raise ApiError(500, f"generation failed: {error}", error_type="server_error") from error
        finally:
            generation.cancel()
        message = {"role": "assistant", "content": reply.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}
        return {**completion, "object": "chat.completion", "choices": [choice], "usage": reply.usage()}

    return app


DISCONNECT_POLL_S = 0.25


async def _result_while_connected(generation: "Generation", http: Request) -> "Reply":
    """The generation's reply; a client that goes away meanwhile cancels it, so the model is free for the next
    request (a disconnected client kept it busy to the end: the next request waited 110 s)."""
    result = asyncio.ensure_future(generation.result())
    while not result.done():
        await asyncio.wait({result}, timeout=DISCONNECT_POLL_S)
        if not result.done() and await http.is_disconnected():
            generation.cancel()
            logger.info("the client went away; its generation is cancelled")
    return result.result()


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


async def _events(generation: Generation, completion: dict, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: the role, the text in pieces, the finish reason, the usage if asked, [DONE]."""

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _event({**completion, "object": "chat.completion.chunk", "choices": [choice]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in generation.pieces():
            yield chunk({"content": piece})
        assert generation.reply is not None
        yield chunk({}, generation.reply.finish_reason)
        if include_usage:
            usage = generation.reply.usage()
            yield _event({**completion, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    except Exception as error:  # the status line has gone out: the error goes in the stream, as OpenAI's does
        logger.exception("generation failed")
        yield _event(ApiError(500, f"generation failed: {error}", error_type="server_error").body())
    finally:
        generation.cancel()


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
        return ipaddress.ip_address(host).is_loopback
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
) -> None:
    """Load the model and answer OpenAI chat requests at http://host:port/v1 until stopped (Ctrl-C).

    The model is listed under the adapter's folder name when there is an adapter, else the model's. The
    limits are `build_app`'s.
    """
    llm, tokenizer = load_chat_model(model, adapter, bits, device, dtype, trust_remote_code)
    template = pick_template(prompt_template, adapter, resolve_model_path(model), tokenizer)
    limits = dict(
        max_body_bytes=max_body_bytes,
        max_tokens_limit=max_tokens_limit,
        max_queued_requests=max_queued_requests,
        max_context_tokens=max_context_tokens,
    )
    app = build_app(llm, tokenizer, template, Path(adapter or model).name, api_key, system, options, **limits)
    if api_key is None and not is_loopback(host):
        print(
            f"warning: serving on {host}:{port} without an API key: anyone who can reach this port can use the "
            "model. Pass --api-key KEY to require one.",
            file=sys.stderr,
        )
    uvicorn.run(app, host=host, port=port)
