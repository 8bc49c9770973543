"""Files of `leantune select`: the selected rows written back in the pool's own container (JSON Lines, JSON
array, CSV, Parquet, a `datasets` folder), and the per-row scores (CSV or JSON Lines). Every file is written
under a temporary name and renamed, so an interrupted run leaves no output that looks complete. No torch.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from .base import DataError, Row
from .readers import COLUMNAR_SUFFIXES, TEXT_SUFFIXES, container_of

SCORE_SUFFIXES = (".csv", ".jsonl")


def _files(pool: str) -> list[Path]:
    """The data files a pool path reads (a file, a folder of shards or a glob), in read order."""
    p = Path(pool)
    if p.is_file():
        return [p]
    if p.is_dir():
        suffixes = TEXT_SUFFIXES.keys() | COLUMNAR_SUFFIXES.keys()
        return sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in suffixes)
    return [Path(f) for f in sorted(glob.glob(pool, recursive=True)) if Path(f).is_file()]


def pool_container(pool: str) -> str:
    """jsonl, json, csv, parquet or datasets: how the pool is stored, so the output is stored alike."""
    from .columnar import is_datasets_folder

    p = Path(pool)
    if p.is_dir() and is_datasets_folder(p):
        return "datasets"
    kinds = {container_of(f.name) for f in _files(pool)}
    if len(kinds) > 1:
        raise DataError(f"--pool {pool}: mixes {', '.join(sorted(kinds))} files; keep one container per pool")
    return kinds.pop() if kinds else container_of(p.name)


def check_output(output: str, container: str) -> None:
    """--output must say the pool's container (or nothing); a datasets pool writes a folder."""
    suffix = Path(output).suffix.lower()
    said = TEXT_SUFFIXES.get(suffix) or COLUMNAR_SUFFIXES.get(suffix)
    if container == "datasets" and said:
        raise ValueError(f"--output {output}: the pool is a datasets folder, so the selection is written as one "
                         "(save_to_disk); give a folder name without a file suffix")
    if said and said != container:
        raise ValueError(f"--output {output}: is a {said} name but the pool is {container}; the selection keeps "
                         f"the pool's format, so name the output like the pool")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = _tmp(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_selected(pool: str, split: str | None, container: str, rows: Sequence[Row], order: Sequence[int],
                   output: str) -> None:
    """The rows at `order` (indices into the pool's rows, best first) written to `output` as `container`."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if container == "datasets":
        return _write_datasets(pool, split, order, out)
    if container == "parquet":
        return _write_parquet(pool, order, out)
    picked = [rows[i].data for i in order]
    if container == "csv":
        data = _csv_bytes(pool, picked)
    elif container == "json":
        data = ("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in picked) + "\n]\n").encode()
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in picked).encode()
    _write_bytes(out, data)


def _csv_bytes(pool: str, picked: list[dict]) -> bytes:
    """CSV with the pool's header (the reader drops empty cells, so the header is read from the files)."""
    header: dict[str, None] = {}
    for f in _files(pool):
        with open(f, encoding="utf-8-sig", newline="") as fh:
            header.update((h.strip(), None) for h in next(csv.reader(fh), []))
    for r in picked:
        header.update((k, None) for k in r)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in picked:
        w.writerow([_cell(r.get(k)) for k in header])
    return buf.getvalue().encode()


def _cell(v) -> str:
    return "" if v is None else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def _write_parquet(pool: str, order: Sequence[int], out: Path) -> None:
    """The pool's own table rows (schema unchanged), taken in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(f) for f in _files(pool)], promote_options="default")
    tmp = _tmp(out)
    try:
        pq.write_table(table.take(pa.array(order, type=pa.int64())), tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _write_datasets(pool: str, split: str | None, order: Sequence[int], out: Path) -> None:
    import datasets

    ds = datasets.load_from_disk(pool)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split or next(iter(ds))]
    tmp = _tmp(out)
    ds.select(list(order)).save_to_disk(str(tmp))
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)  # the folder appears complete; a previous selection is removed only after
    shutil.rmtree(old, ignore_errors=True)


def write_scores(path: str, scores, selected) -> None:
    """One line per pool row: its 0-based index, score and whether it was selected (CSV or JSON Lines)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".jsonl":
        lines = (json.dumps({"index": i, "score": float(s), "selected": bool(k)})
                 for i, (s, k) in enumerate(zip(scores, selected)))
        data = "".join(line + "\n" for line in lines)
    else:
        data = "index,score,selected\n" + "".join(f"{i},{float(s)!r},{int(k)}\n"
                                                  for i, (s, k) in enumerate(zip(scores, selected)))
    _write_bytes(out, data.encode())
