import os
from pathlib import Path

import pytest

from xtune.errors import CheckpointError

from xtune.engine.checkpoint import (
    MANIFEST,
    complete_checkpoints,
    new_run_dir,
    prune_checkpoints,
    read_run_meta,
    save_checkpoint,
)


class FakeSaver:
    chat_template = None

    def __init__(self, fail=False):
        self.fail = fail

    def save_pretrained(self, folder, **kwargs):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "weights.bin").write_bytes(b"w")
        (folder / "tokenizer_config.json").write_text("{}")
        if self.fail:
            raise OSError("disk full")


def test_new_run_dir_never_reuses_a_folder(tmp_path):
    first, second = new_run_dir(tmp_path), new_run_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()


def test_save_is_atomic_and_prune_keeps_the_newest(tmp_path):
    for step in (5, 10, 15):
        path = save_checkpoint(FakeSaver(), FakeSaver(), tmp_path, step, {"prompt_template": "internlm2_chat"})
        assert path.name == f"checkpoint-{step}"
    assert read_run_meta(tmp_path / "checkpoint-10") == {"prompt_template": "internlm2_chat", "step": 10}
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["checkpoint-5"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-15"]
    assert prune_checkpoints(tmp_path, keep=-1) == []


def test_a_failed_save_leaves_no_complete_looking_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="could not write checkpoint-7"):
        save_checkpoint(FakeSaver(fail=True), FakeSaver(), tmp_path, 7, {})
    assert complete_checkpoints(tmp_path) == []
    assert list(tmp_path.iterdir()) == []  # nor a partial folder left taking space


def test_each_file_is_read_once_and_on_disk_before_the_manifest_and_the_rename(tmp_path, monkeypatch):
    from xtune.engine.checkpoint import write_manifest

    (tmp_path / "warm").mkdir()
    write_manifest(tmp_path / "warm")  # this machine's signing key exists before the spying starts
    events = []
    open_path, fsync, rename = Path.open, os.fsync, os.replace

    def opening(path, mode="r", *args, **kwargs):
        if mode == "rb":
            events.append(("read", path.name))
        return open_path(path, mode, *args, **kwargs)

    def fsyncing(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def renaming(source, destination):
        events.append(("rename", Path(destination).name))
        rename(source, destination)

    def write_state(folder):
        (folder / "state").mkdir()
        (folder / "state" / "optimizer.bin").write_bytes(b"o")

    monkeypatch.setattr(Path, "open", opening)
    monkeypatch.setattr(os, "fsync", fsyncing)
    monkeypatch.setattr(os, "replace", renaming)
    final = save_checkpoint(FakeSaver(), FakeSaver(), tmp_path, 4, {}, write_extra=write_state)
    names = {path.stat().st_ino: path.name for path in (final, *final.rglob("*"))} | {tmp_path.stat().st_ino: "run"}
    events = [(kind, names.get(what, what)) for kind, what in events]
    files = ["optimizer.bin", "tokenizer_config.json", "weights.bin", "xtune_run.json"]  # in the order of their paths
    read_and_synced = [event for name in files for event in (("read", name), ("fsync", name))]
    folders = [("fsync", "checkpoint-4"), ("fsync", "state")]  # the partial folder (renamed since) and its subfolder
    assert events == [*read_and_synced, ("fsync", MANIFEST), *folders, ("rename", "checkpoint-4"), ("fsync", "run")]


def test_existing_checkpoint_is_never_overwritten(tmp_path):
    save_checkpoint(FakeSaver(), FakeSaver(), tmp_path, 3, {})
    with pytest.raises(FileExistsError):
        save_checkpoint(FakeSaver(), FakeSaver(), tmp_path, 3, {})


def test_full_weights_missing_from_a_checkpoint_are_refused(tmp_path):
    from safetensors.torch import save_file

    from xtune.engine.train import load_trainable_weights
    from xtune.errors import CheckpointError
    from xtune.models.load import load_model, resolve_model_path

    model = load_model(resolve_model_path("xtune-tiny/llama"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    load_trainable_weights(model, tmp_path, whole_model=True)
    del state["model.norm.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks 1 of the model's weights, e.g. 'model.norm.weight'"):
        load_trainable_weights(model, tmp_path, whole_model=True)


def test_saved_files_are_readable_as_the_umask_allows(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from xtune.convert.folder import new_folder

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, vocab_size=64))  # fmt: skip
    old = os.umask(0o022)
    try:
        final = save_checkpoint(model, FakeSaver(), tmp_path, 1, {})
        with new_folder(tmp_path / "converted") as folder:
            model.save_pretrained(folder)
    finally:
        os.umask(old)
    for saved in (final, tmp_path / "converted"):  # transformers writes safetensors with mode 0600
        modes = {path.name: path.stat().st_mode & 0o777 for path in saved.iterdir() if path.is_file()}
        assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}


def test_a_prune_killed_midway_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    import shutil

    for step in (1, 2, 3):
        save_checkpoint(FakeSaver(), FakeSaver(), tmp_path, step, {})
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):  # the process dies after deleting one file of the folder
        next(Path(path).rglob("*.bin")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(tmp_path, keep=2)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]  # none half deleted
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]  # the leftover is gone


def test_resume_keeps_the_metrics_up_to_its_step_and_drops_a_half_written_line(tmp_path, monkeypatch):
    import json
    import os

    from xtune.engine.train import _keep_metrics_up_to

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    _keep_metrics_up_to(metrics, 2)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))  # killed before the rename
    with pytest.raises(KeyboardInterrupt):
        _keep_metrics_up_to(metrics, 1)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]  # nothing lost


def test_an_adapter_saves_its_embeddings_when_the_vocabulary_grew_without_asking_the_hub(xtune_home, monkeypatch, tmp_path):
    """peft would look the base's config up on the Hub at every save when base_model_name_or_path is an id."""
    import peft.utils.other
    from safetensors.torch import load_file

    from xtune.config.schema import Config
    from xtune.engine.checkpoint import peft_save_options
    from xtune.models.load import load_model, resolve_model_path
    from xtune.models.lora import prepare_trainable

    def no_hub(*args, **kwargs):
        raise AssertionError("a Hub lookup while saving")

    monkeypatch.setattr(peft.utils.other, "file_exists", no_hub)
    config = Config(llm_name_or_path="xtune-tiny/internlm2-chat", data_path="-", lora_dropout=0.0)
    model = prepare_trainable(load_model(resolve_model_path(config.llm_name_or_path)), config)
    assert model.peft_config["default"].base_model_name_or_path == "xtune-tiny/internlm2-chat"
    assert peft_save_options(model) == {"save_embedding_layers": False}
    model.base_model.model.resize_token_embeddings(model.get_input_embeddings().num_embeddings + 64)
    assert peft_save_options(model) == {"save_embedding_layers": True}
    model.save_pretrained(tmp_path, **peft_save_options(model))  # no Hub lookup (no_hub raises)
    assert any("embed_tokens" in name for name in load_file(tmp_path / "adapter_model.safetensors"))


def test_xtuners_names_link_to_the_run_and_leave_anything_else_alone(tmp_path):
    from xtune.engine.checkpoint import keep_config_file, name_as_xtuner

    work_dir = tmp_path / "work"
    first, second = work_dir / "run1", work_dir / "run2"
    for run in (first, second):
        (run / "checkpoint-3").mkdir(parents=True)
    name_as_xtuner(first / "checkpoint-3", 12)
    assert (work_dir / "iter_12.pth").resolve() == (first / "checkpoint-3").resolve()
    name_as_xtuner(second / "checkpoint-3", 12)  # a newer run's checkpoint takes the name; nothing is deleted
    assert (work_dir / "iter_12.pth").resolve() == (second / "checkpoint-3").resolve()
    assert (first / "checkpoint-3").is_dir()
    (work_dir / "iter_40.pth").write_bytes(b"XTuner's own checkpoint")
    (second / "checkpoint-10").mkdir()
    name_as_xtuner(second / "checkpoint-10", 40)
    assert (work_dir / "iter_40.pth").read_bytes() == b"XTuner's own checkpoint"
    assert sorted(path.name for path in work_dir.iterdir()) == ["iter_12.pth", "iter_40.pth", "run1", "run2"]

    config = tmp_path / "my_cfg.py"
    config.write_text("lr = 1e-4\n")
    keep_config_file(config, first)
    assert (first / "my_cfg.py").read_text() == (work_dir / "my_cfg.py").read_text() == "lr = 1e-4\n"
    config.write_text("lr = 2e-4\n")
    keep_config_file(config, second)
    assert (work_dir / "my_cfg.py").read_text() == "lr = 2e-4\n" and (first / "my_cfg.py").read_text() == "lr = 1e-4\n"
    (work_dir / "my_cfg.py").unlink()
    (work_dir / "my_cfg.py").write_text("the user's own file")
    keep_config_file(config, second)
    assert (work_dir / "my_cfg.py").read_text() == "the user's own file"
    shared = tmp_path / "shared" / "cfg.py"
    shared.parent.mkdir()
    shared.write_text("lr = 3e-4\n")
    (work_dir / "cfg.py").symlink_to(shared)
    keep_config_file(shared, first)
    assert os.readlink(work_dir / "cfg.py") == str(shared)  # not replaced by a link into the run


def test_pruning_removes_the_names_of_deleted_checkpoints(tmp_path):
    from xtune.engine.checkpoint import name_as_xtuner, prune_checkpoints

    run = tmp_path / "work" / "run"
    for step in (1, 2, 3):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        name_as_xtuner(run / f"checkpoint-{step}", 2 * step)
    (tmp_path / "work" / "iter_9.pth").symlink_to(tmp_path / "unmounted" / "iter_9.pth")  # the user's, dangling
    assert [path.name for path in prune_checkpoints(run, keep=2)] == ["checkpoint-1"]
    assert sorted(path.name for path in (tmp_path / "work").glob("iter_*")) == ["iter_4.pth", "iter_6.pth", "iter_9.pth"]
