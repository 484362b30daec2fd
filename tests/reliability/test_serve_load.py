"""The OpenAI-compatible server under load: the tiny model behind uvicorn on loopback, 200 requests from
16 client threads (the official `openai` client, streamed and not, some streams abandoned mid-way).

Every request must get a whole reply or a clean 503 refusal, and the server must answer normally after.
The figures are printed (`pytest -s`) and recorded in docs/RELIABILITY.md.
"""

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from xtune.data.templates import get_template
from xtune.infer.chat import load_chat_model
from tests.infer.test_serve import running
from xtune.infer.serve import build_app

REQUESTS = 200
CLIENTS = 16
MAX_TOKENS = 6
PROMPTS = ["Count to five.", "Hi there", "What is the capital of France?", "Tell me a joke."]


@pytest.fixture(scope="module")
def loaded(xtune_home):
    model, tokenizer = load_chat_model("xtune-tiny/internlm2-chat")
    return model, tokenizer, get_template("internlm2_chat")


def one_request(client: openai.OpenAI, index: int) -> str:
    """One request of the mix; returns its outcome: ok, ok-stream, abandoned, or busy (503)."""
    messages = [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]
    stream = index % 2 == 1
    try:
        response = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=stream
        )
        if not stream:
            choice = response.choices[0]
            assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
            assert response.usage.completion_tokens <= MAX_TOKENS
            return "ok"
        if index % 10 == 9:  # a client that leaves after the first chunk
            next(iter(response))
            response.close()
            return "abandoned"
        chunks = list(response)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        return "ok-stream"
    except openai.APIStatusError as error:
        assert error.status_code == 503, error
        body = error.response.json()["error"]
        assert body["code"] == "server_busy" and error.response.headers["retry-after"] == "1"
        return "busy"


def hammer(url: str, max_retries: int = 0) -> tuple[Counter, float]:
    local = threading.local()

    def run(index: int) -> str:
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=url, api_key="unused", max_retries=max_retries, timeout=120)
        return one_request(local.client, index)

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = Counter(pool.map(run, range(REQUESTS)))
    return outcomes, time.perf_counter() - start


def still_serving(url: str, burst: int) -> None:
    """The server answers `burst` simultaneous requests: every place in its queue came back."""
    assert httpx.get(f"{url}/models").status_code == 200
    time.sleep(0.5)  # a generation thread gives its place back just after its reply has gone out
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

    def ask(_) -> int:
        return httpx.post(f"{url}/chat/completions", json=body, timeout=60).status_code

    with ThreadPoolExecutor(burst) as pool:
        statuses = list(pool.map(ask, range(burst)))
    assert statuses == [200] * burst


@pytest.mark.slow
def test_200_requests_from_16_clients_all_answered_with_a_queue_longer_than_the_clients(loaded):
    model, tokenizer, template = loaded
    with running(build_app(model, tokenizer, template, "tiny")) as url:  # default limits: 32 may wait
        outcomes, seconds = hammer(url)
        print(f"\nserve load, queue 32: {dict(outcomes)} in {seconds:.1f} s ({REQUESTS / seconds:.1f} requests/s)")
        assert sum(outcomes.values()) == REQUESTS and outcomes["busy"] == 0
        still_serving(url, CLIENTS)


@pytest.mark.slow
def test_200_requests_from_16_clients_over_a_queue_of_4_get_answers_or_clean_503s(loaded):
    model, tokenizer, template = loaded
    app = build_app(model, tokenizer, template, "tiny", max_queued_requests=4, max_batch_size=4)  # 8 places, 16 clients
    with running(app) as url:
        outcomes, seconds = hammer(url, max_retries=0)
        print(f"\nserve load, queue 4, no retries: {dict(outcomes)} in {seconds:.1f} s")
        assert sum(outcomes.values()) == REQUESTS and outcomes["busy"] > 0
        still_serving(url, 5)
        outcomes, seconds = hammer(url, max_retries=2)  # the openai client's default: it waits Retry-After
        print(f"serve load, queue 4, 2 retries: {dict(outcomes)} in {seconds:.1f} s")
        assert sum(outcomes.values()) == REQUESTS and REQUESTS - outcomes["busy"] > REQUESTS // 2
        still_serving(url, 5)
