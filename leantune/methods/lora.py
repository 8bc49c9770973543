"""LoRA (Hu et al. 2021, arXiv:2106.09685) and rsLoRA (Kalajdzievski 2023, arXiv:2312.03732).

`y = base(x) + s * B(A(dropout(x)))` with `A: in -> r` (no bias), `B: r -> out` (bias only with
`lora_bias`), `s = alpha / r` (rsLoRA: `alpha / sqrt(r)`). Init as PEFT's `init_lora_weights=True`:
A kaiming-uniform with a=sqrt(5) (= U(-1/sqrt(in), 1/sqrt(in))), B = 0, so the model starts unchanged;
`"gaussian"`: A ~ N(0, 1/r). Module layout and key names follow peft 0.21.2 `tuners/lora/layer.py`.

A forward takes an optional `adapter_ids` LongTensor of adapter slots, shape (B,) per row or (B, T)
per token (-1 = base only); rows of different adapters get exactly what each adapter alone gives.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..fields import opt
from ..ops.fusable import fused_linear_params, is_plain_linear
from ..ops.lora_linear import lora_linear
from ..precision import native_bf16_cpu
from ..routing import Routing, token_ids
from .base import (
    ACTIVE_ATTR, AdapterLayer, freeze_base, no_dropout, register_adapter,
    replace_module, set_adapter,
)
from .dora import DoraMagnitude
from .lora_experts import expert_targets, wrap_expert_params
from .registry import register_method
from .targets import is_all_linear, parse_targets, pattern_value, resolve_targets

BIAS_MODES = ("none", "all", "lora_only")
# Below this many tokens (decode steps) a routed forward gathers each token's adapter weights; above it,
# rows are grouped per adapter (long prefill chunks share one adapter's matmul).
GATHER_MAX_TOKENS = 128
# ...and with at most this total rank loaded (all adapters' r, summed) it gathers even for 1-2 adapters used
GATHER_SMALL_STACK = 64
# A stack of at least this many adapters multiplies each token by its own adapter only (tokens grouped per
# adapter, two batched rank-r products) instead of by all of them at once (one rank S*r projection and a
# mask), when grouping pads the batch at most 2x. Measured on a CPU (SmolLM2 shapes, r=8, 1 thread, a
# 576->1536 linear): 16 adapters x 1 row 113 vs 249 us, x 4 rows 220 vs 544 us; 8 x 2 rows 78 vs 110 us;
# at 4 adapters the two are even.
SEGMENT_MIN_STACK = 8
INIT_MODES = ("default", "gaussian")


@dataclass
class LoraConfig:
    """LoRA options (PEFT names in brackets where they differ)."""

    r: int = opt(8, "LoRA rank r", flag="--rank")
    alpha: float = opt(16, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with --rslora)", flag="--alpha")  # [lora_alpha]
    dropout: float = opt(0.0, "dropout on the adapter branch", flag="--dropout")  # [lora_dropout]
    # "all-linear", a list of module-name suffixes, or a regex fully matched against full names
    targets: str | list[str] = opt("all-linear", "modules to adapt: all-linear, a comma list of names, or a regex",
                                   flag="--targets", parse=parse_targets)  # [target_modules]
    exclude: str | list[str] | None = opt(None, "[exclude_modules], same two forms", cli=False)
    use_rslora: bool = opt(False, "rank-stabilized LoRA scaling alpha / sqrt(r)", flag="--rslora")
    use_dora: bool = opt(False, "DoRA's magnitude vector (dora.py)", cli=False)
    bias: str = opt("none", 'which base biases train too: "none" | "all" | "lora_only"', cli=False)
    lora_bias: bool = opt(False, "a trainable bias on B", cli=False)
    init: str = opt("default", '[init_lora_weights]: "default" (True) | "gaussian"', cli=False)
    # PEFT's LoRA on stacked MoE expert weights (lora_experts.py), e.g. ["mlp.experts.gate_up_proj",
    # "mlp.experts.down_proj"]; None: every expert weight with all-linear, none otherwise
    target_parameters: list[str] | None = opt(None, "[target_parameters] MoE expert weights to adapt", cli=False)
    rank_pattern: dict = opt({}, "regex key -> r", cli=False)
    alpha_pattern: dict = opt({}, "regex key -> alpha", cli=False)

    def __post_init__(self):
        _check_positive_int("r", self.r)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha must be a number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self.targets = _check_names("targets", self.targets, allow_none=False)
        self.exclude = _check_names("exclude", self.exclude, allow_none=True)
        for name in ("use_rslora", "use_dora", "lora_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoraConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.use_dora and self.lora_bias:
            raise ValueError("LoraConfig.lora_bias=True does not work with use_dora=True (PEFT refuses it too); "
                             "set one of them to False")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init not in INIT_MODES:
            raise ValueError(f"LoraConfig.init must be one of {INIT_MODES}, got {self.init!r}")
        self.rank_pattern = _check_pattern("rank_pattern", self.rank_pattern, int)
        self.alpha_pattern = _check_pattern("alpha_pattern", self.alpha_pattern, (int, float))
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str) or not all(isinstance(t, str) and t for t in self.target_parameters):
                raise ValueError(f"LoraConfig.target_parameters must be a list of parameter names such as "
                                 f"'mlp.experts.gate_up_proj', got {self.target_parameters!r}")
            self.target_parameters = list(self.target_parameters)

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)


@dataclass
class RsLoraConfig(LoraConfig):
    """LoRA with rank-stabilized scaling `alpha / sqrt(r)` on by default."""

    use_rslora: bool = opt(True, "rank-stabilized LoRA scaling alpha / sqrt(r)", flag="--rslora")


@dataclass
class DoraConfig(LoraConfig):
    """LoRA options with DoRA's magnitude vector on (PEFT: `LoraConfig(use_dora=True)`; its arithmetic is
    dora.py, which this module imports)."""

    use_dora: bool = opt(True, "DoRA's magnitude vector", cli=False)


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"LoraConfig.{name} must be an int > 0, got {value!r}")


def _check_names(name: str, value, allow_none: bool, owner: str = "LoraConfig"):
    """targets/exclude as every LoRA-family config takes them; `owner` names the config in the message."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        if not is_all_linear(value):
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"{owner}.{name} {value!r} is not a valid regex: {e}") from None
        return value
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) and v for v in value):
        return sorted(set(value)) if isinstance(value, set) else list(value)
    raise ValueError(
        f"{owner}.{name} must be 'all-linear', a regex string or a non-empty list of module "
        f"name suffixes{' (or None)' if allow_none else ''}, got {value!r}"
    )


def _check_pattern(name: str, value, kind) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"LoraConfig.{name} must be a dict of regex -> value, got {value!r}")
    for key, v in value.items():
        if not isinstance(key, str) or not isinstance(v, kind) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"LoraConfig.{name} entry {key!r}: {v!r} must map a regex to a number > 0")
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"LoraConfig.{name} key {key!r} is not a valid regex: {e}") from None
    return dict(value)


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# ---------------------------------------------------------------------------------------------
# the layer


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, or a layer that declares itself linear (`is_linear_like = True`, e.g. 4-bit)."""
    return isinstance(module, nn.Linear) or bool(getattr(type(module), "is_linear_like", False))


def is_lora_target(module: nn.Module) -> bool:
    """A module LoRA can wrap: a linear-like layer, or a LoraLinear that gets one more adapter."""
    return isinstance(module, LoraLinear) or (is_linear_like(module) and not isinstance(module, AdapterLayer))


def _adapter_placement(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype in (torch.float32, torch.float64):
        return weight.device, weight.dtype
    tensors = list(base.parameters()) + list(base.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    return device, torch.float32  # half-precision or quantized base: adapters in fp32, as PEFT


class LoraLinear(AdapterLayer):
    """A linear layer with any number of LoRA adapters (PEFT's `lora.Linear` layout)."""

    adapter_module_dicts = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")
    # fp32 adapters on a bf16/fp16 input: "activation" runs the fused op with the adapter products in the
    # input's dtype and fp32 gradients (what torch.autocast does with PEFT); "adapter" keeps PEFT's plain
    # fp32 module path (casts x up per layer, no fused op); "auto": activation on CUDA and on a CPU with
    # native bf16 (leantune.precision), adapter elsewhere.
    adapter_math = "auto"

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only (dora.DoraMagnitude)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, slot: int, r: int, alpha: float, cfg: LoraConfig) -> None:
        device, dtype = _adapter_placement(self.base_layer)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=cfg.lora_bias, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = lora_scaling(alpha, r, cfg.use_rslora)
        self.slot_to_name[slot] = name
        self.reset_adapter(name, cfg.init)
        if cfg.use_dora:
            self.lora_magnitude_vector[name] = DoraMagnitude.for_adapter(self, name)

    @torch.no_grad()
    def reset_adapter(self, name: str, init: str = "default") -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        if self.lora_B[name].bias is not None:
            nn.init.zeros_(self.lora_B[name].bias)
        if name in self.lora_magnitude_vector:
            self.lora_magnitude_vector[name].reset(self, name)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(name, None)

    def lora_delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        """What adapter `name` adds to the base output for x; `base_out` (base(x), if at hand) spares DoRA,
        whose change rescales the base output, a second product with W."""
        if name in self.lora_magnitude_vector:
            return self.lora_magnitude_vector[name].delta(self, name, x, base_out)
        lora_a = self.lora_A[name]
        x = x.to(lora_a.weight.dtype)
        return self.lora_B[name](lora_a(self.lora_dropout[name](x))) * self.scaling[name]

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.disabled:
            return self.call_base(x, adapter_ids)
        route = None
        if adapter_ids is not None:
            route = Routing.of(adapter_ids)  # (the base layer still gets adapter_ids as given)
            route.token_ids(x)  # checks the shape against x (once per forward: memoized)
            if route.slots.isdisjoint(self.slot_to_name) and not self.merged_adapters:
                # no row uses an adapter of this layer (base rows beside loaded adapters): ~40 us of
                # Python a linear less than the general path, 5% of a SmolLM2 decode step on a CPU
                return self.call_base(x, adapter_ids)
        params = self.fused_linear_params(x, route)
        if params is not None and params[2] is not None:
            return lora_linear(x, *params)
        if route is not None:
            return self._routed_forward(x, adapter_ids, route)
        result = base_out = self.call_base(x, None)
        dtype = result.dtype
        for name in self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                result = result + self.lora_delta(name, x, base_out)
        return result.to(dtype)

    def fused_linear_params(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None):
        """(W, b, A, B, s) when this layer's forward is `ops.lora_linear(x, W, b, A, B, s)`, else None.

        That holds for a plain float linear base with at most one active unmerged adapter (A = B = None
        with none), no LoRA bias, no dropout in effect and one dtype throughout; with adapter_ids, when
        every row uses the same slot (a training sequence, a batch of one adapter's or the base's rows)
        and nothing is merged, for that slot's adapter."""
        active = self.active_adapters
        if adapter_ids is not None:
            route = Routing.of(adapter_ids)
            if self.merged_adapters or len(route.slots) != 1:
                return None  # rows of several adapters: the routed path
            name = self.slot_to_name.get(next(iter(route.slots)))
            active = () if name is None else (name,)
        base = fused_linear_params(self.base_layer, x)
        if base is None or self.disabled:
            return base
        lora_a, merged = self.lora_A, self.merged_adapters  # called per layer per step: few lookups
        names = [n for n in active if n in lora_a and n not in merged]
        if len(names) != 1:
            return base if not names else None
        name = names[0]
        a, b = lora_a[name], self.lora_B[name]
        if b.bias is not None or not no_dropout(self.lora_dropout[name]) or name in self.lora_magnitude_vector:
            return None  # (DoRA: not a plain low-rank sum)
        if not (is_plain_linear(a) and is_plain_linear(b)):  # e.g. a hook on lora_A
            return None
        if (a.weight.dtype != x.dtype or b.weight.dtype != x.dtype) and not self._adapter_math_in_activation_dtype(x):
            return None
        return base[0], base[1], a.weight, b.weight, self.scaling[name]

    def _adapter_math_in_activation_dtype(self, x: torch.Tensor) -> bool:
        """May fp32 adapters on a half-precision input compute in the input's dtype (autocast's rule)?"""
        if self.adapter_math == "auto":  # where half precision is native: CUDA, a CPU with AVX512_BF16/AMX
            return x.is_cuda or (x.device.type == "cpu" and x.dtype == torch.bfloat16 and native_bf16_cpu())
        return self.adapter_math == "activation"

    def _routed_forward(self, x: torch.Tensor, adapter_ids, route: Routing) -> torch.Tensor:
        if self.merged_adapters:
            raise ValueError(
                f"adapters {self.merged_adapters} are merged into the base weights, so a forward with "
                "adapter_ids would add them to every row; unmerge them first"
            )
        result = self.call_base(x, adapter_ids)
        used = route.used(self.slot_to_name)  # not empty: `forward` sends batches of base rows to the base
        if len(route.slots) == 1:  # every row on one adapter (e.g. a training sequence): no routing
            name = self.slot_to_name[used[0]]
            return (result + self.lora_delta(name, x, result)).to(result.dtype)
        if x.shape[:-1].numel() <= GATHER_MAX_TOKENS and not torch.is_grad_enabled():
            stack = self._stacked()
            # no loop over adapters: worth it for many adapters in the batch, or a small stack (e.g. a
            # fine-tuning job's rows beside base decodes); one or two of a large stack loop instead
            if stack is not None and (len(used) > 2 or stack[0].shape[0] <= GATHER_SMALL_STACK):
                return self._add_gathered(result, x, route, stack)
        return route.add_deltas(result, x, self.slot_to_name, self.lora_delta)

    def _stackable(self, name: str) -> bool:
        """A plain additive adapter: no LoRA bias, no dropout in effect, no magnitude vector (DoRA)."""
        return (self.lora_B[name].bias is None and no_dropout(self.lora_dropout[name])
                and name not in getattr(self, "lora_magnitude_vector", ()))

    def _stacked(self):
        """(A_cat (S*r_max, in), (sB)^T_cat (S*r_max, out), the slots in stack order, r_max), or None when an adapter
        is not a plain additive one (`_stackable`): every adapter padded to the largest rank and
        concatenated, B pre-scaled. Cached until anything it was built from changes: the slots, train/eval
        mode, a scaling, an adapter module or weight object, or a weight's version counter (bumped by every
        in-place write: optimizer steps, copy_ on reload), so training one adapter while serving others
        never reads stale weights. The check runs per linear per decode step, so it reads the modules'
        dicts directly (no nn.Module attribute lookups)."""
        cache = self.__dict__.get("_stack_cache")
        if cache is not None and self._stack_still_valid(cache[0]):
            return cache[1]
        names = sorted(self.slot_to_name.items())
        if not all(self._stackable(n) for _, n in names):
            value = None
        else:
            a0 = self.lora_A[names[0][1]].weight
            S, r_max = len(names), max(self.r[n] for _, n in names)
            A = a0.new_zeros(S, r_max, self.in_features)
            B = a0.new_zeros(S, r_max, self.out_features)  # B^T per adapter: rows are contiguous for gathers
            with torch.no_grad():
                for i, (_, n) in enumerate(names):
                    A[i, : self.r[n]] = self.lora_A[n].weight
                    B[i, : self.r[n]] = self.lora_B[n].weight.T * self.scaling[n]
            value = (A.reshape(S * r_max, -1), B.reshape(S * r_max, -1), tuple(slot for slot, _ in names), r_max)
        self._stack_cache = (self._stack_state(names), value)
        return value

    def _stack_state(self, names) -> tuple:
        mods_a, mods_b = self.lora_A._modules, self.lora_B._modules
        entries = []
        for _, n in names:
            a, b = mods_a[n], mods_b[n]
            wa, wb = a._parameters["weight"], b._parameters["weight"]
            entries.append((n, a, b, wa, wb, wa._version, wb._version, self.scaling[n]))
        return dict(self.slot_to_name), self.training, tuple(entries)

    def _stack_still_valid(self, state: tuple) -> bool:
        slots, training, entries = state
        if training != self.training or slots != self.slot_to_name:
            return False
        mods_a, mods_b, scaling = self.lora_A._modules, self.lora_B._modules, self.scaling
        for n, a, b, wa, wb, va, vb, sc in entries:
            if (mods_a.get(n) is not a or mods_b.get(n) is not b or a._parameters.get("weight") is not wa
                    or b._parameters.get("weight") is not wb or wa._version != va or wb._version != vb
                    or scaling.get(n) != sc):
                return False
        return True

    def _add_gathered(self, result: torch.Tensor, x: torch.Tensor, route: Routing, stack) -> torch.Tensor:
        """result + each token's own adapter's delta, for a batch that mixes many adapters, with no loop
        over adapters (called without autograd: result is updated in place).

        - Many adapters loaded (`SEGMENT_MIN_STACK`): the tokens are grouped per adapter into a padded
          (U, k, in) batch (`Routing.segments`) and take two batched rank-r products with the U adapters used
          (SGMV-like, as Punica / S-LoRA do): each token costs one adapter's work, and no weight is copied
          when every loaded adapter is in the batch.
        - Few: every token goes through all adapters' A at once (a rank S*r projection), a one-hot mask
          (built once per forward, `Routing.one_hot`) keeps its own adapter's r columns, and the
          concatenated B maps back: two dense matmuls."""
        A, B, order, r = stack
        flat_x = x.reshape(-1, x.shape[-1]).to(A.dtype)  # fp32 adapters on a bf16 base: as lora_delta does
        out = result.reshape(-1, result.shape[-1])  # (N, out), a view of result
        S = len(order)
        seg = route.segments(x, order) if S >= SEGMENT_MIN_STACK else None
        if seg is not None and seg.padded <= 2 * seg.tokens:
            A3, B3 = A.view(S, r, -1), B.view(S, r, -1)
            if seg.used is not None:  # only the adapters in the batch
                A3, B3 = A3.index_select(0, seg.used), B3.index_select(0, seg.used)
            src = flat_x if seg.rows is None else flat_x.index_select(0, seg.rows)
            xp = flat_x.new_zeros(seg.padded, flat_x.shape[1]).index_copy_(0, seg.dest, src)
            h = torch.bmm(xp.view(A3.shape[0], -1, xp.shape[1]), A3.transpose(1, 2))  # (U, k, r)
            y = torch.bmm(h, B3).view(seg.padded, -1).index_select(0, seg.dest).to(out.dtype)  # (n, out)
            if seg.rows is None:
                out += y
            else:
                out.index_add_(0, seg.rows, y)
            return result
        h = flat_x @ A.T  # (N, S*r)
        h *= route.one_hot(x, order, r, h.dtype)  # only the token's own adapter's r columns
        out += (h @ B).to(out.dtype)  # (N, out)
        return result

    def delta_weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(s * B @ A, s * b_B or None) in fp32, the change merging `name` makes to W and b."""
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        s = self.scaling[name]
        bias = self.lora_B[name].bias
        return (b @ a) * s, None if bias is None else bias.float() * s

    def merged_tensors(self, name: str, sign: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New (W, b) in the base dtype after adding (sign=1) or removing (-1) `name`; finite-checked."""
        if sign < 0:
            self._check_unmerge_order(name)
        if name in self.lora_magnitude_vector:
            return self.lora_magnitude_vector[name].merged_tensors(self, name, sign)
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise NotImplementedError(
                f"cannot merge into a {type(self.base_layer).__name__} base layer (no floating-point weight)"
            )
        dw, db = self.delta_weight(name)
        new_w = weight.float() + sign * dw.to(weight.device)
        new_b = None
        if db is not None:
            old_b = getattr(self.base_layer, "bias", None)
            if old_b is None:
                raise ValueError(
                    f"adapter {name!r} has a LoRA bias (lora_bias=True) but this base layer has no bias, "
                    "so it cannot be merged (a merged model would need a bias the architecture lacks)"
                )
            new_b = old_b.float() + sign * db.to(old_b.device)
        for what, t in (("weight", new_w), ("bias", new_b)):
            if t is not None and not torch.isfinite(t).all():
                raise ValueError(
                    f"merging adapter {name!r} gives non-finite values in the {what} of this "
                    f"{self.out_features}x{self.in_features} layer; nothing was merged"
                )
        return new_w.to(weight.dtype), new_b

    def _check_unmerge_order(self, name: str) -> None:
        """A DoRA merge rescales W, so subtracting an adapter merged before it (or it, before a later one)
        would not give the old W back: with a DoRA adapter involved, unmerge in reverse merge order."""
        merged = self.merged_adapters
        later = merged[merged.index(name) + 1:] if name in merged else []
        dora = self.lora_magnitude_vector
        if later and (name in dora or any(n in dora for n in later)):
            raise ValueError(
                f"adapter {name!r} was merged before {later}, and a DoRA merge rescales the weight, so it "
                f"cannot be taken out first; unmerge {list(reversed(later))} before it"
            )

    @torch.no_grad()
    def _write_merged(self, new_w: torch.Tensor, new_b: torch.Tensor | None) -> None:
        # in place on the parameters (not .data), so their version counters move and caches keyed on
        # them (DoRA's ||W||^2, the stacked adapters) see the merge
        self.base_layer.weight.copy_(new_w)
        if new_b is not None:
            self.base_layer.bias.copy_(new_b)

    def merge(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is already merged")
        self._write_merged(*self.merged_tensors(name, +1))
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        if name not in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is not merged")
        self._write_merged(*self.merged_tensors(name, -1))
        self.merged_adapters.remove(name)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, r={self.r}, active={self.active_adapters}"


def _token_ids(adapter_ids, x: torch.Tensor) -> torch.Tensor:
    """adapter_ids (a LongTensor or a Routing) as one slot per token: (B,) is broadcast over x's token dims."""
    return token_ids(adapter_ids, x)


# ---------------------------------------------------------------------------------------------
# applying


def apply_lora(model: nn.Module, config: LoraConfig, adapter_name: str) -> nn.Module:
    """Wrap every target of `config` with `LoraLinear` and add adapter `adapter_name` to it; MoE expert weights
    (all-linear, or `target_parameters`) get `LoraExperts` (lora_experts.py)."""
    names = resolve_targets(model, config.targets, config.exclude, is_lora_target)
    experts = expert_targets(model, config.target_parameters, is_all_linear(config.targets))
    if experts and (config.use_dora or config.lora_bias or config.dropout):
        raise ValueError("LoRA on MoE expert weights takes no use_dora, lora_bias or dropout (PEFT refuses them "
                         "there too); set them off, or target attention only (targets='q_proj,k_proj,v_proj,o_proj')")
    slot = register_adapter(model, adapter_name, config)
    active = list(getattr(model, ACTIVE_ATTR, []))
    for (mname, pname), layer in wrap_expert_params(model, experts, active).items():
        name = f"{mname}.{pname}"
        layer.add_adapter(adapter_name, slot, config.rank_for(name), config.alpha_for(name), config.use_rslora,
                          config.init)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            module.active_adapters = list(active)
            replace_module(model, name, module)
        module.add_adapter(adapter_name, slot, config.rank_for(name), config.alpha_for(name), config)
    freeze_base(model)
    set_adapter(model, active or [adapter_name])
    return model


register_method("lora", LoraConfig, apply_lora, lora_shaped=True, cotrained=True,
                help="LoRA (Hu et al. 2021): y = W x + (alpha / r) B A x, B zero at init")
register_method("rslora", RsLoraConfig, apply_lora, lora_shaped=True, cotrained=True,
                help="LoRA with rank-stabilized scaling alpha / sqrt(r) (Kalajdzievski 2023)")
register_method("dora", DoraConfig, apply_lora,
                help="DoRA (Liu et al. 2024): LoRA's direction with a trained magnitude vector; PEFT format")
