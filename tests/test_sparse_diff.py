"""The sparse-diff format (methods/sparse_diff.py): round trip, composition, revert, and its refusals."""
import json

import pytest
import torch
from torch import nn

from leantune.methods.sparse_diff import (CONFIG_NAME, apply_diff, diff_between, read_sparse_diff, revert_diff,
                                          save_sparse_diff)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))


def _snapshot(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_round_trip_gives_back_the_trained_weights_and_revert_the_base(tmp_path):
    m = _net()
    theta0 = _snapshot(m)
    with torch.no_grad():
        m[0].weight[1, 2] += 0.5
        m[0].weight[4, 0] -= 1e-3
        m[1].bias[0] -= 0.25
    diff = diff_between(theta0, m, dense=["1.weight"])
    diff.method = "test"
    assert diff.nnz() == 3 and set(diff.dense) == {"1.weight"}
    save_sparse_diff(diff, tmp_path / "d")
    back = read_sparse_diff(tmp_path / "d")
    assert back.method == "test" and back.nnz() == 3
    other = _net()
    other.load_state_dict(theta0)
    apply_diff(other, tmp_path / "d")
    for (n, a), b in zip(m.named_parameters(), other.parameters()):
        assert torch.equal(a, b), n
    revert_diff(other, back)
    assert torch.allclose(other[0].weight, theta0["0.weight"]) and torch.allclose(other[1].bias, theta0["1.bias"])


def test_two_diffs_add(tmp_path):
    m = _net()
    theta0 = _snapshot(m)
    phis = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        t = _net()
        t.load_state_dict(theta0)
        with torch.no_grad():
            mask = torch.rand(t[0].weight.shape, generator=g) < 0.3
            t[0].weight.add_(torch.randn(t[0].weight.shape, generator=g) * mask)
        phis.append(diff_between(theta0, t, masks={"0.weight": mask}))
    apply_diff(m, phis[0])
    apply_diff(m, phis[1])
    want = theta0["0.weight"].clone().reshape(-1)
    for phi in phis:
        idx, val = phi.diffs["0.weight"]
        want.index_add_(0, idx, val)
    assert torch.allclose(m[0].weight.reshape(-1), want)


def test_a_diff_for_another_model_is_refused_before_any_weight_changes(tmp_path):
    m = _net()
    theta0 = _snapshot(m)
    with torch.no_grad():
        m[1].bias += 1
    save_sparse_diff(diff_between(theta0, m), tmp_path / "d")
    wrong = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    before = _snapshot(wrong)
    with pytest.raises(ValueError, match="1.bias"):
        apply_diff(wrong, tmp_path / "d")
    assert all(torch.equal(before[n], p) for n, p in wrong.named_parameters())


def test_a_broken_folder_says_what_is_wrong(tmp_path):
    m = _net()
    theta0 = _snapshot(m)
    with torch.no_grad():
        m[1].bias += 1
    save_sparse_diff(diff_between(theta0, m), tmp_path / "d")
    cfg = tmp_path / "d" / CONFIG_NAME
    meta = json.loads(cfg.read_text())
    meta["shapes"]["1.bias"] = [2]
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="indices outside"):
        read_sparse_diff(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="sparse-diff folder"):
        read_sparse_diff(tmp_path)
