"""Tiny random leantune Llama models (no transformers), shared by the fused-op and kernel tests."""
import torch

import leantune.methods as lm
from leantune.models.config import ModelConfig
from leantune.models.llama import LlamaForCausalLM


def tiny_lt_model(tie: bool = True, vocab: int = 256) -> LlamaForCausalLM:
    """2 layers, width 64, GQA 4/2 heads; every parameter ~N(0, 0.05) (seed 0)."""
    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tie))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def tiny_qlora_model(device: str = "cpu", vocab: int = 256) -> LlamaForCausalLM:
    """`tiny_lt_model` with its decoder linears in NF4 + double quantization and a LoRA (r=4) on each,
    B drawn ~N(0, 0.05) so the adapters change the output."""
    from leantune.quant import quantize_model

    model = quantize_model(tiny_lt_model(tie=True, vocab=vocab)).to(device)
    lm.apply(model, "lora", r=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        for _, layer in lm.adapter_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    return model
