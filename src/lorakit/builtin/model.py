"""The built-in tiny model: a Llama-architecture causal LM and a byte-level tokenizer with a chat
template, built offline and saved as a normal Hugging Face model directory.

A randomly initialised model is a poor base for LoRA: the adapters leave the embeddings, the norms
and the output head frozen, and with a freshly initialised head (std 0.02, width 128) no hidden
state can make a logit larger than about 2.5, so the loss cannot fall below about 3 nats per token
whatever the adapters learn. So the first build also pretrains the model briefly (full weights,
~400k tokens of generic synthetic English, counting and spelling; about 20 s on two CPU cores) into
a base that writes English-like text but knows none of the built-in tasks (`tasks.py`).

It is built once into the cache (`$LORAKIT_CACHE`, default `~/.cache/lorakit`) and then loaded
through the same `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` path a
real model takes, so the built-in default exercises the real loading code.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..files import atomic_dir
from ..progress import progress, quiet_library_bars
from .names import BUILTIN_MODEL, cache_root

VERSION = "v2"   # bump when the model or tokenizer below changes: the cache key

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# One turn per block; the assistant's turn ends with <|end|>, which is also EOS, so response-only
# training teaches the model to stop.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (256) after the special tokens: any text round-trips, nothing is unknown."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>",
                                        pad_token="<pad>", model_max_length=1024)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A 4-layer, width-128 Llama (GQA) sized for training on two CPU cores in minutes."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


# Generic text for pretraining: simple sentences, counting, repeated lines, spelling. Nothing in it
# is one of the built-in tasks.
NOUNS = ("apple river stone cloud table light paper horse glass night water bread music tiger lemon chair "
         "house plant storm train ocean pilot candy grape honey juice knife lunch piano queen radio salad "
         "sheep snake spoon tower truck uncle wheel baker cabin eagle giant hotel mouse nurse otter robin "
         "tulip beach crown flame ghost heart garden window forest doctor farmer teacher child friend city "
         "road bridge market kitchen letter book song boat bird dog cat fish cake tea coffee soup room door "
         "car bike hill lake field island village castle king student artist driver cook waiter guest shop "
         "school park street").split()
ADJECTIVES = ("big small old new red blue green quiet loud happy sad bright dark warm cold soft hard fast "
              "slow tall short sweet bitter clean dirty fresh stale kind rude calm busy empty full heavy "
              "light young rich poor lovely awful great terrible friendly noisy tasty bland simple strange "
              "early late wet dry").split()
VERBS = ("sees finds likes takes makes wants needs opens closes paints builds visits follows carries "
         "watches cleans cooks sells buys helps calls reads writes holds moves pulls pushes brings").split()
INTRANSITIVE = "sleeps runs sings waits smiles falls grows shines laughs walks swims jumps rests works dreams".split()
NAMES = "Anna Ben Carla David Emma Felix Grace Hugo Iris Jack Kate Leo Mia Noah Olga Paul Rosa Sam Tara Uma".split()
ADVERBS = "slowly quickly quietly today again often never always happily sadly".split()
PLACES = ["in the garden", "at the market", "by the river", "near the school", "in the kitchen",
          "on the hill", "at night", "in the city", "by the lake", "in the morning"]


def _noun_phrase(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.2:
        return rng.choice(NAMES)
    if r < 0.6:
        return f"the {rng.choice(NOUNS)}"
    return f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"


def _sentence(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.35:
        s = f"{_noun_phrase(rng)} {rng.choice(VERBS)} {_noun_phrase(rng)}"
    elif r < 0.55:
        s = f"{_noun_phrase(rng)} {rng.choice(INTRANSITIVE)} {rng.choice(ADVERBS)}"
    elif r < 0.7:
        s = f"{_noun_phrase(rng)} was {rng.choice(ADJECTIVES)}"
    elif r < 0.8:
        s = f"{_noun_phrase(rng)} {rng.choice(INTRANSITIVE)} {rng.choice(PLACES)}"
    elif r < 0.9:
        s = f"{rng.choice(NAMES)} has {rng.randrange(2, 100)} {rng.choice(NOUNS)}s"
    else:
        s = f"{_noun_phrase(rng)} and {_noun_phrase(rng)} were {rng.choice(ADJECTIVES)}"
    return s[0].upper() + s[1:] + "."


def pretraining_document(rng: random.Random) -> str:
    """One short document of generic synthetic text."""
    r = rng.random()
    if r < 0.6:
        return " ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))
    if r < 0.75:
        start, step = rng.randrange(0, 90), rng.choice([1, 1, 2, 5, 10])
        return " ".join(str(start + i * step) for i in range(rng.randint(4, 10)))
    if r < 0.9:
        line = " ".join(rng.choice(NOUNS + ADJECTIVES) for _ in range(rng.randint(1, 5)))
        return f"{line}\n{line}"
    word = rng.choice(NOUNS)
    return f"{word}: " + " ".join(word)


# The pretraining recipe (full weights): 200 steps x 16 rows x 128 tokens = 410k tokens.
PRETRAIN = dict(steps=200, batch=16, seq_len=128, lr=3e-3, warmup=20, betas=(0.9, 0.98), max_grad_norm=1.0)


def pretrain(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> list[float]:
    """Train all weights on generic text (documents joined by the EOS token <|end|>). Seeded, with no
    sampling or dropout: rebuilds give the same weights (bitwise on one machine, with 1 or 2 threads).
    Returns the loss per step."""
    steps, batch, seq_len = PRETRAIN["steps"], PRETRAIN["batch"], PRETRAIN["seq_len"]
    rng = random.Random(seed)
    need = steps * batch * seq_len
    stream: list[int] = []
    while len(stream) < need:
        stream += tokenizer(pretraining_document(rng), add_special_tokens=False)["input_ids"]
        stream.append(tokenizer.eos_token_id)
    data = torch.tensor(stream[:need]).view(steps, batch, seq_len)

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], betas=PRETRAIN["betas"], weight_decay=0.0)
    warmup, peak = PRETRAIN["warmup"], PRETRAIN["lr"]
    losses = []
    model.train()
    bar = progress(steps, "pretraining the built-in model", interval=10.0)
    for step in range(steps):
        # linear warmup, then cosine to zero
        decayed = max(0, step - warmup) / (steps - warmup)
        lr = peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * decayed))
        for group in opt.param_groups:
            group["lr"] = lr
        x = data[step]                                                  # (batch, seq_len)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), PRETRAIN["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        bar.update(1)
    bar.close()
    model.eval()
    return losses


def builtin_model_dir() -> Path:
    """The built-in model's directory, built and pretrained on first use (atomically: temp dir +
    rename), then cached: later calls return at once."""
    target = cache_root() / f"tiny-llama-{VERSION}"
    if (target / "config.json").is_file():
        return target
    # another process building it at the same time is fine: the first rename wins
    with atomic_dir(target, built_by_another=lambda: (target / "config.json").is_file()) as tmp:
        print(f"building the built-in model {BUILTIN_MODEL} into {target} (first use only; about a minute on two "
              "CPU cores)", file=sys.stderr, flush=True)
        quiet_library_bars()
        tokenizer = build_tokenizer()
        # a first use may come from inside a caller's no_grad / inference_mode block
        with torch.inference_mode(False), torch.enable_grad():
            model = build_model(tokenizer)
            losses = pretrain(model, tokenizer)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"recipe": {**PRETRAIN, "seed": 0, "data": "pretraining_document()"},
                  "loss_first": losses[0], "loss_last": losses[-1], "losses": [round(x, 4) for x in losses]}
        (tmp / "pretraining.json").write_text(json.dumps(record, indent=1) + "\n")
    return target
