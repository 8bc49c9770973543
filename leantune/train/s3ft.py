"""S3FT, Selective Self-to-Supervised Fine-Tuning (Gupta et al., NAACL Findings 2025, arXiv 2502.08130).

Before training, each row's target is chosen with the base model (greedy decoding) and a judge:
the model's own response when the judge accepts it against the gold answer ("self"); else the model's
paraphrase of the gold answer when that passes the judge ("paraphrase"); else the gold answer ("gold").
Training is then plain SFT on those targets. Targets the model already finds likely move it less than gold
text in a foreign style, so it forgets less of what it knew (methods-more.md §7).

Judges (`--judge`): `exact`, `normalized` (case, whitespace and punctuation ignored), `contains` (the normalized
gold appears in the normalized response), or `FILE.py:function` with `function(prompt, response, gold) -> bool`.
The built targets go to OUTPUT/s3ft_targets.jsonl (index, prompt, gold, target, source); `--resume` reuses
that file when it was built from the same rows, so a resumed run trains on the same targets.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..data.answers import AnswerRow, Query, query_ids
from ..models.generate import GenerationConfig, generate_text

TARGETS_FILE = "s3ft_targets.jsonl"
SOURCES = ("self", "paraphrase", "gold")
BUILTIN_JUDGES = ("exact", "normalized", "contains")
# The paper's paraphrase step: the model restates the gold answer given the question (§7's paraphrase_prompt(x, y))
PARAPHRASE_PROMPT = ("Question: {question}\n\nCorrect answer: {answer}\n\n"
                     "Rewrite the correct answer in your own words. Reply with the rewritten answer only.")

Judge = Callable[[str, str, str], bool]
Generate = Callable[[list[Query]], list[str]]  # queries -> the model's greedy replies, in order


# ---- judges ------------------------------------------------------------------------------------------
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, runs of whitespace as one space."""
    return " ".join(text.lower().translate(_PUNCT).split())


def _exact(prompt: str, response: str, gold: str) -> bool:  # noqa: ARG001 - the judge's signature
    return response.strip() == gold.strip()


def _normalized(prompt: str, response: str, gold: str) -> bool:  # noqa: ARG001
    return normalize(response) == normalize(gold)


def _contains(prompt: str, response: str, gold: str) -> bool:  # noqa: ARG001
    g = normalize(gold)
    # word-bounded, so gold "1" is not found in "10"; an empty gold matches nothing
    return bool(g) and re.search(rf"(?<!\S){re.escape(g)}(?!\S)", normalize(response)) is not None


_JUDGES = {"exact": _exact, "normalized": _normalized, "contains": _contains}


def parse_judge(spec: str) -> Judge:
    """The judge `--judge` names; a missing file or function is one ValueError saying what to give."""
    if spec in _JUDGES:
        return _JUDGES[spec]
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise ValueError(f"--judge {spec!r}: give one of {', '.join(BUILTIN_JUDGES)}, or FILE.py:FUNCTION naming "
                         "a Python function(prompt, response, gold) -> bool")
    if not Path(path).is_file():
        raise ValueError(f"--judge {spec!r}: no such file {path}; give the path of a .py file defining {name}")
    module_spec = importlib.util.spec_from_file_location(f"leantune_judge_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: whatever it raises, say where
        raise ValueError(f"--judge {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--judge {spec!r}: {path} defines no function {name!r}; define "
                         f"def {name}(prompt, response, gold) -> bool")
    return fn


def check_paraphrase_prompt(template: str) -> None:
    """The template must place the question and the gold answer, and hold no other field."""
    try:
        template.format(question="Q", answer="A")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"--s3ft-paraphrase-prompt: {template!r} is not a template with the fields {{question}} "
                         f"and {{answer}} only ({type(e).__name__}: {e}); write braces as {{{{ }}}}") from None
    if "{answer}" not in template:
        raise ValueError("--s3ft-paraphrase-prompt must contain {answer} (the gold answer to rewrite)")


# ---- building targets --------------------------------------------------------------------------------
@dataclass
class Target:
    index: int
    prompt: str
    gold: str
    target: str
    source: str  # one of SOURCES

    def record(self) -> dict:
        return {"index": self.index, "prompt": self.prompt, "gold": self.gold, "target": self.target,
                "source": self.source}


def build_targets(rows: list[AnswerRow], generate: Generate, judge: Judge,
                  paraphrase_prompt: str = PARAPHRASE_PROMPT) -> list[Target]:
    """§7's loop, batched: every row's own response first, then one paraphrase request per rejected row."""
    responses = generate([r.query for r in rows])
    targets, wrong = [], []
    for r, resp in zip(rows, responses, strict=True):
        ok = _judged(judge, r, resp)
        targets.append(Target(r.index, r.query.text, r.gold, resp if ok else r.gold, "self" if ok else "gold"))
        if not ok:
            wrong.append(len(targets) - 1)
    asks = [Query.of_text(paraphrase_prompt.format(question=rows[i].query.text, answer=rows[i].gold)) for i in wrong]
    for i, para in zip(wrong, generate(asks) if asks else [], strict=True):
        if _judged(judge, rows[i], para):
            targets[i].target, targets[i].source = para, "paraphrase"
    return targets


def _judged(judge: Judge, row: AnswerRow, response: str) -> bool:
    try:
        return bool(judge(row.query.text, response, row.gold))
    except Exception as e:  # a user's judge failing on one row: name the row
        raise ValueError(f"{row.where}: the --judge function raised {type(e).__name__}: {e}") from None


def model_generator(model, tokenizer, max_new_tokens: int, batch_size: int) -> Generate:
    """Greedy replies of `model` (as it is now), `batch_size` queries per batched generate call."""
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)

    def run(queries: list[Query]) -> list[str]:
        ids = [query_ids(q, tokenizer) for q in queries]
        out = []
        for s in range(0, len(ids), batch_size):
            out += generate_text(model, tokenizer, ids[s:s + batch_size], gen)
        return [t.strip() for t in out]

    return run


def source_counts(targets: list[Target]) -> dict[str, int]:
    return {s: sum(t.source == s for t in targets) for s in SOURCES}


# ---- the targets file --------------------------------------------------------------------------------
def write_targets(targets: list[Target], out_dir: str | Path) -> Path:
    """OUTPUT/s3ft_targets.jsonl, written whole under a temporary name, then renamed."""
    path = Path(out_dir) / TARGETS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(t.record(), ensure_ascii=False) + "\n" for t in targets), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_targets(rows: list[AnswerRow], out_dir: str | Path) -> list[Target] | None:
    """The saved targets of these rows (None: no file); a file built from other rows is refused, since training
    on it would not be the run being resumed."""
    path = Path(out_dir) / TARGETS_FILE
    if not path.is_file():
        return None
    recs = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(recs) != len(rows):
        raise ValueError(f"--resume: {path} holds {len(recs)} targets but the training data has {len(rows)} rows; "
                         "resume with the data of the first run, or start a new --output")
    for rec, r in zip(recs, rows):
        if (rec.get("index"), rec.get("prompt"), rec.get("gold")) != (r.index, r.query.text, r.gold) \
                or rec.get("source") not in SOURCES:
            raise ValueError(f"--resume: {path} was built from other data ({r.where} differs from its row "
                             f"{rec.get('index')}); resume with the data of the first run, or start a new --output")
    return [Target(rec["index"], rec["prompt"], rec["gold"], rec["target"], rec["source"]) for rec in recs]
