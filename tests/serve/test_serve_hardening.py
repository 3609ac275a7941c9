"""The server against careless and hostile clients and files, in process on 127.0.0.1: an adapter
in --adapters-dir that does not fit is skipped and listed, not fatal; bad text (lone surrogates,
invalid UTF-8, booleans as token ids) is a 400 in OpenAI's error shape; a full queue is a 429;
a body sent a byte at a time and a stream never read are cut off at their time limits."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time

import pytest
from serve_support import ADAPTERS, http, make_adapter, served_model, slowed, wait_idle
from tiny_models import tiny_model

import lorakit as lk
from lorakit.builtin import build_tokenizer
from lorakit.errors import LoraError
from lorakit.io import CONFIG_NAME, PICKLE_NAME
from lorakit.serve import Engine, ServeConfig, create_app
from lorakit.serve.server import load_server

# ---- item 2: a bad subdirectory of --adapters-dir is skipped --------------------------------------


@pytest.fixture
def mixed_dir(serve_files, tmp_path):
    """adapters/: a0 (fits), wide (a width-64 model's adapter: no shape fits), dora (DoRA: loads,
    but cannot be served per row), pickle_only (no safetensors)."""
    root = tmp_path / "adapters"
    shutil.copytree(serve_files["adapters"] / "a0", root / "a0")
    make_adapter(tiny_model(seed=3, tokenizer=build_tokenizer(), width=64), "wide", 7, root / "wide")
    model = tiny_model(seed=4, tokenizer=build_tokenizer())
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), name="dora")
    lk.save_adapter(model, root / "dora", name="dora")
    (root / "pickle_only").mkdir()
    shutil.copy(root / "a0" / CONFIG_NAME, root / "pickle_only" / CONFIG_NAME)
    (root / "pickle_only" / PICKLE_NAME).write_bytes(b"x")
    return root


def test_an_adapter_that_does_not_fit_is_skipped_logged_and_listed(serve_files, mixed_dir, serve, caplog):
    with caplog.at_level("WARNING", logger="lorakit.serve"):
        loaded = load_server(str(serve_files["model"]), [], adapters_dir=str(mixed_dir), served_model_name="tiny",
                             dtype="fp32", device="cpu")
    assert loaded.engine.adapters == ("a0",)
    assert sorted(loaded.skipped) == ["dora", "pickle_only", "wide"]
    assert "shape" in loaded.skipped["wide"] and "DoRA" in loaded.skipped["dora"]
    assert "never loads" in loaded.skipped["pickle_only"]
    for name, reason in loaded.skipped.items():
        assert f"skipping {name}: {reason}" in caplog.text
    server = serve(loaded.engine, adapters_dir=mixed_dir, skipped=loaded.skipped)
    status, health = http(server.url + "/health")
    assert status == 200 and health["adapters"] == 1 and health["skipped"] == loaded.skipped
    out = server.client.completions.create(model="a0", prompt="Hi", max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_an_adapter_given_explicitly_that_does_not_fit_stays_fatal(serve_files, mixed_dir):
    with pytest.raises(LoraError, match="shape"):
        load_server(str(serve_files["model"]), [f"wide={mixed_dir / 'wide'}"], served_model_name="tiny",
                    dtype="fp32", device="cpu")


# ---- item 3: bad text -----------------------------------------------------------------------------


@pytest.fixture
def tiny_server(serve_files, serve):
    return serve(Engine(served_model(serve_files, ADAPTERS[:1]), build_tokenizer()))


@pytest.mark.parametrize("body, param", [
    ({"model": "a0", "prompt": "ab\ud800cd"}, "prompt"),
    ({"model": "a0", "prompt": ["fine", "\udfff"]}, "prompt"),
    ({"model": "a0", "prompt": "Hi", "stop": ["\ud800"]}, "stop.0"),
    ({"model": "\ud800", "prompt": "Hi"}, "model"),
    ({"model": "a0", "prompt": [True, False]}, "prompt"),
    ({"model": "a0", "prompt": [[5, True]]}, "prompt"),
], ids=["prompt", "prompt-list", "stop", "model", "bool-ids", "bool-id-lists"])
def test_bad_text_in_a_completion_is_400(tiny_server, body, param):
    status, error = http(tiny_server.url + "/v1/completions", "POST", body)
    assert status == 400, error
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["param"].startswith(param)


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": "x\ud800"}], "messages.0.content"),
    ([{"role": "user", "content": [{"type": "text", "text": "\udc80"}]}], "messages.0.content"),
], ids=["content", "text-part"])
def test_a_lone_surrogate_in_a_message_is_400(tiny_server, messages, param):
    status, error = http(tiny_server.url + "/v1/chat/completions", "POST", {"model": "a0", "messages": messages})
    assert status == 400, error
    assert error["error"]["param"].startswith(param) and "surrogate" in error["error"]["message"]


@pytest.mark.parametrize("raw", [b'{"model": "a0", "prompt": "\xff\xfe"}', b'{"model": "a0", "prompt": "\xed\xa0\x80"}',
                                 b'{"model": "a0", "prompt": "caf\xc3"}'], ids=["ff", "encoded-surrogate", "cut"])
def test_invalid_utf8_in_the_body_is_400(tiny_server, raw):
    status, error = http(tiny_server.url + "/v1/completions", "POST", raw)
    assert status == 400, error
    assert "UTF-8" in error["error"]["message"] and error["error"]["type"] == "invalid_request_error"
    assert http(tiny_server.url + "/health")[0] == 200


# ---- item 4: a full queue, slow clients -----------------------------------------------------------


def _stream_lines(url: str, body: dict):
    """A streaming request on a raw socket; yields the SSE data lines as they come."""
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        for line in response:
            if line.startswith(b"data: "):
                yield line[6:].strip()


def test_a_full_queue_is_429_in_openai_shape(serve_files, serve):
    engine = Engine(slowed(served_model(serve_files, ADAPTERS[:1]), 0.02), build_tokenizer(),
                    ServeConfig(max_batch_size=1, max_queue=1))
    engine.eos_ids = set()   # the requests cannot end early by themselves
    server = serve(engine)
    url = server.url + "/v1/completions"
    running = _stream_lines(url, {"model": "a0", "prompt": "Hi", "max_tokens": 150, "temperature": 0, "stream": True})
    next(running)                                                    # the one batch slot is taken
    waiting = []
    thread = threading.Thread(target=lambda: waiting.append(http(url, "POST", {"model": "a0", "prompt": "Hi",
                                                                                "max_tokens": 2, "temperature": 0})))
    thread.start()
    deadline = time.monotonic() + 10
    while http(server.url + "/health")[1]["waiting"] < 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.02)
    status, error = http(url, "POST", {"model": "a0", "prompt": "Hi", "max_tokens": 2})
    assert status == 429 and error["error"]["type"] == "rate_limit_error"
    assert "max_queue 1" in error["error"]["message"] and set(error["error"]) == {"message", "type", "param", "code"}
    running.close()                                                  # frees the slot: the waiting one runs
    thread.join(timeout=20)
    assert waiting and waiting[0][0] == 200
    wait_idle(server.url)


def test_a_body_sent_a_byte_at_a_time_is_cut_off(serve_files, serve):
    server = serve(Engine(served_model(serve_files, []), build_tokenizer(), ServeConfig(body_timeout_s=1.0)))
    body = json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 2}).encode()
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        stop = threading.Event()

        def dribble() -> None:   # a byte every 0.2 s: the whole body would take 8 s
            for byte in body:
                if stop.wait(0.2):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:   # the server closed the connection
                    return

        sender = threading.Thread(target=dribble)
        started = time.monotonic()
        sender.start()
        try:
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        finally:
            stop.set()
            sender.join()
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert "body_timeout_s" in error["message"] and error["type"] == "timeout_error"
    assert elapsed < 4, elapsed


def test_a_stream_that_is_never_read_is_cut_off_at_the_time_limit(serve_files):
    """The app over a `send` that blocks after the first chunk, as a socket whose reader never
    reads does once its buffers are full: the response must end at request_timeout_s and the
    request leave the engine, not wait forever."""
    engine = Engine(slowed(served_model(serve_files, ADAPTERS[:1]), 0.05), build_tokenizer(),
                    ServeConfig(request_timeout_s=1.0)).start()   # its 190 tokens would take 9.5 s
    engine.eos_ids = set()
    app = create_app(engine, "tiny")
    body = json.dumps({"model": "a0", "prompt": "Hi", "max_tokens": 190, "temperature": 0, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "root_path": "", "query_string": b"", "headers": [(b"content-type", b"application/json"),
                                                               (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    sent = []

    async def scenario() -> None:
        never = asyncio.Event()
        messages = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive():
            message = next(messages, None)
            if message is None:
                await never.wait()   # the client never goes away
            return message

        async def send(message):
            sent.append(message)
            if sum(m["type"] == "http.response.body" for m in sent) > 1:
                await never.wait()   # the socket's buffers are full: the client reads nothing

        started = time.monotonic()
        await asyncio.wait_for(app(scope, receive, send), timeout=6)
        assert time.monotonic() - started < 4   # 1 s and the second the last chunks may take
        deadline = time.monotonic() + 3
        while engine.stats()["running"]:   # on this loop: the engine's last events still arrive here
            assert time.monotonic() < deadline, "the request still runs in the engine"
            await asyncio.sleep(0.02)

    try:
        asyncio.run(scenario())
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    finally:
        engine.stop(timeout=5)
