"""What every route of the HTTP layer shares: the server's context, API-key auth, OpenAI's error shape,
and reading a JSON body's fields.

Every error is OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with a 4xx that says whose
fault it is. With API keys configured every endpoint needs `Authorization: Bearer KEY`, and each key is an
owner that sees only its own files, jobs and adapters.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..store import safe_component


@dataclass
class Context:
    """What the routes serve from; `build_app` keeps it in `app.state.leantune`."""

    engine: object
    keys: list[str]  # empty: no auth, one owner ("local")
    max_upload_bytes: int
    model_root: str  # the base model's "root" in /v1/models
    embedder: object | None = None  # serve.embed.Encoder of --embedding-model, served at /v1/embeddings

    @property
    def store(self):
        return self.engine.store


def ctx(request: Request) -> Context:
    return request.app.state.leantune


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def model_not_found(model) -> APIError:
    """OpenAI's 404 for a `model` that is neither the base nor an adapter this caller may use."""
    return APIError(404, f"The model '{model}' does not exist or you do not have access to it", param="model",
                    code="model_not_found")


def error_response(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


def install_error_handlers(app: FastAPI) -> None:
    """FastAPI's and Starlette's own errors in OpenAI's shape too."""

    @app.exception_handler(APIError)
    async def _api_error(_req, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, e: RequestValidationError):
        return error_response(400, f"invalid request: {e.errors()[:1]}", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error")


def owner(request: Request) -> str:
    """The caller's owner id ("local" without keys); 401 for a missing or wrong key."""
    keys = ctx(request).keys
    if not keys:
        return "local"
    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    # compare_digest on every key: the time taken does not tell how much of a guess matched
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
        raise APIError(401, "Incorrect or missing API key; send `Authorization: Bearer <key>`",
                       code="invalid_api_key", type="authentication_error")
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]  # keys themselves are never stored


async def run(request: Request, fn, *args):
    """fn(*args) in the engine thread, between iterations."""
    return await asyncio.wrap_future(ctx(request).engine.call(fn, *args))


async def json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def field(body: dict, key: str, types, default=None, required: bool = False):
    v = body.get(key, default)
    if v is None and required:
        raise APIError(400, f"missing required parameter '{key}'", param=key, code="missing_required_parameter")
    if v is not None and (not isinstance(v, types) or (isinstance(v, bool) and bool not in _tuple(types))):
        raise APIError(400, f"'{key}' has the wrong type ({type(v).__name__})", param=key, code="invalid_type")
    return v


def _tuple(t):
    return t if isinstance(t, tuple) else (t,)


def or_404(obj, message: str, param: str, code: str):
    """`obj`, or a 404 with OpenAI's error shape when the lookup found nothing (None)."""
    if obj is None:
        raise APIError(404, message, param=param, code=code)
    return obj


def paged(fn, key, after, limit):
    if not 1 <= limit <= 100:
        raise APIError(400, f"limit must be between 1 and 100, got {limit}", param="limit")
    try:
        return fn(key, after=after, limit=limit)
    except ValueError as e:
        raise APIError(400, str(e), param="after") from None


def check_name(name: str, param: str) -> None:
    try:
        safe_component(name, param)
    except ValueError as e:
        raise APIError(400, str(e), param=param) from None
