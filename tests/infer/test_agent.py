"""The agent loop with scripted models: reading calls in each tool format, running plugins, stopping."""

import io
import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from xtune.data.formats import Conversation, ToolCall, Turn
from xtune.data.templates import (
    INTERNLM2_TOOLS,
    LLAMA3_1_TOOLS,
    MISTRAL_V0_3_TOOLS,
    QWEN_TOOLS,
    REACT_TOOLS,
    generation_prompt,
    get_template,
)
from xtune.errors import XtuneError
from xtune.infer import agent
from xtune.infer.agent import (
    PARSE_ERROR,
    AgentStep,
    ParsedReply,
    agent_repl,
    agent_template,
    chat_with_plugins,
    model_generate,
    parse_reply,
    run_agent,
)
from xtune.infer.generate import GenerationOptions
from xtune.infer.plugins import get_plugins

CALCULATE = ToolCall("calculate", '{"expression": "37 * 24"}')
PLUGINS = get_plugins(["calculate"])
QUESTION = Conversation((Turn("user", "What is 37 * 24?"),))

INTERNLM2_CALL = '<|action_start|><|plugin|>\n{"name": "calculate", "parameters": {"expression": "37 * 24"}}'
QWEN_CALL = '<tool_call>\n{"name": "calculate", "arguments": {"expression": "37 * 24"}}'
REACT_CALL = 'Action: calculate\nAction Input: {"expression": "37 * 24"}'
LLAMA3_1_CALL = '{"name": "calculate", "parameters": {"expression": "37 * 24"}}'
MISTRAL_CALL = '[TOOL_CALLS] [{"name": "calculate", "arguments": {"expression": "37 * 24"}, "id": "a1B2c3D4e"}]'
CALLS = {
    "internlm2_chat": INTERNLM2_CALL, "qwen_chat": QWEN_CALL, "llama3_chat+react": REACT_CALL, "llama3_1": LLAMA3_1_CALL,
}  # fmt: skip


# ---------------------------------------------------------------- reading calls


@pytest.mark.parametrize(
    "text, tool_format, parsed",
    [
        ("888", INTERNLM2_TOOLS, ParsedReply("888")),
        (INTERNLM2_CALL, INTERNLM2_TOOLS, ParsedReply("", (CALCULATE,))),
        ("Let me compute." + INTERNLM2_CALL + "<|action_end|>", INTERNLM2_TOOLS, ParsedReply("Let me compute.", (CALCULATE,))),
        ('<|action_start|><|plugin|>\n{"name": "calculate", "parameters": "{\\"expression\\": \\"1\\"}"}', INTERNLM2_TOOLS, ParsedReply("", (ToolCall("calculate", '{"expression": "1"}'),))),
        (QWEN_CALL, QWEN_TOOLS, ParsedReply("", (CALCULATE,))),
        (
            f"Two sums.\n{QWEN_CALL}\n</tool_call>\n<tool_call>\n{{\"name\": \"calculate\", \"arguments\": {{\"expression\": \"1+1\"}}}}\n</tool_call>",
            QWEN_TOOLS,
            ParsedReply("Two sums.", (CALCULATE, ToolCall("calculate", '{"expression": "1+1"}'))),
        ),
        (REACT_CALL, REACT_TOOLS, ParsedReply("", (CALCULATE,))),
        (f"Thought: I need the product.\n{REACT_CALL}\nObservation: 888", REACT_TOOLS, ParsedReply("I need the product.", (CALCULATE,))),
        ("Thought: I know it.\nThe answer is 888.", REACT_TOOLS, ParsedReply("I know it.\nThe answer is 888.")),
        ("Action: lookup\nAction Input: {}", REACT_TOOLS, ParsedReply("", (ToolCall("lookup", "{}"),))),
        (LLAMA3_1_CALL, LLAMA3_1_TOOLS, ParsedReply("", (CALCULATE,))),
        ("<|python_tag|>" + LLAMA3_1_CALL, LLAMA3_1_TOOLS, ParsedReply("", (CALCULATE,))),
        ("888", LLAMA3_1_TOOLS, ParsedReply("888")),
        ('{"answer": 888}', LLAMA3_1_TOOLS, ParsedReply('{"answer": 888}')),
        (MISTRAL_CALL, MISTRAL_V0_3_TOOLS, ParsedReply("", (replace(CALCULATE, id="a1B2c3D4e"),))),
        ("888", MISTRAL_V0_3_TOOLS, ParsedReply("888")),
        ('[TOOL_CALLS] {"name": "calculate", "arguments": {"expression": "37 * 24"}, "id": "a1B2c3D4e"}</s>',
         MISTRAL_V0_3_TOOLS, ParsedReply("", (replace(CALCULATE, id="a1B2c3D4e"),))),
    ],
)  # fmt: skip
def test_calls_are_read_in_each_format(text, tool_format, parsed):
    assert parse_reply(text, tool_format) == parsed


@pytest.mark.parametrize(
    "text, tool_format, error",
    [
        ('<|action_start|><|plugin|>\n{"name": "calculate", "parameters": {"expression": "1"', INTERNLM2_TOOLS, "not valid JSON (Expecting ',' delimiter at column 55)"),
        ('<|action_start|><|interpreter|>\nprint(1)', INTERNLM2_TOOLS, "expected <|plugin|> after <|action_start|>"),
        ('<|action_start|><|plugin|>\n{"parameters": {}}', INTERNLM2_TOOLS, 'the call has no "name"'),
        ('<tool_call>\n["calculate"]\n</tool_call>', QWEN_TOOLS, 'expected a JSON object {"name": ..., "arguments": {...}}'),
        ('<tool_call>\n{"name": "calculate", "arguments": [1]}', QWEN_TOOLS, "the arguments of calculate must be a JSON object, got list"),
        ("Action: calculate\nAction Input: 37 * 24", REACT_TOOLS, "the Action Input of calculate are not valid JSON"),
        ("Action: calculate\nAction Input: " + "[" * 5000, REACT_TOOLS, "the Action Input of calculate are not valid JSON (RecursionError)"),
        ('<tool_call>\n{"name": "calculate", "arguments": "' + "[" * 5000 + '"}', QWEN_TOOLS, "not valid JSON (RecursionError)"),
        ("Action: calculate", REACT_TOOLS, "Action: calculate has no 'Action Input:' line"),
        ("Action:\nAction Input: {}", REACT_TOOLS, "the Action line names no tool"),
        ('{"name": "calculate", "parameters": {"expression": "1"', LLAMA3_1_TOOLS, "not valid JSON"),
        ('{"name": "calculate", "parameters": [1]}', LLAMA3_1_TOOLS, "the parameters of calculate must be a JSON object"),
        ('[TOOL_CALLS] [{"name": "calculate", "arguments": {', MISTRAL_V0_3_TOOLS, "not valid JSON"),
        ('[TOOL_CALLS] ["calculate"]', MISTRAL_V0_3_TOOLS, 'expected a JSON list [{"name": ..., "arguments": {...}, "id": ...}]'),
        ('[TOOL_CALLS] [{"arguments": {}}]', MISTRAL_V0_3_TOOLS, 'the call has no "name"'),
    ],
)  # fmt: skip
def test_malformed_calls_say_what_is_wrong(text, tool_format, error):
    parsed = parse_reply(text, tool_format)
    assert parsed.calls == () and error in parsed.error


# ---------------------------------------------------------------- the loop


class Scripted:
    """A model that answers each generation with the next scripted reply, and records what it was shown."""

    def __init__(self, *replies: str):
        self.replies = list(replies)
        self.seen: list[list[Conversation]] = []

    def __call__(self, conversations: list[Conversation]) -> list[str]:
        self.seen.append(conversations)
        return [self.replies.pop(0) for _ in conversations]


@pytest.mark.parametrize("name", list(CALLS))
def test_a_call_its_result_then_the_answer(name):
    template = agent_template(get_template(name))
    model = Scripted(CALLS[name], "888")
    steps = []
    (episode,) = run_agent([QUESTION], PLUGINS, template, model, on_step=lambda index, step: steps.append((index, step)))
    assert episode.answer == "888" and episode.note == ""
    assert episode.steps == (AgentStep(CALLS[name], "", (CALCULATE,), ("888",)), AgentStep("888", "888"))
    assert [index for index, _ in steps] == [0, 0]
    assert episode.conversation.turns[1:] == (
        Turn("assistant", "", True, (CALCULATE,)),
        Turn("tool", "888", name="calculate"),
        Turn("assistant", "888", True),
    )
    second_prompt = generation_prompt(model.seen[1][0], template)
    assert second_prompt.endswith({
        "internlm2_chat": "<|action_end|><|im_end|>\n<|im_start|>environment name=<|plugin|>\n888<|im_end|>\n<|im_start|>assistant\n",
        "qwen_chat": "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n888\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
        "llama3_chat+react": "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nObservation: 888<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "llama3_1": '}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"888"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
    }[name])  # fmt: skip
    assert json.loads(model.seen[0][0].tools[0])["function"]["name"] == "calculate"  # the plugins are offered


def test_mistral_v0_3_calls_keep_their_ids_which_the_results_name():
    """Mistral v0.3 writes each call's id and each result's call_id: a call without a usable id gets one made from
    the reply, and a call that cannot be read comes back as a user turn (a tool result would need an id)."""
    template = agent_template(get_template("mistral_v0_3"))
    no_id = '[TOOL_CALLS] [{"name": "calculate", "arguments": {"expression": "37 * 24"}, "id": "no"}]'
    model = Scripted(MISTRAL_CALL, no_id, "[TOOL_CALLS] [{", "888")
    (episode,) = run_agent([QUESTION], PLUGINS, template, model)
    assert episode.answer == "888" and len(episode.steps) == 4
    turns = episode.conversation.turns
    assert turns[1:3] == (Turn("assistant", "", True, (replace(CALCULATE, id="a1B2c3D4e"),)),
                          Turn("tool", "888", name="calculate", call_id="a1B2c3D4e"))  # fmt: skip
    made = turns[3].tool_calls[0].id
    assert len(made) == 9 and made.isalnum() and turns[4].call_id == made
    assert turns[5].role == "assistant" and turns[6] == Turn("user", episode.steps[2].results[0])
    assert generation_prompt(model.seen[1][0], template).endswith(
        '[TOOL_CALLS] [{"name": "calculate", "arguments": {"expression": "37 * 24"}, "id": "a1B2c3D4e"}]</s>'
        '[TOOL_RESULTS] {"content": 888, "call_id": "a1B2c3D4e"}[/TOOL_RESULTS]'
    )
    generation_prompt(model.seen[3][0], template)  # the whole episode renders


def test_a_malformed_call_is_fed_back_as_the_observation():
    template = get_template("internlm2_chat")
    broken = '<|action_start|><|plugin|>\n{"name": "calculate", "parameters": {"expression": '
    model = Scripted(broken, INTERNLM2_CALL, "888")
    (episode,) = run_agent([QUESTION], PLUGINS, template, model)
    assert episode.answer == "888" and len(episode.steps) == 3
    first = episode.steps[0]
    assert first.calls == () and first.results[0].startswith(PARSE_ERROR + "not valid JSON")
    assert episode.conversation.turns[1:3] == (Turn("assistant", broken, True), Turn("tool", first.results[0]))
    assert generation_prompt(model.seen[1][0], template).endswith(
        f"{broken}<|im_end|>\n<|im_start|>environment name=<|plugin|>\n{first.results[0]}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_unknown_tools_and_bad_arguments_come_back_as_errors():
    template = get_template("qwen_chat")
    unknown = '<tool_call>\n{"name": "weather", "arguments": {}}\n</tool_call>'
    bad = '<tool_call>\n{"name": "calculate", "arguments": {"expression": "1/0"}}\n</tool_call>'
    (episode,) = run_agent([QUESTION], PLUGINS, template, Scripted(unknown, bad, "I cannot."))
    assert episode.steps[0].results == ("error: unknown tool 'weather'; the tools are: calculate",)
    assert episode.steps[1].results == ("error: calculate: division by zero",)
    assert episode.answer == "I cannot."


def test_a_model_that_never_stops_calling_stops_at_max_turns():
    model = Scripted(*[INTERNLM2_CALL] * 10)
    (episode,) = run_agent([QUESTION], PLUGINS, get_template("internlm2_chat"), model, max_turns=3)
    assert episode.answer is None and len(model.seen) == 3 and len(episode.steps) == 3
    assert episode.note == "stopped: still calling tools after 3 replies (allow more with --agent-max-turns)"
    with pytest.raises(XtuneError, match="max_turns must be at least 1"):
        run_agent([QUESTION], PLUGINS, get_template("internlm2_chat"), model, max_turns=0)


def test_episodes_advance_together_in_batches():
    other = Conversation((Turn("user", "Hi"),))
    model = Scripted(INTERNLM2_CALL, "Hello", "888")
    episodes = run_agent([QUESTION, other], PLUGINS, get_template("internlm2_chat"), model)
    assert [len(batch) for batch in model.seen] == [2, 1]
    assert [e.answer for e in episodes] == ["888", "Hello"]


def test_tools_offered_can_be_chosen_and_a_conversations_own_stay():
    own = Conversation(QUESTION.turns, tools=('{"type": "function", "function": {"name": "mine"}}',))
    model = Scripted("a", "b")
    run_agent([QUESTION, own], PLUGINS, get_template("internlm2_chat"), model, tools=())
    assert model.seen[0][0].tools == () and model.seen[0][1].tools == own.tools


def test_templates_for_agents():
    assert agent_template(get_template("internlm2_chat")) is get_template("internlm2_chat")
    assert agent_template(get_template("llama3_chat")) == get_template("llama3_chat+react")
    with pytest.raises(XtuneError, match="plugins need a named chat template"):
        agent_template(get_template("hf"))
    with pytest.raises(XtuneError, match="has no tool format"):
        run_agent([QUESTION], PLUGINS, get_template("llama3_chat"), Scripted("x"))


# ---------------------------------------------------------------- generation


class FixedModel(torch.nn.Module):
    """Writes the same continuation after every prompt, as `generate` would, and records the stop ids."""

    def __init__(self, continuation: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuation = continuation
        self.kwargs = {}

    def generate(self, input_ids, attention_mask, **kwargs):
        self.kwargs = kwargs
        tail = torch.tensor([self.continuation] * len(input_ids))
        return torch.cat([input_ids, tail], dim=1)


def test_generation_keeps_the_call_markers_and_stops_where_the_call_ends(tokenizer):
    template = get_template("internlm2_chat")
    ids = tokenizer.encode(INTERNLM2_CALL + "<|action_end|>", add_special_tokens=False)
    model = FixedModel(ids + [tokenizer.eos_token_id, tokenizer.pad_token_id])
    generate = model_generate(model, tokenizer, template, GenerationOptions(max_new_tokens=64))
    assert generate([QUESTION, QUESTION]) == [INTERNLM2_CALL, INTERNLM2_CALL]
    stops = tokenizer.convert_tokens_to_ids(["<|action_end|>", "<|im_end|>"])
    assert set(stops) | {tokenizer.eos_token_id} <= set(model.kwargs["eos_token_id"])
    hallucinated = tokenizer.encode(REACT_CALL + "\nObservation: 12", add_special_tokens=False)
    react = model_generate(FixedModel(hallucinated), tokenizer, get_template("llama3_chat+react"), GenerationOptions())
    assert react([QUESTION]) == [REACT_CALL]
    answer = FixedModel(tokenizer.encode("888", add_special_tokens=False) + [tokenizer.eos_token_id])
    assert model_generate(answer, tokenizer, template)([QUESTION]) == ["888"]


# ---------------------------------------------------------------- chat


def test_repl_keeps_the_agents_turns_and_drops_an_unfinished_exchange():
    model = Scripted(INTERNLM2_CALL, "888", *[INTERNLM2_CALL] * 2, "fine")
    inputs = iter(["What is 37 * 24?", "Loop", "And now?", "EXIT"])
    out = io.StringIO()
    agent_repl(model, get_template("internlm2_chat"), PLUGINS, "Be brief.", max_turns=2, read=lambda _: next(inputs), out=out)
    shown = out.getvalue()
    assert '-> calculate({"expression": "37 * 24"})\n<- 888\n888\n' in shown
    assert "(stopped: still calling tools after 2 replies" in shown and "left out of the history" in shown
    last = model.seen[-1][0]
    assert [turn.role for turn in last.turns] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert last.turns[0].content == "Be brief." and last.turns[-1].content == "And now?"


def test_chat_with_plugins_over_a_prompts_file(tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 37 * 24?\nHi\n")
    out = tmp_path / "answers.jsonl"
    generates = []
    monkeypatch.setattr(agent, "model_generate", lambda *args, **kwargs: generates.append(Scripted(INTERNLM2_CALL, "Hello", "888")) or generates[-1])
    chat_with_plugins(None, None, get_template("internlm2_chat"), PLUGINS, "", GenerationOptions(), str(prompts), out, list_tools=False)
    assert generates[0].seen[0][0].tools == ()
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["888", "Hello"]
    assert captured.err.splitlines() == ['[1] -> calculate({"expression": "37 * 24"})', "[1] <- 888"]
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"prompt": "What is 37 * 24?", "answer": "888", "steps": [{"calls": [{"name": "calculate", "arguments": {"expression": "37 * 24"}}], "results": ["888"]}]},
        {"prompt": "Hi", "answer": "Hello", "steps": []},
    ]  # fmt: skip


def test_chat_with_plugins_reads_prompts_from_stdin_and_leaves_it_open(monkeypatch, capsys):
    stdin = io.StringIO("What is 37 * 24?\n")
    monkeypatch.setattr("sys.stdin", stdin)
    monkeypatch.setattr(agent, "model_generate", lambda *args, **kwargs: Scripted(INTERNLM2_CALL, "888"))
    chat_with_plugins(None, None, get_template("internlm2_chat"), PLUGINS, "", GenerationOptions(), "-")
    assert capsys.readouterr().out == "888\n"
    assert not stdin.closed


def test_repl_greets_with_the_plugins_and_ctrl_c_keeps_the_history():
    class InterruptedOnce(Scripted):
        def __call__(self, conversations):
            if len(self.seen) == 1:
                self.seen.append(conversations)
                raise KeyboardInterrupt
            return super().__call__(conversations)

    model = InterruptedOnce("Hello", "Fine", "Hey")
    inputs = iter(["Hi", "Slow question", "How are you?", "RESET", "Again", "EXIT"])
    out = io.StringIO()
    agent_repl(model, get_template("internlm2_chat"), PLUGINS, "", read=lambda _: next(inputs), out=out)
    shown = out.getvalue()
    assert shown.startswith("Chat with internlm2_chat and plugins calculate. RESET clears the history, EXIT quits.\n")
    assert "\n(stopped)\n" in shown and "(history cleared)\n" in shown
    assert [turn.content for turn in model.seen[2][0].turns] == ["Hi", "Hello", "How are you?"]
    assert [turn.content for turn in model.seen[3][0].turns] == ["Again"]


def test_cli_chat_with_plugins_takes_xtuners_names_and_runs_the_agent(tmp_path, monkeypatch):
    from xtune.cli import app
    from xtune.infer import chat

    seen = {}

    def fake_chat_with_plugins(model, tokenizer, template, plugins, system, options, input, output, max_turns, list_tools, console):
        seen.update(plugins=[p.name for p in plugins], template=template.name, max_turns=max_turns, input=input, list_tools=list_tools)

    monkeypatch.setattr(chat, "load_chat_model", lambda *args: (None, None))
    monkeypatch.setattr(chat, "pick_template", lambda *args: get_template("internlm2_chat"))
    monkeypatch.setattr("xtune.models.load.resolve_model_path", lambda model: tmp_path)
    monkeypatch.setattr(agent, "chat_with_plugins", fake_chat_with_plugins)
    runner = CliRunner()
    prompts = tmp_path / "p.txt"
    prompts.write_text("2+2?\n")
    args = ["chat", "some/model", "--with-plugins", "calculate", "solve", "--agent-max-turns", "3", "--input", str(prompts)]
    result = runner.invoke(app, [*args, "--no-list-tools"])
    assert result.exit_code == 0, result.output
    assert seen == {"plugins": ["calculate", "solve"], "template": "internlm2_chat", "max_turns": 3, "input": str(prompts),
                    "list_tools": False}  # fmt: skip
    (tmp_path / "notes.md").write_text("# Notes\nxtune trains models.\n")
    result = runner.invoke(app, ["chat", "some/model", "--with-plugins", "calculate,search", "--search-folder", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen["plugins"] == ["calculate", "search"] and seen["list_tools"] is True
    for args, message in [
        (["--with-plugins", "weather"], "unknown plugin 'weather'"),
        (["extra"], "unexpected arguments: extra"),
        (["--search-folder", str(tmp_path)], "--search-folder is for the search plugin"),
    ]:
        result = runner.invoke(app, ["chat", "some/model", *args])
        assert isinstance(result.exception, XtuneError) and message in str(result.exception)


# ---------------------------------------------------------------- the calculator task


def test_calculator_task_copies_token_for_token_and_scores_whole_episodes(tokenizer):
    from xtune.data.formats import openai_to_standard
    from xtune.testing.tasks import calculator_correct, calculator_questions, calculator_record

    train, held_out = calculator_questions()
    assert (len(train), len(held_out)) == (476, 40)
    assert not {q.expression for q in train} & {q.expression for q in held_out}
    question = held_out[0]
    a, _, b = question.expression.split()

    def pieces(text):
        return tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))

    for number in (a, b):
        assert pieces(f" {number}")[1:] == pieces(number)[1:] and len(pieces(number)) == 2
    assert len(pieces(question.answer)) == 2
    assert openai_to_standard(calculator_record(question)) == Conversation(
        (
            Turn("user", question.question),
            Turn("assistant", "", True, (ToolCall("calculate", json.dumps({"expression": question.expression})),)),
            Turn("tool", question.answer, name="calculate"),
            Turn("assistant", question.answer, True),
        )
    )
    call = json.dumps({"name": "calculate", "parameters": {"expression": question.expression}})
    template = get_template("internlm2_chat")
    (right,) = run_agent([QUESTION], PLUGINS, template, Scripted(f"<|action_start|><|plugin|>\n{call}", question.answer))
    assert calculator_correct(right.steps, question)
    (wrong,) = run_agent([QUESTION], PLUGINS, template, Scripted(question.answer))
    assert not calculator_correct(wrong.steps, question)  # no call: the answer alone does not count
