"""The fusable-linear protocol: how a linear-like layer tells the fused ops of `ops/` what it computes.

A model asks its linear layers whether a fused autograd op (`lora_linear`, `swiglu_linear`,
`linear_cross_entropy_sum`) may stand in for calling them; the layers that `methods/` (adapters) and
`quant/` (4-bit) swap in answer. Models, methods and train import this module, so it sits at the bottom
of DESIGN.md's layers, with the ops. A layer declares, on its class:

- `accepts_adapter_ids = True`: `forward(x, adapter_ids=None)` takes per-row or per-token adapter slots
  (a LongTensor or a `leantune.routing.Routing`);
- `plain_linear = True`: it is an `nn.Linear` whose forward is exactly `F.linear(x, weight, bias)`;
- `fused_linear_params(x, adapter_ids=None) -> (W, b, A, B, s) | None`: its output for x equals
  `lora_linear(x, W, b, A, B, s)` (A = B = None: no low-rank term); None means "call the module".
  `W` is a float tensor or a packed frozen weight with `dense(dtype) -> (out, in) tensor`.

`is_plain_linear(module)` and `fused_linear_params(module, x, adapter_ids)` below are how callers ask.
"""
from __future__ import annotations

import torch


def is_plain_linear(module) -> bool:
    """True when `module(x)` is exactly `F.linear(x, module.weight, module.bias)` with a float weight
    (an nn.Linear whose forward is not overridden, or declares `plain_linear`, and has no hooks)."""
    if not isinstance(module, torch.nn.Linear):
        return False
    plain = type(module).forward is torch.nn.Linear.forward or getattr(type(module), "plain_linear", False)
    hooked = module._forward_hooks or module._forward_pre_hooks
    return plain and not hooked and module.weight.is_floating_point()


def fused_linear_params(module, x: torch.Tensor, adapter_ids=None):
    """(W, b, A, B, s) when `module(x, adapter_ids)` equals `lora_linear(x, W, b, A, B, s)`, else None."""
    if hasattr(type(module), "fused_linear_params"):  # on the class: no nn.Module __getattr__ miss
        return module.fused_linear_params(x, adapter_ids)
    if is_plain_linear(module) and module.weight.dtype == x.dtype:
        return module.weight, module.bias, None, None, 0.0
    return None
