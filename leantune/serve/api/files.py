"""`/v1/files`: upload (purpose "fine-tune", checked and normalized by `serve.uploads`), list, get, content,
delete; each owner sees only its own files (a job's result CSV among them, purpose "fine-tune-results") and may
store at most `--max-storage-mb-per-key` of them (a 413 past it)."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from ..uploads import UploadError, normalize_finetune_jsonl
from .common import APIError, ctx, or_404, owner

router = APIRouter()


@router.post("/v1/files")
async def upload(request: Request):
    who, c = owner(request), ctx(request)
    limit = c.max_upload_bytes
    await _cap_body(request, limit + (64 << 10), limit)
    form = await request.form()
    purpose, file = form.get("purpose"), form.get("file")
    if purpose != "fine-tune":
        raise APIError(400, f"purpose must be 'fine-tune', got {purpose!r}", param="purpose")
    if file is None or isinstance(file, str):
        raise APIError(400, "missing the 'file' part of the multipart upload", param="file")
    data = await file.read(limit + 1)
    name = Path(file.filename or "").name
    name = name if name not in ("", ".", "..") else "upload.jsonl"  # "/" or ".." name no file
    try:
        data = normalize_finetune_jsonl(data, name, limit)
    except UploadError as e:
        too_big = len(data) > limit
        raise APIError(413 if too_big else 400, str(e), param="file",
                       code="file_too_large" if too_big else "invalid_file") from None
    quota = c.engine.cfg.finetune.max_storage_bytes_per_key
    used = c.store.stored_bytes(who) if quota is not None else 0
    if quota is not None and used + len(data) > quota:
        raise APIError(413, f"this file ({len(data)} bytes) would bring this API key's stored files to "
                            f"{used + len(data)} bytes, past its quota of {quota} bytes (--max-storage-mb-per-key); "
                            "free space by deleting files no longer needed (DELETE /v1/files/{file_id}: training "
                            "files of finished jobs, old result files)", param="file", code="storage_quota_exceeded")
    return c.store.add_file(who, name, purpose, data)


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None):
    return {"object": "list", "data": ctx(request).store.list_files(owner(request), purpose), "has_more": False}


def _file(store, who: str, file_id: str) -> dict:
    return or_404(store.get_file(who, file_id), f"No such File object: {file_id}", "id", "file_not_found")


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request):
    return _file(ctx(request).store, owner(request), file_id)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request):
    who, store = owner(request), ctx(request).store
    _file(store, who, file_id)
    return PlainTextResponse(store.file_path(who, file_id).read_text(encoding="utf-8"))


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request):
    who, store = owner(request), ctx(request).store
    _file(store, who, file_id)
    store.delete_file(who, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


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
