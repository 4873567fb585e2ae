"""The OpenAI-compatible server behind ``mlx-openelm serve``; import it as ``mlx_openelm.server``.

``app`` (routes and :func:`~.app.create_app`), ``engine`` (the generation worker: continuous
batching), ``sequence`` (one request's decoding state in the batch), ``http``
(Starlette/uvicorn plumbing, the ``[serve]`` extra), ``schema`` (request parsing and the
server's settings; no MLX, no server stack) and ``responses`` (OpenAI's response shapes).
This file imports none of them, so ``mlx_openelm.serve.schema`` stays light.
"""
