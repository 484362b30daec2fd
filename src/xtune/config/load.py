"""Load a config from a .py or .yaml file (or a built-in name) into the typed schema.

Python configs are code: they run with the full rights of the user who trains. YAML configs are the
safe form for configs from others: a key of one that would run code (`CODE_KEYS`) is refused unless the user asks
for it on the command line (`allow_code`, the CLI's --allow-code).
"""

import ast
import difflib
import os
import runpy
import shutil
import types
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from xtune.config.schema import ALIASES, FIELD_NAMES, OTHER_TOOLS_NAMES, Config, names_code
from xtune.config.presets import MODELS, PRESETS, family_of, matches, preset_source
from xtune.config.xtuner import is_xtuner_config, read_xtuner_config, to_python
from xtune.errors import ConfigError, short_repr
from xtune.paths import xtune_home

BUILTIN_DIR = Path(__file__).parent / "builtin"
CONFIG_SUFFIXES = (".py", ".yaml", ".yml")


def list_configs(pattern: str | None = None) -> list[str]:
    """Names of the built-in configs (files and presets), those matching `pattern` as a user types it, if given
    (`presets.matches`: `qwen2.5`, `internlm2_1_8b`, `llama3`; or any substring)."""
    files = {p.stem for p in BUILTIN_DIR.iterdir() if p.suffix in CONFIG_SUFFIXES}
    names = sorted(files | set(PRESETS))
    return [n for n in names if matches(n, pattern) or pattern.lower() in n.lower()] if pattern else names


def config_family(name: str) -> str | None:
    """The model family of a built-in config: its preset's, or the family of the model its file names."""
    if name in PRESETS:
        return family_of(name)
    if name.startswith("tiny_"):
        return "tiny (built by xtune)"
    if name.startswith("llava_"):
        return "LLaVA"
    stems = sorted((model for model in MODELS if name.startswith(model.key + "_")), key=lambda m: -len(m.key))
    return stems[0].family if stems else None


def find_config(name_or_path: str) -> Path:
    """A config file path, or the built-in config of that name (a preset is written out as a Python file under
    $XTUNE_HOME/presets/ first, so that errors name its lines and `copy-cfg` copies the same text)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for suffix in CONFIG_SUFFIXES:
        builtin = BUILTIN_DIR / f"{name_or_path}{suffix}"
        if builtin.is_file():
            return builtin
    if name_or_path in PRESETS:
        return _written_preset(name_or_path)
    hint = _suggest(name_or_path, list_configs())
    raise ConfigError(
        f"no config file '{name_or_path}' and no built-in config of that name.{hint} "
        "See `xtune list-cfg` for the built-in ones."
    )


def _written_preset(name: str) -> Path:
    path, text = xtune_home() / "presets" / f"{name}.py", preset_source(name)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}")
        draft.write_text(text)
        os.replace(draft, path)
    return path


def copy_config(name: str, dest_dir: str | Path) -> Path:
    """Copy a built-in config to `dest_dir/<name>_copy.<ext>` (XTuner's convention); never overwrites. An XTuner
    config file is copied as the equivalent xtune config (`xtune.config.xtuner.to_python`)."""
    source = find_config(name)
    dest = Path(dest_dir) / f"{source.stem}_copy{source.suffix}"
    if dest.exists():
        raise ConfigError(f"{dest} already exists; move it away or copy into another folder.")
    text = to_python(read_xtuner_config(source)) if is_xtuner_config(source) else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    if text is not None:
        dest.write_text(text, encoding="utf-8")
    else:
        shutil.copyfile(source, dest)
    return dest


def load_config(
    name_or_path: str, overrides: list[str] | None = None, allow_code: bool = False
) -> tuple[Config, Path]:
    """The validated config and the file it came from. `overrides` are `key=value` strings (the user's own command
    line, so they may name code); a YAML config's keys that run code are refused unless `allow_code`."""
    path = find_config(name_or_path)
    if is_xtuner_config(path):  # read with ast, never run (xtune.config.xtuner): it needs no trust
        read = read_xtuner_config(path)
        values, lines = read.values, read.lines
    else:
        values, lines = _read_python(path) if path.suffix == ".py" else _read_yaml(path)
    values = _apply_aliases(values, path, lines)
    if path.suffix != ".py" and not allow_code:
        _refuse_code(values, path, lines)
    for override in overrides or []:
        key, value = parse_override(override)
        key = ALIASES.get(key, key)
        values[key] = value
        lines[key] = 0
    unknown = [key for key in values if key not in FIELD_NAMES]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"{_where(path, lines, key)}: unknown key '{key}'.{_suggest(key, FIELD_NAMES)} "
            "Every key, with its default and meaning: `xtune show-cfg --fields`."
        )
    if values.get("work_dir") is None:
        values["work_dir"] = str(Path("work_dirs") / path.stem)
    try:
        return Config(**values), path
    except ValidationError as error:
        raise ConfigError(_explain(error, path, lines)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value); the value is a Python literal when it parses as one, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--cfg-options expects key=value, got '{text}'.")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # e.g. {[1]: 2}: left as text
        value = raw
    return key.strip(), value


def _read_python(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    try:
        namespace = runpy.run_path(str(path))
    except Exception as error:
        raise ConfigError(f"{path}: running the config failed: {type(error).__name__}: {error}") from error
    values = {
        key: value
        for key, value in namespace.items()
        if not key.startswith("_")
        and not isinstance(value, (types.ModuleType, types.FunctionType, type))
    }
    return values, _assignment_lines(path)


def _assignment_lines(path: Path) -> dict[str, int]:
    lines: dict[str, int] = {}
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Name):
                lines[target.id] = node.lineno
    return lines


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text ({error.reason}); save the config as UTF-8.") from None
    loader, pairs = yaml.SafeLoader(text), []
    try:  # compose once: the nodes give each key's line and tag, and the data is built from them
        root = loader.get_single_node()
        _check_size(path, root)
        pairs = list(root.value) if isinstance(root, yaml.MappingNode) else []
        _check_keys(path, text, pairs)
        values = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except RecursionError:  # the YAML parser itself recurses per level of nesting
        raise ConfigError(
            f"{path}: the config is nested thousands of levels deep; a config is a mapping of a few keys to values."
        ) from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        for key, value in pairs:
            if isinstance(value, yaml.ScalarNode) and len(value.value) > 1000:
                raise ConfigError(
                    f"{path}:{key.start_mark.line + 1}: key '{key.value}': a value of {len(value.value)} characters "
                    "cannot be read as a number."
                ) from None
        raise ConfigError(f"{path}: a value cannot be read: {str(error)[:200]}") from None
    finally:
        loader.dispose()
    if values is None:
        return {}, {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values.")
    return values, {key.value: key.start_mark.line + 1 for key, _ in pairs}


MAX_YAML_VALUES, MAX_YAML_DEPTH = 100_000, 64
"""A config is a few hundred values at most: more, counting each use of an alias anew, is a 'billion laughs'
(603 bytes that build billions of values), and deeper nesting ends in a RecursionError."""


def _check_size(path: Path, root: yaml.Node | None) -> None:
    """Counts the values the document would build, aliases expanded, and stops at the limits before building."""
    stack, count = [(root, 1)] if root is not None else [], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_YAML_VALUES or depth > MAX_YAML_DEPTH:
            what = f"more than {MAX_YAML_VALUES:,} values" if count > MAX_YAML_VALUES else f"nested over {MAX_YAML_DEPTH} deep"
            raise ConfigError(
                f"{path}:{node.start_mark.line + 1}: the config holds {what} (with its aliases expanded); a config is "
                "a mapping of a few keys to values: remove the anchors and aliases or the nesting."
            )
        if isinstance(node, yaml.MappingNode):
            stack += [(child, depth + 1) for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            stack += [(child, depth + 1) for child in node.value]


def _check_keys(path: Path, text: str, pairs: list[tuple[yaml.Node, yaml.Node]]) -> None:
    """Every top-level key must be a string (YAML reads `true`, `null`, `on` or `1` as other types), and set once
    (YAML keeps the last of two silently)."""
    first_line: dict[str, int] = {}
    for key, _ in pairs:
        if not isinstance(key, yaml.ScalarNode) or key.tag != "tag:yaml.org,2002:str":
            continue
        if key.value in first_line:
            raise ConfigError(
                f"{path}:{key.start_mark.line + 1}: key '{key.value}' is set twice (first at line "
                f"{first_line[key.value]}); keep one."
            )
        first_line[key.value] = key.start_mark.line + 1
    for key, _ in pairs:
        if key.tag not in ("tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"):
            written = short_repr(text[key.start_mark.index : key.end_mark.index])
            raise ConfigError(
                f"{path}:{key.start_mark.line + 1}: the key {written} is not a name; config keys are words like lr "
                f"or data_path (YAML reads this key as {key.tag.rpartition(':')[2]}; quote it to make it a string)."
            )


CODE_KEYS = {
    "trust_remote_code": "runs the Python files shipped inside the model folder",
    "dataset_format": "imports and runs a Python function (a module:function map function)",
    "val_dataset_format": "imports and runs a Python function (a module:function map function)",
    "datasets": "imports and runs a Python function (a source's format is a module:function map function)",
}
"""Keys whose values can make xtune run code, and what they run."""


def _refuse_code(values: dict[str, Any], path: Path, lines: dict[str, int]) -> None:
    """A YAML config runs no code unless the user asks on the command line: it is the form configs from others
    come in, and one line (`dataset_format: builtins:exec`) would otherwise run anything."""
    sources = values.get("datasets") if isinstance(values.get("datasets"), list) else []
    named = [("trust_remote_code", values.get("trust_remote_code")), ("dataset_format", values.get("dataset_format"))]
    named += [("val_dataset_format", values.get("val_dataset_format"))]
    named += [("datasets", source.get("format")) for source in sources if isinstance(source, dict)]
    for key, value in named:
        runs_code = value is True if key == "trust_remote_code" else isinstance(value, str) and names_code(value)
        if runs_code:
            raise ConfigError(
                f"{_where(path, lines, key)}: key '{key}' = {short_repr(value)} {CODE_KEYS[key]}, and a YAML config "
                "runs no code unless you allow it: pass --allow-code on the command line if you trust this config "
                "and what it names (or write the config in Python, which is code by design)."
            )


def _apply_aliases(values: dict[str, Any], source, lines: dict[str, int]) -> dict[str, Any]:
    renamed = {}
    for key, value in values.items():
        name = ALIASES.get(key, key)
        if name in renamed:
            other = next(k for k in values if ALIASES.get(k, k) == name and k != key)
            raise ConfigError(f"{_where(source, lines, key)}: '{other}' and '{key}' both set; keep one.")
        renamed[name] = value
        if name != key and key in lines:
            lines[name] = lines[key]
    return renamed


def _explain(error: ValidationError, path: Path, lines: dict[str, int]) -> str:
    messages = []
    for item in error.errors():
        if not item["loc"]:
            messages.append(f"{path}: {item['msg'].removeprefix('Value error, ')}.")
            continue
        key = str(item["loc"][0])
        name = key + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"][1:])
        if item["type"] == "missing":
            messages.append(f"{_where(path, lines, key)}: missing required key '{name}'.")
            continue
        field = Config.model_fields.get(key)
        expected = _type_name(field.annotation) if field and len(item["loc"]) == 1 else item["type"]
        messages.append(
            f"{_where(path, lines, key)}: key '{name}' expects {expected}, got "
            f"{type(item['input']).__name__} {short_repr(item['input'])} ({item['msg']})."
        )
    return "\n".join(messages)


def _type_name(annotation) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _where(source, lines: dict[str, int], key: str) -> str:
    line = lines.get(key)
    if line == 0:
        return "--cfg-options"
    return f"{source}:{line}" if line else str(source)


def _suggest(word: str, choices) -> str:
    if word in OTHER_TOOLS_NAMES and OTHER_TOOLS_NAMES[word] in choices:
        return f" Did you mean '{OTHER_TOOLS_NAMES[word]}' (xtune's name for {word})?"
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
