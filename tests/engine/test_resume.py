"""A run killed with SIGKILL and resumed ends bit-identical to one that was never interrupted."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from xtune.config.load import load_config
from xtune.engine.train import train
from xtune.errors import CheckpointError
from xtune.engine.checkpoint import run_folders

pytestmark = pytest.mark.slow

OPTIONS = ["max_steps=40", "save_steps=10", "save_total_limit=-1", "batch_size=4", "accumulative_counts=2",
           "lora_dropout=0.1", "evaluation_freq=1000", "evaluation_inputs=[]"]  # fmt: skip


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in records if "loss" in r]


def test_sigkill_then_resume_auto_is_bit_identical(tmp_path):
    killed_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "xtune.cli", "train", "tiny_internlm2_chat_lora_antonyms",
               "--work-dir", str(killed_dir), "--cfg-options", *OPTIONS]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(killed_dir.glob("*/checkpoint-20")) and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    (run,) = run_folders(killed_dir)
    assert not (run / "checkpoint-40").exists()

    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", [f"work_dir={str(killed_dir)!r}", *OPTIONS])
    resumed = train(config, Console(file=io.StringIO()), resume="auto")
    assert resumed.run_dir == run and len(resumed.losses) == 40 - int(resumed.losses and 20)

    reference_config, _ = load_config("tiny_internlm2_chat_lora_antonyms", [f"work_dir={str(tmp_path / 'ref')!r}", *OPTIONS])
    reference = train(reference_config, Console(file=io.StringIO()))

    assert losses(run) == losses(reference.run_dir)
    final = load_file(run / "checkpoint-40" / "adapter_model.safetensors")
    expected = load_file(reference.run_dir / "checkpoint-40" / "adapter_model.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[name], expected[name]) for name in final)


def test_resume_auto_starts_fresh_in_an_empty_work_dir_and_refuses_a_changed_config(tmp_path):
    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", [f"work_dir={str(tmp_path)!r}", "max_steps=2", "save_steps=1"])
    output = io.StringIO()
    train(config, Console(file=output, width=200), resume="auto")  # a job script may always pass --resume auto
    assert "no complete checkpoint under" in output.getvalue() and "starting a new run" in output.getvalue()
    changed, _ = load_config("tiny_internlm2_chat_lora_antonyms", [f"work_dir={str(tmp_path)!r}", "max_steps=2", "seed=5"])
    with pytest.raises(CheckpointError, match="the config changed \\(seed: 0 -> 5\\)"):
        train(changed, Console(file=io.StringIO()), resume="auto")


def assert_resumed_from_the_middle_ends_bit_identical(tmp_path, name: str, options: list[str], weights: str) -> None:
    """A 4-step run, and a copy of it resumed from checkpoint-2: the same losses and the same final weights."""
    import shutil

    config, _ = load_config(name, [f"work_dir={str(tmp_path / 'a')!r}", *options])
    reference = train(config, Console(file=io.StringIO()))
    resumed_dir = tmp_path / "b" / reference.run_dir.name
    shutil.copytree(reference.run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoint-4")
    config_b, _ = load_config(name, [f"work_dir={str(tmp_path / 'b')!r}", *options])
    resumed = train(config_b, Console(file=io.StringIO()), resume="auto")
    assert resumed.losses == reference.losses[2:]
    final = load_file(resumed_dir / "checkpoint-4" / weights)
    expected = load_file(reference.run_dir / "checkpoint-4" / weights)
    assert all(torch.equal(final[key], expected[key]) for key in expected)


def test_full_fine_tuning_resumes_bit_identical(tmp_path):
    options = ["max_steps=4", "save_steps=2", "save_total_limit=-1", "evaluation_inputs=[]"]
    assert_resumed_from_the_middle_ends_bit_identical(tmp_path, "tiny_llama_full_antonyms", options, "model.safetensors")


@pytest.mark.parametrize("optim_type", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_adamw_saves_and_resumes_exactly(tmp_path, optim_type):
    """bitsandbytes' state holds one quantization map for every parameter: it crashed the first save."""
    pytest.importorskip("bitsandbytes")
    options = ["max_steps=4", "save_steps=2", "save_total_limit=-1", "evaluation_inputs=[]", f"optim_type={optim_type!r}",
               "batch_size=4", "accumulative_counts=1", "lora_dropout=0.0"]  # fmt: skip
    name = "tiny_internlm2_chat_lora_antonyms"
    assert_resumed_from_the_middle_ends_bit_identical(tmp_path, name, options, "adapter_model.safetensors")


def test_a_run_from_before_a_key_existed_resumes_only_with_that_keys_old_meaning(tmp_path):
    """A run that trained before router_aux_loss_coef existed trained without the router loss: resuming it with the
    new default (the model's own coefficient) would change what is trained, so it is refused, naming the key."""
    import json

    from xtune.engine.train import check_resumable

    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", [f"work_dir={str(tmp_path)!r}", "max_steps=2"])
    run = tmp_path / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    old = json.loads(config.model_dump_json())
    del old["router_aux_loss_coef"]
    (run / "config.json").write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match=r"router_aux_loss_coef: 0.0 -> None"):
        check_resumable(config, run / "checkpoint-1", 1)
    check_resumable(config.model_copy(update={"router_aux_loss_coef": 0.0}), run / "checkpoint-1", 1)  # as it trained


def test_resume_from_xtuners_name_for_a_checkpoint_continues_its_run(tmp_path):
    """`--resume WORK_DIR/iter_N.pth` (the link XTuner's name gives a checkpoint): the run folder it points into."""
    options = [f"work_dir={str(tmp_path)!r}", "max_steps=2", "save_steps=1", "save_total_limit=-1", "evaluation_inputs=[]"]
    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", options)
    first = train(config, Console(file=io.StringIO()))
    assert (tmp_path / "iter_1.pth").resolve() == (first.run_dir / "checkpoint-1").resolve()
    shutil.rmtree(first.run_dir / "checkpoint-2")
    resumed = train(config, Console(file=io.StringIO()), resume=str(tmp_path / "iter_1.pth"))
    assert resumed.run_dir == first.run_dir and resumed.losses == first.losses[1:]


def test_a_run_from_before_a_key_existed_resumes_only_with_that_keys_default(tmp_path):
    from xtune.engine.train import check_resumable

    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", [f"work_dir={str(tmp_path)!r}", "max_steps=2", "save_steps=1"])
    run = train(config, Console(file=io.StringIO())).run_dir
    saved = json.loads((run / "config.json").read_text())
    for key in ("sequence_parallel_size", "warmup_steps", "max_dataset_length"):
        saved.pop(key)
    (run / "config.json").write_text(json.dumps(saved))
    check_resumable(config, run / "checkpoint-2", world=1)  # the defaults: what the old run trained with
    for change in ("warmup_steps=100", "max_dataset_length=10"):
        changed, _ = load_config("tiny_internlm2_chat_lora_antonyms", [f"work_dir={str(tmp_path)!r}", "max_steps=2", change])
        with pytest.raises(CheckpointError, match=f"the config changed \\({change.split('=')[0]}: None -> "):
            check_resumable(changed, run / "checkpoint-2", world=1)
