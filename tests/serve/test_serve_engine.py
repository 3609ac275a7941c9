"""The batching engine in process, without HTTP: per-row adapters equal offline generate; rows
join at the next step and leave when done; the queue is bounded; cancellation, a failing forward
pass, adapter load / unload between steps, and stopping. A `slow` model (a sleep in every
forward) makes the timing of joins and unloads certain."""

from __future__ import annotations

import queue
import threading
import time

import pytest
from serve_support import ADAPTERS, MAX_TOKENS, PROMPTS, long_case, served_model, slowed
from tiny_models import tiny_model
from transformers import LlamaForCausalLM

import lorakit as lk
from lorakit.builtin import build_tokenizer
from lorakit.errors import LoraError
from lorakit.model_io import encode_prompt
from lorakit.serve import Engine, SamplingParams, ServeConfig, ServeError
from lorakit.serve.engine import Delta, Failed, Finished, Started

GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


class Recorder:
    """A sink that keeps every event with the batch size the engine had when it was sent."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.events, self.done = engine, [], threading.Event()

    def __call__(self, event) -> None:
        self.events.append((event, len(self.engine._rows)))
        if isinstance(event, (Finished, Failed)):
            self.done.set()

    def text(self) -> str:
        return "".join(e.text for e, _ in self.events if isinstance(e, Delta))

    def deltas(self) -> int:
        return sum(isinstance(e, Delta) for e, _ in self.events)

    def wait_deltas(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.deltas() < n:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.005)

    def final(self):
        assert self.done.wait(60)
        return self.events[-1][0]


@pytest.fixture
def engines():
    made = []
    yield made.append
    for engine in made:
        engine.stop(timeout=5)


def test_mixed_adapter_batches_equal_offline_generate(serve_files, tokenizer, refs, engines):
    model = served_model(serve_files)
    engine = Engine(model, tokenizer, ServeConfig(max_batch_size=6))
    engines(engine)
    engine.start()
    cases = [(a, p) for p in PROMPTS[:4] for a in [*ADAPTERS[:4], None]]   # 20 requests, batches of 6
    results = {}

    def run(adapter, prompt):
        results[(adapter, prompt)] = engine.generate(encode_prompt(tokenizer, prompt), GREEDY, adapter or "__base__")

    threads = [threading.Thread(target=run, args=case) for case in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for case in cases:
        got, ref = results[case], refs[case]
        assert (got.text, got.completion_tokens) == (ref["text"], ref["tokens"]), case
        assert got.finish_reason == ("stop" if ref["eos"] else "length")
        assert got.adapter == (case[0] or "__base__")


def test_a_request_joins_at_the_next_step_and_a_finished_one_leaves(serve_files, tokenizer, refs, engines):
    model = slowed(served_model(serve_files), 0.01)
    engine = Engine(model, tokenizer)
    engines(engine)
    engine.start()
    (a, pa), (b, pb) = long_case(refs, ADAPTERS[:2]), long_case(refs, ADAPTERS[2:4])
    first, second = Recorder(engine), Recorder(engine)
    engine.submit(encode_prompt(tokenizer, pa), SamplingParams(max_tokens=10, temperature=0), a, first)
    first.wait_deltas(3)
    engine.submit(encode_prompt(tokenizer, pb), GREEDY, b, second)
    assert isinstance(second.final(), Finished) and isinstance(first.final(), Finished)
    assert first.text() == refs[(a, pa)]["text"][:10]          # one byte per token
    assert second.text() == refs[(b, pb)]["text"]
    # the second joined while the first was running: the first then decoded in a batch of two
    sizes = [size for event, size in first.events if isinstance(event, Delta)]
    assert max(sizes[:3]) == 1 and 2 in sizes[3:]
    # the first left after its 10 tokens: the second went on alone, in a cache cut to its own length
    assert [size for event, size in second.events if isinstance(event, Delta)][-1] == 1
    assert engine._rows == [] and engine._cache is None


def test_the_queue_is_bounded_and_a_cancelled_request_leaves(serve_files, tokenizer, engines):
    engine = Engine(slowed(served_model(serve_files), 0.02), tokenizer, ServeConfig(max_batch_size=1, max_queue=1))
    engine.eos_ids = set()   # the requests cannot end early by themselves
    engines(engine)
    engine.start()
    ids = encode_prompt(tokenizer, PROMPTS[0])
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=0)
    running, waiting = Recorder(engine), Recorder(engine)
    request = engine.submit(ids, params, "a0", running)
    running.wait_deltas(1)
    second = engine.submit(ids, params, "a1", waiting)          # waits: the batch is full
    with pytest.raises(ServeError) as info:
        engine.submit(ids, params, "a2")
    assert info.value.status == 429 and "1 requests are waiting (max_queue 1)" in str(info.value)
    request.cancel()                                            # frees the batch slot: the waiting one starts
    waiting.wait_deltas(1)
    assert not any(isinstance(e, (Finished, Failed)) for e, _ in running.events)
    assert isinstance(waiting.events[0][0], Started) and waiting.events[0][0].adapter == "a1"
    second.cancel()


def test_a_failing_forward_fails_its_requests_and_the_engine_carries_on(serve_files, tokenizer, refs, engines):
    engine = Engine(slowed(served_model(serve_files), 0.0, fail_on={3}), tokenizer)
    engines(engine)
    engine.start()
    broken = Recorder(engine)
    engine.submit(encode_prompt(tokenizer, PROMPTS[3]), GREEDY, "a0", broken)
    final = broken.final()
    assert isinstance(final, Failed) and final.error.status == 500
    assert "simulated device failure" in str(final.error)
    assert engine.alive
    after = engine.generate(encode_prompt(tokenizer, PROMPTS[2]), GREEDY, "a1")
    assert after.text == refs[("a1", PROMPTS[2])]["text"]


def test_unloading_waits_for_the_requests_that_use_the_adapter(serve_files, tokenizer, refs, engines):
    model = slowed(served_model(serve_files), 0.01)
    engine = Engine(model, tokenizer)
    engines(engine)
    engine.start()
    adapter, prompt = long_case(refs, ADAPTERS[:4])
    user = Recorder(engine)
    engine.submit(encode_prompt(tokenizer, prompt), GREEDY, adapter, user)
    user.wait_deltas(2)
    gone = engine.unload_adapter(adapter)
    with pytest.raises(ServeError) as info:
        engine.submit(encode_prompt(tokenizer, prompt), GREEDY, adapter)
    assert info.value.status == 404 and "being unloaded" in str(info.value)
    assert not gone.done()
    assert isinstance(user.final(), Finished) and user.text() == refs[(adapter, prompt)]["text"]
    gone.result(timeout=30)
    assert adapter not in engine.adapters and adapter not in lk.list_adapters(model)


def test_loading_between_steps_serves_the_new_adapter_and_refuses_dora(serve_files, tokenizer, refs, engines,
                                                                     tmp_path):
    model = served_model(serve_files, ADAPTERS[:2])
    engine = Engine(model, tokenizer)
    engines(engine)
    engine.start()
    engine.load_adapter("hot", str(serve_files["staging"] / "hot")).result(timeout=30)
    assert engine.adapters == ("a0", "a1", "hot")
    got = engine.generate(encode_prompt(tokenizer, PROMPTS[0]), GREEDY, "hot")
    assert got.text == refs[("hot", PROMPTS[0])]["text"]
    with pytest.raises(ServeError) as info:
        engine.load_adapter("hot", str(serve_files["staging"] / "hot"))
    assert info.value.status == 409

    donor = LlamaForCausalLM.from_pretrained(serve_files["model"])
    lk.add_adapter(donor, lk.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), name="dora")
    lk.save_adapter(donor, tmp_path / "dora", name="dora")
    with pytest.raises(ServeError) as info:
        engine.load_adapter("dora", str(tmp_path / "dora")).result(timeout=30)
    assert info.value.status == 400 and "does not support DoRA" in str(info.value)
    assert lk.list_adapters(model) == ["a0", "a1", "hot"]   # rolled back
    with pytest.raises(ServeError) as info:
        engine.load_adapter("nothing", str(tmp_path / "nothing")).result(timeout=30)
    assert info.value.status == 404


def test_stop_finishes_running_requests_then_refuses_new_ones(serve_files, tokenizer, refs, engines):
    engine = Engine(slowed(served_model(serve_files), 0.01), tokenizer)
    engine.start()
    adapter, prompt = long_case(refs, ADAPTERS[:4])
    running = Recorder(engine)
    engine.submit(encode_prompt(tokenizer, prompt), GREEDY, adapter, running)
    running.wait_deltas(1)
    engine.stop(timeout=60)
    assert isinstance(running.final(), Finished) and running.text() == refs[(adapter, prompt)]["text"]
    assert not engine.alive
    with pytest.raises(ServeError) as info:
        engine.submit(encode_prompt(tokenizer, prompt), GREEDY, adapter)
    assert info.value.status == 503


def test_stop_past_its_timeout_fails_what_is_left(serve_files, tokenizer):
    engine = Engine(slowed(served_model(serve_files), 0.05), tokenizer)
    engine.eos_ids = set()
    engine.start()
    running = Recorder(engine)
    engine.submit(encode_prompt(tokenizer, PROMPTS[0]), SamplingParams(max_tokens=100, temperature=1.0, seed=1),
                  "a0", running)
    running.wait_deltas(1)
    engine.stop(timeout=0.2)
    final = running.final()
    assert isinstance(final, Failed) and final.error.status == 503 and not engine.alive


def test_requests_over_the_limits_are_refused_at_submit(serve_files, tokenizer):
    engine = Engine(served_model(serve_files, []), tokenizer, ServeConfig(max_tokens=50, max_prompt_tokens=20))
    engine._accepting = True   # no thread: submit checks only
    cases = [
        (list(range(3, 24)), GREEDY, "__base__", 400, "the prompt is 21 tokens, more than this server's limit of 20"),
        ([5], SamplingParams(max_tokens=51), "__base__", 400, "max_tokens is 51, more than this server's limit of 50"),
        ([], GREEDY, "__base__", 400, "the prompt is empty"),
        ([5, 263], GREEDY, "__base__", 400, "token ids must be integers in [0, 263)"),
        ([5], GREEDY, "a0", 404, "model 'a0' does not exist"),
        ([5], GREEDY, "auto", 400, "has none; start it with --router"),
    ]
    for ids, params, adapter, status, words in cases:
        with pytest.raises(ServeError) as info:
            engine.submit(ids, params, adapter)
        assert info.value.status == status and words in str(info.value)
    small = Engine(served_model(serve_files, []), tokenizer, ServeConfig(max_tokens=300))
    small._accepting = True
    with pytest.raises(ServeError) as info:
        small.submit([5] * 10, SamplingParams(max_tokens=250), "__base__")
    assert "context is 256 tokens, but the prompt (10) plus max_tokens (250) need 260" in str(info.value)
    assert small.default_max_tokens(10) == 246


def test_sliding_window_models_are_refused(tokenizer):
    mistral = tiny_model("mistral", seed=None, vocab=len(tokenizer), pad_token_id=None, sliding_window=8)
    with pytest.raises(LoraError, match="DynamicSlidingWindowLayer"):
        Engine(mistral, tokenizer)


def test_seeded_sampling_does_not_depend_on_the_batch(serve_files, tokenizer, engines):
    """The same seeded request alone and among others: its own generator, the same text."""
    engine = Engine(served_model(serve_files), tokenizer)
    engines(engine)
    engine.start()
    ids, params = encode_prompt(tokenizer, PROMPTS[1]), SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9,
                                                                       seed=42)
    alone = engine.generate(ids, params, "a3").text
    events: queue.Queue = queue.Queue()
    others = [engine.submit(encode_prompt(tokenizer, p), SamplingParams(max_tokens=12, temperature=1.0), a, events.put)
              for a, p in zip(ADAPTERS[:4], PROMPTS[4:], strict=True)]
    together = engine.generate(ids, params, "a3").text
    assert together == alone
    for request in others:
        request.cancel()


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_batch_size=0), "max_batch_size must be an integer >= 1, got 0"),
    (dict(max_queue=2.5), "max_queue must be an integer >= 1, got 2.5"),
    (dict(request_timeout_s=0), "request_timeout_s must be a number > 0 (seconds), got 0"),
    (dict(shutdown_timeout_s=float("inf")), "shutdown_timeout_s must be a number > 0"),
    (dict(max_prompt_tokens=5000), "max_prefill_tokens (4096) must be at least max_prompt_tokens (5000)"),
])
def test_serve_config_is_validated_once(kwargs, words):
    with pytest.raises(LoraError) as info:
        ServeConfig(**kwargs)
    assert words in str(info.value)


def test_the_cli_limit_flags_are_the_config_fields(capsys):
    from lorakit import cli

    assert cli.main(["serve", "--model", "lorakit/tiny-llama", "--max-batch-size", "0"]) == 2
    assert "max_batch_size must be an integer >= 1, got 0" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["serve", "--model", "m", "--request-timeout-s", "2.5", "--max-queue", "7"])
    assert (args.request_timeout_s, args.max_queue, args.max_tokens) == (2.5, 7, ServeConfig().max_tokens)
