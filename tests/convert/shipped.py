"""The checks every exported folder passes (used by test_merge, test_pth_to_hf and test_llava_convert): plain
`generate` with the folder's generation_config.json stops at the template's end of a reply, and the saved chat
template writes list-of-parts content as the same content given as a string, which is what xtune's template
writes."""

import torch
from transformers import GenerationConfig, LogitsProcessor

from xtune.data.formats import Conversation, Turn
from xtune.data.templates import generation_prompt, get_template

END_OF_TURN = "<|im_end|>"
"""internlm2_chat's end of a reply (and the tiny tokenizer's), which the tiny models' runs are trained with."""


class ForceToken(LogitsProcessor):
    """Makes `token_id` the only choice at the `at`-th new token, so a random-weight model writes it there."""

    def __init__(self, token_id: int, prompt_length: int, at: int = 3):
        self.token_id, self.length = token_id, prompt_length + at

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] == self.length:
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.token_id] = 0
            return forced
        return scores


def assert_generate_stops_at_end_of_turn(model, folder, tokenizer, end_of_turn: str = END_OF_TURN, **inputs) -> None:
    """`model` was loaded from `folder` (so `generate` uses the folder's generation config): a reply stops at
    `end_of_turn`, and runs on past it once `end_of_turn` is taken out of the stop ids."""
    saved = GenerationConfig.from_pretrained(folder)
    stop = tokenizer.convert_tokens_to_ids(end_of_turn)
    assert isinstance(saved.eos_token_id, list) and {stop, tokenizer.eos_token_id} <= set(saved.eos_token_id)
    assert model.generation_config.eos_token_id == saved.eos_token_id
    prompt_length = inputs["input_ids"].shape[1]
    force = [ForceToken(stop, prompt_length)]
    with torch.no_grad():
        reply = model.generate(**inputs, max_new_tokens=12, do_sample=False, logits_processor=force)[0, prompt_length:]
        without = GenerationConfig.from_dict({**saved.to_dict(), "eos_token_id": [i for i in saved.eos_token_id if i != stop]})
        longer = model.generate(**inputs, generation_config=without, max_new_tokens=12, do_sample=False,
                                logits_processor=force)[0, prompt_length:]  # fmt: skip
    reply, longer = reply.tolist(), longer.tolist()
    assert reply[-1] == stop and stop not in reply[:-1] and len(reply) <= 4  # stopped at the first one
    assert longer[: len(reply)] == reply and len(longer) > len(reply)  # the same reply, which went on without it


def two_rounds(user: str = "Big?") -> Conversation:
    """Two rounds with a system prompt, the second one to be answered."""
    return Conversation((Turn("system", "Be brief."), Turn("user", "Hot?"), Turn("assistant", "cold", True), Turn("user", user)))  # fmt: skip


def as_strings(conversation: Conversation) -> list[dict]:
    return [{"role": turn.role, "content": turn.content} for turn in conversation.turns]


def as_parts(conversation: Conversation, last_user: list[dict] | None = None) -> list[dict]:
    """Each message's content as a list of text parts (the last one's as `last_user` when given)."""
    messages = [{"role": turn.role, "content": [{"type": "text", "text": turn.content}]} for turn in conversation.turns]
    if last_user is not None:
        messages[-1]["content"] = last_user
    return messages


def assert_parts_render_as_strings(renderer, tokenizer, template_name: str) -> None:
    """`renderer` (a tokenizer or a processor loaded from an exported folder) writes a 2-round conversation with
    a system prompt as xtune's template does, its content given as strings or as lists of text parts (two text
    parts are one text, joined by a newline)."""
    template = get_template(template_name)
    expected = generation_prompt(two_rounds("Big\nor small?"), template, tokenizer)
    split = [{"type": "text", "text": "Big"}, {"type": "text", "text": "or small?"}]
    for messages in (as_strings(two_rounds("Big\nor small?")), as_parts(two_rounds(), split)):
        assert renderer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
