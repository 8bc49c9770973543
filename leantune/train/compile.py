"""Opt-in `torch.compile` of a model's decoder blocks, one block at a time.

Compiling each block (rather than the whole model) keeps the graphs small and shared between the
identical blocks, leaves the loss, the optimizer and the Python loop eager, and works with the fused
ops of `leantune.ops` (dynamo traces their autograd Functions). The price is a one-off compile at
the first step (about 50-90 s on a 2-core CPU; much less once inductor's on-disk cache is warm) and
again for new shapes, so it is not a default. Measured (bench/lora_step.py --compile: SmolLM2-135M,
fp32, batch 2x128, LoRA r=8 all-linear): 2 threads ~1.75 s/step vs ~1.81 s eager, a few percent at
most and within run-to-run noise; 1 thread no gain. The fused eager path already removed most of
what compiling used to win.
"""
from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """`torch.compile` every decoder block of `model` in place, through its stages (`num_layers`,
    `layer_module(i)`); kwargs go to torch.compile."""
    n = getattr(model, "num_layers", 0)
    if not hasattr(model, "layer_module") or not n:
        raise ValueError(f"compile_blocks needs a model that shows its decoder blocks (num_layers, "
                         f"layer_module); {type(model).__name__} does not")
    for i in range(n):
        model.layer_module(i).compile(**compile_kwargs)
    return model
