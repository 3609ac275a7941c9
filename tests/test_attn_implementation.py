"""`model.attn_implementation` / `--attn-implementation`: auto (the default) lets transformers pick,
as a plain `from_pretrained` does, so Gemma 2 (which has no sdpa) loads in every verb; a named
implementation is passed through, and one the model refuses is a one-line error naming the fix."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, tiny_model_dir
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.builtin import build_tokenizer
from lorakit.cli import build_parser, main
from lorakit.errors import ConfigError
from lorakit.model_io import load_model
from lorakit.plan import make_plan
from lorakit.serve.server import load_server
from lorakit.train.config import load_config
from lorakit.verbs.generate import load_for_inference


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("gemma2")
    tiny_model_dir(path, tokenizer, arch="gemma2", positions=256)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("llama")
    tiny_model_dir(path, tokenizer, positions=256)
    return path


def _run(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def test_the_default_is_auto():
    assert load_config(None, []).model.attn_implementation == "auto"
    for verb in (["generate"], ["chat"], ["merge", "a", "--out", "b"], ["serve", "--model", "m"]):
        assert build_parser().parse_args(verb).attn_implementation == "auto"
    assert build_parser().parse_args(["eval"]).attn_implementation is None   # the config's
    with pytest.raises(ConfigError, match=r"^override 'model.attn_implementation=\"\"': model.attn_implementation "
                                          r"must be auto or a transformers attention implementation"):
        load_config(None, ['model.attn_implementation=""'])


def test_auto_is_what_transformers_picks(gemma2_dir, llama_dir):
    """transformers 5 picks sdpa where the model class supports it, else eager (Gemma 2)."""
    for path, expected in ((gemma2_dir, "eager"), (llama_dir, "sdpa")):
        assert load_model(str(path), device="cpu").config._attn_implementation == expected
        assert AutoModelForCausalLM.from_pretrained(path).config._attn_implementation == expected
    assert load_model(str(llama_dir), device="cpu", attn_implementation="eager").config._attn_implementation == "eager"


def test_an_implementation_the_model_refuses_names_the_fix(gemma2_dir):
    with pytest.raises(ConfigError, match=r"^cannot load model '.*' with attn_implementation 'sdpa': "
                                          r"Gemma2ForCausalLM does not support an attention implementation through "
                                          r"torch.nn.functional.scaled_dot_product_attention yet; use auto "
                                          r"\(transformers' choice for this model\) or eager$"):
        load_model(str(gemma2_dir), device="cpu", attn_implementation="sdpa")


def test_gemma2_generates_with_the_default(gemma2_dir):
    text = _run(["generate", "--model", str(gemma2_dir), "--prompt", "hello", "--max-new-tokens", "4",
                 "--device", "cpu", "--no-stream"])
    model, tokenizer = load_for_inference(str(gemma2_dir), [], device="cpu")
    ids = tokenizer("hello", return_tensors="pt").input_ids
    expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    assert text == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True) + "\n"


def test_gemma2_merges_with_the_default(gemma2_dir, tmp_path):
    model = load_model(str(gemma2_dir), dtype="fp32", device="cpu")
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                        base_model_name_or_path=str(gemma2_dir)))
    lk.save_adapter(model, tmp_path / "adapter")
    assert "merged model written to" in _run(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_named_implementation_reaches_every_verb(llama_dir, tmp_path, capsys, monkeypatch):
    """generate and chat (load_for_inference), serve (load_server), eval (the flag over the config's)."""
    monkeypatch.chdir(tmp_path)   # eval's default output.dir is relative: not a run `make demo` left here
    model, _ = load_for_inference(str(llama_dir), [], device="cpu", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    loaded = load_server(str(llama_dir), [], device="cpu", attn_implementation="eager")
    assert loaded.engine.model.config._attn_implementation == "eager"
    data = tmp_path / "eval.jsonl"
    data.write_text('{"text": "one two three four"}\n')

    def base(*overrides: str) -> list[str]:
        return ["eval", f"model.name_or_path={llama_dir}", "model.device=cpu", *overrides, "--data", str(data)]

    refused = (f"lorakit eval: error: cannot load model '{llama_dir}' with attn_implementation 'sdpaa': Specified "
               "`attn_implementation=\"sdpaa\"` is not supported; use auto (transformers' choice for this model) "
               "or eager\n")
    for argv in (base() + ["--attn-implementation", "sdpaa"], base("model.attn_implementation=sdpaa"),
                 base("model.attn_implementation=eager") + ["--attn-implementation", "sdpaa"]):
        assert main(argv) == 2
        assert capsys.readouterr().err == refused
    assert main(base("model.attn_implementation=sdpaa") + ["--attn-implementation", "eager"]) == 0


@pytest.mark.parametrize("arch, configured, planned", [("gemma2", "auto", "eager"), ("llama", "auto", "sdpa"),
                                                        ("llama", "eager", "eager")])
def test_plan_uses_the_implementation_training_gets(arch, configured, planned, tmp_path):
    tiny_model(arch).config.save_pretrained(tmp_path)
    plan = make_plan(load_config(None, [f"model.attn_implementation={configured}"]), model=str(tmp_path),
                     examples=100)
    assert plan.workload.attention == planned
