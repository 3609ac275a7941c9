"""The OpenAI-compatible API of `lorakit serve`, through the real `openai` client against the CLI
server on 127.0.0.1: greedy text equals `lorakit generate` with the same adapter token for token,
streamed or not; sampling settings, stop strings, usage; every bad request a 4xx in OpenAI's
error shape."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
from serve_support import (
    BASE_NAME,
    CHAT_ADAPTERS,
    CHAT_TOKENS,
    CHATS,
    CLI_CASE,
    MAX_TOKENS,
    PROMPTS,
    SERVER_LIMITS,
    http,
)

from lorakit.builtin import build_tokenizer
from lorakit.model_io import encode_prompt


def test_models_lists_the_base_and_every_adapter(client, server):
    models = client.models.list().data
    assert [m.id for m in models][:9] == [BASE_NAME] + [f"a{i}" for i in range(8)]   # other tests load more
    assert all(m.owned_by == "lorakit" for m in models)
    status, body = http(server["url"] + "/v1/models/a3")
    assert status == 200 and body["id"] == "a3" and body["parent"] == BASE_NAME
    status, body = http(server["url"] + "/health")
    assert status == 200 and body["status"] == "ok" and body["adapters"] >= 8


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completions_equal_offline_generate(client, refs, stream):
    """Each adapter (and the base) on its own prompt: the text `lorakit generate` gives, the token
    count it generated, and finish_reason "stop" exactly when it ended with the end token."""
    cases = [("a0", PROMPTS[0]), ("a3", PROMPTS[3]), ("a7", PROMPTS[7]), (BASE_NAME, PROMPTS[1])]
    for model, prompt in cases:
        ref = refs[(None if model == BASE_NAME else model, prompt)]
        if stream:
            chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            used = chunks[-1].usage
            assert all(c.model == model for c in chunks)
        else:
            out = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
            text, reason, used = out.choices[0].text, out.choices[0].finish_reason, out.usage
            assert out.model == model and out.object == "text_completion"
        assert text == ref["text"], (model, prompt)
        assert reason == ("stop" if ref["eos"] else "length")
        assert used.completion_tokens == ref["tokens"]
        assert used.prompt_tokens == len(encode_prompt(build_tokenizer(), prompt=prompt))
        assert used.total_tokens == used.prompt_tokens + used.completion_tokens


def test_the_adapters_really_differ(refs):
    texts = {refs[(f"a{i}", PROMPTS[0])]["text"] for i in range(8)} | {refs[(None, PROMPTS[0])]["text"]}
    assert len(texts) == 9


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_equals_offline_generate_with_the_chat_template(client, refs, stream):
    for adapter in CHAT_ADAPTERS:
        for i, messages in enumerate(CHATS):
            ref = refs[(adapter, f"chat{i}")]
            if stream:
                chunks = list(client.chat.completions.create(model=adapter, messages=messages, max_tokens=CHAT_TOKENS,
                                                             temperature=0, stream=True))
                assert chunks[0].choices[0].delta.role == "assistant"
                text = "".join(c.choices[0].delta.content or "" for c in chunks)
                reason = chunks[-1].choices[0].finish_reason
            else:
                out = client.chat.completions.create(model=adapter, messages=messages, max_tokens=CHAT_TOKENS,
                                                     temperature=0)
                text, reason = out.choices[0].message.content, out.choices[0].finish_reason
                assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
                assert out.usage.completion_tokens == ref["tokens"]
                assert out.usage.prompt_tokens == len(encode_prompt(build_tokenizer(), messages=messages))
            assert text == ref["text"]
            assert reason == ("stop" if ref["eos"] else "length")


def test_max_completion_tokens_and_text_parts_are_understood(client, refs):
    parts = [{"role": "user", "content": [{"type": "text", "text": CHATS[0][0]["content"]}]}]
    out = client.chat.completions.create(model="a2", messages=parts, max_completion_tokens=CHAT_TOKENS, temperature=0)
    assert out.choices[0].message.content == refs[("a2", "chat0")]["text"]


def test_lorakit_generate_cli_prints_what_the_server_returns(client, refs):
    """The offline side as the user runs it: `lorakit generate --no-stream` in a subprocess."""
    adapter, prompt = CLI_CASE
    out = client.completions.create(model=adapter, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert refs.cli_output() == out.choices[0].text + "\n"


def test_stop_strings_end_the_text_before_them(client, refs):
    ref = refs[("a1", PROMPTS[3])]["text"]
    stop = ref[5:7]
    expected = ref[:ref.index(stop)]
    out = client.completions.create(model="a1", prompt=PROMPTS[3], max_tokens=MAX_TOKENS, temperature=0,
                                    stop=["@@never", stop])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (expected, "stop")
    chunks = list(client.completions.create(model="a1", prompt=PROMPTS[3], max_tokens=MAX_TOKENS, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_cuts_with_finish_reason_length(client, refs):
    ref = refs[("a6", PROMPTS[5])]["text"]
    out = client.completions.create(model="a6", prompt=PROMPTS[5], max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 4
    assert out.choices[0].text == ref[:4]   # one byte per token, all ASCII


def test_seeded_sampling_is_reproducible_and_top_p_near_zero_is_greedy(client, refs):
    def sample(seed, **kw):
        return client.completions.create(model="a0", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=1.0,
                                         seed=seed, **kw).choices[0].text
    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1
    # top_p keeps only the most likely token: sampling at any temperature is then greedy
    assert sample(7, top_p=1e-6) == refs[("a0", PROMPTS[1])]["text"]


def test_several_prompts_in_one_completion_request(client, refs):
    out = client.completions.create(model="a2", prompt=PROMPTS[:3], max_tokens=MAX_TOKENS, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [refs[("a2", p)]["text"] for p in PROMPTS[:3]]
    assert out.usage.completion_tokens == sum(refs[("a2", p)]["tokens"] for p in PROMPTS[:3])


# ---- errors --------------------------------------------------------------------------------------


def _status(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.body


@pytest.mark.parametrize("kwargs, param, words", [
    (dict(temperature=-0.5), "temperature", "greater than or equal to 0"),
    (dict(temperature=2.5), "temperature", "less than or equal to 2"),
    (dict(top_p=0), "top_p", "greater than 0"),
    (dict(top_p=1.5), "top_p", "less than or equal to 1"),
    (dict(max_tokens=0), "max_tokens", "greater than or equal to 1"),
    (dict(max_tokens=SERVER_LIMITS["max_tokens"] + 1), "max_tokens", "more than this server's limit of 200"),
    (dict(n=0), "n", "greater than or equal to 1"),
    (dict(logprobs=6), "logprobs", "less than or equal to 5"),
    (dict(stop=""), "stop", "at least 1 character"),
    (dict(stop=["x"] * 17), "stop", "at most 16"),
    (dict(presence_penalty=2.5), "presence_penalty", "less than or equal to 2"),
])
def test_bad_parameters_are_400_naming_the_parameter(client, kwargs, param, words):
    status, body = _status(lambda: client.completions.create(model="a0", prompt="Hi", **{"max_tokens": 4, **kwargs}))
    assert status == 400 and body["type"] == "invalid_request_error"
    assert body["param"] == param and words in body["message"]


def test_unknown_model_is_404_and_auto_without_router_is_400(client):
    status, body = _status(lambda: client.completions.create(model="nope", prompt="Hi", max_tokens=4))
    assert status == 404 and body["code"] == "model_not_found" and "'nope' does not exist" in body["message"]
    status, body = _status(lambda: client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=4))
    assert status == 400 and "--router" in body["message"]


def test_too_long_prompts_are_400_with_both_numbers(client):
    status, body = _status(lambda: client.completions.create(model="a0", prompt="x" * 200, max_tokens=4))
    assert status == 400 and body["code"] == "context_length_exceeded"
    assert "the prompt is 200 tokens, more than this server's limit of 128" in body["message"]
    # within both limits, but beyond the model's context of 256 positions
    status, body = _status(lambda: client.completions.create(model="a0", prompt="x" * 100, max_tokens=200))
    assert status == 400 and body["param"] == "max_tokens"
    assert "context is 256 tokens, but the prompt (100) plus max_tokens (200) need 300" in body["message"]


def test_empty_and_non_text_inputs_are_400(client):
    status, body = _status(lambda: client.completions.create(model="a0", prompt="", max_tokens=4))
    assert status == 400 and "prompt is empty" in body["message"]
    status, body = _status(lambda: client.completions.create(model="a0", prompt=[1, 99999], max_tokens=4))
    assert status == 400 and "token ids must be integers in [0, 263)" in body["message"]
    status, body = _status(lambda: client.chat.completions.create(
        model="a0", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]))
    assert status == 400 and "text only" in body["message"]
    status, body = _status(lambda: client.chat.completions.create(model="a0", messages=[]))
    assert status == 400 and body["param"] == "messages"


@pytest.mark.parametrize("raw, words", [
    (b'{"model": "a0", "prompt": "Hi"', "not valid JSON"),
    (b'{"prompt": "Hi"}', "model is required"),
    (b'[1, 2]', "Input should be a valid dictionary"),
    (b'{"model": "a0", "prompt": {"x": 1}}', "prompt"),
])
def test_malformed_bodies_are_400(server, raw, words):
    status, body = http(server["url"] + "/v1/completions", "POST", raw)
    assert status == 400 and words in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_body_over_the_limit_is_413_and_unknown_routes_are_json_404(server):
    big = json.dumps({"model": "a0", "prompt": "x" * (SERVER_LIMITS["max_body_bytes"] + 10)}).encode()
    status, body = http(server["url"] + "/v1/completions", "POST", big)
    assert status == 413 and "limit of 65536 bytes" in body["error"]["message"]
    status, body = http(server["url"] + "/v1/nothing")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, body = http(server["url"] + "/v1/completions")   # GET on a POST route
    assert status == 405 and "error" in body


def test_chunked_body_over_the_limit_is_413(server):
    """No Content-Length: the limit holds while the body streams in."""
    def chunks():
        yield b'{"model": "a0", "prompt": "'
        for _ in range(20):
            yield b"x" * 4096
        yield b'"}'
    request = urllib.request.Request(server["url"] + "/v1/completions", data=chunks(), method="POST",
                                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 413


def test_a_declared_huge_body_is_refused_before_it_is_sent(server):
    """Content-Length of 1 GB: the 413 comes back at once, with no byte of the body read."""
    import socket
    from urllib.parse import urlparse

    where = urlparse(server["url"])
    with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")
        reply = b""
        while b"(max_body_bytes)" not in reply:
            part = sock.recv(65536)
            assert part, reply
            reply += part
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "(1000000000 bytes) is larger than this server's limit" in reply
