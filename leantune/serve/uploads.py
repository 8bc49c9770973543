"""Uploads: checks a fine-tuning file sent to `POST /v1/files` before the server stores it, so a bad line is
reported at upload time with its line number, not hours later by a training job.

Accepts OpenAI's fine-tuning JSONL formats (https://platform.openai.com/docs/guides/supervised-fine-tuning):
chat rows `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`, where content is a
string or a list of `{"type": "text", "text": ...}` parts, and legacy `{"prompt": str, "completion": str}`
rows; one format per file. Row rules are `leantune.data.formats.check_row`'s, so an accepted file is one the
trainer reads; this module adds what only uploads need (bytes, size, content parts, tool calls, weights).

Because `leantune.data.load_dataset` wants string contents, `normalize_finetune_jsonl` returns the file with
text parts joined by newlines; files without parts come back unchanged.
"""
from __future__ import annotations

import json

from ..data.formats import ROLES, check_row
from ..data.readers import DataError

UNSUPPORTED_ROLES = ("tool", "function")
UNSUPPORTED_KEYS = ("tools", "functions", "parallel_tool_calls")
UNSUPPORTED_MESSAGE_KEYS = ("tool_calls", "function_call")


class UploadError(DataError):
    """An upload that cannot be used for fine-tuning; `line` is its 1-based line number, 0 for the whole file."""

    def __init__(self, message: str, line: int = 0):
        super().__init__(message)
        self.line = line


def validate_finetune_jsonl(data: bytes, filename: str, max_bytes: int) -> int:
    """The number of examples in an uploaded fine-tuning file; UploadError naming the file and line otherwise."""
    return len(_checked_rows(data, filename, max_bytes))


def normalize_finetune_jsonl(data: bytes, filename: str, max_bytes: int) -> bytes:
    """Validate like `validate_finetune_jsonl` and return the file in the form `load_dataset` reads: content
    parts joined into strings. A file without content parts is returned unchanged (same bytes)."""
    rows = _checked_rows(data, filename, max_bytes)
    if not any(_has_parts(row) for _, row in rows):
        return bytes(data)
    lines = [json.dumps(_joined_row(row), ensure_ascii=False) for _, row in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


# ---- whole file ---------------------------------------------------------------------------------------
def _checked_rows(data: bytes, filename: str, max_bytes: int) -> list[tuple[int, dict]]:
    """`(line, row)` for every non-blank line, each row checked, all rows in one format."""
    _check_size(data, filename, max_bytes)
    rows, first_fmt = [], None
    for n, raw in enumerate(bytes(data).split(b"\n"), start=1):
        text = _decode(raw, filename, n)
        if not text.strip():
            continue
        row = _parse(text, filename, n)
        fmt = _row_format(row, filename, n)
        first_fmt = first_fmt or (fmt, n)
        if fmt != first_fmt[0]:
            raise UploadError(f"{filename} line {n}: row is in the {fmt} format but line {first_fmt[1]} is in the "
                              f"{first_fmt[0]} format; keep one format per file", n)
        _check_row(row, fmt, filename, n)
        rows.append((n, row))
    if not rows:
        raise UploadError(f"{filename} is empty (only blank lines); write one JSON object per line", 0)
    return rows


def _check_size(data: bytes, filename: str, max_bytes: int) -> None:
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"upload data must be bytes, got {type(data).__name__}")
    if not data:
        raise UploadError(f"{filename} is empty; upload a JSONL file with one training example per line", 0)
    if len(data) > max_bytes:
        raise UploadError(f"{filename} is {len(data)} bytes; the limit is {max_bytes}; split it or raise the "
                          "server's upload limit", 0)


def _decode(raw: bytes, filename: str, n: int) -> str:
    try:
        return raw.decode("utf-8-sig" if n == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise UploadError(f"{filename} line {n}: not valid UTF-8 ({e.reason} at byte {e.start} of the line); "
                          "save the file as UTF-8", n) from None


def _parse(text: str, filename: str, n: int) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise UploadError(f"{filename} line {n}: not valid JSON: {e.msg} (column {e.colno}); each line must "
                          "hold one complete JSON object", n) from None
    if not isinstance(row, dict):
        kind = "null" if row is None else type(row).__name__
        raise UploadError(f"{filename} line {n}: expected a JSON object {{...}}, got {kind}; write one object "
                          "per line", n)
    return row


# ---- one row ------------------------------------------------------------------------------------------
def _row_format(row: dict, filename: str, n: int) -> str:
    """"chat" or "completion" from the row's keys; UploadError when it has neither."""
    if "messages" in row:
        return "chat"
    if "prompt" in row or "completion" in row:
        return "completion"
    raise UploadError(
        f"{filename} line {n}: missing 'messages' (found keys {sorted(row)}); each line must be "
        '{"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "completion": ...}', n)


def _check_row(row: dict, fmt: str, filename: str, n: int) -> None:
    where = f"{filename} line {n}"
    if fmt == "chat":
        _check_chat_extras(row, where, n)
        row = _joined_row(row)
    try:
        check_row(row, fmt, where)
    except DataError as e:
        raise UploadError(str(e), n) from None
    if fmt == "chat" and not any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"]):
        raise UploadError(f"{where}: every assistant message is empty, so there is nothing to learn; "
                          "write the assistant's reply or remove the row", n)


def _check_chat_extras(row: dict, where: str, n: int) -> None:
    """What OpenAI's chat format allows but training here does not: tools, tool/function roles, weights, and
    content parts other than text."""
    for key in UNSUPPORTED_KEYS:
        if key in row:
            raise UploadError(f"{where}: {key!r} is not supported (no tool or function calling in fine-tuning "
                              "here); remove it", n)
    messages = row["messages"]
    if not isinstance(messages, list):
        return  # check_row reports it
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            _check_message_extras(m, i, where, n)


def _check_message_extras(m: dict, i: int, where: str, n: int) -> None:
    if m.get("role") in UNSUPPORTED_ROLES:
        raise UploadError(f"{where}: messages[{i}] has role {m['role']!r}, which is not supported for "
                          f"fine-tuning here; roles must be one of {', '.join(ROLES)}", n)
    for key in UNSUPPORTED_MESSAGE_KEYS:
        if key in m:
            raise UploadError(f"{where}: messages[{i}] has {key!r}; tool and function calls are not supported "
                              "for fine-tuning here; remove it", n)
    if m.get("weight", 1) != 1:
        raise UploadError(f"{where}: messages[{i}] has weight {m['weight']!r}; only weight 1 (train on this "
                          "message) is supported; remove the message or its weight", n)
    if isinstance(m.get("content"), list):
        _check_parts(m["content"], i, where, n)


def _check_parts(parts: list, i: int, where: str, n: int) -> None:
    if not parts:
        raise UploadError(f"{where}: messages[{i}].content is an empty list; give it text", n)
    for j, p in enumerate(parts):
        if not isinstance(p, dict) or p.get("type") != "text":
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise UploadError(f"{where}: messages[{i}].content[{j}] has type {kind!r}; only "
                              '{"type": "text", "text": ...} parts are supported', n)
        if not isinstance(p.get("text"), str):
            raise UploadError(f"{where}: messages[{i}].content[{j}].text must be a string", n)


def _has_parts(row: dict) -> bool:
    return any(isinstance(m.get("content"), list) for m in row.get("messages", ()))


def _joined_row(row: dict) -> dict:
    """The chat row with each list of (already checked) text parts joined by newlines into one string."""
    messages = row["messages"]
    if not isinstance(messages, list):
        return row
    joined = [
        {**m, "content": "\n".join(p["text"] for p in m["content"])}
        if isinstance(m, dict) and isinstance(m.get("content"), list) else m
        for m in messages
    ]
    return {**row, "messages": joined}
