import json
from pathlib import Path

import pytest


def openai_message(turn) -> dict:
    """A Turn as the OpenAI message a chat template's jinja takes: reasoning as `reasoning_content`, tool calls with
    their parsed arguments (and ids), a tool result's `tool_call_id`. Written here, not with xtune's own converter,
    so that tests comparing with official templates do not depend on the code they test."""
    message = {"role": turn.role, "content": turn.content}
    if turn.reasoning is not None:
        message["reasoning_content"] = turn.reasoning
    if turn.tool_calls:
        message["tool_calls"] = [
            {"type": "function", "function": {"name": call.name, "arguments": json.loads(call.arguments)},
             **({"id": call.id} if call.id else {})}
            for call in turn.tool_calls
        ]  # fmt: skip
    if turn.call_id is not None:
        message["tool_call_id"] = turn.call_id
    return message


@pytest.fixture(scope="session", autouse=True)
def xtune_home(tmp_path_factory):
    """Tiny models and caches go to a fresh folder, not ~/.cache/xtune."""
    home = tmp_path_factory.mktemp("xtune_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XTUNE_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def tokenizer():
    from xtune.testing.tiny import build_tokenizer

    return build_tokenizer()


SHARED_TOKENIZERS = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers"
"""Real tokenizers of model families, in their repositories' layouts (see its README); CI has them here too."""


@pytest.fixture(scope="session")
def real_tokenizer():
    """`real_tokenizer("qwen2")`: that family's tokenizer from ../shared/tokenizers, loaded once per session."""
    from xtune.models.load import load_tokenizer

    loaded = {}

    def get(name: str):
        if not (SHARED_TOKENIZERS / name).is_dir():
            pytest.skip(f"no real tokenizer at {SHARED_TOKENIZERS / name}")
        if name not in loaded:
            loaded[name] = load_tokenizer(SHARED_TOKENIZERS / name)
        return loaded[name]

    return get
