"""Continuous batching: rows prefilled at different times, decoded together, each getting exactly the tokens it
gets alone (greedy), or with a seed the same samples whatever else is in the batch."""

import threading

import pytest
import torch

from xtune.data.encode import pad_token_id
from xtune.infer.batching import Batcher, Sequence
from xtune.infer.generate import GenerationOptions
from xtune.infer.chat import load_chat_model

PROMPTS = ["Hello there", "What is the capital of France?", "a", "Count to five, please, slowly and clearly.",
           "Tell me a joke.", "Why is the sky blue?", "List three colours.", "Say nothing."]  # fmt: skip


@pytest.fixture(scope="module")
def loaded(xtune_home):
    """In float32: in bfloat16 a padded row's logits differ from its unpadded ones by rounding, enough to flip near
    ties of the random weights."""
    return load_chat_model("xtune-tiny/internlm2-chat", dtype="fp32")


class Recorder:
    def __init__(self, stop_after: int | None = None):
        self.tokens, self.error, self.done = [], None, threading.Event()
        self.started, self.stop_after = threading.Event(), stop_after

    def token(self, token_id: int) -> bool:
        self.tokens.append(token_id)
        self.started.set()
        return self.stop_after is not None and len(self.tokens) >= self.stop_after

    def end(self, error) -> None:
        self.error = error
        self.done.set()


def alone(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, eos_token_id=[], pad_token_id=0)  # fmt: skip
    return output[0, len(prompt) :].tolist()


def rows_per_pass(monkeypatch, model) -> list[int]:
    sizes = []
    real_forward = model.forward

    def spy(*args, **kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    return sizes


def test_rows_joining_and_leaving_a_batch_get_the_tokens_they_get_alone(loaded, monkeypatch):
    model, tokenizer = loaded
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    lengths = [3 + 2 * index for index in range(len(prompts))]
    expected = [alone(model, prompt, length) for prompt, length in zip(prompts, lengths)]
    sizes = rows_per_pass(monkeypatch, model)
    batcher = Batcher(model, pad_token_id(tokenizer), max_batch_size=16)
    sequences = [Sequence(prompt, length, frozenset(), Recorder()) for prompt, length in zip(prompts, lengths)]
    for sequence in sequences[:4]:
        batcher.submit(sequence)
    sequences[0].listener.started.wait(60)  # the rest join a batch that is decoding
    for sequence in sequences[4:]:
        batcher.submit(sequence)
    for sequence in sequences:
        assert sequence.listener.done.wait(120) and sequence.listener.error is None
    assert [sequence.generated for sequence in sequences] == expected
    assert [sequence.listener.tokens for sequence in sequences] == expected
    assert max(sizes) > 1, "no forward pass held more than one row"


def test_a_row_stops_at_its_stop_token_its_listener_or_when_cancelled(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode(PROMPTS[1])
    reference = alone(model, prompt, 8)
    batcher = Batcher(model, pad_token_id(tokenizer))
    by_token = Sequence(prompt, 8, frozenset({reference[3]}), Recorder())
    by_listener = Sequence(prompt, 8, frozenset(), Recorder(stop_after=2))
    cancelled = Sequence(prompt, 8, frozenset(), Recorder())
    cancelled.cancelled.set()
    for sequence in (by_token, by_listener, cancelled):
        batcher.submit(sequence)
    for sequence in (by_token, by_listener, cancelled):
        assert sequence.listener.done.wait(60) and sequence.listener.error is None
    assert by_token.generated == reference[: reference.index(reference[3]) + 1]
    assert by_listener.generated == reference[:2] and cancelled.generated == []


def test_a_seeded_row_samples_the_same_tokens_alone_or_in_a_batch(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode(PROMPTS[3])
    batcher = Batcher(model, pad_token_id(tokenizer))
    sampling = GenerationOptions(temperature=1.0, top_p=0.9)

    def run(others: int) -> list[int]:
        seeded = Sequence(prompt, 10, frozenset(), Recorder(), sampling, seed=1234)
        rest = [Sequence(tokenizer.encode(PROMPTS[i % 8]), 10, frozenset(), Recorder(), GenerationOptions(temperature=1.0))
                for i in range(others)]  # fmt: skip
        for sequence in [*rest, seeded]:
            batcher.submit(sequence)
        for sequence in [*rest, seeded]:
            assert sequence.listener.done.wait(60) and sequence.listener.error is None
        return seeded.generated

    assert run(0) == run(5) == run(0)


def test_a_row_cancelled_while_it_waits_for_room_is_ended_without_running(loaded):
    model, tokenizer = loaded
    batcher = Batcher(model, pad_token_id(tokenizer), max_batch_size=1)
    running = Sequence(tokenizer.encode(PROMPTS[0]), 30, frozenset(), Recorder())
    waiting = Sequence(tokenizer.encode(PROMPTS[1]), 30, frozenset(), Recorder())
    batcher.submit(running)
    assert running.listener.started.wait(60)
    batcher.submit(waiting)
    waiting.cancelled.set()
    assert waiting.listener.done.wait(60) and waiting.generated == [] and waiting.listener.error is None
    assert running.listener.done.wait(60) and len(running.generated) == 30


def test_a_prompt_whose_prefill_fails_fails_alone(loaded, monkeypatch):
    """Prompts that arrive together are prefilled together; when that fails (one too long for the memory, say),
    each is prefilled alone, so only the one that fails by itself is told of an error."""
    model, tokenizer = loaded
    poison = 7  # a token id the stand-in failure reacts to
    real_forward = model.forward

    def failing(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1 and (kwargs["input_ids"] == poison).any():
            raise RuntimeError("out of memory (stand-in)")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing)
    batcher = Batcher(model, pad_token_id(tokenizer))
    good = [tokenizer.encode(PROMPTS[i]) for i in (0, 1)]
    assert all(poison not in prompt for prompt in good)
    sequences = [Sequence(good[0], 6, frozenset(), Recorder()), Sequence([poison, *good[1]], 6, frozenset(), Recorder()),
                 Sequence(good[1], 6, frozenset(), Recorder())]  # fmt: skip
    batcher.waiting.extend(sequences[:-1])  # queued before the batcher's thread starts: admitted together
    batcher.submit(sequences[-1])
    for sequence in sequences:
        assert sequence.listener.done.wait(60)
    assert [type(s.listener.error).__name__ if s.listener.error else None for s in sequences] == [None, "RuntimeError", None]
    assert sequences[0].generated == alone(model, good[0], 6) and sequences[2].generated == alone(model, good[1], 6)


def test_a_row_whose_sampling_fails_mid_reply_ends_alone(loaded, monkeypatch):
    model, tokenizer = loaded
    batcher = Batcher(model, pad_token_id(tokenizer))
    prompts = [tokenizer.encode(PROMPTS[i]) for i in (0, 1, 4)]
    sequences = [Sequence(prompt, 6, frozenset(), Recorder()) for prompt in prompts]
    doomed = sequences[1]
    real_next_token = batcher._next_token

    def next_token(sequence, logits):
        if sequence is doomed and len(sequence.generated) == 2:
            raise RuntimeError("probabilities are NaN (stand-in)")
        return real_next_token(sequence, logits)

    monkeypatch.setattr(batcher, "_next_token", next_token)
    batcher.waiting.extend(sequences[:-1])
    batcher.submit(sequences[-1])
    for sequence in sequences:
        assert sequence.listener.done.wait(60)
    assert isinstance(doomed.listener.error, RuntimeError) and len(doomed.generated) == 2
    for index in (0, 2):
        assert sequences[index].listener.error is None
        assert sequences[index].generated == alone(model, prompts[index], 6)
