"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn server
running the tiny InternLM2 chat model (random weights: gibberish answers, but deterministic when greedy)."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient

from xtune.data.formats import Conversation, Turn
from xtune.data.templates import get_template
from xtune.infer import serve as serve_module
from xtune.infer.chat import answer_all, load_chat_model
from xtune.infer.generate import GenerationOptions, prompt_ids
from xtune.infer.serve import build_app, streamable_prefix

MODEL = "xtune-tiny/internlm2-chat"
MODEL_NAME = "internlm2-chat"
SYSTEM = "Be brief."
"""The server's default system prompt, for conversations that bring none."""
CONVERSATIONS = {
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "count": [{"role": "user", "content": "Count to five."}],
}


@pytest.fixture(scope="module")
def loaded(xtune_home):
    model, tokenizer = load_chat_model(MODEL)
    return model, tokenizer, get_template("internlm2_chat")


@contextmanager
def running(app):
    """The app served by uvicorn in a background thread on a free port; yields the API's base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def base_url(loaded):
    model, tokenizer, template = loaded
    with running(build_app(model, tokenizer, template, MODEL_NAME, api_key=None, system=SYSTEM)) as url:
        yield url


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def conversation(messages: list[dict]) -> Conversation:
    return Conversation(tuple(Turn(m["role"], m["content"], m["role"] == "assistant") for m in messages))


def chat_answer(loaded, messages: list[dict], max_tokens: int) -> str:
    """What `xtune chat` answers."""
    model, tokenizer, template = loaded
    options = GenerationOptions(max_new_tokens=max_tokens)
    return answer_all(model, tokenizer, template, [conversation(messages)], SYSTEM, options)[0]


def complete(client, messages: list[dict], max_tokens: int, **request):
    """A greedy reply unless the request says otherwise."""
    request = {"model": "anything", "temperature": 0, **request}
    return client.chat.completions.create(messages=messages, max_tokens=max_tokens, **request)


def streamed(client, messages: list[dict], max_tokens: int, **request) -> list:
    return list(complete(client, messages, max_tokens, stream=True, **request))


def streamed_text(client, messages: list[dict], max_tokens: int, **request) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in streamed(client, messages, max_tokens, **request))


@pytest.mark.parametrize("name", ["system", "multi_turn"])
def test_greedy_reply_is_what_xtune_chat_answers(client, loaded, name):
    messages = CONVERSATIONS[name]
    response = complete(client, messages, 12)
    reply = response.choices[0].message.content
    assert reply and reply == chat_answer(loaded, messages, 12)
    assert response.object == "chat.completion" and response.model == MODEL_NAME
    assert response.choices[0].message.role == "assistant"


@pytest.mark.parametrize(("name", "max_tokens"), [("system", 12), ("count", 40)])
def test_streamed_text_is_the_reply(client, name, max_tokens):
    # "count" runs into unfinished UTF-8 characters (U+FFFD) in the middle of the reply
    messages = CONVERSATIONS[name]
    response = complete(client, messages, max_tokens)
    chunks = streamed(client, messages, max_tokens, stream_options={"include_usage": True})
    choices = [chunk.choices[0] for chunk in chunks if chunk.choices]
    pieces = [choice.delta.content for choice in choices if choice.delta.content]
    assert choices[0].delta.role == "assistant"
    assert "".join(pieces) == response.choices[0].message.content
    assert len(pieces) > 2, "the reply came in one piece, not streamed"
    assert [choice.finish_reason for choice in choices[:-1]] == [None] * (len(choices) - 1)
    assert choices[-1].finish_reason == response.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == response.usage
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}


def test_a_stop_word_cuts_the_reply_and_is_never_streamed(client):
    messages = CONVERSATIONS["system"]
    reply = complete(client, messages, 12).choices[0].message.content
    stop = reply[6:10]
    expected = reply[: reply.find(stop)].strip()
    assert 0 < len(expected) < len(reply)
    response = complete(client, messages, 12, stop=[stop])
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop" and response.usage.completion_tokens <= 12
    chunks = streamed(client, messages, 12, stop=stop)
    pieces = [chunk.choices[0].delta.content or "" for chunk in chunks]
    assert "".join(pieces) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_usage_counts_tokens_and_a_reply_cut_short_finishes_with_length(client, loaded):
    model, tokenizer, template = loaded
    messages = CONVERSATIONS["system"]
    response = complete(client, messages, 5)
    usage = response.usage
    assert usage.prompt_tokens == len(prompt_ids(conversation(messages), template, tokenizer))
    assert usage.completion_tokens == 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert response.choices[0].finish_reason == "length"


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == [MODEL_NAME]


def test_a_seed_makes_sampling_repeatable(client):
    first, second = (complete(client, CONVERSATIONS["count"], 6, temperature=1.0, seed=7) for _ in range(2))
    assert first.choices[0].message.content == second.choices[0].message.content


def test_concurrent_requests_take_turns_and_get_the_same_replies(client, loaded):
    messages = CONVERSATIONS["multi_turn"]
    expected = chat_answer(loaded, messages, 8)

    def ask(stream: bool) -> str:
        if stream:
            return streamed_text(client, messages, 8)
        return complete(client, messages, 8).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, [False, True, False, True])) == [expected] * 4


def test_a_client_leaving_mid_stream_frees_the_model(client):
    stream = complete(client, CONVERSATIONS["count"], 2000, stream=True)
    next(stream), next(stream)
    stream.close()
    start = time.monotonic()
    complete(client, CONVERSATIONS["count"], 2)
    assert time.monotonic() - start < 3, "the next request waited for the abandoned reply's 2000 tokens"


def test_with_an_api_key_requests_without_it_get_401(loaded):
    model, tokenizer, template = loaded
    with running(build_app(model, tokenizer, template, MODEL_NAME, api_key="sekrit")) as url:
        wrong = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            complete(wrong, CONVERSATIONS["count"], 2)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            wrong.models.list()
        no_header = httpx.get(f"{url}/models")
        assert no_header.status_code == 401
        assert no_header.json()["error"]["code"] == "invalid_api_key"
        right = openai.OpenAI(base_url=url, api_key="sekrit", max_retries=0)
        assert [m.id for m in right.models.list()] == [MODEL_NAME]
        assert complete(right, CONVERSATIONS["count"], 2).choices[0].message.role == "assistant"


def test_a_conversation_ending_with_the_assistant_gets_400(client):
    messages = [*CONVERSATIONS["multi_turn"][:2]]
    problem = r"messages\[1\]: the last message must be from the user, not the assistant"
    with pytest.raises(openai.BadRequestError, match=problem):
        complete(client, messages, 2)


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"model": "x", "messages": []}, "messages is empty"),
        ({"model": "x"}, "invalid request body: messages: Field required"),
        ({"messages": [{"role": "tool", "content": "42"}, USER]}, "messages[0]: role 'tool' is not supported"),
        ({"messages": [USER, {"role": "system", "content": "s"}, USER]}, "messages[1]: a system message may only come"),
        ({"messages": [USER], "n": 2}, "n=2: only one choice per request"),
        ({"messages": [USER], "max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]: only text"),
    ],
)
def test_bad_requests_get_400_naming_the_problem(base_url, body, problem):
    response = httpx.post(f"{base_url}/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert problem in error["message"]


def test_content_parts_are_joined(client, loaded):
    parts = [{"type": "text", "text": "Count to"}, {"type": "text", "text": "five."}]
    response = complete(client, [{"role": "user", "content": parts}], 6)
    joined = [{"role": "user", "content": "Count to\nfive."}]
    assert response.choices[0].message.content == chat_answer(loaded, joined, 6)


def test_streamable_prefix_holds_back_what_may_still_change():
    stop = ["<|im_end|>"]
    assert streamable_prefix("Hello <|im", stop) == "Hello"
    assert streamable_prefix("Hello<|im_end|> more", stop) == "Hello"
    assert streamable_prefix("  Hi there \n", stop) == "Hi there"
    assert streamable_prefix("caf\ufffd", stop) == "caf"
    assert streamable_prefix("ab", ["b", "abc"]) == ""  # "ab" may begin "abc", which would cut earlier than "b"
    assert streamable_prefix("it is '", [], clean_up_spaces=True) == "it is"  # "it is 's" is cleaned to "it is's"


@pytest.fixture
def no_load_no_run(monkeypatch, loaded):
    """`serve` with the loaded tiny model and uvicorn.run capturing the app instead of serving it."""
    model, tokenizer, _ = loaded
    started = {}

    def run(app, host, port):
        started.update(app=app, address=(host, port))

    monkeypatch.setattr(serve_module, "load_chat_model", lambda *args, **kwargs: (model, tokenizer))
    monkeypatch.setattr(serve_module.uvicorn, "run", run)
    return started


def test_serve_names_the_model_after_the_adapter_and_warns_when_open_without_a_key(no_load_no_run, capsys, tmp_path):
    adapter = tmp_path / "checkpoint-9"
    serve_module.serve(MODEL, str(adapter), host="0.0.0.0", port=8123, prompt_template="internlm2_chat")
    warning = "warning: serving on 0.0.0.0:8123 without an API key: anyone who can reach this port can use the model"
    assert warning in capsys.readouterr().err
    assert no_load_no_run["address"] == ("0.0.0.0", 8123)
    models = TestClient(no_load_no_run["app"]).get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["checkpoint-9"] and models["data"][0]["owned_by"] == "xtune"


def test_serve_on_loopback_or_with_a_key_does_not_warn(no_load_no_run, capsys):
    serve_module.serve(MODEL, prompt_template="internlm2_chat")
    serve_module.serve(MODEL, host="0.0.0.0", api_key="k", prompt_template="internlm2_chat")
    assert capsys.readouterr().err == ""
    headers = {"Authorization": "Bearer k"}
    assert TestClient(no_load_no_run["app"]).get("/v1/models", headers=headers).json()["data"][0]["id"] == MODEL_NAME
