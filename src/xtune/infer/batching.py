"""Continuous batching for the server: many requests decoded together, one forward pass a token for all of them.

A `Batcher` owns the model in a thread of its own. Requests (`Sequence`s) wait in a queue; before each decoding
step the waiting ones (up to `max_batch_size` rows in all) are prefilled together, left-padded, in a fresh
`DynamicCache`, and that cache is joined to the running batch's (the shorter one padded on the left). Each step
then feeds every row its last token, with its own position (the count of its real tokens so far) and an attention
mask that hides the padding, so a row's logits are those it gets alone. A row leaves the batch when it writes a
stop token, reaches its max tokens, or its listener says stop (a stop word, or the client went away); the
padding no row needs any more is cut off.

Each row samples with its own options (temperature, top_p, top_k, repetition penalty: transformers' logits
processors) and its own `torch.Generator`, so a seeded request samples the same tokens whatever else is in the
batch. A LLaVA model's rows are prefilled from `model.embed(input_ids, pixel_values)` and decoded by `model.llm`.

Why not transformers' own continuous batching (`generate_batch`, `init_continuous_batching`)? It runs on CPU with
these models, but it samples from one global generator (a request's seed would not make it repeatable), takes
token ids only (no LLaVA image embeddings), and knows no stop strings; those are what the server needs.
"""

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from xtune.infer.generate import GenerationOptions

logger = logging.getLogger(__name__)

MAX_BATCH_SIZE = 16
IDLE_WAIT_S = 1.0


class Listener(Protocol):
    def token(self, token_id: int) -> bool:
        """Called with each new token (from the batcher's thread); True stops the row after it."""

    def end(self, error: BaseException | None) -> None:
        """Called once when the row leaves the batch (or never got in), with the error if one stopped it."""


@dataclass(eq=False)
class Sequence:
    """One reply to generate: the prompt's ids and when to stop."""

    prompt: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int]
    listener: Listener
    sampling: GenerationOptions = GenerationOptions()
    """Temperature, top_p, top_k and repetition penalty (its max_new_tokens and stop words are the fields above)."""
    seed: int | None = None
    """Seeds the row's own generator, so a sampled reply does not depend on its batch; None: a random seed."""
    pixel_values: torch.Tensor | None = None
    """A LLaVA prompt's images, in the order of their patch runs in `prompt`."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


@dataclass
class _Batch:
    """The rows being decoded: their cache, its attention mask [rows, columns], and each row's next input."""

    rows: list[Sequence]
    cache: DynamicCache
    mask: torch.Tensor
    last: list[int]


class Batcher:
    """Generates the replies of all submitted sequences, up to `max_batch_size` at a time, in one thread."""

    def __init__(self, model, pad_token_id: int, max_batch_size: int = MAX_BATCH_SIZE):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.pad_token_id, self.max_batch_size = model, pad_token_id, max_batch_size
        self.lm = getattr(model, "llm", model) if hasattr(model, "embed") else model
        self.device = next(model.parameters()).device
        self.waiting: deque[Sequence] = deque()
        self.wakeup = threading.Condition()
        self.thread: threading.Thread | None = None
        self.batch: _Batch | None = None

    def submit(self, sequence: Sequence) -> None:
        with self.wakeup:
            self.waiting.append(sequence)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="xtune-batcher", daemon=True)
                self.thread.start()
            self.wakeup.notify()

    def _run(self) -> None:
        while True:
            with self.wakeup:
                while not self.waiting and self.batch is None:
                    self.wakeup.wait(IDLE_WAIT_S)
                gone = [sequence for sequence in self.waiting if sequence.cancelled.is_set()]
                self.waiting = deque(sequence for sequence in self.waiting if not sequence.cancelled.is_set())
                room = self.max_batch_size - (len(self.batch.rows) if self.batch else 0)
                arrived = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            for sequence in gone:  # their clients went away while they waited
                _end(sequence, None)
            with torch.no_grad():
                try:
                    self._admit(arrived)
                except Exception:  # prefilled one at a time: a prompt that fails (say, out of memory) fails alone
                    logger.exception("prefilling %d prompts together failed; each alone now", len(arrived))
                    for sequence in arrived:
                        try:
                            self._admit([sequence])
                        except Exception as error:  # this prompt failed: it is told; the running rows go on
                            logger.exception("prefilling failed")
                            _end(sequence, error)
                if self.batch is None:
                    continue
                try:
                    self._step()
                except Exception as error:  # the model failed: every row in it is told, and the batcher goes on
                    logger.exception("batched generation failed")
                    rows, self.batch = self.batch.rows, None
                    for sequence in rows:
                        _end(sequence, error)

    # ------------------------------------------------------------ prefill and join

    def _admit(self, arrived: list[Sequence]) -> None:
        if not arrived:
            return
        width = max(len(sequence.prompt) for sequence in arrived)
        input_ids = torch.full((len(arrived), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, sequence in enumerate(arrived):
            input_ids[row, width - len(sequence.prompt) :] = torch.tensor(sequence.prompt)
            mask[row, width - len(sequence.prompt) :] = 1
            sequence.generator = _generator(sequence.seed, self.device)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        images = [sequence.pixel_values for sequence in arrived if sequence.pixel_values is not None]
        if hasattr(self.model, "embed"):
            pixel_values = torch.cat(images).to(self.device) if images else None
            inputs = {"inputs_embeds": self.model.embed(input_ids, pixel_values)}
        else:
            inputs = {"input_ids": input_ids}
        logits = self._logits(inputs, mask, position_ids, cache)
        new = _Batch(arrived, cache, mask, [self._next_token(sequence, row) for sequence, row in zip(arrived, logits)])
        going = self._still_going(new)
        self.batch = _keep(new, going) if self.batch is None else _join(self.batch, new, going)

    # ------------------------------------------------------------ one decoding step

    def _step(self) -> None:
        batch = self.batch
        mask = torch.cat([batch.mask, torch.ones((len(batch.rows), 1), dtype=batch.mask.dtype, device=self.device)], 1)
        position_ids = batch.mask.sum(-1, keepdim=True)
        input_ids = torch.tensor(batch.last, device=self.device).unsqueeze(-1)
        logits = self._logits({"input_ids": input_ids}, mask, position_ids, batch.cache)
        batch.mask = mask
        batch.last, failed = [], {}
        for index, (sequence, row) in enumerate(zip(batch.rows, logits)):
            try:
                batch.last.append(self._next_token(sequence, row))
            except Exception as error:  # this row's sampling failed (say, its scores went NaN): it alone ends
                logger.exception("choosing a row's next token failed")
                failed[index] = error
                batch.last.append(self.pad_token_id)
        self.batch = _keep(batch, self._still_going(batch, failed))

    def _logits(self, inputs: dict, mask: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache):
        output = self.lm(
            **inputs, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
            logits_to_keep=1,
        )  # fmt: skip
        return output.logits[:, -1].float()

    def _next_token(self, sequence: Sequence, logits: torch.Tensor) -> int:
        sampling = sequence.sampling
        scores = logits.unsqueeze(0)
        if sampling.repetition_penalty != 1.0:
            seen = torch.tensor([sequence.prompt + sequence.generated], device=scores.device).clamp(min=0)
            scores = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)(seen, scores)
        if sampling.temperature == 0:
            token = int(scores.argmax(-1))
        else:
            no_ids = torch.empty((1, 0), dtype=torch.long, device=scores.device)
            scores = TemperatureLogitsWarper(sampling.temperature)(no_ids, scores)
            if sampling.top_k > 0:
                scores = TopKLogitsWarper(sampling.top_k)(no_ids, scores)
            if sampling.top_p < 1.0:
                scores = TopPLogitsWarper(sampling.top_p)(no_ids, scores)
            probabilities = scores.softmax(-1)
            token = int(torch.multinomial(probabilities, 1, generator=sequence.generator))
        sequence.generated.append(token)
        return token

    def _still_going(self, batch: _Batch, failed: dict[int, BaseException] | None = None) -> list[int]:
        """The rows that go on after the token just chosen; the others are ended (those in `failed` with its error)."""
        going = []
        for index, sequence in enumerate(batch.rows):
            if failed and index in failed:
                _end(sequence, failed[index])
                continue
            token = sequence.generated[-1]
            try:
                stop = sequence.listener.token(token)
            except Exception as error:
                _end(sequence, error)
                continue
            done = (stop or sequence.cancelled.is_set() or token in sequence.stop_ids
                    or len(sequence.generated) >= sequence.max_new_tokens)  # fmt: skip
            if done:
                _end(sequence, None)
            else:
                going.append(index)
        return going


def _end(sequence: Sequence, error: BaseException | None) -> None:
    try:
        sequence.listener.end(error)
    except Exception:
        logger.exception("a listener failed at the end of its reply")


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % 2**64)
    return generator


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = cache.layers
    if not all(type(layer) is DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise NotImplementedError(f"batching needs a plain DynamicCache; this model's has {', '.join(kinds)} layers")
    return layers


def _keep(batch: _Batch, rows: list[int]) -> _Batch | None:
    """The batch with only `rows`, its padding that no row needs any more cut off; None when no row is left."""
    if not rows:
        return None
    if len(rows) < len(batch.rows):
        batch.cache.batch_select_indices(torch.tensor(rows, device=batch.mask.device))
        batch = _Batch([batch.rows[i] for i in rows], batch.cache, batch.mask[rows], [batch.last[i] for i in rows])
    start = int(batch.mask.any(0).int().argmax())
    if start > 0:
        for layer in _layers(batch.cache):
            layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
        batch.mask = batch.mask[:, start:]
    return batch


def _join(running: _Batch, new: _Batch, new_rows: list[int]) -> _Batch:
    """One batch of the running rows and the `new_rows` of a batch just prefilled: the shorter cache padded on the
    left, hidden by the mask."""
    new = _keep(new, new_rows)
    if new is None:
        return running
    width = max(running.mask.shape[1], new.mask.shape[1])

    def pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - tensor.shape[dim]
        if missing == 0:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        return torch.cat([tensor.new_zeros(shape), tensor], dim)

    for old, added in zip(_layers(running.cache), _layers(new.cache), strict=True):
        old.keys = torch.cat([pad(old.keys, -2), pad(added.keys, -2)])
        old.values = torch.cat([pad(old.values, -2), pad(added.values, -2)])
    mask = torch.cat([pad(running.mask, 1), pad(new.mask, 1)])
    return _Batch([*running.rows, *new.rows], running.cache, mask, [*running.last, *new.last])
