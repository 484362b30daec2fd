"""Zero- and few-shot prompts in each benchmark's own format, as plain text or as a chat's user turn.

MMLU (hendrycks/test's evaluate.py), C-Eval (its evaluators) and CMMLU (its mp_utils.py) write a header naming the
subject, then each dev example with its answer, then the question with the answer cue:

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer: {answer}\\n\\n        (each shot)
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:                      (the question)

C-Eval: `以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\\n\\n`, the cue `\\n答案：` and no space before
the letter. CMMLU: `以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\\n\\n`, each question after `题目：`,
the cue `\\n答案是：`. The subject is named with spaces for underscores, as lm-evaluation-harness does (MMLU's own
code writes a space before it too: "about  abstract algebra"), or by the task folder's subject_mapping.json.

The answer scored is the option's letter, as those codes and lm-evaluation-harness's MMLU score it: " A" after
"Answer:" (the letter after the cue, with the benchmark's separator) as plain text; with a chat template the whole
prompt is the user's turn and the reply is the letter alone ("A").
"""

from dataclasses import dataclass

from xtune.data.formats import Conversation, Turn
from xtune.data.templates import ChatTemplate
from xtune.evaluate.tasks import ChoiceTask, Question


@dataclass(frozen=True)
class PromptFormat:
    header: str
    """With `{subject}`."""
    question_prefix: str
    answer_cue: str
    answer_separator: str
    """Between the cue and the letter of an answered example (and of the scored answer, as plain text)."""


FORMATS = {
    "mmlu": PromptFormat("The following are multiple choice questions (with answers) about {subject}.\n\n", "",
                         "\nAnswer:", " "),
    "ceval": PromptFormat("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "", "\n答案：", ""),
    "cmmlu": PromptFormat("以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", "题目：", "\n答案是：", ""),
}  # fmt: skip

PLAIN_TEXT = ChatTemplate(name="plain", prefix="{bos}", system="{system}", user="{input}", assistant_suffix="{eos}")
"""No chat template: the prompt as it is, after the tokenizer's BOS where it has one."""


def format_question(question: Question, prompt_format: PromptFormat, with_answer: bool) -> str:
    text = prompt_format.question_prefix + question.question
    text += "".join(f"\n{letter}. {option}" for letter, option in zip(question.letters, question.options))
    text += prompt_format.answer_cue
    return text + f"{prompt_format.answer_separator}{question.answer}\n\n" if with_answer else text


def build_prompt(question: Question, task: ChoiceTask) -> str:
    """The header, the subject's shots with their answers, then the question up to its answer cue."""
    prompt_format = FORMATS[task.benchmark]
    shots = task.shots.get(question.subject, [])
    text = prompt_format.header.format(subject=task.subject_name(question.subject))
    return text + "".join(format_question(shot, prompt_format, True) for shot in shots) + format_question(
        question, prompt_format, False
    )


def answer_texts(question: Question, benchmark: str, chat: bool) -> list[str]:
    """What each option's answer is written as after the prompt: " A" as plain MMLU text, "A" in a chat's reply."""
    separator = "" if chat else FORMATS[benchmark].answer_separator
    return [separator + letter for letter in question.letters]


def as_conversation(prompt: str) -> Conversation:
    return Conversation((Turn("user", prompt),))
