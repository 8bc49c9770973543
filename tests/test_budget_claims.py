"""Issue 19 item 5: the qualitative claims of reference/methods-more.md §9 oracle (c) (the DPO cold start) and
§10 (label quantity vs quality regimes), reproduced at toy scale with leantune's own recipes.

§9 (c), the cold-start toy (bench/budget.py's task, its functions, and its `leantune finetune` runs): a tiny
random Llama pretrained to answer "What color is item i?" as "Item i is red." never emits the answer format
F = "Answer: Item i is red." (pi_ref(F) ~ 1e-36 on the held-out prompts). A 64-example budget spent on
preference pairs written in F (chosen: right color in F; rejected: the base's own sentence or a wrong color in
F), at SFT share 0 (DPO only), 0.05 (3 SFT rows, then DPO on 61 pairs from the SFT'd model) and 1 (SFT only).
What holds on seeds 0-2 (checked before asserting; runs are deterministic):
  - DPO only does not move the model: 0 accuracy and 0 format rate on every seed (the chosen answers' tokens
    have probability ~0 under the policy, so the DPO gradient cannot raise them);
  - the 5% warm-up + DPO beats DPO only on average (0.125 / 0 / 0.125 vs 0 / 0 / 0 accuracy): the cold start
    is broken by 3 SFT rows;
  - it does NOT beat or match SFT only at this scale: SFT only scores 0.50 / 0.81 / 0.88. The paper's own
    finding says as much (below ~1,000 examples SFT alone dominates); its "< 10% SFT then DPO beats SFT" is a
    large-budget claim this 32-item toy cannot reach (a bigger budget only repeats the same 32 items). The
    3-row warm-up memorises its 3 items ("Answer: Item 22 is blue." for every question) and 48 DPO steps only
    partly undo that. The test asserts this ordering as measured.
§10, the label-regimes toy (bench/labels.py, plain torch): asserted in test_label_regimes_at_a_small_budget below, with what did
and did not hold in its docstring.
"""
import importlib.util
import statistics
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):
    """bench/NAME.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


SEEDS = (0, 1, 2)
SHARES = (0.0, 0.05, 1.0)


@pytest.fixture(scope="module")
def cold_start(tmp_path_factory):
    """{share: [accuracy per seed]}, {share: [format rate per seed]}, the base's eval and answer log-probs."""
    import torch

    budget = _bench("budget")
    torch.set_num_threads(2)
    work = tmp_path_factory.mktemp("cold")
    base = budget.build_base(work, 60)
    held = list(range(budget.N_TRAIN_ITEMS, budget.N_ITEMS))
    # the bench's defaults: 64 examples, 48 steps per phase at batch 8, SFT lr 3e-3, DPO lr 1e-4, beta 0.1
    args = types.SimpleNamespace(budget=64, phase_steps=48, batch=8, sft_lr=3e-3, dpo_lr=1e-4, beta=0.1)
    acc, fmt = {s: [] for s in SHARES}, {s: [] for s in SHARES}
    for seed in SEEDS:
        for share in SHARES:
            out, info = budget.train_cell(base, work / f"s{share:g}_seed{seed}", args, share, seed)
            assert (info["n_sft"], info["n_pairs"]) == {0.0: (0, 64), 0.05: (3, 61), 1.0: (64, 0)}[share]
            ev = budget.evaluate(out, held)
            acc[share].append(ev["accuracy"])
            fmt[share].append(ev["format"])
    return acc, fmt, budget.evaluate(base, held), budget.answer_logps(base, held)


@pytest.mark.slow
def test_cold_start_base_never_emits_the_format(cold_start):
    _, _, base_eval, lp = cold_start
    assert base_eval["accuracy"] == 0 and base_eval["format"] == 0
    assert base_eval["color_anywhere"] >= 0.9  # it knows the held-out colors, in its own sentence
    assert lp["max_p_format"] < 1e-6  # pi_ref(F) ~ 0 on every held-out prompt
    assert lp["logp_own"] > -1.0  # while its own sentence is near-certain


@pytest.mark.slow
def test_cold_start_dpo_only_barely_moves(cold_start):
    acc, fmt, _, _ = cold_start
    assert max(acc[0.0]) <= 1 / 16 and max(fmt[0.0]) <= 1 / 16


@pytest.mark.slow
def test_cold_start_warmup_then_dpo_beats_dpo_only_but_not_sft_only(cold_start):
    acc, fmt, _, _ = cold_start
    warm, dpo, sft = (statistics.mean(acc[s]) for s in (0.05, 0.0, 1.0))
    assert all(w >= d for w, d in zip(acc[0.05], acc[0.0]))
    assert warm > dpo and statistics.mean(fmt[0.05]) > statistics.mean(fmt[0.0])
    # measured, not the paper's large-budget claim: at 64 examples SFT only dominates (module docstring)
    assert sft > warm + 0.25 and min(fmt[1.0]) == 1.0



@pytest.mark.slow  # ~110 s of CPU: 42 cells and the 20,000-input test set of the 2048-feature encoder
def test_label_regimes_at_a_small_budget():
    """§10 toy (bench/labels.py), its cells at budget 16 (same seeded data as the bench, 3 seeds). Held in the
    bench's sweep (README "Evaluation and budget sweeps"), asserted here: at budget 16 the best split is oracle
    share 0.8 (> 0.6: quality-dominant) and beats both pure splits on every seed; the prior-initialised head
    (few-shot analogue) lifts the frontier (best share's mean accuracy). Did NOT hold in the bench: "at a large
    budget the mixed split beats both pure splits": the mixed split wins at 16 and 256 (by 0.04 and 0.01) but
    oracle-only wins at 64 and 1024 (by 0.006 and 0.012), so it is not asserted."""
    import torch

    labels = _bench("labels")
    torch.set_num_threads(2)
    shares = (0.0, 0.8, 1.0)
    rows = labels.sweep([16], 3, shares=shares)
    acc = {(s, p): [r["accuracy"] for r in rows if r["share"] == s and r["prior"] == p]
           for s in shares for p in (False, True)}
    assert labels.best_share(rows, 16, False, shares) == 0.8
    assert all(m > max(w, o) for m, w, o in zip(acc[0.8, False], acc[0.0, False], acc[1.0, False]))
    frontier = {p: max(statistics.mean(acc[s, p]) for s in shares) for p in (False, True)}
    assert frontier[True] > frontier[False] + 0.02
