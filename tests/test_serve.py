"""`lmflow serve`: the OpenAI-compatible API (with the official client), errors, and the chat page in Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lmflow_core.generate import GenerationOptions
from lmflow_core.inference import open_session
from lmflow_core.launch import free_port

LMFLOW = Path(sys.executable).with_name("lmflow")
KEY = "test-key"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(chat_model):
    port = free_port()
    process = subprocess.Popen(
        [
            str(LMFLOW),
            "serve",
            str(chat_model),
            "--port",
            str(port),
            "--api-key",
            KEY,
            "--max-new-tokens",
            "24",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            request = urllib.request.Request(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            urllib.request.urlopen(request, timeout=2)
            break
        except OSError:
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
    yield base, port
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key=KEY)


def post(base: str, body: bytes | dict, key: str = KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=data,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_models_are_listed(client, chat_model):
    models = client.models.list()
    assert [m.id for m in models.data] == [chat_model.name]


def test_chat_completion_equals_the_local_greedy_reply(client, chat_model):
    messages = [{"role": "user", "content": "What is 2 plus 1?"}]
    response = client.chat.completions.create(
        model=chat_model.name, messages=messages, temperature=0, max_tokens=12
    )
    expected = open_session(str(chat_model)).chat(messages, GenerationOptions(max_new_tokens=12))
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.completion_tokens == expected.completion_tokens


def test_streaming_sends_the_same_text_in_pieces(client, chat_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 4 plus 1?"}]
    whole = client.chat.completions.create(
        model=chat_model.name, messages=messages, temperature=0, max_tokens=16
    )
    stream = client.chat.completions.create(
        model=chat_model.name, messages=messages, temperature=0, max_tokens=16, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2


def test_a_wrong_api_key_is_refused(server):
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{server[0]}/v1", api_key="wrong").models.list()


def test_malformed_requests_get_4xx_json_errors_and_the_server_keeps_serving(server, chat_model, client):
    base = server[0]
    cases = [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "roles must alternate"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
        ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "is not served here"),
        (b"{not json", 400, "not valid JSON"),
    ]
    for body, status, fragment in cases:
        code, payload = post(base, body)
        assert code == status, (body, payload)
        assert fragment in payload["error"]["message"] and payload["error"]["type"]
    assert post(base, {"messages": [{"role": "user", "content": "hi"}]}, key="bad")[0] == 401
    ok = client.chat.completions.create(
        model=chat_model.name, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert ok.choices[0].message.role == "assistant"


def test_a_port_in_use_is_reported_before_loading(server, chat_model):
    done = subprocess.run(
        [str(LMFLOW), "serve", str(chat_model), "--port", str(server[1])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stderr.startswith("Error: cannot listen on 127.0.0.1:")
    assert "Pass another --port" in done.stderr and done.stderr.count("\n") == 1


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_the_chat_page_answers_in_a_real_browser(server, chat_model, tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    expected = (
        open_session(str(chat_model))
        .chat([{"role": "user", "content": "What is 6 plus 1?"}], GenerationOptions(max_new_tokens=24))
        .text
    )
    assert len(expected) >= 4
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        page.goto(server[0] + "/", wait_until="domcontentloaded")
        page.wait_for_selector("#lmflow-input textarea", timeout=60_000)
        assert f"lmflow chat: {chat_model.name}" in page.inner_text("body")
        assert page.inner_text("body").count("Settings") == 2  # the settings accordion and the footer link
        box = page.locator("#lmflow-input textarea")
        box.fill("What is 6 plus 1?")
        box.press("Enter")
        page.wait_for_function(
            "expected => document.querySelector('#lmflow-chatbot').innerText.includes(expected)",
            arg=expected[:12],
            timeout=60_000,
        )
        shot = tmp_path / "chat.png"
        page.screenshot(path=str(shot))
        browser.close()
    image = Image.open(shot).convert("L")
    assert image.size == (1000, 800)
    low, high = image.getextrema()
    assert high - low > 100  # a rendered page, not a blank one
