"""`leantune eval --model M [--adapter A ...] --data FILE --metric exact|rouge-l|accuracy|loss`: score a model
(+ adapters) on rows of any shape `--data` takes, write a JSON report (atomically) and print the score.

- exact, rouge-l: greedy replies to each row's prompt (rows with one gold answer: chat ending in the assistant
  answer, ShareGPT, alpaca, prompt/completion), scored against the gold by `eval.metrics`;
- accuracy: classification rows {text, label}; the predicted class is the label whose text the model gives the
  highest log-probability as the reply to the text (the "likeliest label continuation");
- loss: token-mean NLL on the answers of supervised rows, computed by the trainer's `heldout_loss` (the number
  the Trainer's eval reports for the same rows).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..fields import opt
from ..precision import parse_dtype, resolve_precision
from .generate import adapter_list

METRIC_SHAPES = {  # what each metric reads; checked on the data's first row before the model is loaded
    "exact": "sft", "rouge-l": "sft", "loss": "sft", "accuracy": "classification",
}


@dataclass
class EvalConfig:
    model: str | None = opt(None, "HF model folder, .gguf file, or model id in the local Hugging Face cache "
                                  "(default: the embedded SmolLM2-135M-Instruct)")
    adapter: list[str] = opt([], "adapter folder to apply (PEFT format or a method's own); repeat to compose",
                             metavar="DIR")
    data: str | None = opt(None, "rows to score, any file or folder --data of finetune takes: rows with one gold "
                                 "answer (chat, ShareGPT, alpaca, prompt/completion) for exact, rouge-l and loss; "
                                 "classification rows (text, label) for accuracy")
    metric: str = opt("exact", "exact (normalized exact match of the greedy reply), rouge-l (ROUGE-L F1), "
                               "accuracy (classification: the likeliest label), loss (mean token NLL on the answers)")
    max_new_tokens: int = opt(64, "most tokens of a generated reply (exact, rouge-l)")
    batch_size: int = opt(8, "rows per forward / generation batch")
    max_length: int = opt(512, "longest row in tokens; a longer one is an error naming it (loss, accuracy)")
    split: str | None = opt(None, "the split of a datasets folder given as --data")
    columns: str | None = opt(None, "map the data's column names to leantune's keys, KEY=COLUMN,...",
                              metavar="KEY=COLUMN[,...]")
    dtype: str = opt("auto", "compute precision: auto, fp32 or bf16")
    out: str | None = opt(None, "write the JSON report here (atomically); default: print only")
    examples: int = opt(5, "how many scored rows the report lists")

    def __post_init__(self):
        from ..data import parse_columns
        from ..eval.metrics import METRICS

        self.adapter = adapter_list(self.adapter)
        if self.metric not in METRICS:
            raise ValueError(f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.data is None:
            raise ValueError("--data is required: the rows to score")
        for name in ("max_new_tokens", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.examples < 0:
            raise ValueError(f"--examples must be >= 0, got {self.examples}")
        parse_dtype(self.dtype)
        parse_columns(self.columns)
        for a in self.adapter:
            if not Path(a).exists():
                raise FileNotFoundError(f"--adapter {a}: folder not found")


def check_data(cfg: EvalConfig) -> None:
    """The data's shape fits the metric (before any model is read): one error naming the file and what to give."""
    from ..data import parse_columns
    from ..data.rows import KIND, read_canonical

    fmt, rows = read_canonical(cfg.data, cfg.split, parse_columns(cfg.columns), None, "--data")
    need = METRIC_SHAPES[cfg.metric]
    if KIND[fmt] != need or (cfg.metric != "loss" and fmt == "text"):
        wanted = ("classification rows (text, label)" if need == "classification" else
                  "rows with one gold answer (chat ending in the assistant answer, ShareGPT, alpaca or "
                  "prompt/completion)" + ("; text rows too" if cfg.metric == "loss" else ""))
        raise ValueError(f"--data {cfg.data}: --metric {cfg.metric} needs {wanted}, and these rows are {fmt} rows")


def generation_scores(model, tok, cfg: EvalConfig) -> list[dict]:
    from ..data import parse_columns
    from ..data.answers import query_ids, read_answer_rows
    from ..eval.metrics import GENERATION_METRICS
    from ..models.generate import GenerationConfig, generate_text

    rows = read_answer_rows(cfg.data, cfg.split, parse_columns(cfg.columns), purpose=f"--metric {cfg.metric}")
    score = GENERATION_METRICS[cfg.metric]
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens)  # greedy
    out = []
    for i in range(0, len(rows), cfg.batch_size):
        part = rows[i:i + cfg.batch_size]
        replies = generate_text(model, tok, [query_ids(r.query, tok, r.where) for r in part], gen)
        out += [{"prompt": r.query.text, "gold": r.gold, "reply": y.strip(), "score": score(y.strip(), r.gold)}
                for r, y in zip(part, replies)]
    return out


def label_nll(model, tok, text: str, label: str, max_length: int, where: str = "<row>") -> float:
    """Summed NLL of `label` as the reply to `text` (the trainer's loss, one row)."""
    from ..data import pad_batch
    from ..data.answers import Query, answer_ids
    from ..data.formats import Example, fit_length
    from ..train.loss import lm_loss_sum

    ids, labels = answer_ids(Query.of_text(text), label, tok, where)
    ids, labels = fit_length(ids, labels, max_length, "error", where)
    batch = pad_batch([Example(ids, labels)], tok.pad_id).to(model.head_module().weight.device)
    s, _ = lm_loss_sum(model, batch)
    return float(s)


def classification_scores(model, tok, cfg: EvalConfig) -> list[dict]:
    from ..data import parse_columns
    from ..data.rows import read_canonical

    _, rows = read_canonical(cfg.data, cfg.split, parse_columns(cfg.columns), None, "--data")
    classes = sorted({str(d["label"]) for _, d in rows})  # ids are scored as their digits
    out = []
    for row, d in rows:
        nll = [label_nll(model, tok, d["text"], c, cfg.max_length, row.where) for c in classes]
        pred = classes[min(range(len(classes)), key=nll.__getitem__)]
        out.append({"prompt": d["text"], "gold": str(d["label"]), "reply": pred, "score": float(pred == str(d["label"]))})
    return out


def loss_score(model, tok, cfg: EvalConfig) -> tuple[float, int]:
    from ..data import load_dataset, parse_columns
    from ..train.loss import heldout_loss

    examples = load_dataset(cfg.data, tok, cfg.max_length, "error", split=cfg.split,
                            columns=parse_columns(cfg.columns))
    if not examples:
        raise ValueError(f"--data {cfg.data}: no row has an answer token to score")
    return heldout_loss(model, examples, cfg.batch_size, cfg.max_length), len(examples)


def write_json(path: str | Path, obj) -> None:
    """Write `obj` as JSON to a temp name beside `path`, then rename: a reader never sees half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def evaluate(cfg: EvalConfig) -> dict:
    """The report: {metric, score, n, model, adapter, data, examples}."""
    import torch

    check_data(cfg)
    from .generate import load_with_adapter

    model, tok = load_with_adapter(cfg.model, cfg.adapter, resolve_precision(cfg.dtype, "cpu"))
    model.eval()
    with torch.no_grad():
        if cfg.metric == "loss":
            score, n = loss_score(model, tok, cfg)
            scored = []
        else:
            scored = (classification_scores if cfg.metric == "accuracy" else generation_scores)(model, tok, cfg)
            score, n = sum(s["score"] for s in scored) / len(scored), len(scored)
    return {"metric": cfg.metric, "score": score, "n": n, "model": cfg.model, "adapter": cfg.adapter,
            "data": cfg.data, "examples": scored[:cfg.examples]}


def eval_model(cfg: EvalConfig) -> dict:
    report = evaluate(cfg)
    if cfg.out:
        write_json(cfg.out, report)
    print(f"{report['metric']}: {report['score']:.4f}  (n={report['n']}, {cfg.data})")
    if cfg.out:
        print(f"report: {cfg.out}", file=sys.stderr)
    return report
