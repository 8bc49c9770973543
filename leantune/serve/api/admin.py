"""Operations: vLLM's runtime LoRA endpoints (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`), `/health`
and Prometheus `/metrics`. With API keys, an adapter loaded by a key is that key's, a path must lie in the
server's data dir and outside other keys' folders, and the adapters of the command line are nobody's to
replace or unload.
`/health` is the one endpoint that needs no key."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from ..metrics import CONTENT_TYPE
from .common import APIError, check_name, ctx, field, json_body, owner, run

router = APIRouter()


@router.post("/v1/load_lora_adapter")
async def load_lora(request: Request):
    who, body = owner(request), await json_body(request)
    c = ctx(request)
    name = field(body, "lora_name", str, required=True)
    path = field(body, "lora_path", str, required=True)
    check_name(name, "lora_name")
    resolved = Path(path).resolve()
    if c.keys:
        _check_path(c.store, resolved, who)
    inplace = bool(body.get("load_inplace"))

    def load():  # engine thread, so the shared-adapter check and the load see the same adapters
        if c.keys and inplace:
            _not_shared(c.engine, name, "replace")
        c.engine.load_adapter(name, str(resolved), None if not c.keys else who, inplace)

    try:
        await run(request, load)
    except FileExistsError as e:
        raise APIError(400, str(e), param="lora_name") from None
    except PermissionError:
        raise APIError(403, f"adapter '{name}' belongs to another key", param="lora_name",
                       type="permission_error") from None
    except (FileNotFoundError, ValueError) as e:
        raise APIError(400, str(e), param="lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora(request: Request):
    who, body = owner(request), await json_body(request)
    c = ctx(request)
    name = field(body, "lora_name", str, required=True)

    def unload():
        if c.keys:
            _not_shared(c.engine, name, "unload")
        c.engine.unload_adapter(name, None if not c.keys else who)

    try:
        await run(request, unload)
    except KeyError:
        raise APIError(404, f"The adapter '{name}' is not loaded", param="lora_name",
                       code="model_not_found") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


@router.get("/health")
async def health():
    # no key asked, as vLLM's: load balancers and Kubernetes probes send none, and the answer tells nothing
    return PlainTextResponse("")


@router.get("/metrics")
async def metrics(request: Request):
    owner(request)
    body = await run(request, ctx(request).engine.metrics.scrape)  # between iterations: the tables hold still
    return Response(body, media_type=CONTENT_TYPE)


def _check_path(store, resolved: Path, who: str) -> None:
    """With API keys: 403 unless the path is in the data dir and not in another key's adapter or job folder."""
    if not resolved.is_relative_to(store.data_dir.resolve()):
        raise APIError(403, "with API keys, lora_path must be inside the server's data dir",
                       param="lora_path", code="forbidden_path", type="permission_error")
    if _foreign_path(store, resolved, who):
        raise APIError(403, "lora_path lies in a folder of another key's adapter or fine-tuning job",
                       param="lora_path", code="forbidden_path", type="permission_error")


def _foreign_path(store, path: Path, owner: str) -> bool:
    """Whether `path` lies in the folder of another owner's published adapter, job checkpoint (its PEFT copy
    beside the published adapters) or fine-tuning job."""
    for rec in [*store.list_adapters(), *store.checkpoint_paths()]:
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
