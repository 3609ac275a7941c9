"""OpenAI's `logprobs` / `top_logprobs`, `presence_penalty` / `frequency_penalty` and `n`, through
the real `openai` client against the app in process, checked against the model itself: the
log-probabilities are log_softmax of the model's logits (after the penalties) at each generated
position; penalised greedy text is a step-by-step reference of the formula on the model's
logits; `n` choices are the single requests seeded seed + i, their prompt prefilled once; a row
with penalties leaves a row without them in its batch exactly as it is alone."""

from __future__ import annotations

import functools
import time

import openai
import pytest
import torch
from serve_support import InProcess, served_model
from transformers.convert_slow_tokenizer import bytes_to_unicode

import lorakit as lk
from lorakit.builtin import build_tokenizer
from lorakit.model_io import encode_prompt
from lorakit.serve import Engine, SamplingParams, ServeConfig, ServeError, create_app
from lorakit.serve.sampling import apply_penalties

ADAPTER = "a1"
MAX_BATCH = 8
PROMPT = "Once upon a time in a land far away"
CHAT = [{"role": "user", "content": "Tell me a story"}]
BYTE_CHARS = bytes_to_unicode()   # byte -> the character the byte tokenizer spells it with


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


class Passes:
    """The engine model's forward, recording each pass's (batch, length) and sleeping `seconds` in
    it, so requests sent one after the other overlap in the batch."""

    def __init__(self, model, seconds: float) -> None:
        self.shapes: list[tuple[int, int]] = []
        forward = model.forward

        @functools.wraps(forward)
        def recorded(*args, **kwargs):
            self.shapes.append(tuple(kwargs["input_ids"].shape))
            time.sleep(seconds)
            return forward(*args, **kwargs)

        model.forward = recorded

    def since(self, start: int) -> list[tuple[int, int]]:
        return self.shapes[start:]


@pytest.fixture(scope="module")
def app(serve_files, tokenizer):
    """(openai client, Passes) of an in-process server over the tiny model with adapter a1."""
    model = served_model(serve_files, [ADAPTER])
    passes = Passes(model, 0.005)
    engine = Engine(model, tokenizer, ServeConfig(max_batch_size=MAX_BATCH, max_tokens=64))
    server = InProcess(create_app(engine, "tiny"))
    yield server.client, passes
    server.stop()


@pytest.fixture(scope="module")
def reference(serve_files):
    """A separate copy of the served model, to compute what the server should return."""
    return served_model(serve_files, [ADAPTER])


def _logits(reference, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """(T, V) float32 logits of the reference model at every position of `ids`."""
    lk.set_active_adapters(reference, [adapter] if adapter else [])
    with torch.inference_mode():
        return reference(input_ids=torch.tensor([ids])).logits[0].float()


def _token_id(tokenizer, token: str, raw: list[int]) -> int:
    """The id of a log-probability entry: a special token by its text, else its one byte."""
    if token in tokenizer.get_added_vocab():
        return tokenizer.convert_tokens_to_ids(token)
    (byte,) = raw
    return tokenizer.convert_tokens_to_ids(BYTE_CHARS[byte])


def _ids(tokenizer, content) -> list[int]:
    """The token ids of chat `logprobs.content` entries."""
    return [_token_id(tokenizer, e.token, e.bytes) for e in content]


def _spelled_id(tokenizer, token: str) -> int:
    """The id of a completions log-probability token: text, or raw bytes spelled `bytes:\\xNN`."""
    raw = bytes.fromhex(token[len("bytes:"):].replace("\\x", "")) if token.startswith("bytes:") else token.encode()
    return _token_id(tokenizer, token, list(raw))


def _check_entries(reference, adapter: str | None, prompt_ids: list[int], ids: list[int], chosen: list[float],
                   tops: list[list[tuple[int, float]]], shift: torch.Tensor | None = None) -> None:
    """`chosen[j]` (a float) and `tops[j]` ([(id, logprob)]) of generated token j equal
    log_softmax of the reference logits at its position (minus `shift[j]`, the penalties), atol
    1e-4; the alternatives are the most likely tokens, most likely first."""
    logits = _logits(reference, adapter, prompt_ids + ids)[len(prompt_ids) - 1:-1]          # (n, V)
    if shift is not None:
        logits = logits - shift
    logp = torch.log_softmax(logits, dim=-1)                                                   # (n, V)
    for j, token in enumerate(ids):
        assert chosen[j] == pytest.approx(float(logp[j, token]), abs=1e-4)
        k = len(tops[j])
        assert [lp for _, lp in tops[j]] == pytest.approx(logp[j].topk(k).values.tolist(), abs=1e-4)
        assert [lp for _, lp in tops[j]] == pytest.approx([float(logp[j, t]) for t, _ in tops[j]], abs=1e-4)


# ---- logprobs ------------------------------------------------------------------------------------


def test_chat_logprobs_are_the_models_log_softmax_and_greedy_takes_the_top_one(app, reference, tokenizer):
    client, _ = app
    out = client.chat.completions.create(model=ADAPTER, messages=CHAT, max_tokens=12, temperature=0, logprobs=True,
                                         top_logprobs=5)
    content = out.choices[0].logprobs.content
    ids = _ids(tokenizer, content)
    assert len(content) == out.usage.completion_tokens == len(ids)
    assert all(len(e.top_logprobs) == 5 for e in content)
    assert all(e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob for e in content)
    assert tokenizer.decode(ids, skip_special_tokens=True) == out.choices[0].message.content
    assert all(bytes(e.bytes).decode() == e.token for e in content if e.token not in tokenizer.get_added_vocab())
    prompt_ids = encode_prompt(tokenizer, messages=CHAT)
    tops = [[(_token_id(tokenizer, t.token, t.bytes), t.logprob) for t in e.top_logprobs] for e in content]
    _check_entries(reference, ADAPTER, prompt_ids, ids, [e.logprob for e in content], tops)


def test_completion_logprobs_are_taken_before_temperature(app, reference, tokenizer):
    """Sampled at temperature 1.7 (which also draws bytes that are no whole character): the
    reported log-probabilities are still the model's own."""
    client, _ = app
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.7, seed=3, logprobs=3)
    choice = out.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) \
        == out.usage.completion_tokens
    assert all(len(top) == 3 for top in lp.top_logprobs)
    ids = [_spelled_id(tokenizer, t) for t in lp.tokens]
    assert tokenizer.decode(ids, skip_special_tokens=True) == choice.text
    tops = [[(_spelled_id(tokenizer, t), v) for t, v in top.items()] for top in lp.top_logprobs]
    _check_entries(reference, None, encode_prompt(tokenizer, prompt=PROMPT), ids, lp.token_logprobs, tops)


def test_completion_text_offsets_count_characters_of_the_text(app):
    client, _ = app
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, logprobs=0)
    lp = out.choices[0].logprobs
    assert lp.top_logprobs == [{}] * len(lp.tokens)
    assert lp.text_offset == [len("".join(lp.tokens[:j])) for j in range(len(lp.tokens))]
    assert "".join(lp.tokens).startswith(out.choices[0].text)


def test_streamed_logprobs_are_the_whole_responses_in_pieces(app):
    client, _ = app
    kwargs = dict(model=ADAPTER, messages=CHAT, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole]
    assert sum(1 for c in chunks if c.choices and c.choices[0].logprobs) > 1
    cmpl = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2)
    whole = client.completions.create(**cmpl).choices[0].logprobs
    parts = [c.choices[0].logprobs for c in client.completions.create(**cmpl, stream=True)]
    assert [t for p in parts for t in p.tokens] == whole.tokens
    assert [o for p in parts for o in p.text_offset] == whole.text_offset
    assert [v for p in parts for v in p.token_logprobs] == whole.token_logprobs


def test_without_logprobs_there_are_none(app):
    client, _ = app
    out = client.chat.completions.create(model=ADAPTER, messages=CHAT, max_tokens=4, temperature=0)
    assert out.choices[0].logprobs is None
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    assert out.choices[0].logprobs is None


# ---- penalties -----------------------------------------------------------------------------------


def _penalised_greedy(reference, adapter, prompt_ids, steps, presence, frequency, eos) -> tuple[list[int], list]:
    """Greedy decoding with z -= presence * (c > 0) + frequency * c, c the counts of the tokens
    generated so far, one full forward per step: the tokens, and each step's subtracted (V,)."""
    ids, shifts = [], []
    counts = None
    for _ in range(steps):
        z = _logits(reference, adapter, prompt_ids + ids)[-1]                                   # (V,)
        counts = torch.zeros_like(z) if counts is None else counts
        shift = presence * (counts > 0) + frequency * counts
        best = (z - shift).topk(2).values
        assert float(best[0] - best[1]) > 1e-4, "a near tie: the reference path is not robust"
        token = int((z - shift).argmax())
        ids.append(token)
        shifts.append(shift)
        counts[token] += 1
        if token == eos:
            break
    return ids, shifts


@pytest.mark.parametrize("presence, frequency", [(0.0, 2.0), (0.7, 0.3), (-0.5, 0.0)])
def test_penalised_greedy_text_follows_the_formula_step_by_step(app, reference, tokenizer, presence, frequency):
    client, _ = app
    prompt_ids = encode_prompt(tokenizer, prompt=PROMPT)
    expected, shifts = _penalised_greedy(reference, None, prompt_ids, 24, presence, frequency, tokenizer.eos_token_id)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, logprobs=1,
                                    presence_penalty=presence, frequency_penalty=frequency)
    lp = out.choices[0].logprobs
    ids = [_spelled_id(tokenizer, t) for t in lp.tokens]
    assert ids == expected
    plain, _ = _penalised_greedy(reference, None, prompt_ids, 24, 0.0, 0.0, tokenizer.eos_token_id)
    assert ids != plain
    # the reported log-probabilities are those of the penalised logits
    tops = [[(_spelled_id(tokenizer, t), v) for t, v in top.items()] for top in lp.top_logprobs]
    _check_entries(reference, None, prompt_ids, ids, lp.token_logprobs, tops, torch.stack(shifts))


def test_a_strong_frequency_penalty_stops_greedy_repeating_tokens(app, tokenizer):
    client, _ = app
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0,
                                     frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    assert len(set(plain)) < len(plain)                  # the plain text repeats characters (one byte each)
    assert len(set(text)) == len(text) == 20


def test_chat_takes_penalties_too(app, reference, tokenizer):
    client, _ = app
    prompt_ids = encode_prompt(tokenizer, messages=CHAT)
    expected, _ = _penalised_greedy(reference, ADAPTER, prompt_ids, 16, 0.4, 1.1, tokenizer.eos_token_id)
    out = client.chat.completions.create(model=ADAPTER, messages=CHAT, max_tokens=16, temperature=0, logprobs=True,
                                         presence_penalty=0.4, frequency_penalty=1.1)
    assert _ids(tokenizer, out.choices[0].logprobs.content) == expected


def test_a_row_without_penalties_is_untouched_by_a_penalised_row_in_its_batch(app, tokenizer):
    """The penalised request streams 48 tokens; the plain one, sent once the first has started,
    runs beside it and gives exactly its solo text and log-probabilities."""
    client, passes = app
    plain = dict(model="tiny", prompt="Hello there", max_tokens=16, temperature=0, logprobs=2)
    solo = client.completions.create(**plain).choices[0]
    start = len(passes.shapes)
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=48, temperature=0, stream=True,
                                       frequency_penalty=1.5, presence_penalty=0.5)
    penalised = [next(iter(stream)).choices[0].text]
    beside = client.completions.create(**plain).choices[0]
    penalised += [c.choices[0].text for c in stream]
    assert (beside.text, beside.logprobs.tokens) == (solo.text, solo.logprobs.tokens)
    # a batch of two rounds float32 matmuls differently from a batch of one, whatever the other row
    # does (the penalties themselves leave the row's logits bit for bit: the unit test below)
    assert beside.logprobs.token_logprobs == pytest.approx(solo.logprobs.token_logprobs, abs=1e-5)
    assert max(b for b, length in passes.since(start) if length == 1) == 2   # they shared decode steps
    alone = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=48, temperature=0,
                                      frequency_penalty=1.5, presence_penalty=0.5).choices[0].text
    assert "".join(penalised) == alone


def test_apply_penalties_changes_only_the_penalised_rows():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    counts = torch.tensor([0, 2, 1, 0, 0, 0, 0, 0, 0, 3], dtype=torch.float32)
    params = [SamplingParams(max_tokens=1), SamplingParams(max_tokens=1, presence_penalty=0.5, frequency_penalty=-1.0),
              SamplingParams(max_tokens=1)]
    out = apply_penalties(logits, params, [None, counts, None])
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.allclose(out[1], logits[1] - 0.5 * (counts > 0) + counts)
    assert apply_penalties(logits, params, [None, None, None]) is logits


# ---- n -------------------------------------------------------------------------------------------


def test_n_choices_are_the_single_requests_seeded_seed_plus_i(app, tokenizer):
    client, passes = app
    start = len(passes.shapes)
    out = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=11, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    prompt_len = len(encode_prompt(tokenizer, prompt=PROMPT))
    assert passes.since(start)[0] == (1, prompt_len)     # the three choices share one prefill row
    singles = [client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=11 + i)
               for i in range(3)]
    assert [c.text for c in out.choices] == [s.choices[0].text for s in singles]
    assert len({c.text for c in out.choices}) > 1
    assert out.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert out.usage.prompt_tokens == prompt_len
    again = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=11, n=3)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]


def test_n_with_several_prompts_and_in_chat(app, tokenizer):
    client, _ = app
    prompts = ["Hello there", "The cat"]
    out = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, temperature=0.9, seed=4, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for k, choice in enumerate(out.choices):   # prompt k // 2, choice k % 2
        single = client.completions.create(model="tiny", prompt=prompts[k // 2], max_tokens=8, temperature=0.9,
                                           seed=4 + k % 2)
        assert choice.text == single.choices[0].text
    assert out.usage.prompt_tokens == sum(len(encode_prompt(tokenizer, prompt=p)) for p in prompts)
    chat = client.chat.completions.create(model=ADAPTER, messages=CHAT, max_tokens=10, temperature=1.2, seed=2**64 - 1,
                                          n=2, logprobs=True)
    wrapped = client.chat.completions.create(model=ADAPTER, messages=CHAT, max_tokens=10, temperature=1.2, seed=0)
    assert chat.choices[1].message.content == wrapped.choices[0].message.content   # seed + 1 modulo 2**64
    assert chat.usage.completion_tokens == sum(len(c.logprobs.content) for c in chat.choices)


def test_streamed_n_interleaves_the_choices_by_index(app):
    client, _ = app
    kwargs = dict(model=ADAPTER, messages=CHAT, max_tokens=16, temperature=1.0, seed=5, n=3)
    whole = client.chat.completions.create(**kwargs)
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})]
    order = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.content]
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(3)]
    assert texts == [c.message.content for c in whole.choices]
    assert order != sorted(order)                        # interleaved, not one choice after the other
    assert {c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role} == {0, 1, 2}
    reasons = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and
               c.choices[0].finish_reason}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


# ---- errors --------------------------------------------------------------------------------------


def _refused(call) -> tuple[str, str]:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    return info.value.body["param"], info.value.body["message"]


@pytest.mark.parametrize("kwargs, param, message", [
    (dict(presence_penalty=2.5), "presence_penalty", "presence_penalty: Input should be less than or equal to 2"),
    (dict(frequency_penalty=-3), "frequency_penalty",
     "frequency_penalty: Input should be greater than or equal to -2"),
    (dict(logprobs=6), "logprobs", "logprobs: Input should be less than or equal to 5"),
    (dict(logprobs=-1), "logprobs", "logprobs: Input should be greater than or equal to 0"),
    (dict(logprobs=True), "logprobs", "logprobs: Input should be a valid integer"),
    (dict(n=0), "n", "n: Input should be greater than or equal to 1"),
    (dict(n=MAX_BATCH + 1), "n", f"1 prompt(s) x n={MAX_BATCH + 1} = {MAX_BATCH + 1} choices in one request; "
                                 f"at most {MAX_BATCH} (max_batch_size)"),
    (dict(prompt=["a", "b", "c"], n=3), "n", f"3 prompt(s) x n=3 = 9 choices in one request; at most {MAX_BATCH} "
                                             "(max_batch_size)"),
    (dict(best_of=2), "best_of", "best_of is not supported by lorakit serve; leave it out"),
    (dict(echo=True), "echo", "echo is not supported by lorakit serve; leave it out"),
    (dict(logit_bias={"5": 1.0}), "logit_bias", "logit_bias is not supported by lorakit serve; leave it out"),
])
def test_completion_parameters_out_of_range_are_400_with_exact_messages(app, kwargs, param, message):
    client, _ = app
    assert _refused(lambda: client.completions.create(**{"model": "tiny", "prompt": "Hi", "max_tokens": 2,
                                                         **kwargs})) == (param, message)


@pytest.mark.parametrize("kwargs, param, message", [
    (dict(logprobs=True, top_logprobs=21), "top_logprobs", "top_logprobs: Input should be less than or equal to 20"),
    (dict(top_logprobs=2), "top_logprobs", "top_logprobs needs logprobs: true"),
    (dict(presence_penalty=-2.01), "presence_penalty",
     "presence_penalty: Input should be greater than or equal to -2"),
])
def test_chat_parameters_out_of_range_are_400_with_exact_messages(app, kwargs, param, message):
    client, _ = app
    assert _refused(lambda: client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2,
                                                           **kwargs)) == (param, message)


def test_in_process_the_engine_gives_logprobs_and_refuses_values_outside_the_range(serve_files, tokenizer):
    engine = Engine(served_model(serve_files, []), tokenizer).start()
    try:
        out = engine.generate(encode_prompt(tokenizer, prompt=PROMPT), SamplingParams(max_tokens=6, temperature=0,
                                                                                     logprobs=2))
    finally:
        engine.stop(timeout=5)
    assert len(out.logprobs) == out.completion_tokens == 6
    assert "".join(e.chosen.token for e in out.logprobs) == out.text
    assert all(len(e.top) == 2 and e.top[0] == e.chosen for e in out.logprobs)
    for params, message in [(SamplingParams(max_tokens=2, frequency_penalty=2.5),
                             "frequency_penalty must be in [-2, 2], got 2.5"),
                            (SamplingParams(max_tokens=2, presence_penalty=float("nan")),
                             "presence_penalty must be in [-2, 2], got nan"),
                            (SamplingParams(max_tokens=2, logprobs=21), "logprobs must be in [0, 20], got 21")]:
        with pytest.raises(ServeError) as info:
            engine.submit([1, 2], params)
        assert str(info.value) == message
