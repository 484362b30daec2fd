"""The agent loop: the model calls tools (plugins), reads their results, and answers.

Each round the model writes one reply. `parse_reply` reads the reply's tool calls in the template's tool format
(InternLM2's `<|action_start|><|plugin|>`, Qwen's `<tool_call>`, ReAct's `Action:`/`Action Input:`); the calls run
through `call_plugin`, and the assistant turn (with its calls) and one `tool` turn per result are appended to the
conversation, which is rendered by the same template as in training. A reply without calls is the final answer.
A call that cannot be read comes back to the model as the observation `error: could not parse the tool call: ...`,
so the loop never crashes on a model's mistake; after `max_turns` replies it stops with a note.

Generation stops where a call ends (the tool format's stop words), so the model never writes a tool's result
itself, and the reply is decoded with its special tokens, which is where InternLM2 writes its calls.
"""

import hashlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TextIO

from xtune.data.formats import Conversation, ToolCall, Turn, with_system
from xtune.data.templates import (
    MISTRAL_V0_3_TOOLS,
    ChatTemplate,
    Template,
    ToolFormat,
    TokenizerTemplate,
    with_tool_format,
)
from xtune.errors import XtuneError
from xtune.infer.chat import chat_loop, read_input
from xtune.infer.generate import GenerationOptions, generate_replies
from xtune.infer.plugins import Plugin, call_plugin

MAX_TURNS = 5
PARSE_ERROR = "error: could not parse the tool call: "

Generate = Callable[[list[Conversation]], list[str]]
"""Conversations ending with a user or tool turn -> the model's next reply to each."""


@dataclass(frozen=True)
class ParsedReply:
    content: str
    """The reply's text without its calls: the thought before them, or the whole answer."""
    calls: tuple[ToolCall, ...] = ()
    error: str | None = None
    """Why the reply's tool call could not be read; the calls are then empty."""


@dataclass(frozen=True)
class AgentStep:
    """One reply of the model and what the tools answered."""

    reply: str
    """The reply as generated."""
    content: str
    calls: tuple[ToolCall, ...] = ()
    results: tuple[str, ...] = ()
    """One per call; for a reply whose call could not be read, the error shown to the model."""
    error: str | None = None

    @property
    def is_answer(self) -> bool:
        return not self.calls and self.error is None


@dataclass(frozen=True)
class Episode:
    conversation: Conversation
    """The conversation given, with the agent's turns appended."""
    steps: tuple[AgentStep, ...]
    answer: str | None
    """The final answer; None when the model was still calling tools after `max_turns` replies."""
    note: str = ""


# ---------------------------------------------------------------- reading calls


def _call_from_json(text: str, arguments_key: str) -> ToolCall | str:
    """{"name": ..., <arguments_key>: {...}} -> a ToolCall, or why it is not one."""
    body = text.strip()
    try:
        call = json.loads(body)
    except json.JSONDecodeError as error:
        return f"not valid JSON ({error.msg} at column {error.colno}): {_clip(body)}"
    except (ValueError, RecursionError) as error:
        return f"not valid JSON ({type(error).__name__}): {_clip(body)}"
    if not isinstance(call, dict):
        return f"expected a JSON object {{\"name\": ..., \"{arguments_key}\": {{...}}}}, got: {_clip(body)}"
    name = call.get("name")
    if not isinstance(name, str) or not name:
        return f"the call has no \"name\": {_clip(body)}"
    key = next((k for k in (arguments_key, "arguments", "parameters") if k in call), arguments_key)
    return _call(name, call.get(key, {}), key)


def _call(name: str, arguments, key: str) -> ToolCall | str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            return f"the {key} of {name} are not valid JSON ({error.msg} at column {error.colno}): {_clip(arguments)}"
        except (ValueError, RecursionError) as error:  # nesting too deep, a number too long
            return f"the {key} of {name} are not valid JSON ({type(error).__name__}): {_clip(arguments)}"
    if not isinstance(arguments, dict):
        return f"the {key} of {name} must be a JSON object, got {type(arguments).__name__}"
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _collect(content: str, bodies: Sequence[ToolCall | str]) -> ParsedReply:
    errors = [body for body in bodies if isinstance(body, str)]
    if errors:
        return ParsedReply(content, (), "; ".join(errors))
    return ParsedReply(content, tuple(bodies))


def _parse_internlm2(text: str) -> ParsedReply:
    content, start, rest = text.partition("<|action_start|>")
    if not start:
        return ParsedReply(text.strip())
    bodies: list[ToolCall | str] = []
    for block in rest.split("<|action_start|>"):
        if not block.startswith("<|plugin|>"):
            bodies.append(f"expected <|plugin|> after <|action_start|>, got: {_clip(block)}")
            continue
        body = block.removeprefix("<|plugin|>").partition("<|action_end|>")[0]
        bodies.append(_call_from_json(body, "parameters"))
    return _collect(content.strip(), bodies)


def _parse_qwen(text: str) -> ParsedReply:
    content, start, rest = text.partition("<tool_call>")
    if not start:
        return ParsedReply(text.strip())
    bodies = [_call_from_json(block.partition("</tool_call>")[0], "arguments") for block in rest.split("<tool_call>")]
    return _collect(content.strip(), bodies)


_REACT_ACTION = re.compile(r"^[ \t]*Action[ \t]*:", re.MULTILINE)
_REACT_CALL = re.compile(
    r"Action[ \t]*:[ \t]*(?P<name>[^\n]*)(?:\n[ \t]*Action Input[ \t]*:(?P<input>.*?))?(?=\n[ \t]*Action[ \t]*:|\Z)",
    re.DOTALL,
)


def _parse_react(text: str) -> ParsedReply:
    text = text.partition("Observation:")[0]
    action = _REACT_ACTION.search(text)
    thought = text[: action.start() if action else len(text)].strip()
    thought = re.sub(r"^Thought[ \t]*:[ \t]*", "", thought)
    if action is None:
        return ParsedReply(thought)
    bodies: list[ToolCall | str] = []
    for match in _REACT_CALL.finditer(text, action.start()):
        name = match.group("name").strip()
        if not name:
            bodies.append("the Action line names no tool")
        elif match.group("input") is None:
            bodies.append(f"Action: {name} has no 'Action Input:' line with its arguments as a JSON object")
        else:
            bodies.append(_call(name, match.group("input").strip(), "Action Input"))
    return _collect(thought, bodies)


def _parse_llama3_1(text: str) -> ParsedReply:
    """A call is the whole reply, one JSON object {"name": ..., "parameters": {...}} (the model may open it with
    <|python_tag|>); any other reply, a JSON answer without a "name" too, is text."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):
        call = None
    if not (isinstance(call, dict) and "name" in call) and not body.startswith('{"name"'):
        return ParsedReply(text.strip())
    return _collect("", [_call_from_json(body, "parameters")])


def _parse_mistral_v0_3(text: str) -> ParsedReply:
    """[TOOL_CALLS] then a JSON list of {"name", "arguments", "id"}; a call whose id is missing or not 9 letters
    and digits gets one made from the reply, so that its result can name it."""
    content, start, rest = text.partition("[TOOL_CALLS]")
    if not start:
        return ParsedReply(text.strip())
    body = rest.strip()
    try:
        calls, _ = json.JSONDecoder().raw_decode(body)  # generation may leave text after the list
    except json.JSONDecodeError as error:
        return ParsedReply(content.strip(), (), f"not valid JSON ({error.msg} at column {error.colno}): {_clip(body)}")
    except (ValueError, RecursionError) as error:
        return ParsedReply(content.strip(), (), f"not valid JSON ({type(error).__name__}): {_clip(body)}")
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls or not all(isinstance(call, dict) for call in calls):
        expected = '[{"name": ..., "arguments": {...}, "id": ...}]'
        return ParsedReply(content.strip(), (), f"expected a JSON list {expected}, got: {_clip(body)}")
    bodies: list[ToolCall | str] = []
    for index, call in enumerate(calls):
        name = call.get("name")
        parsed = _call(name, call.get("arguments", {}), "arguments") if isinstance(name, str) and name else (
            f'the call has no "name": {_clip(json.dumps(call))}')  # fmt: skip
        if isinstance(parsed, ToolCall):
            given = call.get("id")
            valid = isinstance(given, str) and re.fullmatch(MISTRAL_V0_3_TOOLS.call_ids, given)
            parsed = replace(parsed, id=given if valid else hashlib.sha256(f"{index}/{text}".encode()).hexdigest()[:9])
        bodies.append(parsed)
    return _collect(content.strip(), bodies)


PARSERS: dict[str, Callable[[str], ParsedReply]] = {
    "internlm2": _parse_internlm2,
    "qwen": _parse_qwen,
    "react": _parse_react,
    "llama3_1": _parse_llama3_1,
    "mistral_v0_3": _parse_mistral_v0_3,
}
"""Tool format name -> the function that reads a reply written in it."""


def parse_reply(text: str, tool_format: ToolFormat) -> ParsedReply:
    """The reply's text and tool calls, read as `tool_format` writes them (the end marker may be cut off, as
    generation stops at it)."""
    return PARSERS[tool_format.name](text)


# ---------------------------------------------------------------- the loop


def agent_template(template: Template) -> ChatTemplate:
    """The template, writing tools in its own protocol, or in ReAct style when it has none."""
    if isinstance(template, TokenizerTemplate):
        raise XtuneError(
            "plugins need a named chat template, which says how tool calls are written: pass --prompt-template "
            "(internlm2_chat, qwen_chat, or any other as NAME+react)."
        )
    return template if template.tools is not None else with_tool_format(template, "react")


def tool_texts(plugins: Sequence[Plugin]) -> tuple[str, ...]:
    """The plugins as the `tools` of a conversation (OpenAI tool JSON texts)."""
    return tuple(json.dumps(plugin.tool_schema(), ensure_ascii=False) for plugin in plugins)


def run_agent(
    conversations: Sequence[Conversation],
    plugins: Sequence[Plugin],
    template: ChatTemplate,
    generate: Generate,
    max_turns: int = MAX_TURNS,
    tools: tuple[str, ...] | None = None,
    on_step: Callable[[int, AgentStep], None] | None = None,
) -> list[Episode]:
    """Runs each conversation (ending with a user turn) until the model answers without calling a tool, or has
    replied `max_turns` times. All episodes advance together, so each round is one batch for `generate`.

    The conversations are offered `tools` (default: the plugins' schemas) unless they carry tools of their own.
    `on_step(index, step)` is called after each reply and its tool results, e.g. to print them.
    """
    if template.tools is None:
        raise XtuneError(f"template '{template.name}' has no tool format; see agent_template().")
    if max_turns < 1:
        raise XtuneError(f"max_turns must be at least 1, got {max_turns}.")
    offered = tool_texts(plugins) if tools is None else tools
    current = [c if c.tools else replace(c, tools=offered) for c in conversations]
    steps: list[list[AgentStep]] = [[] for _ in current]
    answers: list[str | None] = [None] * len(current)
    active = list(range(len(current)))
    for _ in range(max_turns):
        if not active:
            break
        replies = generate([current[index] for index in active])
        still = []
        for index, reply in zip(active, replies, strict=True):
            step = _step(reply, plugins, template.tools)
            current[index] = replace(current[index], turns=(*current[index].turns, *_turns(step, template.tools)))
            steps[index].append(step)
            if on_step is not None:
                on_step(index, step)
            if step.is_answer:
                answers[index] = step.content
            else:
                still.append(index)
        active = still
    note = f"stopped: still calling tools after {max_turns} replies (allow more with --agent-max-turns)"
    return [
        Episode(conversation, tuple(episode_steps), answer, "" if answer is not None else note)
        for conversation, episode_steps, answer in zip(current, steps, answers)
    ]


def _step(reply: str, plugins: Sequence[Plugin], tool_format: ToolFormat) -> AgentStep:
    parsed = parse_reply(reply, tool_format)
    if parsed.error is not None:
        return AgentStep(reply, parsed.content, (), (PARSE_ERROR + parsed.error,), parsed.error)
    results = tuple(call_plugin(list(plugins), call.name, call.arguments) for call in parsed.calls)
    return AgentStep(reply, parsed.content, parsed.calls, results)


def _turns(step: AgentStep, tool_format: ToolFormat) -> tuple[Turn, ...]:
    """The turns a step adds: the assistant's (its reply as written when its call could not be read), then the
    results."""
    if step.error is not None:  # a result names its call where the format writes ids: here there is none
        observation = Turn("user" if tool_format.call_ids else "tool", step.results[0])
        return Turn("assistant", step.reply, trainable=True), observation
    assistant = Turn("assistant", step.content, trainable=True, tool_calls=step.calls)
    return assistant, *(Turn("tool", result, name=call.name, call_id=call.id)
                        for call, result in zip(step.calls, step.results))  # fmt: skip


# ---------------------------------------------------------------- generating with a model


def model_generate(
    model, tokenizer, template: ChatTemplate, options: GenerationOptions = GenerationOptions(), batch_size: int = 16
) -> Generate:
    """A `Generate` for `run_agent`: greedy or sampled as `options` say, in left-padded batches, stopping at the
    template's and the tool format's stop words, and decoded with special tokens kept (InternLM2's calls are
    special tokens) but cut at EOS and padding."""
    tool_stops = template.tools.stop_words if template.tools is not None else ()
    options = replace(options, stop_words=(*options.stop_words, *tool_stops), keep_special_tokens=True)

    def generate(conversations: list[Conversation]) -> list[str]:
        return generate_replies(model, tokenizer, template, conversations, options, batch_size)

    return generate


# ---------------------------------------------------------------- showing it


def describe_call(call: ToolCall) -> str:
    return f"{call.name}({call.arguments})"


def print_step(step: AgentStep, out: TextIO, dim: bool = True, prefix: str = "") -> None:
    """The step's calls and results, each line after `prefix` (dimmed on a terminal); a final answer is left to
    the caller."""
    if step.is_answer:
        return
    lines = [step.results[0]] if step.error is not None else []
    for call, result in zip(step.calls, step.results):
        lines += [f"-> {describe_call(call)}", *(f"<- {line}" for line in result.splitlines() or [""])]
    on, off = ("\x1b[2m", "\x1b[0m") if dim else ("", "")
    out.write("".join(f"{on}{prefix}{line}{off}\n" for line in lines))
    out.flush()


def episode_record(prompt: str, episode: Episode) -> dict:
    """An episode as one JSON-lines record: the prompt, the answer (null when stopped), the calls and results."""
    steps = [
        {"calls": [{"name": c.name, "arguments": json.loads(c.arguments)} for c in s.calls], "results": list(s.results)}
        for s in episode.steps
        if not s.is_answer
    ]
    record = {"prompt": prompt, "answer": episode.answer, "steps": steps}
    return {**record, "note": episode.note} if episode.note else record


def agent_repl(
    generate: Generate,
    template: ChatTemplate,
    plugins: Sequence[Plugin],
    system: str,
    max_turns: int = MAX_TURNS,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
    tools: tuple[str, ...] | None = None,
) -> None:
    """Multi-turn chat in which each answer may call the plugins (offered as `tools`, as in `run_agent`); RESET
    clears the history, EXIT (or end of input) quits, Ctrl-C stops the answer being worked on."""
    out = out or sys.stdout
    dim = out.isatty()

    def show(index: int, step: AgentStep) -> None:
        print_step(step, out, dim)

    def answer(history: tuple[Turn, ...], text: str) -> tuple[Turn, ...]:
        conversation = with_system(Conversation((*history, Turn("user", text))), system)
        (episode,) = run_agent([conversation], plugins, template, generate, max_turns, tools, show)
        if episode.answer is None:  # the unfinished exchange is dropped: the history must end with an answer
            out.write(f"({episode.note}; the question is left out of the history)\n")
            return history
        out.write(episode.answer + "\n")
        turns = episode.conversation.turns
        return turns[1:] if turns and turns[0].role == "system" and system else turns

    names = ", ".join(plugin.name for plugin in plugins)
    chat_loop(f"Chat with {template.name} and plugins {names}", answer, read, out)


def chat_with_plugins(
    model,
    tokenizer,
    template: Template,
    plugins: Sequence[Plugin],
    system: str,
    options: GenerationOptions,
    input: str | None = None,
    output=None,
    max_turns: int = MAX_TURNS,
    list_tools: bool = True,
    console=None,
) -> None:
    """`xtune chat --with-plugins`: the agent REPL, or (`input`: a prompts file, "-" for stdin) the agent over every
    prompt, the answers on stdout one a line, the calls and results on stderr, and JSON lines to `output`. The
    prompts list the plugins unless not `list_tools` (for a model trained without the list)."""
    tools = None if list_tools else ()
    agent = agent_template(template)
    if agent is not template and console is not None:
        console.print(f"[dim]{template.name} has no tool protocol of its own: tools are written in ReAct style.[/]")
    generate = model_generate(model, tokenizer, agent, options)
    if input is None:
        agent_repl(generate, agent, plugins, system, max_turns, tools=tools)
        return
    conversations = [with_system(c, system) for c in read_input(input)]

    def show(index: int, step: AgentStep) -> None:
        print_step(step, sys.stderr, sys.stderr.isatty(), prefix=f"[{index + 1}] " if len(conversations) > 1 else "")

    episodes = run_agent(conversations, plugins, agent, generate, max_turns, tools, show)
    for episode in episodes:
        answer = episode.answer if episode.answer is not None else f"({episode.note})"
        print(answer.replace("\n", "\\n"), flush=True)
    if output is not None:
        with open(output, "x", encoding="utf-8") as out:
            for conversation, episode in zip(conversations, episodes):
                record = episode_record(conversation.turns[-1].content, episode)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
