"""Text metrics of `leantune eval`, written once: normalized exact match (the demo facts' rule, which
`recipes.facts` imports from here) and ROUGE-L F1 (Lin 2004, "ROUGE: A Package for Automatic Evaluation of
Summaries"), tokenized as Google's `rouge-score` package tokenizes without stemming (lower-case, every run of characters
other than a-z and 0-9 a separator), so its numbers are comparable with the quick-learners paper's
(SuperNI's ROUGE-L). Pure Python: no torch here.
"""
from __future__ import annotations

import re

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def normalize(s: str) -> str:
    """Lower case, punctuation to spaces, a leading article dropped, whitespace collapsed (the demo facts' rule)."""
    s = re.sub(r"[^\w\s]", " ", s.lower())
    s = re.sub(r"^\s*(the|a|an)\s+", "", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the two are equal after `normalize` (case, punctuation and a leading article ignored)."""
    return float(normalize(prediction) == normalize(gold))


def rouge_tokens(text: str) -> list[str]:
    return [t for t in _NON_ALNUM.split(text.lower()) if t]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence; one row of the DP table kept (O(len(b)) memory)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F1 (beta = 1): 2PR/(P+R) with P = LCS/|prediction|, R = LCS/|gold|; 0 when either is empty."""
    p, g = rouge_tokens(prediction), rouge_tokens(gold)
    lcs = lcs_length(p, g)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return 2 * precision * recall / (precision + recall)


GENERATION_METRICS = {"exact": exact_match, "rouge-l": rouge_l}
METRICS = ("exact", "rouge-l", "accuracy", "loss")
