"""`leantune eval knowledge`: FineTuneBench's protocol (`leantune.eval.knowledge`) against an OpenAI-compatible
fine-tuning API: upload, train, wait with progress, ask, score, write a JSON report and print a summary."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..fields import opt


@dataclass
class KnowledgeEvalConfig:
    base_url: str = opt("http://127.0.0.1:8000/v1", "the API's base URL (leantune serve's, OpenAI's, ...)")
    api_key: str | None = opt(None, "API key (default: $OPENAI_API_KEY, else none)")
    model: str = opt("SmolLM2-135M-Instruct", "the base model to fine-tune (the server's name for it)")
    data: str | None = opt(None, "memorization set: JSONL of {question, answer, rephrased: [...]} or FineTuneBench's "
                                 "CSV (id, prompt, answer); default: the built-in fictional facts")
    rephrased: str | None = opt(None, "FineTuneBench's rephrased CSV, joined on id with a CSV --data")
    judge_model: str | None = opt(None, "score with this model as an LLM judge through the same API (default: "
                                        "exact match after normalizing)")
    out: str = opt("knowledge-report.json", "where the JSON report goes")
    n_epochs: int | None = opt(30, "the job's n_epochs (FineTuneBench trains up to 30); unset: the API's auto")
    batch_size: int | None = opt(None, "the job's batch_size (default: the API's auto)")
    learning_rate_multiplier: float | None = opt(None, "the job's learning_rate_multiplier (default: auto)")
    suffix: str = opt("knowledge", "the fine-tuned model's suffix")
    max_tokens: int = opt(100, "most tokens of an answer (the paper's 100)")
    timeout: float = opt(6 * 3600.0, "give up waiting for the job after this many seconds")
    poll: float = opt(1.0, "seconds between job status checks")

    def __post_init__(self):
        for name in ("n_epochs", "batch_size", "max_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        for name in ("timeout", "poll"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")

    def hyperparameters(self) -> dict:
        hp = {"n_epochs": self.n_epochs, "batch_size": self.batch_size,
              "learning_rate_multiplier": self.learning_rate_multiplier}
        return {k: v for k, v in hp.items() if v is not None}


def eval_knowledge(cfg: KnowledgeEvalConfig) -> dict:
    try:
        import openai
    except ImportError:
        raise ValueError("leantune eval knowledge talks to the API with the official client: "
                         "pip install 'leantune[eval]'") from None
    from tqdm import tqdm

    from ..eval.knowledge import KnowledgeRun, evaluate, load_facts, summary

    facts = load_facts(cfg.data, cfg.rephrased)
    client = openai.OpenAI(base_url=cfg.base_url, api_key=cfg.api_key or os.environ.get("OPENAI_API_KEY") or "none",
                           max_retries=2, timeout=600)
    run = KnowledgeRun(client, cfg.model, cfg.judge_model, cfg.hyperparameters(), cfg.suffix,
                       max_tokens=cfg.max_tokens, poll_s=cfg.poll, timeout_s=cfg.timeout)
    questions = sum(len(f.questions) + len(f.rephrased) for f in facts)
    with tqdm(desc="fine-tuning", unit="step") as train_bar, tqdm(total=questions, desc="asking", unit="q") as ask_bar:
        def progress(step: int, total: int) -> None:
            train_bar.total = total
            train_bar.update(step - train_bar.n)

        report = evaluate(run, facts, progress=progress, on_item=ask_bar.update)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    print(summary(report))
    print(f"report: {cfg.out}")
    return report
