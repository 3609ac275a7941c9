"""Semantic routing: send each request to the adapter of a library that fits what it asks.

Each registered adapter has reference texts: a description and/or example prompts. Texts are
embedded into unit vectors e(t), and an adapter is represented by the centroid of its references:

    c_a = normalise(mean_i e(ref_a,i))          (the description counts as one more reference)
    score(p, a) = cos(e(p), c_a) = e(p) . c_a

A prompt is routed when its best-scoring adapter a* passes that adapter's own threshold
(score >= t_a*); otherwise it goes to the base model ("__base__"). `route` lists, best first,
those of the `top_k` best adapters that pass their thresholds (empty for the base); `choose`
gives the top-1 or "__base__". The top-1 gate is what makes a threshold mean "how sure must the
router be before it uses this adapter": a prompt whose best match is unsure goes to the base,
not to a worse match that happens to have a lower threshold.

Embedders:
  - "base": the base model itself, adapters disabled: the last hidden state, mean-pooled over
    the non-pad tokens, L2-normalised. The prompt goes through the tokenizer's chat template
    when it has one (`chat_template=True`), as it will for generation. No extra model, but
    these embeddings are anisotropic (on the built-in model every cosine is above ~0.8), so a
    fixed threshold means little from one model to another: calibrate thresholds with `fit`.
    They follow surface form more than meaning: example prompts work, a description alone
    hardly does (bench/bench_routing.py).
  - "sentence-transformers:<name or path>": a SentenceTransformer model (optional dependency,
    `pip install 'lorakit[routing]'`), on the raw prompt text, normalised.

`fit(prompts, labels)` sets each adapter's threshold from labelled prompts (a label is an
adapter name or "__base__"). Under the top-1 gate the thresholds decouple: a threshold only
decides the prompts whose best match is that adapter, so each is solved exactly on its own (see
`fit_threshold`).

Running: `generate` routes every prompt to its top-1 and runs the whole batch at once with
`per_sample_adapters` (one adapter per row). With `top_k > 1`, `route` reports the further
adapters for a caller that wants to combine them (e.g. `combine_adapters` with the scores as
weights); `generate` does not mix adapters.

Files: `router.json` (config, adapters, their reference texts and thresholds) and
`router.safetensors` (each adapter's reference embeddings and a probe embedding that checks,
on load, that the embedder still embeds as it did when saved).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import NAME_RE
from ..errors import AdapterFileError, AdapterStateError, ConfigError, LoraError
from ..files import atomic_write, read_safetensors
from ..inject import BASE_NAME, disable_adapters, has_adapters, list_adapters, model_name
from ..schema import from_dict
from .per_sample import per_sample_adapters

CONFIG_NAME = "router.json"
WEIGHTS_NAME = "router.safetensors"
FORMAT = "lorakit-router"
FORMAT_VERSION = 1
ST_PREFIX = "sentence-transformers:"
PROBE_TEXT = "lorakit router probe: the quick brown fox jumps over the lazy dog."
# The same embedder in another dtype or on another device reproduces the probe to a cosine above
# 0.999 (bf16 vs fp32 on the built-in model: 0.9998); another model lands far below.
PROBE_MIN_COSINE = 0.99


@dataclass
class RouterConfig:
    embedder: str = "base"
    """"base" (the model's own mean-pooled last hidden state) or "sentence-transformers:<name or path>"."""
    top_k: int = 1
    """How many adapters `route` may list per prompt (`choose` and `generate` use the best one)."""
    threshold: float = 0.0
    """Threshold of adapters registered without one: the cosine the best match needs to be used."""
    chat_template: bool = True
    """Put prompts through the tokenizer's chat template (when it has one) to embed and generate."""
    max_length: int = 512
    """Tokens of a prompt the "base" embedder reads (the rest is not embedded; generation sees all)."""
    batch_size: int = 32
    """Prompts embedded per forward pass."""

    def __post_init__(self) -> None:
        named_st = self.embedder.startswith(ST_PREFIX) and len(self.embedder) > len(ST_PREFIX)
        if self.embedder != "base" and not named_st:
            raise ConfigError(f"embedder must be 'base' or '{ST_PREFIX}<model name or path>', got {self.embedder!r}")
        for key in ("top_k", "max_length", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
        _check_threshold(self.threshold, "threshold")


@dataclass
class FitResult:
    """What `Router.fit` did, measured on the labelled prompts it was given."""

    accuracy: float
    """Share of prompts `choose` sends where their label says, with the fitted thresholds."""
    accuracy_before: float
    """The same share with the thresholds before fitting."""
    thresholds: dict[str, float]
    """Every adapter's threshold after fitting (unchanged where no prompt's best match was it)."""
    n: int
    """Number of labelled prompts."""


@dataclass
class _Entry:
    description: str | None
    examples: list[str]
    threshold: float
    refs: torch.Tensor = field(repr=False)   # (n_refs, dim) unit rows: description first, then examples


class Router:
    """Routes prompts to adapters of `model` by embedding similarity; see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer, embedder: str = "base", top_k: int = 1, threshold: float = 0.0,
                 chat_template: bool = True, max_length: int = 512, batch_size: int = 32) -> None:
        self.config = RouterConfig(embedder, top_k, threshold, chat_template, max_length, batch_size)
        self.model, self.tokenizer = model, tokenizer
        self._embed = _make_embedder(self.config, model, tokenizer)
        self._entries: dict[str, _Entry] = {}

    @property
    def adapters(self) -> list[str]:
        """Registered adapter names, in registration order."""
        return list(self._entries)

    @property
    def thresholds(self) -> dict[str, float]:
        """Each adapter's threshold (a copy: change them with `set_threshold` or `fit`)."""
        return {name: e.threshold for name, e in self._entries.items()}

    def register(self, name: str, description: str | None = None, examples: Sequence[str] | None = None,
                 threshold: float | None = None) -> None:
        """Add adapter `name` to the library, described by a text and/or example prompts (each one
        reference; more examples give a steadier centroid). The adapter need only be on the model
        by the time prompts are routed."""
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name == BASE_NAME:
            raise AdapterStateError(f"adapter name {name!r} is not valid: use an adapter name of the model "
                                    f"(letters, digits, '_' and '-'), not {BASE_NAME!r}, which means 'no adapter'")
        if name in self._entries:
            raise AdapterStateError(f"adapter {name!r} is already registered; router.unregister({name!r}) first "
                                    "to replace it")
        if description is not None and (not isinstance(description, str) or not description.strip()):
            raise LoraError(f"description of {name!r} must be a non-empty string or None, got {description!r}")
        examples = _check_texts(examples or [], f"examples of {name!r}")
        if description is None and not examples:
            raise LoraError(f"register {name!r} with a description or examples (or both): the router matches "
                            "prompts against them")
        threshold = self.config.threshold if threshold is None else threshold
        _check_threshold(threshold, f"threshold of {name!r}")
        refs = self._embed(([description] if description is not None else []) + examples)
        self._entries[name] = _Entry(description, examples, float(threshold), refs)

    def unregister(self, name: str) -> None:
        self._check_registered([name])
        del self._entries[name]

    def set_threshold(self, name: str, threshold: float) -> None:
        self._check_registered([name])
        _check_threshold(threshold, f"threshold of {name!r}")
        self._entries[name].threshold = float(threshold)

    def scores(self, prompts: Sequence[str]) -> torch.Tensor:
        """(n_prompts, n_adapters) cosine of each prompt with each adapter's centroid, columns in
        `adapters` order (float32, CPU)."""
        prompts = _check_texts(prompts, "prompts")
        self._check_library()
        if not prompts:
            return torch.zeros(0, len(self._entries))
        centroids = torch.stack([nn.functional.normalize(e.refs.mean(0), dim=0)
                                 for e in self._entries.values()])   # (n_adapters, dim)
        return self._embed(prompts) @ centroids.T                    # (n_prompts, n_adapters)

    def route(self, prompts: Sequence[str]) -> list[list[tuple[str, float]]]:
        """Per prompt, best first, the `top_k` best adapters that pass their thresholds as (name,
        score); empty when the best adapter is under its threshold (the prompt goes to the base)."""
        return self._route(self.scores(prompts))

    def choose(self, prompts: Sequence[str]) -> list[str]:
        """Per prompt, the adapter it is routed to, or "__base__"."""
        return [r[0][0] if r else BASE_NAME for r in self.route(prompts)]

    def _route(self, scores: torch.Tensor) -> list[list[tuple[str, float]]]:
        names, thresholds = self.adapters, [e.threshold for e in self._entries.values()]
        top = scores.topk(min(self.config.top_k, len(names)), dim=1)
        out = []
        for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            if values[0] < thresholds[indices[0]]:
                out.append([])
                continue
            out.append([(names[i], v) for v, i in zip(values, indices, strict=True) if v >= thresholds[i]])
        return out

    def fit(self, prompts: Sequence[str], labels: Sequence[str]) -> FitResult:
        """Set each adapter's threshold to route the labelled prompts best (label: an adapter name
        or "__base__"). Among equally accurate thresholds it prefers sending prompts of another
        adapter to the base rather than to the wrong adapter, then the middle of the gap between
        scores (a threshold moves only as far as the data asks). Returns the accuracy before and
        after on these prompts; measure it on held-out prompts too."""
        prompts = _check_texts(prompts, "prompts")
        labels = list(labels)
        if len(labels) != len(prompts):
            raise LoraError(f"fit got {len(prompts)} prompts but {len(labels)} labels; give one label per prompt")
        unknown = sorted({x for x in labels if x != BASE_NAME and x not in self._entries}, key=str)
        if unknown:
            raise AdapterStateError(f"labels {unknown} name no registered adapter; labels are adapter names "
                                    f"({self.adapters}) or {BASE_NAME!r}")
        if not prompts:
            raise LoraError("fit needs at least one labelled prompt")
        scores = self.scores(prompts)
        before = self._accuracy(scores, labels)
        best = scores.argmax(dim=1).tolist()
        for a, (name, entry) in enumerate(self._entries.items()):
            mine = [i for i in range(len(prompts)) if best[i] == a]
            if not mine:
                continue
            wanted = [1 if labels[i] == name else 0 if labels[i] == BASE_NAME else -1 for i in mine]
            entry.threshold = fit_threshold([scores[i, a].item() for i in mine], wanted, entry.threshold)
        return FitResult(accuracy=self._accuracy(scores, labels), accuracy_before=before, thresholds=self.thresholds,
                         n=len(prompts))

    def _accuracy(self, scores: torch.Tensor, labels: list[str]) -> float:
        chosen = [r[0][0] if r else BASE_NAME for r in self._route(scores)]
        return sum(c == x for c, x in zip(chosen, labels, strict=True)) / len(labels)

    def generate(self, prompts: Sequence[str], **generate_kwargs) -> list[tuple[str, str]]:
        """Route each prompt, then generate for the whole batch in one `model.generate` call with
        each row under its own adapter (`per_sample_adapters`). Returns (adapter, text) per
        output row (`num_return_sequences` rows per prompt, in order), the text without the prompt
        and without special tokens. Rows are left-padded; `generate_kwargs` go to `model.generate`
        (e.g. max_new_tokens, do_sample, num_beams)."""
        names = self.choose(prompts)
        if not names:
            return []
        texts, add_special = _format(self.tokenizer, list(prompts), self.config.chat_template)
        batch = self.tokenizer(texts, add_special_tokens=add_special, padding=True, padding_side="left",
                               return_tensors="pt").to(_device(self.model))
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        with per_sample_adapters(self.model, names), torch.no_grad():
            out = self.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      **generate_kwargs)   # (n, width + new)
        width = batch.input_ids.shape[1]
        per_prompt = out.shape[0] // len(names)   # num_return_sequences rows each, consecutive
        return [(names[i // per_prompt], self.tokenizer.decode(row[width:], skip_special_tokens=True))
                for i, row in enumerate(out)]

    # -- files --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write `router.json` and `router.safetensors` into directory `path` (each atomically)."""
        self._check_library()
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        probe = self._embed([PROBE_TEXT])[0]
        tensors = {"probe": probe.contiguous()}
        tensors.update({f"refs.{n}": e.refs.contiguous() for n, e in self._entries.items()})
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "config": asdict(self.config), "dim": int(probe.numel()),
            "model": model_name(self.model),
            "adapters": [{"name": n, "description": e.description, "examples": e.examples, "threshold": e.threshold}
                         for n, e in self._entries.items()],
        }
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
        atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, tokenizer) -> Router:
        """A router saved with `save`, over `model`. The stored embeddings are used as they are, so
        the embedder must still embed as it did: the probe text is re-embedded and compared."""
        directory = Path(path)
        meta = _read_meta(directory)
        config_file = directory / CONFIG_NAME
        try:
            config = from_dict(RouterConfig, meta["config"], "config")
        except ConfigError as e:
            raise AdapterFileError(f"{config_file}: {e}") from None
        router = cls(model, tokenizer, **asdict(config))
        tensors = read_safetensors(directory / WEIGHTS_NAME, f"a router directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        weights_file = directory / WEIGHTS_NAME
        entries, dim = meta["adapters"], meta["dim"]
        expected = {"probe": (dim,)}   # refs rows: the description (if any), then the examples
        expected.update({f"refs.{a['name']}": (int(a["description"] is not None) + len(a["examples"]), dim)
                         for a in entries})
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise AdapterFileError(f"{weights_file} does not match {config_file}: missing {missing}, unexpected "
                                   f"{unexpected}; the two files come from different saves, save the router again")
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise AdapterFileError(f"{weights_file}: {key} has shape {tuple(tensors[key].shape)}, {config_file} "
                                       f"implies {shape}; the two files come from different saves, save the router "
                                       "again")
        probe = router._embed([PROBE_TEXT])[0]
        if probe.numel() != dim:
            raise AdapterFileError(
                f"{directory} holds {dim}-dimensional embeddings (made with {meta['model'] or 'an unnamed model'}, "
                f"embedder {config.embedder!r}) but this embedder gives {probe.numel()}: load the router with the "
                "model it was saved with, or register the adapters again with this one"
            )
        cosine = float(probe @ tensors["probe"].float())
        if cosine < PROBE_MIN_COSINE:
            raise AdapterFileError(
                f"{directory} was saved with an embedder that embeds differently from this one (probe cosine "
                f"{cosine:.4f} < {PROBE_MIN_COSINE}; saved with {meta['model'] or 'an unnamed model'}, embedder "
                f"{config.embedder!r}): load it with the model it was saved with, or register the adapters again"
            )
        for a in entries:
            router._entries[a["name"]] = _Entry(a["description"], list(a["examples"]), float(a["threshold"]),
                                                tensors[f"refs.{a['name']}"].float())
        return router

    # -- checks -------------------------------------------------------------------------------

    def _check_registered(self, names: list[str]) -> None:
        for n in names:
            if n not in self._entries:
                raise AdapterStateError(f"adapter {n!r} is not registered; registered adapters: {self.adapters}")

    def _check_library(self) -> None:
        if not self._entries:
            raise AdapterStateError("the router has no adapters; register some first with "
                                    "router.register(name, description=..., examples=[...])")
        on_model = set(list_adapters(self.model))
        missing = [n for n in self._entries if n not in on_model]
        if missing:
            raise AdapterStateError(
                f"router adapters {missing} are not on the model (its adapters: {sorted(on_model)}); load them with "
                "lorakit.load_adapter(model, path, name=...) or router.unregister them"
            )


def fit_threshold(scores: Sequence[float], wanted: Sequence[int], current: float) -> float:
    """The threshold of one adapter over the prompts whose best match it is. `wanted[i]` is 1 when
    prompt i should use the adapter, 0 when it should go to the base, -1 when it belongs to
    another adapter (wrong either way, but better at the base).

    Maximises the prompts decided right (1 at or above the threshold, 0 below), then minimises
    the -1 prompts let through; ties go to the highest such threshold (when unsure, the base).
    The result lies halfway between the lowest accepted and the highest rejected score; with
    nothing rejected it is min(current, lowest accepted), with nothing accepted max(current, just
    above the highest)."""
    ranked = sorted(zip(scores, wanted, strict=True), reverse=True)   # accept ranked[:j] for j = 0..n
    # j = 0 accepts nothing: every wanted-0 prompt is right
    right, leaked = sum(w == 0 for _, w in ranked), 0
    best, best_j = (right, -leaked), 0
    for j, (s, w) in enumerate(ranked, start=1):
        right += (w == 1) - (w == 0)
        leaked += w == -1
        if j < len(ranked) and ranked[j][0] == s:   # equal scores are accepted or rejected together
            continue
        if (right, -leaked) > best:
            best, best_j = (right, -leaked), j
    if best_j == 0:
        return max(current, math.nextafter(ranked[0][0], math.inf))
    if best_j == len(ranked):
        return min(current, ranked[-1][0])
    return (ranked[best_j - 1][0] + ranked[best_j][0]) / 2


# -- embedders --------------------------------------------------------------------------------


def _make_embedder(config: RouterConfig, model: nn.Module, tokenizer) -> Callable[[list[str]], torch.Tensor]:
    if config.embedder == "base":
        if tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token, which batching needs; set one, e.g. "
                              "tokenizer.pad_token = tokenizer.eos_token")
        return lambda texts: _embed_base(model, tokenizer, texts, config)
    return _sentence_transformer(config.embedder[len(ST_PREFIX):], config.batch_size, _device(model))


@torch.no_grad()
def _embed_base(model: nn.Module, tokenizer, texts: list[str], config: RouterConfig) -> torch.Tensor:
    """(n, hidden) unit vectors: the base model's last hidden state mean-pooled over real tokens.
    Right padding, so every row sees the positions it would see alone."""
    texts, add_special = _format(tokenizer, texts, config.chat_template)
    was_training = model.training
    model.eval()   # dropout would make embeddings random
    adapted = has_adapters(model)
    out = []
    try:
        with disable_adapters(model) if adapted else contextlib.nullcontext():
            for i in range(0, len(texts), config.batch_size):
                batch = tokenizer(texts[i:i + config.batch_size], add_special_tokens=add_special, padding=True,
                                  padding_side="right", truncation=True, max_length=config.max_length,
                                  return_tensors="pt").to(_device(model))
                hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               output_hidden_states=True).hidden_states[-1].float()   # (b, T, hidden)
                mask = batch.attention_mask.unsqueeze(-1).float()                      # (b, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1)                          # (b, hidden)
                out.append(nn.functional.normalize(pooled, dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def _sentence_transformer(name: str, batch_size: int, device: torch.device) -> Callable[[list[str]], torch.Tensor]:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError(f"embedder '{ST_PREFIX}{name}' needs the sentence-transformers package: "
                          "pip install 'lorakit[routing]'") from None
    try:
        encoder = SentenceTransformer(name, device=str(device))
    except OSError as e:
        raise FileNotFoundError(f"cannot load sentence-transformers model {name!r}: it is not a local directory "
                                f"and the hub did not provide it ({e.__class__.__name__}: "
                                f"{str(e).splitlines()[0]})") from None

    def embed(texts: list[str]) -> torch.Tensor:
        return encoder.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True,
                              show_progress_bar=False).float().cpu()   # (n, dim)
    return embed


def _format(tokenizer, prompts: list[str], chat_template: bool) -> tuple[list[str], bool]:
    """The texts to tokenize, and whether the tokenizer should add its special tokens (not when
    the chat template already wrote them)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts], False
    return list(prompts), True


# -- helpers ----------------------------------------------------------------------------------


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        raise LoraError(f"{what} must be a list of strings, got one string; wrap it in a list")
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str) or not t.strip()]
    if bad:
        raise LoraError(f"{what} must be non-empty strings, got {bad[0]!r}")
    return texts


def _check_threshold(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number (a cosine, typically in [-1, 1]), got {value!r}")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _read_meta(directory: Path) -> dict:
    if not directory.is_dir():
        raise FileNotFoundError(f"router directory {directory} does not exist")
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a router directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFileError(f"{file} is not a lorakit router file (no \"format\": \"{FORMAT}\")")
    if meta.get("version") != FORMAT_VERSION:
        raise AdapterFileError(f"{file} has router format version {meta.get('version')!r}; this lorakit reads "
                               f"version {FORMAT_VERSION}")
    try:
        ok = (isinstance(meta["config"], dict) and isinstance(meta["dim"], int) and isinstance(meta["adapters"], list)
              and len({a["name"] for a in meta["adapters"]}) == len(meta["adapters"])
              and all(isinstance(a["name"], str) and isinstance(a["examples"], list)
                      and isinstance(a["threshold"], (int, float)) and (a["description"] is None
                                                                         or isinstance(a["description"], str))
                      for a in meta["adapters"]))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise AdapterFileError(f"{file} is malformed: it needs config (object), dim (int) and adapters (a list of "
                               "{name, description, examples, threshold} with distinct names); save the router again")
    return meta
