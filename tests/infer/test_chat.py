import io
import json

import pytest

from xtune.data.formats import Conversation, Turn
from xtune.data.templates import get_template
from xtune.errors import XtuneError
from xtune.infer import chat
from xtune.infer.generate import GenerationOptions, cut_at_stop_words


def test_read_prompts_lines_and_json_conversations():
    lines = ["What is up?\n", "\n", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}\n']
    conversations = chat.read_prompts(lines)
    assert conversations[0] == Conversation((Turn("user", "What is up?"),))
    assert [t.content for t in conversations[1].turns] == ["a", "b", "c"]
    with pytest.raises(XtuneError, match="input line 1"):
        chat.read_prompts(['{"nope": 1}'])


def test_repl_keeps_history_resets_and_exits(monkeypatch):
    seen: list[Conversation] = []

    def fake_generate(model, tokenizer, template, conversations, options, streamer=None):
        seen.append(conversations[0])
        return [f"reply {len(seen)}"]

    monkeypatch.setattr(chat, "generate_replies", fake_generate)
    monkeypatch.setattr(chat, "TextStreamer", lambda *a, **k: None)
    inputs = iter(["hi", "again", "RESET", "fresh", "EXIT", "never read"])
    out = io.StringIO()
    chat.repl(None, None, get_template("internlm2_chat"), "Be nice.", GenerationOptions(), read=lambda _: next(inputs), out=out)
    assert [t.content for t in seen[0].turns] == ["Be nice.", "hi"]
    assert [t.content for t in seen[1].turns] == ["Be nice.", "hi", "reply 1", "again"]
    assert [t.content for t in seen[2].turns] == ["Be nice.", "fresh"]
    assert len(seen) == 3 and "(history cleared)" in out.getvalue()


def test_repl_ctrl_c_stops_an_answer_without_quitting(monkeypatch):
    calls = []

    def interrupted_then_fine(model, tokenizer, template, conversations, options, streamer=None):
        calls.append(conversations[0])
        if len(calls) == 1:
            raise KeyboardInterrupt
        return ["ok"]

    monkeypatch.setattr(chat, "generate_replies", interrupted_then_fine)
    monkeypatch.setattr(chat, "TextStreamer", lambda *a, **k: None)
    inputs = iter(["first", "second"])

    def read(_):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError

    out = io.StringIO()
    chat.repl(None, None, get_template("internlm2_chat"), "", GenerationOptions(), read=read, out=out)
    assert "(stopped)" in out.getvalue()
    assert [t.content for t in calls[1].turns] == ["second"]


def test_pick_template_prefers_the_flag_then_the_adapter_then_the_model_then_the_tokenizer(tmp_path, tokenizer):
    adapter, model = tmp_path / "adapter", tmp_path / "model"
    adapter.mkdir(), model.mkdir()
    (adapter / "xtune_run.json").write_text('{"prompt_template": "qwen_chat"}')
    (model / "xtune_run.json").write_text('{"prompt_template": "llama3_chat"}')
    assert chat.pick_template(None, str(adapter), model).name == "qwen_chat"
    assert chat.pick_template("internlm2_chat", str(adapter)).name == "internlm2_chat"
    assert chat.pick_template(None, None, model).name == "llama3_chat"  # a merged model carries its template
    assert chat.pick_template(None, None, tmp_path, tokenizer).name == "hf"  # the tokenizer's own chat_template
    with pytest.raises(XtuneError, match="pass --prompt-template"):
        chat.pick_template(None, None)
    with pytest.raises(XtuneError, match="unknown prompt template 'nope'"):
        chat.pick_template("nope", None)


def test_system_prompt_from_text_or_a_named_template():
    assert chat.system_prompt("Be nice.", None) == "Be nice."
    assert chat.system_prompt("", "alpaca").startswith("Below is an instruction that describes a task.")
    with pytest.raises(XtuneError, match="not both"):
        chat.system_prompt("Be nice.", "alpaca")
    with pytest.raises(XtuneError, match="unknown system template 'poet'; known: moss_sft, alpaca"):
        chat.system_prompt("", "poet")


def test_repl_without_streamer_prints_whole_answers(monkeypatch):
    monkeypatch.setattr(chat, "generate_replies", lambda *a, streamer=None, **k: [f"whole answer, streamer={streamer}"])
    inputs = iter(["hi", "EXIT"])
    out = io.StringIO()
    chat.repl(None, None, get_template("internlm2_chat"), "", GenerationOptions(), read=lambda _: next(inputs), out=out, stream=False)
    assert "whole answer, streamer=None\n" in out.getvalue()


def test_cut_at_stop_words():
    assert cut_at_stop_words("answer<stop>more", ["<stop>", "x"]) == "answer"
    assert cut_at_stop_words("answer", ["<stop>"]) == "answer"


def test_read_input_from_a_file_or_from_stdin_which_stays_open(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\n\nb\n")
    assert [c.turns[-1].content for c in chat.read_input(str(prompts))] == ["a", "b"]
    stdin = io.StringIO("c\n")
    monkeypatch.setattr("sys.stdin", stdin)
    (conversation,) = chat.read_input("-", image="cat.png")
    assert conversation.turns[-1].content == "<image>\nc" and conversation.images == ("cat.png",)
    assert not stdin.closed
    with pytest.raises(XtuneError, match="missing.txt"):
        chat.read_input(str(tmp_path / "missing.txt"))


def test_cli_chat_answers_prompts_from_stdin(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from xtune.cli import app

    monkeypatch.setattr(chat, "load_chat_model", lambda *args: (None, None))
    monkeypatch.setattr(chat, "pick_template", lambda *args: get_template("internlm2_chat"))
    monkeypatch.setattr("xtune.models.load.resolve_model_path", lambda model: tmp_path)
    monkeypatch.setattr(chat, "answer_all", lambda model, tokenizer, template, conversations, system, options: [
        f"{system}: {c.turns[-1].content}\nbye" for c in conversations
    ])  # fmt: skip
    answers = tmp_path / "answers.jsonl"
    args = ["chat", "some/model", "--input", "-", "--system", "S", "--output", str(answers)]
    result = CliRunner().invoke(app, args, input="hi\nho\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["S: hi\\nbye", "S: ho\\nbye"]
    assert [json.loads(line) for line in answers.read_text().splitlines()] == [
        {"prompt": "hi", "answer": "S: hi\nbye"},
        {"prompt": "ho", "answer": "S: ho\nbye"},
    ]


def test_cli_chat_refuses_a_missing_input_file_before_loading_the_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from xtune.cli import app
    from xtune.errors import XtuneError

    def no_loading(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(chat, "load_chat_model", no_loading)
    missing = tmp_path / "prompts.txt"
    result = CliRunner().invoke(app, ["chat", "some/model", "--input", str(missing), "--with-plugins", "calculate"])
    assert result.exit_code != 0
    assert isinstance(result.exception, XtuneError) and f"--input {missing}: no such file" in str(result.exception)


def test_cli_chat_warns_of_an_adapter_trained_on_another_base(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from xtune.cli import app

    adapter = tmp_path / "checkpoint-3"
    adapter.mkdir()
    (adapter / "xtune_run.json").write_text(json.dumps({"llm_name_or_path": "xtune-tiny/qwen2"}))
    monkeypatch.setattr(chat, "load_chat_model", lambda *args: (None, None))
    monkeypatch.setattr(chat, "pick_template", lambda *args: get_template("internlm2_chat"))
    monkeypatch.setattr("xtune.models.load.resolve_model_path", lambda model: tmp_path)
    monkeypatch.setattr(chat, "answer_all", lambda *args: ["ok"])
    args = ["chat", "xtune-tiny/internlm2-chat", "--adapter", str(adapter), "--input", "-"]
    result = CliRunner().invoke(app, args, input="hi\n")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "was trained on 'xtune-tiny/qwen2'" in " ".join(result.stderr.split())


def test_chat_output_never_overwrites_a_file(tmp_path):
    from typer.testing import CliRunner

    from xtune.cli import app
    from xtune.errors import XtuneError

    prompts, answers = tmp_path / "prompts.txt", tmp_path / "answers.jsonl"
    prompts.write_text("Hi\n")
    answers.write_text("earlier answers\n")
    result = CliRunner().invoke(app, ["chat", "xtune-tiny/internlm2-chat", "--input", str(prompts), "--output", str(answers)])
    assert isinstance(result.exception, XtuneError) and "already exists; it is never overwritten" in str(result.exception)
    assert answers.read_text() == "earlier answers\n"


def test_an_adapter_beside_a_llava_folder_is_refused_before_anything_loads():
    from xtune.infer.chat import load_any_chat_model

    with pytest.raises(XtuneError, match="--adapter with --llava: a LLaVA chat takes its LLM's adapter from the LLaVA"):
        load_any_chat_model("no/such-model", "adapter", "no/such-encoder", "llava-run")
