"""The public import of the OpenAI-compatible server; the code is in :mod:`mlx_openelm.serve`.

Raises ServeError on import when the ``[serve]`` extra (Starlette, uvicorn) is missing.
"""

from .serve.app import (
    BackgroundServer,
    ServerSettings,
    bind,
    create_app,
    model_id_for,
    run,
    serve,
    url_of,
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
