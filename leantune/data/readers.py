"""Readers: a JSON Lines training file -> rows (dicts), each with the line it came from.

Format: JSON Lines (https://jsonlines.org): UTF-8, one JSON object per line. Blank lines are skipped and a
UTF-8 byte-order mark is tolerated. Every problem is a `DataError` whose message reads
`file:line: what is wrong; how to fix it`, so a user can open the file at the right place.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

_JSON_TYPE = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false"}


class DataError(ValueError):
    """Bad training data. The message names the file (and line), what is wrong and what to do."""


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, row)` for every non-blank line of a JSONL file (lines count from 1)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found; check the data path (e.g. --data)")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a JSONL file; pass the path of the .jsonl file itself")
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            text = _decode(raw, path, n)
            if text.strip():
                yield n, _parse(text, path, n)


def read_jsonl_numbered(path: str | Path) -> list[tuple[int, dict]]:
    """All `(line_number, row)` pairs of a JSONL file; a file without rows is an error."""
    rows = list(iter_jsonl(path))
    if not rows:
        raise DataError(
            f"{path}: contains no examples (the file is empty or has only blank lines); "
            'write one JSON object per line, e.g. {"text": "..."}'
        )
    return rows


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL file, in file order."""
    return [row for _, row in read_jsonl_numbered(path)]


def _decode(raw: bytes, path: Path, n: int) -> str:
    try:
        return raw.decode("utf-8-sig" if n == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start} of the line); save the file as UTF-8"
        ) from None


def _parse(text: str, path: Path, n: int) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{n}: malformed JSON: {e.msg} (column {e.colno}); each line must hold one complete "
            'JSON object, e.g. {"text": "..."} (a pretty-printed .json file is not JSON Lines)'
        ) from None
    if not isinstance(row, dict):
        kind = "null" if row is None else _JSON_TYPE.get(type(row), type(row).__name__)
        raise DataError(f"{path}:{n}: expected a JSON object {{...}}, got {kind}; write one object per line")
    return row
