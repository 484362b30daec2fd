"""The web UI's API: its token, its loopback default, and file access kept inside the folders it was started with."""

import inspect
import json
import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from xtune.errors import XtuneError
from xtune.engine.checkpoint import LOCK_FILE, lock_run
from xtune.webui.app import TOKEN_HEADER, check_bind, create_app, is_loopback, run_webui
from xtune.webui.files import Roots
from xtune.webui.runs import Runs

TOKEN = "test-token"
AUTH = {TOKEN_HEADER: TOKEN}


@pytest.fixture
def root(tmp_path, monkeypatch):
    folder = tmp_path / "root"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def client(root, loopback=True, host="127.0.0.1:7860"):
    return TestClient(create_app(Roots.of([root]), TOKEN, loopback), base_url=f"http://{host}")


def test_loopback_is_the_default_bind():
    from xtune.cli import webui

    assert inspect.signature(webui).parameters["host"].default == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10")
    from xtune.infer import serve

    assert is_loopback is serve.is_loopback  # one answer for `xtune serve` and `xtune webui`


def test_a_bind_beyond_loopback_without_a_token_is_refused():
    check_bind("127.0.0.1", None)
    for token in (None, ""):
        with pytest.raises(XtuneError, match="needs a token"):
            check_bind("0.0.0.0", token)
    with pytest.raises(XtuneError, match="needs a token"):
        run_webui("0.0.0.0", 0, [Path.cwd()], "")  # refused before anything listens


def test_beyond_loopback_every_request_needs_the_token(root):
    web = client(root, loopback=False, host="192.168.1.10:7860")
    assert web.get("/").status_code == 401
    assert web.get("/api/configs").status_code == 401
    assert web.get("/api/configs", headers={TOKEN_HEADER: "wrong"}).status_code == 401
    assert web.get("/?token=wrong").status_code == 401
    page = web.get(f"/?token={TOKEN}")
    assert page.status_code == 200 and TOKEN in page.text
    assert web.get("/api/configs", headers=AUTH).status_code == 200


def test_on_loopback_the_page_needs_the_token_too_and_carries_it(root):
    """Another user of the machine reaches a loopback port as well: the page, which holds the token, needs it."""
    web = client(root)
    assert web.get("/").status_code == 401 and web.get("/?token=wrong").status_code == 401
    page = web.get(f"/?token={TOKEN}")
    assert page.status_code == 200 and f'"{TOKEN}"' in page.text
    assert web.get("/static/app.js").status_code == 200  # the page's code holds no secret
    assert web.get("/api/runs").status_code == 401
    assert web.get("/api/runs", headers=AUTH).json() == {"runs": [], "jobs": []}
    assert web.get("/api/runs", headers={TOKEN_HEADER: "tökén".encode()}).status_code == 401  # not a crash on non-ASCII
    for answer in (page, web.get("/")):  # no other site frames it, to click its buttons for you
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["content-security-policy"] == "frame-ancestors 'none'"
    # another site's name for 127.0.0.1 (DNS rebinding) gets nothing
    assert client(root, host="attacker.example:7860").get(f"/?token={TOKEN}").status_code == 403
    assert client(root, host="[::1]:7860").get(f"/?token={TOKEN}").status_code == 200


def test_a_token_of_any_characters_is_compared_and_carried(root):
    token = 'tö"</script>'
    web = TestClient(create_app(Roots.of([root]), token), base_url="http://127.0.0.1:7860")
    page = web.get("/", params={"token": token})
    assert page.status_code == 200 and "</script>\"" not in page.text.split("XTUNE_TOKEN", 1)[1].split("\n")[0]
    assert json.dumps(token).replace("<", "\\u003c") in page.text
    assert web.get("/api/runs", params={"token": "tö"}).status_code == 401
    assert web.get("/api/runs", params={"token": token}).status_code == 200


def test_file_pickers_stay_inside_the_roots(root, tmp_path):
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text('{"text": "x"}\n')
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (root / "link_out").symlink_to(tmp_path)
    web = client(root)
    listing = web.get("/api/files", headers=AUTH).json()
    assert [entry["name"] for entry in listing["entries"]] == ["data"]  # the link out of the root is not offered
    assert web.get("/api/files", params={"path": "data"}, headers=AUTH).json()["entries"][0]["path"] == "data/train.jsonl"
    for path in ("..", "../", "data/../..", str(tmp_path), "/etc", "link_out", "link_out/secret.txt"):
        answer = web.get("/api/files", params={"path": path}, headers=AUTH)
        assert answer.status_code == 403, path
        assert "outside the folders" in answer.json()["error"]
    assert web.post("/api/config/load", json={"config": "../secret.yaml"}, headers=AUTH).status_code == 403
    assert web.get("/api/chat/info", params={"checkpoint": str(tmp_path)}, headers=AUTH).status_code == 403
    assert web.get("/api/run", params={"run": "../../"}, headers=AUTH).status_code == 403
    assert web.post("/api/upload?name=../../evil.png", content=b"x", headers=AUTH).json()["path"] == "uploads/evil.png"


def test_data_outside_the_roots_is_not_read(root, tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    web = client(root)
    values = web.post("/api/config/load", json={"config": "tiny_internlm2_chat_lora_antonyms"}, headers=AUTH).json()["values"]
    for path in (str(outside), "../outside.jsonl"):
        answer = web.post("/api/dataset/samples", json={"values": {**values, "data_path": path}}, headers=AUTH)
        assert answer.status_code == 403, answer.text


def test_files_inside_a_data_folder_and_other_read_paths_stay_inside_the_roots(root, tmp_path):
    """The inside-check follows every path the config names to read, and every file a data folder holds: a link
    in it to a file outside the roots is refused by name. Names xtune resolves itself (xtune-tiny/...) pass."""
    record = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text(record + "\n")
    (outside / "ds.json").write_text("{}")
    (root / "data").mkdir()
    (root / "data" / "mine.jsonl").write_text(record + "\n")
    web = client(root)
    values = web.post("/api/config/load", json={"config": "tiny_internlm2_chat_lora_antonyms"}, headers=AUTH).json()["values"]
    assert web.post("/api/dataset/samples", json={"values": {**values, "data_path": "data"}}, headers=AUTH).status_code == 200
    (root / "data" / "x.jsonl").symlink_to(outside / "secret.jsonl")
    answer = web.post("/api/dataset/samples", json={"values": {**values, "data_path": "data"}}, headers=AUTH)
    assert answer.status_code == 403 and "data_path = 'data' holds" in answer.json()["error"], answer.text
    datasets = json.dumps([{"path": "xtune-tiny/antonyms"}, {"path": "data"}])
    answer = web.post("/api/dataset/check", json={"values": {**values, "data_path": "", "datasets": datasets}}, headers=AUTH)
    assert answer.status_code == 403 and "datasets[1].path" in answer.json()["error"], answer.text
    (root / "data" / "x.jsonl").unlink()
    (root / "ds.json").symlink_to(outside / "ds.json")
    for key, value in (("val_data_path", str(outside / "secret.jsonl")), ("image_folder", str(outside)),
                       ("deepspeed", "ds.json"), ("pretrained_pth", str(outside))):  # fmt: skip
        answer = web.post("/api/dataset/check", json={"values": {**values, key: value}}, headers=AUTH)
        assert answer.status_code == 403 and answer.json()["error"].startswith(f"{key} = "), (key, answer.text)
        assert web.post("/api/train", json={"values": {**values, key: value}}, headers=AUTH).status_code == 403


def test_requests_missing_what_they_need_get_a_400_that_names_it(root):
    web = client(root)
    for path, body, key in (("/api/config/load", {}, "config"), ("/api/config/save", {"name": "x"}, "values"),
                            ("/api/config/validate", {}, "values"), ("/api/run/stop", {}, "run"),
                            ("/api/export", {"kind": "merge", "output": "exports/x"}, "source"),
                            ("/api/chat", {"messages": []}, "checkpoint")):  # fmt: skip
        answer = web.post(path, json=body, headers=AUTH)
        assert answer.status_code == 400 and repr(key) in answer.json()["error"], (path, answer.text)
    for name in ("", ".", ".."):
        answer = web.post(f"/api/upload?name={name}", content=b"x", headers=AUTH)
        assert answer.status_code == 400 and "name the image file" in answer.json()["error"], (name, answer.text)
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    for tokens in (4097, 0, "many"):
        answer = web.post("/api/chat", json={"checkpoint": "model", "messages": [], "max_new_tokens": tokens}, headers=AUTH)
        assert answer.status_code == 400 and "max_new_tokens" in answer.json()["error"], answer.text


def test_a_half_written_job_file_does_not_break_the_run_list(root):
    jobs = root / "work_dirs" / "cfg" / ".webui-jobs"
    jobs.mkdir(parents=True)
    (jobs / "20260101_000000_000001.json").write_text('{"id": "20260101_0000')
    (jobs / "20260101_000000_000002.json").write_text(json.dumps({"id": "x", "command": ["xtune", "train", "c.yaml"],
        "pid": 2**22 + 1, "log": str(jobs / "x.log"), "work_dir": str(jobs.parent), "started": 0.0}))  # fmt: skip
    listed = client(root).get("/api/runs", headers=AUTH)
    assert listed.status_code == 200 and [job["id"] for job in listed.json()["jobs"]] == ["x"]


def _a_run(root) -> Path:
    run = root / "work_dirs" / "cfg" / "20260101_000000"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"llm_name_or_path": "x", "max_steps": 4, "work_dir": "work_dirs/cfg"}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    return run


def test_a_lock_file_left_behind_is_not_a_running_run_and_stop_signals_no_one(root):
    """A stale lock names a pid that may since be another program (here one whose command line even says xtune):
    only a lock that is held makes a run running, and Stop signals nothing else."""
    import subprocess
    import sys

    run = _a_run(root)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "xtune"], start_new_session=True)
    try:
        (run / LOCK_FILE).write_text(f"pid {other.pid} on {os.uname().nodename}")
        web = client(root)
        (summary,) = web.get("/api/runs", headers=AUTH).json()["runs"]
        assert summary["status"] == "stopped" and summary["memory_gib"] is None
        answer = web.post("/api/run/stop", json={"run": summary["id"]}, headers=AUTH)
        assert answer.status_code == 400 and "is not running" in answer.json()["error"]
        time.sleep(0.5)
        assert other.poll() is None  # not signalled
    finally:
        other.kill()
        other.wait()


def test_a_run_locked_on_another_machine_is_running_and_is_not_stopped_from_here(root):
    run = _a_run(root)
    handle = lock_run(run)  # held, as by a training process; its text as one on another node writes it
    try:
        handle.seek(0)
        handle.truncate()
        handle.write("pid 4242 on gpu-node-7")
        handle.flush()
        web = client(root)
        (summary,) = web.get("/api/runs", headers=AUTH).json()["runs"]
        assert summary["status"] == "running" and summary["memory_gib"] is None
        answer = web.post("/api/run/stop", json={"run": summary["id"]}, headers=AUTH)
        assert answer.status_code == 400 and "trained on gpu-node-7" in answer.json()["error"], answer.text
        assert web.post("/api/run/resume", json={"run": summary["id"]}, headers=AUTH).status_code == 400
    finally:
        handle.close()
    (summary,) = client(root).get("/api/runs", headers=AUTH).json()["runs"]
    assert summary["status"] == "stopped"


def test_an_abandoned_chat_stops_generating_and_frees_the_model(monkeypatch):
    """The browser went away mid-reply (the stream closed): generation ends at its next token, and only then may
    the next chat use the model."""
    import xtune.webui.chat as chat
    from xtune.infer.generate import GenerationOptions

    replies = []
    generate = chat.generate_replies
    monkeypatch.setattr(chat, "generate_replies", lambda *args, **kwargs: replies.append(generate(*args, **kwargs)) or replies[-1])
    chats = chat.Chats("cpu")
    model = chat.ChatModel("xtune-tiny/internlm2-chat")
    pieces = chats.stream(model, {model}, [{"role": "user", "content": "hi"}], options=GenerationOptions(max_new_tokens=4096))
    assert next(pieces)[0] == "delta"
    assert chats.lock.locked()
    pieces.close()
    assert chats.lock.acquire(timeout=60)  # released by the generating thread as it ends
    chats.lock.release()
    (reply,) = replies
    assert len(chats.loaded[model][1](reply[0], add_special_tokens=False).input_ids) < 100


def test_the_form_round_trip_through_the_api(root):
    web = client(root)
    form = web.post("/api/config/load", json={"config": "tiny_internlm2_chat_lora_antonyms"}, headers=AUTH).json()
    assert "lora_r" in form["changed"] and form["values"]["lora_r"] == 16
    bad = web.post("/api/config/save", json={"values": {**form["values"], "lora_r": "-3"}, "name": "mine"}, headers=AUTH)
    assert bad.status_code == 422 and "key 'lora_r'" in bad.json()["errors"]["lora_r"]
    assert not (root / "configs" / "mine.yaml").exists()
    saved = web.post("/api/config/save", json={"values": {**form["values"], "lora_r": "8"}, "name": "../mine"},
                     headers=AUTH).json()  # fmt: skip
    assert saved["path"] == "configs/mine.yaml" and saved["command"] == "xtune train configs/mine.yaml"
    assert "lora_r: 8" in (root / "configs" / "mine.yaml").read_text()


def test_samples_show_the_trained_tokens(root):
    web = client(root)
    values = web.post("/api/config/load", json={"config": "tiny_internlm2_chat_lora_antonyms"}, headers=AUTH).json()["values"]
    check = web.post("/api/dataset/check", json={"values": values}, headers=AUTH).json()
    assert check["ok"] and check["samples"] == 266 and check["sources"][0]["path"] == "xtune-tiny/antonyms"
    (sample,) = web.post("/api/dataset/samples", json={"values": values, "n": 1}, headers=AUTH).json()["samples"]
    trained = "".join(text for text, is_trained in sample["runs"] if is_trained)
    assert trained == "big<|im_end|>" and sample["trained"] == 3


def test_runs_are_found_with_their_curves_and_answers(root):
    run = root / "work_dirs" / "cfg" / "20260101_000000"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"llm_name_or_path": "x", "max_steps": 4, "work_dir": "work_dirs/cfg"}))
    records = [{"step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0, "elapsed_s": 1.0},
               {"step": 2, "loss": 1.5, "lr": 1e-3, "grad_norm": 0.9, "tokens_per_s": 11.0, "elapsed_s": 2.0},
               {"step": 2, "evaluation": [{"input": "hot?", "output": "cold"}]}, {"step": 2, "eval_loss": 1.7}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 3, "lo')
    web = client(root)
    (summary,) = web.get("/api/runs", headers=AUTH).json()["runs"]
    assert summary["id"] == "work_dirs/cfg/20260101_000000" and summary["status"] == "stopped"
    assert (summary["step"], summary["total_steps"], summary["loss"], summary["eval_loss"]) == (2, 4, 1.5, 1.7)
    detail = web.get("/api/run", params={"run": summary["id"]}, headers=AUTH).json()
    assert detail["curves"]["loss"] == [[1, 2.0], [2, 1.5]] and detail["curves"]["eval_loss"] == [[2, 1.7]]
    assert detail["evaluations"] == [{"step": 2, "evaluation": [{"input": "hot?", "output": "cold"}]}]
    svg = web.get("/api/plot.svg", params={"run": summary["id"], "metric": "loss"}, headers=AUTH)
    assert svg.headers["content-type"] == "image/svg+xml" and b"<svg" in svg.content
    assert web.get(f"/api/plot.svg?run={summary['id']}&metric=loss&token={TOKEN}").status_code == 200  # as <img> asks
    other = root / "work_dirs" / "cfg2" / "20260102_000000"
    other.mkdir(parents=True)
    (other / "config.json").write_text((run / "config.json").read_text())
    (other / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n")
    assert [r["id"] for r in web.get("/api/runs", headers=AUTH).json()["runs"]] == [  # newest first
        "work_dirs/cfg2/20260102_000000", "work_dirs/cfg/20260101_000000"]
    both = web.get(f"/api/plot.svg?run={summary['id']}&run=work_dirs/cfg2/20260102_000000&metric=loss", headers=AUTH)
    assert both.status_code == 200 and b"cfg2/20260102_000000" in both.content  # one plot, a legend entry per run


@pytest.mark.slow
def test_a_run_outlives_the_web_ui_and_resumes(root):
    """Started, the training process is on its own: a new web UI (the old one gone) finds it and its log; stopped,
    it resumes from its checkpoint to the end."""
    web = client(root)
    values = web.post("/api/config/load", json={"config": "tiny_internlm2_chat_lora_antonyms"}, headers=AUTH).json()["values"]
    values |= {"max_steps": "150", "save_steps": "5", "evaluation_inputs": "[]"}
    started = web.post("/api/train", json={"values": values, "name": "tiny"}, headers=AUTH).json()
    assert started["command"] == "xtune train configs/tiny.yaml"
    fresh = Runs(Roots.of([root]))  # as a web UI started later sees it
    run = _wait(lambda: next((r for r in fresh.summaries()["runs"] if r["step"] >= 6), None))
    assert run["status"] == "running" and run["log"].endswith(".log") and run["command"] == started["command"]
    assert os.getsid(started["pid"]) == started["pid"]  # its own session: the web UI's end does not signal it
    fresh.stop(run["id"])
    stopped = _wait(lambda: (s := fresh.summary(fresh.run_dir(run["id"]))).status == "stopped" and s)
    assert stopped.resumable
    web.post("/api/run/resume", json={"run": run["id"]}, headers=AUTH)
    done = _wait(lambda: (s := fresh.summary(fresh.run_dir(run["id"]))).status == "finished" and s, timeout=600)
    assert done.step == 150 and done.checkpoints[-1].endswith("checkpoint-150")


def _wait(condition, timeout=300):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := condition():
            return value
        time.sleep(0.5)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_export_and_chat_with_a_finished_run(root):
    web = client(root)
    values = web.post("/api/config/load", json={"config": "tiny_internlm2_chat_lora_antonyms"}, headers=AUTH).json()["values"]
    values |= {"max_steps": "3", "save_steps": "3", "evaluation_inputs": "[]"}
    web.post("/api/train", json={"values": values, "name": "tiny"}, headers=AUTH)
    run = _wait(lambda: next((r for r in web.get("/api/runs", headers=AUTH).json()["runs"] if r["status"] == "finished"), None))
    (checkpoint,) = run["checkpoints"]
    info = web.get("/api/chat/info", params={"checkpoint": checkpoint}, headers=AUTH).json()
    assert info == {"model": checkpoint, "base": "xtune-tiny/internlm2-chat", "template": "internlm2_chat", "llava": False}

    for kind, output in (("pth_to_hf", "exports/adapter"), ("merge", "exports/merged")):
        job = web.post("/api/export", json={"kind": kind, "source": checkpoint, "output": output}, headers=AUTH).json()
        assert job["command"].startswith(f"xtune convert {kind} ")
    jobs = _wait(lambda: (jobs := web.get("/api/exports", headers=AUTH).json()["jobs"]) and
                 all(job["status"] != "running" for job in jobs) and jobs)  # fmt: skip
    assert [job["status"] for job in jobs] == ["done", "done"], jobs
    assert (root / "exports" / "adapter" / "adapter_config.json").is_file()
    assert (root / "exports" / "merged" / "config.json").is_file()
    job = web.post("/api/export", json={"kind": "gguf", "source": "exports/merged", "output": "exports/model.gguf"},
                   headers=AUTH).json()  # fmt: skip
    assert job["command"] == "xtune convert gguf exports/merged exports/model.gguf --outtype f16"
    _wait(lambda: all(job["status"] != "running" for job in web.get("/api/exports", headers=AUTH).json()["jobs"]))
    web.post("/api/export", json={"kind": "ollama", "source": "exports/model.gguf", "output": "exports"}, headers=AUTH)
    jobs = _wait(lambda: (jobs := web.get("/api/exports", headers=AUTH).json()["jobs"]) and len(jobs) == 4 and
                 all(job["status"] != "running" for job in jobs) and jobs)  # fmt: skip
    assert [job["status"] for job in jobs] == ["done"] * 4, jobs
    import gguf

    reader = gguf.GGUFReader(root / "exports" / "model.gguf")
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert (root / "exports" / "Modelfile").read_text().startswith("FROM ")
    again = web.post("/api/export", json={"kind": "merge", "source": checkpoint, "output": "exports/merged"}, headers=AUTH)
    assert again.status_code == 400 and "already exists" in again.json()["error"]
    outside = web.post("/api/export", json={"kind": "merge", "source": checkpoint, "output": "../merged"}, headers=AUTH)
    assert outside.status_code == 403

    from xtune.infer.chat import answer_all, load_chat_model, pick_template
    from xtune.data.formats import Conversation, Turn
    from xtune.infer.generate import GenerationOptions

    question = [{"role": "user", "content": "What is the opposite of hot?"}]
    replies = {}
    for source, side in ((checkpoint, "model"), (checkpoint, "base"), ("exports/merged", "model")):
        lines = web.post("/api/chat", json={"checkpoint": source, "side": side, "messages": question, "max_new_tokens": 8},
                         headers=AUTH).text.splitlines()  # fmt: skip
        messages = [json.loads(line) for line in lines]
        assert "".join(m.get("delta", "") for m in messages).strip().startswith(messages[-1]["reply"][:1])
        replies[source, side] = messages[-1]["reply"]
    llm, tokenizer = load_chat_model("xtune-tiny/internlm2-chat", str(root / checkpoint))
    template = pick_template(None, str(root / checkpoint))
    options = GenerationOptions(max_new_tokens=8)
    (expected,) = answer_all(llm, tokenizer, template, [Conversation((Turn("user", question[0]["content"]),))], "", options)
    assert replies[checkpoint, "model"] == expected == replies["exports/merged", "model"]  # as `xtune chat` answers


@pytest.mark.slow
def test_chat_with_a_llava_checkpoint_about_an_uploaded_image(root):
    import subprocess
    import sys

    from PIL import Image

    done = subprocess.run(
        [sys.executable, "-m", "xtune.cli", "train", "tiny_llava_finetune_shapes", "--work-dir", "work_dirs/llava",
         "--cfg-options", "max_steps=1", "save_steps=1", "evaluation_inputs=[]"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    web = client(root)
    (run,) = web.get("/api/runs", headers=AUTH).json()["runs"]
    checkpoint = run["checkpoints"][-1]
    info = web.get("/api/chat/info", params={"checkpoint": checkpoint}, headers=AUTH).json()
    assert info["llava"] and info["base"] is None
    image = root / "red.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
    uploaded = web.post("/api/upload?name=red.png", content=image.read_bytes(), headers=AUTH).json()["path"]
    lines = web.post("/api/chat", json={"checkpoint": checkpoint, "image": uploaded, "max_new_tokens": 4,
                                        "messages": [{"role": "user", "content": "What colour is the shape?"}]},
                     headers=AUTH).text.splitlines()  # fmt: skip
    assert "reply" in json.loads(lines[-1]), lines


def test_the_server_bound_beyond_loopback_prints_a_token_and_refuses_requests_without_it(tmp_path):
    import re
    import socket
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "xtune.cli", "webui", "--host", "0.0.0.0", "--port", str(port),
                               "--root", str(tmp_path)], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        printed = ""
        while "token:" not in printed:
            line = server.stderr.readline()
            assert line, printed
            printed += line
        token = re.search(r"token: (\S+) \(required\)", printed).group(1)
        assert f"?token={token}" in printed
        url = f"http://127.0.0.1:{port}/"

        def status(path: str) -> int:
            for _ in range(100):
                try:
                    return urllib.request.urlopen(url + path, timeout=10).status
                except urllib.error.HTTPError as error:
                    return error.code
                except urllib.error.URLError:  # not listening yet
                    time.sleep(0.2)
            raise AssertionError("the server did not answer")

        assert status("") == 401 and status("api/runs") == 401 and status("?token=wrong") == 401
        assert status(f"?token={token}") == 200 and status(f"api/runs?token={token}") == 200
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.slow
def test_a_run_started_by_hand_is_watched_to_its_end(root):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "xtune.cli", "train", "tiny_internlm2_chat_lora_antonyms", "--cfg-options",
                           "max_epochs=1", "evaluation_inputs=[]"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = client(root).get("/api/runs", headers=AUTH).json()["runs"]
    batches = -(-266 // 8)  # the tiny set's 266 samples, 8 a batch, one epoch
    assert (run["status"], run["step"], run["total_steps"], run["log"]) == ("finished", batches, batches, None)
    assert not run["resumable"]
