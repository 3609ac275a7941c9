"""The app in process under uvicorn, over an engine whose model sleeps in every forward (so
requests last long enough to act on): time limits, clients that go away, graceful shutdown,
routing with model "auto", and run-time loading switched off."""

from __future__ import annotations

import openai
import pytest
from serve_support import ADAPTERS, MAX_TOKENS, PROMPTS, http, long_case, served_model, slowed, wait_idle

import lorakit as lk
from lorakit.builtin import build_tokenizer
from lorakit.serve import Engine, ServeConfig
from lorakit.serve.server import load_server


def test_requests_past_the_time_limit_get_408_and_are_cancelled(serve_files, serve):
    engine = Engine(slowed(served_model(serve_files), 0.1), build_tokenizer(), ServeConfig(request_timeout_s=1.5))
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
    wait_idle(server.url)


def test_a_client_that_goes_away_cancels_its_request(serve_files, serve):
    engine = Engine(slowed(served_model(serve_files), 0.02), build_tokenizer())
    engine.eos_ids = set()   # the request cannot end early by itself
    server = serve(engine)
    stream = server.client.completions.create(model="a0", prompt="Hi", max_tokens=200, temperature=1.0, seed=0,
                                              stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert http(server.url + "/health")[1]["running"] == 1
    stream.close()
    wait_idle(server.url, timeout=2.0)   # its 200 tokens would take 4 s at 20 ms a step


def test_graceful_shutdown_finishes_the_requests_in_flight(serve_files, serve, refs):
    engine = Engine(slowed(served_model(serve_files), 0.02), build_tokenizer())
    server = serve(engine)
    adapter, prompt = long_case(refs, ADAPTERS[:4])
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
    model = served_model(serve_files)
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
    server = serve(Engine(served_model(serve_files, []), build_tokenizer()))
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
