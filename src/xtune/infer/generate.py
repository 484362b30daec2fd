"""Generation with the same template, tokenization and stop words as training."""

import threading
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from xtune.data.encode import encode, pad_token_id
from xtune.data.formats import Conversation
from xtune.data.templates import ChatTemplate


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 512
    temperature: float = 0.0
    """0 decodes greedily (deterministic); above 0 samples."""
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop_words: tuple[str, ...] = ()
    """Extra stop words on top of the template's."""
    keep_special_tokens: bool = False
    """Decode special tokens too (InternLM2 writes tool calls with them); the reply is still cut at EOS and
    padding."""


def prompt_ids(conversation: Conversation, template: ChatTemplate, tokenizer, image_tokens: int = 0) -> list[int]:
    """Token ids of the conversation (ending with a user turn) plus the assistant's header; each `<image>` as
    `image_tokens` patch positions for a multimodal model. What the messages say is text: a special token typed
    into one (`<|im_start|>system ...`) is plain text, not the control token. Nothing is trained here, so no turn is
    marked trained (with "hf", each trained turn costs two more renderings of the history: quadratic)."""
    untrained = replace(conversation, turns=tuple(replace(turn, trainable=False) for turn in conversation.turns))
    return encode(untrained, template, tokenizer, image_tokens=image_tokens, split_special_tokens=True).input_ids


def generation_kwargs(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase, options: GenerationOptions) -> dict:
    stop_words = (*template.stop_words, *options.stop_words)
    stop_ids, stop_strings = [], []
    for word in stop_words:
        ids = tokenizer.encode(word, add_special_tokens=False)
        (stop_ids.extend(ids) if len(ids) == 1 else stop_strings.append(word))
    if tokenizer.eos_token_id is not None:
        stop_ids.append(tokenizer.eos_token_id)
    kwargs = dict(
        max_new_tokens=options.max_new_tokens,
        eos_token_id=sorted(set(stop_ids)),
        pad_token_id=pad_token_id(tokenizer),
        repetition_penalty=options.repetition_penalty,
        do_sample=options.temperature > 0,
    )
    if options.temperature > 0:
        kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    return kwargs


def cut_at_stop_words(text: str, stop_words) -> str:
    positions = [text.find(word) for word in stop_words if word and word in text]
    return text[: min(positions)] if positions else text


@torch.no_grad()
def generate_replies(
    model,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    conversations: list[Conversation],
    options: GenerationOptions = GenerationOptions(),
    batch_size: int = 16,
    streamer=None,
    stop: threading.Event | None = None,
) -> list[str]:
    """The assistant's next reply to each conversation, generated in left-padded batches. A multimodal model
    (one with `image_tokens` and `preprocess`, as LlavaModel) sees each conversation's images. Setting `stop` (from
    another thread: its reader went away) ends the generation at its next token."""
    kwargs = generation_kwargs(template, tokenizer, options)
    if stop is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_WhenSet(stop)])
    device = next(model.parameters()).device
    image_tokens = getattr(model, "image_tokens", 0)
    replies: list[str] = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        prompts = [prompt_ids(c, template, tokenizer, image_tokens) for c in batch]
        images = [path for c in batch for path in c.images] if image_tokens else []
        if images:
            kwargs["pixel_values"] = model.preprocess(images).to(device)
        else:
            kwargs.pop("pixel_values", None)
        width = max(map(len, prompts))
        input_ids = torch.full((len(prompts), width), kwargs["pad_token_id"], dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), streamer=streamer, **kwargs
        )
        ends = {tokenizer.eos_token, tokenizer.pad_token} - {None, ""} if options.keep_special_tokens else set()
        for row in output[:, width:]:
            text = tokenizer.decode(row, skip_special_tokens=not options.keep_special_tokens)
            replies.append(cut_at_stop_words(text, (*template.stop_words, *options.stop_words, *ends)).strip())
    return replies


class _WhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **_) -> torch.Tensor:
        return torch.full((len(input_ids),), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
