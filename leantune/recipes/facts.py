"""The bundled demo data: fictional facts the base model cannot know, taught by the main job.

Trained questions measure memorization; paraphrased questions, never trained on, measure generalization
(the split FineTuneBench uses). Exact match compares the reply and the answer after lower-casing and
dropping punctuation and a leading article.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..eval.metrics import normalize  # noqa: F401 - the one normalization, also `leantune eval --metric exact`'s

BUILTIN = "builtin:facts"


def load_facts() -> dict:
    return json.loads(resources.files("leantune.assets").joinpath("facts.json").read_text(encoding="utf-8"))


def write_train_jsonl(path: Path) -> Path:
    """The trained questions as OpenAI-chat JSONL (system, user question, assistant answer)."""
    facts = load_facts()
    rows = [
        {"messages": [{"role": "system", "content": facts["system"]}, {"role": "user", "content": q},
                      {"role": "assistant", "content": f["answer"] + "."}]}
        for f in facts["facts"] for q in f["train"]
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def exact_match(reply: str, answer: str) -> bool:
    return normalize(reply) == normalize(answer)


def evaluate_facts(model, tokenizer, max_new_tokens: int = 16, batch: int = 16) -> dict:
    """Greedy answers to every trained and paraphrased question; exact-match accuracy of each split."""
    from ..models.generate import GenerationConfig, generate_text

    facts = load_facts()
    out = {}
    for split in ("train", "paraphrase"):
        qa = [(q, f["answer"]) for f in facts["facts"] for q in f[split]]
        prompts = [tokenizer.encode_chat([{"role": "system", "content": facts["system"]},
                                          {"role": "user", "content": q}], add_generation_prompt=True) for q, _ in qa]
        replies = []
        for i in range(0, len(prompts), batch):
            replies += generate_text(model, tokenizer, prompts[i:i + batch],
                                     GenerationConfig(max_new_tokens=max_new_tokens, stop_strings=["\n"]))
        hits = [exact_match(r, a) for r, (_, a) in zip(replies, qa)]
        out[split] = {"accuracy": sum(hits) / len(hits), "n": len(hits),
                      "examples": [{"question": q, "answer": a, "reply": r.strip(), "correct": h}
                                   for (q, a), r, h in zip(qa, replies, hits)]}
    return out


def report(before: dict, after: dict) -> str:
    lines = ["", "exact match      before   after", "-------------------------------"]
    for split, label in (("train", "trained questions"), ("paraphrase", "paraphrased (unseen)")):
        lines.append(f"{label:<20} {before[split]['accuracy']:>5.0%}  {after[split]['accuracy']:>6.0%}"
                     f"   (n={after[split]['n']})")
    ex = after["paraphrase"]["examples"][0]
    b_ex = before["paraphrase"]["examples"][0]
    lines += ["", f"Q: {ex['question']}", f"   before: {b_ex['reply']!r}", f"   after:  {ex['reply']!r}"]
    return "\n".join(lines)
