"""An OpenAI-compatible chat server, so that OpenAI clients (the `openai` package, chat UIs, agent
frameworks) can talk to an xtune model: `GET /v1/models` and `POST /v1/chat/completions`, streamed or not.

A reply is the one `xtune chat` gives for the same conversation and options: the same template, prompt
ids, stop words and final strip as `generate.generate_replies`. A streamed reply comes as server-sent
events of `chat.completion.chunk` objects whose text, joined, is the non-streamed reply (see
`streamable_prefix`).

Any `model` name in a request is accepted and answered by the one model served, since clients often
send a placeholder. The model is not thread-safe, so one reply is generated at a time; other requests
wait their turn.
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
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
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


class ApiError(XtuneError):
    """A request the server refuses, answered with this HTTP status and an OpenAI error body."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.error_type, self.code = status, error_type, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.error_type, "param": None, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    role: str
    content: str | list[ContentPart] | None = None


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
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream_options: StreamOptions | None = None


def request_conversation(messages: Sequence[Message]) -> Conversation:
    """The conversation a request's messages hold: an optional system message first, the user's last."""
    if not messages:
        raise ApiError(400, "messages is empty: send at least one message, the last one from the user.")
    turns = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = ROLES.get(message.role)
        if role is None:
            raise ApiError(400, f"{where}: role {message.role!r} is not supported; use system, user or assistant.")
        if role == "system" and index > 0:
            raise ApiError(400, f"{where}: a system message may only come first.")
        turns.append(Turn(role, _content_text(message.content, where), trainable=role == "assistant"))
    if turns[-1].role != "user":
        raise ApiError(
            400,
            f"messages[{len(turns) - 1}]: the last message must be from the user, not the {turns[-1].role}; "
            "the model answers the user's last message.",
        )
    return Conversation(tuple(turns))


def _content_text(content: str | list[ContentPart] | None, where: str) -> str:
    """A message's text; the texts of a list of parts are joined by newlines, as vLLM does."""
    if content is None:
        raise ApiError(400, f"{where}: content is missing; send the message's text.")
    if isinstance(content, str):
        return content
    texts = []
    for index, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"{where}.content[{index}]: only text parts are supported, not {part.type!r}.")
        texts.append(part.text)
    return "\n".join(texts)


def request_options(request: ChatCompletionRequest, defaults: GenerationOptions) -> GenerationOptions:
    """The server's options with the request's max tokens, temperature, top_p and extra stop words."""
    stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
    return replace(
        defaults,
        max_new_tokens=request.max_completion_tokens or request.max_tokens or defaults.max_new_tokens,
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
    """One reply, generated in a thread of its own once that thread holds `lock`.

    The thread hands its results to the event loop through an asyncio queue: pieces of text as tokens
    come (when `stream`), then the `Reply`. It is its own streamer for `model.generate` rather than
    transformers' `TextIteratorStreamer`, which decodes in windows that restart after each newline (a
    SentencePiece token's leading space can be lost there) and knows nothing of stop words; here the ids
    so far are decoded whole each time (quadratic in the reply's length, but decoding is cheap next to a
    forward pass), and `streamable_prefix` says what may be sent. `cancel` (the client
    went away) stops generating at the next token.
    """

    def __init__(
        self,
        model,
        tokenizer,
        template: ChatTemplate,
        conversation: Conversation,
        options: GenerationOptions,
        lock: threading.Lock,
        seed: int | None = None,
        stream: bool = False,
    ):
        self.model, self.tokenizer, self.options, self.lock, self.seed = model, tokenizer, options, lock, seed
        self.stream = stream
        self.prompt = prompt_ids(conversation, template, tokenizer)
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
) -> FastAPI:
    """The OpenAI-compatible app for one model.

    `system` is put in front of conversations that bring no system message. `defaults` gives the options a
    request does not set (OpenAI clients send temperature only when the user sets it). With `api_key`, each
    request must carry `Authorization: Bearer <api_key>` or is answered 401. A request's `model` may name
    anything: `model_name` is what `/v1/models` lists and every reply reports.
    """
    lock = threading.Lock()
    created = int(time.time())

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), api_key.encode()):
            message = "Incorrect or missing API key: send the server's key as 'Authorization: Bearer <key>'."
            raise ApiError(401, message, code="invalid_api_key")

    app = FastAPI(title=f"xtune: {model_name}", dependencies=[Depends(check_api_key)])
    app.add_exception_handler(ApiError, lambda request, error: error.response())
    app.add_exception_handler(RequestValidationError, _invalid_request_body)

    @app.get("/v1/models")
    async def list_models() -> dict:
        entry = {"id": model_name, "object": "model", "created": created, "owned_by": "xtune"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
        if request.n not in (None, 1):
            raise ApiError(400, f"n={request.n}: only one choice per request (n=1) is supported.")
        conversation = with_system(request_conversation(request.messages), system)
        options = request_options(request, defaults)
        generation = Generation(model, tokenizer, template, conversation, options, lock, request.seed, request.stream)
        completion = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return StreamingResponse(_events(generation, completion, include_usage), media_type="text/event-stream")
        generation.start()
        try:
            reply = await generation.result()
        except Exception as error:
            logger.exception("generation failed")
            raise ApiError(500, f"generation failed: {error}", error_type="server_error") from error
        finally:
            generation.cancel()
        message = {"role": "assistant", "content": reply.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}
        return {**completion, "object": "chat.completion", "choices": [choice], "usage": reply.usage()}

    return app


async def _events(generation: Generation, completion: dict, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: the role, the text in pieces, the finish reason, the usage if asked, [DONE]."""

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _event({**completion, "object": "chat.completion.chunk", "choices": [choice]})

    generation.start()
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


async def _invalid_request_body(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{_location(problem['loc'])}: {problem['msg']}" for problem in error.errors())
    return ApiError(400, f"invalid request body: {problems}").response()


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
) -> None:
    """Load the model and answer OpenAI chat requests at http://host:port/v1 until stopped (Ctrl-C).

    The model is listed under the adapter's folder name when there is an adapter, else the model's.
    """
    llm, tokenizer = load_chat_model(model, adapter, bits, device, dtype, trust_remote_code)
    template = pick_template(prompt_template, adapter, resolve_model_path(model), tokenizer)
    app = build_app(llm, tokenizer, template, Path(adapter or model).name, api_key, system, options)
    if api_key is None and not is_loopback(host):
        print(
            f"warning: serving on {host}:{port} without an API key: anyone who can reach this port can use the "
            "model. Pass --api-key KEY to require one.",
            file=sys.stderr,
        )
    uvicorn.run(app, host=host, port=port)
