"""Run records: where a run's per-step metrics and its config go (`--report-to`).

One small interface, `Logger` (`log_config` once, `log_metrics(step, metrics)` per step, `close`), one class per
backend: metrics.jsonl (always: the run's own record, which resume truncates), csv (metrics.csv beside it),
TensorBoard (event files under OUTPUT/tensorboard), Weights & Biases and MLflow. The trainer and the server's
fine-tuning jobs call the interface through `open_loggers`; nothing else names a backend. TensorBoard, W&B and
MLflow are pip extras, imported only when asked for; `parse_report_to` refuses an unknown name or a missing
package before any model is loaded.

Offline: W&B honours WANDB_MODE=offline (the run is written under OUTPUT/wandb for `wandb sync`); MLflow writes to
MLFLOW_TRACKING_URI when set, else to a SQLite store OUTPUT/mlflow.db (the database backend MLflow 3 asks for: its
plain-folder `file:` store is in maintenance mode and refuses new runs unless MLFLOW_ALLOW_FILE_STORE is set).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import time
from pathlib import Path

# name -> (module that must import, pip extra that installs it); csv needs nothing
BACKENDS = {"csv": (None, None), "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}
KNOWN = ("none", *BACKENDS)


def parse_report_to(value, flag: str = "--report-to") -> tuple[str, ...]:
    """`"csv,wandb"` (or a list) -> ("csv", "wandb"); "none" -> (). ValueError names the known backends, or
    the pip extra of a backend whose package is missing."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = list(dict.fromkeys(str(n).strip().lower() for n in items if str(n).strip()))
    unknown = [n for n in names if n not in KNOWN]
    if not names or unknown:
        raise ValueError(f"{flag} {unknown[0] if unknown else repr(value)} is not a known backend; choose one or "
                         f"more (comma-separated) of {', '.join(KNOWN)}")
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"{flag} none cannot be combined with {', '.join(n for n in names if n != 'none')}")
        return ()
    for n in names:
        module, extra = BACKENDS[n]
        if module is not None and importlib.util.find_spec(module) is None:
            raise ValueError(f"{flag} {n} needs the {module} package, which is not installed: "
                             f"pip install 'leantune[{extra}]'")
    return tuple(names)


def scalars(metrics: dict) -> dict[str, float]:
    """The numbers of a step's record (any the step returned, e.g. an objective's own), without `step`."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flat_config(config: dict, prefix: str = "") -> dict:
    """Nested dicts -> {"options.r": 8, ...}: for backends whose params are flat (MLflow)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Logger:
    """The interface the trainer calls; a backend overrides what it records."""

    def log_config(self, config: dict) -> None:
        pass

    def log_metrics(self, step: int, metrics: dict) -> None:
        pass

    def close(self, success: bool = True) -> None:
        pass


def _kept_lines(path: Path, resume_step: int | None) -> list[str]:
    """Lines of a record to keep: none for a fresh run, those up to the resumed step otherwise (a resumed run
    computes the later steps again)."""
    if resume_step is None or not path.exists():
        return []
    return [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]


class JsonlLogger(Logger):
    """metrics.jsonl (one JSON object per step) and run_config.json: the run's own record, always written."""

    def __init__(self, out: Path, resume_step: int | None):
        self.path, self.config_path = out / "metrics.jsonl", out / "run_config.json"
        keep = _kept_lines(self.path, resume_step)
        self.f = self.path.open("w")
        self.f.write("".join(ln + "\n" for ln in keep))

    def log_config(self, config: dict) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=1, default=str))
        tmp.replace(self.config_path)

    def log_metrics(self, step: int, metrics: dict) -> None:
        self.f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.f.flush()

    def close(self, success: bool = True) -> None:
        self.f.close()


class CsvLogger(Logger):
    """metrics.csv: one row per record, a column per metric. A metric seen for the first time (eval_loss at the
    first evaluation) rewrites the file once with the wider header; rows without it leave the cell empty."""

    def __init__(self, out: Path, resume_step: int | None):
        self.path = out / "metrics.csv"
        rows = []
        if resume_step is not None and self.path.exists():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.columns = ["step"] + [c for r in rows[:1] for c in r if c != "step"]
        self._rewrite(rows)

    def _rewrite(self, rows: list[dict]) -> None:
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, self.columns)
            w.writeheader()
            w.writerows(rows)

    def log_metrics(self, step: int, metrics: dict) -> None:
        row = {"step": step, **scalars(metrics)}
        new = [k for k in row if k not in self.columns]
        if new:
            with self.path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            self.columns += new
            self._rewrite(rows)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)


class TensorBoardLogger(Logger):
    """Event files under OUTPUT/tensorboard (`tensorboard --logdir OUTPUT/tensorboard`); a scalar per metric,
    the config as a text summary."""

    def __init__(self, out: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events a resumed run writes again
        self.w = SummaryWriter(str(out / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)

    def log_config(self, config: dict) -> None:
        self.w.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log_metrics(self, step: int, metrics: dict) -> None:
        for k, v in scalars(metrics).items():
            self.w.add_scalar(k, v, step)

    def close(self, success: bool = True) -> None:
        self.w.close()


def _run_ids(out: Path) -> Path:
    """OUTPUT/run_ids.json: the W&B and MLflow run of the run in OUTPUT, which a resumed run continues."""
    return out / "run_ids.json"


def _resumed_id(out: Path, backend: str, resume_step: int | None) -> str | None:
    path = _run_ids(out)
    return json.loads(path.read_text()).get(backend) if resume_step is not None and path.exists() else None


def _keep_id(out: Path, backend: str, run_id: str) -> None:
    path = _run_ids(out)
    ids = {**(json.loads(path.read_text()) if path.exists() else {}), backend: run_id}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ids))
    tmp.replace(path)


class WandbLogger(Logger):
    """A W&B run (project: `project`, else WANDB_PROJECT, else "leantune"), its files under OUTPUT/wandb; with
    WANDB_MODE=offline nothing leaves the machine until `wandb sync`. A resumed run continues the same W&B run
    (W&B ignores the steps it already has: leantune's resume recomputes them to the same numbers)."""

    def __init__(self, out: Path, name: str, resume_step: int | None = None, project: str | None = None,
                 entity: str | None = None, tags: list | None = None):
        import wandb

        run_id = _resumed_id(out, "wandb", resume_step)
        try:
            self.run = wandb.init(project=project or os.environ.get("WANDB_PROJECT") or "leantune", entity=entity,
                                  name=name, tags=list(tags or []) or None, dir=str(out), reinit="create_new",
                                  id=run_id, resume="allow" if run_id else None)
        except Exception as e:  # wandb's own errors have no common base class; say how to go on without a login
            raise ValueError(f"--report-to wandb: could not start a W&B run ({e}); run `wandb login`, or set "
                             "WANDB_MODE=offline to keep the run on disk and `wandb sync` it later") from None
        _keep_id(out, "wandb", self.run.id)

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict) -> None:
        self.run.log(scalars(metrics), step=step)

    def close(self, success: bool = True) -> None:
        self.run.finish(exit_code=0 if success else 1)


class MlflowLogger(Logger):
    """An MLflow run in experiment MLFLOW_EXPERIMENT_NAME (else "leantune") at MLFLOW_TRACKING_URI, else in a
    SQLite store OUTPUT/mlflow.db (`mlflow ui --backend-store-uri sqlite:///OUTPUT/mlflow.db`). A resumed run
    continues the same MLflow run (the steps it recomputes are logged again, with the same numbers)."""

    PARAM_CHARS = 500  # the shortest param value limit of MLflow's stores; longer values are cut to it

    def __init__(self, out: Path, name: str, resume_step: int | None = None):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        try:
            self.client = MlflowClient(tracking_uri=uri)
            exp_id = self._experiment(out)
        except Exception as e:  # MlflowException and the store's own (a server that is down, a `file:` store)
            raise ValueError(f"--report-to mlflow: could not use the tracking store {uri} ({e}); set "
                             "MLFLOW_TRACKING_URI to a store that works, or unset it for OUTPUT/mlflow.db") from None
        self.run_id = _resumed_id(out, "mlflow", resume_step)
        if self.run_id is not None:
            try:
                self.client.update_run(self.run_id, status="RUNNING")
            except Exception:  # noqa: BLE001 - not in this store (MLFLOW_TRACKING_URI changed): a new run
                self.run_id = None
        if self.run_id is None:
            self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        _keep_id(out, "mlflow", self.run_id)

    def _experiment(self, out: Path) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "leantune"
        exp = self.client.get_experiment_by_name(name)
        # artifacts of a local store stay in the output folder too, not in ./mlruns of whatever folder we run in
        artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (out / "mlartifacts").resolve().as_uri()
        return exp.experiment_id if exp else self.client.create_experiment(name, artifact_location=artifacts)

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:self.PARAM_CHARS]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_metrics(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars(metrics).items()
                                                    if math.isfinite(v)])  # NaN grad norm: clipping was off

    def close(self, success: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if success else "FAILED")


class Loggers(Logger):
    """Several loggers as one: each call goes to every one; `close` closes all even when one fails."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log_config(self, config: dict) -> None:
        for lg in self.loggers:
            lg.log_config(config)

    def log_metrics(self, step: int, metrics: dict) -> None:
        for lg in self.loggers:
            lg.log_metrics(step, metrics)

    def close(self, success: bool = True) -> None:
        errors = []
        for lg in self.loggers:
            try:
                lg.close(success)
            except Exception as e:  # noqa: BLE001 - the others must still close; the first error is raised
                errors.append(e)
        if errors:
            raise errors[0]


def open_loggers(report_to, out: str | Path, name: str | None = None, resume_step: int | None = None,
                 wandb: dict | None = None, jsonl: bool = True) -> Loggers:
    """The loggers of `report_to` (`parse_report_to`'s input) for a run writing to `out`, named `name` (default:
    the folder's name); `resume_step`: the step a resumed run continues from (None: a fresh run); `wandb`: W&B
    settings (project, entity, tags); `jsonl`: also metrics.jsonl + run_config.json."""
    out = Path(out)
    name = name or out.resolve().name
    make = {"tensorboard": lambda: TensorBoardLogger(out, resume_step),
            "wandb": lambda: WandbLogger(out, name, resume_step, **(wandb or {})),
            "mlflow": lambda: MlflowLogger(out, name, resume_step),
            "csv": lambda: CsvLogger(out, resume_step), "jsonl": lambda: JsonlLogger(out, resume_step)}
    names = list(parse_report_to(report_to)) + (["jsonl"] if jsonl else [])
    out.mkdir(parents=True, exist_ok=True)
    opened: list[Logger] = []
    try:
        # the plain files last: a backend that cannot start (W&B without a login) leaves no empty record behind
        for n in sorted(names, key=lambda n: n in ("csv", "jsonl")):
            opened.append(make[n]())
    except BaseException:
        Loggers(opened).close(success=False)
        raise
    return Loggers(opened)
