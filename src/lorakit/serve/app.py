"""The HTTP API: a FastAPI app over an `Engine`, OpenAI-compatible.

    GET    /health                     engine alive, requests running and waiting, adapters skipped at start
    GET    /v1/models                  the base model, every loaded adapter (and "auto" with a router)
    GET    /v1/models/{model}
    POST   /v1/completions             prompt -> text
    POST   /v1/chat/completions        messages -> reply, through the tokenizer's chat template
    POST   /v1/adapters                {"name": NAME, "path": PATH}: load an adapter from the adapters dir
    DELETE /v1/adapters/{name}         unload it once its requests are done

`model` names an adapter, the base model's own name means no adapter, and "auto" lets the
semantic router pick. With `"stream": true` the text comes as server-sent events (`data: {...}`
chunks, then `data: [DONE]`). With `n` > 1 each prompt is submitted n times to the engine, choice
i seeded `seed + i` (`sampling.choice_seed`); the engine prefills the copies once, and a stream
interleaves the choices' chunks, each with its `index`.

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status
for a request at fault: 400 bad parameter or too long, 403 a path outside the adapters
directory, 404 unknown model, 408 over the time limit, 409 name taken, 413 body too large, 429
queue full. Each request runs under `request_timeout_s`; a client that goes away cancels its
request. Request bodies are read up to `max_body_bytes`, within `body_timeout_s`, and must be
UTF-8 (RFC 8259), before any parsing.

Slow clients hold nothing for long: a body that has not arrived after `body_timeout_s` is a 408;
a stream whose client stops reading (its sends block once the socket's buffers are full) is cut
off at the request's time limit, its request cancelled and the connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LoraError
from ..inject import BASE_NAME
from ..model_io import encode_prompt
from .engine import Delta, Engine, Failed, Finished, Started
from .errors import ServeError
from .protocol import (
    AdapterLoad,
    ChatRequest,
    CompletionRequest,
    chat_chunk,
    chat_completion,
    chat_logprobs,
    completion,
    completion_chunk,
    completion_logprobs,
    model_card,
    new_id,
    now,
    usage,
    usage_chunk,
)
from .registry import AUTO, check_adapter_name, resolve_adapter_dir
from .sampling import SamplingParams, TokenLogprobs, choice_seed

log = logging.getLogger("lorakit.serve")


def create_app(engine: Engine, base_name: str, adapters_dir: str | Path | None = None,
               skipped: dict[str, str] | None = None) -> FastAPI:
    """The app serving `engine`. `base_name` is the model name that means "no adapter";
    `adapters_dir` is where `POST /v1/adapters` may load from (None: run-time loading is off);
    `skipped` ({name: reason}, the adapters dir's subdirectories not served) is shown in /health.
    The app's lifespan starts the engine and, at shutdown, lets in-flight requests finish for up to
    `shutdown_timeout_s` before cancelling them."""
    config = engine.config
    spelled = Path(adapters_dir).absolute() if adapters_dir is not None else None
    root = Path(adapters_dir).resolve(strict=True) if adapters_dir is not None else None
    created = now()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not engine.alive:
            engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_BodyReader, limit=config.max_body_bytes, timeout_s=config.body_timeout_s)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_message(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error_response(ServeError(str(e.detail), e.status_code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(ServeError(f"internal error: {type(e).__name__}", 500))

    # -- models --------------------------------------------------------------------------------

    def cards() -> list[dict]:
        data = [model_card(base_name, created, None)]
        data += [model_card(a, created, base_name) for a in engine.adapters]
        if engine.router is not None:
            data.append(model_card(AUTO, created, base_name))
        return data

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "ok" if engine.alive else "down", **engine.stats(), "adapters": len(engine.adapters),
                "skipped": skipped or {}}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": cards()}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict:
        for card in cards():
            if card["id"] == model:
                return card
        raise ServeError(f"model {model!r} does not exist", 404, param="model", code="model_not_found")

    # -- adapters ------------------------------------------------------------------------------

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterLoad) -> dict:
        if root is None:
            raise ServeError("loading adapters at run time is off: start the server with --adapters-dir DIR", 403,
                             code="adapter_loading_disabled")
        name = check_adapter_name(body.name, base_name)
        directory = await asyncio.to_thread(resolve_adapter_dir, root, body.path, spelled)
        await asyncio.wrap_future(engine.load_adapter(name, str(directory)))
        return model_card(name, now(), base_name)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict:
        if name == base_name:
            raise ServeError(f"{name!r} is the base model; it cannot be unloaded", 400, param="name")
        await asyncio.wrap_future(engine.unload_adapter(name))
        return {"id": name, "object": "model", "deleted": True}

    # -- generation ----------------------------------------------------------------------------

    def adapter_of(model: str) -> str:
        return BASE_NAME if model == base_name else model

    def jobs_of(body, prompt_ids: list[int], limit: int | None, default: int | None, alternatives: int | None,
                route_text: str) -> list[tuple[list[int], SamplingParams, str]]:
        """The `n` engine jobs of one prompt, choice i seeded `choice_seed(seed, i)`."""
        max_tokens = limit if limit is not None else engine.default_max_tokens(len(prompt_ids))
        if limit is None and default is not None:
            max_tokens = min(default, max_tokens)
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                                top_p=1.0 if body.top_p is None else body.top_p, stop=body.stop_strings(),
                                presence_penalty=body.presence_penalty or 0.0,
                                frequency_penalty=body.frequency_penalty or 0.0, logprobs=alternatives)
        return [(prompt_ids, replace(params, seed=choice_seed(body.seed, i)), route_text) for i in range(body.choices)]

    def check_choices(prompts: int, n: int) -> None:
        if prompts * n > config.max_batch_size:
            raise ServeError(f"{prompts} prompt(s) x n={n} = {prompts * n} choices in one request; at most "
                             f"{config.max_batch_size} (max_batch_size)", 400, param="n" if n > 1 else "prompt")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.check_supported()
        prompts = body.prompts()
        check_choices(len(prompts), body.choices)
        jobs = []
        for p in prompts:
            ids = p if isinstance(p, list) else encode_prompt(engine.tokenizer, prompt=p)
            text = p if isinstance(p, str) else engine.tokenizer.decode(p, skip_special_tokens=True)
            jobs += jobs_of(body, ids, body.max_tokens, 16, body.logprobs, text)
        run = _Run(engine, adapter_of(body.model), jobs, body.choices, request, config.request_timeout_s)
        await run.start()
        rid, created_at = new_id("cmpl"), now()
        wanted = body.logprobs is not None

        def logprobs(entries: list[TokenLogprobs]) -> dict | None:
            return completion_logprobs(entries if wanted else None)

        if not body.stream:
            results = await run.collect()
            model = run.model_name(base_name, body.model)
            return completion(rid, created_at, model, [(r.text, r.reason, logprobs(r.logprobs)) for r in results],
                              run.usage())

        async def events() -> AsyncIterator[str]:
            model = run.model_name(base_name, body.model)
            async for index, text, entries, reason in run.stream():
                yield _sse(completion_chunk(rid, created_at, model, index, text, reason, logprobs(entries)))
            if body.include_usage:
                yield _sse(usage_chunk(rid, created_at, model, "text_completion", run.usage()))
            yield "data: [DONE]\n\n"

        return _streaming(run, events())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        body.check_supported()
        messages = body.chat_messages()
        try:
            ids = encode_prompt(engine.tokenizer, messages=messages)
        except LoraError as e:
            raise ServeError(f"{e}; use /v1/completions", 400, param="messages") from None
        except TemplateError as e:
            raise ServeError(f"the chat template refused these messages: {e}", 400, param="messages") from None
        check_choices(1, body.choices)
        jobs = jobs_of(body, ids, body.token_limit, None, body.alternatives, body.route_text())
        run = _Run(engine, adapter_of(body.model), jobs, body.choices, request, config.request_timeout_s)
        await run.start()
        rid, created_at = new_id("chatcmpl"), now()
        wanted = body.alternatives is not None

        def logprobs(entries: list[TokenLogprobs]) -> dict | None:
            return chat_logprobs(entries if wanted else None)

        if not body.stream:
            results = await run.collect()
            return chat_completion(rid, created_at, run.model_name(base_name, body.model),
                                   [(r.text, r.reason, logprobs(r.logprobs)) for r in results], run.usage())

        async def events() -> AsyncIterator[str]:
            model = run.model_name(base_name, body.model)
            for index in range(body.choices):
                yield _sse(chat_chunk(rid, created_at, model, index, {"role": "assistant", "content": ""}, None))
            async for index, text, entries, reason in run.stream():
                if text or entries:
                    yield _sse(chat_chunk(rid, created_at, model, index, {"content": text}, None, logprobs(entries)))
                if reason is not None:
                    yield _sse(chat_chunk(rid, created_at, model, index, {}, reason))
            if body.include_usage:
                yield _sse(usage_chunk(rid, created_at, model, "chat.completion.chunk", run.usage()))
            yield "data: [DONE]\n\n"

        return _streaming(run, events())

    return app


class _Result:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.logprobs: list[TokenLogprobs] = []
        self.reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.adapter: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class _Run:
    """The engine requests of one HTTP request (one per choice: `n` per prompt, in a row), their
    events on one asyncio queue, the time limit, and cancellation when the client goes away."""

    def __init__(self, engine: Engine, adapter: str, jobs: list[tuple[list[int], SamplingParams, str]], n: int,
                 http: Request, timeout_s: float) -> None:
        self.engine, self.adapter, self.jobs, self.n, self.http = engine, adapter, jobs, n, http
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.results = [_Result() for _ in jobs]
        self.requests = []
        self.events: asyncio.Queue = asyncio.Queue()
        self.pending: list[tuple[int, object]] = []   # text that arrived before every prompt started
        self.watch_client = True   # off once streaming: the response then notices a disconnect itself

    async def start(self) -> None:
        """Submit every choice, all at once, and wait until each has started (so an error before
        any text, such as a routing failure, is an HTTP error, not a broken stream)."""
        loop = asyncio.get_running_loop()

        def sink_of(index: int) -> Callable[[object], None]:
            return lambda event: loop.call_soon_threadsafe(self.events.put_nowait, (index, event))

        jobs = [(ids, params, sink_of(i), route_text) for i, (ids, params, route_text) in enumerate(self.jobs)]
        try:
            self.requests = self.engine.submit_all(jobs, self.adapter)
            started = 0
            while started < len(self.jobs):
                index, event = await self._next()
                if isinstance(event, Started):
                    self.results[index].adapter = event.adapter
                    self.results[index].prompt_tokens = event.prompt_tokens
                    started += 1
                elif isinstance(event, Failed):
                    raise event.error
                else:
                    self.pending.append((index, event))
        except BaseException:
            self.cancel()
            raise

    async def _next(self) -> tuple[int, object]:
        """The next event, watching the time limit and the client's connection."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise ServeError(f"the request ran past this server's time limit of {self.timeout_s:g} s "
                                 "(request_timeout_s); ask for fewer tokens", 408, code="timeout")
            try:
                return await asyncio.wait_for(self.events.get(), timeout=min(left, 1.0))
            except asyncio.TimeoutError:
                if self.watch_client and await self.http.is_disconnected():
                    raise ServeError("the client closed the connection", 499) from None

    async def stream(self) -> AsyncIterator[tuple[int, str, list[TokenLogprobs], str | None]]:
        """(choice index, new text, its tokens' log-probability entries, finish reason or None)
        until every choice has finished."""
        open_ = len(self.jobs)
        while open_:
            index, event = self.pending.pop(0) if self.pending else await self._next()
            result = self.results[index]
            if isinstance(event, Delta):
                result.parts.append(event.text)
                result.logprobs.extend(event.logprobs)
                yield index, event.text, list(event.logprobs), None
            elif isinstance(event, Finished):
                result.reason = event.reason
                result.prompt_tokens, result.completion_tokens = event.prompt_tokens, event.completion_tokens
                open_ -= 1
                yield index, "", [], event.reason
            elif isinstance(event, Failed):
                raise event.error

    async def collect(self) -> list[_Result]:
        try:
            async for _ in self.stream():
                pass
        finally:
            self.cancel()
        return self.results

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    def usage(self) -> dict:
        """Every choice's completion tokens; each prompt's tokens once, however many choices it has
        (as OpenAI counts them)."""
        return usage(sum(r.prompt_tokens for r in self.results[::self.n]),
                     sum(r.completion_tokens for r in self.results))

    def model_name(self, base_name: str, asked: str) -> str:
        """The model that answered: the adapter the router chose for "auto" (when all prompts
        went to one), else the name asked for."""
        chosen = {r.adapter for r in self.results}
        if asked == AUTO and len(chosen) == 1:
            (adapter,) = chosen
            return base_name if adapter == BASE_NAME else adapter
        return asked


# how long past its request's deadline a stream may take to send its last chunks (the 408 it sends
# at the deadline); only a client that has stopped reading takes longer
_LAST_CHUNKS_S = 1.0


def _streaming(run: _Run, events: AsyncIterator[str]) -> StreamingResponse:
    run.watch_client = False

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in events:
                yield chunk
        except ServeError as e:   # after the headers: the error goes into the stream, as OpenAI does
            yield _sse(e.body())
        finally:
            run.cancel()

    return _TimedStream(run, body())


class _TimedStream(StreamingResponse):
    """Server-sent events that end by their request's deadline even when the client stops reading.
    Such a client's sends block (the socket's buffers are full) and no disconnect ever comes, so
    without the bound its connection and task would be held for as long as it stays connected.
    Cut off, the response is left incomplete and uvicorn closes the connection."""

    def __init__(self, run: _Run, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await asyncio.wait_for(super().__call__(scope, receive, send),
                                   max(0.0, self.run.deadline - time.monotonic()) + _LAST_CHUNKS_S)
        except asyncio.TimeoutError:
            log.warning("a stream was cut off at the time limit of %g s (request_timeout_s): its client stopped "
                        "reading", self.run.timeout_s)
        finally:
            self.run.cancel()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _error_response(e: ServeError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _validation_message(errors: list[dict]) -> ServeError:
    """The first validation error as a 400 naming the parameter. For a value a union refused, the
    error of the member of the right kind (a list's length, not "should be a valid string")."""
    relevant = [e for e in errors if not str(e.get("type", "")).endswith("_type")] or errors
    first = relevant[0] if relevant else {"loc": (), "msg": "invalid request"}
    # field names and list indices; pydantic's union member tags ("constrained-str", "list[int]") are no parameter
    loc = [str(x) for x in first.get("loc", ())[1:] if isinstance(x, int) or (str(x).isidentifier() and str(x)
                                                                                not in _TYPE_TAGS)]
    if first.get("type") == "json_invalid":
        return ServeError(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                          400)
    param = ".".join(loc) or None
    if first.get("type") == "missing" and loc:
        return ServeError(f"{param} is required", 400, param=param)
    return ServeError(f"{param + ': ' if param else ''}{first['msg']}", 400, param=param)


class _BodyReader:
    """Pure ASGI middleware: read a request body up to `limit` bytes (413 past it, whether the
    client declared the length or streams it chunked) and within `timeout_s` (408 past it, so a
    body sent a byte at a time holds its connection no longer), check it is UTF-8 (400: JSON is
    UTF-8, and the app's parser would give an unhelpful error), then hand it on to the app.

    A body over the limit is still read, and dropped, up to twice the limit before the 413 goes
    out: a client that writes its whole body before reading the answer (most do) then gets the
    413 rather than a broken pipe. Beyond twice the limit the server answers and closes at once."""

    def __init__(self, app, limit: int, timeout_s: float) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            declared = None if declared is None else int(declared)
        except ValueError:
            return await _send_error(send, ServeError("the Content-Length header is not a number", 400))
        if declared is not None and declared > 2 * self.limit:
            return await _send_error(send, self._too_large(f"{declared} bytes"))
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except asyncio.TimeoutError:
            return await _send_error(send, ServeError(
                f"the request body did not arrive within this server's limit of {self.timeout_s:g} s "
                "(body_timeout_s); send it whole, at once", 408, code="timeout"))
        except ServeError as e:
            return await _send_error(send, e)
        if body is None:   # the client went away
            return
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return await _send_error(send, ServeError(
                f"the request body is not valid UTF-8 (byte {e.start}: {body[e.start:e.start + 4]!r}); send JSON "
                "encoded as UTF-8", 400))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        """The whole body (None if the client went away); a ServeError 413 past the limit."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            more = message.get("more_body", False)
            size += len(message.get("body", b""))
            if size <= self.limit:
                chunks.append(message.get("body", b""))
            elif not more or size > 2 * self.limit:
                raise self._too_large(f"{size} bytes" if not more else f"over {2 * self.limit} bytes so far")
        return b"".join(chunks)

    def _too_large(self, size: str) -> ServeError:
        return ServeError(f"the request body ({size}) is larger than this server's limit of {self.limit} bytes "
                          "(max_body_bytes)", 413, code="request_too_large")


async def _send_error(send, e: ServeError) -> None:
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

