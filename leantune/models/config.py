"""The one configuration dataclass of the Llama-family model (Llama 2/3, Mistral, Qwen2/3, SmolLM2, Phi-3,
Gemma 2/3, Mixtral, Qwen3-MoE).

Field names follow Hugging Face's `config.json` where they can, so `from_hf` / `to_hf` are thin.
transformers 5 writes RoPE settings as `rope_parameters`; transformers 4 as `rope_theta` + `rope_scaling`:
both are read, and `to_hf` writes both so either version loads a merged folder.

Gemma 2 and Gemma 3 (text) are the same skeleton switched by flags, not a subclass: (1 + w) RMSNorm, GeGLU,
scaled embeddings, norms after attention and MLP too, soft-capped scores/logits, per-layer sliding windows
(`layer_types`) and, in Gemma 3, a second RoPE base for the sliding layers (transformers 5 stores it as
`rope_parameters = {"sliding_attention": {...}, "full_attention": {...}}`; 4.x as `rope_local_base_freq`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "mixtral", "qwen3_moe", "phi3")
GEMMA_TYPES = ("gemma2", "gemma3_text")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")  # the MLP's gate activation (HF's hidden_act names)
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    model_type: str = "llama"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} / {"rope_type": "linear", "factor"} / {"rope_type": "longrope",
    # "short_factor", "long_factor", "original_max_position_embeddings", optional "factor", "attention_factor"}
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0  # Phi-4-mini: RoPE turns the first 0.75 of each head, the rest passes
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q/k/v only
    o_bias: bool = False  # Llama's attention_bias=True puts a bias on o_proj too
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before RoPE
    sliding_window: int | None = None  # Mistral, Phi-3: every layer; Gemma: the layers `layer_types` marks sliding
    # Gemma 2/3 (see the module docstring); the defaults are the Llama family's
    hidden_act: str = "silu"  # "gelu_pytorch_tanh": GeGLU
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + w), the product in fp32
    embed_scale: bool = False  # embeddings times sqrt(hidden_size)
    sandwich_norms: bool = False  # a norm after attention and after the MLP too (+ pre_feedforward_layernorm)
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5; None: head_dim ** -0.5
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)
    layer_types: list[str] | None = None  # per layer, LAYER_TYPES; None: every layer uses `sliding_window`
    rope_local_theta: float | None = None  # Gemma 3: the sliding layers' RoPE base (unscaled)
    fused_qkv: bool = False  # Phi-3: one self_attn.qkv_proj (rows q, k, v) instead of q/k/v_proj
    fused_gate_up: bool = False  # Phi-3: one mlp.gate_up_proj (rows gate, up) instead of gate/up_proj
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Mixture of experts (moe.py; Mixtral, Qwen3-MoE): 0 experts = dense MLPs everywhere
    num_experts: int = 0  # HF: num_local_experts (Mixtral), num_experts (Qwen3-MoE)
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0  # an expert's F; 0 -> intermediate_size (Mixtral)
    norm_topk_prob: bool = True  # renormalize the top-k router weights (always on for Mixtral)
    decoder_sparse_step: int = 1  # Qwen3-MoE: layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: list = field(default_factory=list)  # ... and i is not listed here
    router_aux_loss_coef: float = 0.0  # load-balancing loss weight, added in training when
    output_router_logits: bool = False  # ... this is on (as transformers adds it)
    router_jitter_noise: float = 0.0  # Mixtral: multiplicative noise on the MoE input in training
    extra: dict = field(default_factory=dict)  # unknown HF keys, kept so `to_hf` round-trips

    def __post_init__(self):
        if self.model_type not in SUPPORTED_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; leantune runs the Llama family: {SUPPORTED_TYPES}"
            )
        if self.head_dim <= 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")
        if self.layer_types is not None:
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad or len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types must list one of {LAYER_TYPES} per layer ({self.num_layers}), "
                                 f"got {self.layer_types}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}")
        rt = (self.rope_scaling or {}).get("rope_type", "default")
        if rt not in ("default", "llama3", "linear", "longrope"):
            raise ValueError(f"rope_type {rt!r} is not supported (default, linear, llama3, longrope)")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1] and turn an even "
                             f"number of each head's {self.head_dim} dims (it gives {self.rotary_dim})")
        if rt == "longrope":
            for k in ("short_factor", "long_factor"):
                n = len(self.rope_scaling.get(k) or ())
                if n != self.rotary_dim // 2:
                    raise ValueError(f"rope_scaling.{k} has {n} entries; longrope needs one per rotated pair "
                                     f"({self.rotary_dim // 2} = head_dim * partial_rotary_factor / 2)")
            if not self.rope_scaling.get("original_max_position_embeddings"):
                raise ValueError("rope_scaling (longrope) needs original_max_position_embeddings")

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE turns (the first ones), as transformers rounds it."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i (None: full causal attention)."""
        if self.layer_types is None or self.layer_types[i] == "sliding_attention":
            return self.sliding_window
        return None

    def layer_rope_local(self, i: int) -> bool:
        """Whether layer i takes the local RoPE base (Gemma 3's sliding layers)."""
        return self.rope_local_theta is not None and self.layer_window(i) is not None

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5
    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def is_moe_layer(self, i: int) -> bool:
        """Does decoder layer i hold experts (moe.SparseMoeBlock) rather than a dense MLP? (Qwen3-MoE's rule.)"""
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % max(self.decoder_sparse_step, 1) == 0)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed `config.json`."""
        mt = d.get("model_type", "llama")
        if mt == "gemma3":
            raise ValueError("model_type 'gemma3' is the multimodal Gemma 3 (Gemma3ForConditionalGeneration); "
                             "leantune runs its text model: pass a gemma3_text folder (e.g. google/gemma-3-1b-it)")
        rope = dict(d.get("rope_parameters") or {})
        local_theta = d.get("rope_local_base_freq", 10000.0) if mt == "gemma3_text" else None
        if "full_attention" in rope:  # transformers 5's Gemma 3: one RoPE setting per layer type
            local = dict(rope.get("sliding_attention") or {})
            if local.get("rope_type", "default") != "default":
                raise ValueError(f"a scaled RoPE on sliding layers ({local}) is not supported")
            local_theta = local.get("rope_theta", local_theta)
            rope = dict(rope["full_attention"] or {})
        default_theta = 1_000_000.0 if mt == "gemma3_text" else 10000.0
        theta = rope.pop("rope_theta", d.get("rope_theta", default_theta))
        partial = rope.pop("partial_rotary_factor", None) or d.get("partial_rotary_factor") or 1.0
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "partial_rotary_factor")}
            scaling.setdefault("rope_type", scaling.pop("type", "default"))
            if scaling["rope_type"] in ("su", "yarn") and mt == "phi3":
                scaling["rope_type"] = "longrope"  # Phi-3's early names for it, renamed as transformers does
            if scaling["rope_type"] == "longrope" and d.get("original_max_position_embeddings"):
                # Phi-3 keeps the pretraining length beside rope_scaling; transformers gives that one priority
                scaling["original_max_position_embeddings"] = d["original_max_position_embeddings"]
            if scaling["rope_type"] == "default":
                scaling = None
        known = {
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "model_type", "rms_norm_eps", "rope_theta", "rope_scaling",
            "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
            "sliding_window", "use_sliding_window", "bos_token_id", "eos_token_id", "pad_token_id",
            "hidden_act", "hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping",
            "final_logit_softcapping", "layer_types", "sliding_window_pattern", "_sliding_window_pattern",
            "rope_local_base_freq", "use_bidirectional_attention",
            *_MOE_KEYS,
            "partial_rotary_factor", "original_max_position_embeddings",
        }
        att_bias = bool(d.get("attention_bias", False))
        sw = d.get("sliding_window")
        if mt in ("qwen2", "qwen3", "qwen3_moe") and not d.get("use_sliding_window", False):
            sw = None  # Qwen2/3 write a window but only use it with use_sliding_window
        if mt == "llama":
            sw = None
        gemma = mt in GEMMA_TYPES
        if gemma and d.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=True (an encoder Gemma) is not supported: leantune's "
                             "models are causal decoders")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0,
            model_type=mt,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            partial_rotary_factor=float(partial),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            qkv_bias=att_bias or mt == "qwen2",
            o_bias=att_bias and mt != "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=mt in ("qwen3", "qwen3_moe", "gemma3_text"),
            sliding_window=sw,
            hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "silu",
            norm_unit_offset=gemma,
            embed_scale=gemma,
            sandwich_norms=gemma,
            # absent keys take transformers' defaults for the type (a hand-written config.json)
            query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256) if gemma else None,
            attn_logit_softcapping=d.get("attn_logit_softcapping", 50.0 if mt == "gemma2" else None) if gemma else None,
            final_logit_softcapping=d.get("final_logit_softcapping", 30.0 if mt == "gemma2" else None) if gemma else None,
            layer_types=_gemma_layer_types(d, mt) if gemma else None,
            rope_local_theta=None if local_theta is None else float(local_theta),
            fused_qkv=mt == "phi3",
            fused_gate_up=mt == "phi3",
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            **_moe_from_hf(d, mt),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers (4.x and 5.x) loads as the matching architecture."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "phi3": "Phi3ForCausalLM"}
        d = {k: v for k, v in self.extra.items() if k not in ("architectures", "quantization_config", "dtype", "torch_dtype")}
        rope_params = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.partial_rotary_factor != 1.0:
            rope_params["partial_rotary_factor"] = d["partial_rotary_factor"] = self.partial_rotary_factor
        if self.rope_scaling:
            rope_params.update(self.rope_scaling)
        d.update(
            architectures=[arch[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            rope_parameters=rope_params,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            mlp_bias=self.mlp_bias,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type != "qwen2":
            d["attention_bias"] = self.qkv_bias
        if self.model_type in ("mistral", "mixtral", "phi3"):
            d["sliding_window"] = self.sliding_window
        if self.model_type == "phi3":  # transformers' Phi3Config reads this over rope_scaling's (default 4096)
            d["original_max_position_embeddings"] = (self.rope_scaling or {}).get(
                "original_max_position_embeddings", self.max_position_embeddings)
        if self.model_type in GEMMA_TYPES:
            d.update(hidden_activation=self.hidden_act, query_pre_attn_scalar=self.query_pre_attn_scalar,
                     attn_logit_softcapping=self.attn_logit_softcapping,
                     final_logit_softcapping=self.final_logit_softcapping, sliding_window=self.sliding_window,
                     layer_types=self.layer_types)
        if self.rope_local_theta is not None:  # both spellings, as for rope_theta above
            d["rope_local_base_freq"] = self.rope_local_theta
            d["rope_parameters"] = {"full_attention": rope_params,
                                    "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_theta}}
        if self.num_experts:
            d.update(self._moe_to_hf())
        return d

    def _moe_to_hf(self) -> dict[str, Any]:
        d = dict(num_experts_per_tok=self.num_experts_per_tok, router_aux_loss_coef=self.router_aux_loss_coef,
                 output_router_logits=self.output_router_logits)
        if self.model_type == "mixtral":
            d.update(num_local_experts=self.num_experts, router_jitter_noise=self.router_jitter_noise)
        else:
            d.update(num_experts=self.num_experts, moe_intermediate_size=self.expert_intermediate_size,
                     norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=self.decoder_sparse_step,
                     mlp_only_layers=list(self.mlp_only_layers))
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _gemma_layer_types(d: dict[str, Any], mt: str) -> list[str]:
    """Gemma's per-layer attention kinds: `layer_types` when written, else every `sliding_window_pattern`-th
    layer full (transformers' default: 2 for Gemma 2, 6 for Gemma 3)."""
    if d.get("layer_types"):
        return list(d["layer_types"])
    every = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or (2 if mt == "gemma2" else 6)
    return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(d["num_hidden_layers"])]


_MOE_KEYS = ("num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
             "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "output_router_logits",
             "router_jitter_noise")


def _moe_from_hf(d: dict[str, Any], mt: str) -> dict[str, Any]:
    """The MoE fields of a Mixtral / Qwen3-MoE `config.json` (with transformers' defaults); none for dense types."""
    if mt == "mixtral":
        return dict(num_experts=d.get("num_local_experts", d.get("num_experts", 8)), num_experts_per_tok=d.get("num_experts_per_tok", 2),
                    norm_topk_prob=True, router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001),
                    output_router_logits=bool(d.get("output_router_logits", False)),
                    router_jitter_noise=d.get("router_jitter_noise", 0.0) or 0.0)
    if mt == "qwen3_moe":
        # the Hub's configs write num_experts; transformers 5 saves it as num_local_experts (its attribute_map)
        return dict(num_experts=d.get("num_experts", d.get("num_local_experts", 128)), num_experts_per_tok=d.get("num_experts_per_tok", 8),
                    moe_intermediate_size=d.get("moe_intermediate_size", 768),
                    norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                    decoder_sparse_step=d.get("decoder_sparse_step", 1),
                    mlp_only_layers=list(d.get("mlp_only_layers") or []),
                    router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001),
                    output_router_logits=bool(d.get("output_router_logits", False)))
    return {}
