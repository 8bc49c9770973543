"""Readers: a training data path -> rows (dicts), each with the file and line (or row) it came from.

Containers, chosen by the path:

- JSON Lines (https://jsonlines.org; `.jsonl`, and any other suffix): UTF-8, one JSON object per line; blank
  lines skipped, a byte-order mark tolerated.
- JSON (`.json`): an array of objects (rows report the line their object starts on); a `.json` file holding
  JSON Lines is read as JSON Lines, as Hugging Face's `json` loader does.
- CSV (`.csv`, RFC 4180 via Python's `csv`): a header row of column names, then one row per example; every
  row must have as many fields as the header. An empty cell is an absent field (CSV has no null).
- Parquet (`.parquet`) and a Hugging Face `datasets` folder written by `save_to_disk` (`columnar.py`; the
  optional `data` extra).
- A folder of such files (shards, read in name order) or a glob pattern (`data/part-*.parquet`).

Every problem is a `DataError` whose message reads `file:line: what is wrong; how to fix it` (`file row N:` for
containers without lines), so a user can open the file at the right place. No torch here.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from .base import DataError, Row

_JSON_TYPE = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false"}
TEXT_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
COLUMNAR_SUFFIXES = {".parquet": "parquet", ".pq": "parquet"}
CONTAINERS = ("jsonl", "json", "csv", "parquet")
_SPACE = re.compile(r"[ \t\r\n]*")  # JSON's whitespace


# ---- any path -----------------------------------------------------------------------------------------
def read_rows(path: str | Path, split: str | None = None, what: str = "--data") -> list[Row]:
    """Every row under `path`: a file, a `datasets` folder (`split` picks a DatasetDict's split), a folder of
    shards or a glob pattern. A path without rows is an error; `what` names the option in messages."""
    path_s = str(path)
    if any(c in path_s for c in "*?[") and not Path(path_s).exists():
        files = [Path(p) for p in sorted(glob.glob(path_s, recursive=True)) if Path(p).is_file()]
        if not files:
            raise DataError(f"{path_s}: the pattern matches no files; check {what}")
        rows = _no_split(split, path_s, what) or [r for f in files for r in read_file(f)]
    else:
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: file not found; check the data path (e.g. {what})")
        if path.is_dir():
            rows = _read_folder(path, split, what)
        else:
            rows = _no_split(split, path_s, what) or read_file(path)
    if not rows:
        raise DataError(
            f"{path_s}: contains no examples (the file is empty or has only blank lines); "
            'write one example per line, e.g. {"text": "..."}'
        )
    return rows


def _no_split(split: str | None, path: str, what: str) -> list:
    """A split names one part of a `datasets` DatasetDict folder; anywhere else it would be ignored, so refuse."""
    if split is not None:
        raise DataError(f"{path}: a split ({split!r}) applies to a Hugging Face datasets folder holding a "
                        f"DatasetDict, not to this path; drop the split option for {what}")
    return []


def _read_folder(path: Path, split: str | None, what: str) -> list[Row]:
    from . import columnar

    if columnar.is_datasets_folder(path):
        return columnar.read_datasets_folder(path, split)
    _no_split(split, str(path), what)
    suffixes = TEXT_SUFFIXES.keys() | COLUMNAR_SUFFIXES.keys()
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise DataError(f"{path}: is a folder without data files ({', '.join(sorted(suffixes))}) and not a "
                        "datasets folder (save_to_disk); pass a data file, a folder of shards, or a glob pattern")
    return [r for f in files for r in read_file(f)]


def container_of(name: str) -> str:
    """The container a file name says: jsonl (the default), json, csv or parquet."""
    suffix = Path(name).suffix.lower()
    return TEXT_SUFFIXES.get(suffix) or COLUMNAR_SUFFIXES.get(suffix) or "jsonl"


def read_file(path: str | Path) -> list[Row]:
    """The rows of one data file, by its suffix."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found; check the data path (e.g. --data)")
    return read_bytes(path.read_bytes(), str(path), container_of(path.name))


def read_bytes(data: bytes, name: str, container: str) -> list[Row]:
    """The rows of a file's bytes (e.g. an upload); `name` is used in messages."""
    if container == "parquet":
        from . import columnar

        return columnar.read_parquet(io.BytesIO(data), name)
    if container == "csv":
        return _csv_rows(_decode(data, name), name)
    if container == "json":
        return _json_rows(_decode(data, name), name)
    if container == "jsonl":
        return list(_jsonl_rows(data.split(b"\n"), name))
    raise ValueError(f"unknown container {container!r}; one of {', '.join(CONTAINERS)}")


# ---- JSON Lines ---------------------------------------------------------------------------------------
def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, row)` for every non-blank line of a JSONL file (lines count from 1)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found; check the data path (e.g. --data)")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a JSONL file; pass the path of the .jsonl file itself")
    with path.open("rb") as f:
        for row in _jsonl_rows(f, str(path)):
            yield row.n, row.data


def _jsonl_rows(lines: Iterable[bytes], name: str) -> Iterator[Row]:
    for n, raw in enumerate(lines, start=1):
        text = _decode_line(raw, name, n)
        if text.strip():
            yield Row(_parse(text, name, n), name, n)


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


def _decode_line(raw: bytes, name: str, n: int) -> str:
    try:
        return raw.decode("utf-8-sig" if n == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{name}:{n}: not valid UTF-8 ({e.reason} at byte {e.start} of the line); save the file as UTF-8", n
        ) from None


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{name}:{line}: not valid UTF-8 ({e.reason}); save the file as UTF-8", line) from None


def _parse(text: str, name: str, n: int) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{name}:{n}: malformed JSON: {e.msg} (column {e.colno}); each line must hold one complete "
            'JSON object, e.g. {"text": "..."} (a pretty-printed .json file is not JSON Lines)', n
        ) from None
    return _object(row, name, n)


def _object(row, name: str, n: int) -> dict:
    if not isinstance(row, dict):
        kind = "null" if row is None else _JSON_TYPE.get(type(row), type(row).__name__)
        raise DataError(f"{name}:{n}: expected a JSON object {{...}}, got {kind}; write one object per example", n)
    return row


# ---- JSON array ---------------------------------------------------------------------------------------
def _json_rows(text: str, name: str) -> list[Row]:
    """The objects of a JSON array, each with the line it starts on. Decoded element by element (not with one
    json.loads) so that an error names the line of the bad element."""
    start = len(text) - len(text.lstrip())
    if not text[start:start + 1] == "[":
        if text.strip():  # JSON Lines in a .json file (Hugging Face's json loader reads both)
            return list(_jsonl_rows(text.encode("utf-8").split(b"\n"), name))
        return []
    dec, i, rows = json.JSONDecoder(), start + 1, []
    lines = _LineCounter(text)
    while True:
        i = _skip_space(text, i)
        if text.startswith("]", i) and not rows:
            break
        line = lines.at(i)
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno}); the file must "
                            "hold one JSON array of objects, [{...}, {...}]", e.lineno) from None
        rows.append(Row(_object(obj, name, line), name, line))
        i = _skip_space(text, i)
        if text.startswith("]", i):
            break
        if not text.startswith(",", i):
            raise DataError(f"{name}:{lines.at(i)}: expected ',' or ']' after an element of the JSON array; fix "
                            "the array's punctuation", lines.at(i))
        i += 1
    if text[i + 1:].strip():
        raise DataError(f"{name}:{lines.at(i)}: text after the closing ']' of the JSON array; keep one array per "
                        "file")
    return rows


class _LineCounter:
    """Line numbers of increasing positions in a text, counted incrementally (a count from the start for
    every element would make a large file quadratic)."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, i: int) -> int:
        self.line += self.text.count("\n", self.pos, i)
        self.pos = i
        return self.line


def _skip_space(text: str, i: int) -> int:
    return _SPACE.match(text, i).end()


# ---- CSV ----------------------------------------------------------------------------------------------
def _csv_rows(text: str, name: str) -> list[Row]:
    """One row per CSV record after the header; empty cells are absent fields. Lines: where a record starts."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return []
        header = _check_header(header, name)
        rows, line = [], reader.line_num + 1
        for record in reader:
            if record:
                if len(record) != len(header):
                    raise DataError(
                        f"{name}:{line}: row has {len(record)} field(s) but the header has {len(header)} "
                        f"({', '.join(header)}); quote fields that hold commas, quotes or line breaks "
                        '("a, b"; a quote inside is written twice: "say ""hi""") or fix the row', line)
                rows.append(Row({k: v for k, v in zip(header, record) if v != ""}, name, line))
            line = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{name}:{reader.line_num}: malformed CSV: {e}; fix the quoting of this row",
                        reader.line_num) from None
    return rows


def _check_header(header: list[str], name: str) -> list[str]:
    names = [h.strip() for h in header]
    if any(not h for h in names) or len(set(names)) != len(names):
        raise DataError(f"{name}:1: the CSV header must name every column once, got {header}; "
                        "the first line holds the column names (e.g. prompt,completion)")
    return names
