"""`lmflow serve`: the OpenAI-compatible API (with the official client), errors, and the chat page in Chromium."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
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


class ProxyListener:
    """A local 'proxy' that records every connection made to it (a server must make none)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                self.requests.append(conn.recv(200) or b"(connected)")
            except OSError:
                self.requests.append(b"(connected)")
            conn.close()


@pytest.fixture(scope="module")
def proxy():
    listener = ProxyListener()
    yield listener
    listener.sock.close()


def start_server(model, port: int, *args: str, proxy_url: str | None = None) -> subprocess.Popen:
    """``lmflow serve MODEL`` in a child process, once it answers /health."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if proxy_url:  # every client library that honours the proxy variables would connect here
        for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
            env[name] = proxy_url
        for name in ("NO_PROXY", "no_proxy", "GRADIO_ANALYTICS_ENABLED"):
            env.pop(name, None)
    process = subprocess.Popen(
        [str(LMFLOW), "serve", str(model), "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return process
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the server did not come up:\n{process.communicate()[0]}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def server(chat_model, proxy):
    port = free_port()
    process = start_server(chat_model, port, "--api-key", KEY, "--max-new-tokens", "24", proxy_url=proxy.url)
    base = f"http://127.0.0.1:{port}"
    yield base, port, process
    if process.poll() is None:
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


def fetch(base: str, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """One request, redirects not followed: (status, headers, body)."""
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=60)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


BEARER = {"Authorization": f"Bearer {KEY}"}
PAGE_ROUTES = [
    "/",
    "/config",
    "/gradio_api/info",
    "/theme.css",
    "/gradio_api/queue/join",
    "/gradio_api/call/respond",
]
API_ROUTES = ["/v1/models", "/v1/docs", "/v1/openapi.json", "/v1/unknown", "/gradio_api/upload"]


def test_without_the_key_only_the_health_probe_answers(server):
    base = server[0]
    assert fetch(base, "GET", "/health")[:1] == (200,)
    for path in PAGE_ROUTES + API_ROUTES:
        for method in ("GET", "POST"):
            status, _, body = fetch(base, method, path)
            assert status == 401, (method, path, status, body[:200])
            assert json.loads(body)["error"]["code"] == "invalid_api_key"
    # a browser asking for the page is sent to the sign-in form; an API path never is
    status, headers, _ = fetch(base, "GET", "/", {"Accept": "text/html"})
    assert status == 303 and headers["location"] == "/login?next=/"
    assert fetch(base, "GET", "/v1/models", {"Accept": "text/html"})[0] == 401
    assert fetch(base, "GET", "/", {"Authorization": "Bearer wrong"})[0] == 401
    assert fetch(base, "GET", "/", {"Cookie": "lmflow_session=forged"})[0] == 401


def test_the_page_api_answers_only_with_the_key(server, chat_model):
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    with pytest.raises(AuthenticationError):
        Client(server[0] + "/", verbose=False)
    expected = open_session(str(chat_model)).chat(
        [{"role": "user", "content": "What is 2 plus 1?"}], GenerationOptions(max_new_tokens=8)
    )
    answer = Client(server[0] + "/", headers=BEARER, verbose=False).predict(
        "What is 2 plus 1?", "", 0, 8, api_name="/respond"
    )
    assert answer == expected.text


def test_the_browser_signs_in_with_the_key_and_then_uses_the_page(server, chat_model):
    from gradio_client import Client

    base = server[0]
    status, _, form = fetch(base, "GET", "/login")
    assert status == 200 and b'name="key"' in form and b'type="password"' in form
    form_headers = {"Content-Type": "application/x-www-form-urlencoded"}
    status, headers, page = fetch(base, "POST", "/login", form_headers, b"key=wrong")
    assert status == 401 and b"Wrong key" in page and "set-cookie" not in headers
    status, headers, _ = fetch(base, "POST", "/login", form_headers, f"key={KEY}".encode())
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and KEY not in cookie
    session = {"Cookie": cookie.split(";")[0]}
    status, _, page = fetch(base, "GET", "/", {**session, "Accept": "text/html"})
    assert status == 200 and f"lmflow: {chat_model.name}".encode() in page
    answer = Client(base + "/", headers=session, verbose=False).predict("Hi", "", 0, 4, api_name="/respond")
    assert isinstance(answer, str)


def test_uploads_and_file_routes_are_refused_and_no_server_path_is_shown(server, chat_model, tmp_path):
    base = server[0]
    boundary = "lmflowboundary"
    upload = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="x.txt"\r\n'
        f"Content-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n"
    ).encode()
    multipart = {**BEARER, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    for path in ("/gradio_api/upload", "/upload", "/gradio_api/upload_progress"):
        status, _, body = fetch(base, "POST", path, multipart, upload)
        assert status == 404 and b"/tmp" not in body
    for path in ("/gradio_api/file=/etc/hostname", "/file=/etc/hostname", "/gradio_api/proxy=http://x"):
        assert fetch(base, "GET", path, BEARER)[0] == 404
    for path in ("/config", "/gradio_api/info", "/"):
        status, _, body = fetch(base, "GET", path, BEARER)
        assert status == 200
        text = body.decode()
        for secret in (str(chat_model), str(chat_model.parent), os.getcwd(), str(Path.home()), "/tmp/"):
            assert secret not in text, (path, secret)


def test_the_server_listens_on_the_loopback_address_only(server):
    table = Path("/proc/net/tcp")
    if not table.exists():
        pytest.skip("needs /proc/net/tcp (Linux)")
    port = f"{server[1]:04X}"
    listening = [line.split()[1] for line in table.read_text().splitlines()[1:] if line.split()[3] == "0A"]
    assert "0100007F:" + port in listening
    assert "00000000:" + port not in listening


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
        page.goto(server[0] + "/", wait_until="domcontentloaded")  # the server has a key: sign in first
        assert page.url.endswith("/login?next=/")
        page.fill("#key", KEY)
        page.click("button[type=submit]")
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


def test_nothing_leaves_the_machine(server, proxy, client, chat_model):
    """Started with every proxy variable pointing at a listener: after start-up, the page and a generation,
    nothing connected to it (Gradio's version check and analytics are off)."""
    assert fetch(server[0], "GET", "/", {**BEARER, "Accept": "text/html"})[0] == 200
    client.chat.completions.create(
        model=chat_model.name, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    time.sleep(1)
    assert proxy.requests == []


def test_sigterm_stops_the_server_with_exit_status_0(server):
    process = server[2]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, process.stdout.read()
    output = process.stdout.read()
    assert "Traceback" not in output, output
