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


def system_in_last_user_turn(conversation):
    """The conversation as Mistral v0.3's jinja must be given it to write what xtune writes: the jinja writes the
    system text into the last user turn only when the conversation ends with that turn (it drops it otherwise);
    xtune writes it there always, as mistral-common does. Written here, once, for the tests that compare the two."""
    from dataclasses import replace

    from xtune.data.formats import Turn

    if conversation.system is None or conversation.turns[-1].role == "user":
        return conversation
    turns = conversation.turns[1:]
    last = max(index for index, turn in enumerate(turns) if turn.role == "user")
    moved = Turn("user", f"{conversation.system}\n\n{turns[last].content}")
    return replace(conversation, turns=(*turns[:last], moved, *turns[last + 1 :]))


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
