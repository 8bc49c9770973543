"""Tiny random `transformers` checkpoints of each supported family, shared by the parity tests."""
import torch

FAMILIES = {
    "llama": dict(model_type="llama"),
    "llama3": dict(model_type="llama", rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                           high_freq_factor=4.0, original_max_position_embeddings=16)),
    "llama-bias": dict(model_type="llama", attention_bias=True, mlp_bias=True),
    "mistral": dict(model_type="mistral", sliding_window=8),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=32),  # q/k RMSNorm; head_dim != hidden / heads, as in Qwen3
    "smollm2-tied": dict(model_type="llama", tie_word_embeddings=True, num_key_value_heads=1),
    # Gemma 2: alternating window 8 (shorter than the parity tests' sequences), soft caps small enough to bite,
    # a query_pre_attn_scalar apart from head_dim, tied embeddings as in every Gemma; weights
    # drawn 5x wider than the default so attention scores reach the cap
    "gemma2": dict(model_type="gemma2", sliding_window=8, head_dim=32, query_pre_attn_scalar=24,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0, tie_word_embeddings=True,
                   initializer_range=0.1),
    # Gemma 3: q/k norms, sliding layers on their own RoPE base, linearly scaled global RoPE, 2 of 3 layers local
    "gemma3": dict(model_type="gemma3_text", sliding_window=8, head_dim=32, query_pre_attn_scalar=32,
                   num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   rope_local_base_freq=100.0, rope_scaling=dict(rope_type="linear", factor=2.0),
                   tie_word_embeddings=True, initializer_range=0.1),
    # MoE: 4 experts, top-2; Qwen3-MoE without renormalization and with one dense layer (mlp_only_layers)
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
    "qwen3-moe": dict(model_type="qwen3_moe", head_dim=32, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1]),
    # Phi-3: fused qkv_proj / gate_up_proj; a window shorter than the tests' sequences, as Phi-3-mini-4k has one
    "phi3": dict(model_type="phi3", sliding_window=12),
    # Phi-3.5: longrope, the long factors used past original_max_position_embeddings (the tests run 20-40 tokens)
    "phi3-longrope": dict(model_type="phi3", original_max_position_embeddings=16, rope_scaling=dict(
        rope_type="longrope", short_factor=[1.0 + 0.05 * i for i in range(8)], long_factor=[4.0 + 6.0 * i for i in range(8)])),
    # Phi-4-mini: RoPE on 3/4 of each head (12 of 16 dims: 6 factors), tied embeddings, longrope
    "phi4-mini": dict(model_type="phi3", partial_rotary_factor=0.75, tie_word_embeddings=True, num_key_value_heads=1,
                      original_max_position_embeddings=16, rope_scaling=dict(
                          rope_type="longrope", short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                          long_factor=[4.0, 9.0, 16.0, 25.0, 36.0, 49.0])),
}


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    import transformers as tf

    spec = dict(FAMILIES[family])
    mt = spec.pop("model_type")
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(spec)
    base.update(overrides)
    cfg_cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config, "gemma2": tf.Gemma2Config, "gemma3_text": tf.Gemma3TextConfig,
               "mixtral": tf.MixtralConfig, "qwen3_moe": tf.Qwen3MoeConfig, "phi3": tf.Phi3Config}[mt]
    cfg = cfg_cls(**base)
    torch.manual_seed(seed)
    m = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
         "qwen3": tf.Qwen3ForCausalLM, "gemma2": tf.Gemma2ForCausalLM, "gemma3_text": tf.Gemma3ForCausalLM,
         "mixtral": tf.MixtralForCausalLM, "qwen3_moe": tf.Qwen3MoeForCausalLM, "phi3": tf.Phi3ForCausalLM}[mt](cfg)
    with torch.no_grad():  # random non-trivial norms and biases so parity covers them
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.normal_(0, 0.02)
            elif n.endswith("mlp.gate.weight"):  # MoE router: spread logits, so no near-tie decides a top-k
                p.normal_(0, 0.3)
    return m.eval()


def tiny_llama(seed: int = 0, **overrides):
    """A plain tiny transformers Llama with default (PEFT-test) initialization."""
    import transformers

    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    cfg.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
