"""The one configuration dataclass of the Llama-family model (Llama 2/3, Mistral, Qwen2/3, SmolLM2, Phi-3).

Field names follow Hugging Face's `config.json` where they can, so `from_hf` / `to_hf` are thin.
transformers 5 writes RoPE settings as `rope_parameters`; transformers 4 as `rope_theta` + `rope_scaling`:
both are read, and `to_hf` writes both so either version loads a merged folder.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


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
    sliding_window: int | None = None  # Mistral, Phi-3
    fused_qkv: bool = False  # Phi-3: one self_attn.qkv_proj (rows q, k, v) instead of q/k/v_proj
    fused_gate_up: bool = False  # Phi-3: one mlp.gate_up_proj (rows gate, up) instead of gate/up_proj
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
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

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed `config.json`."""
        mt = d.get("model_type", "llama")
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
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
            "partial_rotary_factor", "original_max_position_embeddings",
        }
        att_bias = bool(d.get("attention_bias", False))
        sw = d.get("sliding_window")
        if mt in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
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
            partial_rotary_factor=float(partial),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=att_bias or mt == "qwen2",
            o_bias=att_bias and mt != "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=mt == "qwen3",
            sliding_window=sw,
            fused_qkv=mt == "phi3",
            fused_gate_up=mt == "phi3",
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers (4.x and 5.x) loads as the matching architecture."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM"}
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
        if self.model_type in ("mistral", "phi3"):
            d["sliding_window"] = self.sliding_window
        if self.model_type == "phi3":  # transformers' Phi3Config reads this over rope_scaling's (default 4096)
            d["original_max_position_embeddings"] = (self.rope_scaling or {}).get(
                "original_max_position_embeddings", self.max_position_embeddings)
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
