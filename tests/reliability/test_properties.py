"""Property-based tests over what users hand xtune: configs and data records. Whatever they hold, the answer
is a valid result or one of xtune's own errors whose message says where (file and line, or the key), never
another exception.

Each test prints how many cases it tried and what came of them (`pytest -s`); the figures are in
docs/RELIABILITY.md.
"""

import copy
import json
import keyword
import re
from collections import Counter

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xtune.config.load import load_config
from xtune.config.schema import ALIASES, FIELD_NAMES, Config
from xtune.data.encode import IGNORE_INDEX, encode
from xtune.data.formats import FORMATS, Conversation, RecordError, check_conversation, detect_format
from xtune.data.sources import BadRecord, SourceSpec, load_sources, read_conversations
from xtune.data.templates import get_template
from tests.data.test_formats import _places
from xtune.errors import ConfigError, DataError, XtuneError

CASES = 1000
"""Cases tried per config form and per record format."""
QUICK_CASES = 100
SIZES = [pytest.param(CASES, marks=pytest.mark.slow, id=str(CASES)), pytest.param(QUICK_CASES, id=str(QUICK_CASES))]
"""For the record tests, which take about 9 s per 1000 cases on one core (mostly generating them): 1000 cases
are slow, 100 run in the quick suite."""


def fuzz(cases: int = CASES) -> settings:
    return settings(
        max_examples=cases, deadline=None, derandomize=True,  # the same cases each run: the counts reproduce
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
    )


def report(name: str, outcomes: Counter, cases: int = CASES) -> None:
    print(f"\n{name}: {sum(outcomes.values())} cases: {dict(sorted(outcomes.items()))}")
    assert sum(outcomes.values()) >= cases


# Configs ------------------------------------------------------------------------------------------------

JUNK_NAMES = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_]{0,12}", fullmatch=True).filter(lambda n: not keyword.iskeyword(n))
NAMES = st.sampled_from([*FIELD_NAMES, *ALIASES]) | JUNK_NAMES | st.sampled_from(["_private", "lora_rank", "lr_"])
ATOMS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["lora", "full", "4bit", "auto", "fsdp", "internlm2_chat", "xtune-tiny/antonyms", "-1", ""])
)
SOURCE_KEYS = st.sampled_from(["path", "format", "repeats", "image_folder", "x"]) | st.text(max_size=4)
VALUES = st.recursive(
    ATOMS,
    lambda children: st.lists(children, max_size=3)
    | st.tuples(children, children)
    | st.dictionaries(SOURCE_KEYS, children, max_size=3),
    max_leaves=6,
)
BASE = {"llm_name_or_path": "xtune-tiny/internlm2-chat", "data_path": "xtune-tiny/antonyms"}
"""The two keys without a default; most generated configs start from them so that validation goes deep."""
SYNTAX_ERRORS = ["x = = 1", "lr = (1,", "def", "batch_size = 1 +", "'unclosed", "\tindented = 1", "lr = 1e", "if True"]


GOOD = [
    *((name, field.default) for name, field in Config.model_fields.items() if not field.is_required()),
    ("lr", 1e-4), ("lora_r", 8), ("method", "full"), ("quantization", "4bit"), ("max_length", 16),
    ("betas", (0.9, 0.95)), ("prompt_template", "qwen_chat"), ("datasets", [{"path": "d", "repeats": 2}]),
    ("evaluation_inputs", ["hi"]), ("report_to", ["tensorboard"]), ("save_total_limit", -1),
    ("pretrained_model_name_or_path", "m"), ("max_steps", 3),
]  # fmt: skip
"""Valid (key, value) pairs: each field's default and a few others."""


def config_values() -> st.SearchStrategy[dict]:
    """Keys and values: the required two or not, valid pairs, then random ones (none in about half)."""
    good = st.lists(st.sampled_from(GOOD), max_size=4).map(dict)
    junk = st.just({}) | st.dictionaries(NAMES, VALUES, max_size=4)
    return st.tuples(st.booleans(), good, junk).map(lambda p: {**(BASE if p[0] else {}), **p[1], **p[2]})


def config_outcome(load, where: str, keys) -> str:
    """`load()` gives a Config, or a ConfigError naming `where` (the file) or --cfg-options and, for an unknown
    key, one of `keys` (None: any); returns which, or the known bug hit."""
    try:
        config, _ = load()
    except ConfigError as error:
        message = str(error)
        assert where in message or "--cfg-options" in message, message
        if keys is not None and "unknown key" in message:
            assert any(f"unknown key '{key}'" in message for key in keys), message
        return "ConfigError"
    assert isinstance(config, Config)
    return "Config"


def test_python_configs_load_or_say_which_key_is_wrong(tmp_path):
    outcomes: Counter = Counter()
    path = tmp_path / "generated_cfg.py"

    @fuzz()
    @given(values=config_values(), broken=st.none() | st.sampled_from(SYNTAX_ERRORS), at=st.integers(0, 6))
    def check(values, broken, at):
        lines = [f"{name} = {value!r}" for name, value in values.items()]  # floats inf and nan write names: NameError
        if broken is not None:
            lines.insert(min(at, len(lines)), broken)
        path.write_text("\n".join(lines) + "\n")
        outcome = config_outcome(lambda: load_config(str(path)), str(path), values)
        assert broken is None or outcome == "ConfigError"
        outcomes[outcome] += 1

    check()
    report("config .py", outcomes)
    assert outcomes["Config"] >= CASES // 10


def plain(value):
    """Tuples as lists, which YAML's safe dumper writes."""
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


YAML_JUNK = [
    "key: [1, 2", "- a\n- b", ": x", "a: b: c", "\tx: 1", "x: !!python/tuple [1]", "'", "---\n---", "&a x: *b", "", "~",
    "lr: 1\nlr: x", "<<: {lr: 1}\nllm_name_or_path: m\ndata_path: d", "? [a, b]\n: 1", "lr: 2020-01-01",
]  # fmt: skip


def test_yaml_configs_load_or_say_which_key_is_wrong(tmp_path):
    outcomes: Counter = Counter()
    path = tmp_path / "generated_cfg.yaml"
    yaml_keys = NAMES | st.integers(-3, 3) | st.booleans() | st.none() | st.floats(allow_nan=False)

    @fuzz()
    @given(
        values=config_values(),
        extra=st.dictionaries(yaml_keys, VALUES, max_size=2),
        junk=st.none() | st.sampled_from(YAML_JUNK),
    )
    def check(values, extra, junk):
        document = plain({**values, **extra})
        path.write_text(yaml.safe_dump(document, sort_keys=False) if junk is None else junk)
        outcomes[config_outcome(lambda: load_config(str(path)), str(path), document if junk is None else None)] += 1

    check()
    report("config .yaml", outcomes)
    assert outcomes["Config"] >= CASES // 20


LITERALS = st.sampled_from(
    ["1", "-1", "1e-4", "1e999", "True", "None", "'x'", "[1, 2]", "(0.9, 0.95)", "{'a': 1}", "[{'path': 'd'}]",
     "{[1]: 2}", "{{}}", "[" * 50, "(" * 300, "1 +", "lambda: 0", "__import__('os')", "", "=", "x=y", "'''", "\\x00"]
) | st.text(max_size=10)  # fmt: skip


def test_cfg_options_apply_or_say_which_key_is_wrong(tmp_path):
    outcomes: Counter = Counter()
    path = tmp_path / "base_cfg.py"
    path.write_text("".join(f"{key} = {value!r}\n" for key, value in BASE.items()))
    good = st.sampled_from(GOOD).map(lambda pair: f"{pair[0]}={pair[1]!r}") | st.sampled_from(["method=full", " lr=2"])
    separators = st.sampled_from(["=", "", "==", " = "])
    junk = st.tuples(NAMES | st.text(max_size=6), separators, LITERALS | VALUES.map(repr)).map("".join)

    @fuzz()
    @given(overrides=st.lists(good, max_size=3) | st.lists(good | junk, max_size=3))
    def check(overrides):
        keys = [override.partition("=")[0].strip() for override in overrides]
        outcomes[config_outcome(lambda: load_config(str(path), overrides), str(path), keys)] += 1

    check()
    report("--cfg-options", outcomes)
    assert outcomes["Config"] >= CASES // 10


# Data records -------------------------------------------------------------------------------------------

KEYS = [
    "conversation", "instruction", "input", "output", "system", "history", "messages", "role", "content",
    "tool_calls", "tool_call_id", "id", "name", "weight", "loss", "tools", "functions", "function_call",
    "conversations", "from", "value", "image", "images", "text", "function", "arguments", "type", "parameters",
]  # fmt: skip
SPECIAL_TEXTS = [
    "human", "gpt", "system", "user", "assistant", "tool", "function", "function_call", "observation", "text",
    "<image>", "", " ", "\n", "{}", "[]", "null", "NaN", "[", "<s>", "</s>", "<|im_end|>", "<|im_start|>",
    '{"name": "f", "arguments": {}}', '[{"name": "f", "arguments": "{}"}]', '{"a": 1e999}', "{[1]: 2}",
    "<|startofthink|>", "<|endofthink|>", "<|startofexec|>", "<|endofexec|>", "```JSON", "```",
    '{"api_name": "f", "parameters": {"q": "x"}}',
    '{"name": "f", "description": "d", "paths": [{"parameters": [{"name": "q", "required": "True"}]}]}',
    "\U0001f600", "\x00", "\u2028", "\ufeff", "\ud800",
]  # fmt: skip
TEXTS = st.sampled_from(SPECIAL_TEXTS) | st.text(max_size=6)
SCALARS = st.none() | st.booleans() | st.integers(-1, 2) | st.integers() | st.floats() | TEXTS
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=3), children, max_size=4),
    max_leaves=10,
)
WORDS = st.sampled_from(["hi", "a b", "", "<image>", "ok", " x ", "é"]) | TEXTS
WEIGHTS = st.sampled_from([{}, {}, {}, {"weight": 1}, {"weight": 0}, {"loss": True}, {"loss": False}, {"weight": 0.5}])
ARGUMENTS = st.sampled_from(["{}", '{"x": 1}', {"x": [1, 2]}, {}, "[", "1"])


@st.composite
def mutated(draw, valid):
    """A valid record, then up to three random edits anywhere in it: replace, delete or duplicate a value."""
    record = copy.deepcopy(draw(valid))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        places = list(_places(record))
        if not places:
            record = draw(JSON_VALUES)
            continue
        container, key = draw(st.sampled_from(places))
        action = draw(st.sampled_from(["replace", "replace", "delete", "duplicate"]))
        if action == "replace":
            container[key] = draw(JSON_VALUES)
        elif action == "delete":
            del container[key]
        elif isinstance(container, list):
            container.insert(key, copy.deepcopy(container[key]))
        else:
            container[draw(st.sampled_from(KEYS))] = copy.deepcopy(container[key])
    return record


@st.composite
def openai_record(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(WORDS)})
    for round_ in range(draw(st.integers(1, 3))):
        content = draw(WORDS | st.just([{"type": "text", "text": "x"}, {"type": "text", "text": "<image>"}]))
        messages.append({"role": "user", "content": content})
        if draw(st.booleans()):
            calls = [
                {"id": f"c{round_}{n}", "type": "function", "function": {"name": name, "arguments": draw(ARGUMENTS)}}
                for n, name in enumerate(draw(st.lists(st.sampled_from("fg"), min_size=1, max_size=2)))
            ]
            messages.append({"role": "assistant", "content": None, "tool_calls": calls, **draw(WEIGHTS)})
            for call in calls:
                links = [{}, {"tool_call_id": call["id"]}, {"name": call["function"]["name"]}, {"tool_call_id": "nope"}]
                link = draw(st.sampled_from(links))
                messages.append({"role": draw(st.sampled_from(["tool", "function"])), "content": draw(WORDS), **link})
        messages.append({"role": "assistant", "content": draw(WORDS), **draw(WEIGHTS)})
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]
    extras = [{}, {"tools": tools}, {"tools": json.dumps(tools)}, {"functions": [{"name": "g"}]}, {"images": ["a.png"]}]
    extra = draw(st.sampled_from(extras))
    return {"messages": messages, **extra}


@st.composite
def sharegpt_record(draw, images: bool = False):
    messages = [{"from": "system", "value": draw(WORDS)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"from": draw(st.sampled_from(["human", "user"])), "value": draw(WORDS)})
        if draw(st.booleans()):
            call = {"name": draw(st.sampled_from("fg")), "arguments": draw(ARGUMENTS)}
            messages.append({"from": "function_call", "value": json.dumps(draw(st.sampled_from([call, [call, call]])))})
            messages.append({"from": "observation", "value": draw(WORDS)})
        messages.append({"from": draw(st.sampled_from(["gpt", "assistant"])), "value": draw(WORDS), **draw(WEIGHTS)})
    if images and draw(st.booleans()):
        first_user = next(message for message in messages if message["from"] in ("human", "user"))
        first_user["value"] = "<image>\n" + first_user["value"]
    extra = draw(st.sampled_from([{}, {"system": "s"}, {"tools": '[{"name": "f"}]'}, {"id": "7"}, {"id": 7}]))
    placeholders = sum(message["value"].count("<image>") for message in messages)
    choices = [{"image": "a.jpg"}, {"image": ["a.jpg"] * placeholders}, {"images": ["b.png"] * placeholders}]
    return {"conversations": messages, **extra, **draw(st.sampled_from(choices if images else [{}, *choices]))}


@st.composite
def conversation_record(draw):
    rounds = [
        {"input": draw(WORDS), "output": draw(WORDS), **draw(WEIGHTS), **draw(st.sampled_from([{}, {"system": "s"}]))}
        for _ in range(draw(st.integers(1, 3)))
    ]
    return {"conversation": rounds}


MSAGENT_TOOLS = [
    '{"name": "f", "description": "d", "paths": [{"parameters": [{"name": "q", "required": "True"}]}]}',
    '{"name": "g", "description": "e"}', '"plugin_schema_for_model"', "{",
    '{"name": 1, "description": null, "paths": 3}',
]
MSAGENT_STEPS = st.sampled_from(
    ["thinking", '<|startofthink|>```JSON\n{"api_name": "f", "parameters": {"q": "x"}}\n```<|endofthink|>',
     '<|startofexec|>```JSON\n{"result": 1}\n```<|endofexec|>', "answer", "<|startofthink|>{}<|endofthink|>"]
) | TEXTS  # fmt: skip


@st.composite
def msagent_record(draw):
    system = " ".join(draw(st.lists(st.sampled_from(MSAGENT_TOOLS) | TEXTS, max_size=3)))
    messages = [{"from": "system", "value": system}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 2))):
        messages.append({"from": "user", "value": draw(WORDS)})
        messages.append({"from": "assistant", "value": "".join(draw(st.lists(MSAGENT_STEPS, min_size=1, max_size=5)))})
    return {"conversations": draw(st.sampled_from([messages, messages, json.dumps(messages), repr(messages)]))}


ALPACA = st.fixed_dictionaries(
    {"instruction": WORDS, "output": WORDS},
    optional={"input": WORDS, "system": WORDS, "history": st.lists(st.tuples(WORDS, WORDS).map(list), max_size=2)},
)
TEXT = st.fixed_dictionaries({"text": WORDS}, optional={"meta": JSON_VALUES})
GUANACO_TURNS = st.sampled_from(["### Human: ", "### Assistant: ", "###", "### Human:", "\n"]) | WORDS
GUANACO = st.builds(lambda pieces: {"text": "### Human: " + "".join(pieces)}, st.lists(GUANACO_TURNS, max_size=8))

RECORDS = {
    "conversation": mutated(conversation_record()),
    "alpaca": mutated(ALPACA),
    "openai": mutated(openai_record()),
    "sharegpt": mutated(sharegpt_record()),
    "llava": mutated(sharegpt_record(images=True)),
    "msagent_react": mutated(msagent_record()),
    "text": mutated(TEXT),
    "oasst1": mutated(GUANACO),
}
RECORDS["auto"] = st.one_of(*RECORDS.values())
TEMPLATES = ["internlm2_chat", "llama3_chat", "qwen_chat", "chatglm3", "default", "internlm2_chat+react", "hf"]
BAD_LINES = [b"not json", b"[1, 2]", b'"text"', b"\xff\xfe", b"{", b"   ", b"null", b"1e999", b'{"a": 1} x']


def test_every_format_is_fuzzed():
    assert set(RECORDS) - {"auto"} == set(FORMATS)


def expected_items(name: str, lines: list[bytes]) -> list[tuple[int, Conversation | Exception]]:
    """(line number, what its record should become) for the non-blank lines of a JSON Lines file read as
    format `name`, from the map functions alone: a Conversation, or an error for a line that is not JSON or
    whose record is bad. With auto, the file's format is detected from its first record of a known format."""
    items: list[tuple[int, Conversation | Exception]] = []
    detected = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError as error:
            items.append((number, error))
            continue
        try:
            if name == "auto" and detected is None:
                detected = detect_format(record)
            conversation = FORMATS[detected if name == "auto" else name](record)
        except RecordError as error:
            assert str(error)
            items.append((number, error))
            continue
        assert check_conversation(conversation) is conversation
        items.append((number, conversation))
    return items


def encode_outcome(conversation: Conversation, template_name: str, max_length: int | None, tokenizer) -> str:
    try:
        encoded = encode(conversation, get_template(template_name), tokenizer, max_length)
    except XtuneError as error:  # a template without tool turns, or the tokenizer's chat_template refusing a turn order
        assert f"'{template_name.partition('+')[0]}'" in str(error) or "prompt template 'hf'" in str(error), error
        return "encode: XtuneError"
    assert len(encoded.input_ids) == len(encoded.labels)
    assert max_length is None or len(encoded.input_ids) <= max_length
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(encoded.input_ids, encoded.labels))
    return "encoded"


def read_outcomes(name: str, path, lines: list[bytes]) -> tuple[list[str], list[tuple[str, Conversation]]]:
    """Reads the file; checks each item against `expected_items`; returns the bad locations and the good samples."""
    expected = expected_items(name, lines)
    items = list(read_conversations(path, name, check_images=False))
    if not expected:
        assert len(items) == 1 and items[0].location == str(path) and "empty" in items[0].message
        return [str(path)], []
    assert len(items) == len(expected)
    bad, good = [], []
    for item, (number, result) in zip(items, expected):
        location = f"{path}:{number}"
        if isinstance(item, BadRecord):
            assert item.location == location and item.message and str(item).startswith(f"{location}: ")
            assert not isinstance(result, Conversation), (item, result)
            if isinstance(result, RecordError):
                assert str(result) in item.message
            bad.append(location)
        else:
            assert item == (location, result)
            good.append(item)
    return bad, good


def check_loading(path, name: str, bad: list[str], good: list) -> None:
    """`load_sources` stops at the first bad record naming its line, or with skip_bad_records leaves out exactly
    the bad ones."""
    spec = SourceSpec(str(path), name)
    try:
        loaded = load_sources([spec], check_images=False)
    except DataError as error:
        assert bad and str(error).startswith(f"{bad[0]}: "), (str(error), bad)
    else:
        assert not bad and loaded.samples == good
    try:
        loaded = load_sources([spec], check_images=False, skip_bad_records=True)
    except DataError as error:
        assert not good and f"all {len(bad)} were bad" in str(error), str(error)
    else:
        assert [record.location for record in loaded.skipped] == bad and loaded.samples == good


@pytest.mark.parametrize("cases", SIZES)
@pytest.mark.parametrize("name", list(RECORDS))
def test_records_read_as_conversations_or_errors_naming_file_and_line(name, cases, tokenizer, tmp_path):
    """Random records (and some lines that are not records) in a JSON Lines file, read through the public path,
    `read_conversations` and `load_sources`: each record comes out as its map function alone makes it, a bad
    one as a BadRecord or DataError naming the file and line, and every good one encodes with a template."""
    outcomes: Counter = Counter()
    path = tmp_path / f"{name}.jsonl"
    line = RECORDS[name].map(lambda record: json.dumps(record).encode()) | st.sampled_from(BAD_LINES)

    @fuzz(cases)
    @given(
        lines=st.lists(line, min_size=1, max_size=3),
        template_name=st.sampled_from(TEMPLATES),
        max_length=st.sampled_from([None, 8, 64]),
    )
    def check(lines, template_name, max_length):
        path.write_bytes(b"\n".join(lines) + b"\n")
        bad, good = read_outcomes(name, path, lines)
        check_loading(path, name, bad, good)
        outcomes["lines: bad"] += len(bad)
        outcomes["lines: conversation"] += len(good)
        for _, conversation in good:
            outcomes[encode_outcome(conversation, template_name, max_length, tokenizer)] += 1
        outcomes["cases"] += 1

    check()
    print(f"\nrecords, format {name}: {outcomes['cases']} cases: {dict(sorted(outcomes.items()))}")
    assert sum(count for outcome, count in outcomes.items() if outcome == "cases" or "read:" in outcome) >= cases
    assert outcomes["lines: conversation"] >= cases // 50 and outcomes["lines: bad"] >= cases // 50, "lopsided cases"


@pytest.mark.parametrize("cases", SIZES)
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_map_functions_give_a_conversation_or_a_record_error(name, cases):
    """Each map function alone, on any JSON-like value: a Conversation that passes check_conversation, or a
    RecordError with a message."""
    outcomes: Counter = Counter()

    @fuzz(cases)
    @given(record=RECORDS[name] | JSON_VALUES)
    def check(record):
        try:
            conversation = FORMATS[name](record)
        except RecordError as error:
            assert str(error)
            outcomes["RecordError"] += 1
        else:
            assert check_conversation(conversation) is conversation
            outcomes["Conversation"] += 1

    check()
    report(f"map function {name}", outcomes, cases)


# Nesting: JSON of any depth through the readers and `data repeat` -----------------------------------------

GOOD_LINE = '{"instruction": "q", "output": "a"}'
HOSTS = [  # where the nested value goes: a field a map function reads, one it ignores, tool-call arguments, a line
    '{"instruction": "q", "output": NESTED}',
    '{"instruction": "q", "output": "a", "meta": NESTED}',
    '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": '
    '[{"type": "function", "function": {"name": "f", "arguments": NESTED}}]}]}',
    "NESTED",
]


@st.composite
def nested_json(draw) -> str:
    """Arrays and objects nested 1 to 100,000 deep in a repeating pattern: a few levels, around Python's recursion
    limit (1,000), or far past it."""
    depth = draw(st.one_of(st.integers(1, 50), st.integers(900, 1100), st.sampled_from([2000, 5000, 100_000])))
    pattern = draw(st.lists(st.sampled_from(["[", '{"k": ']), min_size=1, max_size=3))
    opening = [pattern[level % len(pattern)] for level in range(depth)]
    closing = "".join("]" if opener == "[" else "}" for opener in reversed(opening))
    return "".join(opening) + draw(st.sampled_from(['"x"', "1", "null", "[]"])) + closing


@pytest.mark.parametrize("cases", SIZES)
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_nested_at_any_depth_is_read_or_named_at_its_line(suffix, cases, tmp_path):
    """A record holding JSON nested to any depth, among good ones, in a .jsonl or .json file: `read_conversations`,
    `load_sources` and `repeat_dataset` (`xtune data repeat`) read it, or name the file and the line of the nesting
    they cannot read (a RecursionError was a traceback in `data repeat`)."""
    from xtune.data.tools import repeat_dataset

    outcomes: Counter = Counter()
    path, output = tmp_path / f"d{suffix}", tmp_path / "out.jsonl"

    @fuzz(cases)
    @given(value=nested_json(), host=st.sampled_from(HOSTS), before=st.integers(0, 2), after=st.integers(0, 1))
    def check(value, host, before, after):
        lines = [GOOD_LINE] * before + [host.replace("NESTED", value)] + [GOOD_LINE] * after
        if suffix == ".json":
            path.write_text("[\n" + ",\n".join(lines) + "\n]\n")
        else:
            path.write_text("\n".join(lines) + "\n")
        location = f"{path}:{before + (2 if suffix == '.json' else 1)}"
        items = list(read_conversations(path, "auto", check_images=False))
        assert all(isinstance(item, BadRecord) or isinstance(item[1], Conversation) for item in items)
        deep = [item.location for item in items if isinstance(item, BadRecord) and "levels deep" in item.message]
        assert deep in ([], [location]), (deep, location)
        outcomes["cases"] += 1
        outcomes["read: too deep, its line named" if deep else "read: records (good or bad by their format)"] += 1
        try:
            load_sources([SourceSpec(str(path), "auto")], check_images=False)
        except DataError as error:
            assert str(error).startswith(str(path)), str(error)
        output.unlink(missing_ok=True)
        try:
            assert repeat_dataset(path, output, 2) == 2 * len(lines)
            outcomes["repeat: written"] += 1
        except DataError as error:
            assert str(error).startswith(f"{location}: JSON nested "), str(error)
            outcomes["repeat: too deep, its line named"] += 1

    check()
    print(f"\nnested JSON, {suffix}: {outcomes['cases']} cases: {dict(sorted(outcomes.items()))}")
    assert outcomes["cases"] >= cases
    assert outcomes["read: too deep, its line named"] >= cases // 10 and outcomes["repeat: written"] >= cases // 10


# Fixed bugs, pinned ---------------------------------------------------------------------------------------


def test_yaml_key_that_is_not_a_string_is_a_config_error(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("llm_name_or_path: m\ndata_path: d\n1: x\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}:3: .*'1'"):
        load_config(str(path))


def test_cfg_option_with_an_unhashable_literal_is_a_config_error(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("llm_name_or_path = 'm'\ndata_path = 'd'\n")
    with pytest.raises(ConfigError, match="--cfg-options: key 'lr'"):
        load_config(str(path), ["lr={[1]: 2}"])


def test_yaml_config_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"llm_name_or_path: m\ndata_path: d\xff\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(str(path))


@pytest.mark.parametrize("suffix", [".yaml", ".py"])
def test_an_int_over_4300_digits_is_a_config_error(tmp_path, suffix):
    path = tmp_path / f"cfg{suffix}"
    if suffix == ".yaml":
        path.write_text(f"llm_name_or_path: m\ndata_path: d\nbatch_size: {'9' * 5000}\n")
    else:
        path.write_text("llm_name_or_path = 'm'\ndata_path = 'd'\nbatch_size = 10**5000\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(str(path))


def test_msagent_conversations_text_with_an_unhashable_literal_is_a_record_error():
    with pytest.raises(RecordError, match="conversations"):
        FORMATS["msagent_react"]({"conversations": "{[1]: 2}"})


def test_a_lone_surrogate_is_a_record_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a\\ud800", "output": "b"}\n')
    items = list(read_conversations(path, "alpaca"))
    assert isinstance(items[0], BadRecord) and items[0].location == f"{path}:1"
