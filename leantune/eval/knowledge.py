"""FineTuneBench's protocol (Wu et al. 2024, kevinwu23/StanfordFineTuneBench; `methods-more.md` §11) against any
OpenAI-compatible fine-tuning API, leantune's own server included.

1. The memorization set's question/answer pairs become chat training rows (a system prompt asking for just the
   answer, the question, the answer) and are uploaded (`purpose="fine-tune"`).
2. A fine-tuning job is created on them and waited for, its steps shown as they come (the job's metrics events).
3. The fine-tuned model is asked every training question (**memorization**) and every rephrased question
   (**generalization**) at temperature 0, at most 100 new tokens (the paper's settings).
4. Each answer is scored by exact match after normalizing (lower case, whitespace collapsed, surrounding
   punctuation and quotes dropped: the paper's notebook lower-cases), or by an LLM judge through the same API
   (a "Correct"/"Incorrect" verdict, as the paper's `eval_prompt`).

The data: JSON Lines, one fact per row: `{"question": ..., "answer": ..., "rephrased": [...]}` (`prompt` for
`question`, and `questions` for several phrasings of one fact, are accepted too); or FineTuneBench's CSVs
(`id, prompt, answer`, rows with `used_in_analysis` false dropped) with the rephrased CSV beside it joined on
`id`. Without data, the built-in set: leantune's fictional facts (`assets/facts.json`), whose `train`
questions are the memorization set and `paraphrase` ones the rephrasings.
"""
from __future__ import annotations

import csv
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

SYSTEM = "Answer with just the answer."
# the judge's instruction (the paper's eval_prompt asks the same question and wants one word back)
JUDGE = ("You grade answers to a question. The correct answer is: {answer}\n"
         "The answer given is: {response}\n"
         "Does the answer given state the correct answer (other wording is fine, other facts are not)? "
         "Reply with exactly one word: Correct or Incorrect.")


@dataclass
class Fact:
    answer: str
    questions: list[str]  # the memorization set: trained on, then asked
    rephrased: list[str] = field(default_factory=list)  # never trained on: generalization


class KnowledgeDataError(ValueError):
    pass


def builtin_facts() -> list[Fact]:
    facts = json.loads(resources.files("leantune.assets").joinpath("facts.json").read_text(encoding="utf-8"))
    return [Fact(f["answer"], list(f["train"]), list(f["paraphrase"])) for f in facts["facts"]]


def load_facts(path: str | Path | None, rephrased: str | Path | None = None) -> list[Fact]:
    """The memorization set (with its rephrasings) from `path` (JSONL or FineTuneBench CSV), or the built-in one."""
    if path is None:
        if rephrased is not None:
            raise KnowledgeDataError("--rephrased needs --data (the built-in set has its own rephrasings)")
        return builtin_facts()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    facts = _csv_facts(path, rephrased) if path.suffix.lower() == ".csv" else _jsonl_facts(path, rephrased)
    if not facts:
        raise KnowledgeDataError(f"--data {path}: no rows")
    return facts


def _jsonl_facts(path: Path, rephrased) -> list[Fact]:
    if rephrased is not None:
        raise KnowledgeDataError("--rephrased goes with FineTuneBench's CSV files; a JSONL row holds its own "
                                 "\"rephrased\" list")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise KnowledgeDataError(f"{path}:{n}: not JSON ({e})") from None
        qs = row.get("questions") or [row.get("question", row.get("prompt"))]
        reph = row.get("rephrased") or []
        reph = [reph] if isinstance(reph, str) else reph
        answer = row.get("answer")
        if not (isinstance(answer, str) and answer.strip() and all(isinstance(q, str) and q.strip() for q in qs)
                and all(isinstance(q, str) for q in reph)):
            raise KnowledgeDataError(f"{path}:{n}: a row needs \"question\" (or \"prompt\", or a \"questions\" list) "
                                     "and \"answer\" as non-empty strings, and \"rephrased\" as a list of strings")
        out.append(Fact(answer, list(qs), list(reph)))
    return out


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = {"prompt", "answer"} - set(rows[0] if rows else {})
    if missing:
        raise KnowledgeDataError(f"{path}: FineTuneBench's CSV has columns id, prompt, answer; missing {sorted(missing)}")
    # the latest_news sets mark the rows the paper analysed
    return [r for r in rows if str(r.get("used_in_analysis", "True")).strip().lower() not in ("false", "0")]


def _csv_facts(path: Path, rephrased) -> list[Fact]:
    rows = _csv_rows(path)
    by_id = {}
    if rephrased is not None:
        for r in _csv_rows(Path(rephrased)):
            by_id.setdefault(r.get("id"), []).append(r["prompt"])
    return [Fact(r["answer"], [r["prompt"]], by_id.get(r.get("id"), [])) for r in rows]


def training_rows(facts: list[Fact], system: str = SYSTEM) -> bytes:
    """The memorization set as OpenAI chat fine-tuning JSONL."""
    rows = [{"messages": ([{"role": "system", "content": system}] if system else [])
             + [{"role": "user", "content": q}, {"role": "assistant", "content": f.answer}]}
            for f in facts for q in f.questions]
    return ("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n").encode()


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation and quotes dropped."""
    return re.sub(r"\s+", " ", text.lower()).strip().strip(".,;:!?\"'`()[]").strip()


def exact_match(response: str, answer: str) -> bool:
    return normalize(response) == normalize(answer)


@dataclass
class KnowledgeRun:
    """What one run needs: the API client, the base model, the job's hyperparameters and the scoring."""

    client: object  # an `openai.OpenAI`
    model: str
    judge_model: str | None = None
    hyperparameters: dict = field(default_factory=dict)  # OpenAI's, e.g. {"n_epochs": 30}
    suffix: str = "knowledge"
    system: str = SYSTEM
    max_tokens: int = 100
    poll_s: float = 1.0
    timeout_s: float = 6 * 3600.0


def upload_and_train(run: KnowledgeRun, facts: list[Fact], progress: Callable[[int, int], None] | None = None):
    """Upload the memorization set, create the job and wait for it; the finished job object. `progress(step,
    total_steps)` is told each new step the job reports."""
    c = run.client
    f = c.files.create(file=("finetunebench-memorization.jsonl", training_rows(facts, run.system)),
                       purpose="fine-tune")
    extra = {"hyperparameters": run.hyperparameters} if run.hyperparameters else {}  # none sent: the API's "auto"
    job = c.fine_tuning.jobs.create(model=run.model, training_file=f.id, suffix=run.suffix, **extra)
    t0, seen = time.monotonic(), 0
    while job.status not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() - t0 > run.timeout_s:
            raise TimeoutError(f"fine-tuning job {job.id} is still {job.status} after {run.timeout_s:.0f} s; it "
                               "keeps running on the server (cancel it with POST /v1/fine_tuning/jobs/{id}/cancel)")
        time.sleep(run.poll_s)
        job = c.fine_tuning.jobs.retrieve(job.id)
        if progress is not None:
            steps = [e.data for e in c.fine_tuning.jobs.list_events(job.id, limit=20).data
                     if e.type == "metrics" and isinstance(e.data, dict) and "step" in e.data]
            if steps and steps[0]["step"] > seen:  # newest first
                seen = steps[0]["step"]
                progress(seen, steps[0].get("total_steps") or seen)
    return job, f.id


def ask(run: KnowledgeRun, model: str, question: str) -> str:
    messages = ([{"role": "system", "content": run.system}] if run.system else []) + [
        {"role": "user", "content": question}]
    r = run.client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=run.max_tokens)
    return r.choices[0].message.content or ""


def judge(run: KnowledgeRun, response: str, answer: str) -> bool:
    verdict = run.client.chat.completions.create(
        model=run.judge_model, temperature=0, max_tokens=5,
        messages=[{"role": "user", "content": JUDGE.format(answer=answer, response=response)}])
    word = (verdict.choices[0].message.content or "").strip().lower()
    return word.startswith("correct")


def score(run: KnowledgeRun, model: str, facts: list[Fact], on_item: Callable[[], None] | None = None) -> dict:
    """Ask `model` every question and rephrasing; the per-item results and each set's accuracy."""
    items = []
    for i, f in enumerate(facts):
        for kind, questions in (("memorization", f.questions), ("generalization", f.rephrased)):
            for q in questions:
                response = ask(run, model, q)
                ok = judge(run, response, f.answer) if run.judge_model else exact_match(response, f.answer)
                items.append({"fact": i, "set": kind, "question": q, "answer": f.answer, "response": response,
                              "correct": ok})
                if on_item is not None:
                    on_item()
    out = {"items": items}
    for kind in ("memorization", "generalization"):
        got = [it["correct"] for it in items if it["set"] == kind]
        out[kind] = {"accuracy": sum(got) / len(got) if got else None, "correct": sum(got), "total": len(got)}
    return out


def evaluate(run: KnowledgeRun, facts: list[Fact], progress=None, on_item=None) -> dict:
    """The whole protocol; the report (JSON-able)."""
    job, file_id = upload_and_train(run, facts, progress)
    report = {"protocol": "FineTuneBench (memorization vs rephrased generalization)", "model": run.model,
              "job_id": job.id, "status": job.status, "training_file": file_id,
              "fine_tuned_model": job.fine_tuned_model, "hyperparameters": _plain(job.hyperparameters),
              "scoring": f"judge:{run.judge_model}" if run.judge_model else "exact match (normalized)",
              "facts": len(facts), "settings": {"temperature": 0, "max_tokens": run.max_tokens, "system": run.system}}
    if job.status != "succeeded":
        err = _plain(job.error)
        raise RuntimeError(f"fine-tuning job {job.id} {job.status}: {(err or {}).get('message', err)}")
    report.update(score(run, job.fine_tuned_model, facts, on_item))
    return report


def _plain(obj):
    if obj is None or isinstance(obj, (dict, list, str, int, float)):
        return obj
    return obj.model_dump() if hasattr(obj, "model_dump") else asdict(obj)


def summary(report: dict) -> str:
    def line(kind):
        r = report[kind]
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        return f"{kind:>14}: {acc} ({r['correct']}/{r['total']})"

    return "\n".join([f"FineTuneBench on {report['fine_tuned_model']} ({report['scoring']}):",
                      line("memorization"), line("generalization")])
