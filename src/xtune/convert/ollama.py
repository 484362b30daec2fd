"""`xtune convert ollama MODEL.gguf`: an Ollama Modelfile beside the GGUF, so that `ollama create NAME -f Modelfile`
prompts the model as it was trained: FROM the GGUF, TEMPLATE (xtune's chat template as Ollama's Go template),
PARAMETER stop for the template's stop words, SYSTEM (its default system text, or yours).

The Go template is translated from the template's pieces (`xtune.data.templates.ChatTemplate`), as `jinja_of`
translates them to jinja. It writes system, user and assistant messages; tool messages are not written (Ollama's
tool calling needs its own template blocks), and Go templates cannot trim, so a template that strips each turn's
text writes it as given. Ollama adds the Modelfile's SYSTEM as a system message when a chat has none, and llama.cpp
adds the BOS token itself when the GGUF says so, so the template leaves out a BOS that opens the prompt.
"""

import json
import string
from pathlib import Path

import gguf

from xtune.convert.gguf import PROMPT_TEMPLATE_KEY
from xtune.data.templates import ChatTemplate, TokenizerTemplate, get_template
from xtune.errors import XtuneError


def write_modelfile(gguf_file: str | Path, prompt_template: str | None = None, system: str | None = None) -> Path:
    """Writes `Modelfile` beside GGUF_FILE (refusing to overwrite one) and returns its path. The template is
    `prompt_template`, else the one the GGUF records (the model's training template)."""
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise XtuneError(f"{gguf_file}: no such GGUF file; write it first with `xtune convert gguf MODEL {gguf_file}`.")
    reader = gguf.GGUFReader(gguf_file)
    name = prompt_template or _field(reader, PROMPT_TEMPLATE_KEY)
    if name is None:
        raise XtuneError(
            f"{gguf_file} does not record the template the model was trained with (it was not written from an xtune "
            "folder); pass --prompt-template NAME (see `xtune list-cfg`' templates, e.g. qwen_chat)."
        )
    template = get_template(name)
    if isinstance(template, TokenizerTemplate):
        raise XtuneError(
            "prompt template 'hf' is the tokenizer's own jinja, which xtune does not translate to Ollama's Go "
            "template; pass --prompt-template NAME with the xtune template that writes the same prompts."
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    bos_id, eos_id = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    if eos_id is None:
        raise XtuneError(f"{gguf_file} names no end-of-sequence token (tokenizer.ggml.eos_token_id); write it with "
                         "`xtune convert gguf`, which records it.")  # fmt: skip
    bos, eos = (tokens[bos_id] if bos_id is not None else ""), tokens[eos_id]  # a GGUF without BOS adds none
    adds_bos = bos_id is not None and bool(_field(reader, "tokenizer.ggml.add_bos_token"))
    modelfile = gguf_file.with_name("Modelfile")
    if modelfile.exists():
        raise XtuneError(f"{modelfile} already exists; remove it or move the GGUF to a folder of its own.")
    text = modelfile_text(gguf_file.name, template, bos, eos, adds_bos, system)
    modelfile.write_text(text, encoding="utf-8")
    return modelfile


def modelfile_text(
    gguf_name: str, template: ChatTemplate, bos: str, eos: str, adds_bos: bool, system: str | None
) -> str:
    system = template.default_system if system is None else system
    stops = dict.fromkeys([*template.stop_words, eos])
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{_triple_quoted(go_template_of(template, bos, eos, adds_bos))}"""']
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops if stop]
    if system:
        lines.append(f'SYSTEM """{_triple_quoted(system)}"""')
    return "\n".join(lines) + "\n"


def go_template_of(template: ChatTemplate, bos: str, eos: str, adds_bos: bool) -> str:
    """Ollama's Go template (over `.Messages`) writing what `render` writes for system, user and assistant turns,
    a user turn ending with the assistant's header. `adds_bos`: the BOS that opens the prompt is llama.cpp's to add."""
    pieces = [template.prefix, template.system, template.user, template.assistant_prefix, template.assistant_suffix, template.separator]  # fmt: skip
    if any("{round}" in piece for piece in pieces):
        raise XtuneError(f"template {template.name!r} numbers its rounds ({{round}}), which Ollama's Go templates cannot count.")  # fmt: skip
    # A turn opening with BOS (Llama 2's) writes it unless it opens the prompt: `$written` says whether it does.
    tracks_bos = any(piece.startswith("{bos}") for piece in pieces[1:])

    def write(piece: str, **fields: str) -> list[str]:
        actions = []
        if piece.startswith("{bos}") and tracks_bos:
            actions.append("{{- if $written }}" + "{{- " + _go_string(bos) + " }}" + "{{- end }}")
            piece = piece.removeprefix("{bos}")
        for literal, field, _, _ in string.Formatter().parse(piece):
            if literal:
                actions.append("{{- " + _go_string(literal) + " }}")
            if field is not None:  # an expression, or actions of their own
                value = {"bos": _go_string(bos), "eos": _go_string(eos), **fields}[field]
                actions.append(value if value.startswith("{{") else "{{- " + value + " }}")
        if actions and tracks_bos:
            actions.append("{{- $written = true }}")
        return actions

    prefix = template.prefix.removeprefix("{bos}") if adds_bos else template.prefix
    lines = []
    if tracks_bos:
        lines.append("{{- $written := " + ("true" if prefix else "false") + " }}")
    if template.system_in_user:
        lines.append('{{- $pending := "" }}')
    if template.system_in_last_user:  # the system text waits for the last user turn
        lines += ['{{- $last := -1 }}', '{{- range $i, $m := .Messages }}{{- if eq $m.Role "user" }}{{- $last = $i }}{{- end }}{{- end }}']  # fmt: skip
    if template.thinking and template.thinking.opening:
        lines.append('{{- $role := "" }}')
    lines += write(prefix)
    if template.system_always:
        lines += ["{{- $system := false }}", '{{- range .Messages }}{{- if eq .Role "system" }}{{- $system = true }}{{- end }}{{- end }}']  # fmt: skip
        lines += ["{{- if not $system }}", *write(template.system, system='""'), "{{- end }}"]
    lines += ["{{- range $i, $m := .Messages }}", '{{- if eq $m.Role "system" }}']
    if template.system_in_user:
        text = [part for literal, field, _, _ in string.Formatter().parse(template.system)
                for part in ([_go_string(literal)] if literal else []) + (["$m.Content"] if field is not None else [])]  # fmt: skip
        lines.append("{{- $pending = print " + " ".join(text) + " }}")
    elif template.skip_empty_system:
        lines += ["{{- if $m.Content }}", *write(template.system, system="$m.Content"), "{{- end }}"]
    else:
        lines += write(template.system, system="$m.Content")
    lines.append('{{- else if eq $m.Role "user" }}')
    if template.system_in_last_user:
        user_input = "{{- if eq $i $last }}{{- $pending }}{{- end }}{{- $m.Content }}"
    elif template.system_in_user:
        user_input = "{{- $pending }}{{- $m.Content }}"
    else:
        user_input = "$m.Content"
    lines += write(template.user, input=user_input)
    if template.system_in_user and not template.system_in_last_user:
        lines.append('{{- $pending = "" }}')
    lines.append('{{- else if eq $m.Role "assistant" }}')
    lines += write(template.assistant_prefix + "{content}" + template.assistant_suffix + template.separator, content="$m.Content")  # fmt: skip
    lines.append("{{- end }}")
    if template.thinking and template.thinking.opening:
        lines.append("{{- $role = $m.Role }}")
    lines.append("{{- end }}")
    if template.thinking and template.thinking.opening:  # DeepSeek-R1's generation prompt opens the block
        lines += ['{{- if ne $role "assistant" }}', *write(template.thinking.opening), "{{- end }}"]
    return "\n".join(line for line in lines if line)


def _go_string(text: str) -> str:
    """A Go interpreted string literal: JSON's escapes are Go's."""
    return json.dumps(text, ensure_ascii=False)


def _triple_quoted(text: str) -> str:
    if '"""' in text:
        raise XtuneError('a Modelfile block cannot hold """; remove it from the system text or template.')
    return text


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.fields.get(key)
    return field.contents() if field is not None else None
