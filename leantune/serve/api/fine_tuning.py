"""`/v1/fine_tuning/jobs` (+ `/events`, `/checkpoints`, `/cancel`, `/pause`, `/resume`): OpenAI's fine-tuning
jobs, trained inside the serving loop (`serve.jobs`); each owner sees only its own jobs, and may have at most
`--max-jobs-per-key` of them unfinished (a 429 past it)."""
from __future__ import annotations

import re

from fastapi import APIRouter, Request
from torch import nn

from ...data import DataError
from ...methods.base import AdapterLayer
from ...methods.targets import linear_sample, matches_list, module_index, output_layer_names
from ...train.report import parse_report_to
from ..jobs import METHODS, adapter_config, hyperparameters
from ..store import ACTIVE_JOB_STATUSES
from ..uploads import not_sft_reason, training_kind
from .common import APIError, ctx, field, json_body, or_404, owner, paged, run

router = APIRouter()


@router.post("/v1/fine_tuning/jobs")
async def create_job(request: Request):
    who, body = owner(request), await json_body(request)
    c = ctx(request)
    job = _job_request(body, who, c.engine)
    _, lora = adapter_config(job, c.engine.cfg.finetune)
    await run(request, _check_targets, c.engine.model, lora.targets)  # engine thread: the model tree is its own
    limit = c.engine.cfg.finetune.max_jobs_per_key
    if limit is not None and c.store.count_jobs(who, *ACTIVE_JOB_STATUSES) >= limit:
        raise APIError(429, f"this API key already has {limit} unfinished fine-tuning jobs, the limit of this server "
                            "(--max-jobs-per-key); wait for one to finish or cancel one "
                            "(POST /v1/fine_tuning/jobs/{id}/cancel)", code="rate_limit_exceeded", type="requests")
    created = c.store.add_job(who, **job)
    c.engine.call(lambda: None)  # wake the loop: it starts queued jobs
    return created


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(request: Request, after: str | None = None, limit: int = 20):
    items, more = paged(ctx(request).store.list_jobs, owner(request), after, limit)
    return {"object": "list", "data": items, "has_more": more}


def _job(store, who: str, job_id: str) -> dict:
    return or_404(store.get_job(who, job_id), f"No such fine-tuning job: {job_id}", "fine_tuning_job_id",
                  "fine_tuning_job_not_found")


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def get_job(job_id: str, request: Request):
    return _job(ctx(request).store, owner(request), job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request):
    who, c = owner(request), ctx(request)

    def cancel():  # engine thread: the job cannot finish between the status check and the cancel
        j = _job(c.store, who, job_id)
        if j["status"] not in ACTIVE_JOB_STATUSES:
            raise APIError(400, f"the job is already {j['status']} and cannot be cancelled",
                           param="fine_tuning_job_id")
        c.engine.jobs.cancel(job_id)
        return c.store.get_job(who, job_id)

    return await run(request, cancel)


async def _pause_or_resume(request: Request, job_id: str, action: str):
    who, c = owner(request), ctx(request)

    def act():  # engine thread, as cancel
        _job(c.store, who, job_id)
        try:
            return getattr(c.engine.jobs, action)(job_id)
        except ValueError as e:
            raise APIError(400, str(e), param="fine_tuning_job_id") from None

    return await run(request, act)


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
async def pause_job(job_id: str, request: Request):
    return await _pause_or_resume(request, job_id, "pause")


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
async def resume_job(job_id: str, request: Request):
    return await _pause_or_resume(request, job_id, "resume")


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, after: str | None = None, limit: int = 20):
    store = ctx(request).store
    _job(store, owner(request), job_id)
    items, more = paged(store.list_events, job_id, after, limit)
    return {"object": "list", "data": items, "has_more": more}


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def job_checkpoints(job_id: str, request: Request, after: str | None = None, limit: int = 10):
    store = ctx(request).store
    _job(store, owner(request), job_id)
    items, more = paged(store.list_checkpoints, job_id, after, limit)
    for c in items:
        c.pop("path", None)
    return {"object": "list", "data": items, "has_more": more, "first_id": None, "last_id": None}


_SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


# OpenAI's create-job fields this server acts on; any other (say `metadata`, or a misspelt one) is refused, not
# silently dropped
JOB_FIELDS = ("model", "training_file", "validation_file", "hyperparameters", "method", "suffix", "seed",
              "integrations")


def _job_request(body: dict, who: str, engine) -> dict:
    """Validate a create-job body; the dict of `store.add_job` keyword arguments."""
    model = field(body, "model", str, required=True)
    unknown = [k for k in body if k not in JOB_FIELDS]
    if unknown:
        raise APIError(400, f"{unknown[0]!r} is not a supported fine-tuning job field here; fields: "
                            f"{', '.join(JOB_FIELDS)}", param=unknown[0])
    if model != engine.base_name:
        raise APIError(400, f"model '{model}' cannot be fine-tuned here; use '{engine.base_name}'", param="model",
                       code="model_not_available")
    files = {}
    for key in ("training_file", "validation_file"):
        fid = field(body, key, str, required=key == "training_file")
        if fid is not None and engine.store.get_file(who, fid) is None:
            raise APIError(400, f"{key} '{fid}' does not exist (upload it with purpose 'fine-tune')", param=key,
                           code="invalid_file")
        files[key] = fid
    method = _method(body)
    for key, fid in files.items():
        if fid is not None:
            _check_trains(engine.store.file_path(who, fid), key, fid, method["type"])
    suffix = field(body, "suffix", str)
    if suffix is not None and not _SUFFIX.match(suffix):
        raise APIError(400, "suffix must be 1-40 characters of letters, digits, '-' or '_'", param="suffix")
    seed = field(body, "seed", int)
    integrations = _integrations(body)
    hp = field(body, "hyperparameters", dict) or {}
    try:  # the same parsing the job runner does, with the server's defaults, so a bad value fails here
        hyperparameters({"hyperparameters": hp, "method": method, "seed": seed}, engine.cfg.finetune)
    except ValueError as e:
        raise APIError(400, str(e), param="hyperparameters") from None
    return {"model": model, **files, "hyperparameters": hp, "suffix": suffix, "seed": seed, "method": method,
            "integrations": integrations}


def _check_targets(model, targets) -> None:
    """A 400 when `hyperparameters.lora_targets` names a module the model has no linear layer of (the output
    layer excluded, as "all-linear" excludes it)."""
    if targets == "all-linear":
        return
    index = module_index(model)
    output = output_layer_names(model, index)
    linear = [n for n, m in index.items() if isinstance(m, (nn.Linear, AdapterLayer)) and n not in output]
    for t in targets:
        if not any(matches_list(n, [t]) for n in linear):
            raise APIError(400, f"hyperparameters.lora_targets: {t!r} names no linear layer of this model; "
                                f"{linear_sample(index, lambda m: isinstance(m, (nn.Linear, AdapterLayer)))}",
                           param="hyperparameters")


_DPO_ROWS = ('{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", ...}], '
             '"non_preferred_output": [...]}')


def _check_trains(path, key: str, fid: str, kind: str) -> None:
    """A file that the job's method cannot train on is refused here, not failed later: a supervised job on
    preference pairs or classification rows, a DPO job on anything but preference pairs."""
    try:
        rows = training_kind(path)
    except DataError as e:
        raise APIError(400, f"{key} '{fid}': {e}", param=key, code="invalid_file") from None
    why = ""
    if kind == "dpo" and rows != "preference":
        why = (f"it holds {rows} rows, not preference pairs; a DPO job (method.type 'dpo') needs rows like "
               f"{_DPO_ROWS}; to train on these rows, send method {{\"type\": \"supervised\"}}")
    elif kind == "supervised" and rows == "preference":
        why = ("it holds preference pairs, which train with method {\"type\": \"dpo\", \"dpo\": {\"hyperparameters\": "
               "{...}}} (as `leantune finetune --objective dpo` does), not a supervised job; or upload the preferred "
               "answers as chat or prompt/completion rows")
    elif kind == "supervised":
        why = not_sft_reason(rows)
    if why:
        raise APIError(400, f"{key} '{fid}': {why}", param=key, code="invalid_file")


def _method(body: dict) -> dict:
    """OpenAI's `method`: {"type": "supervised" | "dpo", "<type>": {"hyperparameters": {...}}}; anything else in it
    is a 400 naming the field (the hyperparameters' values are checked by `serve.jobs.hyperparameters`)."""
    method = field(body, "method", dict) or {"type": "supervised"}
    kind = method.get("type", "supervised")
    if not isinstance(kind, str) or kind not in METHODS:
        raise APIError(400, f"method.type {kind!r} is not supported; use one of {', '.join(METHODS)}", param="method")
    unknown = sorted(set(method) - {"type", kind})
    if unknown:
        raise APIError(400, f"method.{unknown[0]} is not a field of a method.type '{kind}' job; fields: type, {kind}",
                       param="method")
    block = method.get(kind)
    if block is not None and not (isinstance(block, dict) and set(block) <= {"hyperparameters"}
                                  and isinstance(block.get("hyperparameters") or {}, dict)):
        raise APIError(400, f"method.{kind} must be an object like {{\"hyperparameters\": {{...}}}}", param="method")
    return {**method, "type": kind}


# OpenAI's integration types that a job here can log to (serve.jobs opens the same loggers as `finetune --report-to`)
INTEGRATIONS = ("wandb",)
_WANDB_KEYS = {"project": str, "name": str, "entity": str, "tags": list}


def _integrations(body: dict) -> list:
    """OpenAI's `integrations`: [{"type": "wandb", "wandb": {"project", "name", "entity", "tags"}}]; an unknown
    type or field, or a server without the logger's package, is a 400 naming it."""
    items = field(body, "integrations", list) or []
    for i, item in enumerate(items):
        where = f"integrations[{i}]"
        kind = item.get("type") if isinstance(item, dict) else None
        if kind not in INTEGRATIONS:
            raise APIError(400, f"{where}.type {kind!r} is not a supported integration; supported: "
                                f"{', '.join(INTEGRATIONS)}", param="integrations")
        settings = item.get(kind)
        if not isinstance(settings, dict) or not isinstance(settings.get("project"), str) or not settings["project"]:
            raise APIError(400, f"{where}.{kind}.project is required (a string)", param="integrations")
        for key, value in settings.items():
            if key not in _WANDB_KEYS or not (value is None or isinstance(value, _WANDB_KEYS[key])):
                raise APIError(400, f"{where}.{kind}.{key} is not a known field or has the wrong type; fields: "
                                    f"{', '.join(_WANDB_KEYS)} (tags: a list of strings)", param="integrations")
        if not all(isinstance(t, str) for t in settings.get("tags") or []):
            raise APIError(400, f"{where}.{kind}.tags must be a list of strings", param="integrations")
        try:
            parse_report_to(kind, flag=f"{where}.type")  # the server has the package (pip extra) for it
        except ValueError as e:
            raise APIError(400, f"this server cannot log to it: {e}", param="integrations") from None
    return items
