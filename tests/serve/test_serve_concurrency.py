"""Many requests at once against the CLI server: 64 concurrent requests over 8 adapters, each
equal to its offline greedy text, with malformed requests and a hot-loaded adapter in the middle;
unloading an adapter while its requests run."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

from serve_support import ADAPTERS, MAX_TOKENS, PROMPTS, http


def _complete(client, model: str, prompt: str, stream: bool) -> tuple[str, str]:
    """(text, finish_reason) of one greedy completion, streamed or whole."""
    if stream:
        chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                stream=True))
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    out = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    return out.choices[0].text, out.choices[0].finish_reason


def _expected(refs, adapter: str, prompt: str) -> tuple[str, str]:
    ref = refs[(adapter, prompt)]
    return ref["text"], "stop" if ref["eos"] else "length"


def test_64_concurrent_requests_with_bad_requests_and_a_hot_load_in_the_middle(client, server, serve_files, refs):
    url = server["url"]
    shutil.copytree(serve_files["staging"] / "hot", serve_files["adapters"] / "hot")
    grid = [(a, p) for p in PROMPTS for a in ADAPTERS]          # the adapters interleaved in arrival order
    bad_bodies = [b'{"model": "a0", "prompt": ', {"model": "a0", "prompt": "Hi", "temperature": -1},
                  {"model": "ghost", "prompt": "Hi"}, {"model": "a1", "prompt": "x" * 500},
                  {"model": "a2", "prompt": "Hi", "max_tokens": 0}]
    with ThreadPoolExecutor(max_workers=72) as pool:
        good = [pool.submit(_complete, client, a, p, i % 2 == 0) for i, (a, p) in enumerate(grid[:32])]
        bad = [pool.submit(http, url + "/v1/completions", "POST", body) for body in bad_bodies]
        good += [pool.submit(_complete, client, a, p, i % 2 == 0) for i, (a, p) in enumerate(grid[32:])]
        load = pool.submit(http, url + "/v1/adapters", "POST", {"name": "hot", "path": "hot"})
        assert load.result()[0] == 200, load.result()
        hot = [pool.submit(_complete, client, "hot", p, i % 2 == 1) for i, p in enumerate(PROMPTS)]
        results = [f.result() for f in good]
        hot_results = [f.result() for f in hot]
        bad_results = [f.result() for f in bad]
    wrong = [(a, p) for (a, p), got in zip(grid, results, strict=True) if got != _expected(refs, a, p)]
    assert not wrong, f"{len(wrong)} of 64 differ from offline generate: {[(k, dict(zip(grid, results, strict=True))[k], _expected(refs, *k)) for k in wrong[:5]]}"
    assert hot_results == [_expected(refs, "hot", p) for p in PROMPTS]
    assert [status for status, _ in bad_results] == [400, 400, 404, 400, 400]
    assert all(set(body["error"]) == {"message", "type", "param", "code"} for _, body in bad_results)
    assert http(url + "/health")[1]["status"] == "ok"


def test_unloading_an_adapter_with_requests_in_flight(client, server, serve_files, refs):
    url = server["url"]
    if "hot" not in [m.id for m in client.models.list().data]:
        if not (serve_files["adapters"] / "hot").exists():
            shutil.copytree(serve_files["staging"] / "hot", serve_files["adapters"] / "hot")
        assert http(url + "/v1/adapters", "POST", {"name": "hot", "path": "hot"})[0] == 200
    streams = [client.completions.create(model="hot", prompt=p, max_tokens=MAX_TOKENS, temperature=0, stream=True)
               for p in PROMPTS[:4]]
    firsts = [next(iter(s)) for s in streams]   # every request has started generating
    with ThreadPoolExecutor(max_workers=1) as pool:
        unload = pool.submit(http, url + "/v1/adapters/hot", "DELETE")
        time.sleep(0.2)
        texts = [f.choices[0].text + "".join(c.choices[0].text for c in s) for f, s in zip(firsts, streams, strict=True)]
        assert unload.result() == (200, {"id": "hot", "object": "model", "deleted": True})
    assert texts == [refs[("hot", p)]["text"] for p in PROMPTS[:4]]
    assert "hot" not in [m.id for m in client.models.list().data]
    status, body = http(url + "/v1/completions", "POST", {"model": "hot", "prompt": "Hi", "max_tokens": 2})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert http(url + "/v1/adapters/hot", "DELETE")[0] == 404
