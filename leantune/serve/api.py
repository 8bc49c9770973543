"""The HTTP layer: OpenAI's shapes (models, completions, chat, files, fine-tuning jobs) plus vLLM's
runtime LoRA endpoints, `/health` and Prometheus `/metrics`, over one `Engine`.

Every error is OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with a 4xx that says
whose fault it is. With API keys configured every endpoint needs `Authorization: Bearer KEY`, and each
key sees only its own files, jobs and adapters (adapters given on the command line are everyone's).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import metrics as prom
from .jobs import hyperparameters
from .requests import GenRequest
from .store import safe_component
from .uploads import UploadError, normalize_finetune_jsonl


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def _error(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


def _owner(request: Request, keys: list[str]) -> str:
    if not keys:
        return "local"
    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    # compare_digest on every key: the time taken does not tell how much of a guess matched
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
        raise APIError(401, "Incorrect or missing API key; send `Authorization: Bearer <key>`",
                       code="invalid_api_key", type="authentication_error")
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]  # keys themselves are never stored


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _field(body: dict, key: str, types, default=None, required: bool = False):
    v = body.get(key, default)
    if v is None and required:
        raise APIError(400, f"missing required parameter '{key}'", param=key, code="missing_required_parameter")
    if v is not None and (not isinstance(v, types) or (isinstance(v, bool) and bool not in _tuple(types))):
        raise APIError(400, f"'{key}' has the wrong type ({type(v).__name__})", param=key, code="invalid_type")
    return v


def _tuple(t):
    return t if isinstance(t, tuple) else (t,)


_SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


def _sampling(body: dict, prompt_ids: list[int], model: str, owner: str, default_max: int,
              max_len: int, prompt_param: str) -> GenRequest:
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if _field(body, "n", int, 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    seed = _field(body, "seed", int)
    if seed is not None and not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise APIError(400, f"seed must be a 64-bit integer, got {seed}", param="seed")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, key, int)
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"{key} must be an integer >= 1, got {max_tokens}", param=key)
    room = max_len - len(prompt_ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = "" if max_tokens is None else f" + {key} {max_tokens}"
        raise APIError(400, f"this model's maximum context length is {max_len} tokens, but the request has "
                            f"{len(prompt_ids)} prompt tokens{asked}; shorten the prompt or lower {key}",
                       param=prompt_param if max_tokens is None or room < 1 else key, code="context_length_exceeded")
    if max_tokens is None:  # as vLLM: the default never asks for more than the context has room for
        max_tokens = min(default_max, room)
    try:
        return GenRequest(prompt_ids, model, owner, max_tokens=max_tokens,
                          temperature=float(_field(body, "temperature", (int, float), 1.0)),
                          top_p=float(_field(body, "top_p", (int, float), 1.0)), stop=stop,
                          seed=seed, ignore_eos=bool(_field(body, "ignore_eos", bool, False)))
    except ValueError as e:
        raise APIError(400, str(e), param=_param_of(str(e))) from None


def _param_of(message: str) -> str | None:
    """The request parameter a GenRequest error names (its message starts with it)."""
    first = message.split(" ", 1)[0]
    return first if first in ("temperature", "top_p", "stop") else None


def _messages(body: dict) -> list[dict]:
    msgs = _field(body, "messages", list, required=True)
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise APIError(400, f"messages[{i}] must be an object with role system, user or assistant",
                           param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if not out:
        raise APIError(400, "messages must not be empty", param="messages")
    return out


def build_app(engine, keys: list[str] | None = None, max_upload_bytes: int = 64 << 20,
              model_root: str = "") -> FastAPI:
    app = FastAPI(title="leantune", docs_url=None, redoc_url=None)
    keys = list(keys or [])
    store = engine.store
    state = {"engine": engine}

    @app.exception_handler(APIError)
    async def _api_error(_req, e: APIError):
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, e: RequestValidationError):
        return _error(400, f"invalid request: {e.errors()[:1]}", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error")

    async def run(fn, *args):
        return await asyncio.wrap_future(engine.call(fn, *args))

    # -- models and inference ----------------------------------------------------------------------
    def _model_objects(owner):
        base = {"id": engine.base_name, "object": "model", "created": engine.created, "owned_by": "leantune",
                "root": model_root, "parent": None}
        return [base] + [{"id": e.name, "object": "model", "created": e.created, "owned_by": "leantune",
                          "root": e.path, "parent": engine.base_name} for e in engine.visible_adapters(owner)]

    @app.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": _model_objects(_owner(request, keys))}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        for m in _model_objects(_owner(request, keys)):
            if m["id"] == model_id:
                return m
        raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")

    async def _submit(greq: GenRequest, sink):
        try:
            return await run(engine.add_request, greq, sink)
        except KeyError:
            raise APIError(404, f"The model '{greq.model}' does not exist or you do not have access to it",
                           param="model", code="model_not_found") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def _generate(greq: GenRequest, kind: str, stream: bool, include_usage: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        sid = await _submit(greq, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        if stream:
            return StreamingResponse(_sse(events, sid, rid, greq.model, kind, include_usage),
                                     media_type="text/event-stream")
        text, last = [], None
        while True:
            ev = await events.get()
            if "error" in ev:
                raise APIError(500, ev["error"], type="server_error")
            text.append(ev["text"])
            if ev["finish_reason"]:
                last = ev
                break
        engine.stats.complete(kind)
        return _final(rid, greq.model, kind, "".join(text), last)

    async def _sse(events, sid, rid, model_name, kind, include_usage):
        created = int(time.time())
        try:
            if kind == "chat":
                yield _chunk(rid, model_name, kind, created, {"role": "assistant", "content": ""}, None)
            while True:
                ev = await events.get()
                if "error" in ev:
                    yield f"data: {json.dumps({'error': {'message': ev['error'], 'type': 'server_error'}})}\n\n"
                    break
                if ev["text"] or ev["finish_reason"]:
                    delta = {"content": ev["text"]} if kind == "chat" else ev["text"]
                    yield _chunk(rid, model_name, kind, created, delta, ev["finish_reason"])
                if ev["finish_reason"]:
                    if include_usage:
                        yield "data: " + json.dumps({"id": rid, "object": _obj(kind, True), "created": created,
                                                      "model": model_name, "choices": [], "usage": _usage(ev)}) + "\n\n"
                    break
            yield "data: [DONE]\n\n"
            engine.stats.complete(kind)
        finally:  # the client went away mid-stream (or we are done): free the request's slots
            engine.call(engine.abort, sid)

    @app.post("/v1/completions")
    async def completions(request: Request):
        owner, body = _owner(request, keys), await _json(request)
        model_name = _field(body, "model", str, required=True)
        prompt = _field(body, "prompt", (str, list), required=True)
        if isinstance(prompt, list):
            if len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            elif not (prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
                raise APIError(400, "prompt must be a string, a list of one string, or a list of token ids",
                               param="prompt")
        ids = engine.tk.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if any(t < 0 or t >= engine.model.config.vocab_size for t in ids):
            raise APIError(400, "prompt holds token ids outside the vocabulary", param="prompt")
        greq = _sampling(body, ids, model_name, owner, 16, engine.cfg.max_model_len, "prompt")
        return await _generate(greq, "text", bool(body.get("stream")), _include_usage(body))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        owner, body = _owner(request, keys), await _json(request)
        model_name = _field(body, "model", str, required=True)
        try:
            ids = engine.tk.encode_chat(_messages(body), add_generation_prompt=True)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - a chat template that refuses these messages
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        greq = _sampling(body, ids, model_name, owner, 256, engine.cfg.max_model_len, "messages")
        return await _generate(greq, "chat", bool(body.get("stream")), _include_usage(body))

    # -- runtime LoRA (vLLM) -------------------------------------------------------------------------
    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request):
        owner, body = _owner(request, keys), await _json(request)
        name = _field(body, "lora_name", str, required=True)
        path = _field(body, "lora_path", str, required=True)
        _check_name(name, "lora_name")
        resolved = Path(path).resolve()
        if keys and not resolved.is_relative_to(store.data_dir.resolve()):
            raise APIError(403, "with API keys, lora_path must be inside the server's data dir",
                           param="lora_path", code="forbidden_path", type="permission_error")
        if keys and _foreign_path(store, resolved, owner):
            raise APIError(403, "lora_path lies in a folder of another key's adapter or fine-tuning job",
                           param="lora_path", code="forbidden_path", type="permission_error")
        inplace = bool(body.get("load_inplace"))

        def load():  # engine thread, so the shared-adapter check and the load see the same adapters
            if keys and inplace:
                _not_shared(engine, name, "replace")
            engine.load_adapter(name, str(resolved), None if not keys else owner, inplace)

        try:
            await run(load)
        except FileExistsError as e:
            raise APIError(400, str(e), param="lora_name") from None
        except PermissionError:
            raise APIError(403, f"adapter '{name}' belongs to another key", param="lora_name",
                           type="permission_error") from None
        except (FileNotFoundError, ValueError) as e:
            raise APIError(400, str(e), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request):
        owner, body = _owner(request, keys), await _json(request)
        name = _field(body, "lora_name", str, required=True)
        def unload():
            if keys:
                _not_shared(engine, name, "unload")
            engine.unload_adapter(name, None if not keys else owner)

        try:
            await run(unload)
        except KeyError:
            raise APIError(404, f"The adapter '{name}' is not loaded", param="lora_name",
                           code="model_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    # -- files -----------------------------------------------------------------------------------------
    @app.post("/v1/files")
    async def upload(request: Request):
        owner = _owner(request, keys)
        await _cap_body(request, max_upload_bytes + (64 << 10), max_upload_bytes)
        form = await request.form()
        purpose, file = form.get("purpose"), form.get("file")
        if purpose != "fine-tune":
            raise APIError(400, f"purpose must be 'fine-tune', got {purpose!r}", param="purpose")
        if file is None or isinstance(file, str):
            raise APIError(400, "missing the 'file' part of the multipart upload", param="file")
        data = await file.read(max_upload_bytes + 1)
        name = Path(file.filename or "").name
        name = name if name not in ("", ".", "..") else "upload.jsonl"  # "/" or ".." name no file
        try:
            data = normalize_finetune_jsonl(data, name, max_upload_bytes)
        except UploadError as e:
            too_big = len(data) > max_upload_bytes
            raise APIError(413 if too_big else 400, str(e), param="file",
                           code="file_too_large" if too_big else "invalid_file") from None
        return store.add_file(owner, name, purpose, data)

    @app.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None):
        return {"object": "list", "data": store.list_files(_owner(request, keys), purpose), "has_more": False}

    def _file(owner, file_id):
        f = store.get_file(owner, file_id)
        if f is None:
            raise APIError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
        return f

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str, request: Request):
        return _file(_owner(request, keys), file_id)

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request):
        owner = _owner(request, keys)
        _file(owner, file_id)
        return PlainTextResponse(store.file_path(owner, file_id).read_text(encoding="utf-8"))

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, request: Request):
        owner = _owner(request, keys)
        _file(owner, file_id)
        store.delete_file(owner, file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- fine-tuning jobs --------------------------------------------------------------------------------
    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request):
        owner, body = _owner(request, keys), await _json(request)
        job = _job_request(body, owner, engine, store)
        created = store.add_job(owner, **job)
        engine.call(lambda: None)  # wake the loop: it starts queued jobs
        return created

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(request: Request, after: str | None = None, limit: int = 20):
        items, more = _paged(store.list_jobs, _owner(request, keys), after, limit)
        return {"object": "list", "data": items, "has_more": more}

    def _job(owner, job_id):
        j = store.get_job(owner, job_id)
        if j is None:
            raise APIError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id",
                           code="fine_tuning_job_not_found")
        return j

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str, request: Request):
        return _job(_owner(request, keys), job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str, request: Request):
        owner = _owner(request, keys)

        def cancel():  # engine thread: the job cannot finish between the status check and the cancel
            j = _job(owner, job_id)
            if j["status"] not in ("validating_files", "queued", "running"):
                raise APIError(400, f"the job is already {j['status']} and cannot be cancelled",
                               param="fine_tuning_job_id")
            engine.jobs.cancel(job_id)
            return store.get_job(owner, job_id)

        return await run(cancel)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request, after: str | None = None, limit: int = 20):
        _job(_owner(request, keys), job_id)
        items, more = _paged(store.list_events, job_id, after, limit)
        return {"object": "list", "data": items, "has_more": more}

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def job_checkpoints(job_id: str, request: Request, after: str | None = None, limit: int = 10):
        _job(_owner(request, keys), job_id)
        items, more = _paged(store.list_checkpoints, job_id, after, limit)
        for c in items:
            c.pop("path", None)
        return {"object": "list", "data": items, "has_more": more, "first_id": None, "last_id": None}

    # -- operations ----------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(request: Request):
        _owner(request, keys)
        return PlainTextResponse("")

    @app.get("/metrics")
    async def metrics(request: Request):
        _owner(request, keys)
        return PlainTextResponse(prom.render(state["engine"]), media_type="text/plain; version=0.0.4")

    return app


def _paged(fn, key, after, limit):
    if not 1 <= limit <= 100:
        raise APIError(400, f"limit must be between 1 and 100, got {limit}", param="limit")
    try:
        return fn(key, after=after, limit=limit)
    except ValueError as e:
        raise APIError(400, str(e), param="after") from None


_SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def _job_request(body: dict, owner: str, engine, store) -> dict:
    """Validate a create-job body; the dict of `store.add_job` keyword arguments."""
    model = _field(body, "model", str, required=True)
    if model != engine.base_name:
        raise APIError(400, f"model '{model}' cannot be fine-tuned here; use '{engine.base_name}'", param="model",
                       code="model_not_available")
    files = {}
    for key in ("training_file", "validation_file"):
        fid = _field(body, key, str, required=key == "training_file")
        if fid is not None and store.get_file(owner, fid) is None:
            raise APIError(400, f"{key} '{fid}' does not exist (upload it with purpose 'fine-tune')", param=key,
                           code="invalid_file")
        files[key] = fid
    suffix = _field(body, "suffix", str)
    if suffix is not None and not _SUFFIX.match(suffix):
        raise APIError(400, "suffix must be 1-40 characters of letters, digits, '-' or '_'", param="suffix")
    seed = _field(body, "seed", int)
    method = _field(body, "method", dict) or {"type": "supervised"}
    if method.get("type", "supervised") != "supervised":
        raise APIError(400, f"method.type '{method.get('type')}' is not supported; use 'supervised'", param="method")
    sup = method.get("supervised")
    if sup is not None and not (isinstance(sup, dict) and isinstance(sup.get("hyperparameters") or {}, dict)):
        raise APIError(400, "method.supervised must be an object like {\"hyperparameters\": {...}}", param="method")
    hp = _field(body, "hyperparameters", dict) or {}
    try:
        hyperparameters({"hyperparameters": hp, "method": method, "seed": seed}, engine.cfg.finetune)
    except ValueError as e:
        raise APIError(400, str(e), param="hyperparameters") from None
    return {"model": model, **files, "hyperparameters": hp, "suffix": suffix, "seed": seed, "method": method}


async def _cap_body(request: Request, cap: int, limit: int) -> None:
    """413 when the body is over `cap` bytes. A body without Content-Length (chunked) is read here, at most
    `cap` bytes, so the multipart parser never spools more than that to disk."""
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the upload is larger than the limit of {limit} bytes", param="file",
                       code="file_too_large")
    if declared is not None:
        if not declared.isdigit() or int(declared) > cap:
            raise too_big
        return
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise too_big
    request._body = bytes(body)  # Starlette's cache of the body: request.form() parses these bytes


def _foreign_path(store, path: Path, owner: str) -> bool:
    """Whether `path` lies in the folder of another owner's published adapter or fine-tuning job."""
    for rec in store.list_adapters():
        if rec["owner"] != owner and path.is_relative_to(Path(rec["path"]).resolve()):
            return True
    jobs = store.data_dir / "jobs"
    if path.is_relative_to(jobs) and path != jobs:
        return store.job_owner(path.relative_to(jobs).parts[0]) != owner
    return False


def _not_shared(engine, name: str, what: str) -> None:
    """With API keys, adapters from the command line are everyone's: no key may replace or unload them."""
    e = engine.adapters.get(name)
    if e is not None and not e.retired and e.owner is None:
        raise APIError(403, f"adapter '{name}' is shared by every key (given on the server's command line); "
                            f"an API key cannot {what} it", param="lora_name", code="forbidden_adapter",
                       type="permission_error")


def _check_name(name: str, param: str) -> None:
    try:
        safe_component(name, param)
    except ValueError as e:
        raise APIError(400, str(e), param=param) from None


def _include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


def _obj(kind: str, chunk: bool) -> str:
    if kind == "chat":
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"


def _usage(ev: dict) -> dict:
    p, c = ev["prompt_tokens"], ev["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chunk(rid, model_name, kind, created, delta, finish) -> str:
    choice = {"index": 0, "finish_reason": finish}
    if kind == "chat":
        choice["delta"] = delta
    else:
        choice.update(text=delta, logprobs=None)
    return "data: " + json.dumps({"id": rid, "object": _obj(kind, True), "created": created, "model": model_name,
                                  "choices": [choice]}) + "\n\n"


def _final(rid, model_name, kind, text, ev) -> dict:
    choice = {"index": 0, "finish_reason": ev["finish_reason"], "logprobs": None}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": _obj(kind, False), "created": int(time.time()), "model": model_name,
            "choices": [choice], "usage": _usage(ev)}
