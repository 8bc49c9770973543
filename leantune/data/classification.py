"""Classification rows `{"text", "label"}` -> `ClassificationExample`s (token ids + a class id), for
sequence classifiers (e.g. an encoder with a classification head).

Labels are class ids (integers, or digit strings as CSV holds them) or class names (strings); names become ids
in sorted order, returned beside the examples so a model can be saved with its `id2label`. One kind per file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .formats import KIND, check_load_options, fit_length, read_canonical, warn_dropped
from .readers import DataError


@dataclass
class ClassificationExample:
    """Token ids of a text (with the tokenizer's own special tokens, e.g. [CLS] ... [SEP]) and its class id."""

    input_ids: list[int]
    label: int
    line: int = 0
    source: str = field(default="", compare=False)


def load_classification_dataset(
    path: str | Path, tokenizer, max_length: int, on_too_long: str = "error", split: str | None = None,
    columns: dict[str, str] | None = None, what: str = "--data",
) -> tuple[list[ClassificationExample], list[str] | None]:
    """(examples, class names in id order, or None when the labels are ids) of the rows under `path`."""
    check_load_options(max_length, on_too_long, None)
    fmt, rows = read_canonical(path, split, columns, None, what)
    if KIND[fmt] != "classification":
        raise DataError(f"{path}: has no classification rows (its rows are {fmt} rows); a classifier needs "
                        "rows with text and label")
    names = _label_names(rows)
    index = {n: i for i, n in enumerate(names or [])}
    out = [ClassificationExample(ids, index[data["label"]] if names else data["label"], row.n, row.source)
           for row, data, ids in _fitted_texts(rows, tokenizer, max_length, on_too_long, path)]
    if not out:
        raise DataError(f"{path}: no examples left after fitting them into max_length={max_length}; "
                        "raise --max-length")
    return out, names


def _fitted_texts(rows, tokenizer, max_length: int, on_too_long: str, path) -> list[tuple]:
    """(row, data, token ids of its text) of the rows that fit `max_length`: a longer one is an error naming it,
    cut, or dropped (`on_too_long`); the drops are reported once."""
    out, too_long = [], 0
    for row, data in rows:
        ids = tokenizer.encode(data["text"])
        fitted = fit_length(ids, ids, max_length, on_too_long, row.where)
        if fitted is None:
            too_long += 1
            continue
        out.append((row, data, fitted[0]))
    warn_dropped(path, too_long, 0, max_length)
    return out


def _label_names(rows) -> list[str] | None:
    first = rows[0][1]["label"]
    for row, data in rows:
        if isinstance(data["label"], str) != isinstance(first, str):
            raise DataError(f"{row.where}: label {data['label']!r} is a {type(data['label']).__name__} but the "
                            f"first row's is a {type(first).__name__}; use class ids or class names throughout")
        if isinstance(data["label"], int) and data["label"] < 0:
            raise DataError(f"{row.where}: label {data['label']} is negative; class ids count from 0")
    return sorted({d["label"] for _, d in rows}) if isinstance(first, str) else None


def load_unlabeled_texts(
    path: str | Path, tokenizer, max_length: int, on_too_long: str = "error", split: str | None = None,
    columns: dict[str, str] | None = None, what: str = "--unlabeled",
) -> list[list[int]]:
    """Token ids of the unlabeled rows `{"text"}` under `path` (self-training's pool). Rows that carry a label are
    refused rather than read as unlabeled: the label would be silently ignored, which hides a wrong file."""
    check_load_options(max_length, on_too_long, None)
    fmt, rows = read_canonical(path, split, columns, None, what)
    if KIND[fmt] == "classification":
        raise DataError(f"{path}: {what} rows carry labels, which self-training would ignore; give the rows "
                        "as {\"text\": ...} only, or add the labelled rows to --data")
    if fmt != "text":
        raise DataError(f"{path}: {what} needs rows of text only ({{\"text\": ...}}), its rows are {fmt} rows")
    out = [ids for _, _, ids in _fitted_texts(rows, tokenizer, max_length, on_too_long, path)]
    if not out:
        raise DataError(f"{path}: no {what} rows left after fitting them into max_length={max_length}")
    return out
