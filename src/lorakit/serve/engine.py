"""The batching engine: one base model, many adapters, one forward pass per step for every
running request, whatever adapter each uses.

One background thread owns the model. Requests wait in a bounded queue; the thread loops:

    run adapter commands (load / unload) between steps, never during a forward pass
    drop cancelled rows
    admit waiting requests while the batch has room (max_batch_size) and their prompts fit the
        prefill budget (max_prefill_tokens); route "auto" ones with the router; prefill them
        together (left-padded) into a fresh KV cache, take each one's first token, and merge
        that cache into the running batch's. Joining rows with the same prompt and adapter (the
        `n` choices of one request) are prefilled once: their cache rows are copies of one.
    decode one token for every running row; rows that finished leave the batch

so a new request joins at the next step and a finished one leaves at once (continuous batching).

The KV cache is a transformers `DynamicCache` holding the running rows, left-padded to a common
length L, its layers buffers with room to grow (a decode step writes one position in place
instead of copying the cache):

    keys, values per layer   (B, kv_heads, L, head_dim)
    mask                     (B, L)     1 on a row's real tokens, 0 on its left padding
    position of the next token of row i = its real token count, so padding never shifts a
    row's positions: each row computes what it would compute alone.

Merging pads the shorter of the two caches on the left; leaving is an index-select on the batch
dimension, after which columns that are padding for every remaining row are cut off the left.
This needs plain full-attention cache layers (Llama, Mistral without sliding window, Qwen2,
GPT-2, ...); a model whose cache has sliding-window or other layer types is refused at start.

Adapters per row: every loaded adapter's factors are stacked once (`StackedAdapters`) and each
forward runs inside `stacks.rows(names)`, one adapter name per row (`__base__` for the base), so
rows of different adapters share the pass: a gather plus batched matmuls per layer. The stacks
are rebuilt only when an adapter is loaded or unloaded. Unloading waits until no waiting or
running request uses the adapter; new requests for it are refused from the moment it is asked.

Each step's logits go through `sampling`: the penalties of the rows that have them (each such
row counts its generated tokens in a (V,) tensor), the token choice, and the log-probabilities
of the rows that asked for them, which reach the request with the next text released.

Everything a request gets back goes through its `sink`, called on the engine thread with
`Started`, then `Delta`s, then one `Finished` or `Failed`. A failing forward pass fails the
requests in it (500) and the engine carries on with the next ones. A failure of one row after
the pass (logits that are NaN because its adapter holds NaN, say) fails that row's request alone;
the other rows of the batch go on, and their text is what they would give alone.
"""

from __future__ import annotations

import collections
import concurrent.futures
import inspect
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..compose.per_sample import StackedAdapters
from ..errors import LoraError
from ..inject import BASE_NAME, delete_adapter, list_adapters
from ..io import load_adapter
from .config import ServeConfig
from .errors import ServeError
from .registry import AUTO
from .sampling import (
    SamplingParams,
    TextStream,
    TokenLogprobs,
    TokenTexts,
    apply_penalties,
    choose_tokens,
    make_generator,
    token_logprobs,
)

log = logging.getLogger("lorakit.serve")


# -- what a request gets back ------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    adapter: str
    """The adapter the request runs with (`__base__` for none): the router's choice for "auto"."""
    prompt_tokens: int


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: tuple[TokenLogprobs, ...] = ()
    """The entries of the tokens generated since the last Delta (when the request asked for them)."""


@dataclass(frozen=True)
class Finished:
    reason: str
    """"stop" (end-of-sequence token or stop string) or "length" (max_tokens)."""
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: ServeError


Event = Started | Delta | Finished | Failed


@dataclass
class Completion:
    """A whole request's result (`Engine.generate`)."""

    text: str
    finish_reason: str
    adapter: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprobs, ...] = ()
    """One entry per generated token, when the request asked for log-probabilities."""


class Request:
    """One submitted request. `cancel()` from any thread: the engine drops it at its next step."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, adapter: str, sink: Callable[[Event], None],
                 route_text: str | None) -> None:
        self.id = next(self._ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.adapter = adapter
        self.sink = sink
        self.route_text = route_text
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Row:
    """A running request: its adapter, text, generator and place in the sequence."""

    request: Request
    adapter: str
    stream: TextStream
    generator: torch.Generator
    length: int          # tokens of this row in the KV cache
    last: int = -1       # the latest token, the next step's input
    generated: int = 0
    counts: Tensor | None = None   # (V,) float32 times each token was generated; penalised rows only
    pending: list[TokenLogprobs] = field(default_factory=list)   # entries not yet sent


@dataclass
class _Command:
    kind: str            # "load" or "unload"
    name: str
    path: str | None
    future: concurrent.futures.Future


class Engine:
    """Continuous batching over one model with per-row adapters. `start()` the thread, `submit`
    requests (or `generate` synchronously), `stop()` at the end."""

    def __init__(self, model: nn.Module, tokenizer, config: ServeConfig | None = None, router=None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or ServeConfig()
        self.router = router
        self.device = next(model.parameters()).device
        self.context_length = _context_length(model)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_ids = _eos_ids(model, tokenizer)
        self._texts = TokenTexts(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0
        _check_cache_layers(model)
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        if router is not None:
            missing = [a for a in router.adapters if a not in list_adapters(model)]
            if missing:
                raise LoraError(f"router adapters {missing} are not loaded; load them (--adapter NAME=DIR or "
                                f"--adapters-dir) or save the router without them")
        self._stacks = StackedAdapters(model, list_adapters(model))
        self.adapters: tuple[str, ...] = tuple(self._stacks.names)
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._commands: list[_Command] = []
        self._unloading: set[str] = set()
        self._loading: set[str] = set()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: Tensor | None = None      # (B, L)
        self._accepting = False
        self._stopping = False
        self._abort = False
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> Engine:
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, let the accepted ones finish for up to `timeout` seconds (default
        `shutdown_timeout_s`), then fail what is left (503) and end the thread."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None:
            return
        self._thread.join(self.config.shutdown_timeout_s if timeout is None else timeout)
        if self._thread.is_alive():
            with self._cond:
                self._abort = True
                self._cond.notify_all()
            self._thread.join()

    def stats(self) -> dict[str, int]:
        """Requests running and waiting (for /health)."""
        return {"running": len(self._rows), "waiting": len(self._waiting)}

    # -- requests --------------------------------------------------------------------------------

    def default_max_tokens(self, prompt_tokens: int) -> int:
        """The most a request with this prompt may generate: the server limit and the context left."""
        room = self.context_length - prompt_tokens if self.context_length else self.config.max_tokens
        return max(1, min(self.config.max_tokens, room))

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, adapter: str = BASE_NAME,
               sink: Callable[[Event], None] | None = None, route_text: str | None = None) -> Request:
        """Queue a request; its events go to `sink` (on the engine thread). Raises ServeError at
        once for what can be known now: unknown adapter, prompt or max_tokens over the limits,
        a full queue (429), a server shutting down (503)."""
        (request,) = self.submit_all([(prompt_ids, params, sink, route_text)], adapter)
        return request

    def submit_all(self, jobs: Sequence[tuple[Sequence[int], SamplingParams, Callable[[Event], None] | None,
                                              str | None]], adapter: str = BASE_NAME) -> list[Request]:
        """Queue several requests for one adapter, each (prompt_ids, params, sink, route_text), as
        `submit` does one: all or none, side by side in the queue, so that they join the batch at
        the same step when it has room (and the copies of one prompt, the `n` choices of an HTTP
        request, are prefilled once)."""
        requests = []
        for prompt_ids, params, sink, route_text in jobs:
            prompt_ids = list(prompt_ids)
            self._check_request(prompt_ids, params, adapter, route_text)
            requests.append(Request(prompt_ids, params, adapter, sink or (lambda event: None), route_text))
        with self._cond:
            if not self._accepting:
                raise ServeError("the server is shutting down and takes no new requests", 503)
            if adapter in self._unloading:
                raise ServeError(f"adapter {adapter!r} is being unloaded", 404, param="model", code="model_not_found")
            if len(self._waiting) + len(requests) > self.config.max_queue:
                raise ServeError(f"the server is at capacity: {len(self._waiting)} requests are waiting "
                                 f"(max_queue {self.config.max_queue}); retry later", 429)
            self._waiting.extend(requests)
            self._cond.notify_all()
        return requests

    def _check_request(self, prompt_ids: list[int], params: SamplingParams, adapter: str,
                       route_text: str | None) -> None:
        if adapter == AUTO:
            if self.router is None:
                raise ServeError("model 'auto' asks the semantic router, but this server has none; start it with "
                                 "--router DIR, or name an adapter", 400, param="model", code="model_not_found")
            if not route_text:
                raise ServeError("model 'auto' needs a prompt with text to route on", 400, param="model")
        elif adapter != BASE_NAME and adapter not in self.adapters:
            raise ServeError(f"model {adapter!r} does not exist; GET /v1/models lists the base model and the loaded "
                             "adapters", 404, param="model", code="model_not_found")
        n = len(prompt_ids)
        if n == 0:
            raise ServeError("the prompt is empty (0 tokens); give some text", 400, param="prompt")
        if n > self.config.max_prompt_tokens:
            raise ServeError(f"the prompt is {n} tokens, more than this server's limit of "
                             f"{self.config.max_prompt_tokens} (max_prompt_tokens); shorten it", 400, param="prompt",
                             code="context_length_exceeded")
        bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise ServeError(f"prompt token ids must be integers in [0, {self.vocab_size}), got {bad[0]!r}", 400,
                             param="prompt")
        if not 0 <= params.temperature <= 2:   # NaN fails too
            raise ServeError(f"temperature must be in [0, 2], got {params.temperature!r}", 400, param="temperature")
        if not 0 < params.top_p <= 1:
            raise ServeError(f"top_p must be in (0, 1], got {params.top_p!r}", 400, param="top_p")
        for key in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(params, key) <= 2:
                raise ServeError(f"{key} must be in [-2, 2], got {getattr(params, key)!r}", 400, param=key)
        if params.logprobs is not None and not 0 <= params.logprobs <= 20:
            raise ServeError(f"logprobs must be in [0, 20], got {params.logprobs!r}", 400, param="logprobs")
        if params.max_tokens > self.config.max_tokens:
            raise ServeError(f"max_tokens is {params.max_tokens}, more than this server's limit of "
                             f"{self.config.max_tokens}", 400, param="max_tokens")
        if self.context_length and n + params.max_tokens > self.context_length:
            raise ServeError(f"this model's context is {self.context_length} tokens, but the prompt ({n}) plus "
                             f"max_tokens ({params.max_tokens}) need {n + params.max_tokens}; lower max_tokens or "
                             "shorten the prompt", 400, param="max_tokens", code="context_length_exceeded")

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, adapter: str = BASE_NAME,
                 route_text: str | None = None, timeout: float | None = None) -> Completion:
        """Submit and wait for the whole result (raises the request's ServeError)."""
        events: queue.Queue[Event] = queue.Queue()
        request = self.submit(prompt_ids, params, adapter, events.put, route_text)
        deadline = time.monotonic() + (self.config.request_timeout_s if timeout is None else timeout)
        parts, logprobs, adapter_used = [], [], adapter
        while True:
            try:
                event = events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                request.cancel()
                raise ServeError("the request timed out", 408) from None
            if isinstance(event, Started):
                adapter_used = event.adapter
            elif isinstance(event, Delta):
                parts.append(event.text)
                logprobs.extend(event.logprobs)
            elif isinstance(event, Finished):
                return Completion("".join(parts), event.reason, adapter_used, event.prompt_tokens,
                                  event.completion_tokens, tuple(logprobs))
            else:
                raise event.error

    # -- adapters --------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> concurrent.futures.Future:
        """Load the adapter directory `path` as `name` between two steps; the future resolves when
        it is ready (or raises a ServeError). The path is trusted here: check it first
        (`registry.resolve_adapter_dir`)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if not self._accepting:
                raise ServeError("the server is shutting down", 503)
            if name in self.adapters or name in self._loading:
                raise ServeError(f"an adapter named {name!r} is already loaded; DELETE /v1/adapters/{name} first or "
                                 "pick another name", 409, param="name", code="adapter_exists")
            self._loading.add(name)
            self._commands.append(_Command("load", name, path, future))
            self._cond.notify_all()
        return future

    def unload_adapter(self, name: str) -> concurrent.futures.Future:
        """Unload `name` once no waiting or running request uses it; new requests for it are
        refused from now on. The future resolves when it is gone."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if name not in self.adapters or name in self._unloading:
                raise ServeError(f"no adapter named {name!r} is loaded; loaded adapters: {list(self.adapters)}", 404,
                                 param="name", code="adapter_not_found")
            if self.router is not None and name in self.router.adapters:
                raise ServeError(f"adapter {name!r} is in the router's library, which needs it; it cannot be unloaded",
                                 409, param="name", code="adapter_in_use")
            self._unloading.add(name)
            self._commands.append(_Command("unload", name, None, future))
            self._cond.notify_all()
        return future

    def _run_commands(self) -> None:
        with self._cond:
            commands = list(self._commands)
        for command in commands:
            if command.kind == "unload" and self._in_use(command.name):
                continue   # waits for its requests to finish
            try:
                if command.kind == "load":
                    self._load(command.name, command.path)
                else:
                    self._unload(command.name)
                command.future.set_result(None)
            except ServeError as e:
                command.future.set_exception(e)
            except Exception as e:   # a bug or an odd file: report it, keep serving
                log.exception("adapter %s of %s failed", command.kind, command.name)
                command.future.set_exception(ServeError(f"{command.kind} of adapter {command.name!r} failed: "
                                                        f"{type(e).__name__}: {e}", 500))
            with self._cond:
                self._commands.remove(command)
                self._loading.discard(command.name)
                if command.kind == "unload":
                    self._unloading.discard(command.name)

    def _in_use(self, name: str) -> bool:
        with self._cond:
            waiting = any(r.adapter == name for r in self._waiting)
        return waiting or any(r.adapter == name for r in self._rows)

    def _load(self, name: str, path: str) -> None:
        try:
            load_adapter(self.model, path, name=name, activate=False)
        except FileNotFoundError as e:
            raise ServeError(str(e), 404, param="path", code="adapter_not_found") from None
        except LoraError as e:
            raise ServeError(f"cannot load adapter {name!r}: {e}", 400, param="path") from None
        try:
            stacks = StackedAdapters(self.model, [*self.adapters, name])
        except LoraError as e:   # DoRA, modules_to_save, conv layers: not servable per row
            delete_adapter(self.model, name)
            raise ServeError(f"adapter {name!r} cannot be served per request: {e}", 400, param="path") from None
        self._stacks, self.adapters = stacks, tuple(stacks.names)
        log.info("loaded adapter %s from %s", name, path)

    def _unload(self, name: str) -> None:
        delete_adapter(self.model, name)
        self._stacks = StackedAdapters(self.model, [a for a in self.adapters if a != name])
        self.adapters = tuple(self._stacks.names)
        log.info("unloaded adapter %s", name)

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        finally:   # also after a bug outside the guarded steps: nothing may wait for a dead engine
            with self._cond:
                self._accepting = False
                self._fail_all(ServeError("the server shut down before this request finished", 503))
                for command in self._commands:
                    if not command.future.done():
                        command.future.set_exception(ServeError("the server shut down", 503))
                self._commands.clear()

    def _serve(self) -> None:
        while True:
            self._run_commands()
            with self._cond:
                if self._abort:
                    self._fail_all(ServeError("the server shut down before this request finished", 503))
                idle = not self._rows and not self._waiting and not self._commands
                if idle and self._stopping:
                    break
                if idle or (not self._rows and not self._waiting):   # only unloads waiting: nothing to run
                    self._cond.wait(timeout=0.5)
                    continue
            try:
                with torch.inference_mode():
                    self._drop([i for i, row in enumerate(self._rows) if row.request.cancelled])
                    self._admit()
                    if self._rows:
                        self._decode()
            except Exception as e:   # a failing pass fails its requests, not the engine
                log.exception("generation step failed")
                self._fail_rows(ServeError(f"generation failed: {type(e).__name__}: {e}", 500))

    def _admit(self) -> None:
        """Take waiting requests into the batch and prefill them together."""
        joining: list[Request] = []
        longest = 0
        with self._cond:
            while self._waiting and len(self._rows) + len(joining) < self.config.max_batch_size:
                request = self._waiting[0]
                if request.cancelled:
                    self._waiting.popleft()
                    continue
                width = max(longest, len(request.prompt_ids))
                if joining and width * (len(joining) + 1) > self.config.max_prefill_tokens:
                    break
                joining.append(self._waiting.popleft())
                longest = width
        if not joining:
            return
        adapters = self._route(joining)
        rows = []
        for request, adapter in zip(joining, adapters, strict=True):
            if adapter is None:
                continue
            rows.append(_Row(request, adapter, TextStream(self.tokenizer, request.params.stop),
                             make_generator(request.params.seed, self.device), len(request.prompt_ids)))
            _emit(request, Started(adapter, len(request.prompt_ids)))
        if rows:
            self._prefill(rows)

    def _route(self, requests: list[Request]) -> list[str | None]:
        """Each request's adapter: its own, or the router's choice for "auto" (None: failed)."""
        adapters: list[str | None] = [r.adapter for r in requests]
        auto = [i for i, r in enumerate(requests) if r.adapter == AUTO]
        if auto:
            try:
                chosen = self.router.choose([requests[i].route_text for i in auto])
            except Exception as e:
                log.exception("routing failed")
                for i in auto:
                    _emit(requests[i], Failed(ServeError(f"routing failed: {type(e).__name__}: {e}", 500)))
                    adapters[i] = None
            else:
                for i, name in zip(auto, chosen, strict=True):
                    adapters[i] = name
        return adapters

    def _prefill(self, rows: list[_Row]) -> None:
        """Run the new rows' distinct (adapter, prompt) pairs (left-padded to the longest) into a
        fresh cache, take every row's first token from its pair's logits, and merge the rows that
        go on into the running batch, each with a copy of its pair's cache row."""
        keys = [(r.adapter, tuple(r.request.prompt_ids)) for r in rows]
        slots = {key: j for j, key in enumerate(dict.fromkeys(keys))}   # each distinct pair's prefill row
        source = [slots[key] for key in keys]                             # the prefill row of each row
        unique = [rows[keys.index(key)] for key in slots]
        width = max(r.length for r in unique)
        ids = torch.full((len(unique), width), self.pad_id, dtype=torch.long)                 # (u, P)
        mask = torch.zeros((len(unique), width), dtype=torch.long)                            # (u, P)
        for i, row in enumerate(unique):
            ids[i, width - row.length:] = torch.tensor(row.request.prompt_ids)
            mask[i, width - row.length:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)                                       # (u, P)
        cache = DynamicCache()
        try:
            logits = self._forward(ids, mask, positions, cache, [r.adapter for r in unique])  # (u, V)
        except Exception as e:
            log.exception("prefill failed")
            for row in rows:
                _emit(row.request, Failed(ServeError(f"generation failed: {type(e).__name__}: {e}", 500)))
            return
        if len(unique) < len(rows):
            logits = logits[torch.tensor(source, device=self.device)]                         # (b, V)
        done = self._take(rows, logits)
        going = [i for i, d in enumerate(done) if not d]
        if not going:
            return
        select = [source[i] for i in going]
        if select != list(range(len(unique))):
            cache.batch_select_indices(torch.tensor(select, device=self.device))
            mask = mask[select]
        self._merge(cache, mask, [rows[i] for i in going])

    def _decode(self) -> None:
        rows = self._rows
        ids = torch.tensor([[r.last] for r in rows], device=self.device)                       # (B, 1)
        positions = torch.tensor([[r.length] for r in rows], device=self.device)               # (B, 1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)         # (B, L+1)
        logits = self._forward(ids, self._mask, positions, self._cache, [r.adapter for r in rows])
        for row in rows:
            row.length += 1
        done = self._take(rows, logits)
        self._drop([i for i, d in enumerate(done) if d])

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: DynamicCache,
                 adapters: list[str]) -> Tensor:
        """(B, vocab) float32 logits of each row's last position."""
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        rows = self._stacks.rows(adapters) if self._stacks.names else nullcontext()
        with rows:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, **extra)
        return out.logits[:, -1, :].float()

    def _take(self, rows: list[_Row], logits: Tensor) -> list[bool]:
        """Choose each row's next token, send its text, and say which rows finished. A row that
        fails here (no token to choose, its text cannot be decoded) fails alone: its request gets
        the error and leaves, the other rows go on."""
        params = [r.request.params for r in rows]
        logits = apply_penalties(logits, params, [r.counts for r in rows])                     # (B, V)
        tokens = choose_tokens(logits, params, [r.generator for r in rows])
        scores = token_logprobs(logits, tokens, [p.logprobs for p in params])
        done = []
        for row, token, score in zip(rows, tokens, scores, strict=True):
            try:
                done.append(self._continue(row, token, score, logits.shape[-1]))
            except Exception as e:
                log.exception("request %s (adapter %s) failed", row.request.id, row.adapter)
                error = e if isinstance(e, ServeError) else ServeError(
                    f"generation failed: {type(e).__name__}: {e}", 500)
                _emit(row.request, Failed(error))
                done.append(True)
        return done

    def _continue(self, row: _Row, token: int | None, score: tuple[float, list[tuple[int, float]]] | None,
                  vocab: int) -> bool:
        """Take `token` as the row's next (with its log-probabilities `score`, if asked for; `vocab`
        the logits' width, for the counts), send its text; whether the row finished."""
        if token is None:
            raise ServeError(f"generation failed: the logits of this request are not finite (NaN or inf) under "
                             f"adapter {row.adapter!r}; its weights may hold NaN or inf", 500, code="non_finite_logits")
        row.last, row.generated = token, row.generated + 1
        if row.request.params.penalised:
            if row.counts is None:
                row.counts = torch.zeros(vocab, dtype=torch.float32, device=self.device)      # (V,)
            row.counts[token] += 1
        if score is not None:
            chosen, top = score
            row.pending.append(TokenLogprobs(self._texts.entry(token, chosen),
                                             tuple(self._texts.entry(t, lp) for t, lp in top), len(row.stream.text)))
        text = row.stream.add(token)
        reason = None
        if row.stream.stopped or token in self.eos_ids:
            reason = "stop"
        elif row.generated >= row.request.params.max_tokens:
            reason = "length"
        if reason is not None:
            text += row.stream.finish()
        if text or (reason is not None and row.pending):
            _emit(row.request, Delta(text, tuple(row.pending)))
            row.pending.clear()
        if reason is not None:
            _emit(row.request, Finished(reason, len(row.request.prompt_ids), row.generated))
        return reason is not None or row.request.cancelled

    # -- the batch's cache -----------------------------------------------------------------------

    def _merge(self, cache: DynamicCache, mask: Tensor, rows: list[_Row]) -> None:
        """Add prefilled rows (their cache and mask) to the running batch, left-padding the
        shorter side to the longer's length."""
        if self._cache is None:
            old_layers, width, old = [], mask.shape[1], 0
        else:
            old_layers, width, old = list(self._cache), max(self._mask.shape[1], mask.shape[1]), self._mask.shape[1]
        new = mask.shape[1]
        merged = DynamicCache()
        if old_layers:
            merged.layers = [_GrowingLayer(torch.cat([F.pad(k1, (0, 0, width - old, 0)), F.pad(k2, (0, 0, width - new, 0))]),
                                           torch.cat([F.pad(v1, (0, 0, width - old, 0)), F.pad(v2, (0, 0, width - new, 0))]))
                             for (k1, v1, _), (k2, v2, _) in zip(old_layers, cache, strict=True)]   # (B+b, h, L', d)
            self._mask = torch.cat([F.pad(self._mask, (width - old, 0)), F.pad(mask, (width - new, 0))])   # (B+b, L')
        else:
            merged.layers = [_GrowingLayer(k, v) for k, v, _ in cache]
            self._mask = mask
        self._cache, self._rows = merged, self._rows + rows
        self._trim()

    def _drop(self, indices: list[int]) -> None:
        """Remove finished or cancelled rows from the batch."""
        if not indices:
            return
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._rows = [self._rows[i] for i in keep]
        self._trim()

    def _trim(self) -> None:
        """Cut the columns that are left padding for every row."""
        lead = int(self._mask.any(dim=0).int().argmax())
        if lead:
            self._mask = self._mask[:, lead:]
            for layer in self._cache.layers:
                layer.trim_left(lead)

    def _fail_rows(self, error: ServeError) -> None:
        for row in self._rows:
            _emit(row.request, Failed(error))
        self._rows, self._cache, self._mask = [], None, None

    def _fail_all(self, error: ServeError) -> None:
        self._fail_rows(error)
        while self._waiting:
            _emit(self._waiting.popleft(), Failed(error))


class _GrowingLayer(DynamicLayer):
    """A cache layer whose keys and values are views into buffers with room to grow along the
    sequence: a decode step writes its one position in place, where `DynamicLayer` concatenates
    (a copy of the whole layer cache at every step). A full buffer grows by half its length at
    least, so the copies cost O(1) per token amortised; a batch change (rows leaving, the left
    padding cut) copies into fresh buffers."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:   # (B, kv_heads, L, head_dim) each
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._fill(keys, values)

    def _fill(self, keys: Tensor, values: Tensor, need: int = 0) -> None:
        length = keys.shape[-2]
        room = max(length + need, length + max(64, length // 2))
        self._keys = keys.new_empty(*keys.shape[:2], room, keys.shape[-1])          # (B, h, room, d)
        self._values = values.new_empty(*values.shape[:2], room, values.shape[-1])
        self._keys[:, :, :length] = keys
        self._values[:, :, :length] = values
        self._length = length
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self._keys[:, :, :self._length], self._values[:, :, :self._length]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        n = key_states.shape[-2]
        if self._length + n > self._keys.shape[-2]:
            self._fill(self.keys, self.values, need=n)
        self._keys[:, :, self._length:self._length + n] = key_states
        self._values[:, :, self._length:self._length + n] = value_states
        self._length += n
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        self._fill(self.keys[indices], self.values[indices])

    def trim_left(self, n: int) -> None:
        self._fill(self.keys[:, :, n:], self.values[:, :, n:])


def _emit(request: Request, event: Event) -> None:
    try:
        request.sink(event)
    except Exception:   # a consumer that went away must not stop the engine
        log.exception("delivering an event to request %s failed", request.id)


def _context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """The tokenizer's end-of-sequence id and the generation config's (one id or a list)."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _check_cache_layers(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None:
        raise LoraError(f"serving needs a transformers model with a config; got {type(model).__name__}")
    kinds = {type(layer).__name__ for layer in DynamicCache(config=config).layers}
    if kinds - {DynamicLayer.__name__}:
        raise LoraError(f"serving supports models whose KV cache layers are plain full attention; "
                        f"{type(model).__name__} uses {sorted(kinds)} (sliding window or another kind), which the "
                        "batching engine cannot left-pad and merge")
