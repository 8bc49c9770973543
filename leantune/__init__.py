"""leantune: cheap, quick finetuning of pretrained models, and serving of the results.

    import leantune
    model, tokenizer = leantune.load(path)            # HF folder or .gguf (None: embedded SmolLM2-135M)
    leantune.apply(model, "lora", r=8, alpha=16, targets="all-linear")
    logits = model(input_ids)                         # (batch, seq, vocab)
    leantune.save_adapter(model, out_dir); leantune.load_adapter(model, out_dir)
    leantune.apply_diff(model, "lang_diff"); leantune.revert_diff(model, "lang_diff")   # sparse diffs (SaRA, LT-SFT)
"""
from .methods import (
    apply,
    apply_diff,
    list_methods,
    load_adapter,
    merge_and_unload,
    register_method,
    revert_diff,
    save_adapter,
)
from .models.generate import GenerationConfig, generate, generate_text
from .models.loader import load, save_hf_folder

__version__ = "0.1.0"

__all__ = [
    "GenerationConfig", "apply", "apply_diff", "generate", "generate_text", "list_methods", "load", "load_adapter",
    "merge_and_unload", "register_method", "revert_diff", "save_adapter", "save_hf_folder",
]
