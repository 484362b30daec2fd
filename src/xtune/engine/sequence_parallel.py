"""Sequence parallel (DeepSpeed-Ulysses; XTuner's `sequence_parallel_size`): each packed row split over N processes.

The world's ranks form groups of N consecutive ranks; a group trains on one data-parallel share of the batch, and
each of its ranks holds 1/N of every row's tokens (contiguous: rank i of the group the i-th shard), with their
global `position_ids` and the row's own sample boundaries (`cu_seq_lens`). Everything but attention works on the
shard alone. Attention trades the split (all-to-all): before it, each rank sends the other ranks its shard of their
heads and gets their shards of its heads, so it attends over the whole row for H/N of the heads, inside each sample
(`varlen_attention_forward`); after it, the inverse all-to-all gives each rank its tokens with every head back.
The next-token labels are shifted before the split (a shard's last token is trained on the next shard's first), so
the loss over all ranks is the loss of the whole row. Gradients are averaged over the whole world as in plain data
parallel: with each rank's loss a share of its row's, their sum is the whole batch's gradient.

A preference row (pairs, KTO's examples, a reward model's pairs) keeps its labels and `answer_ids` whole on each rank:
an answer's summed log-probability (a reward: its score at the answer's last token) is a sum of partial sums over the
group's shards (`own_positions`, `group_sum`), after which every rank of the group holds the whole answers and computes
the same objective. Each rank then takes 1/N of it as its loss: the all-reduce's backward sums the N ranks' gradients
of it again, so the group's gradient is that of the objective once, as in SFT (the sum of its ranks' losses).
"""

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import _functional_collectives as collectives
from torch.distributed.nn import functional as dist_functional
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from xtune.data.encode import IGNORE_INDEX
from xtune.engine.distributed import Ranks
from xtune.engine.loss import SHIFTED
from xtune.errors import ConfigError
from xtune.models.attention import VARLEN, varlen_attention_forward

ULYSSES = "xtune_ulysses"


@dataclass(frozen=True)
class SequenceParallel:
    size: int = 1
    rank: int = 0
    """This rank's place in its group: which shard of each row it holds."""
    data: Ranks = Ranks()
    """The data-parallel ranks: this rank's group among the world's groups (they split each global batch)."""
    group: object = None
    """The process group of this rank's N ranks (None when size is 1)."""


def setup(ranks: Ranks, size: int) -> SequenceParallel:
    """Groups of `size` consecutive ranks; every rank creates every group, as torch.distributed requires."""
    if size == 1:
        return SequenceParallel(data=ranks)
    if ranks.world % size:
        raise ConfigError(f"sequence_parallel_size = {size} does not divide the {ranks.world} processes; start a "
                          f"multiple of {size} (NPROC_PER_NODE), or set another size.")  # fmt: skip
    mine = None
    for first in range(0, ranks.world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= ranks.rank < first + size:
            mine = group
    data = Ranks(ranks.rank // size, ranks.world // size, ranks.local_rank)
    return SequenceParallel(size, ranks.rank % size, data, mine)


def check_config(config) -> None:
    """What sequence parallel cannot train (yet), refused by key before anything loads."""
    size = config.sequence_parallel_size
    if size == 1:
        return
    needs = [
        (not config.pack_to_max_length, "pack_to_max_length = True (a row of samples is what it splits)"),
        (config.visual_encoder_name_or_path is not None, "a language model (LLaVA's image tokens are not split yet)"),
        (config.max_length % size != 0, f"a max_length divisible by {size} (it is {config.max_length})"),
    ]
    if missing := [what for failing, what in needs if failing]:
        raise ConfigError(f"sequence_parallel_size = {size} needs {'; '.join(missing)}.")


def check_heads(size: int, model_config: dict) -> None:
    """Ulysses gives each rank of a group 1/size of the query heads and of the key/value heads; with fewer key/value
    heads than ranks (GQA), each key/value head is repeated to the ranks whose query heads read it."""
    heads = model_config.get("num_attention_heads")
    kv_heads = model_config.get("num_key_value_heads") or heads
    if size > 1 and (heads is None or heads % size or (kv_heads % size and size % kv_heads)):
        raise ConfigError(f"sequence_parallel_size = {size}: the model has {heads} attention heads and {kv_heads} "
                          f"key/value heads; Ulysses gives each of the {size} ranks a share of the heads, so {size} "
                          f"must divide the attention heads, and divide the key/value heads or be a multiple of them. "
                          "Choose such a size.")  # fmt: skip


def shard(batch: dict, size: int, rank: int) -> dict:
    """A collated packed row (one row, `collate_packed`'s keys) -> this rank's contiguous 1/size of its tokens, the
    labels shifted to the next token first; the boundaries and the longest sample stay the row's. A preference row
    (with `answer_ids`) keeps its labels and answer_ids whole, unshifted: its answers are the whole row's, each rank
    reads its positions' part (`own_positions`), and a stand-in part (`rank_batch` clears every label after the split)
    reads as one on every rank of the group. KTO's `kl` row is split alike."""
    start, end = _bounds(batch["input_ids"].shape[1], size, rank)
    cut = {key: batch[key][:, start:end] for key in ("input_ids", "position_ids", "attention_mask")}
    if "answer_ids" in batch:
        kl = {"kl": shard(batch["kl"], size, rank)} if "kl" in batch else {}
        return {**batch, **cut, **kl}
    next_labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    return {**batch, **cut, "labels": next_labels[:, start:end], SHIFTED: True}


def _bounds(length: int, size: int, rank: int) -> tuple[int, int]:
    if length % size:
        raise ValueError(f"a row of {length} tokens does not split into {size} equal shards")
    return rank * length // size, (rank + 1) * length // size


def own_positions(labels: torch.Tensor, answer_ids: torch.Tensor, sp: SequenceParallel):
    """A preference row's whole labels and answer_ids [rows, tokens] -> (next-token labels, answer_ids, first position)
    of this rank's shard: the next tokens' labels shifted on the whole row, as `shard` shifts SFT's."""
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    (next_labels, _), (answer_ids, start) = own_part(next_labels, sp), own_part(answer_ids, sp)
    return next_labels, answer_ids, start


def own_part(tensor: torch.Tensor, sp: SequenceParallel) -> tuple[torch.Tensor, int]:
    """A whole row's per-position tensor [rows, tokens] -> this rank's shard of it, and the shard's first position."""
    if sp.size == 1:
        return tensor, 0
    start, end = _bounds(tensor.shape[1], sp.size, sp.rank)
    return tensor[:, start:end], start


def group_sum(tensor: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """The sum of `tensor` over the group's ranks, differentiable (its backward sums the ranks' gradients)."""
    if sp.size == 1:
        return tensor
    return dist_functional.all_reduce(tensor, group=sp.group)


def group_max(tensor: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """The elementwise maximum of `tensor` over the group's ranks (no gradient)."""
    if sp.size == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=sp.group)
    return tensor


def sharding(collate_fn, sp: SequenceParallel):
    """`collate_fn` followed by this rank's `shard` (a plain function of ints: DataLoader workers pickle it)."""
    return collate_fn if sp.size == 1 else partial(_collate_and_shard, collate_fn, sp.size, sp.rank)


def _collate_and_shard(collate_fn, size: int, rank: int, items) -> dict:
    return shard(collate_fn(items), size, rank)


def use_ulysses(model, sp: SequenceParallel) -> None:
    """Switch a model already on the varlen attention (`use_varlen_attention`) to its Ulysses form over `sp`'s group."""
    if sp.size == 1:
        return
    check_heads(sp.size, model.config.to_dict())
    if model.config._attn_implementation != VARLEN:
        raise ConfigError("sequence_parallel_size > 1 needs the packed (varlen) attention: pack_to_max_length = True.")
    AttentionInterface.register(ULYSSES, partial(ulysses_attention_forward, group=sp.group, size=sp.size))
    AttentionMaskInterface.register(ULYSSES, sdpa_mask)
    model.set_attn_implementation(ULYSSES)


def ulysses_attention_forward(module, query, key, value, attention_mask, *, group, size: int, **kwargs):
    """query (1, heads, shard, head_dim), key/value (1, kv_heads, shard, head_dim) -> (1, shard, heads, head_dim):
    varlen attention over the whole row for this rank's heads, between two all-to-alls. Without `cu_seq_lens_q`
    (generation, on one rank) it is the varlen attention itself."""
    if kwargs.get("cu_seq_lens_q") is None:
        return varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if key.shape[1] % size:  # fewer key/value heads than ranks: rank j's query heads read key/value head j // repeats
        repeats = size // key.shape[1]
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    query, key, value = (_gather_sequence(tensor, group, size) for tensor in (query, key, value))
    output, _ = varlen_attention_forward(module, query, key, value, None, **kwargs)
    return _gather_heads(output, group, size), None


def _gather_sequence(tensor: torch.Tensor, group, size: int) -> torch.Tensor:
    """(1, heads, shard, d) of this rank's tokens -> (1, heads / size, row, d): its share of the heads, every token."""
    _, heads, tokens, dim = tensor.shape
    parts = tensor.reshape(size, heads // size, tokens, dim).contiguous()  # part j: rank j's heads
    received = collectives.all_to_all_single_autograd(parts, None, None, group)  # part j: rank j's tokens
    received = collectives.wait_tensor(received) if hasattr(collectives, "wait_tensor") else received
    return received.transpose(0, 1).reshape(1, heads // size, size * tokens, dim)


def _gather_heads(output: torch.Tensor, group, size: int) -> torch.Tensor:
    """(1, row, heads / size, d) from attention -> (1, shard, heads, d): this rank's tokens, every head."""
    _, row, heads, dim = output.shape
    parts = output.reshape(size, row // size, heads, dim).contiguous()  # part j: rank j's tokens
    received = collectives.all_to_all_single_autograd(parts, None, None, group)  # part j: rank j's heads
    received = collectives.wait_tensor(received) if hasattr(collectives, "wait_tensor") else received
    return received.permute(1, 0, 2, 3).reshape(1, row // size, size * heads, dim)
