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
               "qwen3": tf.Qwen3Config, "phi3": tf.Phi3Config}[mt]
    cfg = cfg_cls(**base)
    torch.manual_seed(seed)
    m = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
         "qwen3": tf.Qwen3ForCausalLM, "phi3": tf.Phi3ForCausalLM}[mt](cfg)
    with torch.no_grad():  # random non-trivial norms and biases so parity covers them
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.normal_(0, 0.02)
    return m.eval()


def tiny_llama(seed: int = 0, **overrides):
    """A plain tiny transformers Llama with default (PEFT-test) initialization."""
    import transformers

    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    cfg.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
