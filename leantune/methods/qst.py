"""QST, Quantized Side Tuning (Zhang et al. 2024, arXiv 2401.07159; YouAreSpecialToMe/QST @27cef0a): a small side
network beside a frozen 4-bit (NF4 + double quantization) base. It reads downsampled hidden states of every base
layer and its output is gated into the base's final hidden state before the shared, frozen LM head:

    h_0 = Emb(x);  g = D_0(h_0)                                  (base under no_grad: no backprop through it)
    for i < L:  h_{i+1} = LLM_i(h_i)
                s_i = (1 - sigmoid(z_i)) * D_i(h_{i+1}) + sigmoid(z_i) * g
                g = Side_i(s_i)                                  (leantune's decoder Block at width d/r)
    o = (1 - sigmoid(z_out)) * U(RMSNorm_side(g)) + sigmoid(z_out) * RMSNorm(h_L);  logits = LMHead(o)

`D_i` is a low-rank adapter d -> peft_hidden_size -> d/r with swish between and a LayerNorm after (the official
default), or a parameter-free average / max pool over channel groups of r. The side blocks are leantune's own
`Block` built from a copy of the base's ModelConfig with width, FFN width and head size divided by r and the same
number of heads, so (d/r) % n_heads must be 0 (and the side's head size even, for RoPE's pairs). Official-code
pitfalls not copied: the adapter's dropout is a Dropout when dropout > 0 (the official test is inverted); the
gates' initial logits are options (z_i 0.5 and z_out `gate_init_logit`, 1.0 as the code: sigmoid(1) = 0.73, so
QST is not the base at init; a large value, e.g. 10, starts near the base).

Applying QST wraps the model: `apply(model, "qst")` returns a `QSTForCausalLM` (the recipes use what `apply`
and `load_adapter` return). The wrapper shows the same stages as the base (`embed`, `layer_context`,
`layer_forward`, `final_norm`, `head`), so `generate`, the trainer's loss and the serving runner run it unchanged:
between stages it carries the base's hidden state and the side's state side by side in one tensor (B, T, d + d/r),
and its side blocks keep their keys and values in the same KV cache as the base, as cache layers L..2L-1 (which
the caches make on first use). Rows routed to another adapter slot (-1: the base) get the base's own output, so
one engine serves the base and the QST adapter (`leantune serve --adapter NAME=DIR` wraps the model at start).
Saved as a folder of its own (`qst_config.json` naming the base, plus `qst_model.safetensors` with the side
network) and QLoRA's `leantune.json` sidecar, so generate, chat and serve load the same 4-bit base the side
network was trained against. It cannot be merged or exported (it changes no weight of the base).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..fields import opt
from . import base as mbase
from .memory import MemoryModel, SideNetwork, TrainedState
from .registry import register_method

CONFIG_NAME = "qst_config.json"
WEIGHTS_NAME = "qst_model.safetensors"
FORMAT = "leantune-qst"
FORMAT_VERSION = 1
DOWNSAMPLERS = ("adapter", "avgpool", "maxpool")
SIDE_GATE_INIT_LOGIT = 0.5  # z_i, as the official code (QSTConfig) initializes them


@dataclass
class QSTConfig:
    reduction: int = opt(16, "QST: the side network's width, FFN width and head size are the base's divided by r",
                         flag="--qst-reduction")
    peft_hidden_size: int = opt(16, "QST: inner width of each adapter downsampler D_i (d -> this -> d/r)",
                                flag="--qst-hidden-size")
    downsample: str = opt("adapter", "QST: downsampler D_i of each layer's hidden state: adapter (low-rank, swish, "
                                     "LayerNorm; trains), avgpool or maxpool (over channel groups of r; no weights)",
                          flag="--qst-downsample")
    dropout: float = opt(0.1, "dropout on the adapter branch (QST: on each downsampler's input)", flag="--dropout")
    gate_init_logit: float = opt(1.0, "QST: initial logit of the output gate z_out (sigmoid = the base's share of "
                                      "the output; 1.0 as the official code, ~10 starts as the base)",
                                 flag="--qst-gate-init-logit")
    quant_type: str = opt("nf4", "4-bit data type of the frozen base: nf4 or fp4", cli=False)
    blocksize: int = opt(64, "weights per absmax block", cli=False)
    double_quant: bool = opt(True, "quantize the absmax values too (double quantization)", cli=False)

    def __post_init__(self):
        from ..quant import Quant4bitConfig

        if isinstance(self.reduction, bool) or not isinstance(self.reduction, int) or self.reduction < 1:
            raise ValueError(f"--qst-reduction must be an integer >= 1, got {self.reduction!r}")
        if isinstance(self.peft_hidden_size, bool) or not isinstance(self.peft_hidden_size, int) \
                or self.peft_hidden_size < 1:
            raise ValueError(f"--qst-hidden-size must be an integer >= 1, got {self.peft_hidden_size!r}")
        if self.downsample not in DOWNSAMPLERS:
            raise ValueError(f"--qst-downsample must be one of {DOWNSAMPLERS}, got {self.downsample!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout!r}")
        if not math.isfinite(self.gate_init_logit):
            raise ValueError(f"--qst-gate-init-logit must be a finite number, got {self.gate_init_logit!r}")
        Quant4bitConfig(self.quant_type, self.blocksize, self.double_quant)  # validates

    def check_model(self, mc) -> None:
        """Does this config fit a base of ModelConfig `mc`? Raises naming the option and what to change."""
        d, h, r = mc.hidden_size, mc.num_heads, self.reduction
        if d % r:
            raise ValueError(f"--qst-reduction {r} does not divide the model's hidden size {d}; pick a divisor of {d}")
        if (d // r) % h or (d // r // h) % 2:
            fits = [k for k in range(1, d + 1) if d % k == 0 and (d // k) % (2 * h) == 0]
            raise ValueError(f"--qst-reduction {r}: the side network's width d/r = {d // r} must be a multiple of the "
                             f"model's {h} attention heads (the side layers keep them) with an even size per head "
                             f"(RoPE turns pairs); use one of {fits}")
        if mc.intermediate_size < r:
            raise ValueError(f"--qst-reduction {r} is larger than the model's FFN width {mc.intermediate_size}")


def side_model_config(mc, cfg: QSTConfig):
    """The side decoder's ModelConfig: the base's, shrunk by r (width, FFN, head size), same heads and windows,
    dense, unfused, plain RoPE (a longrope table has one entry per base frequency, not per side one)."""
    d_s = mc.hidden_size // cfg.reduction
    return dataclasses.replace(
        mc, hidden_size=d_s, intermediate_size=mc.intermediate_size // cfg.reduction, head_dim=d_s // mc.num_heads,
        num_experts=0, mlp_only_layers=[], fused_qkv=False, fused_gate_up=False, rope_scaling=None,
        partial_rotary_factor=1.0, rope_local_theta=None, query_pre_attn_scalar=None, attn_logit_softcapping=None,
        final_logit_softcapping=None, embed_scale=False, qk_norm=False, extra={})


class AdapterDownsample(nn.Module):
    """D_i: dropout -> A (d -> k, no bias) -> swish -> B (k -> d/r, no bias) -> LayerNorm (official AdapterLinear
    with add_layer_norm_after_adapter; both linears kaiming-uniform, nn.Linear's init)."""

    def __init__(self, d: int, k: int, d_s: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # the right way round (pitfall 1)
        self.A = nn.Linear(d, k, bias=False)
        self.B = nn.Linear(k, d_s, bias=False)
        self.norm = nn.LayerNorm(d_s)

    def forward(self, x):  # (..., d) -> (..., d/r)
        return self.norm(self.B(F.silu(self.A(self.dropout(x)))))


class PoolDownsample(nn.Module):
    """Parameter-free D_i: the mean or max of each group of r consecutive channels, d -> d/r."""

    def __init__(self, r: int, kind: str):
        super().__init__()
        self.r, self.kind = r, kind

    def forward(self, x):
        g = x.unflatten(-1, (-1, self.r))  # (..., d/r, r)
        return g.mean(-1) if self.kind == "avgpool" else g.amax(-1)


class QSTSide(nn.Module):
    """The trainable part: downsamplers D_0..D_{L-1}, side blocks, side gates z_i, the side's final norm, the
    upsampler U and the output gate z_out."""

    def __init__(self, mc, cfg: QSTConfig):
        super().__init__()
        from ..models.llama import Block, make_norm

        cfg.check_model(mc)
        self.cfg, self.side_cfg = cfg, side_model_config(mc, cfg)
        d, d_s, L = mc.hidden_size, self.side_cfg.hidden_size, mc.num_layers

        def down():
            if cfg.downsample == "adapter":
                return AdapterDownsample(d, cfg.peft_hidden_size, d_s, cfg.dropout)
            return PoolDownsample(cfg.reduction, cfg.downsample)

        self.downsample = nn.ModuleList(down() for _ in range(L))
        self.layers = nn.ModuleList(Block(self.side_cfg, i) for i in range(L))
        for i, block in enumerate(self.layers):
            block.self_attn.layer_idx = L + i  # its keys and values: cache layer L + i, after the base's L
        self.gates = nn.Parameter(torch.full((L, d_s), SIDE_GATE_INIT_LOGIT))  # z_i
        self.norm = make_norm(self.side_cfg)
        self.upsample = nn.Linear(d_s, d)  # U, with bias, nn.Linear's init
        self.out_gate = nn.Parameter(torch.full((d,), float(cfg.gate_init_logit)))  # z_out


@dataclass
class QSTContext:
    """What every stage of one forward shares: the base's LayerContext and the side's RoPE (its head size)."""

    base: object  # models.llama.LayerContext
    side_rope: tuple[torch.Tensor, torch.Tensor]  # (B, T, d/r / n_heads) cos, sin


class QSTForCausalLM(nn.Module):
    """A frozen base LM (`.base`) with at most one QST side network (`.side`, None: the base alone)."""

    # a server's fine-tuning jobs train LoRA through the model's layers, which this wrapper runs under no_grad
    hosts_finetuning = False

    def __init__(self, base: nn.Module):
        super().__init__()
        if isinstance(base, QSTForCausalLM):
            raise ValueError("this model already runs a QST side network; load the base model again for another")
        if mbase.list_adapters(base):
            raise ValueError(f"QST runs beside a plain base model; this one has adapters {mbase.list_adapters(base)}: "
                             "merge them first (leantune merge) or start from the base")
        self.base = base
        self.side: QSTSide | None = None
        self.adapter_name: str | None = None
        self.gradient_checkpointing = False  # recompute each side block in backward (the base keeps nothing)
        for p in base.parameters():
            p.requires_grad_(False)
        self.train(base.training)  # a model loaded for generation stays in eval mode (no dropout)

    # -- what callers read off a model --------------------------------------------------------------
    @property
    def config(self):
        return self.base.config

    @property
    def name_or_path(self) -> str | None:
        return getattr(self.base, "name_or_path", None)

    @property
    def revision(self) -> str | None:
        return getattr(self.base, "revision", None)

    @property
    def num_layers(self) -> int:
        return self.base.num_layers

    @property
    def rope_switch_len(self):
        return getattr(self.base, "rope_switch_len", None)

    def _live(self) -> QSTSide | None:
        """The side network, dropped once its adapter was deleted (`methods.delete_adapter`, a server's unload)."""
        if self.side is not None and self.adapter_name not in mbase.list_adapters(self):
            self.side, self.adapter_name = None, None
        return self.side

    def add_side(self, cfg: QSTConfig, adapter_name: str) -> QSTSide:
        if self._live() is not None:
            raise ValueError(f"this model already has the QST adapter {self.adapter_name!r}; a model runs one QST "
                             "side network (serve another one from another server)")
        mbase.check_new_adapter_name(self, adapter_name)
        device = self.base.head_module().weight.device
        self.side = QSTSide(self.config, cfg).to(device).train(self.training)
        self.adapter_name = adapter_name
        mbase.register_adapter(self, adapter_name, cfg)
        mbase.set_adapter(self, adapter_name)
        return self.side

    # -- the stages ---------------------------------------------------------------------------------
    @property
    def _d(self) -> int:
        return self.config.hidden_size

    def _base_dtype(self) -> torch.dtype:
        return self.base.head_module().weight.dtype

    def _side_dtype(self) -> torch.dtype:
        return self.side.out_gate.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, d [+ d/r]): h_0, and g = D_0(h_0) beside it."""
        with torch.no_grad():
            h = self.base.embed(input_ids)
        if self._live() is None:
            return h
        g = self.side.downsample[0](h.to(self._side_dtype()))
        return torch.cat((h.to(g.dtype), g), dim=-1)

    def layer_context(self, x: torch.Tensor, meta) -> QSTContext:
        from ..models.llama import rope_cos_sin, rope_inv_freq

        h = x[..., : self._d].to(self._base_dtype())
        with torch.no_grad():
            base_ctx = self.base.layer_context(h, meta)
        if self.side is None:
            return QSTContext(base_ctx, None)
        B, T = x.shape[:2]
        pos = meta.positions
        if pos is None:  # as the base makes them: 0..T-1 after what the cache holds
            past = meta.cache.length if meta.cache is not None else 0
            pos = torch.arange(past, past + T, device=x.device).expand(B, T)
        inv = rope_inv_freq(self.side.side_cfg).to(x.device)
        return QSTContext(base_ctx, rope_cos_sin(inv, pos, self._side_dtype()))

    def _side_step(self, i: int, h_next, g, ctx: QSTContext):
        side = self.side
        z = torch.sigmoid(side.gates[i])
        # (1 - z) * D + z * g, written so that autograd keeps one (B, T, d/r) tensor (D - g), not D and g
        s = g + (1 - z) * (side.downsample[i](h_next.to(g.dtype)) - g)
        cos, sin = ctx.side_rope
        mask = ctx.base.masks[side.side_cfg.layer_window(i)]
        return side.layers[i](s, cos, sin, mask, ctx.base.meta)

    def layer_forward(self, i: int, x: torch.Tensor, ctx: QSTContext) -> torch.Tensor:
        d = self._d
        with torch.no_grad():  # the frozen base: no graph, nothing saved for backward
            h_next = self.base.layer_forward(i, x[..., :d].to(self._base_dtype()), ctx.base)
        if self.side is None:
            return h_next
        g = x[..., d:]
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            g = checkpoint(self._side_step, i, h_next, g, ctx, use_reentrant=False)
        else:
            g = self._side_step(i, h_next, g, ctx)
        return torch.cat((h_next.to(g.dtype), g), dim=-1)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d + d/r) -> (..., 2d): the QST output o, then the base's own normed state (`head` picks per row)."""
        d = self._d
        with torch.no_grad():
            hb = self.base.final_norm(x[..., :d].to(self._base_dtype()))
        if self.side is None:
            return hb
        side = self.side
        zo = torch.sigmoid(side.out_gate)
        hb32 = hb.to(zo.dtype)
        # (1 - zo) * U(.) + zo * hb, written so that autograd keeps one (B, T, d) tensor, not two; at zo = 1 it is hb
        # exactly (oracle (e))
        o = hb32 + (1 - zo) * (side.upsample(side.norm(x[..., d:])) - hb32)
        return torch.cat((o.to(hb.dtype), hb), dim=-1)

    def _pick(self, h2: torch.Tensor, adapter_ids) -> torch.Tensor:
        """(..., 2d) -> (..., d): the QST output where a row is routed to this adapter (or no routing is given),
        the base's where it is routed elsewhere (-1: the base model)."""
        d = self._d
        if h2.shape[-1] == d:
            return h2
        o, hb = h2[..., :d], h2[..., d:]
        if adapter_ids is None:
            return o if self.adapter_name in mbase.active_adapters(self) else hb
        from ..routing import Routing

        route = Routing.of(adapter_ids)
        slot = mbase.adapter_slots(self)[self.adapter_name]
        if route.slots == {slot}:
            return o
        if slot not in route.slots:
            return hb
        return torch.where((route.token_ids(h2) == slot)[..., None], o, hb)

    def head_module(self) -> nn.Module:
        return self.base.head_module()  # frozen, shared with the base

    def head(self, h: torch.Tensor, adapter_ids=None) -> torch.Tensor:
        return self.base.head(self._pick(h, adapter_ids))

    def hidden(self, input_ids: torch.Tensor, meta=None) -> torch.Tensor:
        """(B, T) -> (B, T, d): the final hidden state the LM head reads (o, or the base's for rows routed away)."""
        from ..models.llama import ForwardMeta

        meta = meta or ForwardMeta()
        x = self.embed(input_ids)
        ctx = self.layer_context(x, meta)
        for i in range(self.num_layers):
            x = self.layer_forward(i, x, ctx)
        if meta.cache is not None:
            meta.cache.advance(x.shape[1])
        return self._pick(self.final_norm(x), meta.adapter_ids)

    def forward(self, input_ids: torch.Tensor, meta=None) -> torch.Tensor:
        return self.base.head(self.hidden(input_ids, meta))  # (B, T, V)


# -----------------------------------------------------------------------------------------------
# the method's hooks


def apply_qst(model: nn.Module, config: QSTConfig, adapter_name: str) -> QSTForCausalLM:
    """Quantize the base's decoder linears to 4 bits (unless it was loaded 4-bit), freeze it and wrap it with a
    fresh side network; returns the wrapper (the model to train)."""
    from ..quant import linear4bit_layers, quantize_model

    config.check_model(model.config)
    wrapper = model if isinstance(model, QSTForCausalLM) else QSTForCausalLM(model)
    if not linear4bit_layers(wrapper.base):
        quantize_model(wrapper.base, config.quant_type, config.blocksize, config.double_quant)
    wrapper.add_side(config, adapter_name)
    return wrapper


def load_quantization(config: QSTConfig):
    """The 4-bit base QST trains beside, made while loading (the fp32 model is never resident in full)."""
    from ..quant import Quant4bitConfig

    return Quant4bitConfig(config.quant_type, config.blocksize, config.double_quant)


def check_model(config: QSTConfig, model_config) -> None:
    config.check_model(model_config)


def _shape_of(mc) -> dict:
    return {"hidden_size": mc.hidden_size, "num_layers": mc.num_layers, "num_heads": mc.num_heads,
            "num_kv_heads": mc.num_kv_heads, "intermediate_size": mc.intermediate_size, "vocab_size": mc.vocab_size}


def save_qst(model: nn.Module, out_dir, adapter_name: str = "default",
             base_model_name_or_path: str | None = None) -> Path:
    """`qst_config.json` (format, options, the base's name and shape) + `qst_model.safetensors` (the side
    network), each written to a temp name and renamed, the config last."""
    from .adapter_io import _replace_in_folder

    if not isinstance(model, QSTForCausalLM) or model.adapter_name != adapter_name:
        raise ValueError(f"the model has no QST adapter named {adapter_name!r}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.side.state_dict().items()}
    cfg = {k: v for k, v in dataclasses.asdict(model.side.cfg).items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg,
            "base_model_name_or_path": base_model_name_or_path or model.name_or_path,
            "base_shape": _shape_of(model.config)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # the config is renamed in last: until then the folder is no QST folder
    _replace_in_folder(out, tensors, json.dumps(meta, indent=2, sort_keys=True), WEIGHTS_NAME, CONFIG_NAME)
    return out


def write_sidecar(model: nn.Module, out_dir: Path) -> None:
    """QLoRA's `leantune.json`: the base's 4-bit settings, which generate/chat/serve rebuild the base with."""
    from .qlora import write_sidecar as write

    write(model.base if isinstance(model, QSTForCausalLM) else model, out_dir)


def read_qst(path) -> tuple[QSTConfig, dict, dict[str, torch.Tensor]]:
    """(config, meta, side tensors) of a QST folder, checked for form."""
    from .adapter_io import read_format_folder

    meta, tensors = read_format_folder(path, CONFIG_NAME, WEIGHTS_NAME, FORMAT, FORMAT_VERSION, "QST adapter")
    config_path = Path(path) / CONFIG_NAME
    try:
        cfg = QSTConfig(**meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: bad QST config: {e}") from None
    return cfg, meta, tensors


def load_qst(model: nn.Module, path, adapter_name: str = "default", trainable: bool = False) -> QSTForCausalLM:
    """The saved side network beside `model` (a base, or an empty `QSTForCausalLM`); returns the wrapper. The
    folder is checked against the model before anything changes."""
    cfg, meta, tensors = read_qst(path)
    want = meta.get("base_shape") or {}
    have = _shape_of(model.config)
    diff = {k: (v, have.get(k)) for k, v in want.items() if have.get(k) != v}
    if diff:
        raise ValueError(f"QST adapter {path} was trained beside another base model "
                         f"({meta.get('base_model_name_or_path')}): (saved, this model) {diff}")
    fresh = QSTSide(model.config, cfg)
    expected = fresh.state_dict()
    bad = sorted(set(expected) ^ set(tensors)) + sorted(k for k in tensors if k in expected
                                                        and tensors[k].shape != expected[k].shape)
    if bad:
        raise ValueError(f"{path}: {WEIGHTS_NAME} does not fit its config (e.g. {bad[:3]})")
    wrapper = model if isinstance(model, QSTForCausalLM) else QSTForCausalLM(model)
    side = wrapper.add_side(cfg, adapter_name)
    dtype = side.out_gate.dtype
    side.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    for p in side.parameters():
        p.requires_grad_(trainable)
    return wrapper


def _is_qst_folder(path: Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def memory_trained(cfg, named: list, s: int, qst: QSTConfig | None = None, **_) -> TrainedState:
    """`leantune estimate`'s count of what QST trains: the side network, made in fp32 (`add_side`), under AdamW."""
    import torch

    with torch.device("meta"):
        side = QSTSide(cfg, qst or QSTConfig())
    numels = [p.numel() for p in side.parameters()]
    side_bytes = sum(numels) * 4
    return TrainedState(side_bytes, side_bytes, side_bytes, 2 * side_bytes + 4 * len(numels), 0, 0,
                        max(numels) * 4, numels)


def memory_side(cfg, s: int, qst: QSTConfig | None = None, **_) -> SideNetwork:
    """`leantune estimate`'s side network: the side decoder's config; per token, each layer's downsampler input
    (kept 3 times with dropout), D_i's inner activations and the gate's (fp32), and the output gate's inputs."""
    qcfg = qst or QSTConfig()
    side = side_model_config(cfg, qcfg)
    d_s, k = side.hidden_size, qcfg.peft_hidden_size
    down = cfg.hidden_size * s * (3 if qcfg.dropout > 0 else 1) + 3 * k * 4 + 4 * d_s * 4  # D_i and the gate
    return SideNetwork(side, down, 2 * cfg.hidden_size * 4)


MEMORY = MemoryModel(trained=memory_trained, side=memory_side, trainable_row="QST side network")

register_method("qst", QSTConfig, apply_qst, quantize=load_quantization, check_model=check_model, save=save_qst,
                memory=MEMORY, load=load_qst, claims=_is_qst_folder, extra_files=write_sidecar, wrap=QSTForCausalLM,
                help="QST, quantized side tuning (Zhang et al. 2024): a side network at width d/r beside a frozen "
                     "4-bit base, fed its downsampled hidden states, no backprop through the base; own format "
                     "(qst_config.json)")
