"""The web UI in a real headless Chromium (Playwright driving Debian's chromium): pick the tiny config, look at its
data, start training, see the loss curve grow, close the browser and find the run still going, see it finish, and
chat with the result. Screenshots go to tests/webui/artifacts/ (ignored by git) or $XTUNE_TEST_ARTIFACTS."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]  # fmt: skip
"""The machine's network is closed: without the background-networking flags Chromium keeps trying Google's hosts."""


def chromium() -> str | None:
    for candidate in (os.environ.get("XTUNE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):  # fmt: skip
        if candidate and Path(candidate).is_file():
            return candidate
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(chromium() is None, reason="no Chromium: apt-get install chromium (or set XTUNE_CHROMIUM)"),
]


def artifacts() -> Path:
    folder = Path(os.environ.get("XTUNE_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("XTUNE_TEST_ARTIFACTS"):
        (folder / ".gitignore").write_text("*\n")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def webui(tmp_path):
    port = free_port()
    log = (tmp_path / "webui.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "xtune.cli", "webui", "--port", str(port), "--root", str(tmp_path)], cwd=tmp_path,
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((tmp_path / "webui.log").read_text())
            time.sleep(0.3)
    printed = (tmp_path / "webui.log").read_text()
    url = re.search(r"xtune webui on (\S+)", printed).group(1)  # as a user opens it: the token in it
    assert url.startswith(f"http://127.0.0.1:{port}/?token="), printed
    yield url, tmp_path
    server.terminate()
    server.wait(30)
    log.close()


def reveal(page, name: str) -> None:
    """Open the form's group that holds a field, as a user clicks its summary."""
    summary = page.locator(f"details:has(#field-{name}) > summary")
    if not page.locator(f"#field-{name}").is_visible():
        summary.click()


def test_configure_train_watch_and_chat_in_a_browser(webui):
    url, root = webui
    shots = artifacts()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(url)

        # Train: a built-in config into the form, its data checked and shown
        page.fill("#config-name", "tiny_internlm2_chat_lora_antonyms")
        page.click("#load-config")
        page.wait_for_selector("#field-max_steps", state="attached")
        for name in ("lora_r", "max_steps", "save_steps", "evaluation_freq", "evaluation_inputs"):
            reveal(page, name)
        assert page.input_value("#field-lora_r") == "16"
        assert "LoRA rank" in page.text_content("#config-form")  # the docstring as help
        page.fill("#field-lora_r", "0")
        page.dispatch_event("#field-lora_r", "change")
        page.wait_for_function("document.querySelector('#error-lora_r').textContent.includes('greater than 0')")
        page.fill("#field-lora_r", "16")
        page.fill("#field-max_steps", "150")
        page.fill("#field-save_steps", "50")
        page.fill("#field-evaluation_freq", "50")
        page.fill("#field-evaluation_inputs", json.dumps(["What is the opposite of hot?"]))
        page.dispatch_event("#field-evaluation_inputs", "change")
        page.wait_for_function("document.querySelector('#error-lora_r').textContent === ''")
        page.fill("#save-name", "tiny")
        page.click("#check-dataset")
        page.wait_for_selector("#dataset-report table.summary")
        assert "266 kept of 266 encoded" in page.text_content("#dataset-report")
        page.click("#log-dataset")
        page.wait_for_selector("#dataset-samples mark.trained")
        assert page.text_content("#dataset-samples mark.trained") == "big<|im_end|>"
        page.screenshot(path=str(shots / "1-train-form.png"), full_page=True)

        # start: the same command a user could type
        page.click("#start-train")
        page.wait_for_selector("#runs-table tbody tr[data-run]")
        assert page.text_content("#cli-command") == "xtune train configs/tiny.yaml"
        (config,) = (root / "configs").glob("*.yaml")
        assert "max_steps: 150" in config.read_text()

        # Watch: the loss curve grows as metrics.jsonl does
        page.wait_for_function("Number(document.querySelector('#points-count').textContent) >= 5")
        (metrics,) = (root / "work_dirs").glob("*/*/metrics.jsonl")
        seen = int(page.text_content("#points-count"))
        page.wait_for_function(f"Number(document.querySelector('#points-count').textContent) > {seen}")
        assert len(metrics.read_text().splitlines()) > seen
        page.wait_for_function("document.querySelector('#plot-loss').complete && "
                               "document.querySelector('#plot-loss').naturalWidth > 0")  # fmt: skip
        page.screenshot(path=str(shots / "2-watch-running.png"), full_page=True)

        # a closed browser stops nothing: a new one finds the run, still going or done
        page.close()
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.set_default_timeout(300_000)
        page.goto(url)
        page.click("button[data-tab=watch]")
        page.wait_for_selector("#run-detail[data-status=finished]")
        assert page.text_content("#points-count") == "150"
        assert "What is the opposite of hot?" in page.text_content("#evaluations")
        page.screenshot(path=str(shots / "3-watch-finished.png"), full_page=True)

        # Chat: the run's last checkpoint, streamed, beside its base model
        page.click("#runs-table tbody tr[data-run] button:text('chat')")
        page.wait_for_function("document.querySelector('#chat-info').textContent.includes('internlm2_chat')")
        page.check("#chat-compare")
        page.fill("#chat-input", "What is the opposite of cold?")
        page.click("#chat-send")
        page.wait_for_selector("#chat-model .msg.assistant.done")
        page.wait_for_selector("#chat-base .msg.assistant.done")
        answer = page.text_content("#chat-model .msg.assistant.done")
        assert answer.strip(), "the checkpoint gave no answer"
        page.screenshot(path=str(shots / "4-chat.png"), full_page=True)
        browser.close()
    assert list((root / "work_dirs").glob("*/*/checkpoint-150/adapter_model.safetensors"))
