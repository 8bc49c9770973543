"""Models by id from the local Hugging Face cache, offline, as transformers' `local_files_only=True` finds them.

The cache layout (huggingface_hub): `<cache>/models--ORG--NAME/refs/<revision>` holds a commit hash and
`<cache>/models--ORG--NAME/snapshots/<commit>/` the files. The cache is `$HF_HUB_CACHE`, else
`$HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`. Nothing is downloaded:
a model that is not in the cache is one error naming the cache and the folder looked for.

`--model ORG/NAME` takes revision `main`; `--model ORG/NAME@REVISION` or `--model ORG/NAME --revision REVISION`
a branch, tag or commit hash.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_cache_dir() -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or Path("~/.cache/huggingface").expanduser()
    return Path(home).expanduser() / "hub"


def looks_like_model_id(spec: str) -> bool:
    """"ORG/NAME" or "ORG/NAME@REV" that is not a local path (no leading ./, / or ~)."""
    return bool(_ID.fullmatch(spec)) and not spec.startswith((".", "/", "~"))


def with_revision(model: str | None, revision: str | None) -> str | None:
    """`--model` with `--revision` folded in ("ORG/NAME" + "v1" -> "ORG/NAME@v1"), as the recipes take it.

    A revision only means something for a model id: with a local path, a .gguf file, the embedded default or
    an id that already names one (`@REV`) it is an error naming both options, not silently dropped."""
    if revision is None:
        return model
    if model is None or not looks_like_model_id(model) or Path(model).exists():
        raise ValueError(f"--revision {revision!r} applies to a model id in the Hugging Face cache (ORG/NAME), "
                         f"not to --model {model or '(the embedded default)'!r}")
    if "@" in model:
        raise ValueError(f"--model {model!r} already names a revision; drop --revision {revision!r} or the @ part")
    return f"{model}@{revision}"


def local_model_path(spec: str | os.PathLike) -> Path:
    """`spec` as a local path: itself when it exists or is no model id, else the id's cached snapshot."""
    p = Path(spec)
    if p.exists() or not looks_like_model_id(str(spec)):
        return p
    return resolve_model_id(str(spec))


def resolve_model_id(spec: str, cache: Path | None = None) -> Path:
    """The snapshot folder of model `spec` ("ORG/NAME[@REV]") in the local cache; FileNotFoundError if absent."""
    model_id, _, revision = spec.partition("@")
    revision = revision or "main"
    cache = cache or hub_cache_dir()
    repo = cache / ("models--" + model_id.replace("/", "--"))
    hint = f"download it once (huggingface-cli download {model_id}) or pass a local folder"
    if not repo.is_dir():
        raise FileNotFoundError(f"model {model_id!r} is not in the Hugging Face cache {cache} "
                                f"(no {repo.name}); {hint}")
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    elif _COMMIT.fullmatch(revision):
        commit = revision
    else:
        known = sorted(p.name for p in (repo / "refs").glob("*")) if (repo / "refs").is_dir() else []
        raise FileNotFoundError(f"model {model_id!r}: revision {revision!r} is not in the cache {cache} "
                                f"(cached refs: {known or 'none'}); {hint}")
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        raise FileNotFoundError(f"model {model_id!r}@{revision}: snapshot {commit} is missing from {repo}; {hint}")
    return snapshot
