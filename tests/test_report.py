"""Run records (`--report-to`, `train.report`): each backend is read back with its own reader — csv, TensorBoard's
EventAccumulator, MLflow's client on the local SQLite store, W&B's offline run file parsed with W&B's protobufs —
and must hold the same per-step numbers as metrics.jsonl and the run's config. Also: any extra scalar a step
returns flows through, a resumed run's records end where it resumed and it continues its W&B and MLflow run, bad
--report-to values and missing extras stop before a model is loaded, a backend that cannot start says why, and
the progress display (tqdm on a terminal, plain lines elsewhere).

A backend's tests skip only when its package is missing, and say which extra installs it (CI installs them all).
"""
from __future__ import annotations

import csv
import io
import json
import math
import struct
import time
from pathlib import Path

import pytest

from leantune import cli
from leantune.train import report
from leantune.train.progress import Progress
from test_bad_input import fails
from test_recipes import QA, chat_row, read_metrics, step_records, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def need(module: str):
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install 'leantune[{module}]'); "
                                              "CI installs it from requirements-dev.txt")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """W&B writes its run to disk only; MLflow uses the output folder's store (not a user's server)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)


# ---- readers: {metric: {step: value}} and the config, as each backend's own tools see them ------------------
def read_csv(out: Path) -> dict:
    series: dict = {}
    with (out / "metrics.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k != "step" and v != "":
                    series.setdefault(k, {})[int(row["step"])] = float(v)
    return series


def read_tensorboard(out: Path) -> tuple[dict, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    series = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    texts = [t for t in acc.Tags()["tensors"] if t.startswith("config")]
    config = acc.Tensors(texts[0])[0].tensor_proto.string_val[0].decode() if texts else ""
    return series, config


def read_mlflow(out: Path, name: str) -> tuple[dict, dict, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("leantune")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == name
    series = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)} for k in run.data.metrics}
    return series, run.data.params, run.info.status


def _wandb_records(path: Path):
    """The protobuf records of a .wandb file: a 7-byte header (':W&B', magic, version), then 32 KiB blocks of
    chunks (crc32, length u16, type: 1 full, 2 first, 3 middle, 4 last), as W&B's LevelDB-style log writes them."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def _wandb_complete(files: list[Path], timeout: float = 60) -> None:
    """Wait until each run file holds its exit record: `run.finish()` can return before W&B's service process has
    written a run's last records (seen with wandb 0.31 offline: the last step, about one time in five)."""
    deadline = time.monotonic() + timeout
    while not all(any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(f)) for f in files):
        assert time.monotonic() < deadline, f"a W&B run file has no exit record after {timeout} s: {files}"
        time.sleep(0.2)


def read_wandb(out: Path, runs: int = 1) -> tuple[dict, dict, object]:
    """What `runs` offline run folders (a resumed run adds one, with the same run id) hold together."""
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == runs, files
    _wandb_complete(files)
    series, config, run = {}, {}, None
    for rec in (r for f in files for r in _wandb_records(f)):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            step = items.pop("_step")
            for k, v in items.items():
                if not k.startswith("_"):
                    series.setdefault(k, {})[step] = v
        elif kind in ("config", "run"):
            updates = rec.config.update if kind == "config" else rec.run.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
            if kind == "run":
                assert run is None or run.run_id == rec.run.run_id  # one W&B run, however many folders
                run = rec.run
    return series, config, run


def assert_same_series(got: dict, want: dict, rel: float, what: str):
    for key, steps in want.items():
        assert key in got, f"{what}: {key} not logged (has {sorted(got)})"
        assert set(got[key]) == set(steps), f"{what}: {key} steps {sorted(got[key])} != {sorted(steps)}"
        for s, v in steps.items():
            if math.isfinite(v):
                assert got[key][s] == pytest.approx(v, rel=rel, abs=1e-12), (what, key, s)


def jsonl_series(out: Path) -> dict:
    series: dict = {}
    for r in read_metrics(out):
        for k, v in r.items():
            if k != "step":
                series.setdefault(k, {})[r["step"]] = float(v)
    return series


# ---- one finetune run to every backend that is installed ---------------------------------------------------------
def _installed(backends):
    import importlib.util

    return [b for b in backends if b == "csv" or importlib.util.find_spec(b) is not None]


@pytest.fixture(scope="module")
def logged(folder, tmp_path_factory):
    """`leantune finetune --report-to csv,tensorboard,wandb,mlflow` (those installed) with an eval every 2 steps."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        mp.delenv(var, raising=False)
    d = tmp_path_factory.mktemp("report")
    data = write_jsonl(d / "d.jsonl", [chat_row(q, a) for q, a in QA] * 2)
    evals = write_jsonl(d / "e.jsonl", [chat_row(q, a) for q, a in QA[:2]])
    out = d / "run-a"
    backends = _installed(["csv", "tensorboard", "wandb", "mlflow"])
    argv = ["finetune", "--model", str(folder), "--data", str(data), "--eval-data", str(evals), "--output", str(out),
            "--no-progress", "--dtype", "fp32", "--max-steps", "4", "--batch-size", "4", "--eval-every", "2",
            "--lr", "3e-3", "--rank", "4", "--report-to", ",".join(backends)]
    try:
        assert cli.run(argv) == 0
    finally:
        mp.undo()
    return out


def test_metrics_jsonl_holds_every_promised_metric(logged):
    recs = step_records(logged)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb", "epoch", "tokens"} <= set(r)
        assert r["peak_memory_mb"] > 10 and r["tokens_per_s"] > 0 and r["lr"] > 0
    assert [r["step"] for r in read_metrics(logged) if "eval_loss" in r] == [2, 4]  # every 2 steps; then the final
    config = json.loads((logged / "run_config.json").read_text())
    assert config["lr"] == 3e-3 and config["max_steps"] == 4 and config["options"]["r"] == 4
    assert config["report_to"].startswith("csv")


def test_csv_matches_metrics_jsonl(logged):
    assert_same_series(read_csv(logged), jsonl_series(logged), 1e-12, "csv")
    header = (logged / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["step", "epoch"] and "eval_loss" in header  # the column added at the first eval


def test_tensorboard_event_files_read_back(logged):
    need("tensorboard")
    series, config = read_tensorboard(logged)
    assert_same_series(series, jsonl_series(logged), 1e-6, "tensorboard")  # TensorBoard stores float32
    assert '"lr": 0.003' in config and '"method": "lora"' in config


def test_mlflow_local_store_reads_back(logged):
    need("mlflow")
    series, params, status = read_mlflow(logged, "run-a")
    want = {k: v for k, v in jsonl_series(logged).items() if k != "grad_norm" or all(map(math.isfinite, v.values()))}
    assert_same_series(series, want, 1e-12, "mlflow")
    assert params["lr"] == "0.003" and params["options.r"] == "4" and params["method"] == "lora"
    assert status == "FINISHED"


def test_wandb_offline_run_reads_back(logged):
    need("wandb")
    series, config, run = read_wandb(logged)
    assert_same_series(series, jsonl_series(logged), 1e-12, "wandb")
    assert config["lr"] == 3e-3 and config["options"]["r"] == 4
    assert run.display_name == "run-a" and run.project == "leantune"


# ---- the interface: any scalar flows through; resume; bad input --------------------------------------------------
# each backend's reader: (output folder, run name) -> {metric: {step: value}}, and the float precision it keeps
READERS = {"csv": (lambda out, name: read_csv(out), 1e-12),
           "tensorboard": (lambda out, name: read_tensorboard(out)[0], 1e-6),  # TensorBoard stores float32
           "mlflow": (lambda out, name: read_mlflow(out, name)[0], 1e-12),
           "wandb": (lambda out, name: read_wandb(out)[0], 1e-12)}


@pytest.mark.parametrize("backend", list(READERS))
def test_extra_step_metrics_reach_the_backend(backend, tmp_path):
    """An objective's own numbers (DPO's rewards, say) need no change to the loggers: every scalar is logged."""
    if backend != "csv":
        need(backend)
    out = tmp_path / "x"
    lg = report.open_loggers(backend, out, name="x")
    lg.log_config({"objective": "dpo", "beta": 0.1})
    lg.log_metrics(1, {"loss": 0.7, "rewards/chosen": 0.25, "rewards/margins": 0.5, "note": "not a number"})
    lg.log_metrics(2, {"loss": 0.6, "rewards/chosen": 0.5, "rewards/margins": 1.0})
    lg.close()
    want = {"loss": {1: 0.7, 2: 0.6}, "rewards/chosen": {1: 0.25, 2: 0.5}, "rewards/margins": {1: 0.5, 2: 1.0}}
    read, rel = READERS[backend]
    got = read(out, "x")
    assert_same_series(got, want, rel, backend)
    assert set(got) == set(want)  # and nothing that is not a number


def test_a_resumed_run_drops_the_records_after_its_checkpoint(tmp_path):
    lg = report.open_loggers("csv", tmp_path)
    for s in (1, 2, 3):
        lg.log_metrics(s, {"loss": 1.0 / s})
    lg.log_metrics(3, {"eval_loss": 2.0})
    lg.close()
    lg = report.open_loggers("csv", tmp_path, resume_step=2)  # the checkpoint was at step 2; 3 runs again
    lg.log_metrics(3, {"loss": 0.25})
    lg.close()
    assert read_csv(tmp_path) == {"loss": {1: 1.0, 2: 0.5, 3: 0.25}}
    assert [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}]
    report.open_loggers("csv", tmp_path).close()  # a fresh run into the same folder starts its records anew
    assert read_metrics(tmp_path) == [] and read_csv(tmp_path) == {}


@pytest.mark.parametrize("backend", ["wandb", "mlflow"])
def test_a_resumed_run_continues_its_wandb_or_mlflow_run(backend, tmp_path):
    need(backend)
    out = tmp_path / "r"
    lg = report.open_loggers(backend, out, jsonl=False)
    for s in (1, 2, 3):
        lg.log_metrics(s, {"loss": 1.0 / s})
    lg.close(success=False)  # interrupted after step 3; its checkpoint is at step 2
    # W&B names an offline run's folder by the second it started: a resume within that second would share it
    started = int(time.time())
    while int(time.time()) == started:
        time.sleep(0.05)
    lg = report.open_loggers(backend, out, resume_step=2, jsonl=False)
    for s in (3, 4):  # step 3 again, to the same number (resume is exact)
        lg.log_metrics(s, {"loss": 1.0 / s})
    lg.close()
    want = {"loss": {1: 1.0, 2: 0.5, 3: 1 / 3, 4: 0.25}}
    if backend == "mlflow":
        series, _, status = read_mlflow(out, "r")  # one run, finished
        assert status == "FINISHED"
    else:
        series = read_wandb(out, runs=2)[0]  # two folders of one run id
    assert_same_series(series, want, 1e-12, backend)


def test_report_to_none_writes_only_metrics_jsonl(folder, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat_row(q, a) for q, a in QA[:4]])
    out = tmp_path / "out"
    argv = ["finetune", "--model", folder, "--data", data, "--output", out, "--no-progress", "--eval-fraction", "0",
            "--max-steps", "1", "--report-to", "none"]
    assert cli.run([str(a) for a in argv]) == 0
    assert (out / "metrics.jsonl").exists() and not (out / "metrics.csv").exists()
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists()


def test_report_to_from_yaml(folder, tmp_path):
    need("tensorboard")
    from leantune.recipes.finetune import config_from_args

    (tmp_path / "c.yaml").write_text("report_to: csv, tensorboard\n")
    args = cli.build_parser(["finetune"]).parse_args(["finetune", "--config", str(tmp_path / "c.yaml")])
    assert config_from_args(args).report_to == "csv,tensorboard"
    args = cli.build_parser(["finetune"]).parse_args(["finetune", "--config", str(tmp_path / "c.yaml"),
                                                      "--report-to", "none"])
    assert config_from_args(args).report_to == "none"  # the flag overrides the file


@pytest.mark.parametrize("value, words", [
    ("comet", ["--report-to comet is not a known backend", "none, csv, tensorboard, wandb, mlflow"]),
    ("csv,tensorbord", ["tensorbord", "tensorboard, wandb, mlflow"]),
    ("none,csv", ["none cannot be combined with csv"]),
    ("", ["not a known backend"]),
])
def test_unknown_report_to_names_the_known_backends(value, words, capsys, tmp_path):
    # a --model that does not exist: the option is refused first, before any model is looked for
    err = fails(["finetune", "--model", tmp_path / "nope", "--output", tmp_path / "out", "--report-to", value], capsys)
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", ["tensorboard", "wandb", "mlflow"])
def test_missing_extra_says_what_to_install(backend, monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == backend else real(name, *a))
    err = fails(["finetune", "--model", tmp_path / "nope", "--output", tmp_path / "out",
                 "--report-to", f"csv,{backend}"], capsys)
    assert f"pip install 'leantune[{backend}]'" in err and f"--report-to {backend}" in err, err
    from leantune.recipes.finetune import FinetuneConfig

    with pytest.raises(ValueError, match=rf"leantune\[{backend}\]"):  # the Python API refuses it the same way
        FinetuneConfig(report_to=["csv", backend])


def test_wandb_without_a_login_says_how_to_go_offline(tmp_path):
    """In a fresh process: W&B keeps the settings of its first run per process (offline, in this one)."""
    need("wandb")
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="online", HOME=str(tmp_path))  # no ~/.netrc holding a W&B key
    code = ("from leantune.train.report import open_loggers\n"
            f"open_loggers('csv,wandb', {str(tmp_path / 'out')!r})")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).parents[1], stdin=subprocess.DEVNULL)
    assert p.returncode != 0 and "ValueError: --report-to wandb: could not start a W&B run" in p.stderr, p.stderr
    assert "WANDB_MODE=offline" in p.stderr and "wandb login" in p.stderr
    assert list((tmp_path / "out").iterdir()) == []  # no empty record left behind


def test_mlflow_store_that_does_not_work_is_named(tmp_path, monkeypatch):
    need("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus-scheme://nowhere")
    with pytest.raises(ValueError, match="--report-to mlflow: could not use the tracking store bogus-scheme://"):
        report.open_loggers("mlflow", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_python_api_takes_a_list():
    from leantune.recipes.finetune import FinetuneConfig

    assert FinetuneConfig(report_to=["CSV", " tensorboard"]).report_to == "csv,tensorboard"
    assert FinetuneConfig(report_to="none").report_to == "none"


# ---- progress display ------------------------------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_plain_lines_when_not_a_terminal():
    s = io.StringIO()
    p = Progress(40, stream=s)
    for step in range(1, 41):
        p.update(step, 1.0 / step, 1000.0)
    p.close()
    lines = s.getvalue().splitlines()
    assert len(lines) == 20 and "\r" not in s.getvalue() and "\x1b" not in s.getvalue()
    assert lines[0].startswith("step 2/40 | loss 0.5000 | 1,000 tok/s") and lines[-1].startswith("step 40/40")


def test_progress_is_a_tqdm_bar_on_a_terminal():
    s = _Tty()
    p = Progress(10, stream=s, start=4)  # a resumed run starts its bar where it left off
    assert p.bar is not None and p.bar.n == 4
    for step in range(5, 11):
        p.update(step, 0.5, 123.0)
    p.close()
    text = s.getvalue()
    assert "\r" in text and "10/10" in text and "loss 0.5000" in text and "123 tok/s" in text


def test_progress_off_prints_nothing():
    s = _Tty()
    p = Progress(10, enabled=False, stream=s)
    p.update(10, 0.5, 1.0)
    p.close()
    assert s.getvalue() == ""


def test_server_without_the_package_refuses_the_integration(monkeypatch):
    """POST /v1/fine_tuning/jobs with a W&B integration on a server that lacks wandb: a 400 naming the extra."""
    import importlib.util

    from leantune.serve.api.common import APIError
    from leantune.serve.api.fine_tuning import _integrations

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(APIError) as e:
        _integrations({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]})
    assert e.value.status == 400 and e.value.param == "integrations"
    assert "pip install 'leantune[wandb]'" in e.value.message and "integrations[0].type wandb" in e.value.message
