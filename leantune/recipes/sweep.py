"""`leantune sweep --axis NAME V1,V2,... --metric M --eval-data FILE --output DIR -- <finetune args>`: a grid of
ordinary `leantune finetune` runs along one axis, each scored by `leantune eval` (its recipe, in this process), tabled (DIR/sweep.csv,
DIR/sweep.md) and plotted (DIR/sweep.png).

Axes:
- `data-fraction`: the first k = round(f * n) rows of --data ("Instruction-tuned models are quick learners",
  Gupta et al. 2023, trains on first-k subsets); f in (0, 1].
- `sft-share` with --budget B: "Balancing the Budget" (Raghavendra et al., ACL 2025): round(s * B / sft_cost)
  supervised rows of --data, the rest of the budget as preference pairs of --pref-data; one run: SFT then DPO
  from the SFT'd model (finetune's --sft-data), DPO alone at s = 0, SFT alone at s = 1.
- `oracle-share` with --budget B and --weak-cost c: label quantity vs quality (Mallen & Belrose,
  scalable-elicitation): round(s * B) oracle-labelled rows of --data and (B - n_oracle) / c weakly labelled rows
  of --weak-data (the user supplies the weak labels: leantune does not make them), trained in sequence: SFT on
  the weak rows, then SFT on the oracle rows from that model (merged first when it is an adapter). --few-shot K
  puts K demonstrations (the first K oracle or weak rows, "prompt\nanswer\n\n" each) in front of the prompt of
  every training and eval row, the paper's few-shot prompt + SFT (also usable with data-fraction).

Each cell lives in DIR/<axis>=<value>/ (its data subsets, the runs, finetune.log with every command and its output, eval.json, result.json); a cell
with a result.json is skipped, and a run with a summary.json is not trained again, so a sweep resumes where it
stopped. --jobs K runs K cells at once, each in processes of its own.
"""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..fields import opt
from .eval import write_json

AXES = ("data-fraction", "sft-share", "oracle-share")
# finetune options the sweep sets itself in every cell (the axis decides them)
OWNED = ("--data", "--output", "--model", "--sft-data", "--resume")


@dataclass
class SweepConfig:
    axis: list[str] = opt([], "the axis and its values: NAME V1,V2,... (data-fraction, sft-share, oracle-share)",
                          cli=False)
    data: str | None = opt(None, "training rows (data-fraction: the pool of first-k subsets; sft-share: the SFT "
                                 "rows; oracle-share: the oracle-labelled rows)")
    pref_data: str | None = opt(None, "sft-share: the preference pairs (prompt/chosen/rejected) DPO spends the "
                                      "rest of the budget on")
    weak_data: str | None = opt(None, "oracle-share: the same kind of rows with weak labels (you supply them)")
    budget: float | None = opt(None, "sft-share, oracle-share: the budget, in cost units (1 = one SFT row / "
                                     "one oracle label by default)")
    sft_cost: float = opt(1.0, "sft-share: cost of one SFT row")
    pref_cost: float = opt(1.0, "sft-share: cost of one preference pair")
    weak_cost: float = opt(0.1, "oracle-share: cost of one weak label (an oracle label costs 1; the paper's 0.1)")
    few_shot: int = opt(0, "prepend this many demonstrations (prompt, answer) to the prompt of every training and "
                           "eval row: the few-shot prompt + SFT of scalable-elicitation; not with sft-share")
    few_shot_labels: str = opt("oracle", "the demonstrations: the first --few-shot rows of --data (oracle) or of "
                                         "--weak-data (weak, oracle-share only)")
    model: str | None = opt(None, "base model of every cell (default: finetune's default)")
    metric: str = opt("exact", "what `leantune eval` scores each cell on: exact, rouge-l, accuracy or loss")
    eval_data: str | None = opt(None, "held-out rows `leantune eval` scores each cell on (required)")
    max_new_tokens: int = opt(64, "most tokens of a generated reply in the eval (exact, rouge-l)")
    eval_dtype: str = opt("auto", "the eval's compute precision: auto, fp32 or bf16")
    output: str = opt("out/sweep", "folder of the cells and sweep.csv, sweep.md, sweep.png")
    jobs: int = opt(1, "cells run at once, each in processes of its own")
    finetune_args: list[str] = field(default_factory=list, metadata={"cli": False, "help": "after --"})

    def __post_init__(self):
        self._check_axis()
        self._check_inputs()
        self._check_finetune_args()

    def _check_axis(self) -> None:
        if len(self.axis) != 2:
            raise ValueError("--axis takes a name and its values: --axis data-fraction 0.25,1.0")
        name, self.values = self.axis[0], parse_values(self.axis[1])
        if name not in AXES:
            raise ValueError(f"--axis {name!r} is not an axis; choose one of {', '.join(AXES)}")
        self.name = name
        lo_open = name == "data-fraction"
        for v in self.values:
            if not ((0 < v <= 1) if lo_open else (0 <= v <= 1)):
                raise ValueError(f"--axis {name}: value {v:g} is out of range; "
                                 f"{'fractions lie in (0, 1]' if lo_open else 'shares lie in [0, 1]'}")

    def _check_inputs(self) -> None:
        from ..eval.metrics import METRICS

        name = self.name
        if self.metric not in METRICS:
            raise ValueError(f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.jobs < 1 or self.max_new_tokens < 1:
            raise ValueError("--jobs and --max-new-tokens must be >= 1")
        needs = {"data-fraction": ("data",), "sft-share": ("data", "pref_data", "budget"),
                 "oracle-share": ("data", "weak_data", "budget")}[name]
        for need in ("eval_data",) + needs:
            if getattr(self, need) is None:
                raise ValueError(f"--axis {name} needs --{need.replace('_', '-')}")
        for path in ("data", "pref_data", "weak_data", "eval_data"):
            if getattr(self, path) is not None and not Path(getattr(self, path)).exists():
                raise FileNotFoundError(f"--{path.replace('_', '-')} {getattr(self, path)}: not found")
        for cost in ("budget", "sft_cost", "pref_cost", "weak_cost"):
            if getattr(self, cost) is not None and not getattr(self, cost) > 0:
                raise ValueError(f"--{cost.replace('_', '-')} must be > 0, got {getattr(self, cost)}")
        if self.few_shot < 0 or self.few_shot_labels not in ("oracle", "weak"):
            raise ValueError("--few-shot must be >= 0 and --few-shot-labels oracle or weak")
        if self.few_shot and (name == "sft-share" or (self.few_shot_labels == "weak" and self.weak_data is None)):
            raise ValueError("--few-shot prefixes supervised rows: not with --axis sft-share, and "
                             "--few-shot-labels weak needs --axis oracle-share with --weak-data")

    def _check_finetune_args(self) -> None:
        name = self.name
        for a in self.finetune_args:
            if a.split("=", 1)[0] in OWNED or (name != "data-fraction" and a.split("=", 1)[0] == "--objective"):
                raise ValueError(f"{a.split('=', 1)[0]} after -- is set by the sweep in every cell; give the "
                                 "data to the sweep itself (--data, --pref-data, --weak-data) and --model before --")


def parse_values(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--axis values must be numbers separated by commas, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise ValueError(f"--axis values must be distinct numbers, got {text!r}")
    return values


def budget_split(budget: float, share: float, cost_a: float = 1.0, cost_b: float = 1.0) -> tuple[int, int]:
    """(rows of kind a, rows of kind b) bought by one budget when a share `share` of it goes to a: round(share *
    budget / cost_a) rows of a, and what is left buys whole rows of b. SFT rows vs preference pairs ("Balancing
    the Budget"), oracle vs weak labels (`n_weak = (B - n_oracle) / 0.1` in scalable-elicitation)."""
    n_a = round(share * budget / cost_a)
    n_b = int((budget - n_a * cost_a) / cost_b + 1e-9)  # the epsilon keeps 6.4/0.1 = 63.99.. at 64
    return n_a, max(n_b, 0)


# ---------------------------------------------------------------------------------------------
# the plan: what each cell trains on


def count_rows(path: str) -> list[dict]:
    from ..data.readers import read_rows

    return [r.data for r in read_rows(path)]


def few_shot_prefix(cfg: SweepConfig) -> str:
    """The demonstrations as text: "prompt\nanswer\n\n" each ("" without --few-shot)."""
    if not cfg.few_shot:
        return ""
    from ..data.rows import read_canonical

    path = cfg.data if cfg.few_shot_labels == "oracle" else cfg.weak_data
    fmt, rows = read_canonical(path)
    if len(rows) < cfg.few_shot:
        raise ValueError(f"--few-shot {cfg.few_shot}: {path} has only {len(rows)} rows")
    return "".join(f"{p}\n{a}\n\n" for p, a in (prompt_answer(d, fmt, r.where) for r, d in rows[:cfg.few_shot]))


def prompt_answer(data: dict, fmt: str, where: str) -> tuple[str, str]:
    from ..data.formats import _prompt_reply

    if fmt == "classification":
        return data["text"], str(data["label"])
    if "messages" in data:
        user = [i for i, m in enumerate(data["messages"]) if m["role"] == "user"]
        last = data["messages"][-1]
        if not user or last["role"] != "assistant":
            raise ValueError(f"{where}: --few-shot needs a user turn and a final assistant answer in chat rows")
        return data["messages"][user[-1]]["content"] or "", last.get("content") or ""
    if fmt in ("alpaca", "completion"):
        return _prompt_reply(data, fmt)
    raise ValueError(f"{where}: --few-shot prefixes the prompt of supervised or classification rows, not {fmt} rows")


def with_prefix(data: dict, fmt: str, prefix: str, where: str) -> dict:
    """The row with `prefix` in front of its prompt (the last user turn, the instruction, the prompt, the text)."""
    prompt_answer(data, fmt, where)  # the same shapes, the same errors
    if "messages" in data:
        msgs = [dict(m) for m in data["messages"]]
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs[last_user]["content"] = prefix + (msgs[last_user]["content"] or "")
        return {**data, "messages": msgs}
    key = {"classification": "text", "alpaca": "instruction", "completion": "prompt"}[fmt]
    return {**data, key: prefix + data[key]}


def rows_of(cfg: SweepConfig, path: str, prefix: str) -> list[dict]:
    """The rows of `path` as a cell's data files hold them: as written, or canonical with the few-shot prefix."""
    if not prefix:
        return count_rows(path)
    from ..data.rows import read_canonical

    fmt, rows = read_canonical(path)
    return [with_prefix(d, fmt, prefix, r.where) for r, d in rows]


def plan(cfg: SweepConfig) -> list[dict]:
    """One dict per value: {value, label, parts: {name: n rows}}; refuses (before any work) a value that needs
    more rows than its file has."""
    sizes = {k: len(count_rows(getattr(cfg, k))) for k in ("data", "pref_data", "weak_data")
             if getattr(cfg, k) is not None}
    cells = []
    for v in cfg.values:
        if cfg.name == "data-fraction":
            parts = {"data": max(1, round(v * sizes["data"]))}
        elif cfg.name == "sft-share":
            n_sft, n_pref = budget_split(cfg.budget, v, cfg.sft_cost, cfg.pref_cost)
            parts = {"data": n_sft, "pref_data": n_pref}
        else:
            n_oracle, n_weak = budget_split(cfg.budget, v, 1.0, cfg.weak_cost)
            parts = {"data": n_oracle, "weak_data": n_weak}
        for k, n in parts.items():
            if n > sizes[k]:
                raise ValueError(f"--axis {cfg.name} {v:g}: needs {n} rows of --{k.replace('_', '-')} "
                                 f"{getattr(cfg, k)}, which has {sizes[k]}; lower --budget or give more rows")
        if sum(parts.values()) == 0:
            raise ValueError(f"--axis {cfg.name} {v:g}: the budget buys no row at all; raise --budget")
        cells.append({"value": v, "label": f"{cfg.name}={v:g}", "parts": parts})
    return cells


# ---------------------------------------------------------------------------------------------
# running a cell


def leantune(args: list, log: Path) -> None:
    """`python -m leantune ARGS` in a process of its own, its output appended to `log`."""
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ leantune " + " ".join(map(str, args)) + "\n")
        f.flush()
        rc = subprocess.run([sys.executable, "-m", "leantune", *map(str, args)], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "TQDM_DISABLE": "1"}).returncode
    if rc != 0:  # the run's own message is in the log; the sweep stops, and the same command resumes it
        raise SystemExit(f"leantune sweep: `leantune {args[0]}` of {log.parent.name} failed (exit {rc}); see {log}, "
                         "fix the cause and run the same sweep again: finished cells and runs are kept")


def write_subset(rows: list[dict], path: Path) -> str:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return str(path)


def finetune_stage(cfg: SweepConfig, d: Path, out: str, model, args: list, log: Path) -> Path:
    """One `leantune finetune` run into d/out: skipped when its summary.json says it finished, continued from its
    last checkpoint (--resume) when an earlier sweep stopped inside it."""
    target = d / out
    if not (target / "summary.json").exists():
        base = [] if model is None else ["--model", model]
        resume = ["--resume"] if target.exists() else []
        leantune(["finetune", *base, *args, "--output", target, *resume, *cfg.finetune_args], log)
    return target


def as_base(cfg: SweepConfig, d: Path, model, run: Path, log: Path):
    """A trained run as a model folder the next stage starts from: itself when it is a full model, else the
    adapter merged into its base."""
    if (run / "config.json").exists():
        return run
    merged = d / (run.name + "-merged")
    if not (merged / "config.json").exists():
        leantune(["merge", *([] if model is None else ["--model", model]), "--adapter", run, "--output", merged], log)
    return merged


def train_cell(cfg: SweepConfig, cell: dict, d: Path, prefix: str = "") -> tuple[str | None, list[str]]:
    """Train one cell; returns (the model to evaluate, its adapters)."""
    log, parts = d / "finetune.log", cell["parts"]
    files = {k: write_subset(rows_of(cfg, getattr(cfg, k), prefix)[:n], d / f"{k}.jsonl")
             for k, n in parts.items() if n}
    model = cfg.model
    if cfg.name == "data-fraction":
        run = finetune_stage(cfg, d, "run", model, ["--data", files["data"]], log)
    elif cfg.name == "sft-share":
        if "pref_data" not in files:
            args = ["--objective", "sft", "--data", files["data"]]
        else:
            args = ["--objective", "dpo", "--data", files["pref_data"]] + (
                ["--sft-data", files["data"]] if "data" in files else [])
        run = finetune_stage(cfg, d, "run", model, args, log)
    else:  # weak labels first, then the oracle's from that model (sequential SFT)
        run = None
        if "weak_data" in files:
            run = finetune_stage(cfg, d, "weak", model, ["--objective", "sft", "--data", files["weak_data"]], log)
        if "data" in files:
            if run is not None:
                model = str(as_base(cfg, d, model, run, log))
            run = finetune_stage(cfg, d, "run", model, ["--objective", "sft", "--data", files["data"]], log)
    if (run / "config.json").exists():
        return str(run), []
    return model, [str(run)]


def run_cell(cfg: SweepConfig, cell: dict, prefix: str = "", eval_data: str | None = None) -> dict:
    d = Path(cfg.output) / cell["label"]
    done = d / "result.json"
    if done.exists():
        return json.loads(done.read_text(encoding="utf-8"))
    d.mkdir(parents=True, exist_ok=True)
    model, adapters = train_cell(cfg, cell, d, prefix)
    from .eval import evaluate

    # in this process (a process per cell would spend its time importing torch); the model is freed after
    report = evaluate(eval_config(cfg, model, adapters, eval_data))
    write_json(d / "eval.json", report)
    result = {"axis": cfg.name, "value": cell["value"], **{f"n_{k}": n for k, n in cell["parts"].items()},
              "metric": cfg.metric, "score": report["score"], "n_eval": report["n"]}
    write_json(done, result)
    return result


# ---------------------------------------------------------------------------------------------
# outputs


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def table(results: list[dict]) -> tuple[str, str]:
    """(CSV, Markdown) of the results, one row per cell in axis order."""
    keys = list(dict.fromkeys(k for r in results for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, keys, lineterminator="\n")
    w.writeheader()
    w.writerows(results)
    def fmt(k, v):
        return f"{v:g}" if k == "value" else f"{v:.4f}" if isinstance(v, float) else "" if v is None else str(v)

    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(fmt(k, r.get(k)) for k in keys) + " |" for r in results]
    return buf.getvalue(), "\n".join(md) + "\n"


def plot(results: list[dict], path: Path, xlabel: str, ylabel: str) -> None:
    """The metric against the axis value, on leantune's dependency-free PNG canvas (`train.plot`, as the loss
    plot: one picture does not justify matplotlib as a dependency)."""
    from ..train.plot import plot_losses

    pts = [(r["value"], r["score"]) for r in results]
    tmp = path.with_name(path.name + ".tmp.png")
    plot_losses(pts, pts, tmp, title=f"{ylabel} vs {xlabel}", xlabel=xlabel)
    tmp.replace(path)


def eval_config(cfg: SweepConfig, model, adapters: list[str], eval_data: str | None = None):
    from .eval import EvalConfig

    return EvalConfig(model=model, adapter=adapters, data=eval_data or cfg.eval_data, metric=cfg.metric,
                      max_new_tokens=cfg.max_new_tokens, dtype=cfg.eval_dtype)


def sweep(cfg: SweepConfig) -> list[dict]:
    from .eval import check_data

    cells = plan(cfg)  # every value checked against its files before the first run
    check_data(eval_config(cfg, cfg.model, []))  # and --eval-data against --metric
    prefix = few_shot_prefix(cfg)
    eval_rows = rows_of(cfg, cfg.eval_data, prefix) if prefix else None  # shapes checked before any work
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    eval_data = write_subset(eval_rows, out / "eval-few-shot.jsonl") if prefix else None
    with ThreadPoolExecutor(cfg.jobs) as pool:  # threads only wait: each cell's work is in its own processes
        futures = [pool.submit(run_cell, cfg, c, prefix, eval_data) for c in cells]
        results = []
        for c, f in zip(cells, futures):
            results.append(f.result())
            print(f"{c['label']}: {cfg.metric} {results[-1]['score']:.4f}", flush=True)
    csv_text, md = table(results)
    write_text(out / "sweep.csv", csv_text)
    write_text(out / "sweep.md", md)
    plot(results, out / "sweep.png", cfg.name, cfg.metric)
    print(md + f"\ntable: {out / 'sweep.csv'}, {out / 'sweep.md'}; plot: {out / 'sweep.png'}")
    return results
