"""The server's HTTP plumbing on Starlette and uvicorn (the ``[serve]`` extra).

Request bodies, OpenAI-style error responses, the access log (one line per request), bearer-token
auth, binding a socket, and running uvicorn in the foreground or on a background thread.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import DataError, ServeError, short
from ..jsonio import parse_json
from .schema import DEFAULT_HOST, DEFAULT_PORT, APIError

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
except ModuleNotFoundError as e:  # the [serve] extra is optional
    raise ServeError(
        f"`mlx-openelm serve` needs the server extra ({e.name} is not installed): "
        'pip install -e ".[serve]"  (or: pip install "mlx-openelm[serve]")'
    ) from e

__all__ = ["BackgroundServer", "RequestLog", "bind", "run", "url_of"]

log = logging.getLogger("mlx_openelm.server")

MAX_BODY_BYTES = 4 * 1024 * 1024
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
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES // 2**20} MiB")
    try:
        return parse_json(bytes(raw), "the request body", DataError, "send one JSON object", dict)
    except DataError as e:
        raise APIError(400, str(e)) from None


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


def _uvicorn_server(app: Starlette) -> uvicorn.Server:
    # log_config=None: leave logging as the caller set it up (the CLI logs to stderr).
    config = uvicorn.Config(
        app, log_config=None, log_level="warning", access_log=False, timeout_graceful_shutdown=5
    )
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
