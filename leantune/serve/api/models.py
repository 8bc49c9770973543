"""`/v1/models`: the base model and the adapters the caller may use, in OpenAI's model objects."""
from __future__ import annotations

from fastapi import APIRouter, Request

from .common import APIError, ctx, owner

router = APIRouter()


def _model_objects(request: Request) -> list[dict]:
    c, who = ctx(request), owner(request)
    e = c.engine
    base = {"id": e.base_name, "object": "model", "created": e.created, "owned_by": "leantune",
            "root": c.model_root, "parent": None}
    return [base] + [{"id": a.name, "object": "model", "created": a.created, "owned_by": "leantune",
                      "root": a.path, "parent": e.base_name} for a in e.visible_adapters(who)]


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": _model_objects(request)}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    for m in _model_objects(request):
        if m["id"] == model_id:
            return m
    raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
