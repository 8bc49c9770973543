"""The one configuration dataclass of the Llama-family model (Llama 2/3, Mistral, Qwen2, SmolLM2).

Field names follow Hugging Face's `config.json` where they can, so `from_hf` / `to_hf` are thin.
transformers 5 writes RoPE settings as `rope_parameters`; transformers 4 as `rope_theta` + `rope_scaling`:
both are read, and `to_hf` writes both so either version loads a merged folder.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")


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
    # "original_max_position_embeddings"} / {"rope_type": "linear", "factor"}
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q/k/v only
    o_bias: bool = False  # Llama's attention_bias=True puts a bias on o_proj too
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before RoPE
    sliding_window: int | None = None  # Mistral
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
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}")
        rt = (self.rope_scaling or {}).get("rope_type", "default")
        if rt not in ("default", "llama3", "linear"):
            raise ValueError(f"rope_type {rt!r} is not supported (default, linear, llama3)")

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

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
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.pop("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
        known = {
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "model_type", "rms_norm_eps", "rope_theta", "rope_scaling",
            "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
            "sliding_window", "use_sliding_window", "bos_token_id", "eos_token_id", "pad_token_id",
            *_MOE_KEYS,
        }
        att_bias = bool(d.get("attention_bias", False))
        sw = d.get("sliding_window")
        if mt in ("qwen2", "qwen3", "qwen3_moe") and not d.get("use_sliding_window", False):
            sw = None  # Qwen2/3 write a window but only use it with use_sliding_window
        if mt == "llama":
            sw = None
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
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=att_bias or mt == "qwen2",
            o_bias=att_bias and mt != "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=mt in ("qwen3", "qwen3_moe"),
            sliding_window=sw,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            **_moe_from_hf(d, mt),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers (4.x and 5.x) loads as the matching architecture."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
        d = {k: v for k, v in self.extra.items() if k not in ("architectures", "quantization_config", "dtype", "torch_dtype")}
        rope_params = {"rope_theta": self.rope_theta, "rope_type": "default"}
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
            hidden_act="silu",
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
        if self.model_type in ("mistral", "mixtral"):
            d["sliding_window"] = self.sliding_window
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
