import io

import pytest
from rich.console import Console

from xtune.config.load import load_config
from xtune.engine.train import train


@pytest.mark.parametrize("packed", [False, True])
def test_short_run_loss_falls_packed_or_not(tmp_path, packed):
    overrides = [f"work_dir={str(tmp_path)!r}", "max_steps=30", "max_epochs=1", f"pack_to_max_length={packed}"]
    overrides += ["batch_size=2", "max_length=128"] if packed else []
    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", overrides)
    output = io.StringIO()
    result = train(config, Console(file=output, width=200))
    assert len(result.losses) == 30
    assert sum(result.losses[-5:]) / 5 < 0.7 * sum(result.losses[:5]) / 5
    assert ("packed into" in output.getvalue()) == packed
