"""Uploads: checks a fine-tuning file sent to `POST /v1/files` before the server stores it, so a bad row is
reported at upload time with its line (or row) number, not hours later by a training job.

Accepts what `leantune finetune --data` reads from one file, by the file name's suffix: JSON Lines (the
default, and what OpenAI's fine-tuning API takes), a JSON array, CSV, or Parquet (with the `data` extra), in
any row shape of `leantune.data.rows` (OpenAI chat with tools, tool calls and weights, ShareGPT, alpaca,
prompt/completion, text, preference pairs, classification); one shape per file. Rows are read and checked by
`leantune.data` itself, so an accepted file is one the trainer reads; this module adds what only uploads
need (bytes, size, no whitespace-only assistant replies).

The server keeps every upload as JSON Lines of the rows' canonical form (`normalize_finetune_jsonl`: contents
joined to strings, tool arguments parsed); a JSONL file that is already canonical is kept byte for byte.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..data.formats import NOT_SFT
from ..data.readers import DataError, container_of, iter_jsonl, read_bytes
from ..data.rows import KIND, canonical_in_file, detect_format


class UploadError(DataError):
    """An upload that cannot be used for fine-tuning; `line` is its 1-based line number, 0 for the whole file."""


def validate_finetune_jsonl(data: bytes, filename: str, max_bytes: int) -> int:
    """The number of examples in an uploaded fine-tuning file; UploadError naming the file and line otherwise."""
    return len(_checked_rows(data, filename, max_bytes))


def normalize_finetune_jsonl(data: bytes, filename: str, max_bytes: int) -> bytes:
    """Validate like `validate_finetune_jsonl` and return the file as the JSON Lines the server stores: each
    row's canonical form. A JSONL file whose rows are already canonical is returned unchanged (same bytes)."""
    rows = _checked_rows(data, filename, max_bytes)
    if container_of(filename) == "jsonl" and all(raw == canon for raw, canon in rows):
        return bytes(data)
    lines = [json.dumps(canon, ensure_ascii=False) for _, canon in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


def training_kind(path: str | Path) -> str:
    """What a stored upload trains: "sft", "preference" or "classification" (from its first row)."""
    for n, row in iter_jsonl(path):
        return KIND[detect_format(row, f"{path}:{n}")]
    raise DataError(f"{path}: is empty")


def not_sft_reason(kind: str) -> str:
    """Why a file of `kind` cannot train a supervised job (empty for "sft")."""
    return NOT_SFT.get(kind, "")


# ---- whole file ---------------------------------------------------------------------------------------
def _checked_rows(data: bytes, filename: str, max_bytes: int) -> list[tuple[dict, dict]]:
    """(row as read, canonical row) for every row, each checked, all rows in one shape."""
    _check_size(data, filename, max_bytes)
    try:
        rows = read_bytes(bytes(data), filename, container_of(filename))
        if not rows:
            raise UploadError(f"{filename} is empty (no rows); write one JSON object per line", 0)
        try:
            fmt = detect_format(rows[0].data, rows[0].where)
        except DataError as e:
            raise UploadError(str(e), rows[0].n) from None
        out = []
        for row in rows:
            canon = canonical_in_file(row.data, fmt, row, rows[0])
            _check_replies(canon, row.where, row.n)
            out.append((row.data, canon))
        return out
    except UploadError:
        raise
    except DataError as e:
        raise UploadError(str(e), e.line) from None


def _check_size(data: bytes, filename: str, max_bytes: int) -> None:
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"upload data must be bytes, got {type(data).__name__}")
    if not data:
        raise UploadError(f"{filename} is empty; upload a file with one training example per row", 0)
    if len(data) > max_bytes:
        raise UploadError(f"{filename} is {len(data)} bytes; the limit is {max_bytes}; split it or raise the "
                          "server's upload limit", 0)


def _check_replies(row: dict, where: str, n: int) -> None:
    """A chat row whose every trained assistant reply is blank teaches nothing but to stop: refused at upload."""
    messages = row.get("messages")
    if messages is None:
        return
    replies = [m for m in messages if m["role"] == "assistant" and m.get("weight", 1) == 1]
    if not any(m.get("content", "").strip() or m.get("tool_calls") for m in replies):
        raise UploadError(f"{where}: every assistant message is empty, so there is nothing to learn; "
                          "write the assistant's reply or remove the row", n)
