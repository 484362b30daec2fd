import math

import pytest
import torch

from xtune.config.schema import Config
from xtune.engine.optim import build_optimizer, build_scheduler, lr_factor


def test_warmup_then_cosine_to_floor():
    total, warmup = 100, 10
    factors = [lr_factor(step, total, warmup, 0.1) for step in range(total)]
    assert factors[:3] == pytest.approx([0.1, 0.2, 0.3])
    assert factors[warmup - 1] == pytest.approx(1.0) and factors[warmup] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1 :]))
    halfway = warmup + (total - warmup) // 2
    assert factors[halfway] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(total, total, warmup, 0.1) == pytest.approx(0.1)


def test_scheduler_drives_the_optimizer_lr():
    config = Config(llm_name_or_path="m", data_path="d", lr=1e-2, warmup_ratio=0.25)
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([parameter], config, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, config, total_steps=8)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(5e-3) and seen[1] == pytest.approx(1e-2)
    assert seen[-1] < seen[2]


@pytest.mark.parametrize("optim_type", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_step_and_their_state_survives_a_checkpoint(tmp_path, optim_type):
    pytest.importorskip("bitsandbytes")
    from xtune.engine.checkpoint import read_training_state, write_training_state

    config = Config(llm_name_or_path="m", data_path="d", lr=1e-2, optim_type=optim_type)

    def fresh():
        torch.manual_seed(0)
        parameter = torch.nn.Parameter(torch.randn(256, 256))
        optimizer = build_optimizer([parameter], config, torch.device("cpu"))
        return parameter, optimizer, build_scheduler(optimizer, config, total_steps=10)

    parameter, optimizer, scheduler = fresh()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = parameter.detach().clone()
    for _ in range(2):
        parameter.grad = torch.ones_like(parameter)
        optimizer.step()
        scheduler.step()
    assert not torch.equal(parameter, before)
    write_training_state(tmp_path, optimizer.state_dict(), scheduler, scaler, {"step": 2})
    copy, restored, restored_scheduler = fresh()
    progress, optimizer_state = read_training_state(tmp_path, restored_scheduler, scaler)
    assert progress == {"step": 2} and restored_scheduler.last_epoch == 2
    restored.load_state_dict(optimizer_state)
    for name, value in optimizer.state[parameter].items():
        other = restored.state[copy][name]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other
