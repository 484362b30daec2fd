"""Metric sinks: metrics.jsonl always, TensorBoard and W&B (offline) on request, loss.png plotted."""

import io
import json

import pytest
from rich.console import Console

from xtune.config.load import load_config
from xtune.config.schema import Config
from xtune.engine.hooks import MetricSinks, plot_loss
from xtune.engine.train import train


def test_a_short_run_writes_tensorboard_events_wandb_offline_and_loss_png(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config, _ = load_config(
        "tiny_internlm2_chat_lora_antonyms",
        [f"work_dir={str(tmp_path)!r}", "max_steps=4", "save_steps=2", "accumulative_counts=1", "evaluation_freq=2",
         "evaluation_max_new_tokens=4", "report_to=['tensorboard', 'wandb']"],
    )  # fmt: skip
    result = train(config, Console(file=io.StringIO()))
    run = result.run_dir

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    losses = [event.value for event in events.Scalars("train/loss")]
    assert losses == pytest.approx(result.losses, rel=1e-6)
    assert [event.step for event in events.Scalars("train/lr")] == [1, 2, 3, 4]

    (offline,) = (run / "wandb").glob("offline-run-*")
    assert offline.name.endswith((run / "wandb_id").read_text())
    assert list(offline.glob("*.wandb"))

    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob(".loss.png*"))


def test_only_the_main_rank_writes(tmp_path):
    sinks = MetricSinks(tmp_path, Config(llm_name_or_path="m", data_path="d", report_to=["tensorboard"]), main=False)
    sinks.log({"step": 1, "loss": 1.0})
    sinks.close()
    assert list(tmp_path.iterdir()) == []


def test_loss_png_from_metrics_skips_evaluation_lines(tmp_path):
    lines = [{"step": 1, "loss": 3.0}, {"step": 1, "evaluation": []}, {"step": 2, "loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert plot_loss(tmp_path) == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").stat().st_size > 1000
