"""What a method tells `leantune estimate` about its memory (`MethodSpec.memory`), beside the LoRA-shaped
adapters that estimate models itself (`lora_shaped`).

A method that trains the base's own weights (full finetuning, SaRA, LT-SFT) or a side network beside a 4-bit
base (QST) registers a `MemoryModel`: what it trains, the copies it keeps, the table's labels. Estimate asks the
spec (`get_method(name).memory`) and never branches on a method's name; a method without one is not modelled
unless it is `lora_shaped`. The callables take estimate's method knobs as keywords (`sara_fraction=`, `qst=`:
its `--sara-fraction`, and a `QSTConfig` of its `--qst-*` flags) and use the ones that are theirs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class TrainedState:
    """Bytes of what trains, counted per tensor from a model built on the meta device (shapes only)."""

    trainable: int  # parameters that are not the base's weights (SaRA's values, QST's side network); 0 for full
    gradients: int  # every trainable element's gradient at once (after backward)
    peak_gradients: int  # what backward holds at its peak: `gradients`, or per-layer GaLore's one-at-a-time share
    moments: int  # the optimizer's moments (+ torch AdamW's scalar step tensors)
    projectors: int  # GaLore's projections (+ Natural GaLore's gradient history)
    buffers: int  # the method's own copies: SaRA's mask, indices, original values; LT-SFT's theta0 and prev
    transient: int  # optimizer.step()'s temporaries at its peak
    numels: list  # numel of each trainable tensor


@dataclass(frozen=True)
class SideNetwork:
    """A network trained beside a frozen 4-bit base, whose activations estimate counts at the side's width."""

    config: object  # the side decoder's ModelConfig (its layers' activations follow LoRA's rules at r = 0)
    per_token_layer: int  # bytes per token each layer adds outside the side block (downsamplers, gates)
    per_token_rest: int  # bytes per token outside the layers beside the base's own (the output gate's inputs)


@dataclass(frozen=True)
class MemoryModel:
    """How `leantune estimate` counts one step of a method that is not LoRA-shaped."""

    trainable_row: str = "adapter parameters"  # the table's label of `TrainedState.trainable`
    buffers_row: str = "method buffers"  # the table's label of `TrainedState.buffers`
    # the trained tensors are whole weight matrices, so a projecting optimizer (GaLore) may train them
    projectable: bool = False
    # (model_cfg, [(name, meta parameter)], dtype bytes, **knobs) -> TrainedState, for a method training tensors
    # of its own under AdamW (SaRA's selected values, QST's side network); None: the base's weights train, with
    # the optimizer estimate is asked for
    trained: Callable[..., TrainedState] | None = None
    # (bytes of the trained weights, device) -> bytes of the method's copies of them (LT-SFT's prev and theta0)
    copies: Callable[[int, str], int] | None = None
    # (model_cfg, dtype bytes, **knobs) -> SideNetwork: the base is loaded 4-bit and a side network trains in fp32
    side: Callable[..., SideNetwork] | None = None
