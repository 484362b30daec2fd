import pytest


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
