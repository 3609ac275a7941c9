"""One request cannot fail another: token choice is numerically safe for every temperature and
top_p the API accepts (what rounds to 0 in float32 is greedy / top-1), values outside are 400s,
and a row that cannot be continued (an adapter holding NaN makes its logits NaN) fails alone,
at once, while the other rows of its batch go on to the text they give when sent alone."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
from serve_support import ADAPTERS, MAX_TOKENS, PROMPTS, http, served_model, slowed

from lorakit.builtin import build_tokenizer
from lorakit.inject import lora_layers
from lorakit.model_io import encode_prompt
from lorakit.serve import Engine, SamplingParams, ServeError
from lorakit.serve.engine import Delta, Failed, Finished
from lorakit.serve.sampling import choose_tokens, make_generator

GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _generators(n: int) -> list[torch.Generator]:
    return [make_generator(i, torch.device("cpu")) for i in range(n)]


@pytest.mark.parametrize("temperature, top_p", [(1e-50, 1.0), (1e-300, 0.3), (1e-40, 1.0), (1.0, 1e-300),
                                                (2.0, 1e-45), (5e-324, 5e-324)])
def test_what_rounds_to_zero_in_float32_is_greedy(temperature, top_p):
    """1e-50 and 1e-300 are 0 in float32; 1e-40 is a float32 subnormal, so z / t overflows to inf
    unless the best logit is subtracted first; top_p 1e-300 keeps only the most likely token."""
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0)) * 10            # (8, 50)
    params = [SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p)] * 8
    assert choose_tokens(logits, params, _generators(8)) == logits.argmax(-1).tolist()


def test_a_row_with_non_finite_logits_gets_no_token_and_the_others_do():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))                  # (4, 50)
    logits[1] = math.nan
    logits[2, 7] = math.inf
    params = [SamplingParams(max_tokens=1, temperature=0.7, seed=0), SamplingParams(max_tokens=1, temperature=0.7),
              SamplingParams(max_tokens=1, temperature=0), SamplingParams(max_tokens=1, temperature=0)]
    tokens = choose_tokens(logits, params, _generators(4))
    assert tokens[1] is None and tokens[2] is None
    assert tokens[3] == int(logits[3].argmax())
    alone = choose_tokens(logits[:1], params[:1], _generators(1))
    assert tokens[0] == alone[0]


@pytest.mark.parametrize("temperature, top_p", [(-0.1, 1.0), (2.5, 1.0), (math.nan, 1.0), (math.inf, 1.0),
                                                (1.0, 0.0), (1.0, 1.5), (1.0, math.nan)])
def test_the_engine_refuses_sampling_settings_outside_the_api_range(serve_files, tokenizer, temperature, top_p):
    engine = Engine(served_model(serve_files, []), tokenizer)
    with pytest.raises(ServeError) as info:
        engine.submit([5, 6], SamplingParams(max_tokens=2, temperature=temperature, top_p=top_p))
    assert info.value.status == 400 and info.value.param == ("temperature" if top_p == 1.0 else "top_p")


@pytest.mark.parametrize("body, param", [({"temperature": -0.1}, "temperature"), ({"temperature": 2.01}, "temperature"),
                                         ({"temperature": math.nan}, "temperature"), ({"top_p": 0}, "top_p"),
                                         ({"top_p": 1.01}, "top_p"), ({"top_p": -math.inf}, "top_p")])
def test_the_api_answers_400_outside_the_range(serve_files, serve, tokenizer, body, param):
    server = serve(Engine(served_model(serve_files, []), tokenizer))
    status, error = http(server.url + "/v1/completions", "POST", {"model": "tiny", "prompt": "Hi", **body})
    assert status == 400 and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["param"] == param and error["error"]["type"] == "invalid_request_error"


class _Sink:
    def __init__(self) -> None:
        self.events, self.done = [], threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, (Finished, Failed)):
            self.done.set()

    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Delta))


def _poison(model, name: str) -> None:
    """NaN in one lora_B of adapter `name`: every logit of a row using it becomes NaN."""
    _, layer = next((n, layer) for n, layer in lora_layers(model) if name in layer.r)
    with torch.no_grad():
        layer.lora_B[name].weight.fill_(math.nan)


def test_a_poisoned_row_fails_alone_and_the_batch_goes_on(serve_files, tokenizer):
    model = served_model(serve_files, ADAPTERS[:3])
    _poison(model, "a2")    # after loading: what the load-time checks would refuse, as a hot-load could bring it
    engine = Engine(slowed(model, 0.01), tokenizer).start()
    try:
        cases = [("a0", PROMPTS[3]), ("a1", PROMPTS[0]), ("__base__", PROMPTS[1]), ("a0", PROMPTS[6])]
        alone = [engine.generate(encode_prompt(tokenizer, p), GREEDY, a).text for a, p in cases]
        tiny = SamplingParams(max_tokens=MAX_TOKENS, temperature=1e-50, top_p=1e-300, seed=3)   # 0 in float32
        sinks = {key: _Sink() for key in ["first", "greedy_poison", "sampled_poison", "tiny", *range(1, len(cases))]}
        engine.submit(encode_prompt(tokenizer, cases[0][1]), GREEDY, cases[0][0], sinks["first"])
        while not any(isinstance(e, Delta) for e in sinks["first"].events):   # the batch is running
            time.sleep(0.005)
        engine.submit(encode_prompt(tokenizer, "Hi"), GREEDY, "a2", sinks["greedy_poison"])
        engine.submit(encode_prompt(tokenizer, cases[1][1]), GREEDY, cases[1][0], sinks[1])
        engine.submit(encode_prompt(tokenizer, "Hi"), SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8),
                      "a2", sinks["sampled_poison"])
        engine.submit(encode_prompt(tokenizer, cases[2][1]), tiny, cases[2][0], sinks["tiny"])
        for i in range(2, len(cases)):
            engine.submit(encode_prompt(tokenizer, cases[i][1]), GREEDY, cases[i][0], sinks[i])
        started = time.monotonic()
        for key in ("greedy_poison", "sampled_poison"):
            assert sinks[key].done.wait(10), key
            error = sinks[key].events[-1]
            assert isinstance(error, Failed) and error.error.status == 500, (key, sinks[key].events)
            assert "a2" in str(error.error) and "NaN" in str(error.error)
        assert time.monotonic() - started < 10
        for sink in sinks.values():
            assert sink.done.wait(30)
        got = [sinks["first"].text(), *[sinks[i].text() for i in range(1, len(cases))]]
        assert all(isinstance(s.events[-1], Finished) for k, s in sinks.items() if "poison" not in str(k))
        assert got == alone
        assert sinks["tiny"].text() == alone[2]    # temperature and top_p that round to 0: greedy
        assert engine.alive and engine.stats() == {"running": 0, "waiting": 0}
    finally:
        engine.stop(timeout=5)
