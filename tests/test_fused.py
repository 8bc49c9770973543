"""Fused autograd ops (leantune/ops) against the plain autograd composition they stand in for.

Each op must give the plain path's outputs and gradients (to <= 1e-6 relative in fp32 on tiny shapes,
and to ~1e-12 in fp64, where rounding can no longer hide a wrong formula).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lt_tiny import tiny_lt_model, tiny_qlora_model
from torch import nn

import leantune.methods as lm
from leantune.data import Batch
from leantune.methods import LoraLinear
from leantune.methods import lora as lora_mod
from leantune.ops import linear_cross_entropy_sum, lora_linear, swiglu_linear
from leantune.train.loss import lm_loss_sum


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def leaves(*shapes, dtype=torch.float32, seed=0, grad=True, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen, dtype=dtype) * scale).requires_grad_(grad) for s in shapes]


def grads_of(out: torch.Tensor, inputs, seed=1):
    """Gradients of <out, fixed random cotangent> wrt inputs (None where an input gets none)."""
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    want = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad((out * cot).sum(), want, allow_unused=True))
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


def clones(tensors):
    return [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]


def assert_same(fused, plain, tol):
    for f, p in zip(fused, plain):
        assert (f is None) == (p is None)
        if f is not None:
            assert rel(f, p) <= tol, rel(f, p)


# ---------------------------------------------------------------------------------------------
# lora_linear


def plain_lora(x, w, b, a, bb, s):
    return F.linear(x, w, b) + F.linear(F.linear(x, a), bb) * s


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("train_base", [False, True])
def test_lora_linear_matches_plain(dtype, tol, with_bias, train_base):
    x, w, b, a, bb = leaves((2, 5, 24), (40, 24), (40,), (4, 24), (40, 4), dtype=dtype)
    w.requires_grad_(train_base)
    b.requires_grad_(train_base)
    b = b if with_bias else None
    s = 1.75  # not a power of two, so the scale's place in the products shows up in rounding
    ins = [x, w, b, a, bb]
    out = lora_linear(x, w, b, a, bb, s)
    ref_ins = clones(ins)
    ref = plain_lora(*ref_ins, s)
    assert out.shape == ref.shape and rel(out, ref) <= tol
    assert_same(grads_of(out, ins), grads_of(ref, ref_ins), tol)


def test_lora_linear_frozen_input_and_no_adapter():
    x, w, a, bb = leaves((7, 16), (12, 16), (2, 16), (12, 2))
    x.requires_grad_(False)
    out = lora_linear(x, w.detach(), None, a, bb, 2.0)
    ga, gb = torch.autograd.grad(out.square().sum(), [a, bb])
    ra, rb = a.detach().clone().requires_grad_(), bb.detach().clone().requires_grad_()
    ref = plain_lora(x, w.detach(), None, ra, rb, 2.0)
    ra_g, rb_g = torch.autograd.grad(ref.square().sum(), [ra, rb])
    assert rel(ga, ra_g) <= 1e-6 and rel(gb, rb_g) <= 1e-6
    # no adapter at all: exactly F.linear, gradients included
    x2 = x.clone().requires_grad_()
    plain = lora_linear(x2, w, None, None, None, 0.0)
    assert torch.equal(plain, F.linear(x, w))
    (gx,) = torch.autograd.grad(plain.sum(), [x2])
    assert torch.allclose(gx, torch.ones(7, 12) @ w.detach(), atol=1e-6)


def test_lora_layer_fast_path_equals_module_path(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    lm.apply(net, "lora", r=4, alpha=6, targets=["0", "2"])
    with torch.no_grad():
        for _, layer in lm.adapter_layers(net):
            layer.lora_B["default"].weight.normal_(0, 0.1)
    x = torch.randn(3, 5, 16, requires_grad=True)
    params = [p for p in net.parameters() if p.requires_grad] + [x]
    assert net[0].fused_linear_params(x)[2] is not None  # the fast path is taken
    fused = net(x)
    g_fused = grads_of(fused, params)
    monkeypatch.setattr(LoraLinear, "fused_linear_params", lambda self, x, adapter_ids=None: None)
    plain = net(x)
    assert rel(fused, plain) <= 1e-6
    assert_same(g_fused, grads_of(plain, params), 1e-6)


def test_lora_fast_path_only_when_exact():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32))
    lm.apply(net, "lora", adapter_name="a", r=4, alpha=8, targets=["0"], dropout=0.1)
    layer = net[0]
    x = torch.randn(2, 16)
    net.train()
    assert layer.fused_linear_params(x) is None  # dropout in effect
    net.eval()
    assert layer.fused_linear_params(x)[2] is not None  # dropout off in eval
    assert layer.fused_linear_params(x, adapter_ids=torch.tensor([0, 0]))[2] is not None  # one adapter's rows
    assert layer.fused_linear_params(x, adapter_ids=torch.tensor([0, -1])) is None  # a mixed batch: routed
    base_only = layer.fused_linear_params(x, adapter_ids=torch.tensor([-1, -1]))
    assert base_only[0] is layer.base_layer.weight and base_only[2] is None  # base rows: the base alone
    assert layer.fused_linear_params(x.double()) is None  # dtype mismatch
    handle = layer.lora_A["a"].register_forward_hook(lambda *args: None)
    assert layer.fused_linear_params(x) is None  # a hook that the module path would run
    handle.remove()
    lm.apply(net, "lora", adapter_name="b", r=2, alpha=4, targets=["0"])
    lm.set_adapter(net, ["a", "b"])
    assert layer.fused_linear_params(x) is None  # two active adapters


# ---------------------------------------------------------------------------------------------
# swiglu_linear


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("train_base", [False, True])
def test_swiglu_linear_matches_plain(dtype, tol, lora, train_base):
    g, u, w, b, a, bb = leaves((2, 3, 32), (2, 3, 32), (10, 32), (10,), (4, 32), (10, 4), dtype=dtype)
    w.requires_grad_(train_base)
    b.requires_grad_(train_base)
    a, bb = (a, bb) if lora else (None, None)
    ins = [g, u, w, b, a, bb]
    out = swiglu_linear(g, u, w, b, a, bb, 1.5)
    rg, ru, rw, rb, ra, rbb = clones(ins)
    h = F.silu(rg) * ru
    ref = plain_lora(h, rw, rb, ra, rbb, 1.5) if lora else F.linear(h, rw, rb)
    assert rel(out, ref) <= tol
    assert_same(grads_of(out, ins), grads_of(ref, [rg, ru, rw, rb, ra, rbb]), tol)


def test_swiglu_gate_and_up_gradients_are_bitwise_the_plain_ones():
    g, u, w = leaves((6, 32), (6, 32), (10, 32))
    w.requires_grad_(False)
    out = swiglu_linear(g, u, w, None, None, None, 0.0)
    rg, ru = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    ref = F.linear(F.silu(rg) * ru, w)
    assert torch.equal(out, ref)
    assert all(torch.equal(p, q) for p, q in zip(grads_of(out, [g, u]), grads_of(ref, [rg, ru])))


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy_sum


def plain_ce(h, w, b, t):
    z = F.linear(h, w, b)
    return F.cross_entropy(z if z.dtype == torch.float64 else z.float(), t, reduction="sum")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("chunk", [1024, 7])
@pytest.mark.parametrize("train_head", [False, True])
def test_linear_ce_matches_plain(dtype, tol, chunk, train_head):
    h, w, b = leaves((20, 16), (50, 16), (50,), dtype=dtype)  # logits of a few units
    w.requires_grad_(train_head)
    b.requires_grad_(train_head)
    t = torch.randint(0, 50, (20,), generator=torch.Generator().manual_seed(3))
    loss = linear_cross_entropy_sum(h, w, b, t, chunk=chunk)
    rh, rw, rb = clones([h, w, b])
    ref = plain_ce(rh, rw, rb, t)
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    # a scalar cotangent that is not 1 (the trainer divides by the token count)
    got = torch.autograd.grad(loss / 7.0, [x for x in (h, w, b) if x.requires_grad])
    want = torch.autograd.grad(ref / 7.0, [x for x in (rh, rw, rb) if x.requires_grad])
    assert all(rel(p, q) <= tol for p, q in zip(got, want))


def test_linear_ce_large_logits_and_no_grad():
    h, w = leaves((9, 8), (30, 8), scale=20.0)  # logits in the hundreds: softmax underflows to 0
    w.requires_grad_(False)
    t = torch.randint(0, 30, (9,), generator=torch.Generator().manual_seed(4))
    loss = linear_cross_entropy_sum(h, w, None, t, chunk=4)
    ref = plain_ce(h, w, None, t)
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    with torch.no_grad():
        nograd = linear_cross_entropy_sum(h, w, None, t, chunk=4)
    assert nograd.grad_fn is None and torch.equal(nograd, loss.detach())


def test_softmax_in_place_is_the_out_of_place_softmax():
    # linear_ce writes softmax over its own logits buffer; that needs a row-wise kernel
    z = torch.randn(33, 1000, generator=torch.Generator().manual_seed(5)) * 5
    want = torch.softmax(z, dim=1)
    assert torch.equal(torch.softmax(z, dim=1, out=z), want) and torch.equal(z, want)


# ---------------------------------------------------------------------------------------------
# the whole training forward: fused paths on vs off


@pytest.mark.parametrize("tie", [False, True])
def test_lm_loss_and_lora_grads_equal_unfused(monkeypatch, tie):
    import leantune.models.llama as llama
    import leantune.train.loss as loss_mod

    model = tiny_lt_model(tie)
    lm.apply(model, "lora", r=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        for _, layer in lm.adapter_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    model.train()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = Batch(ids, ids.clone(), torch.arange(12).expand(2, -1), None, 22, 24)
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        loss, n = lm_loss_sum(model, batch)
        return loss, torch.autograd.grad(loss / n, params)

    fused_loss, fused_grads = run()
    monkeypatch.setattr(LoraLinear, "fused_linear_params", lambda self, x, adapter_ids=None: None)
    monkeypatch.setattr(llama, "fused_linear_params", lambda *a: None)
    monkeypatch.setattr(loss_mod, "is_plain_linear", lambda m: False)
    plain_loss, plain_grads = run()
    assert abs(fused_loss.item() - plain_loss.item()) <= 1e-6 * plain_loss.item()
    # ~8e-7 seen: fp32 rounding differences of each op, carried through two layers
    assert all(rel(f, p) <= 2e-6 for f, p in zip(fused_grads, plain_grads))


# ---------------------------------------------------------------------------------------------
# QLoRA: the fused ops on a 4-bit base expand the codes themselves


def test_qlora_fused_path_equals_module_path_and_keeps_no_float_weight(monkeypatch):
    import leantune.models.llama as llama
    from leantune.quant import Linear4bit

    model = tiny_qlora_model().train()
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 128)
    params = layer.fused_linear_params(x)
    assert params is not None and not isinstance(params[0], torch.Tensor)  # packed codes, not a float W
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = Batch(ids, ids.clone(), torch.arange(12).expand(2, -1), None, 22, 24)
    trainable = [p for p in model.parameters() if p.requires_grad]
    weight_shapes = {tuple(m.quant_state.shape) for m in model.modules() if isinstance(m, Linear4bit)}

    def run():
        saved = []

        def pack(t):
            saved.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, n = lm_loss_sum(model, batch)
        return loss, torch.autograd.grad(loss / n, trainable), saved

    fused_loss, fused_grads, fused_saved = run()
    # between forward and backward only codes live: no float tensor shaped like a 4-bit weight is saved
    assert not [s for s, dt in fused_saved if s in weight_shapes and dt.is_floating_point]
    monkeypatch.setattr(Linear4bit, "fused_linear_params", lambda self, x, adapter_ids=None: None)
    monkeypatch.setattr(llama, "fused_linear_params", lambda *a: None)
    plain_loss, plain_grads, _ = run()
    assert abs(fused_loss.item() - plain_loss.item()) <= 1e-6 * plain_loss.item()
    assert all(rel(f, p) <= 2e-6 for f, p in zip(fused_grads, plain_grads))


def test_qlora_fused_path_only_in_the_compute_dtype():
    from leantune.quant import Linear4bit

    layer = Linear4bit.from_linear(nn.Linear(64, 32).requires_grad_(False))
    assert layer.fused_linear_params(torch.randn(2, 64)) is not None
    assert layer.fused_linear_params(torch.randn(2, 64, dtype=torch.float64)) is None  # forward casts
    layer.compute_dtype = torch.float64
    assert layer.fused_linear_params(torch.randn(2, 64)) is None


# ---------------------------------------------------------------------------------------------
# fp32 adapters on a bf16 model: the fused op computes the adapter products in bf16 (autocast's rule)


def test_fp32_adapters_on_bf16_take_the_fused_path_when_allowed(monkeypatch):
    model = tiny_lt_model(tie=True).to(torch.bfloat16)
    lm.apply(model, "lora", r=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        for _, layer in lm.adapter_layers(model):
            assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's placement on half bases
            layer.lora_B["default"].weight.normal_(0, 0.05)
    model.train()
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(lora_mod, "native_bf16_cpu", lambda: False)
    assert layer.fused_linear_params(x) is None  # "auto" on a CPU without native bf16: PEFT's fp32 module path
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = Batch(ids, ids.clone(), torch.arange(12).expand(2, -1), None, 22, 24)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(math):
        monkeypatch.setattr(LoraLinear, "adapter_math", math)
        loss, n = lm_loss_sum(model, batch)
        return loss, torch.autograd.grad(loss / n, params)

    fused_loss, fused_grads = run("activation")
    assert layer.fused_linear_params(x) is not None
    assert all(g.dtype == torch.float32 for g in fused_grads)  # fp32 gradients for the fp32 masters
    plain_loss, plain_grads = run("adapter")
    assert abs(fused_loss.item() - plain_loss.item()) <= 2e-2 * abs(plain_loss.item())
    # bf16 products against fp32 ones: bf16's ~3 significant digits, not more
    errs = [rel(f, p) for f, p in zip(fused_grads, plain_grads)]
    assert max(errs) <= 3e-2, errs  # ~1e-2 seen
