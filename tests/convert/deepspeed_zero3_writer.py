"""One rank of a DeepSpeed ZeRO-3 run that writes XTuner's `iter_N.pth/` folders, started twice (gloo, CPU) by
tests/convert/test_xtuner_checkpoints.py: `python deepspeed_zero3_writer.py SPEC WORK_DIR`.

SPEC (a torch file) lists the checkpoints: each a tag (`iter_2.pth`), "bf16" or "fp32", the trained and the
frozen parameters in XTuner's names, and whether frozen parameters are left out of the checkpoint (XTuner's
setting). The model is a tree of modules holding those parameters under those names: DeepSpeed partitions it,
takes one AdamW step with lr 0 (matrices and vectors in two parameter groups; the optimizer files then hold Adam's
state, the weights are unchanged) and saves `WORK_DIR/<tag>/` as mmengine's DeepSpeedStrategy does, with its
runner's state (a message hub of HistoryBuffers, a stand-in class under mmengine's name) in the model states. Kept
apart from the test module so that each rank imports torch and DeepSpeed only."""

import sys
import types

import deepspeed
import numpy as np
import torch
from torch import nn


def mmengine_state() -> dict:
    module = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:
        def __init__(self):
            self._log_history, self._count_history, self.max_length = np.array([1.5, 2.5]), np.array([1, 1]), 1000000

    HistoryBuffer.__module__, HistoryBuffer.__qualname__, module.HistoryBuffer = module.__name__, "HistoryBuffer", HistoryBuffer
    for name in ("mmengine", "mmengine.logging"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules[module.__name__] = module
    return {"meta": {"epoch": 0, "iter": 2, "seed": 0, "mmengine": "0.10.4"},
            "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}, "runtime_info": {"iter": 2}},
            "param_schedulers": [{"base_lrs": [2e-4], "last_step": 2}]}  # fmt: skip


class Node(nn.Module):
    """A module of the tree; its forward calls its children, so ZeRO-3 gathers each one's parameters in turn."""

    def forward(self):
        total = sum((parameter.float() ** 2).sum() for parameter in self.parameters(recurse=False))
        for child in self.children():
            total = total + child()
        return total


def tree(trained: dict, frozen: dict) -> Node:
    root = Node()
    for parameters, requires_grad in ((trained, True), (frozen, False)):
        for name, tensor in parameters.items():
            *path, leaf = name.split(".")
            node = root
            for part in path:
                if part not in node._modules:
                    node.add_module(part, Node())
                node = node._modules[part]
            node.register_parameter(leaf, nn.Parameter(tensor.clone(), requires_grad=requires_grad))
    return root


def main(spec: str, work_dir: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    for checkpoint in torch.load(spec, weights_only=True):
        model = tree(checkpoint["trained"], checkpoint["frozen"])
        trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
        groups = [[p for p in trained if p.dim() > 1], [p for p in trained if p.dim() <= 1]]  # as weight decay splits them
        optimizer = torch.optim.AdamW([{"params": group} for group in groups if group], lr=0.0, weight_decay=0.0)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
                  "bf16": {"enabled": checkpoint["dtype"] == "bf16"}, "zero_optimization": {"stage": 3}}  # fmt: skip
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        engine.backward(engine())
        engine.step()
        engine.save_checkpoint(work_dir, tag=checkpoint["tag"], client_state=mmengine_state(), save_latest=False,
                               exclude_frozen_parameters=checkpoint["exclude_frozen"])  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:])
