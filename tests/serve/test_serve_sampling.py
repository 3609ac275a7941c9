"""Token choice per row (greedy, temperature, top-p, seeds) against closed forms, and the text a
request releases: whole characters only, stop strings cut (even when split across tokens),
nothing held back at the end."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.builtin import build_tokenizer
from lorakit.serve.sampling import SamplingParams, TextStream, choose_tokens, make_generator


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()   # one token per byte


def _release(tokenizer, text: str, stop: tuple[str, ...] = (), end: bool = True) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    pieces = []
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        pieces.append(stream.add(token))
        if stream.stopped:
            break
    if end:
        pieces.append(stream.finish())
    return pieces, stream


def test_multibyte_characters_are_released_whole(tokenizer):
    pieces, _ = _release(tokenizer, "aé€b")               # 1 + 2 + 3 + 1 tokens
    assert "".join(pieces) == "aé€b"
    assert pieces[:7] == ["a", "", "é", "", "", "€", "b"]
    assert not any("\ufffd" in p for p in pieces)


def test_a_stop_string_split_across_tokens_is_held_back_and_cut(tokenizer):
    pieces, stream = _release(tokenizer, "abcENDxyz", ("END",))
    assert pieces == ["a", "b", "c", "", "", "", ""] and stream.stopped


def test_a_held_prefix_is_released_once_it_cannot_be_a_stop_string(tokenizer):
    pieces, stream = _release(tokenizer, "abENx", ("END",), end=False)
    assert pieces == ["a", "b", "", "", "ENx"] and not stream.stopped
    pieces, _ = _release(tokenizer, "abE", ("END",))
    assert pieces == ["a", "b", "", "E"]                  # the end of the request releases it


def test_the_earliest_of_several_stop_strings_wins(tokenizer):
    pieces, stream = _release(tokenizer, "axyq", ("xyz", "yq"))
    assert "".join(pieces) == "ax" and stream.stopped
    pieces, _ = _release(tokenizer, "abcd", ("abcd", "bc"))
    assert "".join(pieces) == "a"


def test_special_tokens_add_no_text(tokenizer):
    stream = TextStream(tokenizer, ())
    assert stream.add(tokenizer("h", add_special_tokens=False).input_ids[0]) == "h"
    assert stream.add(tokenizer.eos_token_id) == "" and stream.finish() == ""


def test_greedy_rows_take_the_first_maximum():
    logits = torch.tensor([[0.1, 2.0, 2.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    greedy = SamplingParams(max_tokens=1, temperature=0)
    assert choose_tokens(logits, [greedy, greedy], [None, None]) == [1, 0]


def _frequencies(logits: torch.Tensor, params: SamplingParams, draws: int = 4000) -> torch.Tensor:
    gen = make_generator(0, torch.device("cpu"))
    counts = torch.zeros(logits.shape[-1])
    for _ in range(draws):
        counts[choose_tokens(logits[None], [params], [gen])[0]] += 1
    return counts / draws


def test_top_p_keeps_the_smallest_set_reaching_p_then_renormalises():
    """p = [0.5, 0.3, 0.15, 0.05], top_p = 0.6: tokens 0 and 1 (mass before them 0 and 0.5 < 0.6),
    drawn with 0.5/0.8 and 0.3/0.8."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    freq = _frequencies(logits, SamplingParams(max_tokens=1, temperature=1.0, top_p=0.6))
    assert freq[2] == 0 and freq[3] == 0
    assert freq[0] == pytest.approx(0.625, abs=0.04)


def test_temperature_divides_the_logits():
    """p = [0.6, 0.4] at temperature 0.5 is proportional to [0.36, 0.16]."""
    logits = torch.tensor([0.6, 0.4]).log()
    freq = _frequencies(logits, SamplingParams(max_tokens=1, temperature=0.5))
    assert freq[0] == pytest.approx(0.36 / 0.52, abs=0.04)
    assert math.isclose(float(freq.sum()), 1.0)


def test_each_row_draws_from_its_own_generator():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    sampled = SamplingParams(max_tokens=1, temperature=1.0, seed=5)
    greedy = SamplingParams(max_tokens=1, temperature=0)
    cpu = torch.device("cpu")
    own = make_generator(5, cpu)
    alone = [choose_tokens(logits[1:2], [sampled], [own])[0] for _ in range(8)]   # 8 draws in a row
    gens = [make_generator(9, cpu), make_generator(5, cpu), None]
    mixed = [choose_tokens(logits, [SamplingParams(max_tokens=1, temperature=1.0, seed=9), sampled, greedy], gens)
             for _ in range(8)]
    assert [m[1] for m in mixed] == alone and len(set(alone)) > 1
    assert all(m[2] == int(logits[2].argmax()) for m in mixed)


def test_incremental_text_keeps_the_spaces_a_word_level_tokenizer_puts_before_words():
    """With a Metaspace tokenizer ("▁world"), decoding a token alone drops its leading space; the
    decode window keeps it, so the pieces add up to the whole decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁hello": 1, "▁world": 2, "▁foo": 3, "!": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw)
    ids = [1, 2, 4, 3, 2]
    stream = TextStream(tokenizer, ())
    pieces = [stream.add(t) for t in ids] + [stream.finish()]
    assert tokenizer.decode([2]) == "world"
    assert "".join(pieces) == tokenizer.decode(ids) == "hello world! foo world"
