"""Engine changes tried from the benchmarks without editing src/: each `use_*` patches xtune in this process only.

- `use_chunked_loss(model)`: the head and the cross-entropy run per chunk of tokens, each chunk's logits
  recomputed in backward instead of kept, so the [tokens, vocab] logits (fp32 for the loss) never exist whole.
  The model's `lm_head` is swapped for a module that returns the hidden states, and
  `xtune.engine.train.causal_lm_loss_sum` for one that applies the head per chunk.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


class HiddenStates(torch.nn.Module):
    """Stands in for the output head: passes the hidden states through and keeps the head to apply later."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions, as xtune's `causal_lm_loss_sum`, from hidden states."""
    hidden = hidden[:, :-1].flatten(0, 1)
    labels = labels[:, 1:].flatten()
    trained = labels != IGNORE_INDEX
    hidden, labels = hidden[trained], labels[trained]  # untrained positions need no logits at all
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.numel(), chunk):
        total = total + checkpoint(
            _chunk_loss, hidden[start : start + chunk], weight, labels[start : start + chunk], use_reentrant=False
        )
    return total


def use_chunked_loss(model, chunk: int = 1024) -> None:
    """Patch `model` (a transformers causal LM, or a peft model around one) and xtune's loss function."""
    import xtune.engine.train as engine

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if isinstance(head, HiddenStates):
        return
    base.lm_head = HiddenStates(head)

    def loss_sum(hidden, labels):
        return chunked_lm_loss_sum(hidden, base.lm_head.head.weight, labels, chunk)

    engine.causal_lm_loss_sum = loss_sum


def patch_train_to_chunk_loss(chunk: int = 1024) -> None:
    """Make `xtune.engine.train.train` build models with the chunked loss (wraps `prepare_trainable`)."""
    import xtune.engine.train as engine

    prepare = engine.prepare_trainable

    def prepare_and_chunk(model, config, *args, **kwargs):
        model = prepare(model, config, *args, **kwargs)
        use_chunked_loss(model, chunk)
        return model

    engine.prepare_trainable = prepare_and_chunk
