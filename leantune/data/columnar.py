"""Columnar readers: Parquet files and Hugging Face `datasets` folders (`Dataset.save_to_disk` /
`DatasetDict.save_to_disk`) -> rows, each numbered by its 1-based position.

These need the optional `data` extra (`pip install 'leantune[data]'`: `pyarrow`, `datasets`), imported only
when such a file is read; without it the message says what to install. Columnar tables fill a field a row
lacks with null; `rows.py` treats null as absent, so a Parquet row means what the same JSON row means.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from .base import DataError, Row

EXTRA = "pip install 'leantune[data]' (or: pip install pyarrow datasets)"
# files `save_to_disk` writes: a DatasetDict's index, or one Dataset's state
DATASETS_MARKERS = ("dataset_dict.json", "state.json")


def _require(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{what}: reading it needs the `{module.split('.')[0]}` package, an optional extra; "
                        f"{EXTRA}, or convert the data to JSONL, JSON or CSV") from None


def read_parquet(source, name: str) -> list[Row]:
    """The rows of a Parquet file (a path or a binary file object)."""
    pq = _require("pyarrow.parquet", f"{name} (Parquet)")
    try:
        table = pq.read_table(source)
    except Exception as e:  # pyarrow's ArrowInvalid and OSError subclasses, named in the message
        raise DataError(f"{name}: not a readable Parquet file ({type(e).__name__}: {e}); check the file, or "
                        "write it again with pyarrow/pandas (df.to_parquet)") from None
    return [Row(r, name, i, "row") for i, r in enumerate(table.to_pylist(), start=1)]


def is_datasets_folder(path: Path) -> bool:
    return any((path / m).is_file() for m in DATASETS_MARKERS)


def read_datasets_folder(path: Path, split: str | None) -> list[Row]:
    """The rows of a `save_to_disk` folder; a DatasetDict needs `split` unless it holds just one."""
    datasets = _require("datasets", f"{path} (a Hugging Face datasets folder)")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError/ValueError/... for damaged folders
        raise DataError(f"{path}: not a readable datasets folder ({type(e).__name__}: {e}); write it again "
                        "with save_to_disk") from None
    name = str(path)
    if isinstance(ds, datasets.DatasetDict):
        split = _pick_split(path, list(ds), split)
        ds, name = ds[split], f"{path}[{split}]"
    elif split is not None:
        raise DataError(f"{path}: holds one Dataset, not a DatasetDict, so there is no split {split!r} to pick; "
                        "drop the split option")
    return [Row(r, name, i, "row") for i, r in enumerate(ds.to_list(), start=1)]


def _pick_split(path: Path, splits: list[str], split: str | None) -> str:
    if split is None and len(splits) == 1:
        return splits[0]
    if split is None:
        raise DataError(f"{path}: is a DatasetDict with splits {splits}; choose one with --split (for --data) "
                        "or --eval-split (for --eval-data)")
    if split not in splits:
        raise DataError(f"{path}: has no split {split!r}; its splits are {splits}")
    return split
