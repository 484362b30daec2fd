"""Log-likelihood scoring on the tiny model: one forward of the shared prompt equals one forward per option, packed
rows equal padded batches, and both equal the log-probabilities of a plain forward of each sequence."""

import pytest
import torch

from xtune.data.encode import plain_text_ids
from xtune.data.templates import get_template
from xtune.evaluate.prompts import PLAIN_TEXT, as_conversation
from xtune.evaluate.score import choice_requests, packs, score_choices
from xtune.infer.chat import load_chat_model
from xtune.infer.generate import prompt_ids

PROMPTS = [
    "The following are multiple choice questions (with answers) about sums.\n\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:",
    "Which is a colour?\nA. red\nB. seven\nAnswer:",
    "The sky is\nA. blue\nB. loud\nC. sweet\nAnswer:",
]
LETTERS = [[" A", " B", " C", " D"], [" A", " B"], [" A", " B", " C"]]


@pytest.fixture(scope="module")
def tiny(xtune_home):
    model, tokenizer = load_chat_model("xtune-tiny/internlm2-chat", device="cpu", dtype="fp32")
    return model, tokenizer


def plain_log_likelihood(model, tokenizer, template, prompt: str, answer: str) -> float:
    context = prompt_ids(as_conversation(prompt), template, tokenizer)
    continuation = plain_text_ids(answer, tokenizer)
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation])).logits[0].float().log_softmax(-1)
    return sum(logits[len(context) + k - 1, token].item() for k, token in enumerate(continuation))


def test_single_token_answers_are_read_in_one_forward_of_the_prompt(tokenizer):
    context = [1, 5, 6]
    (request,) = choice_requests(context, [[11], [12], [13], [14]])
    assert request.input_ids == context and request.reads == ((2, (11, 12, 13, 14)),)
    several = choice_requests(context, [[11, 15], [12]])
    assert [r.input_ids for r in several] == [[1, 5, 6, 11, 15], [1, 5, 6, 12]]
    assert [r.reads for r in several] == [((2, (11,)), (3, (15,))), ((2, (12,)),)]
    # the tiny tokenizer writes "A" to "D" as one token each, but " B" and " D" as two: plain MMLU text takes the
    # path of one sequence per option on it, a chat's reply the shared one
    assert [len(plain_text_ids(text, tokenizer)) for text in [" A", " B", "A", "B", "C", "D"]] == [1, 2, 1, 1, 1, 1]


def test_shared_prompt_equals_a_forward_per_option_packed_or_padded(tiny):
    model, tokenizer = tiny
    expected = [[plain_log_likelihood(model, tokenizer, PLAIN_TEXT, p, a) for a in answers]
                for p, answers in zip(PROMPTS, LETTERS)]  # fmt: skip
    padded_shared = score_choices(model, tokenizer, PLAIN_TEXT, PROMPTS, LETTERS, packed=False)
    padded_apart = score_choices(model, tokenizer, PLAIN_TEXT, PROMPTS, LETTERS, packed=False, shared=False)
    assert packs(model)
    packed_shared = score_choices(model, tokenizer, PLAIN_TEXT, PROMPTS, LETTERS, tokens_per_batch=64)
    packed_apart = score_choices(model, tokenizer, PLAIN_TEXT, PROMPTS, LETTERS, tokens_per_batch=64, shared=False)
    for scores in (padded_shared, padded_apart, packed_shared, packed_apart):
        assert [len(s) for s in scores] == [4, 2, 3]
        for got, want in zip(scores, expected):
            assert got == pytest.approx(want, abs=1e-4)


def test_answers_of_several_tokens_sum_their_tokens(tiny):
    model, tokenizer = tiny
    answers = [[" cat", " a dog house", " B", " elephants"]]
    expected = [plain_log_likelihood(model, tokenizer, PLAIN_TEXT, PROMPTS[0], a) for a in answers[0]]
    for packed in (True, False):
        (scores,) = score_choices(model, tokenizer, PLAIN_TEXT, PROMPTS[:1], answers, packed=packed)
        assert scores == pytest.approx(expected, abs=1e-4)


def test_a_chat_template_scores_the_reply(tiny):
    model, tokenizer = tiny
    template = get_template("internlm2_chat")
    context = prompt_ids(as_conversation(PROMPTS[1]), template, tokenizer)
    assert tokenizer.decode(context).endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
    (scores,) = score_choices(model, tokenizer, template, PROMPTS[1:2], [["A", "B"]])
    assert scores == pytest.approx([plain_log_likelihood(model, tokenizer, template, PROMPTS[1], a) for a in "AB"], abs=1e-4)


def test_a_system_prompt_opens_the_chat_prompts_that_are_scored(tiny):
    from xtune.data.formats import with_system

    model, tokenizer = tiny
    template = get_template("internlm2_chat")
    (plain,) = score_choices(model, tokenizer, template, PROMPTS[1:2], [["A", "B"]])
    (scores,) = score_choices(model, tokenizer, template, PROMPTS[1:2], [["A", "B"]], system="Answer with a letter.")
    context = prompt_ids(with_system(as_conversation(PROMPTS[1]), "Answer with a letter."), template, tokenizer)
    with torch.no_grad():
        log_probs = model(torch.tensor([context])).logits[0, -1].float().log_softmax(-1)
    expected = [log_probs[plain_text_ids(letter, tokenizer)[0]].item() for letter in "AB"]
    assert tokenizer.decode(context).startswith("<s><|im_start|>system\nAnswer with a letter.<|im_end|>")
    assert scores == pytest.approx(expected, abs=1e-4) and scores != pytest.approx(plain, abs=1e-4)
