"""4-bit quantization for QLoRA: NF4/FP4 blockwise codes with double quantization, bit-identical to
bitsandbytes, a 4-bit `Linear4bit` layer with bitsandbytes' state-dict keys, and whole-model swap.

    from leantune.quant import quantize_4bit, dequantize_4bit, Linear4bit, quantize_model
    packed, state = quantize_4bit(w)                 # nf4, blocksize 64, double quantization
    w2 = dequantize_4bit(packed, state)              # state.dtype, shape of w
    quantize_model(model)                            # decoder nn.Linear -> Linear4bit (not lm_head), MoE experts
                                                     # -> Stacked4bit (per-expert 4-bit stacks)
"""
from .codes import FP4_CODE, NF4_CODE, QUANT_TYPES, codebook, dynamic_map
from .linear4bit import DequantizedLinear, Linear4bit
from .model import (
    Quant4bitConfig, hf_quantization_config, is_bnb_4bit_config, linear4bit_layers, quantizable_linears,
    quantize_model,
)
from .nf4 import (
    bits_per_param, block_absmax, compress_absmax, dequantize_4bit, dequantize_blockwise_8bit, quantize_4bit,
    quantize_blockwise_8bit, quantized_nbytes, unpack_codes,
)
from .stacked4bit import Stacked4bit
from .state import BLOCKSIZES, NestedState, QuantState, is_quant_state_key

__all__ = [
    "BLOCKSIZES",
    "FP4_CODE",
    "NF4_CODE",
    "QUANT_TYPES",
    "DequantizedLinear",
    "Linear4bit",
    "NestedState",
    "Quant4bitConfig",
    "QuantState",
    "Stacked4bit",
    "bits_per_param",
    "block_absmax",
    "codebook",
    "compress_absmax",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "dynamic_map",
    "hf_quantization_config",
    "is_bnb_4bit_config",
    "is_quant_state_key",
    "linear4bit_layers",
    "quantizable_linears",
    "quantize_4bit",
    "quantize_blockwise_8bit",
    "quantize_model",
    "quantized_nbytes",
    "unpack_codes",
]
