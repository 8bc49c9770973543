"""The Llama family in one file: Llama 2/3 (incl. llama3 RoPE scaling), Mistral, Qwen2 (qkv bias), Qwen3 (q/k
norm), SmolLM2, Phi-3/3.5/Phi-4-mini (fused qkv_proj and gate_up_proj, longrope RoPE, partial rotary dims), and
Gemma 2/3 text (Gemma Team 2024, 2025) as config flags on the same skeleton; Mixtral and Qwen3-MoE take their
sparse MoE feed-forward from moe.py.

Module and parameter names equal Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so
checkpoints load without renaming and adapters save under PEFT's keys. RMSNorm, rotate-half RoPE, GQA
and SwiGLU are computed the way `transformers` computes them, which is what the parity tests hold us to.
Gemma's variants each live in one place: the (1 + w) norm in `RMSNorm`, GeGLU in `MLP`, the score path
(query_pre_attn_scalar, tanh soft-capping) in `attention`, the sandwich norms in `Block`, the embedding
scale in `embed`, the capped logits in `head_module`, the per-layer windows and RoPE bases in
`layer_context` / `layer_forward`.

Every forward takes explicit metadata (`ForwardMeta`): RoPE positions, packed-sample segment ids,
per-sequence lengths, per-row/per-token adapter slots and a KV cache. Nothing is kept in module globals,
so one model tree can serve a mixed batch and train in the same process.

The model shows its stages (DESIGN.md): `embed`, `layer_context` (what every layer of one forward shares:
the position encoding and the attention mask), `layer_forward(i, ...)` for i < `num_layers`, `final_norm`
and `head` (with `head_module`, the module a fused loss takes the head's weight from). `hidden` and
`forward` are written in them, and the serving runner and co-trainer run them in the same order, so a
family with another skeleton (Gemma's scaled embedding and soft-capped logits, per-layer windows) changes
these methods, not `serve/`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels import fused as kfused
from ..kernels import use_triton
from ..ops.fusable import fused_linear_params
from ..ops.swiglu import swiglu_linear
from .config import ModelConfig
from .kv_cache import KVCache
from .moe import SparseMoeBlock, fuse_expert_keys

if TYPE_CHECKING:
    from ..routing import Routing


class Linear(nn.Linear):
    """nn.Linear whose forward accepts (and ignores) adapter slots; adapter wrappers use them."""

    accepts_adapter_ids = True
    plain_linear = True  # forward is exactly F.linear(x, weight, bias): fused ops may stand in for it

    def forward(self, x, adapter_ids=None):  # noqa: ARG002 - same signature as adapter layers
        return F.linear(x, self.weight, self.bias)


@dataclass
class ForwardMeta:
    positions: torch.Tensor | None = None  # (B, T) RoPE positions; default 0..T-1 (after the cache)
    segment_ids: torch.Tensor | None = None  # (B, T) packed samples: attend only within equal ids
    seq_lens: torch.Tensor | None = None  # (B,) valid (right-padded) lengths; keys past them are masked
    # (B,) or (B, T) adapter slots, -1 = base model; or a leantune.routing.Routing of them (built once per step)
    adapter_ids: torch.Tensor | Routing | None = None
    cache: KVCache | None = None  # or a paged cache (`paged = True`) that attends itself
    router_logits: list | None = None  # a list: MoE layers append their (N, E) router logits (aux loss)


@dataclass
class LayerContext:
    """What every layer of one forward shares, made once by `layer_context`; callers pass it on unopened."""

    # RoPE at each token's position, (B, T, D) cos and sin, keyed by "local" / "global" (Gemma 3's sliding
    # layers have their own base)
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    # (B or 1, 1, T, S) True = attend, keyed by the layer's window; None: plain causal, or a paged cache attends
    masks: dict[int | None, torch.Tensor | None]
    meta: ForwardMeta


@dataclass(frozen=True)
class ScoreSpec:
    """How one layer turns q.k into attention weights; a paged cache is handed it with q/k/v."""

    scale: float  # multiplies q.k
    softcap: float | None = None  # Gemma 2: scores -> softcap * tanh(scores / softcap), before the mask
    window: int | None = None  # attend to the last `window` positions only (incl. the query's own)


def attention(q, k, v, spec: ScoreSpec, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, Hkv, S, D); mask (B or 1, 1, T, S) bool, True = attend, or None with `causal`
    (S == T) or nothing masked -> (B, H, T, D). The window is the caller's mask's job."""
    gqa = q.shape[1] != k.shape[1]
    if spec.softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              scale=spec.scale, enable_gqa=gqa)
    # SDPA has no soft-capping: the math path, as transformers' eager Gemma 2 (softmax in fp32)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, H, S, D)
    s = (q @ k.transpose(-1, -2)) * spec.scale  # (B, H, T, S)
    s = spec.softcap * torch.tanh(s / spec.softcap)
    if mask is None and causal:
        T, S = s.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=s.device).tril(S - T)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))  # every row keeps at least its own key (see build_mask)
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class RMSNorm(nn.Module):
    """RMSNorm; `unit_offset` (Gemma) scales by (1 + w) with w stored zero-centred, and multiplies in fp32
    before casting back, where Llama casts back before the weight (both as transformers does)."""

    kernel_backend = "auto"  # leantune.kernels.BACKENDS: the Triton kernel on CUDA

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x):
        # The Triton kernel rounds as Llama does (cast, then weight); Gemma's norm stays on this path.
        if not self.unit_offset and use_triton(self.kernel_backend, x):
            return kfused.rms_norm(x, self.weight, self.eps)  # one pass each way, same math
        # Normalize in fp32 (parity in bf16 too).
        dt = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.weight.float())).to(dt)
        return self.weight * xf.to(dt)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> RMSNorm:
    return RMSNorm(dim or cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset)


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """Inverse frequencies (rotary_dim/2,), with linear or llama3 scaling applied; for longrope (2, rotary_dim/2):
    the short factors' row, then the long factors' (see `longrope_choice`); local: Gemma 3's sliding layers'
    base, unscaled."""
    d = cfg.rotary_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    base = theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    inv = 1.0 / base
    sc = {} if local else (cfg.rope_scaling or {})
    kind = sc.get("rope_type", "default")
    if kind == "longrope":  # Phi-3.5 / Phi-4-mini: each frequency slowed by its own factor (rounded as transformers)
        return torch.stack([1.0 / (torch.tensor(sc[k], dtype=torch.float32) * base) for k in ("short_factor", "long_factor")])
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_len = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_attention_scale(cfg: ModelConfig) -> float:
    """What longrope multiplies cos and sin by (so q.k by its square): sqrt(1 + ln(s) / ln(L0)) for the context
    extension s = max_position_embeddings / L0 unless the config states `factor` or `attention_factor`."""
    sc = cfg.rope_scaling or {}
    if sc.get("rope_type") != "longrope":
        return 1.0
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])
    old = sc["original_max_position_embeddings"]
    factor = sc.get("factor") or cfg.max_position_embeddings / old
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))


def longrope_choice(cfg: ModelConfig, positions: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, T): 0 where a token keeps the short factors, 1 where it takes the long ones. As transformers: the long
    ones for a sequence longer than original_max_position_embeddings, i.e. whose last position reaches it. It
    decides once per forward; here per row, and per sample of a packed row, so each gets what it gets alone."""
    last = positions.amax(-1, keepdim=True).expand_as(positions)  # (B, T): each token's sequence's last position
    if segment_ids is not None:  # positions restart per sample: the last of each token's own sample
        per_seg = positions.new_full((positions.shape[0], int(segment_ids.max()) + 1), -1)
        last = per_seg.scatter_reduce(1, segment_ids, positions, "amax").gather(1, segment_ids)
    return (last + 1 > cfg.rope_scaling["original_max_position_embeddings"]).long()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    # inv_freq (R/2,), or (B, T, R/2) per token; positions (B, T)
    freqs = positions[..., None].float() * inv_freq  # (B, T, R/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, R)
    if scale != 1.0:  # longrope's attention factor, in fp32 before the cast as transformers does it
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    # x: (B, H, T, D); cos/sin: (B, T, D). Rotate-half layout (HF), not interleaved pairs.
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def apply_partial_rope(rope, x, cos, sin):
    """RoPE on the first R = cos.shape[-1] dims of each head, the other D - R passed through (Phi-4-mini)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return rope(x, cos, sin)
    # joined along D in x's (B, T, H, D) memory order, as the full rotation leaves it: SDPA's output then keeps
    # that order too and o_proj's input stays a view of it, not a copy that LoRA would save again
    parts = (rope(x[..., :r], cos, sin).transpose(1, 2), x[..., r:].transpose(1, 2))
    return torch.cat(parts, dim=-1).transpose(1, 2)  # (B, H, T, D)


class Attention(nn.Module):
    kernel_backend = "auto"  # RoPE: the Triton kernel on CUDA (leantune.kernels.BACKENDS)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        if cfg.fused_qkv:  # Phi-3: one linear, output rows q (H*D), k (Hkv*D), v (Hkv*D), as the checkpoint stores it
            self.qkv_proj = Linear(cfg.hidden_size, (nh + 2 * nkv) * hd, bias=cfg.qkv_bias)
        else:
            self.q_proj = Linear(cfg.hidden_size, nh * hd, bias=cfg.qkv_bias)
            self.k_proj = Linear(cfg.hidden_size, nkv * hd, bias=cfg.qkv_bias)
            self.v_proj = Linear(cfg.hidden_size, nkv * hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(nh * hd, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3, Gemma 3: each head of q and k RMS-normalized (weights over D) before RoPE
            self.q_norm = make_norm(cfg, hd)
            self.k_norm = make_norm(cfg, hd)
        self.score = ScoreSpec(cfg.attn_scale, cfg.attn_logit_softcapping, cfg.layer_window(layer_idx))

    def project(self, x, a):
        """x (B, T, C) -> q (B, T, H*D), k, v (B, T, Hkv*D)."""
        if self.cfg.fused_qkv:
            kv = self.cfg.num_kv_heads * self.cfg.head_dim
            return self.qkv_proj(x, a).split((self.cfg.num_heads * self.cfg.head_dim, kv, kv), dim=-1)
        return self.q_proj(x, a), self.k_proj(x, a), self.v_proj(x, a)

    def forward(self, x, cos, sin, mask, meta: ForwardMeta):
        B, T, _ = x.shape
        hd, a = self.cfg.head_dim, meta.adapter_ids
        q, k, v = self.project(x, a)
        q, k = q.view(B, T, -1, hd), k.view(B, T, -1, hd)  # (B, T, H, D), (B, T, Hkv, D)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        v = v.view(B, T, -1, hd).transpose(1, 2)
        rope = kfused.apply_rope if use_triton(self.kernel_backend, q) else apply_rope
        q, k = apply_partial_rope(rope, q, cos, sin), apply_partial_rope(rope, k, cos, sin)
        if getattr(meta.cache, "paged", False):
            # The serving engine's paged cache packs many sequences into one row and attends per
            # sequence itself (leantune.serve.paged_cache).
            y = meta.cache.attend(self.layer_idx, q, k, v, self.score)  # (1, H, N, D)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1), a)
        if meta.cache is not None:
            k, v = meta.cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D), S = cached + T
        y = attention(q, k, v, self.score, mask, causal=T > 1)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1), a)


# The gate activations of the gated MLP (HF's hidden_act names): SwiGLU, Gemma's GeGLU (tanh approximation)
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"), "gelu": F.gelu}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.fused = cfg.fused_gate_up
        if self.fused:  # Phi-3: one linear whose output rows are gate (F), then up (F)
            self.gate_up_proj = Linear(h, 2 * f, bias=b)
        else:
            self.gate_proj, self.up_proj = Linear(h, f, bias=b), Linear(h, f, bias=b)
        self.down_proj = Linear(f, h, bias=b)
        self.act_name = cfg.hidden_act

    def forward(self, x, adapter_ids=None):
        if self.fused:
            gate, up = self.gate_up_proj(x, adapter_ids).chunk(2, dim=-1)  # (B, T, F) views of (B, T, 2F)
        else:
            gate, up = self.gate_proj(x, adapter_ids), self.up_proj(x, adapter_ids)
        if self.act_name != "silu":  # the fused op is SwiGLU's
            return self.down_proj(ACTIVATIONS[self.act_name](gate) * up, adapter_ids)
        params = fused_linear_params(self.down_proj, gate, adapter_ids)
        if params is None:  # e.g. a mixed-adapter batch: the modules' own path
            return self.down_proj(F.silu(gate) * up, adapter_ids)
        return swiglu_linear(gate, up, *params)  # same math, keeps 2 of the 4 (B, T, F) tensors


class Block(nn.Module):
    """Pre-norm block. With `sandwich_norms` (Gemma) attention and MLP outputs are normed too before the
    residual add; HF then names the MLP's input norm pre_feedforward_layernorm and uses
    post_attention_layernorm on the attention output."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg)
        self.moe = cfg.is_moe_layer(layer_idx)
        self.mlp = SparseMoeBlock(cfg) if self.moe else MLP(cfg)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = make_norm(cfg)
            self.post_feedforward_layernorm = make_norm(cfg)

    def forward(self, x, cos, sin, mask, meta: ForwardMeta):
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, meta))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), meta.adapter_ids))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, meta)
        if self.moe:
            return x + self.mlp(self.post_attention_layernorm(x), meta.adapter_ids, meta.router_logits)
        return x + self.mlp(self.post_attention_layernorm(x), meta.adapter_ids)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg)


class SoftCappedHead(nn.Module):
    """The LM head followed by logit soft-capping (Gemma 2): cap * tanh(logits / cap). Made on each
    `head_module` call around the model's current lm_head (an adapter may have replaced it), and not
    registered, so the head's parameters keep their one name."""

    def __init__(self, head: nn.Module, cap: float):
        super().__init__()
        object.__setattr__(self, "inner", head)  # not a submodule: no second state-dict entry
        self.cap = cap

    @property
    def weight(self) -> torch.Tensor:  # where callers look for the head's device and dtype
        return self.inner.weight

    def forward(self, h, adapter_ids=None):
        logits = self.inner(h) if adapter_ids is None else self.inner(h, adapter_ids)
        return self.cap * torch.tanh(logits / self.cap)


def build_mask(meta: ForwardMeta, T: int, past: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean attention mask (B or 1, 1, T, past+T), True = attend; None when plain causal suffices."""
    needs = meta.segment_ids is not None or meta.seq_lens is not None or window is not None
    if meta.cache is not None:
        needs = needs or past > 0 or meta.cache.has_key_mask
    if not needs:
        return None
    S = past + T
    qi = torch.arange(past, S, device=device)[:, None]
    ki = torch.arange(S, device=device)[None, :]
    m = (ki <= qi)[None, None]  # (1, 1, T, S) causal
    if window is not None:
        m = m & (qi - ki < window)[None, None]
    if meta.segment_ids is not None:
        if past:
            raise ValueError("segment_ids (packed samples) cannot be combined with a KV cache")
        s = meta.segment_ids
        m = m & (s[:, None, :, None] == s[:, None, None, :])
    if meta.seq_lens is not None:
        m = m & (ki[None] < (past + meta.seq_lens.to(device))[:, None, None])[:, None]
    if meta.cache is not None and meta.cache.has_key_mask:
        m = m & meta.cache.key_mask(S)[:, None, None, :]
    # A query whose every key is masked (a pad row) would give NaN in SDPA; let it see itself.
    m = m | (ki == qi)[None, None]
    return m


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM. `forward(input_ids, meta) -> logits (B, T, V)`; `hidden(...)` -> (B, T, C)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        if cfg.rope_local_theta is not None:  # Gemma 3's sliding layers
            self.register_buffer("inv_freq_local", rope_inv_freq(cfg, local=True), persistent=False)
        self.rope_scale = rope_attention_scale(cfg)
        self.gradient_checkpointing = False

    def reset_rope(self, device=None) -> None:
        """(Re)compute the RoPE buffers in fp32 on `device` (default: where they are), after `to_empty`,
        a load onto the meta device or a cast."""
        device = device if device is not None else self.inv_freq.device
        self.inv_freq = rope_inv_freq(self.config).to(device)
        if self.config.rope_local_theta is not None:
            self.inv_freq_local = rope_inv_freq(self.config, local=True).to(device)

    def _apply(self, fn, recurse=True):
        # RoPE's inverse frequencies stay fp32 whatever the weights are cast to (transformers loads a bf16
        # model so too): rounded to bf16 they are off by 2^-9, i.e. by radians at position 2000.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.reset_rope()
        return self

    # -- stages: the one skeleton of a forward (see the module docstring) ----------------------------
    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # (B, T) -> (B, T, C)
        if self.config.embed_scale:  # Gemma: sqrt(C), rounded to the weights' dtype as transformers does
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        return x

    def layer_context(self, x: torch.Tensor, meta: ForwardMeta) -> LayerContext:
        """The position encoding and attention mask of this forward; x: the embedded tokens (B, T, C)."""
        B, T, _ = x.shape
        past = meta.cache.length if meta.cache is not None else 0
        pos = meta.positions
        if pos is None:
            pos = torch.arange(past, past + T, device=x.device).expand(B, T)
        rope = {"global": rope_cos_sin(self.rope_freqs(pos, meta), pos, x.dtype, self.rope_scale)}
        if self.config.rope_local_theta is not None:
            rope["local"] = rope_cos_sin(self.inv_freq_local, pos, x.dtype)
        windows = {self.config.layer_window(i) for i in range(self.num_layers)}
        if getattr(meta.cache, "paged", False):
            return LayerContext(rope, dict.fromkeys(windows), meta)  # the paged cache masks per sequence itself
        return LayerContext(rope, {w: build_mask(meta, T, past, w, x.device) for w in windows}, meta)

    @property
    def rope_switch_len(self) -> int | None:
        """longrope: the sequence length past which every position of a sequence is turned by the long factors,
        so the keys a KV cache holds from before it are stale and the sequence is prefilled again (as transformers'
        generate does); None for the other RoPE types."""
        sc = self.config.rope_scaling or {}
        return sc["original_max_position_embeddings"] if sc.get("rope_type") == "longrope" else None

    def rope_freqs(self, pos: torch.Tensor, meta: ForwardMeta) -> torch.Tensor:
        """inv_freq (R/2,), or (B, T, R/2) with each token's longrope factors (`longrope_choice`)."""
        if self.rope_switch_len is None:
            return self.inv_freq
        if getattr(meta.cache, "paged", False) and int(pos.max()) >= self.rope_switch_len:
            # a packed row mixes sequences, and one that grew past the switch would need its cached keys
            # re-turned with the long factors: the paged engine does not recompute them, so it stops here
            raise ValueError(f"longrope RoPE: the paged engine serves sequences up to original_max_position_embeddings "
                             f"= {self.rope_switch_len} tokens (past it every cached key would need the long factors); "
                             f"use max_model_len <= {self.rope_switch_len}, or leantune generate")
        return self.inv_freq[longrope_choice(self.config, pos, meta.segment_ids)]  # (B, T, R/2)

    def layer_module(self, i: int) -> nn.Module:
        """Decoder layer i as a module (its parameters, hooks); run it with `layer_forward`."""
        return self.model.layers[i]

    def layer_forward(self, i: int, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        cos, sin = ctx.rope["local" if self.config.layer_rope_local(i) else "global"]
        mask = ctx.masks[self.config.layer_window(i)]
        return self.model.layers[i](x, cos, sin, mask, ctx.meta)  # (B, T, C) -> (B, T, C)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.norm(h)  # (..., C)

    def head_module(self) -> nn.Module:
        """The module `head` runs, whole: its output is the logits (a family that post-processes them, e.g.
        soft-capping, returns a module that does). A chunked loss calls it, or takes its weight and bias when
        it is a plain linear (`ops.fusable.is_plain_linear`)."""
        if self.config.final_logit_softcapping is not None:
            return SoftCappedHead(self.lm_head, self.config.final_logit_softcapping)
        return self.lm_head

    def head(self, h: torch.Tensor, adapter_ids=None) -> torch.Tensor:
        """Final-normed (..., C) -> logits (..., V); adapter_ids as `ForwardMeta` takes them, for an adapted head."""
        head = self.head_module()
        return head(h) if adapter_ids is None else head(h, adapter_ids)

    def hidden(self, input_ids: torch.Tensor, meta: ForwardMeta | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, C) final-normed hidden states: the stages in order."""
        meta = meta or ForwardMeta()
        x = self.embed(input_ids)  # (B, T, C)
        ctx = self.layer_context(x, meta)
        for i in range(self.num_layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(self.layer_forward, i, x, ctx, use_reentrant=False)
            else:
                x = self.layer_forward(i, x, ctx)
        if meta.cache is not None:
            meta.cache.advance(x.shape[1])
        return self.final_norm(x)

    def forward(self, input_ids: torch.Tensor, meta: ForwardMeta | None = None) -> torch.Tensor:
        return self.head(self.hidden(input_ids, meta))  # (B, T, V)

    def all_linear_excluded(self) -> list[str]:
        """Linear modules LoRA's "all-linear" leaves out. MoE models: the dense MLPs of Qwen3-MoE's
        `mlp_only_layers`, because PEFT 0.21.2 on transformers 5 maps any target named gate_proj/up_proj/down_proj
        (w1/w2/w3 for Mixtral) onto the stacked experts, so an adapter on those MLPs would not load in PEFT. The
        router is not a linear module, so it is never a target."""
        if not self.config.num_experts:
            return []
        return [f"model.layers.{i}.mlp.{p}" for i in range(self.config.num_layers) if not self.config.is_moe_layer(i)
                for p in ("gate_proj", "up_proj", "down_proj")]

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """HF-named weights; the tied lm_head is left out as transformers leaves it out."""
        sd = self.state_dict()
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], source: str = "checkpoint",
                           assign: bool = False) -> None:
        """Load HF-named tensors; a missing or unexpected key is an error naming the source.

        assign=True makes the given tensors the parameters (no copy; they must have the model's dtype)."""
        sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
        sd = fuse_expert_keys(sd, self.config)  # MoE: per-expert Hub tensors -> stacked (moe.py)
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        expected = set(self.base_state_dict())
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{source}: weights do not fit the {self.config.model_type} config: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for k, v in sd.items():
            p = self.get_parameter(k) if not k.endswith("inv_freq") else None
            if p.shape != v.shape:
                raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the config expects {tuple(p.shape)}")
        self.load_state_dict(sd, strict=False, assign=assign)
