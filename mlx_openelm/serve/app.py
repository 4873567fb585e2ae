"""A local OpenAI-compatible HTTP server for OpenELM (``mlx-openelm serve``).

Routes: ``POST /v1/chat/completions`` (messages through the model's chat template),
``POST /v1/completions`` (raw prompt), both streaming (server-sent events ending in
``data: [DONE]``) or not; ``GET /v1/models`` and ``GET /health``. Built on Starlette and
uvicorn (the ``[serve]`` extra). Requests are decoded together on a worker thread
(:mod:`mlx_openelm.serve.engine`: continuous batching, prompt-prefix KV caches of several
conversations); a full queue answers 429, a client that disconnects leaves the batch, browsers
from ``allowed_origins`` get CORS headers and others a 403. Each request is logged as one line
on the ``mlx_openelm.server`` logger (method, path, status, tokens, seconds).

    app = create_app(model, tokenizer, "OpenELM-270M-Instruct", ServerSettings(api_key="k"))
    with BackgroundServer(app) as url:   # or serve(...) from the CLI
        OpenAI(base_url=url, api_key="k").chat.completions.create(...)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import mlx.nn as nn

from ..errors import OpenELMError, TokenizerError
from .http import (  # first: a one-line ServeError when the [serve] extra is missing
    AccessLog,
    BackgroundServer,
    BearerAuth,
    Cors,
    RequestLog,
    bind,
    json_body,
    on_api_error,
    on_crash,
    on_http_error,
    run,
    url_of,
)

# isort: split
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Engine, Event, Failed, Finished, Job, Piece, QueueFull
from .responses import ChatFormat, CompletionFormat, token_texts, usage
from .schema import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    APIError,
    CompletionRequest,
    ServerSettings,
    parse_request,
)

__all__ = [
    "BackgroundServer",
    "ServerSettings",
    "bind",
    "create_app",
    "model_id_for",
    "run",
    "serve",
    "url_of",
]


class _Api:
    """The routes' state: model, tokenizer, engine and settings."""

    def __init__(self, model: nn.Module, tokenizer: Any, model_id: str, settings: ServerSettings):
        self.tokenizer, self.model_id, self.settings = tokenizer, model_id, settings
        self.engine = Engine(
            model, tokenizer, max_queue=settings.max_queue, max_batch=settings.max_batch,
            cache_bytes=settings.cache_bytes,
        )  # fmt: skip
        if settings.prompt_cache_file is not None:
            from ..prompt_cache import load_or_build_prefix

            cache, tokens = load_or_build_prefix(
                settings.prompt_cache_file, model, tokenizer, settings.cache_system_prompt
            )
            self.engine.prefix_cache.put(cache, tokens, pinned=True)
        self.context = int(model.args.max_context_length)
        self.vocab_size = int(model.args.vocab_size)
        self.texts = token_texts(tokenizer.get_vocab())
        self.created = int(time.time())

    async def health(self, request: Request) -> Response:
        engine = self.engine
        return JSONResponse(
            {
                "status": "ok",
                "model": self.model_id,
                "busy": engine.busy,
                "pending": engine.pending,
                "requests": vars(engine.stats),
                "max_batch": engine.max_batch,
                "prompt_cache": engine.prefix_cache.stats.to_dict(),
            }
        )

    async def models(self, request: Request) -> Response:
        model = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "mlx-openelm",
            "context_length": self.context,
            "prompt_cache": self.engine.prefix_cache.stats.to_dict(),
            # applied to every request: per-request adapters would need per-row LoRA in a batch
            "adapters": [self.settings.adapter] if self.settings.adapter else [],
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def _parse(self, request: Request, *, chat: bool) -> CompletionRequest:
        body = await json_body(request)
        defaults = self.settings.generation
        return parse_request(body, chat=chat, defaults=defaults, vocab_size=self.vocab_size)

    async def chat(self, request: Request) -> Response:
        req = await self._parse(request, chat=True)
        if self.tokenizer.chat_template is None:
            raise APIError(
                400,
                f"{self.model_id} has no chat template (a base model); send a raw prompt to "
                "/v1/completions instead",
                param="messages",
            )
        ids = await _encode(self.tokenizer.encode_chat, req.messages, param="messages")
        return await self._complete(request, req, ids, "messages", ChatFormat)

    async def completions(self, request: Request) -> Response:
        req = await self._parse(request, chat=False)
        if isinstance(req.prompt, str):  # like mlx_openelm.generate: BOS unless already there
            bos = not req.prompt.startswith(self.tokenizer.bos_token)
            ids = await _encode(self.tokenizer.encode, req.prompt, bos, param="prompt")
        else:
            ids = req.prompt
            if max(ids) >= len(self.texts):
                raise APIError(
                    400,
                    f"`prompt` has token id {max(ids)}, outside the {len(self.texts)}-token "
                    "vocabulary",
                    param="prompt",
                )
        return await self._complete(request, req, ids, "prompt", CompletionFormat)

    async def _complete(
        self,
        request: Request,
        req: CompletionRequest,
        ids: list[int],
        param: str,
        fmt_class: type[ChatFormat] | type[CompletionFormat],
    ) -> Response:
        room = self.context - len(ids)
        if room < 1:
            raise APIError(
                400,
                f"the prompt is {len(ids)} tokens long but {self.model_id}'s context holds "
                f"{self.context} tokens (prompt + reply); shorten `{param}` by at least "
                f"{1 - room} tokens",
                param=param,
                code="context_length_exceeded",
            )
        stats = RequestLog(prompt=len(ids))
        request.scope["state"]["generation"] = stats
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        max_tokens = min(req.max_tokens or self.settings.generation.max_tokens, room)
        job = Job(
            ids=ids,
            options=req.options.replace(max_tokens=max_tokens),
            sink=_threadsafe_sink(loop, events),
            top_logprobs=req.top_logprobs,
        )
        try:
            self.engine.submit(job)
        except QueueFull as e:
            raise APIError(
                429,
                f"the server is busy ({e}); retry in a moment",
                code="queue_full",
                kind="server_overloaded",
            ) from e
        fmt = fmt_class(self.model_id, self.texts)
        if req.stream:
            body = _sse(fmt, req, _events(events, stats))
            return _JobStream(body, job, stats)
        return await self._collect(request, job, events, fmt, req, stats)

    async def _collect(
        self,
        request: Request,
        job: Job,
        events: asyncio.Queue[Event | None],
        fmt: ChatFormat | CompletionFormat,
        req: CompletionRequest,
        stats: RequestLog,
    ) -> Response:
        texts: list[str] = []
        logprobs = [] if req.top_logprobs is not None else None
        # Nobody else reads from the client now: watch for it hanging up.
        watcher = asyncio.create_task(_wait_for_disconnect(request, events))
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, Failed):
                    raise _failure(event)
                if isinstance(event, Finished):
                    stats.cached = event.cached_tokens
                    counts = usage(event.prompt_tokens, event.completion_tokens, stats.cached)
                    text = "".join(texts)
                    return JSONResponse(fmt.body(text, event.finish_reason, counts, logprobs))
                stats.completion += 1
                texts.append(event.text)
                if logprobs is not None and event.logprob is not None:
                    logprobs.append(event.logprob)
        finally:
            watcher.cancel()
        job.cancelled.set()
        stats.disconnected = True
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it


async def _encode(encode: Callable[..., list[int]], *args: Any, param: str) -> list[int]:
    """Tokenize off the event loop (a long prompt takes a while); template errors are 400s."""
    try:
        return await asyncio.to_thread(encode, *args)
    except TokenizerError as e:
        raise APIError(400, str(e), param=param) from e


async def _wait_for_disconnect(request: Request, events: asyncio.Queue) -> None:
    """Put ``None`` on ``events`` once the client disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait(None)


def _threadsafe_sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable:
    def sink(event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
            loop.call_soon_threadsafe(events.put_nowait, event)

    return sink


async def _events(events: asyncio.Queue[Event | None], stats: RequestLog) -> AsyncIterator[Event]:
    while True:
        event = await events.get()
        if isinstance(event, Piece):
            stats.completion += 1
        else:
            stats.finished = True
            if isinstance(event, Finished):
                stats.cached = event.cached_tokens
        yield event
        if not isinstance(event, Piece):
            return


def _failure(event: Failed) -> APIError:
    status = 400 if isinstance(event.error, OpenELMError) else 500
    kind = "invalid_request_error" if status == 400 else "server_error"
    return APIError(status, f"generation failed: {event.error}", kind=kind)


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _sse(
    fmt: ChatFormat | CompletionFormat, req: CompletionRequest, events: AsyncIterator[Event]
) -> AsyncIterator[str]:
    """OpenAI's stream: chunks as ``data:`` lines, a usage chunk if asked, then ``[DONE]``."""
    first = fmt.first_chunk()
    if first is not None:
        yield _data(first)
    async for event in events:
        if isinstance(event, Piece):
            lp = None if req.top_logprobs is None else ([event.logprob] if event.logprob else [])
            if event.text or lp:
                yield _data(fmt.piece_chunk(event.text, lp))
        elif isinstance(event, Finished):
            yield _data(fmt.final_chunk(event.finish_reason))
            if req.include_usage:
                counts = usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
                yield _data(fmt.usage_chunk(counts))
        else:
            yield _data(_failure(event).body())
    yield "data: [DONE]\n\n"


class _JobStream(StreamingResponse):
    """An SSE response that cancels its job when it ends early (the client disconnected)."""

    def __init__(self, body: AsyncIterator[str], job: Job, stats: RequestLog) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self.job, self.stats = job, stats

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette stops streaming quietly when the client goes away: then the generation
            # has not finished, and its job is cancelled (a no-op for a finished job).
            self.stats.disconnected = not self.stats.finished
            self.job.cancelled.set()


def create_app(
    model: nn.Module, tokenizer: Any, model_id: str, settings: ServerSettings | None = None
) -> Starlette:
    """The ASGI app serving ``model`` under the name ``model_id``.

    The generation worker starts and stops with the app's lifespan (any ASGI server runs it).

    Raises:
        GenerationError, ServeError: a setting is out of range.
    """
    settings = settings or ServerSettings()
    settings.check()
    api = _Api(model, tokenizer, model_id, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        api.engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, api.engine.stop)

    middleware = [Middleware(AccessLog), Middleware(Cors, origins=settings.allowed_origins)]
    if settings.api_key:
        middleware.append(Middleware(BearerAuth, api_key=settings.api_key))
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ]
    handlers = {APIError: on_api_error, HTTPException: on_http_error, Exception: on_crash}
    return Starlette(
        routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan
    )


def _with_model_defaults(settings: ServerSettings, model: str | Path, tok: Any) -> ServerSettings:
    """The settings with the model's decoding defaults under the operator's flags."""
    from ..decoding_defaults import with_model_defaults
    from ..loading import resolve_model_path

    generation = with_model_defaults(
        settings.generation, resolve_model_path(model), instruct=tok.chat_template is not None,
        explicit=settings.explicit,
    )  # fmt: skip
    return dataclasses.replace(settings, generation=generation)


def model_id_for(model: str | Path) -> str:
    """The name ``/v1/models`` reports: a hub repo id as given, a local folder's name."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else str(model)


def serve(
    model: str | Path,
    *,
    adapter_path: str | Path | None = None,
    tokenizer: str | Path | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    settings: ServerSettings | None = None,
    on_ready: Callable[[str, str], None] | None = None,
) -> None:
    """Load ``model`` and serve it until interrupted; ``on_ready(base_url, model_id)`` first.

    Raises:
        ServeError: the port is taken. ModelNotFoundError etc.: the model cannot be loaded.
    """
    from ..generate import load_for_generation

    settings = settings or ServerSettings()
    settings.check()
    with contextlib.closing(bind(host, port)) as sock:  # before loading: fail fast
        loaded, tok, _ = load_for_generation(model, adapter_path, tokenizer)
        settings = _with_model_defaults(settings, model, tok)
        if adapter_path is not None:
            settings = dataclasses.replace(settings, adapter=Path(adapter_path).name)
        model_id = model_id_for(model)
        app = create_app(loaded, tok, model_id, settings)
        if on_ready is not None:
            on_ready(url_of(sock), model_id)
        run(app, sock)
