"""Triton kernels (`leantune.kernels`) against torch references of the same math.

Without CUDA the kernels run in triton's CPU interpreter (`TRITON_INTERPRET=1`) at small shapes; the
variable is set only while this module imports triton and while its tests run, never for the other
test modules (pytest imports every module before running any). `@pytest.mark.gpu` variants run real
kernels at realistic shapes. The whole module is skipped when triton is not installed.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
_PRIOR = os.environ.get("TRITON_INTERPRET")


def _interpret_on():
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"


def _interpret_restore():
    if _PRIOR is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PRIOR


_interpret_on()
try:
    triton = pytest.importorskip("triton", reason="triton is optional (pip install triton==3.9.0)")
finally:
    _interpret_restore()

from leantune.kernels import check_device, fused, interpreting, load  # noqa: E402
from leantune.kernels.nf4 import Nf4Layout, dequantize  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """TRITON_INTERPRET=1 for this module's tests only (kernels are decorated at first launch)."""
    _interpret_on()
    yield
    _interpret_restore()


# ---------------------------------------------------------------------------------------------
# torch references


def ref_block_absmax(layout: Nf4Layout) -> torch.Tensor:
    if not layout.double_quant:
        return layout.absmax.float()
    q8 = layout.absmax.long()
    nested = layout.nested_absmax.float().repeat_interleave(layout.nested_blocksize)[: q8.numel()]
    return layout.nested_code.float()[q8] * nested + layout.offset  # fp32: multiply, then add


def ref_dequant(packed: torch.Tensor, layout: Nf4Layout, out_dtype) -> torch.Tensor:
    """`code[q] * absmax` in fp32, cast; q from the high nibble for even elements."""
    n = layout.numel
    p = packed.reshape(-1).long()
    q = torch.stack((p >> 4, p & 0xF), dim=1).reshape(-1)[:n]
    absmax = ref_block_absmax(layout).repeat_interleave(layout.blocksize)[:n]
    return (layout.code.float()[q] * absmax).to(out_dtype).view(layout.shape)


def ref_rms_norm(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def ref_rope(x, cos, sin):
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def make_weight(shape, blocksize=64, double_quant=False, seed=0, device=DEV):
    """Random packed codes and scales in bitsandbytes' layout (any bytes are valid codes)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, generator=g)
    code = torch.sort(torch.randn(16, generator=g))[0]  # the kernels only gather from the table
    if double_quant:
        kw = dict(absmax=torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, generator=g),
                  nested_absmax=torch.rand(-(-n_blocks // 256), generator=g) + 0.05,
                  nested_code=torch.sort(torch.rand(256, generator=g) * 2 - 1)[0],
                  offset=torch.tensor(0.0371))
    else:
        kw = dict(absmax=torch.rand(n_blocks, generator=g) + 0.01)
    kw = {k: v.to(device) for k, v in kw.items()}
    return packed.to(device), Nf4Layout(code=code.to(device), shape=shape, blocksize=blocksize, **kw)


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV, dtype)


def assert_rel(actual, expected, rel):
    """max |a - e| <= rel * max |e| (robust to cancellation in single elements)."""
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} * {scale:.3g}"


# ---------------------------------------------------------------------------------------------
# plumbing


def test_interpreter_mode_and_lazy_import():
    kernel = load("nf4")._dequant_kernel
    if not CUDA:
        assert interpreting() and type(kernel).__name__ == "InterpretedFunction"
    code = "import sys, leantune.kernels.fused, leantune.kernels.nf4; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.skipif(CUDA, reason="CPU-only check")
def test_cpu_tensors_need_cuda_without_interpreter(monkeypatch):
    packed, layout = make_weight((8, 8))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        dequantize(packed, layout)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        fused.swiglu(torch.ones(4), torch.ones(4))
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        check_device("x", torch.ones(1))


def test_bad_arguments():
    packed, layout = make_weight((8, 8))
    with pytest.raises(ValueError, match="absmax has"):
        Nf4Layout(absmax=torch.ones(3), code=layout.code, shape=(8, 8))
    with pytest.raises(ValueError, match="blocksize"):
        Nf4Layout(absmax=torch.ones(2), code=layout.code, shape=(8, 8), blocksize=48)
    with pytest.raises(ValueError, match="bytes"):
        dequantize(packed[:-1], layout)
    with pytest.raises(ValueError, match="does not match"):
        fused.nf4_linear(randn(2, 7), packed, layout)
    with pytest.raises(ValueError, match="do not fit"):
        fused.nf4_linear(randn(2, 8), packed, layout, None, randn(4, 8), randn(4, 8))


# ---------------------------------------------------------------------------------------------
# NF4 dequantization: bit-identical


@pytest.mark.parametrize("shape,blocksize,dq", [
    ((96, 200), 32, True),  # 600 blocks -> 3 nested blocks of 256
    ((96, 128), 4096, False),  # 3 blocks of 4096
    ((7, 75), 64, False),  # odd element count, a partial last block, blocks spanning rows
    ((7, 75), 128, True),
])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_bit_identical(shape, blocksize, dq, out_dtype):
    packed, layout = make_weight(shape, blocksize, dq, seed=blocksize)
    got = dequantize(packed, layout, out_dtype)
    assert got.dtype == out_dtype and got.shape == shape
    assert torch.equal(got, ref_dequant(packed, layout, out_dtype))


def test_dequantize_real_quant_state():
    """A QuantState from leantune.quant (NF4 + double quantization) decodes as its torch path does."""
    quant = pytest.importorskip("leantune.quant")
    w = randn(64, 96, seed=3)
    for dq in (False, True):
        packed, state = quant.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=dq)
        for dt in (torch.float32, torch.bfloat16):
            assert torch.equal(dequantize(packed, state, dt), quant.dequantize_4bit(packed, state, dt))


# ---------------------------------------------------------------------------------------------
# fused 4-bit linear


@pytest.mark.parametrize("m,k,n,blocksize,dq,bias", [
    (16, 128, 96, 64, False, True),
    (1, 128, 96, 64, True, False),  # one row (decoding)
    (16, 160, 96, 32, True, True),  # K not a multiple of the 64-wide tile
    (5, 75, 7, 64, False, True),  # odd K: bytes straddle rows
])
def test_nf4_linear_fp32(m, k, n, blocksize, dq, bias):
    packed, layout = make_weight((n, k), blocksize, dq, seed=k)
    w = ref_dequant(packed, layout, torch.float32)
    x = randn(m, k, seed=1).requires_grad_()
    b = randn(n, seed=2).requires_grad_() if bias else None
    y = fused.nf4_linear(x, packed, layout, b)
    assert_rel(y, F.linear(x.detach(), w, None if b is None else b.detach()), 1e-5)
    dy = randn(m, n, seed=4)
    y.backward(dy)
    assert_rel(x.grad, dy @ w, 1e-5)
    if bias:
        assert_rel(b.grad, dy.sum(0), 1e-5)


@pytest.mark.parametrize("m,rank", [(16, 8), (1, 20)])
def test_nf4_linear_lora_epilogue(m, rank):
    packed, layout = make_weight((96, 128), 64, True, seed=m)
    w = ref_dequant(packed, layout, torch.float32)
    x, b = randn(m, 128, seed=1).requires_grad_(), randn(96, seed=2).requires_grad_()
    a_, b_ = (0.1 * randn(rank, 128, seed=3)).requires_grad_(), (0.1 * randn(96, rank, seed=4)).requires_grad_()
    y = fused.nf4_linear(x, packed, layout, b, a_, b_, scaling=2.0)
    leaves = (x, b, a_, b_)
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    xr, br, ar, bbr = refs
    yr = F.linear(xr, w, br) + 2.0 * (xr @ ar.T) @ bbr.T
    assert_rel(y, yr, 1e-5)
    dy = randn(m, 96, seed=5)
    y.backward(dy)
    yr.backward(dy)
    for t, r in zip(leaves, refs):
        assert_rel(t.grad, r.grad, 1e-5)


def test_nf4_linear_bf16_batched():
    packed, layout = make_weight((48, 64), 64, True, seed=5)
    w = ref_dequant(packed, layout, torch.bfloat16)  # bnb multiplies by the bf16-rounded weight
    x = randn(2, 3, 64, dtype=torch.bfloat16, seed=6).requires_grad_()
    y = fused.nf4_linear(x, packed, layout)
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    assert_rel(y, x.detach().float() @ w.float().T, 1e-2)
    dy = randn(2, 3, 48, dtype=torch.bfloat16, seed=7)
    y.backward(dy)
    assert_rel(x.grad, dy.float() @ w.float(), 1e-2)


# ---------------------------------------------------------------------------------------------
# RMSNorm, SwiGLU, RoPE


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rms_norm(dtype, rel):
    x = randn(2, 9, 96, dtype=dtype, seed=8).requires_grad_()  # D=96: a masked tail in the 128 tile
    w = (1 + 0.1 * randn(96, seed=9)).to(dtype).requires_grad_()
    y = fused.rms_norm(x, w, 1e-5)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yr = ref_rms_norm(xr, wr, 1e-5)
    assert y.dtype == yr.dtype
    assert_rel(y, yr, 1e-6 if dtype == torch.float32 else 1e-2)
    dy = randn(2, 9, 96, dtype=dtype, seed=10)
    y.backward(dy)
    yr.backward(dy)
    assert_rel(x.grad, xr.grad, rel)
    assert_rel(w.grad, wr.grad, rel)


def test_rms_norm_matches_model():
    llama = pytest.importorskip("leantune.models.llama")
    norm = llama.RMSNorm(64, 1e-6).to(DEV)
    with torch.no_grad():
        norm.weight.add_(randn(64, seed=11))
    x = randn(3, 64, seed=12)
    assert_rel(fused.rms_norm(x, norm.weight, norm.eps), norm(x), 1e-6)


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_swiglu(dtype, rel):
    g = (3 * randn(3, 700, dtype=torch.float32, seed=13)).to(dtype).requires_grad_()  # 2100: 3 programs
    u = randn(3, 700, dtype=dtype, seed=14).requires_grad_()
    h = fused.swiglu(g, u)
    gr, ur = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    hr = F.silu(gr) * ur
    assert_rel(h, hr, rel)
    dh = randn(3, 700, dtype=dtype, seed=15)
    h.backward(dh)
    hr.backward(dh)
    assert_rel(g.grad, gr.grad, rel)
    assert_rel(u.grad, ur.grad, rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch_cos", [2, 1])
def test_rope(dtype, batch_cos):
    B, T, H, D = 2, 5, 3, 24
    x = randn(B, T, H, D, dtype=dtype, seed=16).transpose(1, 2).requires_grad_()  # (B, H, T, D), strided
    ang = randn(batch_cos, T, D // 2, seed=17)
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    y = fused.apply_rope(x, cos, sin)
    xr = x.detach().clone().requires_grad_()
    yr = ref_rope(xr, cos.expand(B, T, D), sin.expand(B, T, D))
    assert torch.equal(y, yr)  # same products and sums, rounded the same way
    dy = randn(B, H, T, D, dtype=dtype, seed=18)
    y.backward(dy)
    yr.backward(dy)
    assert_rel(x.grad, xr.grad, 1e-6 if dtype == torch.float32 else 1e-2)


def test_rope_matches_model():
    llama = pytest.importorskip("leantune.models.llama")
    x = randn(1, 2, 4, 16, seed=19)
    cos, sin = randn(1, 4, 16, seed=20), randn(1, 4, 16, seed=21)  # any tables, even unpaired halves
    assert torch.equal(fused.apply_rope(x, cos, sin), llama.apply_rope(x, cos, sin))
    xg = x.clone().requires_grad_()
    fused.apply_rope(xg, cos, sin).sum().backward()
    xr = x.clone().requires_grad_()
    llama.apply_rope(xr, cos, sin).sum().backward()
    assert_rel(xg.grad, xr.grad, 1e-6)


def test_rope_on_part_of_each_head_matches_model():
    """Phi-4-mini turns the first 12 of 16 dims: the kernel on a D-slice of a transposed projection."""
    llama = pytest.importorskip("leantune.models.llama")
    x = randn(2, 5, 3, 16, seed=22).transpose(1, 2)  # (B, H, T, D), strided as the model's q
    cos, sin = randn(2, 5, 12, seed=23), randn(2, 5, 12, seed=24)
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = llama.apply_partial_rope(fused.apply_rope, xg, cos, sin)
    yr = llama.apply_partial_rope(llama.apply_rope, xr, cos, sin)
    assert torch.equal(y, yr) and torch.equal(y[..., 12:], x[..., 12:])
    dy = randn(2, 3, 5, 16, seed=25)
    y.backward(dy)
    yr.backward(dy)
    assert_rel(xg.grad, xr.grad, 1e-6)


# ---------------------------------------------------------------------------------------------
# the real (non-interpreted) compiler: every kernel builds for sm_90 without a GPU


def _compile_sm90(fn, types: dict, constexprs: dict, **options):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32), options=options)
    assert kernel.asm["cubin"]


def test_kernels_compile_for_sm90(monkeypatch):
    """The interpreter is lenient about types and layouts; the GPU compiler (TTIR -> PTX -> cubin
    with triton's bundled ptxas, no device needed) is not. One bf16 variant of each kernel."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    nf4, fu = load("nf4"), load("fused")  # re-decorated for the compiler; reloaded back afterwards
    assert type(nf4._matmul_kernel).__name__ == "JITFunction"
    ptrs = {n: "*fp32" for n in ("nested_ptr", "code8_ptr", "offset_ptr", "code_ptr", "rstd_ptr", "dw_ptr")}
    ptrs.update(packed_ptr="*u8", absmax_ptr="*u8", scaling="fp32", eps="fp32")
    bf = {n: "*bf16" for n in ("out_ptr", "a_ptr", "bias_ptr", "c_ptr", "e_ptr", "f_ptr", "x_ptr", "w_ptr", "y_ptr",
                               "dy_ptr", "dx_ptr", "dh_ptr", "g_ptr", "u_ptr", "dg_ptr", "du_ptr", "cos_ptr",
                               "sin_ptr")}
    types, off = {**ptrs, **bf}, dict(enable_fp_fusion=False)
    _compile_sm90(nf4._dequant_kernel, types, dict(BS=64, DQ=True, NESTED_BS=256, BLOCK=1024), **off)
    _compile_sm90(nf4._matmul_kernel, types, dict(
        BS=64, DQ=True, NESTED_BS=256, HAS_BIAS=True, HAS_LORA=True, UPCAST=False, PRECISION="ieee", IDX64=False,
        BLOCK_RANK=16, **{k: v for k, v in fused.matmul_config(512, torch.bfloat16).items() if k.isupper()}),
        num_warps=4, num_stages=2, **off)
    _compile_sm90(fu._rmsnorm_bwd, types, dict(BLOCK_D=4096), num_warps=16, **off)
    _compile_sm90(fu._swiglu_bwd, types, dict(BLOCK=1024), **off)
    _compile_sm90(fu._rope_kernel, types, dict(BACKWARD=True, BLOCK_R=16, BLOCK_H=64), **off)


# ---------------------------------------------------------------------------------------------
# GPU: real kernels at realistic shapes


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dq", [False, True])
def test_gpu_dequantize(dq):
    packed, layout = make_weight((4096, 4096), 64, dq, seed=30)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(dequantize(packed, layout, dt), ref_dequant(packed, layout, dt))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 512, 2048])
def test_gpu_nf4_linear(m):
    packed, layout = make_weight((11008, 4096), 64, True, seed=31)
    for dt, rel in ((torch.bfloat16, 2e-2), (torch.float32, 1e-4)):
        w = ref_dequant(packed, layout, dt).float()
        x = randn(m, 4096, dtype=dt, seed=32).requires_grad_()
        b = randn(11008, dtype=dt, seed=33)
        y = fused.nf4_linear(x, packed, layout, b)
        assert_rel(y, x.detach().float() @ w.T + b.float(), rel)
        dy = randn(m, 11008, dtype=dt, seed=34)
        y.backward(dy)
        assert_rel(x.grad, dy.float() @ w, rel)


@pytest.mark.gpu
@gpu
def test_gpu_fused_ops():
    for dt, rel in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        x = randn(4096, 4096, dtype=dt, seed=35).requires_grad_()
        w = (1 + 0.1 * randn(4096, seed=36)).to(dt).requires_grad_()
        xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        y, yr = fused.rms_norm(x, w, 1e-5), ref_rms_norm(xr, wr, 1e-5)
        dy = randn(4096, 4096, dtype=dt, seed=37)
        y.backward(dy)
        yr.backward(dy)
        for a, e in ((y, yr), (x.grad, xr.grad), (w.grad, wr.grad)):
            assert_rel(a, e, rel)
        g, u = randn(4096, 11008, dtype=dt, seed=38).requires_grad_(), randn(4096, 11008, dtype=dt, seed=39)
        gr = g.detach().clone().requires_grad_()
        h, hr = fused.swiglu(g, u), F.silu(gr) * u
        h.backward(u)
        hr.backward(u)
        assert_rel(h, hr, rel)
        assert_rel(g.grad, gr.grad, rel)
        q = randn(4, 512, 32, 128, dtype=dt, seed=40).transpose(1, 2)
        ang = torch.cat((randn(4, 512, 64, seed=41),) * 2, -1)
        assert_rel(fused.apply_rope(q, ang.cos().to(dt), ang.sin().to(dt)),
                   ref_rope(q, ang.cos().to(dt), ang.sin().to(dt)), 1e-6)


# ---------------------------------------------------------------------------------------------
# the model on the kernels: `kernel_backend` ("auto" = Triton on CUDA) against the torch path


def test_model_on_kernels_equals_torch_path():
    from lt_tiny import tiny_qlora_model

    from leantune.data import Batch
    from leantune.kernels import set_backend
    from leantune.quant import Linear4bit
    from leantune.train.loss import lm_loss_sum

    model = tiny_qlora_model(DEV, vocab=96).train()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1)).to(DEV)
    batch = Batch(ids, ids.clone(), torch.arange(8, device=DEV).expand(2, -1), None, 14, 16)
    params = [p for p in model.parameters() if p.requires_grad]
    calls = []

    def run(backend):
        assert set_backend(model, backend) == 2 * 2 + 1 + 2 + 2 * 7  # norms, final norm, attn, 4-bit linears
        calls.clear()
        loss, n = lm_loss_sum(model, batch)
        grads = torch.autograd.grad(loss / n, params)
        with torch.no_grad():
            step = model(ids[:, :1])  # one row per sequence: small enough for the fused 4-bit matmul
        return loss, grads, step

    original = Linear4bit.packed_weight

    def spy(self, x):
        pw = original(self, x)
        calls.append(pw.triton)
        return pw

    Linear4bit.packed_weight = spy
    try:
        k_loss, k_grads, k_step = run("triton" if not CUDA else "auto")
        assert calls and all(calls)  # the 4-bit codes were decoded by the kernel
        t_loss, t_grads, t_step = run("torch")
        assert calls and not any(calls)
    finally:
        Linear4bit.packed_weight = original
    assert_rel(k_loss, t_loss, 1e-5)
    for kg, tg in zip(k_grads, t_grads):
        assert_rel(kg, tg, 1e-4)
    assert_rel(k_step, t_step, 1e-4)
    with pytest.raises(ValueError, match="kernel backend"):
        set_backend(model, "cuda")
