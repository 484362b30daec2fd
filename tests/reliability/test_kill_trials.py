"""Ten seeded SIGKILLs at random points of a tiny run (some mid-checkpoint-save, some mid-cache-build): each
`--resume auto` ends bit-identical to the uninterrupted run, and no kill leaves a checkpoint or a data-cache
entry that looks complete but is not."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from xtune.data.dataset import is_cached
from xtune.engine.checkpoint import complete_checkpoints, run_folders, verify_checkpoint

pytestmark = pytest.mark.slow

OPTIONS = ["max_steps=24", "save_steps=4", "save_total_limit=2", "batch_size=4", "accumulative_counts=2",
           "lora_dropout=0.1", "evaluation_inputs=[]"]  # fmt: skip
TRIALS = 10
KILL_ON_PARTIAL_SAVE = {2, 5, 8}
KILL_IN_STARTUP = {0, 4}


def command(work_dir, *extra):
    return [sys.executable, "-m", "xtune.cli", "train", "tiny_internlm2_chat_lora_antonyms", "--work-dir", str(work_dir),
            *extra, "--cfg-options", *OPTIONS]  # fmt: skip


def fresh_home(tmp_path, name, xtune_home):
    """An XTUNE_HOME with the tiny models but no data cache, so early kills land in the cache build."""
    home = tmp_path / name
    home.mkdir()
    (home / "tiny").symlink_to(xtune_home / "tiny")
    (home / "tiny-data").symlink_to(xtune_home / "tiny-data")
    return home


def run_to_end(arguments, environment):
    completed = subprocess.run(arguments, env=environment, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]


def finished_run(work_dir):
    (run,) = [run for run in run_folders(work_dir) if (run / "checkpoint-24").is_dir()]
    return run


def training_started(work_dir) -> bool:
    return any(path.stat().st_size for path in work_dir.glob("*/metrics.jsonl"))


def step_losses(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def test_ten_kills_at_random_points_all_resume_bit_identical(tmp_path, xtune_home):
    from xtune.models.load import resolve_model_path

    from xtune.testing.tasks import tiny_dataset_path

    resolve_model_path("xtune-tiny/internlm2-chat")  # built once, shared by every trial
    tiny_dataset_path("antonyms")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "XTUNE_HOME": str(fresh_home(tmp_path, "home-ref", xtune_home))}
    started = time.monotonic()
    process = subprocess.Popen(command(tmp_path / "reference"), env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and not training_started(tmp_path / "reference"):
        time.sleep(0.005)
    startup = time.monotonic() - started
    assert process.wait() == 0
    training = time.monotonic() - started - startup
    reference = finished_run(tmp_path / "reference")
    expected = load_file(reference / "checkpoint-24" / "adapter_model.safetensors")

    outcomes = []
    for trial in range(TRIALS):
        rng = random.Random(trial)
        work_dir, home = tmp_path / f"trial-{trial}", fresh_home(tmp_path, f"home-{trial}", xtune_home)
        environment["XTUNE_HOME"] = str(home)
        process = subprocess.Popen(command(work_dir), env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if trial in KILL_ON_PARTIAL_SAVE:  # while the k-th checkpoint is being written
            k, seen = rng.randint(1, 4), set()
            while process.poll() is None and len(seen) < k:
                seen |= {p.name for p in work_dir.glob("*/.checkpoint-*.partial")}
                time.sleep(0.001)
            when = f"mid-save {k}"
        elif trial in KILL_IN_STARTUP:  # loading, tokenizing, building the data cache
            time.sleep(rng.uniform(0.5, startup))
            when = "startup"
        else:
            while process.poll() is None and not training_started(work_dir):
                time.sleep(0.005)
            time.sleep(rng.uniform(0, training))
            when = "training"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

        for run in run_folders(work_dir):
            for checkpoint in complete_checkpoints(run):  # a complete-looking checkpoint is complete
                verify_checkpoint(checkpoint)
                assert (checkpoint / "manifest.json").is_file()
        for entry in (home / "data-cache").iterdir() if (home / "data-cache").exists() else []:
            assert entry.name.startswith(".") or is_cached(entry), f"half-built cache entry {entry}"
        saved = sorted(int(c.name.split("-")[1]) for run in run_folders(work_dir) for c in complete_checkpoints(run))

        run_to_end(command(work_dir, "--resume", "auto"), environment)
        run = finished_run(work_dir)
        final = load_file(run / "checkpoint-24" / "adapter_model.safetensors")
        assert all(torch.equal(final[name], expected[name]) for name in expected), f"trial {trial} ({when})"
        assert step_losses(run) == step_losses(reference), f"trial {trial} ({when})"
        outcomes.append((trial, when, saved[-1] if saved else 0))
    print(f"\n{TRIALS} kills survived (trial, when, resumed from step): {outcomes}")
    assert len({step for _, _, step in outcomes}) >= 3  # the kills landed at different points


def test_a_dpo_run_killed_in_training_resumes_bit_identical(tmp_path, xtune_home):
    """The preference stage on the same loop: a SIGKILL between checkpoints, `--resume auto`, the same losses and
    adapter as the run that was never killed."""
    from xtune.models.load import resolve_model_path

    from xtune.testing.tasks import tiny_dataset_path

    resolve_model_path("xtune-tiny/internlm2-chat")
    tiny_dataset_path("antonym-pairs")
    options = ["max_steps=12", "save_steps=4", "evaluation_inputs=[]", "max_epochs=1"]

    def dpo(work_dir, *extra):
        return [sys.executable, "-m", "xtune.cli", "train", "tiny_internlm2_chat_lora_dpo_antonyms", "--work-dir",
                str(work_dir), *extra, "--cfg-options", *options]  # fmt: skip

    environment = {**os.environ, "OMP_NUM_THREADS": "1", "XTUNE_HOME": str(xtune_home)}
    run_to_end(dpo(tmp_path / "reference"), environment)
    (reference,) = [run for run in run_folders(tmp_path / "reference") if (run / "checkpoint-12").is_dir()]
    process = subprocess.Popen(dpo(tmp_path / "killed"), env=environment, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    while process.poll() is None and not any((tmp_path / "killed").glob("*/checkpoint-4/manifest.json")):
        time.sleep(0.005)
    time.sleep(0.5)  # into the steps after the first checkpoint
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not any((tmp_path / "killed").glob("*/checkpoint-12")), "the kill came after the run's end"
    run_to_end(dpo(tmp_path / "killed", "--resume", "auto"), environment)
    (run,) = [run for run in run_folders(tmp_path / "killed") if (run / "checkpoint-12").is_dir()]
    final = load_file(run / "checkpoint-12" / "adapter_model.safetensors")
    expected = load_file(reference / "checkpoint-12" / "adapter_model.safetensors")
    assert all(torch.equal(final[name], expected[name]) for name in expected)
    assert step_losses(run) == step_losses(reference)
    margins = [r["rewards/margins"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(margins) == 12
