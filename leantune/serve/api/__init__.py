"""The HTTP layer: OpenAI's shapes (models, completions, chat, embeddings, files, fine-tuning jobs) plus vLLM's
runtime LoRA endpoints, `/tokenize` and `/detokenize`, `/health` and Prometheus `/metrics`, over one `Engine`.

One router per resource: `models`, `completions` (completions and chat; request models in `schemas`),
`embeddings` (mean-pooled decoder or encoder states), `tokenize` (tokenize and detokenize), `files`, `fine_tuning` (jobs, their
events, checkpoints and cancel), `admin` (load/unload adapter, health, metrics); auth, errors and body
parsing they share live in `common`. Every error is OpenAI's shape; with API keys configured every endpoint but
`/health` needs `Authorization: Bearer KEY`, and each key sees only its own files, jobs and adapters (adapters given
on the command line are everyone's).
"""
from __future__ import annotations

from fastapi import FastAPI

from . import admin, completions, embeddings, files, fine_tuning, models, tokenize
from .common import APIError, Context, install_error_handlers


def build_app(engine, keys: list[str] | None = None, max_upload_bytes: int = 64 << 20,
              model_root: str = "", embedder=None) -> FastAPI:
    # /docs (Swagger UI) and /openapi.json show the request models of serve.api.schemas; neither holds data
    app = FastAPI(title="leantune", docs_url="/docs", redoc_url=None)
    app.state.leantune = Context(engine, list(keys or []), max_upload_bytes, model_root, embedder)
    install_error_handlers(app)
    for module in (models, completions, embeddings, tokenize, admin, files, fine_tuning):
        app.include_router(module.router)
    return app


__all__ = ["APIError", "build_app"]
