"""Faults survived: a diverging loss stops (or skips) before the weights change, a full disk leaves the last
checkpoint (and the data cache) intact and the run resumable, damaged checkpoints are named, pickles are refused."""

import errno
import io
import json
import math
import re
import shutil

import pytest
import torch
from rich.console import Console
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from xtune.config.load import load_config
from xtune.engine import train as train_module
from xtune.engine.train import train
from xtune.errors import CheckpointError, TrainingError, XtuneError
from xtune.engine.checkpoint import run_folders

CONFIG = "tiny_internlm2_chat_lora_antonyms"
SHORT = ["max_steps=4", "save_steps=1", "save_total_limit=-1", "batch_size=4", "accumulative_counts=1",
         "evaluation_inputs=[]", "lora_dropout=0.0"]  # fmt: skip


def config_in(work_dir, *extra):
    config, _ = load_config(CONFIG, [f"work_dir={str(work_dir)!r}", *SHORT, *extra])
    return config


def poison_step(monkeypatch, bad_step: int):
    """The loss of every micro-batch of optimizer step `bad_step` becomes NaN."""
    real, calls = train_module.next_token_loss_sum, {"n": 0}

    def loss_sum(*args):
        calls["n"] += 1
        value = real(*args)
        return value * float("nan") if calls["n"] == bad_step else value

    monkeypatch.setattr(train_module, "next_token_loss_sum", loss_sum)


def adapter(checkpoint):
    return load_file(checkpoint / "adapter_model.safetensors")


def test_a_nan_loss_stops_before_the_weights_change(tmp_path, monkeypatch):
    poison_step(monkeypatch, bad_step=3)
    updates, build_optimizer = [], train_module.build_optimizer

    def counting_optimizer(*args, **kwargs):
        optimizer = build_optimizer(*args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: updates.append(1))
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", counting_optimizer)
    with pytest.raises(TrainingError, match=r"step 3 \(epoch 0, items \[.*\]\): loss nan.*--resume auto"):
        train(config_in(tmp_path), Console(file=io.StringIO()))
    (run,) = run_folders(tmp_path)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert all(torch.isfinite(t).all() for t in adapter(run / "checkpoint-2").values())
    assert len(updates) == 2  # steps 1 and 2 updated the weights; step 3 stopped before its update


def test_nan_policy_skip_leaves_the_weights_of_that_step_unchanged(tmp_path, monkeypatch):
    poison_step(monkeypatch, bad_step=3)
    output = io.StringIO()
    result = train(config_in(tmp_path, "nan_policy='skip'"), Console(file=output, width=200))
    assert "skipped step 3" in output.getvalue()
    assert math.isnan(result.losses[2]) and all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 2)
    run = result.run_dir
    before, after = adapter(run / "checkpoint-2"), adapter(run / "checkpoint-3")
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(torch.isfinite(t).all() for t in adapter(run / "checkpoint-4").values())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [3]


def test_a_full_disk_keeps_the_last_checkpoint_and_the_run_resumes_bit_identical(tmp_path, monkeypatch):
    from xtune.engine import checkpoint as checkpoint_module

    real_save, saves = checkpoint_module.save_file, {"n": 0}

    def full_disk_on_third_save(tensors, path, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk_on_third_save)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint-3 .*: the disk is full \(No space left on device\); nothing earlier is lost: checkpoint-2 is intact"):
        train(config_in(tmp_path / "a"), Console(file=io.StringIO()))
    monkeypatch.setattr(checkpoint_module, "save_file", real_save)
    (run,) = run_folders(tmp_path / "a")
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-1", "checkpoint-2"]

    resumed = train(config_in(tmp_path / "a"), Console(file=io.StringIO()), resume="auto")
    reference = train(config_in(tmp_path / "b"), Console(file=io.StringIO()))
    final, expected = adapter(resumed.checkpoint), adapter(reference.checkpoint)
    assert resumed.run_dir == run and all(torch.equal(final[name], expected[name]) for name in final)


FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"
"""safetensors' own words for ENOSPC: a SafetensorError, not an OSError (as seen on a 64 KiB tmpfs)."""


class Saver:
    """A model (and tokenizer) whose save writes one safetensors file, or fails as safetensors does on a full disk."""

    chat_template = None

    def __init__(self, full=False):
        self.full = full

    def save_pretrained(self, folder, **kwargs):
        folder.mkdir(parents=True, exist_ok=True)
        if self.full:
            raise SafetensorError(FULL_DISK)
        save_file({"w": torch.zeros(2)}, folder / "model.safetensors")


def test_a_full_disk_as_safetensors_reports_it_names_the_checkpoint_and_keeps_the_last(tmp_path):
    """Issue 23, item 16: a full XTUNE_HOME / disk was a raw SafetensorError."""
    from xtune.engine.checkpoint import save_checkpoint

    save_checkpoint(Saver(), Saver(), tmp_path, 1, {})
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(Saver(full=True), Saver(), tmp_path, 2, {})
    assert str(error.value) == (
        f"could not write checkpoint-2 in {tmp_path}: the disk is full (No space left on device); nothing earlier is "
        "lost: checkpoint-1 is intact and --resume auto continues from it."
    )
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint-1"]


def test_a_full_xtune_home_while_caching_the_data_names_the_entry_and_loses_nothing(tmp_path, tokenizer, monkeypatch):
    from xtune.config.schema import Config
    from xtune.data import dataset

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{n}", "output": f"a{n}"}) + "\n" for n in range(3)))
    config = Config(llm_name_or_path="xtune-tiny/internlm2-chat", data_path=str(data), max_length=48)
    earlier, report = dataset.prepare_samples(config, tokenizer)
    entry = dataset.cache_entry(config.model_copy(update={"max_length": 32}), tokenizer)

    def full_disk(tensors, path, *args, **kwargs):
        raise SafetensorError(FULL_DISK)

    monkeypatch.setattr(dataset, "save_file", full_disk)
    message = rf"could not write the data cache entry {re.escape(str(entry))}: the disk is full \(No space left on device\)\. Nothing earlier is lost"
    with pytest.raises(XtuneError, match=message):
        dataset.prepare_samples(config.model_copy(update={"max_length": 32}), tokenizer)
    assert not list(entry.parent.glob(".*.partial")) and not entry.exists()
    assert dataset.prepare_samples(config, tokenizer)[0] == earlier  # the earlier entry, read back
    assert dataset.is_cached(dataset.cache_entry(config, tokenizer))


def test_a_truncated_or_edited_checkpoint_file_is_named(tmp_path):
    from xtune.convert.pth_to_hf import pth_to_hf

    result = train(config_in(tmp_path / "runs", "max_steps=2"), Console(file=io.StringIO()))
    weights = result.checkpoint / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors differs from what was saved .*truncated or edited"):
        train(config_in(tmp_path / "runs", "max_steps=2"), Console(file=io.StringIO()), resume="auto")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors differs"):
        pth_to_hf(CONFIG, result.checkpoint, tmp_path / "out")
    weights.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # one bit flipped, same size
    with pytest.raises(CheckpointError, match="differs from what was saved"):
        pth_to_hf(CONFIG, result.checkpoint, tmp_path / "out")
    (result.checkpoint / "training_state.json").unlink()
    weights.write_bytes(data)
    with pytest.raises(CheckpointError, match="training_state.json is missing from the checkpoint"):
        pth_to_hf(CONFIG, result.checkpoint, tmp_path / "out")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_adapter_is_refused_without_being_unpickled(tmp_path):
    import pickle

    from xtune.infer.chat import load_chat_model

    marker = tmp_path / "pickle-ran"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}))
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"weights": Payload(marker)}))
    with pytest.raises(CheckpointError, match="adapter_model.bin, a pickle"):
        load_chat_model("xtune-tiny/llama", adapter=str(folder), dtype="fp32")
    assert not marker.exists()


def test_a_checkpoint_without_its_manifest_whose_files_are_cut_short_is_refused_by_name(tmp_path):
    """Issue 23, item 16: with manifest.json deleted, a truncated file was a raw SafetensorError."""
    from xtune.convert.pth_to_hf import pth_to_hf
    from xtune.engine.checkpoint import MANIFEST, verify_checkpoint

    checkpoint = train(config_in(tmp_path / "runs", "max_steps=1"), Console(file=io.StringIO())).checkpoint
    (checkpoint / MANIFEST).unlink()
    verify_checkpoint(checkpoint)  # whole files without a manifest: accepted, as from before manifests
    for name in ("adapter_model.safetensors", "training_state.safetensors", "training_state.json"):
        path = checkpoint / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        message = rf"{re.escape(str(path))} cannot be read \(.+\): it is cut short or damaged, and the checkpoint has no manifest.json"
        with pytest.raises(CheckpointError, match=message):
            train(config_in(tmp_path / "runs", "max_steps=1"), Console(file=io.StringIO()), resume="auto")
        with pytest.raises(CheckpointError, match=message):
            pth_to_hf(CONFIG, checkpoint, tmp_path / "out")
        path.write_bytes(data)


@pytest.mark.parametrize("name", ["llama", "clip-vision"])
def test_a_pickled_model_bin_loads_as_tensors_only_and_a_payload_in_it_never_runs(tmp_path, name):
    """Issue 23, item 16: a model folder's pytorch_model.bin (a pickle) is read with torch.load(weights_only=True);
    one holding anything but tensors is refused by name (it was a traceback advising weights_only=False)."""
    from xtune.models.llava import load_visual_encoder
    from xtune.models.load import load_model, resolve_model_path

    load = load_model if name == "llama" else load_visual_encoder
    folder = tmp_path / name
    shutil.copytree(resolve_model_path(f"xtune-tiny/{name}"), folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    loaded = load(folder).state_dict()
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[key], weights[key]) for key in weights)
    marker = tmp_path / "pickle-ran"
    torch.save({**weights, "extra": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin is a pickle that torch's weights-only loader refuses \(.*posix.system.*\): loading it whole could run code"):
        load(folder)
    assert not marker.exists()
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # what the refusal kept from running
    assert marker.exists()


def test_a_damaged_manifest_or_run_config_is_named_not_a_traceback(tmp_path):
    from xtune.engine.checkpoint import MANIFEST, find_resume_checkpoint

    run = train(config_in(tmp_path, "max_steps=1"), Console(file=io.StringIO())).run_dir
    checkpoint = run / "checkpoint-1"
    (checkpoint / MANIFEST).write_text('{"sha256": ')  # cut short
    with pytest.raises(CheckpointError, match=r"manifest.json is not a manifest xtune wrote"):
        find_resume_checkpoint(tmp_path, str(checkpoint))
    (checkpoint / MANIFEST).unlink()
    (run / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"its run's config.json is missing or damaged"):
        train(config_in(tmp_path, "max_steps=2"), resume=str(checkpoint))
    (run / "config.json").unlink()  # a checkpoint copied out of its run folder has none
    with pytest.raises(CheckpointError, match=r"resumes inside the run folder that wrote it"):
        train(config_in(tmp_path, "max_steps=2"), resume=str(checkpoint))
