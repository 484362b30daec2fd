"""Code execution and trust: what a config, a checkpoint, a chat message or a path from someone else may do.

Each test below reproduces an attack that worked before its fix (issue 23, items 1-4)."""

import json

import pytest
from typer.testing import CliRunner

from xtune.cli import app
from xtune.config.load import load_config
from xtune.errors import ConfigError

runner = CliRunner()

EXEC_RECORD = "open('canary', 'w').write('ran')"


def hostile_yaml(tmp_path, *lines: str):
    (tmp_path / "d.json").write_text(json.dumps([EXEC_RECORD]))
    config = tmp_path / "c.yaml"
    config.write_text("\n".join(["llm_name_or_path: xtune-tiny/internlm2-chat", f"data_path: {tmp_path / 'd.json'}", *lines]) + "\n")
    return config


@pytest.mark.parametrize(
    "line, key",
    [
        ("dataset_format: 'builtins:exec'", "dataset_format"),
        ("dataset_format: subprocess.run", "dataset_format"),
        ("trust_remote_code: true", "trust_remote_code"),
        ("datasets: [{path: x.json, format: 'builtins:exec'}]", "datasets"),
    ],
)
def test_a_yaml_key_that_runs_code_is_refused_at_its_line_unless_allowed(tmp_path, line, key):
    config = hostile_yaml(tmp_path, "lr: 0.001", line)
    with pytest.raises(ConfigError) as error:
        load_config(str(config))
    message = str(error.value)
    assert message.startswith(f"{config}:4: key '{key}' = ") and "--allow-code" in message
    loaded, _ = load_config(str(config), allow_code=True)
    assert loaded.lr == 0.001


def test_python_configs_and_command_line_overrides_may_name_code(tmp_path):
    config = hostile_yaml(tmp_path)
    loaded, _ = load_config(str(config), ["dataset_format='builtins:exec'", "trust_remote_code=True"])
    assert loaded.dataset_format == "builtins:exec" and loaded.trust_remote_code
    python = tmp_path / "c.py"
    python.write_text("llm_name_or_path = 'm'\ndata_path = 'd.json'\ndataset_format = 'builtins:exec'\n")
    assert load_config(str(python))[0].dataset_format == "builtins:exec"
    named = hostile_yaml(tmp_path, "dataset_format: alpaca", "trust_remote_code: false")
    assert load_config(str(named))[0].dataset_format == "alpaca"


def test_check_dataset_of_a_hostile_yaml_runs_nothing_without_allow_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = hostile_yaml(tmp_path, "dataset_format: 'builtins:exec'")
    refused = runner.invoke(app, ["check-dataset", str(config)])
    assert isinstance(refused.exception, ConfigError) and "--allow-code" in str(refused.exception)
    assert not (tmp_path / "canary").exists()
    allowed = runner.invoke(app, ["check-dataset", str(config), "--allow-code"])
    assert (tmp_path / "canary").read_text() == "ran", allowed.output  # the attack is real: the flag lets it run


# 2. DeepSpeed's state is pickles: loaded only from a checkpoint this machine wrote -----------------------------

def signed_checkpoint(folder):
    from xtune.engine.checkpoint import write_manifest

    (folder / "deepspeed" / "state").mkdir(parents=True)
    (folder / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (folder / "adapter_model.safetensors").write_bytes(b"adapter")
    write_manifest(folder)
    return folder


def test_only_a_checkpoint_signed_with_this_machines_key_counts_as_written_here(tmp_path, monkeypatch):
    from xtune.engine.checkpoint import MANIFEST, written_here
    from xtune.engine.zero import check_trusted
    from xtune.errors import CheckpointError

    monkeypatch.setenv("XTUNE_HOME", str(tmp_path / "home"))
    folder = signed_checkpoint(tmp_path / "checkpoint-1")
    assert written_here(folder, under="deepspeed")
    assert oct((tmp_path / "home" / "checkpoint.key").stat().st_mode & 0o777) == "0o600"
    check_trusted(folder, trust_checkpoint=False)

    pickle_file = folder / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    pickle_file.write_bytes(b"someone else's pickle")  # and a manifest of its own, as an attacker would write
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["sha256"]["deepspeed/state/mp_rank_00_model_states.pt"] = "0" * 64
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert not written_here(folder, under="deepspeed")
    with pytest.raises(CheckpointError, match=r"checkpoint-1: its DeepSpeed state \(deepspeed/\) is pickles.*--trust-checkpoint"):
        check_trusted(folder, trust_checkpoint=False)
    check_trusted(folder, trust_checkpoint=True)

    other = signed_checkpoint(tmp_path / "other" / "checkpoint-1")
    (other / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"added later")
    assert not written_here(other, under="deepspeed")  # a file the signed manifest does not list
    mine = signed_checkpoint(tmp_path / "mine" / "checkpoint-1")
    monkeypatch.setenv("XTUNE_HOME", str(tmp_path / "another_machine"))
    assert not written_here(mine, under="deepspeed")
    del manifest["hmac"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert not written_here(folder)  # a manifest from before signing, or with the signature cut out


class Payload:
    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return exec, (f"open({self.canary!r}, 'w').write('ran')",)


@pytest.mark.slow
def test_resuming_a_deepspeed_checkpoint_whose_pickle_was_replaced_runs_nothing(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    import hashlib
    import io
    import pickle

    from rich.console import Console

    from xtune.engine.checkpoint import MANIFEST
    from xtune.engine.train import train
    from xtune.errors import CheckpointError

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    keys = [f"work_dir={str(tmp_path / 'runs')!r}", "deepspeed='zero1'", "batch_size=4", "accumulative_counts=1",
            "evaluation_inputs=[]", "save_steps=1"]  # fmt: skip
    first = train(load_config("tiny_internlm2_chat_lora_antonyms", [*keys, "max_steps=1"])[0], Console(file=io.StringIO()))
    checkpoint = first.checkpoint
    canary = tmp_path / "canary"
    states = next((checkpoint / "deepspeed").rglob("mp_rank_00_model_states.pt"))
    states.write_bytes(pickle.dumps(Payload(canary)))
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["sha256"][str(states.relative_to(checkpoint))] = hashlib.sha256(states.read_bytes()).hexdigest()
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))  # hashes that match: integrity holds, origin does not
    more = load_config("tiny_internlm2_chat_lora_antonyms", [*keys, "max_steps=2"])[0]
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        train(more, Console(file=io.StringIO()), resume=str(checkpoint))
    assert not canary.exists()
    try:  # trusted: DeepSpeed unpickles it, and the payload runs (the attack is real); the state it gave is None
        train(more, Console(file=io.StringIO()), resume=str(checkpoint), trust_checkpoint=True)
    except Exception:
        pass
    assert canary.read_text() == "ran"


# 4. The search plugin and image paths stay inside their folders ----------------------------------------------

def test_the_search_plugin_refuses_a_link_out_of_its_folder(tmp_path):
    from xtune.errors import XtuneError
    from xtune.infer.plugins import LocalFolderSearch

    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("the password is swordfish\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "notes.md").write_text("the meeting is on Monday\n")
    (corpus / "inner.md").symlink_to(corpus / "notes.md")  # a link that stays inside is fine
    assert {hit.source for hit in LocalFolderSearch(corpus).search("meeting", top_k=5)} == {"notes.md", "inner.md"}
    (corpus / "leak.txt").symlink_to(tmp_path / "outside" / "secret.txt")
    with pytest.raises(XtuneError, match=r"corpus: leak.txt leads outside the folder .*copy the file in, or remove the link"):
        LocalFolderSearch(corpus)
    (corpus / "leak.txt").unlink()
    (corpus / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    try:  # a linked folder: not walked into (Python < 3.13), or refused like a linked file
        assert LocalFolderSearch(corpus).search("password swordfish", top_k=5) == []
    except XtuneError as error:
        assert "linked/secret.txt leads outside the folder" in str(error)


def llava_records(*images):
    return [
        {"id": f"r{index}", "image": image, "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]}
        for index, image in enumerate(images)
    ]  # fmt: skip


def test_image_paths_out_of_image_folder_are_bad_records(tmp_path):
    from PIL import Image

    from xtune.data.sources import SourceSpec, load_sources
    from xtune.errors import DataError

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4), "red").save(images / "sub" / "ok.png")
    Image.new("RGB", (4, 4), "red").save(tmp_path / "private.png")
    (images / "link.png").symlink_to(tmp_path / "private.png")
    escapes = ["../private.png", str(tmp_path / "private.png"), "link.png", "sub/../../private.png"]
    data = tmp_path / "data.json"
    for escape in escapes:
        data.write_text(json.dumps(llava_records("sub/ok.png", escape)))
        spec = SourceSpec(str(data), "llava", image_folder=str(images))
        with pytest.raises(DataError, match=rf"image '{escape}' of record id 'r1' lies outside image_folder .*move the image in"):
            load_sources([spec])
        loaded = load_sources([spec], skip_bad_records=True)
        assert [c.images for c in loaded.conversations] == [(str(images / "sub" / "ok.png"),)] and len(loaded.skipped) == 1
    inside = [str(images / "sub" / "ok.png"), "sub/./ok.png"]  # absolute or not, inside the folder is fine
    data.write_text(json.dumps(llava_records(*inside)))
    assert len(load_sources([SourceSpec(str(data), "llava", image_folder=str(images))]).conversations) == 2
    data.write_text(json.dumps(llava_records("sub/ok\0.png")))
    with pytest.raises(DataError, match="holds a NUL character"):
        load_sources([SourceSpec(str(data), "llava", image_folder=str(images))])
