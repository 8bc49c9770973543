"""`Linear4bit`: a frozen 4-bit (NF4/FP4) linear layer for QLoRA (arXiv:2305.14314).

Holds the packed codes as a uint8 buffer `weight` plus a `QuantState`, and an optional float bias.
The forward dequantizes to the compute dtype (fp32 on CPU, bf16 on CUDA unless `compute_dtype` is
set: `load_model` sets the run's precision, bf16 on a CPU with native bf16), applies `F.linear`, and casts
back to the input dtype, as bitsandbytes' `Linear4bit` does.
Gradients flow to the input only: the autograd function dequantizes again in backward instead of
saving the dequantized weight, so a layer costs ~4.13 bits/param between forward and backward.

State dicts use bitsandbytes' keys (`reference/formats.md` §2.7): `weight` (packed), `weight.absmax`,
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
`weight.quant_state.bitsandbytes__nf4`, `bias`; a float `weight` loads too and is quantized.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import fused as kernels_fused
from ..kernels import nf4 as kernels_nf4
from ..kernels import use_triton
from .nf4 import dequantize_4bit, quantize_4bit
from .state import PACKED_KEY, QuantState


class _Dequantized4bitLinear(torch.autograd.Function):
    """y = x @ dequant(W).T + b. Keeps only the packed codes: backward dequantizes again for dX = dY @
    dequant(W), so no weight-sized float tensor lives between forward and backward. W gets no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # weight: a Packed4bitWeight (frozen codes; not a tensor input, so autograd never asks its grad)
        ctx.weight = weight
        return F.linear(x, weight.dense(x.dtype), bias)  # the float weight is freed on return

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.weight.dense(grad_out.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias


class Packed4bitWeight:
    """A 4-bit weight handed to the fused ops (`leantune.ops`): they call `dense(dtype)` for the forward
    GEMM and again for backward's `dx`, so only the packed codes live between the two passes."""

    __slots__ = ("packed", "state", "triton")

    def __init__(self, packed: torch.Tensor, state: QuantState, triton: bool = False):
        self.packed, self.state, self.triton = packed, state, triton

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        if self.triton:  # one kernel, bit-identical to the torch decode (tests/test_kernels.py)
            return kernels_nf4.dequantize(self.packed, self.state, dtype)
        return dequantize_4bit(self.packed, self.state, dtype)  # (out, in)


class DequantizedLinear(nn.Linear):
    """A float nn.Linear that takes (and ignores) adapter slots: what a merged 4-bit layer becomes."""

    accepts_adapter_ids = True
    plain_linear = True  # forward is exactly F.linear(x, weight, bias)

    def forward(self, x, adapter_ids=None):
        return F.linear(x, self.weight, self.bias)


class Linear4bit(nn.Module):
    """A linear layer whose weight is stored blockwise in 4 bits (bitsandbytes layout)."""

    is_linear_like = True  # adapter methods wrap it like an nn.Linear
    accepts_adapter_ids = True
    kernel_backend = "auto"  # leantune.kernels.BACKENDS: Triton decode (and small-batch matmul) on CUDA
    # Rows up to which a forward on Triton reads the codes inside the matmul (decode: memory-bound,
    # 4x fewer weight bytes) instead of decoding W for cuBLAS (prefill, training).
    fused_matmul_rows = 16

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                 device=None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype
        n = in_features * out_features
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.quant_state: QuantState | None = None  # set by from_linear / load_state_dict / set_weight_

    # -----------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> Linear4bit:
        """Quantize an nn.Linear (its weight dtype is kept as `quant_state.dtype`; the bias is shared)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=False, quant_type=quant_type,
                    blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype, device="meta")
        layer.set_weight_(w.detach())
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
        return layer

    @classmethod
    def from_quantized(cls, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype | None = None) -> Linear4bit:
        """Wrap already-packed codes and their state (e.g. read from a checkpoint)."""
        if len(state.shape) != 2:
            raise ValueError(f"a 4-bit linear weight must be 2-D (out, in), got shape {tuple(state.shape)}")
        out_f, in_f = state.shape
        layer = cls(in_f, out_f, bias=False, quant_type=state.quant_type, blocksize=state.blocksize,
                    double_quant=state.nested, compute_dtype=compute_dtype, device="meta")
        layer._set_packed(packed, state)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(packed.device), requires_grad=False)
        return layer

    @torch.no_grad()
    def set_weight_(self, w: torch.Tensor) -> None:
        """(Re)quantize a float weight (out, in) into this layer with its quant_type/blocksize/DQ."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(w.shape)} does not fit a "
                             f"{self.out_features}x{self.in_features} Linear4bit")
        packed, state = quantize_4bit(w, self.blocksize, self.quant_type, self.double_quant)
        self._set_packed(packed, state)

    def _set_packed(self, packed: torch.Tensor, state: QuantState) -> None:
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"quant state of shape {tuple(state.shape)} does not fit a "
                             f"{self.out_features}x{self.in_features} Linear4bit")
        n = state.numel
        if packed.numel() * packed.element_size() != (n + 1) // 2:
            raise ValueError(f"packed weight has {packed.numel() * packed.element_size()} bytes, "
                             f"a {tuple(state.shape)} weight needs {(n + 1) // 2}")
        if packed.dtype != torch.uint8:
            packed = packed.reshape(-1).view(torch.uint8)
        self.weight = packed.reshape(-1, 1)
        self.quant_state = state.to(packed.device)
        self.quant_type, self.blocksize, self.double_quant = state.quant_type, state.blocksize, state.nested

    # -----------------------------------------------------------------------------------------
    # compute

    def resolve_compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.bfloat16 if x.device.type == "cuda" else torch.float32

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.quant_state is None:
            raise RuntimeError("this Linear4bit holds no weight yet: build it with Linear4bit.from_linear "
                               "or load a state dict into it")
        dt = self.resolve_compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dt)
        xc = x.to(dt)
        triton = use_triton(self.kernel_backend, xc)
        if triton and xc.numel() <= self.fused_matmul_rows * self.in_features:
            return kernels_fused.nf4_linear(xc, self.weight, self.quant_state, bias).to(x.dtype)
        weight = Packed4bitWeight(self.weight, self.quant_state, triton)
        return _Dequantized4bitLinear.apply(xc, weight, bias).to(x.dtype)

    def packed_weight(self, x: torch.Tensor) -> Packed4bitWeight:
        """The codes as the fused ops take them, decoded by Triton when this layer runs it for x."""
        return Packed4bitWeight(self.weight, self.quant_state, use_triton(self.kernel_backend, x))

    def fused_linear_params(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None):  # noqa: ARG002
        """(packed W, b, None, None, 0.0) for the fused ops (`leantune.ops.fused_linear_params`) when x is
        already in the compute dtype, so that this layer is exactly `F.linear(x, dequant(W), b)`; else None."""
        if self.quant_state is None or x.dtype != self.resolve_compute_dtype(x):
            return None
        if self.bias is not None and (self.bias.dtype != x.dtype or self.bias.requires_grad):
            return None
        return self.packed_weight(x), self.bias, None, None, 0.0

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight (out, in) the layer computes with, in `dtype` (default: its original dtype).

        The merge hook: a QLoRA adapter merges as `dequantized_weight(torch.float32) + delta_W`.
        """
        if self.quant_state is None:
            raise RuntimeError("this Linear4bit holds no weight yet")
        return dequantize_4bit(self.weight, self.quant_state, dtype)

    def to_float_linear(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                        dtype: torch.dtype | None = None) -> DequantizedLinear:
        """A plain float linear layer computing `weight` (default: the dequantized weight) and `bias`
        (default: this layer's), in `dtype` (default: the original weight dtype). For merge_and_unload."""
        dtype = dtype or self.quant_state.dtype
        w = self.dequantized_weight(torch.float32) if weight is None else weight
        b = self.bias if bias is None else bias
        lin = DequantizedLinear(self.in_features, self.out_features, bias=b is not None,
                                device="meta", dtype=dtype)
        lin.weight = nn.Parameter(w.detach().to(self.weight.device, dtype), requires_grad=False)
        if b is not None:
            lin.bias = nn.Parameter(b.detach().to(self.weight.device, dtype), requires_grad=False)
        return lin

    def nbytes(self) -> int:
        """Bytes held: packed codes + scales/tables + bias."""
        n = self.weight.numel() * self.weight.element_size()
        n += self.quant_state.nbytes() if self.quant_state is not None else 0
        return n + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def _apply(self, fn, recurse=True):
        # Module.to / .cuda / .half move the packed buffer and cast the bias; the quant state follows
        # the buffer's device and never changes dtype (scales stay fp32, codes stay uint8).
        super()._apply(fn, recurse)
        st = self.quant_state
        if st is not None and self.weight.device.type != "meta" and st.absmax.device != self.weight.device:
            self.quant_state = st.to(self.weight.device)
        return self

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.quant_type}, blocksize={self.blocksize}{dq}")

    # -----------------------------------------------------------------------------------------
    # state dict (bitsandbytes' keys)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # bnb's order: weight (packed), bias, then the quant state
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        if self.quant_state is not None:
            for k, v in self.quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        wkey, bkey = prefix + "weight", prefix + "bias"
        qkeys = {k: v for k, v in state_dict.items() if k.startswith(wkey + ".")}
        if wkey not in state_dict:
            missing_keys.append(wkey)
        if self.bias is not None and bkey not in state_dict:
            missing_keys.append(bkey)
        try:
            if wkey in state_dict:
                self._load_weight(state_dict[wkey], qkeys)
            if self.bias is not None and bkey in state_dict:
                self._load_bias(state_dict[bkey])
        except ValueError as e:
            error_msgs.append(f"{prefix.rstrip('.') or 'Linear4bit'}: {e}")
        if strict:
            known = {wkey, *qkeys, *([bkey] if self.bias is not None else [])}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)

    @torch.no_grad()
    def _load_weight(self, w: torch.Tensor, qkeys: dict) -> None:
        device = w.device if self.weight.device.type == "meta" else self.weight.device
        if w.is_floating_point():  # a float checkpoint: quantize on load
            if qkeys:
                raise ValueError("a float weight comes with 4-bit quant state keys; the checkpoint is inconsistent")
            self.set_weight_(w.to(device))
            return
        if not any(PACKED_KEY in k for k in qkeys):
            raise ValueError("a packed 4-bit weight needs its quant state keys (weight.absmax, weight.quant_map, "
                             f"weight.{PACKED_KEY}nf4 ...), which are missing")
        self._set_packed(w.to(device), QuantState.from_dict(qkeys, device=device))

    @torch.no_grad()
    def _load_bias(self, b: torch.Tensor) -> None:
        if tuple(b.shape) != (self.out_features,):
            raise ValueError(f"bias of shape {tuple(b.shape)} does not fit out_features={self.out_features}")
        if self.bias.device.type == "meta":
            self.bias = nn.Parameter(b.detach().clone(), requires_grad=self.bias.requires_grad)
        else:
            self.bias.copy_(b)
