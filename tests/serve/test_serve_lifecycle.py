"""The app in process under uvicorn, over an engine whose model sleeps in every forward (so
requests last long enough to act on): time limits, clients that go away, graceful shutdown,
routing with model "auto", and run-time loading switched off."""

from __future__ import annotations

import threading
import time

import openai
import pytest
import uvicorn
from serve_support import ADAPTERS, MAX_TOKENS, PROMPTS, free_port, http
from test_serve_engine import _long_case, _model, _slow

import lorakit as lk
from lorakit.builtin import build_tokenizer
from lorakit.serve import Engine, ServeConfig, create_app
from lorakit.serve.server import load_server


class InProcess:
    """uvicorn serving `app` on 127.0.0.1 in a thread."""

    def __init__(self, app, grace_s: int = 30) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    timeout_graceful_shutdown=grace_s))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture
def serve(serve_files):
    """serve(engine, **create_app kwargs) -> a running InProcess; stopped at the end."""
    running = []

    def start(engine: Engine, grace_s: int = 30, **kwargs) -> InProcess:
        server = InProcess(create_app(engine, "tiny", **kwargs), grace_s)
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


def _wait_idle(url: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = http(url + "/health")[1]
        if body["running"] == 0 and body["waiting"] == 0:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_requests_past_the_time_limit_get_408_and_are_cancelled(serve_files, serve):
    engine = Engine(_slow(_model(serve_files), 0.1), build_tokenizer(), ServeConfig(request_timeout_s=1.5))
    engine.eos_ids = set()   # the requests cannot end early by themselves
    server = serve(engine)
    with pytest.raises(openai.APIStatusError) as info:
        server.client.completions.create(model="a0", prompt="Hi", max_tokens=100, temperature=1.0)
    assert info.value.status_code == 408 and info.value.body["code"] == "timeout"
    assert "time limit of 1.5 s (request_timeout_s)" in info.value.body["message"]
    stream = server.client.completions.create(model="a1", prompt="Hi", max_tokens=100, temperature=1.0, stream=True)
    with pytest.raises(openai.APIError) as info:   # the error arrives inside the stream, after some text
        for _ in stream:
            pass
    assert info.value.body["code"] == "timeout"
    _wait_idle(server.url)


def test_a_client_that_goes_away_cancels_its_request(serve_files, serve):
    engine = Engine(_slow(_model(serve_files), 0.02), build_tokenizer())
    engine.eos_ids = set()   # the request cannot end early by itself
    server = serve(engine)
    stream = server.client.completions.create(model="a0", prompt="Hi", max_tokens=200, temperature=1.0, seed=0,
                                              stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert http(server.url + "/health")[1]["running"] == 1
    stream.close()
    _wait_idle(server.url, timeout=2.0)   # its 200 tokens would take 4 s at 20 ms a step


def test_graceful_shutdown_finishes_the_requests_in_flight(serve_files, serve, refs):
    engine = Engine(_slow(_model(serve_files), 0.02), build_tokenizer())
    server = serve(engine)
    adapter, prompt = _long_case(refs, ADAPTERS[:4])
    stream = server.client.completions.create(model=adapter, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                              stream=True)
    chunks = iter(stream)
    text = next(chunks).choices[0].text
    server.server.should_exit = True            # what SIGINT / SIGTERM do
    text += "".join(c.choices[0].text for c in chunks)
    assert text == refs[(adapter, prompt)]["text"]
    server.thread.join(timeout=60)
    assert not server.thread.is_alive() and not engine.alive
    with pytest.raises(openai.APIConnectionError):
        server.client.models.list()


def test_auto_asks_the_router(serve_files, serve, refs, tmp_path):
    tokenizer = build_tokenizer()
    model = _model(serve_files)
    router = lk.Router(model, tokenizer)
    for name, prompt in zip(ADAPTERS[:3], PROMPTS[:3], strict=True):
        router.register(name, examples=[prompt])
    server = serve(Engine(model, tokenizer, router=router))
    assert "auto" in [m.id for m in server.client.models.list().data]
    for name, prompt in zip(ADAPTERS[:3], PROMPTS[:3], strict=True):   # each prompt is its adapter's example
        out = server.client.completions.create(model="auto", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert out.model == name and out.choices[0].text == refs[(name, prompt)]["text"]
    chat = server.client.chat.completions.create(model="auto", messages=[{"role": "user", "content": PROMPTS[1]}],
                                                 max_tokens=4, temperature=0)
    assert chat.model == "a1"
    status, body = http(server.url + "/v1/adapters/a1", "DELETE")
    assert status == 409 and "router" in body["error"]["message"]

    router.save(tmp_path / "router")   # and the CLI's wiring: --router DIR
    loaded = load_server(str(serve_files["model"]), [f"a{i}={serve_files['adapters'] / f'a{i}'}" for i in range(3)],
                         router=str(tmp_path / "router"), served_model_name="tiny", dtype="fp32", device="cpu")
    assert loaded.engine.router.adapters == ["a0", "a1", "a2"] and loaded.engine.adapters == ("a0", "a1", "a2")


def test_runtime_loading_is_off_without_an_adapters_dir(serve_files, serve):
    server = serve(Engine(_model(serve_files, []), build_tokenizer()))
    status, body = http(server.url + "/v1/adapters", "POST", {"name": "x", "path": str(serve_files["adapters"])})
    assert status == 403 and "--adapters-dir" in body["error"]["message"]
    assert [m.id for m in server.client.models.list().data] == ["tiny"]


def test_serve_without_the_extra_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    from lorakit import cli

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else find_spec(name, *a))
    assert cli.main(["serve", "--model", "lorakit/tiny-llama"]) == 2
    assert capsys.readouterr().err == ("lorakit serve: error: lorakit serve needs fastapi, not installed here: "
                                       "pip install 'lorakit[serve]'\n")
