"""The public import of the OpenAI-compatible server; the code is in :mod:`mlx_openelm.serve`.

Everything :mod:`mlx_openelm.serve.app` exports (``create_app``, ``ServerSettings``,
``BackgroundServer``, ``serve``, ``bind``, ``run``, ``url_of``, ``model_id_for``) is here too.
Raises ServeError on import when the ``[serve]`` extra (Starlette, uvicorn) is missing.
"""

from .serve.app import *  # noqa: F403 - the public import: re-export serve.app's __all__
from .serve.app import __all__ as __all__
