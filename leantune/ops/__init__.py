"""Fused autograd ops for training: the same math as the plain module composition, fewer passes.

- `lora_linear`: a linear layer + at most one LoRA adapter, `y = x W^T + b + s (x A^T) B^T`;
- `swiglu_linear`: `down(silu(gate) * up)` keeping only gate and up for backward;
- `linear_cross_entropy_sum`: LM head + summed token cross-entropy without keeping (N, V) logits.

Each is an `autograd.Function` whose gradients equal the plain autograd path to rounding
(tests/test_fused.py holds them to it). A layer offers them through the fusable-linear protocol
(`fusable.py`: `fused_linear_params`, `is_plain_linear`), the one contract between the models' MLP and
loss and the layers `methods/` and `quant/` swap in.
"""
from .fusable import fused_linear_params, is_plain_linear
from .linear_ce import linear_cross_entropy_sum
from .lora_linear import lora_linear
from .swiglu import swiglu_linear

__all__ = ["fused_linear_params", "is_plain_linear", "linear_cross_entropy_sum", "lora_linear", "swiglu_linear"]
