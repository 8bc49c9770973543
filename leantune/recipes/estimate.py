"""`leantune estimate`: the peak memory of one training step, predicted from a model's config alone.

Reads `config.json` or the GGUF header (never the weights) and counts what leantune's own training step
holds at its peak: the weights (fp32/bf16, or NF4 + double quantization at ~4.127 bits/param for the
quantized linears, QLoRA arXiv:2305.14314 §2), the adapter's parameters, gradients and AdamW states, the
activations autograd saves for backward, the loss's logits chunk, and the framework's own memory.

The activation rules are counted from the code they describe, per token and decoder layer (s = compute
dtype bytes, a = adapter dtype bytes: the base dtype for fp32 bases, fp32 for half/4-bit bases as in
`methods/lora.py`); `tests/test_estimate.py` checks them against the tensors autograd actually saves:

- RMSNorm (`models/llama.py`) keeps its input as fp32 (`x.float()`: a copy unless s = 4) and 1/rms (fp32),
  when its input needs grad (not layer 0's: the frozen embedding's output does not);
- a LoRA layer keeps its input and `x A^T` (r values): fused (`ops/lora_linear.py`) or not, an input shared
  by q/k/v (or gate/up) is kept once when it needs no cast (on CUDA fp32 adapters compute in the input's
  dtype, `LoraLinear.adapter_math`) and no dropout; otherwise each adapted layer
  keeps its own cast/dropped copy (a), and dropout its mask when the input needs grad (CPU: a float noise
  tensor, s bytes; CUDA's fused dropout: 1 byte);
- Qwen3's q/k norms keep, per head of q (k) that needs grad, their fp32 input and 1/rms;
- Gemma's (1 + w) norms keep the same, and their (1 + w) once per call (fp32); Gemma's sandwich norms
  (after attention, before and after the MLP) are norms like the others, on the sub-block's output;
- attention keeps RoPE'd q and k, v, the SDPA output (the o_proj input is a view of it) and the fp32
  logsumexp (flash/efficient SDPA, no (T, T) matrix); cos/sin (of the rotated dims) are kept once; a
  windowed layer's boolean mask is kept as a (T, T) mask in the compute dtype, per layer; with Phi-3's fused
  qkv_proj, v is a view of its whole (H + 2 Hkv) D output, which it keeps alive;
- Phi-3's fused gate_up_proj: gate and up are views of its one (2F) output, so the rules below hold with
  the two counted as one tensor (both need grad or neither);
- Gemma 2's soft-capped attention (the math path of `models/llama.py:attention`) keeps, as q.k, the
  softmax and p.v need them: the GQA-repeated k (for q's grad), q (for k's), the repeated v, tanh's and
  the softmax's (B, H, T, T) outputs (fp32 softmax, + its cast in half precision), the (T, T) boolean mask
  (a full layer's per layer, the windowed layers' once); its output is copied for o_proj;
- the MLP keeps gate and up when `ops/swiglu.py` fuses it with down_proj (a plain float or 4-bit
  down_proj, or one LoRA adapter reading its input uncast and undropped; SwiGLU only), else gate,
  act(gate), up and the down_proj input (Gemma's GeGLU always);
- the loss (`train/loss.py`, `ops/linear_ce.py`) keeps the final norm's input, the label mask and dh
  (B(T-1), C); during the forward it also holds the final hidden states, their labelled rows and one
  chunk of fp32 logits (the softmax is made in place over them): 4 bytes x chunk x vocab (+ s when the
  head computes in half precision). A soft-capped head (Gemma 2) is no plain linear: per chunk of at most
  `loss_chunk` rows it keeps tanh's output (s), the fp32 log-softmax and the targets; more rows than a
  chunk are checkpointed, keeping only the labelled hidden rows.

With gradient checkpointing each layer keeps only its input; backward recomputes one layer at a time.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import asdict, dataclass, field

from ..fields import opt

MiB = 2**20
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DEVICES = ("auto", "cpu", "cuda")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PAGE_THRESHOLD = 100_000  # optim/paged_adamw.py
OPTIMIZERS = ("adamw", "paged_adamw", "galore_adamw", "natural_galore")  # optim/__init__.py
# Framework memory outside the tensors. RUNTIME: the process before the first step (torch, leantune,
# tokenizer; measured with torch 2.13 CPU), or the CUDA context and libraries (typical; varies with driver
# and GPU). FIRST_STEP: what the first step adds and keeps: on CPU (measured, torch 2.13, 2 threads, the
# same for 16 to 512 tokens) ~9 MiB of libtorch code first touched and ~29 MiB of thread-pool/BLAS/malloc
# state made by the first forward; on CUDA the cuBLAS workspaces (not measured here).
RUNTIME = {"cpu": 300 * MiB, "cuda": 600 * MiB}
FIRST_STEP = {"cpu": 38 * MiB, "cuda": 32 * MiB}


def lora_shaped_methods() -> list[str]:
    from ..methods.registry import method_specs

    return [s.name for s in method_specs() if s.lora_shaped]


def base_methods() -> list[str]:
    """The methods modelled besides the lora_shaped ones: those registered with a `memory` model."""
    from ..methods.registry import method_specs

    return [s.name for s in method_specs() if not s.lora_shaped and s.memory is not None]


def memory_model(method: str):
    """The `MemoryModel` of `method`, or None (a LoRA-shaped method, one not modelled, or no such method)."""
    from ..methods.registry import get_method, list_methods

    return get_method(method).memory if str(method).lower() in list_methods() else None


@dataclass
class EstimateConfig:
    model: str | None = opt(None, "HF model folder or .gguf file (only its config is read; default: the embedded "
                                  "SmolLM2-135M-Instruct)")
    method: str = opt("lora", "lora, rslora, qlora (4-bit NF4 base with double quantization) and the other methods "
                              "registered as lora_shaped; full, sara, lt-sft (its full phase, the peak), qst")
    seq: int = opt(512, "tokens per example (a micro-batch's padded length)")
    batch: int = opt(4, "examples per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step (gradients then live through the forward)")
    rank: int = opt(8, "LoRA rank r")
    targets: str = opt("all-linear", "modules to adapt: all-linear, a comma list of names, or a regex")
    dropout: float = opt(0.0, "dropout on the LoRA branch (> 0 keeps a copy of each adapted layer's input)")
    dtype: str = opt("auto", "weights/compute dtype: auto (bf16 on cuda and on a cpu with native bf16, "
                                "else fp32), fp32, bf16 or fp16")
    device: str = opt("auto", "cpu or cuda (auto: cuda when available)")
    gradient_checkpointing: bool = opt(False, "recompute each layer in backward (keeps only layer inputs)")
    optimizer: str = opt("adamw", "adamw, paged_adamw (states of tensors >= 1e5 elements off the device), "
                                  "galore_adamw or natural_galore (--method full / lt-sft)")
    galore_rank: int = opt(128, "GaLore: rank of the gradient projection")
    galore_proj_type: str | None = opt(None, "GaLore: std, reverse_std, right, left, full, tucker (default: std for "
                                             "galore_adamw, tucker for natural_galore)")
    galore_per_layer: bool = opt(False, "GaLore: each weight updated in backward, one gradient alive at a time")
    sara_fraction: float = opt(0.0104, "SaRA: fraction of the weights' entries below --sara-threshold (it depends on "
                                       "the weights, which estimate does not read; 0.0104 is SmolLM2-135M's at 2e-3)")
    qst_reduction: int = opt(16, "QST: the side network's width divisor r")
    qst_hidden_size: int = opt(16, "QST: inner width of each downsampler")
    loss_chunk: int = opt(1024, "rows of logits computed at once by the loss")
    json: bool = opt(False, "also print the estimate as one JSON line")
    nproc: int = opt(1, "processes (GPUs) of a torchrun run: the memory of one rank; --batch is then the global "
                        "micro-batch, batch/nproc rows per rank, as in finetune")
    parallel: str = opt("fsdp", "with --nproc > 1: fsdp (FSDP2 shards float weights, adapter, gradients and "
                                "optimizer state N ways; QLoRA's 4-bit base is replicated) or ddp (all replicated)",
                        metavar="fsdp|ddp")

    def __post_init__(self):
        modelled = lora_shaped_methods() + base_methods()
        memory = memory_model(self.method) if self.method in modelled else None
        projected = self.optimizer in ("galore_adamw", "natural_galore")
        checks = [
            (self.method in modelled,
             f"--method must be one of {modelled} (LoRA-shaped adapters, full finetuning, SaRA, LT-SFT and QST are "
             f"modelled; {self.method!r} is not, so no estimate is made for it)"),
            (self.seq >= 2, f"--seq must be >= 2, got {self.seq}"),
            (self.batch >= 1, f"--batch must be >= 1, got {self.batch}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.rank >= 1, f"--rank must be >= 1, got {self.rank}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.dtype == "auto" or self.dtype in DTYPE_BYTES,
             f"--dtype must be auto or one of {tuple(DTYPE_BYTES)}, got {self.dtype!r}"),
            (self.device in DEVICES, f"--device must be one of {DEVICES}, got {self.device!r}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (not projected or (memory is not None and memory.projectable),
             f"--optimizer {self.optimizer} projects whole weight matrices: use it with --method "
             f"{' or '.join(n for n in base_methods() if memory_model(n).projectable)} "
             f"(finetune refuses it with --method {self.method})"),
            (not self.galore_per_layer or (projected and self.grad_accum == 1),
             "--galore-per-layer needs --optimizer galore_adamw or natural_galore and --grad-accum 1"),
            (self.galore_rank >= 1, f"--galore-rank must be >= 1, got {self.galore_rank}"),
            (0 < self.sara_fraction <= 1, f"--sara-fraction must be in (0, 1], got {self.sara_fraction}"),
            (self.loss_chunk >= 1, f"--loss-chunk must be >= 1, got {self.loss_chunk}"),
            (self.nproc >= 1, f"--nproc must be >= 1, got {self.nproc}"),
            (self.parallel in ("fsdp", "ddp"), f"--parallel must be fsdp or ddp, got {self.parallel!r}"),
            (self.batch % self.nproc == 0, f"--batch {self.batch} is the global micro-batch: it must be a multiple "
                                           f"of --nproc {self.nproc}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass
class MemoryEstimate:
    """Bytes alive at the peak of a training step (after the first, when AdamW's states exist)."""

    weights: int
    adapter: int
    optimizer: int
    gradients: int
    activations: int
    transient: int  # the loss's logits chunk, backward temporaries or 4-bit dequantization at the peak
    framework: int
    first_step: int  # part of `framework` that the first step adds (in `step`)
    phase: str  # "forward (loss)", "backward", "recompute + backward" or "optimizer"
    notes: dict = field(default_factory=dict)
    method_buffers: int = 0  # SaRA's masks, indices and original values; LT-SFT's copies of the weights
    projectors: int = 0  # part of `optimizer`: GaLore's projections (+ Natural GaLore's history)

    @property
    def total(self) -> int:
        return (self.weights + self.adapter + self.optimizer + self.gradients + self.activations + self.transient
                + self.framework + self.method_buffers)

    @property
    def step(self) -> int:
        """What the step adds to a process that holds the model and adapter: the peak RSS/allocation growth."""
        return self.optimizer + self.gradients + self.activations + self.transient + self.first_step

    def rows(self) -> list[tuple[str, int]]:
        trained = self.notes.get("trainable_row", "adapter parameters")
        rows = [("weights", self.weights), (trained, self.adapter), ("optimizer states", self.optimizer - self.projectors)]
        if self.projectors:
            rows.append(("GaLore projectors (+ history)", self.projectors))
        if self.method_buffers:
            rows.append((self.notes.get("buffers_row", "method buffers"), self.method_buffers))
        return rows + [("gradients", self.gradients), ("activations saved for backward", self.activations),
                       ("transient at the peak", self.transient), ("framework (runtime, workspaces)", self.framework)]


# ---------------------------------------------------------------------------------------------
# counting


@dataclass
class _Plan:
    """The numbers the rules need: model shape, dtypes, which linears of which layer are adapted."""

    C: int
    F: int
    H: int
    K: int
    D: int
    V: int
    L: int
    s: int
    a: int
    r: int
    dropout: float
    quantized: bool
    targets: list[set[str]]  # per layer: short names of adapted linears
    head_adapted: bool
    mask_bytes: int = 4  # dropout's saved mask per element: CPU keeps a float noise tensor, CUDA a bool mask
    adapter_math_in_activation: bool = False  # CUDA, native-bf16 CPU: fp32 adapters in the input's dtype (lora.py)
    qk_norm: bool = False  # Qwen3, Gemma 3: q and k RMS-normalized per head before RoPE
    sandwich: bool = False  # Gemma: four norms per layer (attention and MLP outputs normed too)
    unit_offset: bool = False  # Gemma: norms keep their (1 + w)
    swiglu: bool = True  # the MLP's gate is silu (fusable); False: Gemma's GeGLU
    softcap: bool = False  # Gemma 2: attention scores soft-capped (the math path)
    final_softcap: bool = False  # Gemma 2: the head is soft-capped (no plain linear)
    windows: list = field(default_factory=list)  # per layer: its sliding window or None
    rope_kinds: list = field(default_factory=list)  # per layer: which RoPE table (Gemma 3: local or global)
    # MoE (models/moe.py): E experts of width Fe, top-k; which layers hold them; experts adapted (all-linear)
    E: int = 0
    k: int = 0
    Fe: int = 0
    moe_layers: list = field(default_factory=list)
    experts_adapted: bool = False
    fp32_router_weights: bool = False  # Mixtral keeps its top-k weights in fp32; Qwen3-MoE casts them
    renorm: bool = True  # the top-k weights renormalized (a division autograd keeps both sides of)
    fused_qkv: bool = False  # Phi-3: one qkv_proj
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj
    R: int = 0  # dims RoPE turns per head (Phi-4-mini: 3/4 of D); 0 -> D
    grad_from_input: bool = False  # the embeddings train (full finetuning): layer 0's input needs grad

    @property
    def shared_input(self) -> bool:
        """Adapted layers reading one tensor keep it once (no per-layer cast copy, no dropout copy)."""
        return (self.a == self.s or self.adapter_math_in_activation) and self.dropout == 0

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        C, F, H, K, D = self.C, self.F, self.H, self.K, self.D
        qkv = {"qkv_proj": (C, (H + 2 * K) * D)} if self.fused_qkv else {
            "q_proj": (C, H * D), "k_proj": (C, K * D), "v_proj": (C, K * D)}
        gate_up = {"gate_up_proj": (C, 2 * F)} if self.fused_gate_up else {"gate_proj": (C, F), "up_proj": (C, F)}
        return {**qkv, "o_proj": (H * D, C), **gate_up, "down_proj": (F, C)}


def _norm(p: _Plan) -> int:
    return max(p.s, 4) * p.C + 4  # fp32 input (x.float()) + 1/rms


def _norm_const(p: _Plan, width: int) -> int:
    """Bytes a norm call keeps whatever the tokens: Gemma's (1 + w) in fp32."""
    return 4 * width if p.unit_offset else 0


def _lora_inputs(p: _Plan, n: int, width: int, kept: bool, grad: bool) -> int:
    """Bytes per token that n adapted layers reading one input of `width` add. `kept`: the input is saved
    by someone else already; `grad`: the input needs grad (then dropout keeps its mask)."""
    if n == 0:
        return 0
    if p.shared_input:  # the fused op: x A^T in the input's dtype
        return (0 if kept else width * p.s) + n * p.r * p.s
    mask = width * p.mask_bytes if (p.dropout > 0 and grad) else 0
    return n * (width * p.a + mask + p.r * p.a)


def _softcap_attention(p: _Plan, qg: bool, kg: bool, vg: bool, full: bool, batch: int, seq: int) -> tuple[int, int]:
    """(bytes per token, bytes per layer) the soft-capped math attention keeps; qg/kg/vg: q/k/v need grad."""
    s, H, D, TT = p.s, p.H, p.D, batch * p.H * seq * seq
    scores = qg or kg
    per_token = H * D * s * (int(qg) + int(kg) + int(scores))  # repeated k (for q), q (for k), repeated v
    per_layer = 0
    if scores:  # tanh's output, the fp32 softmax, a full layer's own causal mask
        per_layer += TT * (s + 4) + (seq * seq if full else 0)
    if vg and s < 4:  # p.v keeps p: the softmax's half-precision cast
        per_layer += TT * s
    elif vg and not scores:  # ... or the fp32 softmax itself, not kept already
        per_layer += TT * 4
    return per_token, per_layer


def _layer_saved(p: _Plan, t: set[str], grad_in: bool, window=None, batch: int = 1,
                 seq: int = 1) -> tuple[int, bool, bool, int]:
    """(bytes per token decoder layer saves for backward, does its output need grad, does attention save,
    bytes it saves whatever the tokens or per (T, T): norm constants, attention matrices and masks)."""
    s, C, F, H, K, D = p.s, p.C, p.F, p.H, p.K, p.D
    saved = _norm(p) if grad_in else 0
    const = _norm_const(p, C) if grad_in else 0
    qkv = [n for n in ("q_proj", "k_proj", "v_proj", "qkv_proj") if n in t]
    saved += _lora_inputs(p, len(qkv), C, kept=False, grad=grad_in)
    attn = grad_in or bool(qkv)  # SDPA saves q, k, v, out, lse when any of them needs grad
    qg, kg, vg = (grad_in or f"{n}_proj" in t or "qkv_proj" in t for n in "qkv")
    if attn and p.softcap:
        tok, lay = _softcap_attention(p, qg, kg, vg, window is None, batch, seq)
        saved, const = saved + tok, const + lay
    elif attn:  # a fused qkv_proj's v is a view that keeps the whole (H + 2K) D output
        saved += (2 * H * D + 2 * K * D + ((H + K) * D if p.fused_qkv else 0)) * s + H * 4
        const += seq * seq * s if window is not None else 0  # the boolean mask as SDPA's float mask
    if p.qk_norm:  # an RMSNorm per head of q (k): its fp32 input and 1/rms, when q (k) needs grad
        heads = H * qg + K * kg
        saved += heads * (max(s, 4) * D + 4)
        const += _norm_const(p, D) * (int(qg) + int(kg))
    # the math path's output is copied for o_proj; SDPA's is viewed
    saved += _lora_inputs(p, int("o_proj" in t), H * D, kept=attn and not p.softcap, grad=attn)
    grad_mid = attn or "o_proj" in t
    norms_mid = 2 if p.sandwich else 1  # Gemma: the attention output's norm, then the MLP's input norm
    saved += norms_mid * _norm(p) if grad_mid else 0
    const += norms_mid * _norm_const(p, C) if grad_mid else 0
    if "moe" in t:  # the experts' per-step constant (their B copies) joins the layer's constant
        return saved + _moe_saved(p, grad_mid), True, attn, const + _moe_constant(p)
    gate_up = [n for n in ("gate_proj", "up_proj", "gate_up_proj") if n in t]
    saved += _lora_inputs(p, len(gate_up), C, kept=False, grad=grad_mid)
    gate_grad, up_grad = (grad_mid or n in t or "gate_up_proj" in t for n in ("gate_proj", "up_proj"))
    down = "down_proj" in t
    grad_out = grad_mid or gate_grad or up_grad or down
    if p.sandwich and grad_out:  # the MLP output's norm
        saved, const = saved + _norm(p), const + _norm_const(p, C)
    # ops/swiglu.py takes the MLP (a 4-bit down_proj too: Linear4bit hands the fused op its packed codes)
    fused = p.swiglu and (not down or p.shared_input)
    if fused:
        saved += 2 * F * s if (gate_grad or up_grad or down) else 0
        saved += p.r * s if down else 0
    else:
        # silu keeps gate (gate needs grad); the product keeps silu(gate) (up needs grad) and up (gate does)
        saved += F * s * (2 * int(gate_grad) + int(up_grad))
        saved += _lora_inputs(p, int(down), F, kept=False, grad=gate_grad or up_grad)
    return saved, grad_out, attn, const


def _moe_saved(p: _Plan, grad_in: bool) -> int:
    """Bytes per token a MoE feed-forward saves (moe.py's `loop` path, which training takes): the router's fp32
    softmax, top-k ids and (renormalized) weights; per assignment (k per token) the gather index, the gate_up
    output (silu keeps it), silu(gate), the expert output and its weight before the weighted sum, the weighted
output (index_add_ keeps its source); with expert
    LoRA, the routed input and silu(gate)*up (cast to the adapter dtype where it differs) and x A^T of both
    weights. The transposed B copies (per step, not per token) are in `_moe_constant`."""
    s, a, k, E, C, F, r = p.s, p.a, p.k, p.E, p.C, p.Fe, p.r
    router = (E * 4 + k * 8 + (k * 4 + 4 if p.renorm else 0)) if grad_in else 0
    per = 8 + 2 * F * s + F * s + C * s + (4 if p.fp32_router_weights else s) + 8 + C * s  # (+ index_add_'s source)
    if p.experts_adapted:
        per += C * a + F * a + 2 * r * a
    return router + k * per


def _moe_constant(p: _Plan) -> int:
    """Bytes per MoE layer per step whatever the tokens: each adapted weight's B as (E, out, r), contiguous."""
    return (p.E * (2 * p.Fe + p.C) * p.r * p.a) if p.experts_adapted else 0


def activation_bytes(p: _Plan, batch: int, seq: int, loss_chunk: int = 1024) -> dict:
    """Saved-for-backward bytes: per layer (list), the model-level rest, and the largest layer."""
    N, per_layer, grad, ropes, shared_mask = batch * seq, [], p.grad_from_input, set(), False
    windows, kinds = p.windows or [None] * p.L, p.rope_kinds or [False] * p.L
    for t, w, kind in zip(p.targets, windows, kinds):
        b, grad, attn, const = _layer_saved(p, t, grad, w, batch, seq)
        per_layer.append(b * N + const)
        ropes |= {kind} if attn else set()
        shared_mask = shared_mask or (attn and p.softcap and w is not None)
    rest = (_norm(p) * N + _norm_const(p, p.C) if grad else 0) + N  # final norm input; the labelled-rows mask
    rest += 8 * N if p.grad_from_input else 0  # a trained embedding keeps its int64 ids
    rest += len(ropes) * 2 * (p.R or p.D) * p.s * N  # RoPE cos/sin, one pair per table, shared by the layers using it
    rest += seq * seq if shared_mask else 0  # the windowed layers' one boolean mask (math path)
    n_sel = batch * (seq - 1)
    if not p.final_softcap:
        rest += n_sel * p.C * p.s  # dh kept by the fused LM head + cross-entropy
    elif n_sel <= loss_chunk:  # tanh's output, the fp32 log-softmax, the targets, cross-entropy's weight sum
        rest += n_sel * p.V * (p.s + 4) + n_sel * 8 + 4
    else:  # checkpointed chunks: the labelled hidden rows and their targets
        rest += n_sel * (p.C * p.s + 8)
    return {"layers": per_layer, "rest": rest, "total": sum(per_layer) + rest}


def nf4_bytes(numel: int, blocksize: int = 64) -> int:
    """Packed NF4 codes + 8-bit absmax codes + fp32 absmax of the absmax per 256 blocks + offset + the two
    code tables: 4.127 bits/param for large tensors (methods-core §2.3)."""
    blocks = -(-numel // blocksize)
    return (numel + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4 + 4 * (16 + 256)


def stacked_nf4_bytes(E: int, numel: int, blocksize: int = 64) -> int:
    """A `quant.Stacked4bit` of E expert matrices of `numel` each: per expert the packed codes, 8-bit absmax codes,
    nested fp32 scales and fp32 offset; one copy of the two code tables."""
    blocks = -(-numel // blocksize)
    return E * ((numel + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4) + 4 * (16 + 256)


def _weights(p: _Plan, cfg) -> tuple[int, int]:
    """(bytes of the model's weights, numel of its largest quantized linear)."""
    dims = p.linear_dims()
    bias = {"q_proj": cfg.qkv_bias, "k_proj": cfg.qkv_bias, "v_proj": cfg.qkv_bias, "o_proj": cfg.o_bias,
            "gate_proj": cfg.mlp_bias, "up_proj": cfg.mlp_bias, "down_proj": cfg.mlp_bias,
            "qkv_proj": cfg.qkv_bias, "gate_up_proj": cfg.mlp_bias}
    norms = 4 if p.sandwich else 2  # Gemma: + post-attention and pre/post-feedforward norms
    per_layer = norms * p.C * p.s + (2 * p.D * p.s if p.qk_norm else 0)  # (+ Qwen3's / Gemma 3's q/k norms)
    mlp = 0
    for name, (i, o) in dims.items():
        b = (nf4_bytes(i * o) if p.quantized else i * o * p.s) + (o * p.s if bias[name] else 0)
        per_layer += b if name not in MLP else 0
        mlp += b if name in MLP else 0
    n_moe = sum(p.moe_layers)
    if p.quantized:  # the float router and the two stacks, 4-bit per expert (quant/stacked4bit.py)
        experts = p.E * p.C * p.s + stacked_nf4_bytes(p.E, 2 * p.Fe * p.C) + stacked_nf4_bytes(p.E, p.C * p.Fe)
    else:
        experts = p.E * (p.C + 3 * p.C * p.Fe) * p.s  # the router and the stacked experts
    emb = p.V * p.C * p.s * (1 if cfg.tie_word_embeddings else 2)
    largest = max(i * o for i, o in dims.values()) if p.quantized else 0
    if p.quantized and any(p.moe_layers):  # the loop decodes one expert matrix at a time
        largest = max(largest, 2 * p.Fe * p.C)
    return p.L * per_layer + (p.L - n_moe) * mlp + n_moe * experts + emb + p.C * p.s, largest


def _adapter_shapes(p: _Plan) -> list[int]:
    dims, out = p.linear_dims(), []
    for t in p.targets:
        for name in t - {"moe"}:
            i, o = dims[name]
            out += [p.r * i, o * p.r]
        if "moe" in t and p.experts_adapted:  # PEFT's (r E, in) and (out, r E) per stacked weight
            out += [p.r * p.E * p.C, 2 * p.Fe * p.r * p.E, p.r * p.E * p.Fe, p.C * p.r * p.E]
    if p.head_adapted:
        out += [p.r * p.C, p.V * p.r]
    return out


def _optimizer(p: _Plan, shapes: list[int], optimizer: str, device: str) -> tuple[int, int]:
    """(resident state bytes, transient bytes during optimizer.step())."""
    a, total = p.a, sum(shapes)
    if optimizer == "adamw":
        return 2 * total * a, (total if device == "cuda" else max(shapes, default=0)) * a  # foreach vs single
    small = sum(n for n in shapes if n < PAGE_THRESHOLD)
    large = max((n for n in shapes if n >= PAGE_THRESHOLD), default=0)
    in_flight = 2 if device == "cuda" else 1  # current + prefetched; on CPU one parameter's mapped pages
    return 2 * small * a, in_flight * 2 * large * a + max(shapes, default=0) * a


def _match(name: str, targets) -> bool:
    from ..methods.targets import is_all_linear, matches_list

    if is_all_linear(targets):
        return not name.endswith("lm_head")
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return matches_list(name, targets)


def make_plan(cfg, method: str, rank: int, targets: str, dropout: float, dtype_bytes: int,
              device: str = "cpu") -> _Plan:
    from ..methods.targets import is_all_linear, parse_targets

    tg = parse_targets(targets)
    attn = ("qkv_proj", "o_proj") if cfg.fused_qkv else ATTN
    mlp = ("gate_up_proj", "down_proj") if cfg.fused_gate_up else MLP
    per_layer = []
    moe = [cfg.is_moe_layer(i) for i in range(cfg.num_layers)]
    for i in range(cfg.num_layers):
        names = {n: f"model.layers.{i}.{'self_attn' if n in attn else 'mlp'}.{n}" for n in attn + (() if moe[i] else mlp)}
        # a Qwen3-MoE dense layer's MLP is left out of all-linear (LlamaForCausalLM.all_linear_excluded)
        per_layer.append({n for n, full in names.items() if _match(full, tg) and not (n in mlp and any(moe))})
        if moe[i]:
            per_layer[-1].add("moe")
    head = _match("lm_head", tg)
    if not head and not any(t - {"moe"} for t in per_layer) and not (any(moe) and is_all_linear(tg)):
        raise ValueError(f"--targets {targets!r} matches no linear module of this model; its linear modules "
                         f"end with {sorted(attn + mlp)} (and lm_head)")
    from ..precision import native_bf16_cpu

    from ..methods.registry import get_method

    quantized = get_method(method).quantize is not None  # the method loads its base 4-bit (MoE experts too)
    a = 4 if (quantized or dtype_bytes < 4) else dtype_bytes  # methods/lora.py: fp32 adapters on half/4-bit bases
    return _Plan(C=cfg.hidden_size, F=cfg.intermediate_size, H=cfg.num_heads, K=cfg.num_kv_heads, D=cfg.head_dim,
                 V=cfg.vocab_size, L=cfg.num_layers, s=dtype_bytes, a=a, r=rank, dropout=dropout,
                 quantized=quantized, targets=per_layer, head_adapted=head,
                 mask_bytes=1 if device == "cuda" else dtype_bytes,
                 adapter_math_in_activation=device == "cuda" or (device == "cpu" and dtype_bytes == 2
                                                                 and native_bf16_cpu()),
                 qk_norm=cfg.qk_norm, sandwich=cfg.sandwich_norms, unit_offset=cfg.norm_unit_offset,
                 swiglu=cfg.hidden_act == "silu", softcap=cfg.attn_logit_softcapping is not None,
                 final_softcap=cfg.final_logit_softcapping is not None,
                 windows=[cfg.layer_window(i) for i in range(cfg.num_layers)],
                 rope_kinds=[cfg.layer_rope_local(i) for i in range(cfg.num_layers)],
                 E=cfg.num_experts, k=cfg.num_experts_per_tok, Fe=cfg.expert_intermediate_size,
                 moe_layers=moe, experts_adapted=any(moe) and is_all_linear(tg),
                 fp32_router_weights=cfg.model_type == "mixtral", renorm=cfg.norm_topk_prob,
                 fused_qkv=cfg.fused_qkv, fused_gate_up=cfg.fused_gate_up, R=cfg.rotary_dim)


def _phases(p: _Plan, acts: dict, batch: int, seq: int, adapter: int, opt_transient: int, largest_q: int,
            gradient_checkpointing: bool, grad_accum: int, loss_chunk: int) -> dict[str, tuple[int, int, int]]:
    """(gradients, activations, transient) bytes at the peak of each phase of a step."""
    s, N, n_sel = p.s, batch * seq, batch * (seq - 1)
    dequant = 8 * largest_q  # quant/nf4.py: int64 byte indices (4 B/param) + fp32 values (4 B/param)
    chunk = min(loss_chunk, n_sel)
    # ops/linear_ce.py: one (chunk, V) fp32 buffer, softmax in place (+ the head's output before .float());
    # an adapted head goes through F.cross_entropy per checkpointed chunk: logits, log-softmax, their grad
    logits = chunk * p.V * (12 if p.head_adapted or p.final_softcap else 4 + (s if s < 4 else 0))
    loss_fwd = N * p.C * s + n_sel * p.C * s + 16 * N + logits  # hidden, its labelled rows, targets; dh is saved
    width = max(p.F, p.k * p.Fe)  # a MoE layer's k routed copies of each token through width-Fe experts
    bwd = N * (4 * width + 2 * p.C) * s + dequant  # one layer's backward temporaries
    accum_grads = adapter if grad_accum > 1 else 0  # earlier micro-batches' gradients live through the forward
    if gradient_checkpointing:
        kept = (p.L * N * p.C * s) + acts["rest"]  # each layer's input
        phases = {"forward (loss)": (accum_grads, kept, max(loss_fwd, dequant + 2 * N * p.F * s)),
                  "recompute + backward": (adapter, kept + max(acts["layers"]), bwd)}
    else:
        phases = {"forward (loss)": (accum_grads, acts["total"], max(loss_fwd, dequant)),
                  "backward": (adapter, acts["total"], bwd)}
    phases["optimizer"] = (adapter, 0, opt_transient)
    return phases


def _warnings(p: _Plan, device: str, batch: int, seq: int) -> list[str]:
    out = []
    if device == "cuda" and p.s == 4 and p.H != p.K:
        extra = p.L * batch * p.H * seq * seq * p.s
        out.append(f"fp32 grouped-query attention on CUDA may run SDPA's math backend (no flash kernel for fp32), "
                   f"which keeps (B, H, T, T) attention weights: up to {extra / MiB:.0f} MiB more; use --dtype bf16")
    return out


def param_counts(cfg) -> tuple[int, int]:
    """(parameters of the model, parameters a token passes through): they differ for MoE, where each token uses
    num_experts_per_tok of the num_experts experts (all experts are in memory all the same)."""
    C, F, H, K, D, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    attn = C * (H * D + 2 * K * D) + H * D * C + (H * D + 2 * K * D) * cfg.qkv_bias + C * cfg.o_bias
    norms = 2 * C + (2 * D if cfg.qk_norm else 0)
    dense = 3 * C * F + (2 * F + C) * cfg.mlp_bias
    moe = [cfg.is_moe_layer(i) for i in range(L)]
    expert = 3 * C * cfg.expert_intermediate_size
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    emb = cfg.vocab_size * C * (1 if cfg.tie_word_embeddings else 2) + C
    total = emb + L * (attn + norms) + sum(E * (C + expert) if m else dense for m in moe)
    active = total - sum(moe) * (E - k) * expert
    return total, active


def estimate_memory(cfg, method: str = "lora", batch: int = 4, seq: int = 512, rank: int = 8,
                    targets: str = "all-linear", dropout: float = 0.0, dtype: str = "fp32", device: str = "cpu",
                    gradient_checkpointing: bool = False, optimizer: str = "adamw", grad_accum: int = 1,
                    loss_chunk: int = 1024) -> MemoryEstimate:
    """Predict the peak memory of one training step of `cfg` (a `ModelConfig`); see the module docstring."""
    p = make_plan(cfg, method, rank, targets, dropout, DTYPE_BYTES[dtype], device)
    weights, largest_q = _weights(p, cfg)
    shapes = _adapter_shapes(p)
    adapter = sum(shapes) * p.a
    states, opt_transient = _optimizer(p, shapes, optimizer, device)
    acts = activation_bytes(p, batch, seq, loss_chunk)
    phases = _phases(p, acts, batch, seq, adapter, opt_transient, largest_q, gradient_checkpointing, grad_accum,
                     loss_chunk)
    phase = max(phases, key=lambda k: sum(phases[k]))
    grads, act, transient = phases[phase]
    N = batch * seq
    total_params, active_params = param_counts(cfg)
    notes = {"tokens": N, "adapter_params": sum(shapes), "params": total_params, "active_params": active_params, "bytes_per_token_layer": [b // N for b in acts["layers"]],
             "loss_chunk_rows": min(loss_chunk, batch * (seq - 1)), "adapter_dtype_bytes": p.a, "dtype_bytes": p.s,
             "warnings": _warnings(p, device, batch, seq)}
    notes["weight_split"] = _weight_split(p, cfg, weights)
    notes["grad_bytes"] = adapter
    return MemoryEstimate(weights=weights, adapter=adapter, optimizer=states, gradients=grads, activations=act,
                          transient=transient, framework=RUNTIME[device] + FIRST_STEP[device],
                          first_step=FIRST_STEP[device], phase=phase, notes=notes)


def _weight_split(p: _Plan, cfg, weights: int) -> dict:
    """What FSDP does with each part of the weights: root (embeddings, head, final norm: one FSDP group, kept
    gathered through the step), one block's float weights (gathered one block at a time), and replicated
    bytes (QLoRA's 4-bit linears are uint8 buffers, which fully_shard does not shard)."""
    root = p.V * p.C * p.s * (1 if cfg.tie_word_embeddings else 2) + p.C * p.s
    if not p.quantized:
        return {"root": root, "block": (weights - root) // p.L, "replicated": 0}
    norms = (4 if p.sandwich else 2) * p.C * p.s + (2 * p.D * p.s if p.qk_norm else 0)
    return {"root": root, "block": norms, "replicated": weights - root - p.L * norms}


def per_rank(est: MemoryEstimate, nproc: int, parallel: str) -> MemoryEstimate:
    """One rank's share of a run on `nproc` processes, from `est` computed for that rank's rows (batch/nproc).
    DDP replicates weights, adapter and optimizer state, and its reducer keeps a bucketed copy of the gradients.
    FSDP2 shards the float weights, the adapter, its gradients and optimizer state N ways, and holds gathered at
    once the root group (embeddings, head, final norm) and two blocks (the one computing and the one prefetched);
    buffers (QLoRA's 4-bit base) stay whole on every rank."""
    if nproc == 1:
        return est
    if parallel == "ddp":
        return dataclasses.replace(est, gradients=est.gradients + est.notes.get("grad_bytes", est.adapter))
    w = est.notes["weight_split"]
    shardable = est.weights - w["replicated"]
    gathered = w["root"] * (nproc - 1) // nproc + 2 * w["block"]
    # the method's copies (LT-SFT's prev, SaRA's masks) and GaLore's state follow the sharded parameters
    return dataclasses.replace(est, weights=w["replicated"] + shardable // nproc + gathered,
                               adapter=est.adapter // nproc, optimizer=est.optimizer // nproc,
                               gradients=est.gradients // nproc, method_buffers=est.method_buffers // nproc,
                               projectors=est.projectors // nproc)


# ---------------------------------------------------------------------------------------------
# methods that train the base's own weights (full, SaRA, LT-SFT), or a side network beside a 4-bit base (QST):
# each registers a `memory` model (methods/memory.py) with what is its own

NATURAL_HISTORY = 20  # optim/natural_galore.py: the history's rows at steady state (--natural-history default)


def meta_model(cfg):
    """leantune's model of `cfg` on the meta device: its parameters' names and shapes, no memory."""
    import torch

    from ..models.llama import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def _galore_state(model, params, optimizer: str, rank: int, proj_type: str | None, s: int) -> tuple[int, int, int, list]:
    """(moments, projectors, step transient, projected shapes) of GaLoreAdamW / NaturalGaLoreAdamW over `params`
    with leantune's parameter groups (`galore_param_groups`, the trainer's `optimizer_params`): per projected
    (m, n) matrix the moments of its projection and the factors, the other parameters' full moments."""
    from ..optim import galore_param_groups
    from ..optim.galore import _side
    from ..train.trainable import default_proj_type

    proj_type = proj_type or default_proj_type(optimizer)
    groups = galore_param_groups(model, params, rank, 200, 1.0, proj_type)
    moments = projectors = transient = 0
    shapes = []
    for g in groups:
        for p in g["params"]:
            if "rank" not in g:
                moments += 2 * p.numel() * s
                transient = max(transient, p.numel() * s)
                continue
            m, n = p.shape
            if rank > min(m, n):
                raise ValueError(f"--galore-rank {rank} is larger than the smaller side of a projected matrix "
                                 f"{(m, n)}; use --galore-rank {min(m, n)} or less")
            side = "both" if proj_type == "tucker" else _side(proj_type, p.shape)
            if side == "right":
                low, proj = m * rank, rank * n
            elif side == "left":
                low, proj = rank * n, m * rank
            else:  # both sides (Tucker)
                low, proj = rank * rank, m * rank + rank * n
            history = NATURAL_HISTORY * low if optimizer == "natural_galore" else 0
            moments += 2 * low * s
            projectors += (proj + history) * s
            # the update projected back (m, n) and, at a refresh, the fp32 SVD's factors of the gradient
            transient = max(transient, m * n * s + 4 * (m + n + 1) * min(m, n))
            shapes.append((m, n))
    return moments, projectors, transient, shapes


def trained_state(cfg, method: str, optimizer: str, s: int, device: str, galore_rank: int = 128,
                  galore_proj_type: str | None = None, galore_per_layer: bool = False, sara_fraction: float = 0.01,
                  qst=None) -> TrainedState:
    """What `method` trains and what its optimizer keeps, for a model of `cfg` in `s`-byte floats."""
    from ..methods.memory import TrainedState

    memory = memory_model(method)
    model = meta_model(cfg)
    named = list(model.named_parameters())  # tied weights once, as the trainer's parameter list
    if memory.trained is not None:  # tensors of its own (SaRA's values, QST's side network) under AdamW
        return memory.trained(cfg, named, s, sara_fraction=sara_fraction, qst=qst)
    params = [p for _, p in named]
    numels = [p.numel() for p in params]
    grads = sum(numels) * s
    if optimizer in ("galore_adamw", "natural_galore"):
        moments, projectors, transient, _ = _galore_state(model, params, optimizer, galore_rank, galore_proj_type, s)
    elif optimizer == "paged_adamw":
        small = [n for n in numels if n < PAGE_THRESHOLD]
        moments, projectors = 2 * sum(small) * s + 4 * len(small), 0
        transient = (2 if device == "cuda" else 1) * 2 * max(numels) * s + max(numels) * s
    else:  # torch AdamW: two moments like each parameter, and a scalar fp32 step tensor per parameter
        moments, projectors = 2 * grads + 4 * len(numels), 0
        transient = (grads if device == "cuda" else max(numels) * s)  # foreach on CUDA, one tensor at a time on CPU
    peak = grads
    if galore_per_layer:
        # each parameter is updated and its gradient freed in its post-accumulate hook (optim/per_layer.py): one
        # gradient at a time, except that a head tied to the embeddings has its part held from the head's
        # backward until the embedding's
        emb = cfg.vocab_size * cfg.hidden_size if cfg.tie_word_embeddings else 0
        peak = (emb + max(n for n, (name, _) in zip(numels, named) if not (emb and "embed_tokens" in name))) * s
    buffers = memory.copies(grads, device) if memory.copies is not None else 0  # LT-SFT's prev and theta0
    return TrainedState(0, grads, peak, moments, projectors, buffers, transient, numels)


def estimate_base_method(cfg, method: str, batch: int = 4, seq: int = 512, dtype: str = "fp32", device: str = "cpu",
                         gradient_checkpointing: bool = False, optimizer: str = "adamw", grad_accum: int = 1,
                         loss_chunk: int = 1024, galore_rank: int = 128, galore_proj_type: str | None = None,
                         galore_per_layer: bool = False, sara_fraction: float = 0.01, qst=None) -> MemoryEstimate:
    """The peak of one step of full finetuning (+ GaLore), SaRA, LT-SFT or QST. Weights, trainable parameters,
    gradients and optimizer state are exact counts over the model's tensors (`trained_state`); activations reuse
    the LoRA rules with every linear keeping its input (r = 0, gradients from the embeddings on; for QST the
    side network's block at its width), an approximation not checked against autograd."""
    s = DTYPE_BYTES[dtype]
    st = trained_state(cfg, method, optimizer, s, device, galore_rank, galore_proj_type, galore_per_layer,
                       sara_fraction, qst)
    memory = memory_model(method)
    side = memory.side(cfg, s, sara_fraction=sara_fraction, qst=qst) if memory.side is not None else None
    base_plan = make_plan(cfg, "qlora" if side else "lora", 1, "all-linear", 0.0, s, device)  # a side's base: 4-bit
    weights, largest_q = _weights(base_plan, cfg)
    N = batch * seq
    if side:  # the side network's activations in fp32, the base's forward keeping nothing for backward
        sp = dataclasses.replace(make_plan(side.config, "lora", 1, "all-linear", 0.0, 4, device), r=0, a=4,
                                 grad_from_input=True)
        acts = activation_bytes(sp, batch, seq, loss_chunk)
        acts["layers"] = [b + side.per_token_layer * N for b in acts["layers"]]
        base_acts = activation_bytes(dataclasses.replace(base_plan, targets=[set() for _ in base_plan.targets]),
                                     batch, seq, loss_chunk)
        acts["rest"] = base_acts["rest"] + side.per_token_rest * N  # the loss, and the side's own
        acts["total"] = sum(acts["layers"]) + acts["rest"]
    else:
        plan = dataclasses.replace(base_plan, r=0, a=s, grad_from_input=True)
        acts = activation_bytes(plan, batch, seq, loss_chunk)
    p = base_plan if side else plan
    phases = _phases(p, acts, batch, seq, st.gradients, st.transient, largest_q, gradient_checkpointing, grad_accum,
                     loss_chunk)
    if galore_per_layer:  # the updates happen inside backward, where one gradient lives at a time
        g, a, t = phases.pop("optimizer")
        back = "recompute + backward" if gradient_checkpointing else "backward"
        g0, a0, t0 = phases[back]
        phases[back] = (st.peak_gradients, a0, max(t0, t))
    phase = max(phases, key=lambda k: sum(phases[k]))
    grads, act, transient = phases[phase]
    total_params, active_params = param_counts(cfg)
    notes = {"tokens": N, "adapter_params": sum(st.numels), "params": total_params, "active_params": active_params,
             "bytes_per_token_layer": [b // N for b in acts["layers"]], "loss_chunk_rows": min(loss_chunk, batch * (seq - 1)),
             "adapter_dtype_bytes": 4 if side else s, "dtype_bytes": s, "warnings": [],
             "weight_split": _weight_split(base_plan, cfg, weights), "projectors": st.projectors,
             "method_buffers": st.buffers, "activations_approximate": True, "grad_bytes": st.gradients,
             "trainable_row": memory.trainable_row, "buffers_row": memory.buffers_row}
    return MemoryEstimate(weights=weights, adapter=st.trainable, optimizer=st.moments + st.projectors,
                          gradients=grads, activations=act, transient=transient,
                          framework=RUNTIME[device] + FIRST_STEP[device], first_step=FIRST_STEP[device], phase=phase,
                          notes=notes, method_buffers=st.buffers, projectors=st.projectors)


# ---------------------------------------------------------------------------------------------
# the recipe


def read_model_config(path: str | None):
    """(ModelConfig, path) of an HF folder (config.json) or a .gguf file (header), without reading weights."""
    from ..models.config import ModelConfig
    from ..models.loader import default_model_path

    from ..models.hub_cache import local_model_path

    p = local_model_path(path) if path is not None else default_model_path()
    if not p.exists():
        raise FileNotFoundError(f"--model {p} does not exist; pass a Hugging Face folder or a .gguf file")
    if p.is_file():
        from ..models.gguf import read_gguf_config

        return read_gguf_config(p), p
    cj = p / "config.json"
    if not cj.exists():
        raise FileNotFoundError(f"{cj} not found: --model must be a Hugging Face model folder or a .gguf file")
    return ModelConfig.from_hf(json.loads(cj.read_text(encoding="utf-8"))), p


def resolve_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype != "auto":
        return device, dtype
    from ..precision import native_bf16_cpu

    # the rule the recipes follow (leantune.precision): bf16 on CUDA and on a CPU with native bf16
    return device, "bf16" if device == "cuda" or native_bf16_cpu() else "fp32"


def format_table(est: MemoryEstimate, title: str) -> str:
    lines = [title, f"{'':2}{'component':34}{'MiB':>12}"]
    lines += [f"{'':2}{name:34}{b / MiB:12.1f}" for name, b in est.rows()]
    lines += [f"{'':2}{'-' * 46}", f"{'':2}{'total (peak, ' + est.phase + ')':34}{est.total / MiB:12.1f}",
              f"{'':2}{'of which the step adds':34}{est.step / MiB:12.1f}"]
    return "\n".join(lines)


def estimate(cfg: EstimateConfig) -> dict:
    """Print the table for `cfg`; returns the estimate as a dict of bytes."""
    model_cfg, path = read_model_config(cfg.model)
    from ..methods.registry import get_method

    spec = get_method(cfg.method)
    base = spec.memory is not None and not spec.lora_shaped
    trains_base = spec.trains_base
    # finetune trains base weights in fp32 (precision.resolve_precision): auto picks it
    device, dtype = resolve_device_dtype(cfg.device, "fp32" if trains_base and cfg.dtype == "auto" else cfg.dtype)
    if base:
        from ..methods.qst import QSTConfig

        qst = QSTConfig(reduction=cfg.qst_reduction, peft_hidden_size=cfg.qst_hidden_size)  # QST's memory knobs
        est = estimate_base_method(model_cfg, cfg.method, cfg.batch // cfg.nproc, cfg.seq, dtype, device,
                                   cfg.gradient_checkpointing, cfg.optimizer, cfg.grad_accum, cfg.loss_chunk,
                                   cfg.galore_rank, cfg.galore_proj_type, cfg.galore_per_layer, cfg.sara_fraction, qst)
    else:
        est = estimate_memory(model_cfg, cfg.method, cfg.batch // cfg.nproc, cfg.seq, cfg.rank, cfg.targets,
                              cfg.dropout, dtype, device, cfg.gradient_checkpointing, cfg.optimizer, cfg.grad_accum,
                              cfg.loss_chunk)
    est = per_rank(est, cfg.nproc, cfg.parallel)
    warnings = est.notes["warnings"] = list(est.notes["warnings"])
    if trains_base and dtype != "fp32":
        warnings.append(f"finetune refuses --dtype {dtype} for --method {cfg.method} (base weights train in fp32); "
                        f"this is a pure-{dtype} estimate")
    phased = spec.fit is not None  # a method training in phases of its own (LT-SFT): finetune refuses torchrun
    if cfg.nproc > 1 and (cfg.optimizer != "adamw" or phased):
        what = f"--optimizer {cfg.optimizer}" if cfg.optimizer != "adamw" else f"--method {cfg.method} (phases)"
        warnings.append(f"not runnable yet under --parallel: finetune refuses {what} with --nproc > 1; this is "
                        f"the memory per rank it would take with {cfg.parallel}'s sharding")
    if base:
        warnings.append("activations are approximate for this method (LoRA's rules with each linear keeping its "
                        "input); weights, gradients and optimizer state are exact counts")
    gc = ", gradient checkpointing" if cfg.gradient_checkpointing else ""
    ranks = f", per rank of {cfg.nproc} ({cfg.parallel})" if cfg.nproc > 1 else ""
    what = f"{cfg.method} r={cfg.rank} ({cfg.targets})" if not base else cfg.method
    if cfg.optimizer in ("galore_adamw", "natural_galore"):
        opt_name = f"{cfg.optimizer} rank {cfg.galore_rank}" + (" per layer" if cfg.galore_per_layer else "")
    else:
        opt_name = cfg.optimizer
    title = (f"{path.name}: {what}, batch {cfg.batch} x seq {cfg.seq}, "
             f"{dtype} on {device}, {opt_name}{gc}{ranks}")
    print(format_table(est, title))
    if model_cfg.num_experts:
        print(f"  parameters: {est.notes['params'] / 1e6:.1f}M, of which {est.notes['active_params'] / 1e6:.1f}M active per "
              f"token ({model_cfg.num_experts_per_tok} of {model_cfg.num_experts} experts; all experts are in memory)")
    for w in est.notes["warnings"]:
        print(f"  warning: {w}")
    if device == "cpu":
        print("  (CPU: glibc's malloc keeps freed memory for reuse, so RSS can exceed this by up to the "
              "activations;\n   MALLOC_MMAP_THRESHOLD_=65536 makes RSS follow the live tensors)", file=sys.stderr)
    out = {**{k: v for k, v in asdict(est).items() if k != "notes"}, "nproc": cfg.nproc, "total": est.total, "step": est.step,
           "device": device, "dtype": dtype, **est.notes}
    if cfg.json:
        print(json.dumps(out))
    return out
