"""A stacked MoE expert weight (E, out, in) stored in 4 bits, quantized expert by expert.

Each expert matrix is its own `quantize_4bit` tensor (NF4/FP4 blockwise, double quantization with its own offset
and nested blocks), so expert e's codes equal `quantize_4bit(W[e])` bit for bit and any expert decodes alone: the
expert forward dequantizes one expert at a time and the float stack is never resident. transformers' bitsandbytes
integration leaves 3-D expert parameters in float (it swaps `nn.Linear` modules only); bitsandbytes' experimental
`nn.parametrize.replace_parameter_4bit` quantizes a whole parameter as one tensor and decodes all of it on access.
This per-expert layout is leantune's own (its blocks coincide with the whole-stack ones when blocksize divides
out x in; only the double quantization's offset and nested blocks are per expert).

All state lives in buffers stacked over experts (same numel per expert, so same block counts), with one copy of the
code tables, so `.to(device)` moves it and its bytes are its buffers' bytes:

    packed   uint8 (E, ceil(n/2))        the 4-bit codes, two per byte (bitsandbytes' order)
    absmax   fp32 (E, blocks), or uint8 codes with double quantization
    offset   fp32 (E,)                   double quantization only: mean of each expert's absmax
    absmax2  fp32 (E, ceil(blocks/256))  double quantization only: the nested scales
    code     fp32 (16,)                  the 4-bit codebook
    code2    fp32 (256,)                 double quantization only: the 8-bit dynamic map
"""
from __future__ import annotations

import torch
from torch import nn

from .linear4bit import Packed4bitWeight, _Dequantized4bitLinear
from .nf4 import dequantize_4bit, quantize_4bit
from .state import NESTED_BLOCKSIZE, NestedState, QuantState


class Stacked4bit(nn.Module):
    """E expert matrices (out, in) in 4 bits; `expert_linear(x, e)` = x @ dequant(W_e)^T."""

    packed_experts = True  # models.moe runs these expert by expert (its loop path)
    requires_grad = False  # frozen, like a Linear4bit's codes

    def __init__(self, num_experts: int, out_features: int, in_features: int, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.quant_type, self.blocksize, self.double_quant, self.dtype = quant_type, blocksize, double_quant, dtype
        n = out_features * in_features
        blocks = -(-n // blocksize)
        E = num_experts
        self.register_buffer("packed", torch.zeros(E, (n + 1) // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(E, blocks, dtype=torch.uint8 if double_quant else torch.float32,
                                                   device=device))
        self.register_buffer("code", torch.zeros(16, device=device))
        if double_quant:
            self.register_buffer("offset", torch.zeros(E, device=device))
            self.register_buffer("absmax2", torch.zeros(E, -(-blocks // NESTED_BLOCKSIZE), device=device))
            self.register_buffer("code2", torch.zeros(256, device=device))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_experts, self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @classmethod
    def from_float(cls, w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                   double_quant: bool = True) -> Stacked4bit:
        """Quantize a float stack w (E, out, in); its dtype is kept as the dequantized dtype."""
        E, out, n_in = w.shape
        s = cls(E, out, n_in, quant_type, blocksize, double_quant, w.dtype, device="meta")
        s.set_(w)
        return s

    @torch.no_grad()
    def set_(self, w: torch.Tensor) -> None:
        """(Re)quantize from a float stack w (E, out, in), one expert at a time."""
        if tuple(w.shape) != tuple(self.shape):
            raise ValueError(f"expert weight of shape {tuple(w.shape)} does not fit a {tuple(self.shape)} 4-bit stack")
        self.dtype = w.dtype
        states, packs = [], []
        for e in range(self.num_experts):
            p, st = quantize_4bit(w[e], self.blocksize, self.quant_type, self.double_quant)
            packs.append(p.reshape(-1))
            states.append(st)
        self.packed = torch.stack(packs)
        self.absmax = torch.stack([st.absmax for st in states])
        self.code = states[0].code.clone()
        if self.double_quant:
            self.offset = torch.stack([st.offset.reshape(()) for st in states]).float()
            self.absmax2 = torch.stack([st.state2.absmax for st in states])
            self.code2 = states[0].state2.code.clone()

    def state(self, e: int) -> QuantState:
        """Expert e's QuantState (views of the stacked buffers)."""
        nested = offset = None
        if self.double_quant:
            nested, offset = NestedState(absmax=self.absmax2[e], code=self.code2), self.offset[e]
        return QuantState(absmax=self.absmax[e], shape=(self.out_features, self.in_features), dtype=self.dtype,
                          blocksize=self.blocksize, quant_type=self.quant_type, code=self.code, offset=offset,
                          state2=nested)

    def expert_linear(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x (n, in) @ dequant(W_e)^T -> (n, out), in x's dtype; backward decodes W_e again (nothing weight-sized is
        kept between the passes)."""
        return _Dequantized4bitLinear.apply(x, Packed4bitWeight(self.packed[e], self.state(e)), None)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float stack (E, out, in) the experts compute with (merge, export)."""
        return torch.stack([dequantize_4bit(self.packed[e], self.state(e), dtype) for e in range(self.num_experts)])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def _apply(self, fn, recurse=True):
        # .to(device) moves the codes and scales; a dtype cast (.half()) must never touch them
        for name, t in list(self._buffers.items()):
            if t is not None:
                self._buffers[name] = t.to(fn(t.new_empty(0)).device)
        return self

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"experts={self.num_experts}, out={self.out_features}, in={self.in_features}, {self.quant_type}, "
                f"blocksize={self.blocksize}{dq}")

