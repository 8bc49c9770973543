"""Store: the server's persistent state — uploaded files, fine-tuning jobs, their events and checkpoints,
and served adapters — in one SQLite database plus plain files under a data folder.

Layout of `data_dir`: `store.sqlite3` (WAL mode), `files/<file-id>.jsonl` (uploaded bytes), `jobs/<job>/`
(a job's working folder), `adapters/<name>/` (adapters that jobs publish). Records come back as plain dicts
shaped like OpenAI's objects (https://platform.openai.com/docs/api-reference/files and
.../fine-tuning): file, fine_tuning.job, fine_tuning.job.event, fine_tuning.job.checkpoint.

Ownership: every file and job belongs to an `owner` (one per API key); reads and deletes filter by owner,
so one key never sees another's objects. The owner is kept out of the returned objects; `job_owner` gives
it to the engine. Events and checkpoints are reached through their job, so the caller checks the job's
owner first.

Lists are newest first (as OpenAI lists jobs, events and checkpoints); `after` is the id of the last item of
the previous page, so the next page holds older items. Paginated lists return `(items, has_more)`.

Durability: uploaded bytes are written to a temp name, fsynced and renamed before their row is inserted, so
a row always points at a complete file; a crash at any point leaves at most an orphan file, never a row
without one. One connection (`check_same_thread=False`) serves the asyncio thread and the engine thread,
serialized by a lock.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Self

SCHEMA_VERSION = 1
JOB_STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")
# the statuses of a job not finished yet (what a per-key job quota counts)
ACTIVE_JOB_STATUSES = ("validating_files", "queued", "running", "paused")
EVENT_LEVELS = ("info", "warn", "error")
EVENT_TYPES = ("message", "metrics")
# Fields of a job the engine may change after creation (`update_job`).
JOB_MUTABLE = (
    "status", "fine_tuned_model", "finished_at", "error", "trained_tokens", "hyperparameters",
    "result_files", "estimated_finish", "seed", "method", "integrations",
)
_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_PLAIN_DIR = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,
    filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS files_owner ON files (owner, seq);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,
    status TEXT NOT NULL, obj TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL, obj TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL,
    step INTEGER NOT NULL, path TEXT NOT NULL, obj TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS checkpoints_job ON checkpoints (job_id, seq);
CREATE TABLE IF NOT EXISTS adapters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,
    path TEXT NOT NULL, base TEXT NOT NULL, source TEXT NOT NULL, created_at INTEGER NOT NULL);
"""


# ---- names and paths ----------------------------------------------------------------------------------
def safe_component(name: str, what: str = "name") -> str:
    """`name` when it may become one path component: 1-128 characters of letters, digits and `._:-`,
    starting with a letter or digit, without `..`; else a ValueError that says which rule it breaks."""
    if not isinstance(name, str) or not _COMPONENT.match(name):
        shown = name if not isinstance(name, str) or len(name) <= 40 else name[:40] + "..."
        raise ValueError(
            f"invalid {what} {shown!r}: use 1-128 characters of letters, digits, '.', '_', ':' and '-', "
            "starting with a letter or digit (no '/', no spaces)"
        )
    if ".." in name:
        raise ValueError(f"invalid {what} {name!r}: '..' is not allowed in a name")
    return name


def fs_name(name: str) -> str:
    """The folder name for a valid `name`: the name itself when it is plain (lowercase letters, digits, `._-`,
    no `--`, no trailing dot, not a Windows device name); otherwise the name with ':' -> '--' and '.' -> '_',
    plus '-' and 8 hex of its SHA-256, so the mapping stays one-to-one on case-insensitive file systems and
    works on Windows."""
    safe_component(name)
    stem = name.split(".")[0].lower()
    if _PLAIN_DIR.match(name) and "--" not in name and not name.endswith(".") and stem not in _WINDOWS_RESERVED:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name.replace(':', '--').replace('.', '_')}-{digest}"


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _now() -> int:
    return int(time.time())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open a folder (Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via `<path>.tmp`: write, fsync, rename, fsync the folder. On any error the temp
    file is removed and `path` is untouched."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    return limit


def _check_choice(value, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, got {value!r}")


def _check_text(value, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return value


class Store:
    """Files, jobs, events, checkpoints and adapters of one server, persisted under `data_dir`."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir).resolve()
        for sub in ("files", "jobs", "adapters"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / "store.sqlite3"
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.db_path, check_same_thread=False, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        self._init_schema()

    def _init_schema(self) -> None:
        with self._lock:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.db_path}: schema version {version} is newer than this leantune's "
                    f"({SCHEMA_VERSION}); upgrade leantune or use another --data-dir"
                )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- SQL helpers ----------------------------------------------------------------------------------
    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _write(self, sql: str, params: tuple = ()) -> int:
        """Run one statement in its own transaction; the number of rows it changed."""
        with self._lock, self._conn:
            return self._conn.execute(sql, params).rowcount

    def _after_seq(self, table: str, scope: str, scope_value: str, after: str | None) -> int | None:
        """The seq of item `after` within `scope` (a job or owner), None without a cursor; ValueError when
        `after` names no item there."""
        if after is None:
            return None
        rows = self._query(f"SELECT seq FROM {table} WHERE id = ? AND {scope} = ?", (after, scope_value))
        if not rows:
            raise ValueError(f"after={after!r} names no item of this list; pass the id of an item from the "
                             "previous page")
        return rows[0]["seq"]

    def _page(self, table: str, scope: str, scope_value: str, after: str | None, limit: int) -> tuple[list, bool]:
        """Up to `limit` rows of `table` in `scope`, newest first, older than `after`; and whether more follow."""
        _check_limit(limit)
        seq = self._after_seq(table, scope, scope_value, after)
        cond, params = (f"{scope} = ?", (scope_value,)) if seq is None else (f"{scope} = ? AND seq < ?",
                                                                             (scope_value, seq))
        rows = self._query(f"SELECT * FROM {table} WHERE {cond} ORDER BY seq DESC LIMIT ?", (*params, limit + 1))
        return rows[:limit], len(rows) > limit

    # ---- files ----------------------------------------------------------------------------------------
    def add_file(self, owner: str, filename: str, purpose: str, data: bytes) -> dict:
        """Store uploaded bytes as a new file of `owner`: the bytes reach disk (temp + fsync + rename) before the
        row is inserted. Returns the OpenAI file object."""
        _check_text(owner, "owner")
        _check_text(filename, "filename")
        _check_text(purpose, "purpose")
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"file data must be bytes, got {type(data).__name__}")
        file_id, created = _new_id("file"), _now()
        path = self._file_path(file_id)
        write_atomic(path, bytes(data))
        try:
            self._write(
                "INSERT INTO files (id, owner, filename, purpose, bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (file_id, owner, filename, purpose, len(data), created),
            )
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return self.get_file(owner, file_id)

    def _file_path(self, file_id: str) -> Path:
        return self.data_dir / "files" / f"{fs_name(file_id)}.jsonl"

    @staticmethod
    def _file_obj(row: sqlite3.Row) -> dict:
        return {
            "id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
        }

    def get_file(self, owner: str, file_id: str) -> dict | None:
        """The file object, or None when `owner` has no file `file_id`."""
        rows = self._query("SELECT * FROM files WHERE id = ? AND owner = ?", (file_id, owner))
        return self._file_obj(rows[0]) if rows else None

    def list_files(self, owner: str, purpose: str | None = None) -> list[dict]:
        """All files of `owner` (of one `purpose` when given), newest first."""
        if purpose is None:
            rows = self._query("SELECT * FROM files WHERE owner = ? ORDER BY seq DESC", (owner,))
        else:
            rows = self._query("SELECT * FROM files WHERE owner = ? AND purpose = ? ORDER BY seq DESC",
                               (owner, purpose))
        return [self._file_obj(r) for r in rows]

    def replace_file(self, owner: str, file_id: str, data: bytes) -> dict:
        """New bytes for `owner`'s existing file (a job's result file, rewritten as the job runs): bytes first
        (temp + fsync + rename), then the row's size. KeyError when there is no such file."""
        if self.get_file(owner, file_id) is None:
            raise KeyError(f"no file {file_id!r}")
        write_atomic(self._file_path(file_id), bytes(data))
        self._write("UPDATE files SET bytes = ? WHERE id = ? AND owner = ?", (len(data), file_id, owner))
        return self.get_file(owner, file_id)

    def stored_bytes(self, owner: str) -> int:
        """The bytes of all of `owner`'s files (what a per-key storage quota counts)."""
        return self._query("SELECT COALESCE(SUM(bytes), 0) AS n FROM files WHERE owner = ?", (owner,))[0]["n"]

    def delete_file(self, owner: str, file_id: str) -> bool:
        """Delete `owner`'s file (row first, then bytes, so a crash leaves no row without bytes); False when
        `owner` has no such file."""
        if not self._write("DELETE FROM files WHERE id = ? AND owner = ?", (file_id, owner)):
            return False
        self._file_path(file_id).unlink(missing_ok=True)
        return True

    def file_path(self, owner: str, file_id: str) -> Path | None:
        """Where the bytes of `owner`'s file `file_id` lie, or None when `owner` has no such file."""
        return self._file_path(file_id) if self.get_file(owner, file_id) else None

    # ---- jobs -----------------------------------------------------------------------------------------
    def add_job(
        self, owner: str, model: str, training_file: str, validation_file: str | None = None,
        hyperparameters: dict | None = None, suffix: str | None = None, seed: int | None = None,
        method: dict | None = None, integrations: list | None = None,
    ) -> dict:
        """A new fine-tuning job of `owner` with status "queued". Returns the OpenAI fine_tuning.job object;
        `suffix` appears as `user_provided_suffix`; `method` defaults to {"type": "supervised"}; `integrations`:
        OpenAI's list of experiment loggers ([{"type": "wandb", "wandb": {...}}])."""
        _check_text(owner, "owner")
        _check_text(model, "model")
        _check_text(training_file, "training_file")
        job = {
            "id": _new_id("ftjob"), "object": "fine_tuning.job", "model": model, "created_at": _now(),
            "finished_at": None, "fine_tuned_model": None, "organization_id": "leantune", "result_files": [],
            "status": "queued", "validation_file": validation_file, "training_file": training_file,
            "hyperparameters": dict(hyperparameters or {}), "trained_tokens": None, "error": None,
            "seed": seed, "user_provided_suffix": suffix, "method": dict(method or {"type": "supervised"}),
            "estimated_finish": None, "integrations": list(integrations or []),
        }
        self._write("INSERT INTO jobs (id, owner, status, obj) VALUES (?, ?, ?, ?)",
                    (job["id"], owner, job["status"], json.dumps(job)))
        return job

    @staticmethod
    def _job_obj(row: sqlite3.Row) -> dict:
        return json.loads(row["obj"])

    def get_job(self, owner: str, job_id: str) -> dict | None:
        """The job object, or None when `owner` has no job `job_id`."""
        rows = self._query("SELECT obj FROM jobs WHERE id = ? AND owner = ?", (job_id, owner))
        return self._job_obj(rows[0]) if rows else None

    def job_owner(self, job_id: str) -> str | None:
        """The owner of job `job_id` (for the engine, which works on every owner's jobs), or None."""
        rows = self._query("SELECT owner FROM jobs WHERE id = ?", (job_id,))
        return rows[0]["owner"] if rows else None

    def list_jobs(self, owner: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """`owner`'s jobs, newest first, older than job `after`; returns (jobs, has_more)."""
        rows, more = self._page("jobs", "owner", owner, after, limit)
        return [self._job_obj(r) for r in rows], more

    def count_jobs(self, owner: str, *statuses: str) -> int:
        """How many of `owner`'s jobs have one of `statuses`."""
        for st in statuses:
            _check_choice(st, JOB_STATUSES, "job status")
        marks = ", ".join("?" * len(statuses)) or "NULL"
        return self._query(f"SELECT COUNT(*) AS n FROM jobs WHERE owner = ? AND status IN ({marks})",
                           (owner, *statuses))[0]["n"]

    def update_job(self, job_id: str, **fields) -> dict:
        """Set fields of job `job_id` (any owner; names from JOB_MUTABLE) and return the updated object.
        KeyError when there is no such job; ValueError for an unknown field or status."""
        bad = sorted(set(fields) - set(JOB_MUTABLE))
        if bad:
            raise ValueError(f"cannot update job field(s) {', '.join(bad)}; updatable: {', '.join(JOB_MUTABLE)}")
        if "status" in fields:
            _check_choice(fields["status"], JOB_STATUSES, "job status")
        if fields.get("error") is not None and not isinstance(fields["error"], dict):
            raise ValueError(f"job error must be a dict like {{'code', 'message', 'param'}} or None, "
                             f"got {type(fields['error']).__name__}")
        with self._lock, self._conn:
            row = self._conn.execute("SELECT obj FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(f"no fine-tuning job {job_id!r}")
            job = {**json.loads(row["obj"]), **fields}
            self._conn.execute("UPDATE jobs SET status = ?, obj = ? WHERE id = ?",
                               (job["status"], json.dumps(job), job_id))
        return job

    def jobs_with_status(self, *statuses: str) -> list[dict]:
        """Jobs of every owner whose status is one of `statuses`, oldest first (the order to resume them)."""
        for s in statuses:
            _check_choice(s, JOB_STATUSES, "job status")
        if not statuses:
            return []
        marks = ", ".join("?" * len(statuses))
        rows = self._query(f"SELECT obj FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses)
        return [self._job_obj(r) for r in rows]

    def job_dir(self, job_id: str) -> Path:
        """The working folder of job `job_id` (not created); ValueError for an unsafe id."""
        return self._inside("jobs", safe_component(job_id, "job id"))

    def _inside(self, sub: str, name: str) -> Path:
        path = (self.data_dir / sub / fs_name(name)).resolve()
        if not path.is_relative_to(self.data_dir / sub):
            raise ValueError(f"invalid name {name!r}: its folder {path} would lie outside {self.data_dir / sub}")
        return path

    # ---- events ---------------------------------------------------------------------------------------
    def add_event(self, job_id: str, message: str, level: str = "info", data: dict | None = None,
                  type: str = "message") -> dict:
        """Append an event to job `job_id`; returns the OpenAI fine_tuning.job.event object."""
        _check_choice(level, EVENT_LEVELS, "event level")
        _check_choice(type, EVENT_TYPES, "event type")
        if not isinstance(message, str):
            raise TypeError(f"event message must be a string, got {message!r}")
        event = {
            "id": _new_id("ftevent"), "object": "fine_tuning.job.event", "created_at": _now(),
            "level": level, "message": message, "data": data, "type": type,
        }
        self._write("INSERT INTO events (id, job_id, obj) VALUES (?, ?, ?)", (event["id"], job_id, json.dumps(event)))
        return event

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """Events of job `job_id`, newest first, older than event `after`; returns (events, has_more)."""
        rows, more = self._page("events", "job_id", job_id, after, limit)
        return [json.loads(r["obj"]) for r in rows], more

    # ---- checkpoints ----------------------------------------------------------------------------------
    def add_checkpoint(self, job_id: str, step: int, metrics: dict, path: str | os.PathLike,
                       fine_tuned_model_checkpoint: str) -> dict:
        """Record a checkpoint of job `job_id` saved at `path`; returns the OpenAI fine_tuning.job.checkpoint
        object (without the path)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
        _check_text(os.fspath(path), "checkpoint path")
        ckpt = {
            "id": _new_id("ftckpt"), "object": "fine_tuning.job.checkpoint", "created_at": _now(),
            "fine_tuned_model_checkpoint": fine_tuned_model_checkpoint, "fine_tuning_job_id": job_id,
            "metrics": dict(metrics or {}), "step_number": step,
        }
        self._write("INSERT INTO checkpoints (id, job_id, step, path, obj) VALUES (?, ?, ?, ?, ?)",
                    (ckpt["id"], job_id, step, os.fspath(path), json.dumps(ckpt)))
        return ckpt

    def list_checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> tuple[list[dict], bool]:
        """Checkpoints of job `job_id`, newest first, older than checkpoint `after`; returns
        (checkpoints, has_more)."""
        rows, more = self._page("checkpoints", "job_id", job_id, after, limit)
        return [json.loads(r["obj"]) for r in rows], more

    def latest_checkpoint(self, job_id: str) -> dict | None:
        """The checkpoint of job `job_id` with the highest step (the newest among equal steps), with its
        `path` added; None when the job has none."""
        rows = self._query("SELECT obj, path FROM checkpoints WHERE job_id = ? ORDER BY step DESC, seq DESC "
                           "LIMIT 1", (job_id,))
        return {**json.loads(rows[0]["obj"]), "path": rows[0]["path"]} if rows else None

    def checkpoint_by_model(self, name: str) -> dict | None:
        """The checkpoint whose `fine_tuned_model_checkpoint` is `name`, with its `path` and its job's `owner`
        added; None when none is."""
        rows = self._query("SELECT c.obj, c.path, j.owner FROM checkpoints c JOIN jobs j ON j.id = c.job_id "
                           "WHERE json_extract(c.obj, '$.fine_tuned_model_checkpoint') = ? ORDER BY c.seq DESC "
                           "LIMIT 1", (name,))
        return {**json.loads(rows[0]["obj"]), "path": rows[0]["path"], "owner": rows[0]["owner"]} if rows else None

    def checkpoint_paths(self) -> list[dict]:
        """Every checkpoint's adapter folder with its job's owner ({"path", "owner"}): folders a key may not
        load by path unless they are its own (serve.api.admin)."""
        rows = self._query("SELECT c.path, j.owner FROM checkpoints c JOIN jobs j ON j.id = c.job_id", ())
        return [{"path": r["path"], "owner": r["owner"]} for r in rows]

    # ---- adapters -------------------------------------------------------------------------------------
    def add_adapter(self, owner: str, name: str, path: str | os.PathLike, base: str, source: str) -> dict:
        """Register adapter `name` (a model name requests can use) stored at `path` on base model `base`;
        `source` says where it came from (e.g. "job" or "api"). ValueError when the name is taken."""
        safe_component(name, "adapter name")
        path = os.fspath(path)
        for value, what in ((owner, "owner"), (path, "adapter path"), (base, "base"), (source, "source")):
            _check_text(value, what)
        try:
            self._write("INSERT INTO adapters (name, owner, path, base, source, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (name, owner, path, base, source, _now()))
        except sqlite3.IntegrityError:
            raise ValueError(f"an adapter named {name!r} already exists; unload it first or pick another "
                             "name") from None
        return self.get_adapter(name)

    @staticmethod
    def _adapter_obj(row: sqlite3.Row) -> dict:
        return {k: row[k] for k in ("name", "owner", "path", "base", "source", "created_at")}

    def get_adapter(self, name: str) -> dict | None:
        """The adapter record {name, owner, path, base, source, created_at}, or None."""
        rows = self._query("SELECT * FROM adapters WHERE name = ?", (name,))
        return self._adapter_obj(rows[0]) if rows else None

    def list_adapters(self, owner: str | None = None) -> list[dict]:
        """Adapters of `owner` (every owner's when None), oldest first."""
        if owner is None:
            rows = self._query("SELECT * FROM adapters ORDER BY seq")
        else:
            rows = self._query("SELECT * FROM adapters WHERE owner = ? ORDER BY seq", (owner,))
        return [self._adapter_obj(r) for r in rows]

    def delete_adapter(self, name: str) -> bool:
        """Forget adapter `name` (its files stay where they are); False when there is none."""
        return self._write("DELETE FROM adapters WHERE name = ?", (name,)) > 0

    def adapter_dir(self, name: str) -> Path:
        """The folder for adapter `name` under `data_dir/adapters` (not created); names with ':' such as
        `ft:base:suffix:abc123` map to a portable folder name (see `fs_name`). ValueError for an unsafe name."""
        return self._inside("adapters", safe_component(name, "adapter name"))
