"""Log-likelihood scoring: each option's answer text after the prompt, the most likely option the prediction.

Sequences are packed into rows as training packs them (best-fit, each sample its own `cu_seq_lens` segment, varlen
attention keeping them apart), one forward per row of `tokens_per_batch` tokens; a model whose attention cannot be
swapped for the packed one is run on right-padded batches instead. Only the positions read go through the head.

When every option's answer is one token (" A", " B", ... in every tokenizer xtune knows), the prompt is shared, so
one forward of the prompt gives them all: the next-token distribution at its last position, read at each option's
token. That is exactly what one forward per option gives (tested), at a quarter of the tokens. Otherwise each option
is its own sequence, prompt + answer, and its score is the sum of its answer tokens' log-probabilities.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate

import torch

from xtune.data.encode import IGNORE_INDEX, Encoded, plain_text_ids, pad_token_id
from xtune.data.loader import collate
from xtune.data.packing import collate_packed, pack
from xtune.engine.loss import kept_logits
from xtune.errors import ConfigError
from xtune.infer.generate import prompt_ids
from xtune.models.attention import use_varlen_attention


@dataclass(frozen=True)
class Request:
    input_ids: list[int]
    reads: tuple[tuple[int, tuple[int, ...]], ...]
    """(position, token ids): the log-probabilities of these tokens as the one after `position`."""


def packs(model) -> bool:
    """Switch the model to packed (varlen) attention; False when its attention is its own code (padded batches)."""
    try:
        use_varlen_attention(model)
    except ConfigError:
        return False
    return True


@torch.no_grad()
def log_probs(
    model, requests: list[Request], pad_id: int, tokens_per_batch: int = 8192, packed: bool = True
) -> list[list[list[float]]]:
    """For each request, for each of its reads, the log-probability of each token read."""
    device = next(model.parameters()).device
    results: list[list[list[float]]] = [[] for _ in requests]
    for batch, starts in _batches([r.input_ids for r in requests], pad_id, tokens_per_batch, packed):
        keep = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
        for index, start in starts:
            keep.view(-1)[[start + position for position, _ in requests[index].reads]] = True
        flat = keep.flatten().nonzero().squeeze(1)
        row_of = {position: row for row, position in enumerate(flat.tolist())}
        inputs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
        _, logits = kept_logits(model, inputs, keep, flat.to(device))
        table = torch.log_softmax(logits.float(), dim=-1).cpu()
        for index, start in starts:
            results[index] = [table[row_of[start + position], list(tokens)].tolist()
                              for position, tokens in requests[index].reads]  # fmt: skip
    return results


def _batches(
    sequences: list[list[int]], pad_id: int, tokens_per_batch: int, packed: bool
) -> Iterator[tuple[dict, list[tuple[int, int]]]]:
    """(model inputs, (sequence index, flat position of its first token) for each sequence in them)."""
    longest = max(map(len, sequences))
    if packed:
        samples = [Encoded(ids, [IGNORE_INDEX] * len(ids)) for ids in sequences]
        for row in pack(samples, max(tokens_per_batch, longest), pad_id):
            batch = collate_packed([row])
            batch.pop("labels")
            yield batch, list(zip(row.groups, accumulate(row.seq_lens, initial=0)))
        return
    order = sorted(range(len(sequences)), key=lambda index: -len(sequences[index]))
    start = 0
    while start < len(order):
        width = len(sequences[order[start]])
        rows = max(1, tokens_per_batch // width)
        part = order[start : start + rows]
        batch = collate([Encoded(sequences[i], [IGNORE_INDEX] * len(sequences[i])) for i in part], pad_id)
        batch.pop("labels")
        yield batch, [(index, row * width) for row, index in enumerate(part)]
        start += rows


def choice_requests(context_ids: list[int], answer_ids: list[list[int]], shared: bool = True) -> list[Request]:
    """One request reading every option's token after the prompt when each answer is one token (and `shared`);
    else one per option, reading each of its answer tokens."""
    if shared and all(len(ids) == 1 for ids in answer_ids):
        return [Request(context_ids, ((len(context_ids) - 1, tuple(ids[0] for ids in answer_ids)),))]
    return [
        Request(context_ids + ids, tuple((len(context_ids) + k - 1, (token,)) for k, token in enumerate(ids)))
        for ids in answer_ids
    ]


def choice_scores(requests: list[Request], results: list[list[list[float]]]) -> list[float]:
    """Each option's log-likelihood from what `log_probs` returned for `choice_requests`."""
    if len(requests) == 1 and len(requests[0].reads) == 1 and len(requests[0].reads[0][1]) > 1:
        return results[0][0]
    return [sum(values[0] for values in result) for result in results]


def score_choices(
    model, tokenizer, template, prompts: list[str], answers: list[list[str]], tokens_per_batch: int = 8192,
    packed: bool = True, shared: bool = True, advance: Callable[[int], None] | None = None, chunk: int = 256,
    system: str = "",
) -> list[list[float]]:  # fmt: skip
    """The log-likelihood of each answer text after its prompt (rendered with `template`: a chat template, or the
    plain text one; `system`: a chat template's system prompt), `chunk` questions packed together at a time;
    `advance(n)` after each chunk of n."""
    from xtune.data.formats import with_system
    from xtune.evaluate.prompts import as_conversation

    scores = []
    for begin in range(0, len(prompts), chunk):
        per_question = [
            choice_requests(prompt_ids(with_system(as_conversation(prompt), system), template, tokenizer),
                            [plain_text_ids(text, tokenizer) for text in texts], shared)
            for prompt, texts in zip(prompts[begin : begin + chunk], answers[begin : begin + chunk], strict=True)
        ]  # fmt: skip
        results = iter(log_probs(model, [r for requests in per_question for r in requests], pad_token_id(tokenizer),
                                 tokens_per_batch, packed))  # fmt: skip
        scores += [choice_scores(requests, [next(results) for _ in requests]) for requests in per_question]
        if advance is not None:
            advance(len(per_question))
    return scores
