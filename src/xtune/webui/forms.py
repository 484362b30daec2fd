"""The config form: the typed schema as form fields, and a filled form back as a YAML config `xtune train` reads.

Validation is `load_config`'s own, on the file the form writes, so the web UI shows the CLI's messages word for
word; each message is put at the field it names.
"""

import inspect
import json
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from xtune.config.load import load_config
from xtune.config.schema import Config
from xtune.errors import ConfigError

Kind = Literal["bool", "int", "float", "str", "choice", "json"]


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    """How the field is edited: a checkbox, a number, a line of text, a choice, or JSON for lists and mappings."""
    group: str
    help: str
    """The field's docstring in the schema."""
    default: Any
    required: bool
    optional: bool
    """None is a valid value (an empty box)."""
    choices: tuple = ()


def _kind(annotation) -> tuple[Kind, bool, tuple]:
    args = get_args(annotation)
    optional = get_origin(annotation) in (Union, types.UnionType) and type(None) in args
    members = [arg for arg in args if arg is not type(None)] if optional else [annotation]
    if len(members) == 1 and get_origin(members[0]) is Literal:
        return "choice", optional, get_args(members[0])
    if len(members) > 1 or get_origin(members[0]) is not None:  # lists, mappings, tuples, str | Literal[...]
        return "json", optional, ()
    simple = {bool: "bool", int: "int", float: "float", str: "str"}
    return simple.get(members[0], "json"), optional, ()


def _groups() -> dict[str, str]:
    """Each field's section in schema.py, from the `# Model`, `# Data`, ... comments above its fields."""
    groups, group = {}, "Model"
    for line in inspect.getsource(Config).splitlines():
        if match := re.match(r"    # ([A-Z][^:]*?)(:|,|\(|$)", line):
            group = match.group(1).strip()
        elif match := re.match(r"    (\w+): ", line):
            groups[match.group(1)] = group
    return groups


def schema_fields() -> list[Field]:
    groups, fields = _groups(), []
    for name, info in Config.model_fields.items():
        kind, optional, choices = _kind(info.annotation)
        default = None if info.is_required() else info.default
        fields.append(Field(name, kind, groups.get(name, "Other"), info.description or "", _jsonable(default),
                            info.is_required(), optional, choices))  # fmt: skip
    return fields


def _jsonable(value):
    return json.loads(json.dumps(value, default=str)) if value is not None else None


def form_values(config: Config) -> dict[str, Any]:
    """The config's values as the form shows them (JSON types: tuples as lists)."""
    return json.loads(config.model_dump_json())


def load_form(name_or_path: str, allow_code: bool = False) -> dict[str, Any]:
    """What the form needs for a config: its fields, its values, and the keys its file sets (shown first)."""
    config, path = load_config(name_or_path, allow_code=allow_code)
    defaults = {field.name: field.default for field in schema_fields()}
    values = form_values(config)
    return {
        "path": str(path),
        "values": values,
        "changed": [name for name, value in values.items() if value != defaults.get(name)],
    }


class FormError(ConfigError):
    """Errors of a filled form, each at the field it names (`errors`: field -> message; "" for the whole form)."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("\n".join(errors.values()))
        self.errors = errors


def parse_form(raw: dict[str, Any]) -> dict[str, Any]:
    """The form's values (text as typed, or already typed) -> Python values; a value that does not parse is an
    error at its field. Keys that are not fields are left for `load_config` to refuse as the CLI does."""
    fields = {field.name: field for field in schema_fields()}
    values, errors = {}, {}
    for name, value in raw.items():
        field = fields.get(name)
        if field is None or not isinstance(value, str):
            values[name] = value
            continue
        text = value.strip()
        try:
            if text == "" and (field.optional or field.kind == "json" and field.default is None):
                values[name] = None
            elif field.kind == "int":
                values[name] = int(text)
            elif field.kind == "float":
                values[name] = float(text)
            elif field.kind == "bool":
                values[name] = {"true": True, "false": False}[text.lower()]
            elif field.kind == "json":
                values[name] = _json_or_text(text)
            elif field.kind == "choice" and text == "None":
                values[name] = None
            else:
                values[name] = value
        except (ValueError, KeyError) as error:
            what = {"int": "a whole number", "float": "a number", "bool": "true or false", "json": "JSON"}[field.kind]
            errors[name] = f"key '{name}' expects {what}, got {value!r} ({error})."
    if errors:
        raise FormError(errors)
    return values


def _json_or_text(text: str):
    """JSON, or the text itself: a bare word is a string (`all-linear` of `lora_target_modules`)."""
    try:
        return json.loads(text)
    except ValueError:
        if text[:1] in "[{\"":
            raise
        return text


def config_text(values: dict[str, Any]) -> str:
    """A YAML config of the values that differ from the schema's defaults (and work_dir, which depends on the file's
    name otherwise): the short file a person would write."""
    defaults = {field.name: field.default for field in schema_fields()}
    kept = {name: _jsonable(value) for name, value in values.items()
            if name == "work_dir" or name not in defaults or _jsonable(value) != defaults[name]}  # fmt: skip
    header = "# Written by `xtune webui`; train with: xtune train THIS_FILE\n"
    return header + yaml.safe_dump(kept, sort_keys=False, allow_unicode=True, width=120)


def write_config(values: dict[str, Any], path: Path, allow_code: bool = False) -> Path:
    """Write the form's config to `path` (YAML) and load it as `xtune train` will; a ConfigError is re-raised as a
    FormError with each message at its key. The file is left only when it loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.draft.yaml")
    draft.write_text(config_text(values), encoding="utf-8")
    try:
        load_config(str(draft), allow_code=allow_code)
    except ConfigError as error:
        draft.unlink()
        raise FormError(errors_by_field(str(error).replace(str(draft), str(path)))) from None
    draft.replace(path)
    return path


def validate(values: dict[str, Any], allow_code: bool = False) -> dict[str, str]:
    """The errors `xtune train` would give for these values, by field; empty when they load."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        try:
            write_config(parse_form(values), path, allow_code)
        except FormError as error:
            return {name: message.replace(str(path), "form") for name, message in error.errors.items()}
    return {}


def errors_by_field(message: str) -> dict[str, str]:
    """load_config's message, one line per problem, each under the key it names ("" for the others)."""
    errors: dict[str, str] = {}
    for line in message.splitlines():
        match = re.search(r"key '([A-Za-z_]\w*)", line)
        name = match.group(1) if match else ""
        errors[name] = f"{errors[name]}\n{line}" if name in errors else line
    return errors
