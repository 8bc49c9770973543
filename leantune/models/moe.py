"""Sparse Mixture-of-Experts feed-forward: Mixtral (Jiang et al. 2024, arXiv:2401.04088) and Qwen3-MoE.

The decoder block (`llama.Block`) takes `SparseMoeBlock` in place of its MLP where `ModelConfig.is_moe_layer`
says so. Parameter names and layouts equal transformers 5's in-memory ones, so adapters save under PEFT's keys:

    mlp.gate.weight               (E, C)      the router (not a linear module: LoRA's all-linear leaves it frozen)
    mlp.experts.gate_up_proj      (E, 2F, C)  gate rows then up rows, per expert
    mlp.experts.down_proj         (E, C, F)

Checkpoints on the Hub (and transformers 5's `save_pretrained`, which reverts to them) hold one 2-D tensor per
expert: Mixtral `block_sparse_moe.experts.N.w1|w3|w2.weight` (gate|up|down) and `block_sparse_moe.gate.weight`,
Qwen3-MoE `mlp.experts.N.gate_proj|up_proj|down_proj.weight`. `fuse_expert_keys` stacks them at load,
`unfuse_expert_keys` splits them again to save.

Routing as transformers computes it: softmax over the router logits in fp32, top-k, renormalized to sum 1
(always for Mixtral; with `norm_topk_prob` for Qwen3-MoE). Mixtral keeps the top-k weights in fp32, Qwen3-MoE casts
them to the activations' dtype; the experts' outputs are weighted and summed per token.

QLoRA: `Experts.to_4bit` (or 4-bit loading) holds each stack as a `quant.Stacked4bit`, per-expert NF4 codes that the
`loop` path decodes one expert at a time (the grouped op would decode the whole stack, so 4-bit stacks always loop).

Two ways to run the experts, same numbers (tests hold them to each other and to transformers):
- `loop`: one pair of matmuls per expert that got tokens (transformers' way); cheapest when few tokens are routed
  (decode of a small batch), as each expert touched costs one small GEMM and nothing is sorted or padded.
- `grouped`: the (token, expert) assignments are sorted by expert and all experts run in one batched op:
  `torch._grouped_mm` where it applies (no autograd: its CPU backward fails in torch 2.13; row strides a multiple of
  16 bytes), else the sorted rows padded to (E, max count, C) and one `bmm`.
`Experts.path = "auto"` takes `loop` while tokens x top_k <= LOOP_MAX_ASSIGNMENTS, `grouped` above (bench/moe_decode.py),
and `loop` under autograd (training): there the batches are large, so each expert's GEMM is large and the loop's
Python cost is noise, and what it saves for backward does not depend on how evenly the router spreads the tokens
(the padded bmm would pad every expert to the busiest one; `leantune estimate` counts the loop's tensors).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

EXPERT_PATHS = ("auto", "loop", "grouped")
# Measured with bench/moe_decode.py (fp32, 1 thread of an AVX2 EPYC, hidden 512, 8 experts x 1024, top-2, CPU time):
# grouped / loop decode throughput 0.96 at batch 1, 0.98 at 8 (16 assignments), 1.06-1.07 at 16 and 32, 1.03 at 128.
# Decode reads every touched expert's weights once either way, so the paths differ by the loop's per-expert Python
# and small-GEMM overhead only: the loop up to two assignments per expert, the grouped op above.
LOOP_MAX_ASSIGNMENTS = 16


class Router(nn.Module):
    """`gate`: logits = x W^T over the E experts, then top-k of their softmax (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.top_k, self.normalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.fp32_weights = cfg.model_type == "mixtral"  # Mixtral does not cast the top-k weights back

    def forward(self, x: torch.Tensor):
        """x (N, C) -> logits (N, E), weights (N, k), expert ids (N, k)."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, (top if self.fp32_weights else top.to(logits.dtype)), idx


class Experts(nn.Module):
    """E SwiGLU experts as two stacked weights (transformers 5's `...Experts` layout)."""

    path = "auto"  # one of EXPERT_PATHS (class attribute: a benchmark or test may set it per instance)
    stacked_experts = True  # methods.lora_experts wraps this module's 3-D weights (PEFT's target_parameters)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, C, F_ = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F_, C))
        self.down_proj = nn.Parameter(torch.empty(E, C, F_))

    def expert_weights(self) -> dict[str, tuple[torch.Tensor, list]]:
        """{param name: (W (E, out, in), [low-rank terms])}: what each expert multiplies by. An adapter wrapper
        (methods.lora_experts) adds its (A (E, r, in), B (E, out, r), scale, token mask (N,) bool or None) terms."""
        return {"gate_up_proj": (self.gate_up_proj, []), "down_proj": (self.down_proj, [])}

    def run(self, weights: dict, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (N, C), idx (N, k) expert ids, w (N, k) their weights -> (N, C), with `weights` as `expert_weights`."""
        return run_experts(weights, x, idx, w, self.num_experts, self.path)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, slots=None) -> torch.Tensor:  # noqa: ARG002
        """slots: (N,) adapter slot per token (-1 = base) or None; only an adapter wrapper reads them."""
        return self.run(self.expert_weights(), x, idx, w)

    @torch.no_grad()
    def to_4bit(self, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True) -> Experts:
        """QLoRA: these experts with both stacks in 4 bits (`quant.Stacked4bit`), quantized one stack at a time
        (each float stack is freed once quantized if nothing else holds it)."""
        from ..quant import Stacked4bit

        q = Experts.__new__(Experts)
        nn.Module.__init__(q)
        q.num_experts = self.num_experts
        for name in ("gate_up_proj", "down_proj"):
            setattr(q, name, Stacked4bit.from_float(getattr(self, name).detach(), quant_type, blocksize, double_quant))
            delattr(self, name)
        return q

    def to_float(self, dtype: torch.dtype | None = None) -> Experts:
        """4-bit experts -> float experts carrying the dequantized stacks (merge: what the adapter trained against)."""
        f = Experts.__new__(Experts)
        nn.Module.__init__(f)
        f.num_experts = self.num_experts
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(self, name)
            f.register_parameter(name, nn.Parameter(w.dequantized(dtype) if is_packed(w) else w.detach(),
                                                    requires_grad=False))
        return f


def is_packed(W) -> bool:
    """A 4-bit stack (`quant.Stacked4bit`) rather than a float (E, out, in) tensor."""
    return bool(getattr(W, "packed_experts", False))


def run_experts(weights: dict, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, E: int, path: str = "auto"):
    """The experts' weighted sum per token, by `path` (module docstring); `weights` as `Experts.expert_weights`."""
    if path not in EXPERT_PATHS:
        raise ValueError(f"expert path {path!r} is not one of {EXPERT_PATHS}")
    if path == "auto":
        grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for W, ts in weights.values()
                                                                   for t in (W, *[f for term in ts for f in term[:2]])))
        path = "loop" if grad or idx.numel() <= LOOP_MAX_ASSIGNMENTS else "grouped"
    if any(is_packed(W) for W, _ in weights.values()):
        path = "loop"  # 4-bit stacks decode one expert at a time; the grouped op would decode the whole stack
    flat = idx.reshape(-1)  # (N k,) assignment j belongs to token j // k
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert, tokens ascending in each
    counts = torch.bincount(flat, minlength=E)  # (E,)
    tok = order // idx.shape[1]
    xs = x.index_select(0, tok)  # (M, C) the routed rows, expert by expert
    weights = {k: (W, [(A, B, s, None if m is None else m.index_select(0, tok)) for A, B, s, m in ts])
               for k, (W, ts) in weights.items()}  # an adapter's token mask -> its routed rows
    mm = _loop_mm if path == "loop" else _grouped_mm
    gate_up = _expert_linear(mm, xs, weights["gate_up_proj"], counts)  # (M, 2F)
    g, u = gate_up.chunk(2, dim=-1)
    y = _expert_linear(mm, F.silu(g) * u, weights["down_proj"], counts)  # (M, C)
    y = y * w.reshape(-1).index_select(0, order)[:, None]
    return torch.zeros_like(x).index_add_(0, tok, y.to(x.dtype))


def _expert_linear(mm, xs: torch.Tensor, weight_and_terms, counts: torch.Tensor) -> torch.Tensor:
    """Rows xs (M, in), sorted by expert with `counts` per expert, times W_e^T (+ s B_e A_e each term)."""
    W, terms = weight_and_terms
    out = mm(xs, W, counts)
    for A, B, scale, rows in terms:  # LoRA: (x A_e^T) B_e^T s, rows of expert e only; rows: (M,) bool or None (all)
        delta = mm(mm(xs.to(A.dtype), A, counts), B, counts).to(out.dtype) * scale
        out = out + (delta if rows is None else delta * rows[:, None])
    return out


def _loop_mm(xs: torch.Tensor, W: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One matmul per expert that has rows (transformers' loop); W (E, out, in)."""
    parts, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            parts.append(W.expert_linear(xs[start:start + n], e) if is_packed(W) else F.linear(xs[start:start + n], W[e]))
            start += n
    if not parts:
        return xs.new_zeros(0, W.shape[1])
    return torch.cat(parts)


def _grouped_mm(xs: torch.Tensor, W: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """All experts in one batched op; W (E, out, in) -> (M, out)."""
    if _native_grouped_ok(xs, W):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return torch._grouped_mm(xs, W.transpose(1, 2), offs=offs)
    E, M = W.shape[0], xs.shape[0]
    cap = int(counts.max()) if M else 0
    expert = torch.repeat_interleave(torch.arange(E, device=xs.device), counts)  # (M,)
    starts = torch.cumsum(counts, 0) - counts
    slot = expert * cap + torch.arange(M, device=xs.device) - starts[expert]  # row of each in (E cap)
    padded = xs.new_zeros(E * cap, xs.shape[1]).index_copy(0, slot, xs).view(E, cap, -1)
    return torch.bmm(padded, W.transpose(1, 2)).reshape(E * cap, -1).index_select(0, slot)


def _native_grouped_ok(xs: torch.Tensor, W: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or xs.dtype != W.dtype or xs.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and (xs.requires_grad or W.requires_grad):
        return False  # torch 2.13's CPU backward of _grouped_mm fails: the padded bmm has autograd
    align = 16 // xs.element_size()
    return (xs.shape[1] % align == 0 and W.shape[1] % align == 0 and xs.is_contiguous() and W.stride(-1) == 1
            and W.stride(1) % align == 0)


class SparseMoeBlock(nn.Module):
    """Router + experts in place of a dense MLP; `forward(x (B, T, C), adapter_ids, router_logits)`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.jitter = cfg.router_jitter_noise

    def forward(self, x: torch.Tensor, adapter_ids=None, router_logits: list | None = None) -> torch.Tensor:
        B, T, C = x.shape
        if self.training and self.jitter > 0:  # Mixtral's multiplicative jitter on the router's (and experts') input
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        flat = x.reshape(-1, C)
        logits, w, idx = self.gate(flat)
        if router_logits is not None:  # collected for the load-balancing loss
            router_logits.append(logits)
        slots = None
        if adapter_ids is not None:  # per token, so each routed row takes its own adapter's expert LoRA
            from ..routing import token_ids

            slots = token_ids(adapter_ids, x).reshape(-1)  # (N,)
        return self.experts(flat, idx, w, slots).view(B, T, C)


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eqs. 4-6) as transformers' `load_balancing_loss_func`:
    E * sum_e (fraction of top-k assignments to e) * (mean router probability of e), over all layers' tokens;
    `valid` (N,) bool keeps padding out, as transformers' attention_mask does."""
    probs = torch.cat([torch.softmax(g.float(), dim=-1) for g in router_logits])  # (L N, E)
    chosen = torch.topk(probs, top_k, dim=-1).indices  # (L N, k)
    hits = F.one_hot(chosen, num_experts).sum(1).float()  # (L N, E)
    if valid is not None:
        m = valid.reshape(-1).float().repeat(len(router_logits))[:, None]
        hits, probs, rows = hits * m, probs * m, m.sum()
    else:
        rows = probs.shape[0]
    return num_experts * torch.sum((hits.sum(0) / rows) * (probs.sum(0) / rows))


# ---------------------------------------------------------------------------------------------
# checkpoint layouts

_HUB_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
              "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def fuse_expert_keys(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Per-expert Hub tensors -> the stacked in-memory ones (tensors already stacked pass through)."""
    if not cfg.num_experts:
        return sd
    block, (g, u, d) = _HUB_NAMES[cfg.model_type]
    out = {}
    for k, v in sd.items():  # Mixtral's router and any other key under block_sparse_moe move to mlp
        out[k.replace(f".{block}.", ".mlp.") if ".experts." not in k else k] = v
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}.{block}.experts."
        if f"{pre}0.{g}.weight" not in sd:
            continue
        def take(name, e, pre=pre):
            return out.pop(f"{pre}{e}.{name}.weight")
        E = cfg.num_experts
        try:
            gu = torch.stack([torch.cat([take(g, e), take(u, e)]) for e in range(E)])  # (E, 2F, C)
            dn = torch.stack([take(d, e) for e in range(E)])  # (E, C, F)
        except KeyError as e:
            raise ValueError(f"layer {i}: expert tensor {e.args[0]} is missing; the config has {E} experts") from None
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = gu
        out[f"model.layers.{i}.mlp.experts.down_proj"] = dn
    return out


def unfuse_expert_keys(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The stacked in-memory tensors -> the per-expert Hub layout (what transformers 5 also saves)."""
    if not cfg.num_experts:
        return sd
    block, (g, u, d) = _HUB_NAMES[cfg.model_type]
    out = {}
    for k, v in sd.items():
        if k.endswith(".mlp.experts.gate_up_proj"):
            pre = k[: -len("mlp.experts.gate_up_proj")] + f"{block}.experts."
            gate, up = v.chunk(2, dim=1)  # (E, F, C) each
            for e in range(v.shape[0]):  # clones: safetensors refuses tensors that share storage
                out[f"{pre}{e}.{g}.weight"], out[f"{pre}{e}.{u}.weight"] = gate[e].clone(), up[e].clone()
        elif k.endswith(".mlp.experts.down_proj"):
            pre = k[: -len("mlp.experts.down_proj")] + f"{block}.experts."
            for e in range(v.shape[0]):
                out[f"{pre}{e}.{d}.weight"] = v[e].clone()
        elif k.endswith(".mlp.gate.weight"):
            out[k.replace(".mlp.", f".{block}.")] = v
        else:
            out[k] = v
    return out


class StackedExpertSource:
    """A tensor source (`keys()`, `take(key)`) holding per-expert Hub tensors, seen under the stacked in-memory names:
    `take` of a stack reads that layer's expert tensors only (4-bit loading quantizes it before the next layer is
    read); the layer's other stack, made from the same read, is kept until it is taken."""

    def __init__(self, source, cfg: ModelConfig):
        self.source, self.cfg = source, cfg
        block, _ = _HUB_NAMES[cfg.model_type]
        self.parts: dict[str, list[str]] = {}  # in-memory name -> source keys it is made of
        for k in source.keys():  # noqa: SIM118 - a source, not a dict
            head, sep, _ = k.partition(f".{block}.experts.")
            if sep:  # either stack of a layer is made from all of its expert tensors (fuse_expert_keys)
                for stack in ("gate_up_proj", "down_proj"):
                    self.parts.setdefault(f"{head}.mlp.experts.{stack}", []).append(k)
            else:  # Mixtral's router (block_sparse_moe.gate) moves under mlp, as fuse_expert_keys does
                self.parts[k.replace(f".{block}.", ".mlp.")] = [k]
        self.pending: dict[str, torch.Tensor] = {}

    def keys(self) -> list[str]:
        return list(self.parts)

    def take(self, key: str) -> torch.Tensor:
        if key in self.pending:
            return self.pending.pop(key)
        out = fuse_expert_keys({k: self.source.take(k) for k in self.parts[key]}, self.cfg)
        if ".mlp.experts." in key:  # (a source that holds the stacks already, as GGUF does, reads one at a time)
            sibling = key.replace("gate_up_proj", "down_proj") if key.endswith("gate_up_proj") else \
                key.replace("down_proj", "gate_up_proj")
            if sibling in out:
                self.pending[sibling] = out[sibling]
        return out[key]
