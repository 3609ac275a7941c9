"""From logits to tokens and from tokens to text, per request, for a batch whose rows each carry
their own sampling settings.

Penalties (OpenAI's definition), per row, before anything else: with c[t] the number of times
token t was generated so far by this request (the prompt does not count),

    z[t] -= presence_penalty * (c[t] > 0) + frequency_penalty * c[t]

A row without penalties keeps its logits untouched (the same tensor values, bit for bit).

Log-probabilities, when a request asks for them, are log_softmax(z) of these penalised logits,
before temperature and top-p: what the model (with the penalties the request asked for) thinks
of each token, not the reshaped distribution the token was drawn from. They are reported for the
chosen token and for the k most likely tokens.

Token choice, per row of the (penalised) last position's logits z (float32):
  - temperature 0 (or one that is 0 in float32): greedy, argmax z (the first of equal maxima, as
    `model.generate` takes it);
  - otherwise p = softmax((z - max z) / temperature), then nucleus (top-p) filtering: keep the
    most likely token and, in order, each next one while the mass before it is below top_p, and
    draw from what is kept with the row's own generator. A request with a seed gets a generator
    seeded with it, so its samples do not depend on the other rows in the batch.

Text: the generated ids are decoded incrementally (special tokens skipped, as `lorakit generate`
decodes them). Decoding all ids at every step would cost O(n) per token; instead two offsets
mark a window of the last tokens, and the new text is what decoding the window with the new
token adds to decoding it without (the window keeps the context a tokenizer needs for leading
spaces). Text ending in U+FFFD (a multi-byte character whose last bytes are still to come) is
not taken until it is complete. Then only what can no longer change is released:
  - a stop string ends the text before it (it is not returned);
  - a trailing piece that could be the start of a stop string is held back;
  - at the end of the request everything left is released.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.convert_slow_tokenizer import bytes_to_unicode


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    """New tokens at most (the end-of-sequence token counts as one)."""
    temperature: float = 1.0
    """0 is greedy."""
    top_p: float = 1.0
    """Nucleus mass kept, in (0, 1]."""
    seed: int | None = None
    """Seeds this request's generator; None draws a seed."""
    stop: tuple[str, ...] = ()
    """Strings that end the text (not included)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token generated at least once so far, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated so far, in [-2, 2]."""
    logprobs: int | None = None
    """Report each token's log-probability and those of the `logprobs` most likely tokens (0 to
    20); None reports none."""

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request asking for several (`n`): seed + index, modulo
    2**64 (torch takes seeds as unsigned 64-bit), so choice i of a request seeded s is exactly the
    single-choice request seeded s + i, and choice 0 is the request's own seed. None stays None:
    each choice then draws its own seed."""
    if seed is None or index == 0:
        return seed
    return (seed + index) % 2 ** 64


def apply_penalties(logits: Tensor, params: list[SamplingParams], counts: list[Tensor | None]) -> Tensor:
    """`logits` (B, V) with each penalised row's presence and frequency penalties subtracted.
    `counts[i]` (V,) float32 holds row i's generated-token counts, None for a row without
    penalties or with no token yet (nothing to subtract). Returns `logits` itself when no row
    has counts, else a copy in which only the rows with counts differ."""
    rows = [i for i, c in enumerate(counts) if c is not None]
    if not rows:
        return logits
    index = torch.tensor(rows, device=logits.device)
    c = torch.stack([counts[i] for i in rows])                                                  # (S, V)
    presence = torch.tensor([params[i].presence_penalty for i in rows], dtype=torch.float32,
                            device=logits.device)[:, None]                                      # (S, 1)
    frequency = torch.tensor([params[i].frequency_penalty for i in rows], dtype=torch.float32,
                             device=logits.device)[:, None]                                     # (S, 1)
    out = logits.clone()
    out[index] = logits[index] - (presence * (c > 0) + frequency * c)                           # (S, V)
    return out


def token_logprobs(logits: Tensor, tokens: list[int | None],
                   alternatives: list[int | None]) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """Per row of `logits` (B, V): (log-probability of its chosen token, [(token, log-probability)
    of the `alternatives[i]` most likely tokens, most likely first]), or None for a row that asked
    for none (`alternatives[i]` None) or has no token."""
    out: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(tokens)
    rows = [i for i, (t, k) in enumerate(zip(tokens, alternatives, strict=True)) if t is not None and k is not None]
    if not rows:
        return out
    index = torch.tensor(rows, device=logits.device)
    logp = torch.log_softmax(logits[index].float(), dim=-1)                                    # (S, V)
    chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=logits.device))  # (S, 1)
    k = max(alternatives[i] for i in rows)
    values, ids = logp.topk(k, dim=-1)                                                        # (S, k) each
    for j, i in enumerate(rows):
        kept = alternatives[i]
        out[i] = (float(chosen[j, 0]), list(zip(ids[j, :kept].tolist(), values[j, :kept].tolist(), strict=True)))
    return out


@dataclass(frozen=True)
class Logprob:
    """A token as a log-probability entry shows it (OpenAI's `{token, logprob, bytes}`)."""

    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's entry: the token, its alternatives, and where its text starts."""

    chosen: Logprob
    top: tuple[Logprob, ...]
    """The most likely tokens, most likely first (the chosen one among them only if it is one)."""
    offset: int
    """Characters of the request's text before this token's (a token that completes a character
    started by earlier ones shares their offset)."""


class TokenTexts:
    """Each token's text and bytes for log-probability entries. A byte-level BPE token (GPT-2,
    Llama 3, the built-in byte tokenizer) maps back to its exact bytes, which may be part of a
    multi-byte character: its text is then OpenAI's spelling of raw bytes, `bytes:\\xe2\\x80`, so
    such tokens stay distinct (a decode would make them all U+FFFD). Special tokens, and every
    token of another kind of tokenizer, show their decoded text and its UTF-8 bytes."""

    _BYTE_OF = {char: byte for byte, char in bytes_to_unicode().items()}

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._added = set(tokenizer.get_added_vocab())
        self._known: dict[int, tuple[str, tuple[int, ...]]] = {}

    def entry(self, token: int, logprob: float) -> Logprob:
        if token not in self._known:
            self._known[token] = self._spell(token)
        text, raw = self._known[token]
        return Logprob(text, logprob, raw)

    def _spell(self, token: int) -> tuple[str, tuple[int, ...]]:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if self._byte_level and piece not in self._added and all(c in self._BYTE_OF for c in piece):
            raw = bytes(self._BYTE_OF[c] for c in piece)
            try:
                return raw.decode("utf-8"), tuple(raw)
            except UnicodeDecodeError:
                return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), tuple(raw)
        text = self.tokenizer.decode([token])
        return text, tuple(text.encode("utf-8"))


def choose_tokens(logits: Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator]) -> list[int | None]:
    """One token per row of `logits` (B, V), greedy or sampled per row; None for a row whose
    logits hold NaN or +inf, or are all -inf (an adapter holding NaN gives that): there is nothing
    to choose from, and the row's request must end with an error, not the batch.

    Safe for every temperature in [0, 2] and top_p in (0, 1]: a temperature that is 0 in float32
    (1e-50) is greedy; the best logit is subtracted before dividing, so z / t stays <= 0 and a tiny
    temperature (a float32 subnormal such as 1e-40) cannot overflow to inf; the most likely token
    is always kept, so a top_p that rounds to 0 (1e-300) is top-1."""
    chosen: list[int | None] = logits.argmax(-1).tolist()
    best = logits.amax(-1)                                                                     # (B,), NaN propagates
    for i in (~torch.isfinite(best)).nonzero().flatten().tolist():
        chosen[i] = None
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32)                 # (B,)
    sampled = [i for i in (temps > 0).nonzero().flatten().tolist() if chosen[i] is not None]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        t = temps[sampled].to(logits.device)                                                   # (S,)
        top_p = torch.tensor([params[i].top_p for i in sampled], dtype=torch.float32, device=logits.device)   # (S,)
        z = logits[index].float() - best[index].float()[:, None]                               # (S, V), <= 0
        probs = torch.softmax(z / t[:, None], dim=-1)                                          # (S, V)
        ranked, order = probs.sort(dim=-1, descending=True)                                    # (S, V)
        before = ranked.cumsum(-1) - ranked                                                     # mass before each
        drop = before >= top_p[:, None]
        drop[:, 0] = False
        ranked = ranked.masked_fill(drop, 0.0)
        for j, i in enumerate(sampled):
            k = torch.multinomial(ranked[j], 1, generator=generators[i])                       # (1,)
            chosen[i] = int(order[j, k[0]])
    return chosen


class TextStream:
    """The text of one request's generated tokens, released in pieces that will not change."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""         # the decoded text so far
        self.sent = 0          # characters of it released
        self.stopped = False   # a stop string was found
        self._window = 0       # first token of the decode window
        self._read = 0         # tokens whose text is in `text`

    def add(self, token: int) -> str:
        """Append a token; the newly releasable text ('' if none). Sets `stopped` on a stop string."""
        self.ids.append(token)
        self._decode(final=False)
        cut = self._stop_at()
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut]
            return self._release(cut)
        return self._release(self._safe_end())

    def finish(self) -> str:
        """Everything not yet released (at the end of the request)."""
        if self.stopped:
            return ""
        self._decode(final=True)
        cut = self._stop_at()
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut]
        return self._release(len(self.text))

    def _decode(self, final: bool) -> None:
        before = self.tokenizer.decode(self.ids[self._window:self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._window:], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._window, self._read = self._read, len(self.ids)

    def _release(self, end: int) -> str:
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def _stop_at(self) -> int | None:
        if not self.stop:
            return None
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, self.sent - len(s) + 1))) >= 0]
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        end = len(self.text)
        hold = 0   # the longest tail that may still grow into a stop string waits
        for s in self.stop:
            for k in range(min(len(s) - 1, end - self.sent), hold, -1):
                if self.text[end - k:end] == s[:k]:
                    hold = k
                    break
        return end - hold
