"""PagedAdamW (methods-core §2.5, oracle 6): torch.optim.AdamW's numbers with large states paged in one
parameter at a time; torch's state_dict layout, so leantune checkpoints resume exactly."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from leantune.optim import PagedAdamW, PagedStateStore, build_optimizer
from leantune.optim.paged_adamw import MemmapStore, PinnedStore
from leantune.train.checkpoint import load_checkpoint, save_checkpoint

THRESHOLD = 256  # small, so a unit test has several "large" parameters
SHAPES = [(16, 16), (8,), (64, 32), (5, 3), (40, 40), (255,)]  # paged: 16x16, 64x32, 40x40


class Recording(MemmapStore):
    """The CPU store, instrumented: the set of keys fetched and not yet written back, at every fetch."""

    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def fetch(self, key, device, non_blocking=False):
        out = super().fetch(key, device, non_blocking)
        self.seen.append(len(self.resident))
        return out


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ps = nn.ParameterList(nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES)


def grads(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def run(params, opt, steps, start=0):
    for s in range(start, start + steps):
        for p, g in zip(params, grads(s)):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_equals_torch_adamw_with_one_large_state_resident(wd):
    ref, net = Net(), Net()
    store = Recording()
    lr = 1e-2
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=wd)
    paged = PagedAdamW(net.parameters(), lr=lr, weight_decay=wd, page_threshold=THRESHOLD, store=store)
    run(list(ref.parameters()), torch_opt, 20)
    run(list(net.parameters()), paged, 20)
    assert max_diff(ref.parameters(), net.parameters()) <= 1e-7
    assert max_diff(ref.parameters(), Net().parameters()) > 1e-2  # it did move
    n_large = sum(1 for s in SHAPES if torch.Size(s).numel() >= THRESHOLD)
    assert n_large == 3 and store.fetches == 20 * n_large
    assert store.max_resident == 1 and set(store.seen) == {1} and not store.resident
    # large states live only in the store; small ones are ordinary state tensors
    for p in net.parameters():
        assert ("exp_avg" in paged.state[p]) == (p.numel() < THRESHOLD)
    sd_t, sd_p = torch_opt.state_dict(), paged.state_dict()
    for i, st in sd_t["state"].items():
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.allclose(st[k], sd_p["state"][i][k], rtol=0, atol=1e-7), (i, k)


def _mapping_of(ptr: int) -> str:
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return line
    return ""


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_cpu_store_is_a_file_mapping_not_anonymous_memory():
    net = Net()
    opt = PagedAdamW(net.parameters(), lr=1e-3, page_threshold=THRESHOLD)
    run(list(net.parameters()), opt, 2)
    assert isinstance(opt.store, MemmapStore)
    m, v = opt.store.view(0)
    for t in (m, v):
        line = _mapping_of(t.data_ptr())
        parts = line.split(maxsplit=5)
        perms, path = parts[1], parts[5].strip() if len(parts) > 5 else ""
        assert perms.endswith("s") and path.startswith("/"), line  # shared, file-backed
    assert m.abs().sum() > 0 and v.min() >= 0  # the updated values are there, not lost with the pages


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    def model_opt():
        net = Net()
        return net, PagedAdamW(net.parameters(), lr=1e-2, weight_decay=0.1, page_threshold=THRESHOLD)

    full, full_opt = model_opt()
    run(list(full.parameters()), full_opt, 20)

    first, first_opt = model_opt()
    run(list(first.parameters()), first_opt, 10)
    ck = save_checkpoint(tmp_path, 10, first, first_opt, {"epoch": 0})
    resumed, resumed_opt = model_opt()
    state = load_checkpoint(ck, resumed, resumed_opt)
    assert state["step"] == 10
    assert resumed_opt.store.max_resident == 0  # loading wrote into the store without a working copy
    run(list(resumed.parameters()), resumed_opt, 10, start=10)
    assert max_diff(full.parameters(), resumed.parameters()) == 0.0
    assert json.loads((ck / "trainer_state.json").read_text())["param_groups"][0]["lr"] == 1e-2


def test_state_dict_interchanges_with_torch_adamw():
    """A torch AdamW state loads into PagedAdamW (and back) and both continue identically."""
    ref, net = Net(), Net()
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    run(list(ref.parameters()), torch_opt, 5)
    net.load_state_dict(ref.state_dict())
    paged = PagedAdamW(net.parameters(), lr=1e-2, page_threshold=THRESHOLD)
    paged.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # torch's state_dict holds live tensors
    run(list(ref.parameters()), torch_opt, 5, start=5)
    run(list(net.parameters()), paged, 5, start=5)
    assert max_diff(ref.parameters(), net.parameters()) <= 1e-7

    back = Net()
    back.load_state_dict(net.state_dict())
    back_opt = torch.optim.AdamW(back.parameters(), lr=1e-2)
    back_opt.load_state_dict(copy.deepcopy(paged.state_dict()))
    run(list(back.parameters()), back_opt, 3, start=10)
    run(list(net.parameters()), paged, 3, start=10)
    assert max_diff(back.parameters(), net.parameters()) <= 1e-7


def test_build_optimizer_and_bad_arguments():
    p = [nn.Parameter(torch.zeros(3))]
    assert isinstance(build_optimizer("paged_adamw", p, lr=1e-3), PagedAdamW)
    assert isinstance(build_optimizer("adamw", p, lr=1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match="--optimizer"):
        build_optimizer("sgd", p, lr=1e-3)
    with pytest.raises(ValueError, match="store"):
        opt = PagedAdamW([nn.Parameter(torch.zeros(300))], page_threshold=THRESHOLD, store="disk")
        opt.param_groups[0]["params"][0].grad = torch.ones(300)
        opt.step()
    with pytest.raises(ValueError, match="betas"):
        PagedAdamW(p, betas=(0.9, 1.5))
    assert issubclass(PinnedStore, PagedStateStore)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pinned_store_prefetches_and_matches_torch():
    ref, net = Net().cuda(), Net().cuda()
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    paged = PagedAdamW(net.parameters(), lr=1e-2, weight_decay=0.1, page_threshold=THRESHOLD)
    for s in range(20):
        for a, b, g in zip(ref.parameters(), net.parameters(), grads(s)):
            a.grad, b.grad = g.cuda(), g.cuda()
        torch_opt.step()
        paged.step()
    assert isinstance(paged.store, PinnedStore)
    assert paged.store.max_resident == 2  # the current parameter and the prefetched next one
    assert max_diff(ref.parameters(), net.parameters()) <= 1e-7
    assert all(not t.is_cuda and t.is_pinned() for t in paged.store.view(0))


# ---------------------------------------------------------------------------------------------
# through the CLI: `leantune finetune --optimizer paged_adamw`, interrupted and resumed


def test_finetune_paged_adamw_resumes_exactly_and_matches_adamw(folder, tmp_path, monkeypatch):
    from leantune import cli
    from leantune.optim import paged_adamw
    from leantune.train.loop import Trainer

    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i} {i}"}]}
            for i in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # tiny LoRA: A is 8x64 (512), B is 128x8 or 64x8: page the larger ones
    monkeypatch.setattr(paged_adamw, "PAGE_THRESHOLD", 1000)

    def argv(out, *extra):
        return ["finetune", "--model", str(folder), "--data", str(data), "--output", str(tmp_path / out),
                "--no-progress", "--eval-fraction", "0", "--batch-size", "2", "--epochs", "2", "--lr", "1e-2",
                "--weight-decay", "0.1", "--save-every", "5", *extra]

    def losses(out):
        recs = [json.loads(ln) for ln in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if "loss" in r]

    assert cli.run(argv("adamw")) == 0
    real, opts = Trainer.train_step, []

    def interrupt_at_7(self, window):
        opts.append(self.opt)
        if self.step == 6:
            raise KeyboardInterrupt
        return real(self, window)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", interrupt_at_7)
        with pytest.raises(KeyboardInterrupt):
            cli.run(argv("paged", "--optimizer", "paged_adamw"))
    assert isinstance(opts[0], PagedAdamW) and opts[0].store.max_resident == 1
    assert len(opts[0].store.slots) > 0 and len(opts[0].store.slots) < sum(1 for _ in opts[0].state)
    assert cli.run(argv("paged", "--optimizer", "paged_adamw", "--resume")) == 0
    assert len(losses("paged")) == len(losses("adamw")) == 8
    assert losses("paged") == losses("adamw")
    a = load_file(str(tmp_path / "adamw" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "paged" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_optimizer_is_a_clear_error(capsys):
    from leantune import cli

    with pytest.raises(SystemExit):
        cli.main(["finetune", "--optimizer", "lion"])
    assert "--optimizer must be one of" in capsys.readouterr().err
