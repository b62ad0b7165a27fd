"""`lmflow serve` in-process: limits and errors, cancellation and shutdown, and continuous batching.

Each test serves the tiny chat model with uvicorn in a thread (the API only); a 'slow' model (a sleep in its
forward pass) makes timing visible where a test needs generation to take a while.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import select
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import serving

from lmflow_core import hookimpl
from lmflow_core.generate import GenerationOptions
from lmflow_core.inference import open_session
from lmflow_core.launch import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def session(chat_model):
    return open_session(str(chat_model))


@contextlib.contextmanager
def slowed(model, seconds: float):
    """Every forward pass of ``model`` takes ``seconds`` longer; yields the list of their start times."""
    real = model.forward
    calls: list[float] = []

    @functools.wraps(real)
    def forward(*args, **kwargs):
        calls.append(time.monotonic())
        time.sleep(seconds)
        return real(*args, **kwargs)

    model.forward = forward
    try:
        yield calls
    finally:
        del model.forward


def request(base: str, body, method: str = "POST", path: str = "/v1/chat/completions", headers=None):
    """(status, parsed JSON body)."""
    connection = http.client.HTTPConnection(base, timeout=120)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    connection.request(
        method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    response = connection.getresponse()
    raw = response.read()
    connection.close()
    return response.status, json.loads(raw)


def chat(content: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


def stream_events(base: str, body: dict) -> list:
    """The parsed events of a streamed completion ('[DONE]' as the string)."""
    connection = http.client.HTTPConnection(base, timeout=120)
    connection.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({**body, "stream": True}),
        {"Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200
    events = []
    for line in response.read().decode().splitlines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    connection.close()
    return events


def streamed_text(events: list) -> tuple[str, str | None]:
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if "choices" in e)
    finish = [e["choices"][0]["finish_reason"] for e in events[:-1] if "choices" in e][-1]
    return text, finish


def assert_openai_error(status: int, body: dict, expected: int, fragment: str = "") -> dict:
    assert status == expected, (status, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"], body
    assert fragment in error["message"], (fragment, error["message"])
    assert "Traceback" not in error["message"] and "\n" not in error["message"]
    return error


# ---- 2. limits and errors ---------------------------------------------------------------------------------


def test_a_prompt_beyond_the_context_is_a_400_context_length_exceeded(session):
    context = session.context
    long = {
        "messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "hello"} for i in range(1001)]
    }
    with serving(session) as server:
        error = assert_openai_error(*request(server.base, long), 400, f"maximum context length is {context}")
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        # a 200 KB message is refused at once, not decoded
        started = time.monotonic()
        status, body = request(server.base, chat("word " * 40_000))
        assert_openai_error(status, body, 400, "maximum context length")
        assert time.monotonic() - started < 5
        # the prompt fits, the prompt plus max_tokens does not
        status, body = request(server.base, chat("What is 2 plus 1?", max_tokens=context))
        error = assert_openai_error(status, body, 400, "in the completion")
        assert error["code"] == "context_length_exceeded"
        status, body = request(server.base, chat("What is 2 plus 1?", max_tokens=2**80))
        assert_openai_error(status, body, 400, "maximum context length")
        # without max_tokens: up to the context
        status, body = request(server.base, chat("What is 2 plus 1?"))
        assert status == 200
        usage = body["usage"]
        assert usage["total_tokens"] <= context
        if body["choices"][0]["finish_reason"] == "length":
            assert usage["total_tokens"] == context


def raw_exchange(base: str, head: bytes, body_parts) -> tuple[int, dict]:
    """Send a request's head and as much of its body as the server takes; (status, JSON body) of the answer."""
    host, port = base.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        for part in body_parts:  # part by part, as a slow client would, until the server answers
            if select.select([sock], [], [], 0.1)[0]:
                break
            sock.sendall(part)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_max_new_tokens_caps_every_request(session):
    with serving(session, max_new_tokens=5) as server:
        for body in (chat("What is 2 plus 1?"), chat("What is 2 plus 1?", max_tokens=100)):
            status, payload = request(server.base, body)
            assert status == 200 and payload["usage"]["completion_tokens"] <= 5, payload


def test_a_body_over_the_limit_is_a_413_before_it_is_read(session):
    with serving(session, max_request_bytes=64 * 1024) as server:
        started = time.monotonic()
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000\r\nExpect: 100-continue\r\n\r\n"
        )
        status, body = raw_exchange(server.base, head, [])  # as curl sends it: the answer comes first
        assert_openai_error(status, body, 413, "larger than this server's limit of 65,536 bytes")
        assert time.monotonic() - started < 5
        # a chunked body (no Content-Length) is counted as it arrives
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
        assert_openai_error(*raw_exchange(server.base, head, [chunk] * 5 + [b"0\r\n\r\n"]), 413, "limit")
        assert request(server.base, chat("What is 2 plus 1?", max_tokens=2))[0] == 200


def test_a_request_stops_at_the_time_limit_with_the_text_so_far(session):
    with serving(session, request_timeout=1.0) as server, slowed(session.model, 0.05):
        started = time.monotonic()
        status, body = request(server.base, chat("What is 2 plus 1?", max_tokens=200))
        took = time.monotonic() - started
    assert status == 200 and body["choices"][0]["finish_reason"] == "length", body
    assert 0 < body["usage"]["completion_tokens"] < 200
    assert took < 3


BAD_BODIES = [
    (chat("hi", seed=2**80), 400, "seed"),
    (chat("\ud800 lone surrogate"), 400, "not valid Unicode"),
    (chat("hi", stop=["\udfff"]), 400, "not valid Unicode"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "messages.0.content"),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "not valid JSON"),
    (b"[]", 400, "not a JSON object"),
    (b"null", 400, ""),
    (b"", 400, ""),
    (chat("hi", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (chat("hi", max_tokens=0), 400, "max_tokens"),
    (chat("hi", temperature=float("nan")) | {"temperature": "NaN"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": "x"}, 400, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, None, ""),
    ({"messages": [{"role": "assistant", "tool_calls": [{"x": 1}]}]}, 400, "messages"),
    ({"messages": [{"role": "tool", "content": "1"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": None}]}, None, ""),
]


def test_nothing_a_client_sends_gets_a_500(session):
    with serving(session) as server:
        for body, expected, fragment in BAD_BODIES:
            status, payload = request(server.base, body)
            if expected is None:
                assert status < 500, (body, payload)
            else:
                assert_openai_error(status, payload, expected, fragment)
        ok = chat("hi", stop=[""], seed=2**63, temperature=1, max_tokens=3)
        assert request(server.base, ok)[0] == 200


def test_routes_and_methods_get_errors_in_openai_shape(session):
    with serving(session, api_key="k") as server:
        key = {"Authorization": "Bearer k"}
        assert_openai_error(
            *request(server.base, None, "GET", "/v1/nope", key), 404, "/v1/nope is not served"
        )
        assert_openai_error(*request(server.base, None, "GET", "/v1/chat/completions", key), 405, "GET")
        assert_openai_error(*request(server.base, None, "DELETE", "/v1/models", key), 405, "DELETE")
        error = assert_openai_error(*request(server.base, chat("hi")), 401, "API key")
        assert error["type"] == "authentication_error"
        assert request(server.base, None, "GET", "/health") == (200, {"status": "ok"})


def test_too_many_waiting_requests_get_a_429(session):
    with serving(session, max_batch_size=1, max_waiting=1) as server, slowed(session.model, 0.05):
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(request, server.base, chat("one", max_tokens=30))
            time.sleep(0.4)
            second = pool.submit(request, server.base, chat("two", max_tokens=2))
            time.sleep(0.4)
            error = assert_openai_error(*request(server.base, chat("three", max_tokens=2)), 429, "busy")
            assert error["type"] == "rate_limit_error"
            assert first.result()[0] == 200 and second.result()[0] == 200


class Failing:
    """Makes the model fail after a few forward passes."""

    def __init__(self, model, after: int):
        self.model, self.after, self.real = model, after, model.forward

    def __enter__(self):
        calls = []

        @functools.wraps(self.real)
        def forward(*args, **kwargs):
            calls.append(1)
            if len(calls) > self.after:
                raise RuntimeError("out of memory (simulated)")
            return self.real(*args, **kwargs)

        self.model.forward = forward

    def __exit__(self, *exc):
        del self.model.forward


def test_a_failure_while_streaming_is_an_sse_error_event_in_openai_shape(session):
    with serving(session) as server:
        with Failing(session.model, after=3):
            events = stream_events(server.base, chat("What is 2 plus 1?", max_tokens=20))
        error = events[-2]["error"]
        assert error["type"] == "server_error" and "out of memory (simulated)" in error["message"]
        assert not error["message"].startswith("RuntimeError(") and events[-1] == "[DONE]"
        with Failing(session.model, after=0):
            assert_openai_error(*request(server.base, chat("hi", max_tokens=4)), 500, "out of memory")
        assert request(server.base, chat("hi", max_tokens=2))[0] == 200  # and it keeps serving


# ---- 3. cancellation and shutdown ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [16, 1])
def test_a_client_that_disconnects_stops_its_generation(session, batch):
    with serving(session, max_batch_size=batch) as server, slowed(session.model, 0.02) as calls:
        connection = http.client.HTTPConnection(server.base, timeout=60)
        body = chat("What is 2 plus 1?", max_tokens=200, stream=True)
        connection.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        response.fp.readline()
        response.fp.readline()  # the first event has arrived: generation is running
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        gone = time.monotonic()
        time.sleep(0.5)
        before = len(calls)
        started = time.monotonic()
        status, body = request(server.base, chat("What is 3 plus 1?", max_tokens=5))
        latency = time.monotonic() - started
        assert status == 200
        stopped = [t for t in calls if t > gone]
        # the abandoned generation stopped within a step or two; the next request ran alone
        assert len(calls) - before <= 6 + 1, (len(calls), before)
        assert len(stopped) < 30, len(stopped)
        assert latency < 1.5, latency
        # a non-streaming client that leaves is stopped too
        sock = socket.create_connection(server.base.split(":"), timeout=10)
        payload = json.dumps(chat("What is 4 plus 1?", max_tokens=200)).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        time.sleep(0.5)
        sock.close()
        time.sleep(0.5)
        count = len(calls)
        time.sleep(0.5)
        assert len(calls) == count, "the generation went on after its client left"


def test_sigterm_finishes_requests_in_flight_refuses_new_ones_and_stops(session):
    with serving(session, shutdown_timeout=30) as server, slowed(session.model, 0.02):
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(stream_events, server.base, chat("What is 2 plus 1?", max_tokens=40))
            time.sleep(0.4)
            server.handle_exit(signal.SIGTERM, None)
            error = assert_openai_error(*request(server.base, chat("hi", max_tokens=2)), 503, "shutting down")
            assert error["type"] == "server_error"
            assert request(server.base, None, "GET", "/health") == (503, {"status": "draining"})
            events = running.result()
        assert events[-1] == "[DONE]" and streamed_text(events)[1] in ("stop", "length")
        server.thread.join(20)
        assert not server.thread.is_alive()


def test_sigterm_waits_at_most_the_shutdown_timeout(session):
    with serving(session, shutdown_timeout=0.5) as server, slowed(session.model, 0.05):
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(stream_events, server.base, chat("What is 2 plus 1?", max_tokens=200))
            time.sleep(0.4)
            started = time.monotonic()
            server.handle_exit(signal.SIGTERM, None)
            server.thread.join(20)
            assert not server.thread.is_alive() and time.monotonic() - started < 5
            events = running.result()
        assert events[-1] == "[DONE]"


# ---- 4. continuous batching ---------------------------------------------------------------------------------


def questions(n: int) -> list[dict]:
    return [
        chat(f"What is {i} plus {i % 3 + 1}?", max_tokens=8 + (i * 7) % 25)
        | (
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"}]}
            if i % 4 == 3
            else {}
        )
        for i in range(n)
    ]


def answer(base: str, body: dict, stream: bool) -> tuple[str, str, int | None]:
    if stream:
        text, finish = streamed_text(stream_events(base, body))
        return text, finish, None
    status, payload = request(base, body)
    assert status == 200, payload
    return (
        payload["choices"][0]["message"]["content"],
        payload["choices"][0]["finish_reason"],
        payload["usage"]["completion_tokens"],
    )


def test_concurrent_greedy_requests_equal_the_same_requests_one_at_a_time(session):
    bodies = questions(16)
    with serving(session, max_batch_size=16) as server:
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(answer, server.base, b, i % 2 == 0) for i, b in enumerate(bodies)]
            together = [f.result() for f in futures]
        alone = [answer(server.base, b, i % 2 == 0) for i, b in enumerate(bodies)]
    assert [t[:2] for t in together] == [a[:2] for a in alone]
    assert [t[2] for t in together] == [a[2] for a in alone]
    # and one at a time is model.generate's own greedy answer (what `lmflow chat` prints)
    for body, (text, finish, tokens) in list(zip(bodies, alone))[1:6:2]:
        expected = session.chat(body["messages"], GenerationOptions(max_new_tokens=body["max_tokens"]))
        assert (text, finish, tokens) == (expected.text, expected.finish_reason, expected.completion_tokens)


def test_requests_share_the_model_and_seeded_sampling_does_not_depend_on_the_batch(session):
    seeded = chat("Tell me a story", temperature=1.0, top_p=0.9, seed=1234, max_tokens=12)
    with serving(session, max_batch_size=8) as server, slowed(session.model, 0.01) as calls:
        alone = answer(server.base, seeded, False)
        calls.clear()
        with ThreadPoolExecutor(8) as pool:
            others = [pool.submit(answer, server.base, b, False) for b in questions(7)]
            together = pool.submit(answer, server.base, seeded, True)
            [f.result() for f in others]
            assert together.result()[0] == alone[0]
    # 8 requests of up to 32 tokens each in far fewer forward passes than one at a time would take
    assert len(calls) < 0.6 * sum(b["max_tokens"] for b in questions(7))


def test_a_plugin_decoder_is_used_one_request_at_a_time(chat_model):
    class Decoder:
        calls = 0

        @hookimpl
        def decode(self, config, model, tokenizer, input_ids, options, streamer):
            Decoder.calls += 1
            return None  # defer to the core decoder

    plugged = open_session(str(chat_model), extra_plugins={"decoder": Decoder()})
    with serving(plugged, max_batch_size=16) as server:
        assert not server.lmflow.engine.batched
        assert request(server.base, chat("hi", max_tokens=3))[0] == 200
    assert Decoder.calls == 1


def test_serving_beyond_this_machine_without_a_key_is_pointed_out(session, monkeypatch, capsys):
    from lmflow_core import serve
    from lmflow_core.report import Reporter, reporting

    monkeypatch.setattr(serve.DrainingServer, "run", lambda self: self.lmflow.engine.close())
    with reporting(Reporter()):  # as the CLI prints notes (a run earlier in this process set its own)
        serve.run_server(session, serve.ServeSettings(host="0.0.0.0", port=free_port(), ui=False))
    out = "".join(capsys.readouterr())
    assert "note: serving on 0.0.0.0 without a key" in out and "pass --api-key KEY" in out
    serve.run_server(session, serve.ServeSettings(host="0.0.0.0", port=free_port(), ui=False, api_key="k"))
    serve.run_server(session, serve.ServeSettings(port=free_port(), ui=False))
    out = "".join(capsys.readouterr())
    assert "without a key" not in out and "(key required)" in out
