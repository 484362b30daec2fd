"""`torch_compile = True`: each decoder layer compiled by torch.compile."""

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks (transformers names their classes `...DecoderLayer`)."""
    return [module for module in model.modules() if type(module).__name__.endswith("DecoderLayer")]


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compile each decoder layer in place, with dynamic shapes (packed rows and samples vary in length), and
    return how many. Layer by layer rather than the whole model: the layers share one compiled graph, the
    per-sample attention of packed rows breaks the graph only inside each layer, and peft, gradient
    checkpointing, DDP and FSDP2 see the same modules as without."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
