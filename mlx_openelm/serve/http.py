"""The server's HTTP plumbing on Starlette and uvicorn (the ``[serve]`` extra).

Request bodies, OpenAI-style error responses, the access log (one line per request), bearer-token
auth, binding a socket, and running uvicorn in the foreground or on a background thread.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import DataError, ServeError, short
from ..jsonio import parse_json
from .schema import DEFAULT_HOST, DEFAULT_PORT, APIError, invalid

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ModuleNotFoundError as e:  # the [serve] extra is optional
    raise ServeError(
        f"`mlx-openelm serve` needs the server extra ({e.name} is not installed): "
        'pip install -e ".[serve]"  (or: pip install "mlx-openelm[serve]")'
    ) from e

__all__ = ["BackgroundServer", "Cors", "RequestLog", "bind", "run", "url_of"]

log = logging.getLogger("mlx_openelm.server")

MAX_BODY_BYTES = 4 * 1024 * 1024
# A client must send its request line and headers within HEADER_TIMEOUT_S of connecting (or of
# its previous response) and its body within BODY_TIMEOUT_S: a slow or silent client cannot hold
# a connection open (uvicorn itself times out only idle keep-alive connections).
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
OPEN_PATHS = ("/health",)  # answered without the API key


@dataclass
class RequestLog:
    """What the access-log line reports about a generation request."""

    prompt: int = 0
    cached: int = 0
    completion: int = 0
    finished: bool = False  # the generation ended (or failed) rather than being cut off
    disconnected: bool = False


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, read within ``BODY_TIMEOUT_S`` and ``MAX_BODY_BYTES``.

    Raises:
        APIError: 408 (too slow), 413 (too large), 400 (not a JSON object; a lone surrogate,
            naming the field as ``param``).
    """
    raw = bytearray()
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > MAX_BODY_BYTES:
                    raise APIError(413, f"the request body is over {MAX_BODY_BYTES // 2**20} MiB")
    except TimeoutError:
        raise APIError(
            408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s; send it at once"
        ) from None
    try:
        body = parse_json(bytes(raw), "the request body", DataError, "send one JSON object", dict)
    except DataError as e:
        path = getattr(e, "json_path", None)
        if path:  # a lone surrogate names its field, as every other 400 does
            raise invalid(
                path, "holds a lone UTF-16 surrogate (\\ud800-\\udfff); send valid Unicode text"
            ) from None
        raise APIError(400, str(e)) from None
    return body


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        message = (
            f"no route {where}; this server answers POST /v1/chat/completions, "
            "POST /v1/completions, GET /v1/models and GET /health"
        )
    else:
        message = f"{where}: {exc.detail}"
    return error_response(APIError(exc.status_code, message), headers=exc.headers)


async def on_crash(request: Request, exc: Exception) -> Response:
    error = APIError(500, f"internal server error: {type(exc).__name__}", kind="server_error")
    return error_response(error)


class AccessLog:
    """ASGI middleware: one log line per request, also for streams cut off by the client."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]
        state = scope.setdefault("state", {})

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            parts = [scope["method"], scope["path"], str(status[0])]
            gen: RequestLog | None = state.get("generation")
            if gen is not None:
                parts.append(f"prompt={gen.prompt} (cached {gen.cached})")
                parts.append(f"completion={gen.completion}")
                if gen.disconnected:
                    parts.append("client-disconnected")
            log.info("%s %.3fs", " ".join(parts), time.perf_counter() - start)


class BearerAuth:
    """ASGI middleware: 401 unless ``Authorization: Bearer <api_key>`` (except OPEN_PATHS)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self._expected = app, api_key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token, self._expected):
                error = APIError(
                    401,
                    "missing or wrong API key: send the header `Authorization: Bearer <key>` "
                    "with the key the server was started with (--api-key)",
                    code="invalid_api_key",
                    kind="authentication_error",
                )
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Cors:
    """ASGI middleware: cross-origin requests from browsers, for the ``origins`` allowed.

    A request without an ``Origin`` header (every non-browser client) passes untouched. One
    from an allowed origin (``"*"`` allows all) gets ``Access-Control-Allow-Origin``; a preflight
    (``OPTIONS`` with ``Access-Control-Request-Method``) is answered here, before auth, with the
    methods and headers it may use. Any other origin gets a 403 in OpenAI's error shape.
    """

    METHODS = "GET, POST, OPTIONS"
    MAX_AGE = "600"  # seconds a browser may keep a preflight's answer

    def __init__(self, app: Any, origins: tuple[str, ...] = ()) -> None:
        self.app, self.origins = app, frozenset(origins)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope["headers"]) if scope["type"] == "http" else {}
        origin = headers.get(b"origin", b"").decode("latin-1")
        if not origin:
            await self.app(scope, receive, send)
            return
        if "*" not in self.origins and origin not in self.origins:
            error = APIError(
                403,
                f"origin {short(origin, 100)} is not allowed; start the server with "
                f"--allowed-origins {short(origin, 100)} (or '*' for any)",
                param="Origin",
                code="origin_not_allowed",
                kind="permission_error",
            )
            await error_response(error, headers={"Vary": "Origin"})(scope, receive, send)
            return
        allow = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            asked = headers.get(b"access-control-request-headers", b"").decode("latin-1")
            allow |= {
                "Access-Control-Allow-Methods": self.METHODS,
                "Access-Control-Allow-Headers": asked or "Authorization, Content-Type",
                "Access-Control-Max-Age": self.MAX_AGE,
            }
            await Response(status_code=204, headers=allow)(scope, receive, send)
            return
        extra = [(k.lower().encode(), v.encode("latin-1")) for k, v in allow.items()]

        async def send_with_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_cors)


def bind(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port).

    Raises:
        ServeError: the address is in use or cannot be bound.
    """
    if type(port) is not int or not 0 <= port <= 65535:
        raise ServeError(f"--port must be between 0 and 65535 (0: any free port), got {port!r}")
    try:
        return socket.create_server((host, port))
    except (OSError, ValueError, UnicodeError) as e:
        raise ServeError(
            f"cannot listen on {short(host, 80)}:{port} ({getattr(e, 'strerror', None) or e}); "
            "pass another --host/--port, or stop "
            "the program that uses it"
        ) from e


def url_of(sock: socket.socket) -> str:
    """The API base URL (``http://host:port/v1``) of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


class _TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers do not arrive within
    ``HEADER_TIMEOUT_S`` (of connecting, or of the previous response on a kept-alive one)."""

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        waiting = self.cycle is None or self.cycle.response_complete  # no request under way
        if waiting and not self.transport.is_closing():
            log.warning("closed a connection whose request headers took over %gs", HEADER_TIMEOUT_S)
            self.transport.close()


def _uvicorn_server(app: Starlette) -> uvicorn.Server:
    # log_config=None: leave logging as the caller set it up (the CLI logs to stderr).
    config = uvicorn.Config(
        app, log_config=None, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
        http=_TimedH11Protocol,
    )  # fmt: skip
    return uvicorn.Server(config)


def run(app: Starlette, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until interrupted (Ctrl-C)."""
    _uvicorn_server(app).run(sockets=[sock])


class BackgroundServer:
    """``app`` served on a background thread (notebooks, tests): ``with ... as base_url:``."""

    def __init__(self, app: Starlette, host: str = DEFAULT_HOST, port: int = 0) -> None:
        self.app, self.host, self.port = app, host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> str:
        sock = bind(self.host, self.port)
        self._server = _uvicorn_server(self.app)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__()
                raise ServeError(f"the server did not start on {url_of(sock)}")
            time.sleep(0.01)
        return url_of(sock)

    def __exit__(self, *exc: object) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(30)
        self._server = self._thread = None
