"""LoRA on stacked MoE expert weights, in PEFT 0.21.2's layout (`LoraConfig(target_parameters=[...])`,
`tuners/lora/layer.py: ParamWrapper`), so adapters cross to PEFT on transformers 5's Mixtral / Qwen3-MoE.

transformers 5 holds the experts as 3-D parameters (`mlp.experts.gate_up_proj` (E, 2F, C), `down_proj` (E, C, F));
PEFT adapts them with one wrapper per parameter, nested in the model's parameter order (gate_up_proj innermost):

    mlp.experts                      LoraExperts(parameter "down_proj")
    mlp.experts.base_layer           LoraExperts(parameter "gate_up_proj")
    mlp.experts.base_layer.base_layer   the experts module

Each wrapper holds per adapter `lora_A` = Linear(in, r E) and `lora_B` = Linear(r E, out) (no bias, no dropout,
no DoRA: PEFT refuses those here too). Expert e's update is s B_e A_e with A_e = lora_A.weight.view(E, r, in)[e]
and B_e = lora_B.weight.view(out, r, E)[:, :, e] (A is expert-major, B expert-minor, as PEFT reshapes them); one
A_e is shared by the gate and up halves of gate_up_proj, as in PEFT. Saved keys: `...mlp.experts.base_layer.lora_A.weight`
(gate_up_proj) and `...mlp.experts.lora_A.weight` (down_proj), `target_parameters` in adapter_config.json.

The experts module is anything declaring `stacked_experts = True` with `expert_weights()` and `run(weights, x, idx,
w)` (leantune.models.moe.Experts); this file does not import the models.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import AdapterLayer

EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # PEFT nests the wrappers in this (the parameters') order


def is_experts(module: nn.Module) -> bool:
    return bool(getattr(type(module), "stacked_experts", False)) or isinstance(module, LoraExperts)


def experts_core(module: nn.Module) -> nn.Module:
    while isinstance(module, LoraExperts):
        module = module.base_layer
    return module


class LoraExperts(AdapterLayer):
    """LoRA adapters on one stacked expert parameter (`parameter_name`) of an experts module."""

    adapter_module_dicts = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, parameter_name: str):
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        E, out, n_in = self.param().shape  # (E, out, in), as transformers 5 stores both
        self.num_experts, self.in_features, self.out_features = E, n_in, out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # never filled (no DoRA on experts); adapter_io reads it
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}

    def param(self) -> torch.Tensor:
        return getattr(experts_core(self.base_layer), self.parameter_name)

    @property
    def weight(self) -> torch.Tensor:  # (AdapterLayer's default names base_layer.weight, which experts lack)
        return self.param()

    @property
    def bias(self):
        return None

    def add_adapter(self, name: str, slot: int, r: int, alpha: float, use_rslora: bool, init: str) -> None:
        p = self.param()
        dtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A[name] = nn.Linear(self.in_features, r * self.num_experts, bias=False, device=p.device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r * self.num_experts, self.out_features, bias=False, device=p.device, dtype=dtype)
        self.r[name] = r
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.slot_to_name[slot] = name
        with torch.no_grad():  # PEFT's init on the whole (r E, in) matrix; B = 0, so the model starts unchanged
            if init == "gaussian":
                nn.init.normal_(self.lora_A[name].weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.r.pop(name, None)
        self.scaling.pop(name, None)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A (E, r, in), B (E, out, r), s) of adapter `name`."""
        E, r = self.num_experts, self.r[name]
        A = self.lora_A[name].weight.view(E, r, self.in_features)
        B = self.lora_B[name].weight.view(self.out_features, r, E).permute(2, 0, 1).contiguous()  # small
        return A, B, self.scaling[name]

    def _uses(self, slots: torch.Tensor | None) -> list[tuple[str, torch.Tensor | None]]:
        """(adapter, token mask or None for every token) of the adapters this forward applies: the active ones
        without slots; with slots (N,), each adapter on the tokens of its slot (a mixed serving batch)."""
        if self.disabled:
            return []
        if slots is None:
            used = [(n, None) for n in self.active_adapters]
        else:
            if self.merged_adapters:
                raise ValueError(f"adapters {self.merged_adapters} are merged into the experts, so a forward with "
                                 "adapter_ids would add them to every row; unmerge them first")
            present = set(slots.unique().tolist())
            used = [(n, None if len(present) == 1 else slots == s) for s, n in self.slot_to_name.items() if s in present]
        return [(n, m) for n, m in used if n in self.lora_A and n not in self.merged_adapters]

    def expert_weights(self, slots=None) -> dict:
        base = self.base_layer
        weights = base.expert_weights(slots) if isinstance(base, LoraExperts) else base.expert_weights()
        W, terms = weights[self.parameter_name]
        weights[self.parameter_name] = (W, terms + [(*self.factors(n), m) for n, m in self._uses(slots)])
        return weights

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, slots=None) -> torch.Tensor:
        """x (N, C), idx/w (N, k) from the router, slots (N,) adapter slot per token (-1 = base) or None."""
        return experts_core(self).run(self.expert_weights(slots), x, idx, w)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B, s = self.factors(name)
        return torch.bmm(B.float(), A.float()) * s  # (E, out, in)

    def merged_tensors(self, name: str, sign: int) -> tuple[torch.Tensor, None]:
        p = self.param()
        if not isinstance(p, torch.Tensor):  # a 4-bit stack (QLoRA): W + dW would be re-rounded to 4 bits
            raise ValueError(f"{self.parameter_name} is stored in 4 bits; merge_and_unload merges onto its "
                             "dequantized float stack instead")
        new = p.float() + sign * self.delta_weight(name).to(p.device)
        if not torch.isfinite(new).all():
            raise ValueError(f"merging adapter {name!r} gives non-finite values in {self.parameter_name}; nothing was merged")
        return new.to(p.dtype), None

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is already merged")
        self.param().copy_(self.merged_tensors(name, +1)[0])
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is not merged")
        self.param().copy_(self.merged_tensors(name, -1)[0])
        self.merged_adapters.remove(name)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, adapters={self.adapter_names}, r={self.r}"


def expert_targets(model: nn.Module, target_parameters, all_linear: bool) -> list[tuple[str, str]]:
    """(experts module name, parameter) pairs to wrap, in model and PEFT nesting order. target_parameters: PEFT's
    list of `<module>.<parameter>` suffixes (e.g. "mlp.experts.gate_up_proj"); None with all-linear: every expert
    parameter (the router is a separate module and never a target)."""
    pairs = []
    entries = list(target_parameters or [])
    odd = [e for e in entries if e.rpartition(".")[2] not in EXPERT_PARAMS]
    if odd:  # e.g. PEFT's all-linear on a transformers-5 MoE also adapts the router's "gate.weight"
        raise ValueError(f"target_parameters {odd} are not stacked expert weights; leantune adapts {EXPERT_PARAMS} "
                         "of MoE experts only (LoRA on the router is not supported: it stays frozen)")
    for mname, module in model.named_modules():
        if not is_experts(module) or ".base_layer" in mname:  # (a wrapped one: its outermost wrapper)
            continue
        for p in EXPERT_PARAMS:
            full = f"{mname}.{p}"
            if (all_linear and not entries) or any(full == e or full.endswith("." + e) for e in entries):
                pairs.append((mname, p))
    if entries and not pairs:
        raise ValueError(f"target_parameters {entries} match no stacked expert parameter of this model "
                         f"(they are named like 'mlp.experts.gate_up_proj', 'mlp.experts.down_proj')")
    return pairs


def wrap_expert_params(model: nn.Module, pairs: list[tuple[str, str]], active: list[str]) -> dict[tuple, LoraExperts]:
    """Wrap each (module, parameter) once (existing wrappers are reused); returns the wrapper of each pair."""
    from .base import replace_module

    out = {}
    for mname, pname in pairs:
        module = model.get_submodule(mname)
        layer = _find_wrapper(module, pname)
        if layer is None:
            layer = LoraExperts(module, pname)
            layer.active_adapters = list(active)
            replace_module(model, mname, layer)
        out[(mname, pname)] = layer
    return out


def _find_wrapper(module: nn.Module, pname: str) -> LoraExperts | None:
    while isinstance(module, LoraExperts):
        if module.parameter_name == pname:
            return module
        module = module.base_layer
    return None


def wrapper_key(model: nn.Module, mname: str, pname: str) -> str:
    """The module path of the wrapper of (mname, pname) as PEFT names it (`.base_layer` per wrapper outside it)."""
    path, module = mname, model.get_submodule(mname)
    while isinstance(module, LoraExperts) and module.parameter_name != pname:
        path, module = path + ".base_layer", module.base_layer
    return path


def saved_target_parameters(model: nn.Module, adapter_name: str) -> list[str] | None:
    """PEFT's `target_parameters` for adapter `adapter_name`: `<suffix>.<parameter>` in nesting order, or None."""
    found = []
    for mname, module in model.named_modules():
        if isinstance(module, LoraExperts) and module.has_adapter(adapter_name):
            suffix = mname.split(".base_layer")[0].split(".")[-2:]  # e.g. ["mlp", "experts"]
            entry = ".".join(suffix + [module.parameter_name])
            if entry not in found:
                found.append(entry)
    order = {p: i for i, p in enumerate(EXPERT_PARAMS)}
    return sorted(found, key=lambda e: order[e.rpartition(".")[2]]) or None
