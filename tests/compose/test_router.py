"""Semantic routing (lorakit.compose.router) on the built-in tiny model and its four tasks.

The adapters here are small random ones (`init_lora_weights=False`): routing embeds with the
adapters disabled, so what they compute only matters for the generation test, where random
adapters make every row's output depend on which adapter it ran with."""

import json
import math
import random
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama

import lorakit as lk
from lorakit.builtin import builtin_data_files, builtin_model_dir
from lorakit.builtin.tasks import task_of
from lorakit.compose.router import Router, fit_threshold
from lorakit.model_io import load_model, load_tokenizer

TASKS = ["sentiment", "compare", "parity", "count"]
# Prompts unlike any built-in task. Measured on the built-in model with 16 examples per task: their
# best cosine with a task centroid is 0.859-0.945, while every held-out task prompt scores at least
# 0.955 with its own task (a thin margin: the base model is no sentence embedder; the benchmark has
# the figures with fitted thresholds).
OFF_TOPIC = [
    "What is the capital of France?", "Write a poem about the sea.", "Translate 'hello' into German.",
    "Tell me a joke about cats.", "Explain how a rainbow forms.", "Who painted the Mona Lisa?",
    "Give me a recipe for pancakes.", "Why is the sky blue?", "Summarise the plot of Hamlet.",
    "What should I pack for a trip to Norway?", "Describe your favourite season.", "How do bees make honey?",
    "Name three famous scientists.", "What time zone is Tokyo in?", "Recommend a book for a long flight.",
    "How do I tie a bowline knot?",
]


@pytest.fixture(scope="module")
def lib():
    """(model, tokenizer): the built-in model with one small random adapter per task."""
    torch.manual_seed(0)
    model = load_model(str(builtin_model_dir()), dtype="fp32", device="cpu")
    tokenizer = load_tokenizer(str(builtin_model_dir()))
    for name in TASKS:
        lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False), name=name)
    return model, tokenizer


@pytest.fixture(scope="module")
def data():
    """{"train": {task: prompts}, "eval": {task: prompts}} from the built-in dataset."""
    files = builtin_data_files()
    out = {}
    for split in ("train", "eval"):
        prompts = [json.loads(line)["messages"][0]["content"] for line in open(files[split], encoding="utf-8")]
        out[split] = {t: [p for p in prompts if task_of(p) == t] for t in TASKS}
    return out


def make_router(lib, data, n_examples=8, **kwargs) -> Router:
    router = Router(*lib, **kwargs)
    for t in TASKS:
        router.register(t, examples=data["train"][t][:n_examples])
    return router


def held_out(data, per_task=50):
    prompts = [p for t in TASKS for p in data["eval"][t][:per_task]]
    return prompts, [task_of(p) for p in prompts]


def embed_alone(model, tokenizer, prompt):
    """Closed form of the "base" embedder for one prompt: chat template, the base model, mean of the
    last hidden state over all tokens, unit length."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad(), lk.disable_adapters(model):
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]   # (T, hidden)
    return torch.nn.functional.normalize(hidden.mean(0), dim=0)


# ---- routing --------------------------------------------------------------------------------


def test_routes_held_out_prompts_to_their_task(lib, data):
    router = make_router(lib, data)
    prompts, labels = held_out(data)
    chosen = router.choose(prompts)
    accuracy = sum(c == x for c, x in zip(chosen, labels, strict=True)) / len(labels)
    assert accuracy >= 0.95   # measured: 1.000 (200/200) with 8 train examples per task


def test_scores_are_cosines_with_the_centroids(lib, data):
    model, tokenizer = lib
    router = make_router(lib, data, n_examples=3)
    prompts = [data["eval"]["count"][0], data["eval"]["sentiment"][0], data["eval"]["parity"][0]]   # unequal lengths
    centroids = torch.stack([torch.nn.functional.normalize(torch.stack(
        [embed_alone(model, tokenizer, p) for p in data["train"][t][:3]]).mean(0), dim=0) for t in TASKS])
    expected = torch.stack([embed_alone(model, tokenizer, p) for p in prompts]) @ centroids.T   # (3, 4)
    lk.set_active_adapters(model, ["count"])   # embeddings come from the base model whatever is active
    model.train()
    try:
        got = router.scores(prompts)
        assert model.training   # the embedder switches to eval mode only while it runs
    finally:
        model.eval()
        lk.set_active_adapters(model, TASKS[0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_route_ranks_top_k_and_gates_on_the_best_adapters_threshold(lib, data):
    router = make_router(lib, data, top_k=2)
    prompt = data["eval"]["parity"][0]
    scores = router.scores([prompt])[0]
    order = scores.argsort(descending=True).tolist()
    best, second = TASKS[order[0]], TASKS[order[1]]
    assert best == "parity"
    assert router.route([prompt]) == [[(best, scores[order[0]].item()), (second, scores[order[1]].item())]]

    router.set_threshold(second, scores[order[1]].item() + 1e-4)   # the runner-up is left out
    assert router.route([prompt]) == [[(best, scores[order[0]].item())]]
    router.set_threshold(best, scores[order[0]].item() - 1e-4)
    assert router.choose([prompt]) == ["parity"]
    router.set_threshold(best, scores[order[0]].item() + 1e-4)
    router.set_threshold(second, -1.0)   # passes, but a prompt whose best match is unsure goes to the base
    assert router.route([prompt]) == [[]]
    assert router.choose([prompt]) == ["__base__"]


def test_prompts_unlike_every_adapter_fall_back_to_the_base(lib, data):
    router = make_router(lib, data, n_examples=16, threshold=0.95)
    assert router.choose(OFF_TOPIC) == ["__base__"] * len(OFF_TOPIC)
    prompts, labels = held_out(data, per_task=10)
    assert router.choose(prompts) == labels


# ---- fit ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scores, wanted, current, expected", [
    ([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 0], 0.0, 0.75),                    # halfway between 0.8 and 0.7
    ([0.6, 0.9, 0.7, 0.8], [0, 1, 0, 1], 0.0, 0.75),                    # order does not matter
    ([0.9, 0.8], [1, 1], 0.5, 0.5),                                      # all accepted: keep a lower threshold
    ([0.9, 0.8], [1, 1], 0.85, 0.8),                                     # ... or come down to the lowest
    ([0.9, 0.8], [0, 0], 0.95, 0.95),                                    # all rejected: keep a higher one
    ([0.9, 0.8], [0, 0], 0.0, math.nextafter(0.9, math.inf)),            # ... or go just above the highest
    ([0.9, 0.8, 0.7], [1, 0, 1], 0.0, 0.85),                             # tie (2 right): the higher threshold
    ([0.9, 0.8, 0.7], [1, -1, 0], 0.0, 0.85),                            # tie: do not let the -1 through
    ([0.8, 0.8, 0.5], [1, 0, 0], 0.0, math.nextafter(0.8, math.inf)),    # equal scores go together
])
def test_fit_threshold_closed_form(scores, wanted, current, expected):
    assert fit_threshold(scores, wanted, current) == pytest.approx(expected, rel=1e-15)


def test_fit_threshold_is_optimal_against_brute_force():
    def objective(scores, wanted, t):   # (prompts decided right, -(wrong-adapter prompts let through))
        right = sum((s >= t) == (w == 1) for s, w in zip(scores, wanted, strict=True) if w != -1)
        return right, -sum(s >= t for s, w in zip(scores, wanted, strict=True) if w == -1)

    rng = random.Random(0)
    candidates = [0.0, 0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65]   # one threshold in every gap
    for _ in range(200):
        n = rng.randint(1, 8)
        scores = [rng.choice([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) for _ in range(n)]   # with repeats
        wanted = [rng.choice([1, 0, -1]) for _ in range(n)]
        t = fit_threshold(scores, wanted, 0.0)
        assert objective(scores, wanted, t) == max(objective(scores, wanted, c) for c in candidates)


def test_fit_learns_thresholds_that_separate_a_labelled_set(lib, data):
    router = make_router(lib, data)
    prompts, labels = held_out(data, per_task=25)
    fit_prompts, fit_labels = prompts + OFF_TOPIC[::2], labels + ["__base__"] * len(OFF_TOPIC[::2])
    result = router.fit(fit_prompts, fit_labels)

    # what it claims, measured with choose
    chosen = router.choose(fit_prompts)
    assert result.accuracy == sum(c == x for c, x in zip(chosen, fit_labels, strict=True)) / len(fit_labels)
    assert result.accuracy_before == 100 / 108   # threshold 0: every off-topic prompt went to an adapter
    assert result.accuracy == 1.0
    assert result.n == 108 and result.thresholds == router.thresholds
    # no single threshold change does better on the labelled set
    scores = router.scores(fit_prompts)
    for name in TASKS:
        kept = router.thresholds[name]
        for candidate in scores[:, TASKS.index(name)].tolist():
            router.set_threshold(name, candidate)
            assert router._accuracy(scores, fit_labels) <= result.accuracy
        router.set_threshold(name, kept)
    # and it holds on prompts it did not see
    test_prompts = [p for t in TASKS for p in data["eval"][t][25:]] + OFF_TOPIC[1::2]
    test_labels = [task_of(p) for t in TASKS for p in data["eval"][t][25:]] + ["__base__"] * len(OFF_TOPIC[1::2])
    accuracy = sum(c == x for c, x in zip(router.choose(test_prompts), test_labels, strict=True)) / len(test_labels)
    # measured: 0.981 (106/108). No off-topic prompt of the fit half had compare or parity as its
    # best match, so their thresholds stay at 0 and "Why is the sky blue?" still goes to compare.
    assert accuracy >= 0.95


# ---- files ----------------------------------------------------------------------------------


def test_save_load_round_trip_routes_identically(lib, data, tmp_path):
    router = make_router(lib, data, top_k=3, chat_template=True, batch_size=7)
    router.unregister("sentiment")
    router.register("sentiment", description="Is a restaurant or hotel review positive or negative?",
                    examples=data["train"]["sentiment"][:4], threshold=0.5)
    router.set_threshold("count", 0.97)
    router.save(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "router.json").read_text())
    assert meta["format"] == "lorakit-router" and meta["version"] == 1 and meta["dim"] == 128
    assert meta["config"] == {"embedder": "base", "top_k": 3, "threshold": 0.0, "chat_template": True,
                              "max_length": 512, "batch_size": 7}
    assert [a["name"] for a in meta["adapters"]] == ["compare", "parity", "count", "sentiment"]
    tensors = load_file(tmp_path / "r" / "router.safetensors")
    assert sorted(tensors) == ["probe", "refs.compare", "refs.count", "refs.parity", "refs.sentiment"]
    assert tensors["refs.sentiment"].shape == (5, 128)   # description + 4 examples

    loaded = Router.load(tmp_path / "r", *lib)
    assert loaded.config == router.config and loaded.thresholds == router.thresholds
    prompts, _ = held_out(data, per_task=5)
    assert loaded.route(prompts + OFF_TOPIC[:4]) == router.route(prompts + OFF_TOPIC[:4])


def test_load_rejects_a_model_that_embeds_differently(lib, data, tmp_path):
    _, tokenizer = lib
    make_router(lib, data, n_examples=2).save(tmp_path / "r")
    narrow = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)   # width 32
    with pytest.raises(lk.AdapterFileError) as e:
        Router.load(tmp_path / "r", narrow, tokenizer)
    assert str(e.value) == (
        f"{tmp_path / 'r'} holds 128-dimensional embeddings (made with {builtin_model_dir()}, embedder 'base') but "
        "this embedder gives 32: load the router with the model it was saved with, or register the adapters again "
        "with this one"
    )
    other = load_model(str(builtin_model_dir()), dtype="fp32", device="cpu")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    with pytest.raises(lk.AdapterFileError, match=r"was saved with an embedder that embeds differently from this one "
                                                  r"\(probe cosine 0\.\d{4} < 0\.99; saved with "):
        Router.load(tmp_path / "r", other, tokenizer)


def test_load_rejects_missing_and_corrupt_files(lib, data, tmp_path):
    d = tmp_path / "r"
    make_router(lib, data, n_examples=2).save(d)
    config, weights = d / "router.json", d / "router.safetensors"
    good_config, good_weights = config.read_text(), weights.read_bytes()

    with pytest.raises(FileNotFoundError, match=f"^router directory {tmp_path / 'nope'} does not exist$"):
        Router.load(tmp_path / "nope", *lib)
    weights.unlink()
    with pytest.raises(FileNotFoundError) as e:
        Router.load(d, *lib)
    assert str(e.value) == f"{weights} not found: a router directory holds router.json and router.safetensors"
    weights.write_bytes(good_weights[:100])
    with pytest.raises(lk.AdapterFileError, match=f"^{weights} is truncated or corrupt and cannot be read as "
                                                  "safetensors: "):
        Router.load(d, *lib)
    weights.write_bytes(good_weights)

    config.write_text(good_config[:50])
    with pytest.raises(lk.AdapterFileError, match=rf"^{config}:\d+: not valid JSON \("):
        Router.load(d, *lib)
    meta = json.loads(good_config)
    cases = [
        ({**meta, "format": "other"}, f'{config} is not a lorakit router file (no "format": "lorakit-router")'),
        ({**meta, "version": 9}, f"{config} has router format version 9; this lorakit reads version 1"),
        ({**meta, "adapters": [{"name": "x"}]},
         f"{config} is malformed: it needs config (object), dim (int) and adapters (a list of {{name, description, "
         "examples, threshold} with distinct names); save the router again"),
        ({**meta, "config": {**meta["config"], "top_kk": 2}},
         f"{config}: unknown config key 'config.top_kk'; did you mean 'config.top_k'?"),
        ({**meta, "config": {**meta["config"], "top_k": 0}}, f"{config}: top_k must be an integer >= 1, got 0"),
        ({**meta, "adapters": meta["adapters"][1:]},
         f"{weights} does not match {config}: missing [], unexpected ['refs.sentiment']; the two files come from "
         "different saves, save the router again"),
        ({**meta, "adapters": [{**meta["adapters"][0], "examples": ["a", "b", "c"]}] + meta["adapters"][1:]},
         f"{weights}: refs.sentiment has shape (2, 128), {config} implies (3, 128); the two files come from "
         "different saves, save the router again"),
    ]
    for bad, message in cases:
        config.write_text(json.dumps(bad))
        with pytest.raises(lk.AdapterFileError) as e:
            Router.load(d, *lib)
        assert str(e.value) == message
    config.write_text(good_config)
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k != "probe"}, weights)
    with pytest.raises(lk.AdapterFileError) as e:
        Router.load(d, *lib)
    assert str(e.value) == (f"{weights} does not match {config}: missing ['probe'], unexpected []; the two files "
                            "come from different saves, save the router again")


# ---- bad input ------------------------------------------------------------------------------


def test_bad_input_errors(lib, data):
    model, tokenizer = lib
    router = Router(model, tokenizer)
    with pytest.raises(lk.AdapterStateError) as e:
        router.route(["Is 3 even or odd?"])
    assert str(e.value) == ("the router has no adapters; register some first with "
                            "router.register(name, description=..., examples=[...])")
    router.register("parity", description="Is a number even or odd?")
    router.register("ghost", examples=["Boo?"])
    with pytest.raises(lk.AdapterStateError) as e:
        router.choose(["Is 3 even or odd?"])
    assert str(e.value) == (f"router adapters ['ghost'] are not on the model (its adapters: {sorted(TASKS)}); load "
                            "them with lorakit.load_adapter(model, path, name=...) or router.unregister them")
    router.unregister("ghost")
    assert router.choose(["Is 3 even or odd?"]) == ["parity"]

    cases = [
        (lambda: router.register("parity", examples=["x"]), lk.AdapterStateError,
         "adapter 'parity' is already registered; router.unregister('parity') first to replace it"),
        (lambda: router.register("__base__", examples=["x"]), lk.AdapterStateError,
         "adapter name '__base__' is not valid: use an adapter name of the model (letters, digits, '_' and '-'), "
         "not '__base__', which means 'no adapter'"),
        (lambda: router.register("count"), lk.LoraError,
         "register 'count' with a description or examples (or both): the router matches prompts against them"),
        (lambda: router.register("count", examples="How many words: a b?"), lk.LoraError,
         "examples of 'count' must be a list of strings, got one string; wrap it in a list"),
        (lambda: router.register("count", examples=["ok", " "]), lk.LoraError,
         "examples of 'count' must be non-empty strings, got ' '"),
        (lambda: router.register("count", examples=["x"], threshold=float("nan")), lk.ConfigError,
         "threshold of 'count' must be a finite number (a cosine, typically in [-1, 1]), got nan"),
        (lambda: router.route("Is 3 even or odd?"), lk.LoraError,
         "prompts must be a list of strings, got one string; wrap it in a list"),
        (lambda: router.set_threshold("count", 0.5), lk.AdapterStateError,
         "adapter 'count' is not registered; registered adapters: ['parity']"),
        (lambda: router.fit(["Is 3 even or odd?"], ["count"]), lk.AdapterStateError,
         "labels ['count'] name no registered adapter; labels are adapter names (['parity']) or '__base__'"),
        (lambda: router.fit(["Is 3 even or odd?"], []), lk.LoraError,
         "fit got 1 prompts but 0 labels; give one label per prompt"),
        (lambda: Router(model, tokenizer, embedder="bert"), lk.ConfigError,
         "embedder must be 'base' or 'sentence-transformers:<model name or path>', got 'bert'"),
        (lambda: Router(model, tokenizer, top_k=0), lk.ConfigError, "top_k must be an integer >= 1, got 0"),
    ]
    for call, error, message in cases:
        with pytest.raises(error) as e:
            call()
        assert str(e.value) == message
    assert router.route([]) == []


def test_sentence_transformers_missing_is_a_clear_error(lib, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)   # import fails
    with pytest.raises(lk.ConfigError) as e:
        Router(*lib, embedder="sentence-transformers:all-MiniLM-L6-v2")
    assert str(e.value) == ("embedder 'sentence-transformers:all-MiniLM-L6-v2' needs the sentence-transformers "
                            "package: pip install 'lorakit[routing]'")


def test_sentence_transformers_embedder_matches_the_base_embedder(lib, data, tmp_path):
    """A SentenceTransformer built offline from the built-in model directory (transformer + mean
    pooling, on plain text: sentence-transformers would otherwise apply the chat template itself,
    without the generation prompt) embeds exactly as the "base" embedder without the template."""
    pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed "
                                                        "(pip install 'lorakit[routing]')")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(str(builtin_model_dir()), module_output_name="token_embeddings",
                                     modality_config={"text": {"method": "forward",
                                                               "method_output_name": "last_hidden_state"}})
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(tmp_path / "st"))

    via_st = make_router(lib, data, n_examples=4, embedder=f"sentence-transformers:{tmp_path / 'st'}")
    via_base = make_router(lib, data, n_examples=4, chat_template=False)
    prompts, _ = held_out(data, per_task=5)
    torch.testing.assert_close(via_st.scores(prompts), via_base.scores(prompts), atol=1e-5, rtol=0)
    assert via_st.choose(prompts) == via_base.choose(prompts)


# ---- routed generation ----------------------------------------------------------------------


def test_routed_generation_equals_each_prompt_alone_with_its_adapter(lib, data):
    model, tokenizer = lib
    router = make_router(lib, data, threshold=0.95)
    prompts = [data["eval"][t][1] for t in TASKS] + OFF_TOPIC[:2] + [data["eval"]["count"][2]]
    got = router.generate(prompts, max_new_tokens=6, do_sample=False)
    assert [name for name, _ in got] == TASKS + ["__base__", "__base__", "count"]

    alone = []
    for prompt, (name, _) in zip(prompts, got, strict=True):
        ids = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True),
                        add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            if name == "__base__":
                with lk.disable_adapters(model):
                    out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
            else:
                lk.set_active_adapters(model, [name])
                out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
        alone.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    lk.set_active_adapters(model, TASKS[0])
    assert [text for _, text in got] == alone
    assert len(set(alone[:4])) == 4   # the adapters differ, so a row under the wrong adapter would show

    beams = router.generate(prompts[:2], max_new_tokens=2, num_beams=2, num_return_sequences=2)
    assert [name for name, _ in beams] == ["sentiment", "sentiment", "compare", "compare"]
