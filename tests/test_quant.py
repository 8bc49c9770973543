"""4-bit quantization (QLoRA): NF4/FP4 codes, double quantization, Linear4bit, 4-bit loading.

Oracles: bitsandbytes 0.50.2 on CPU (bit-exact codes, scales, nested state, serialized keys), the
paper's NF4 < Int4 < FP4 claim (methods-core.md §2.6) and transformers' own 4-bit loading.
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import leantune
from leantune.quant import (
    FP4_CODE, NF4_CODE, Linear4bit, Quant4bitConfig, QuantState, bits_per_param, codebook, dequantize_4bit,
    dynamic_map, quantize_4bit, quantize_model, unpack_codes,
)

bnb = pytest.importorskip("bitsandbytes")
from bnb_exact import exact_reference, xfail_unless_bnb_exact  # noqa: E402
BF = bnb.functional


@pytest.fixture(scope="module", autouse=True)
def eager_bnb():
    """bnb torch.compile's its odd-shape dequantize fallback; eager mode is the same math, in seconds."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_quantize(w, blocksize, quant_type, dq):
    return BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=dq)


# ---------------------------------------------------------------------------------------------
# codebooks


def test_codebooks_equal_bitsandbytes():
    for qt in ("nf4", "fp4"):
        ref = BF.get_4bit_type(qt, device="cpu")
        ours = codebook(qt)
        assert ours.dtype == torch.float32 and torch.equal(ours, ref)
        assert torch.equal(torch.signbit(ours), torch.signbit(ref))  # fp4 code 8 is +0.0, as bnb builds it
    assert codebook("nf4")[7] == 0 and codebook("nf4").tolist() == [float(torch.tensor(v)) for v in NF4_CODE]
    raw = torch.tensor([0, .0625, 8, 12, 4, 6, 2, 3, 0, -.0625, -8, -12, -4, -6, -2, -3])
    assert torch.equal(codebook("fp4"), raw / 12)
    assert len(FP4_CODE) == 16
    dmap = dynamic_map()
    assert torch.equal(dmap, BF.create_dynamic_map())
    assert dmap.unique().numel() == 256 and dmap.max() == 1.0 and abs(dmap.min().item() + 0.99296875) < 1e-7


def test_nf4_matches_normal_quantile_construction():
    """bnb's create_normal_map(offset=0.9677083, use_extra_value=True), with torch's ndtri as Phi^-1."""
    o = 0.5 * ((1 - 1 / 32) + (1 - 1 / 30))
    assert abs(o - 0.9677083) < 1e-7
    ppf = torch.special.ndtri
    pos = ppf(torch.linspace(o, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ppf(torch.linspace(o, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    assert torch.allclose(v / v.max(), torch.tensor(NF4_CODE, dtype=torch.float64), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# blockwise codes


def test_packing_example_and_nibble_order():
    w = torch.zeros(64)
    w[:4] = torch.tensor([0.0, 1.0, -1.0, 0.5])
    packed, state = quantize_4bit(w, 64, "nf4", double_quant=False)
    assert unpack_codes(packed, 64)[:4].tolist() == [7, 15, 0, 12]
    assert packed.shape == (32, 1) and packed.dtype == torch.uint8
    assert packed[:2, 0].tolist() == [127, 12]  # (7 << 4) | 15, (0 << 4) | 12
    assert state.absmax.tolist() == [1.0]


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_every_code_round_trips(qt):
    code = codebook(qt)
    a = 0.37
    w = (code * a).repeat(4)  # 64 values: every code four times, absmax = a
    packed, state = quantize_4bit(w, 64, qt, double_quant=False)
    q = unpack_codes(packed, 64)
    expect = torch.arange(16).repeat(4)
    if qt == "fp4":
        expect[expect == 8] = 0  # codes 0 and 8 both decode to 0.0; a zero quantizes to code 0
    assert torch.equal(q, expect)
    assert torch.equal(dequantize_4bit(packed, state), code[expect] * state.absmax[0])


def test_ties_go_to_the_lower_code():
    code = codebook("nf4")
    mids = (code[:-1] + code[1:]) / 2
    w = torch.cat([torch.tensor([1.0]), mids, torch.zeros(64 - 16)])
    q = unpack_codes(quantize_4bit(w, 64, "nf4", False)[0], 64)
    assert q[1:16].tolist() == list(range(15))


CASES = [(dt, bs, qt, dq) for dt in (torch.float32, torch.bfloat16, torch.float16)
         for bs in (32, 64, 256, 4096) for qt in ("nf4", "fp4") for dq in (False, True)]


@pytest.mark.parametrize("dtype,blocksize,qt,dq", CASES)
def test_bit_identical_to_bitsandbytes(dtype, blocksize, qt, dq):
    gen = torch.Generator().manual_seed(blocksize + 7 * dq)
    for shape in [(96, 130), (33, 70), (5, 7)]:  # 12480, 2310 and 35 values: partial last blocks, odd n
        w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
        w.view(-1)[:blocksize] = 0  # an all-zero block
        p_ref, s_ref = bnb_quantize(w, blocksize, qt, dq)
        packed, state = quantize_4bit(w, blocksize, qt, dq)
        assert torch.equal(packed, p_ref)
        assert torch.equal(state.absmax, s_ref.absmax) and state.absmax.dtype == s_ref.absmax.dtype
        assert torch.equal(state.code, s_ref.code)
        assert state.shape == s_ref.shape and state.dtype == s_ref.dtype == dtype
        if dq:
            assert torch.equal(state.offset, s_ref.offset)
            assert torch.equal(state.state2.absmax, s_ref.state2.absmax)
            assert torch.equal(state.state2.code, s_ref.state2.code)
            assert state.state2.blocksize == s_ref.state2.blocksize == 256
        out, ref = dequantize_4bit(packed, state), BF.dequantize_4bit(p_ref, s_ref)
        assert out.dtype == ref.dtype == dtype and out.shape == ref.shape and torch.equal(out, ref)


def test_nested_codes_on_many_absmax_blocks():
    # 200k values -> 3125 blocks of 64 -> 13 nested blocks: exercises bnb's 8-bit table lookup broadly
    w = torch.randn(400, 500, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.01, 1, 500)
    p_ref, s_ref = bnb_quantize(w, 64, "nf4", True)
    packed, state = quantize_4bit(w, 64, "nf4", True)
    assert torch.equal(state.absmax, s_ref.absmax) and torch.equal(state.state2.absmax, s_ref.state2.absmax)
    assert torch.equal(dequantize_4bit(packed, state), BF.dequantize_4bit(p_ref, s_ref))


def test_nested_8bit_codes_match_bitsandbytes_at_every_table_bin():
    """bnb's CPU kernel maps |x|/absmax through a 65536-bin table; hit every bin and every midpoint."""
    from leantune.quant import quantize_blockwise_8bit

    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535
    code = dynamic_map()
    mids = 0.5 * (code[:-1] + code[1:])
    for vals in (grid, mids, (mids + 1e-7).clamp(-1, 1), mids - 1e-7):
        v = torch.nn.functional.pad(vals, (0, -vals.numel() % 255))
        x = torch.cat([torch.ones(v.numel() // 255, 1), v.view(-1, 255)], 1).reshape(-1)  # absmax 1 per block
        q_ref, s_ref = BF.quantize_blockwise(x, blocksize=256)
        q, absmax = quantize_blockwise_8bit(x, 256)
        assert torch.equal(q, q_ref) and torch.equal(absmax, s_ref.absmax)


def test_chunked_quantization_is_identical(monkeypatch):
    from leantune.quant import nf4

    w = torch.randn(33, 70, generator=torch.Generator().manual_seed(4))
    p_ref, s_ref = bnb_quantize(w, 64, "nf4", True)
    monkeypatch.setattr(nf4, "_CHUNK", 256)  # 4 blocks per chunk, partial block in the last chunk
    packed, state = quantize_4bit(w, 64, "nf4", True)
    assert torch.equal(packed, p_ref) and torch.equal(state.absmax, s_ref.absmax)
    assert torch.equal(state.state2.absmax, s_ref.state2.absmax)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_prefix_table_codes_equal_comparing_with_every_midpoint(qt):
    """The 16-bit-prefix lookup (`_nearest_codes`) against the 15 comparisons it replaces, on every prefix
    (random low bits, both ends), every midpoint and its float neighbours, zeros, infinities, NaN, denormals."""
    from leantune.quant import nf4

    gen = torch.Generator().manual_seed(3)
    prefix = torch.arange(-32768, 32768, dtype=torch.int32) * 65536  # every prefix, low 16 bits 0
    low = torch.randint(0, 65536, (4, 65536), generator=gen, dtype=torch.int32)
    pats = torch.cat([prefix, prefix + 65535, (prefix + low).reshape(-1)])
    bounds, _ = nf4._bounds_and_order(qt, "cpu")
    inf = torch.tensor(float("inf"))
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 1e-38])
    edges = torch.cat([bounds, torch.nextafter(bounds, inf), torch.nextafter(bounds, -inf), special])
    for x in (pats.view(torch.float32), edges, edges.clamp(-1, 1)):
        fast, exact = nf4._nearest_codes(x, qt), nf4._exact_codes(x, qt)
        assert fast.dtype == exact.dtype == torch.uint8 and torch.equal(fast, exact)
    assert int((nf4._prefix_lut(qt, "cpu") == 255).sum()) <= 16  # only prefixes that straddle a midpoint


def test_dequantize_equals_code_times_absmax_at_odd_sizes():
    from leantune.quant import block_absmax

    for shape in [(7, 9), (1, 1), (3, 64), (129, 65)]:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        packed, state = quantize_4bit(w, 64, "nf4", True)
        codes = unpack_codes(packed, w.numel())
        absmax = block_absmax(state)
        ref = (codebook("nf4")[codes] * absmax.repeat_interleave(64)[: w.numel()]).view(shape)
        assert torch.equal(dequantize_4bit(packed, state), ref)
        assert torch.equal(dequantize_4bit(packed, state, torch.float32), ref)
        assert dequantize_4bit(packed, state, torch.bfloat16).dtype == torch.bfloat16


def test_bad_arguments():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(torch.randn(64), quant_type="int4")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        quantize_4bit(torch.randn(64).double())
    with pytest.raises(ValueError, match="quant_type"):
        Quant4bitConfig(quant_type="nf8")


# ---------------------------------------------------------------------------------------------
# the paper's claim (methods-core.md §2.6 oracle 5)


def _nearest_code_mse(w: torch.Tensor, code: torch.Tensor, bs: int = 64) -> torch.Tensor:
    code = code.sort().values
    blocks = w.reshape(-1, bs)
    am = blocks.abs().amax(1, keepdim=True)
    idx = torch.bucketize((blocks / am).clamp(-1, 1), (code[:-1] + code[1:]) / 2)
    return (code[idx] * am).reshape(w.shape)


def test_paper_claim_nf4_beats_int4_beats_fp4():
    w = torch.from_numpy((0.02 * np.random.default_rng(0).standard_normal((1024, 1024))).astype(np.float32))

    def rel_mse(w2):
        return ((w2 - w) ** 2).mean().item() / (w**2).mean().item()

    p_nf4, s_nf4 = quantize_4bit(w, 64, "nf4", double_quant=False)
    p_fp4, s_fp4 = quantize_4bit(w, 64, "fp4", double_quant=False)
    nf4, fp4 = rel_mse(dequantize_4bit(p_nf4, s_nf4)), rel_mse(dequantize_4bit(p_fp4, s_fp4))
    int4 = rel_mse(_nearest_code_mse(w, torch.arange(-7, 8).float().repeat_interleave(
        torch.tensor([1] * 7 + [2] + [1] * 7)) / 7))
    assert nf4 < int4 < fp4
    for got, want in ((nf4, 0.00845), (int4, 0.01160), (fp4, 0.01487)):
        assert abs(got / want - 1) < 0.02, (got, want)
    assert torch.equal(dequantize_4bit(p_fp4, s_fp4), _nearest_code_mse(w, codebook("fp4")))
    p_dq, s_dq = quantize_4bit(w, 64, "nf4", double_quant=True)
    nf4_dq = rel_mse(dequantize_4bit(p_dq, s_dq))
    assert abs(nf4_dq / nf4 - 1) < 0.01
    n = w.numel()
    bits = 8 * (p_nf4.numel() + s_nf4.absmax.numel() * 4) / n
    bits_dq = 8 * (p_dq.numel() + s_dq.absmax.numel()) / n + 32 * s_dq.state2.absmax.numel() / n
    assert bits == bits_per_param(64, False) == 4.5
    assert bits_dq == bits_per_param(64, True) == 4.126953125


# ---------------------------------------------------------------------------------------------
# QuantState serialization


@pytest.mark.parametrize("qt,dq", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_quant_state_dict_equals_bitsandbytes(qt, dq):
    w = torch.randn(128, 128, generator=torch.Generator().manual_seed(2))
    _, s_ref = bnb_quantize(w, 64, qt, dq)
    _, state = quantize_4bit(w, 64, qt, dq)
    ours, ref = state.as_dict(), s_ref.as_dict(packed=True)
    assert list(ours) == list(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
    meta = json.loads(bytes(ours[f"quant_state.bitsandbytes__{qt}"].tolist()))
    assert meta["shape"] == [128, 128] and meta["dtype"] == "float32" and meta["blocksize"] == 64
    back = QuantState.from_dict({"q.weight." + k: v for k, v in ref.items()})
    assert back.as_dict().keys() == ours.keys()
    assert all(torch.equal(back.as_dict()[k], ours[k]) for k in ours)
    assert BF.QuantState.from_dict(dict(ours), device="cpu") == s_ref  # bnb reads ours


def test_quant_state_errors():
    with pytest.raises(ValueError, match="lacks"):
        QuantState.from_dict({"absmax": torch.zeros(4)})
    with pytest.raises(ValueError, match="absmax has"):
        QuantState(absmax=torch.zeros(3), shape=(16, 16), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Linear4bit


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(0)
    lin = nn.Linear(128, 96)
    with torch.no_grad():
        lin.bias.normal_(0, 0.1)
    return lin


def bnb_linear(linear, qt="nf4", dq=True):
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=dq, quant_type=qt)
    layer.support_avx512bf16_for_cpu = False  # keep bnb's plain packing on every CPU
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("qt,dq", [("nf4", True), ("fp4", False)])
def test_linear4bit_forward_and_grad_equal_bitsandbytes(linear, qt, dq):
    ref = bnb_linear(linear, qt, dq)
    ours = Linear4bit.from_linear(linear, qt, 64, dq)
    assert torch.equal(ours.weight, ref.weight.data)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    assert torch.allclose(y1, y2, atol=1e-5, rtol=0)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5, rtol=0)
    assert [n for n, _ in ours.named_parameters()] == ["bias"]  # the packed weight is a buffer: no grad
    assert torch.allclose(ours.bias.grad, ref.bias.grad, atol=1e-5, rtol=0)
    assert torch.equal(ours.dequantized_weight(), BF.dequantize_4bit(ref.weight.data, ref.weight.quant_state))


def test_backward_saves_no_dequantized_weight(linear):
    layer = Linear4bit.from_linear(linear)
    x = torch.randn(4, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert not any(t.is_floating_point() and t.numel() >= 96 * 128 for t in saved)
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("bias", [False, True])
def test_autograd_function_equals_dequantize_then_linear(linear, bias):
    """The custom Function (packed weight saved, dequantized again in backward) gives what autograd gives
    for F.linear on the dequantized weight: same output, same input and bias grads, no weight grad."""
    layer = Linear4bit.from_linear(linear)
    if not bias:
        layer.bias = None
    else:
        layer.bias.requires_grad_(True)
    w = layer.dequantized_weight(torch.float32)
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(bias)
    x = torch.randn(2, 6, 128, generator=torch.Generator().manual_seed(2))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = layer(x1), nn.functional.linear(x2, w, b)
    assert torch.allclose(y1, y2, atol=1e-6, rtol=0)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6, rtol=0)
    if bias:
        assert torch.allclose(layer.bias.grad, b.grad, atol=1e-5, rtol=0)
    assert layer.weight.grad is None and not layer.weight.requires_grad
    frozen = torch.randn(3, 128)  # an input that needs no grad gets none and costs no backward
    assert not layer(frozen).requires_grad or bias


def test_state_dict_round_trips_with_bitsandbytes(linear):
    ref = bnb_linear(linear)
    ours = Linear4bit(128, 96, bias=True)
    ours.load_state_dict(ref.state_dict())  # bnb -> leantune
    x = torch.randn(7, 128)
    assert torch.allclose(ours(x), ref(x), atol=1e-6, rtol=0)
    sd, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_ref)
    assert all(sd[k].dtype == sd_ref[k].dtype and torch.equal(sd[k], sd_ref[k]) for k in sd)
    # leantune -> bnb, the way transformers loads a prequantized checkpoint
    mine = Linear4bit.from_linear(linear).state_dict()
    layer = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=torch.float32)
    layer.support_avx512bf16_for_cpu = False
    layer.weight = bnb.nn.Params4bit.from_prequantized(
        mine["weight"], {k: v for k, v in mine.items() if k.startswith("weight.")}, device="cpu", module=layer)
    layer.bias = nn.Parameter(mine["bias"])
    assert torch.allclose(layer(x), ref(x), atol=1e-6, rtol=0)


def test_linear4bit_loads_a_float_state_dict_and_reports_bad_keys(linear):
    layer = Linear4bit(128, 96, bias=True)
    layer.load_state_dict(linear.state_dict())  # quantizes on load
    assert torch.equal(layer.weight, Linear4bit.from_linear(linear).weight)
    sd = Linear4bit.from_linear(linear).state_dict()
    del sd["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(RuntimeError, match="quant state keys"):
        Linear4bit(128, 96).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="Missing key"):
        Linear4bit(128, 96).load_state_dict({"bias": torch.zeros(96)})


def test_dtype_and_device_moves_keep_the_quant_state(linear):
    layer = Linear4bit.from_linear(linear)
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and layer.quant_state.absmax.dtype == torch.uint8
    assert layer.quant_state.state2.absmax.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    y = layer(torch.randn(2, 128, dtype=torch.bfloat16))  # fp32 compute on CPU, cast back
    assert y.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# LoRA on a 4-bit base, merging


def test_lora_on_linear4bit_trains_adapters_only(linear):
    torch.manual_seed(0)
    net = nn.Sequential(Linear4bit.from_linear(linear), nn.Tanh(), Linear4bit.from_linear(nn.Linear(96, 8)))
    packed = [m.weight.clone() for m in (net[0], net[2])]
    leantune.apply(net, "lora", r=4, alpha=8, targets=["0", "2"])
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    x, target = torch.randn(16, 128), torch.randn(16, 8)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = ((net(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        assert net[2].lora_B["default"].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in net.named_parameters() if n not in trainable)
    assert torch.equal(net[0].base_layer.weight, packed[0]) and torch.equal(net[2].base_layer.weight, packed[1])


def test_merge_hook_gives_dequantized_base_plus_delta(linear):
    from leantune.methods import LoraLinear

    net = nn.Sequential(Linear4bit.from_linear(linear))
    leantune.apply(net, "lora", r=4, alpha=8, targets=["0"])
    layer: LoraLinear = net[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    base = layer.base_layer
    dw, _ = layer.delta_weight("default")
    merged = base.to_float_linear(weight=base.dequantized_weight(torch.float32) + dw)
    x = torch.randn(5, 128)
    assert torch.allclose(merged(x, None), layer(x), atol=1e-5, rtol=0)
    assert torch.equal(base.to_float_linear().weight, base.dequantized_weight(torch.float32))


# ---------------------------------------------------------------------------------------------
# whole models: quantize_model, load(quantize=...), transformers 4-bit folders


IDS = torch.tensor([[1, 5, 9, 20, 33, 100, 7, 250], [3, 4, 5, 6, 7, 8, 9, 10]])


def hf_4bit(path, qt="nf4", dq=True, dtype=torch.float32):
    tf = pytest.importorskip("transformers")
    cfg = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq,
                                bnb_4bit_compute_dtype=torch.float32)
    return tf.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=dtype,
                                                   device_map="cpu").eval()


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    """A tiny Qwen2 folder: q/k/v biases, so 4-bit layers with a bias load too."""
    from tiny_folder import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "qwen2", family="qwen2")


@pytest.mark.parametrize("family,qt,dq,dtype", [("llama", "nf4", True, torch.float32),
                                                ("llama", "fp4", False, torch.float32),
                                                ("qwen2", "nf4", True, torch.float32),
                                                ("qwen2", "nf4", True, torch.bfloat16)])
def test_load_quantized_equals_transformers(request, one_thread, family, qt, dq, dtype):
    path = request.getfixturevalue("folder" if family == "llama" else "qwen_folder")
    model, _ = leantune.load(path, dtype=dtype, quantize=Quant4bitConfig(quant_type=qt, double_quant=dq))
    kinds = {n.rpartition(".")[2]: type(m).__name__ for n, m in model.named_modules() if n.count(".") >= 3}
    assert kinds["q_proj"] == kinds["down_proj"] == "Linear4bit" and type(model.lm_head) is not Linear4bit
    hf = hf_4bit(path, qt, dq, dtype)
    hf_q = hf.model.layers[1].self_attn.q_proj
    ours_q = model.model.layers[1].self_attn.q_proj
    assert torch.equal(ours_q.weight, hf_q.weight.data) and ours_q.quant_state.dtype == dtype
    ref = exact_reference(hf)  # bnb's codes and states in plain fp32 math (bnb's CPU kernels vary by CPU)
    with torch.no_grad():
        tol = 1e-4 if dtype == torch.float32 else 8e-3  # bf16: same weights, at most ~1 ulp of rounding apart
        assert (model(IDS).float() - ref(IDS).logits.float()).abs().max() <= tol


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_bitsandbytes_cpu_forward_is_fp32_math(request, folder, one_thread, qt):
    """Documents the peer: bnb's own CPU forward equals fp32 math on AVX2-only CPUs; where it dequantizes
    with AVX-512 or multiplies in bf16 (AVX512_BF16) it does not, and this test xfails there."""
    xfail_unless_bnb_exact(request)
    ref = exact_reference(hf_4bit(folder, qt))
    with torch.no_grad():
        assert (hf_4bit(folder, qt)(IDS).logits - ref(IDS).logits).abs().max() <= 1e-4


def test_transformers_4bit_folder_loads_and_saves_back(folder, one_thread, tmp_path):
    tf = pytest.importorskip("transformers")
    hf = hf_4bit(folder)
    saved = tmp_path / "hf4"
    hf.save_pretrained(saved)
    for f in folder.glob("tokenizer*"):
        shutil.copy(f, saved)
    model, tok = leantune.load(saved)
    assert isinstance(model.model.layers[0].self_attn.k_proj, Linear4bit)
    with torch.no_grad():
        ref = exact_reference(hf_4bit(saved))(IDS).logits  # bnb's codes in fp32 math, on any CPU
        assert (model(IDS) - ref).abs().max() <= 1e-4
    out = leantune.save_hf_folder(model, tok, tmp_path / "lt4")  # the reverse: leantune writes a 4-bit folder
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    hf2 = tf.AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    for (n, a), b in zip(hf.named_modules(), hf2.modules()):  # transformers reads back the same codes and state
        if n.endswith("k_proj"):
            assert torch.equal(a.weight.data, b.weight.data)
            assert torch.equal(a.weight.quant_state.absmax, b.weight.quant_state.absmax)
    with torch.no_grad():
        assert (exact_reference(hf2)(IDS).logits - ref).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="already quantized"):
        leantune.load(saved, quantize="fp4")


def test_quantize_model_equals_quantized_load(folder, one_thread):
    model, _ = leantune.load(folder)
    fp32_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear)) - \
        model.lm_head.weight.numel() * 4
    quantize_model(model)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 7 * model.config.num_layers and isinstance(model.lm_head, nn.Linear)
    assert sum(m.weight.numel() + m.quant_state.absmax.numel() for m in layers) < fp32_bytes / 7.5
    loaded, _ = leantune.load(folder, quantize="nf4")
    with torch.no_grad():
        assert torch.equal(model(IDS), loaded(IDS))
    with pytest.raises(ValueError, match="quantize"):
        leantune.load(folder, quantize="int8")


def test_qlora_on_loaded_model_trains(folder, one_thread):
    model, _ = leantune.load(folder, quantize="nf4")
    leantune.apply(model, "lora", r=4, alpha=8, targets="all-linear")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(5):
        logits = model(IDS[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all("lora_" in n for n, p in model.named_parameters() if p.grad is not None)
    assert math.isfinite(losses[-1])
