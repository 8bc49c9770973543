"""`leantune export`: the merged model (base + adapters, merged as `leantune merge` merges them) as a GGUF
file for llama.cpp / Ollama, or with --lora-only the adapter itself as llama.cpp's LoRA GGUF.

The writer is `models/gguf_export.py`; this recipe checks the inputs (adapters made for this base, a
quant type that can be written here) before anything is loaded or written.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..fields import opt
from ..models.gguf_export import LORA_QUANTS, QUANTS, check_quant


@dataclass
class ExportConfig:
    model: str | None = opt(None, "base model: HF folder, .gguf file, or model id in the local Hugging Face cache "
                                  "(ORG/NAME[@REVISION]; default: the embedded SmolLM2-135M-Instruct)")
    revision: str | None = opt(None, "branch, tag or commit of a --model id in the Hugging Face cache (default: main)")
    adapter: list[str] = opt([], "PEFT-format adapter folder to merge in; repeat for several (QLoRA adapters "
                                 "merge onto the dequantized base)", metavar="DIR")
    output: str = opt("out/model.gguf", "the .gguf file to write")
    quant: str = opt("f16", f"tensor type: {', '.join(QUANTS)} (q4_k_m runs llama.cpp's llama-quantize; "
                            f"with --lora-only: {', '.join(LORA_QUANTS)})")
    lora_only: bool = opt(False, "write the (single) adapter as a llama.cpp LoRA GGUF instead of a merged model")
    name: str | None = opt(None, "general.name in the file (default: the model's folder or file name)")
    tokenizer_pre: str | None = opt(None, "llama.cpp pre-tokenizer name (tokenizer.ggml.pre), when leantune "
                                          "does not recognize the tokenizer's (e.g. gpt2, llama-bpe, qwen2)")
    quant_fallback: str | None = opt(None, "where --quant cannot hold a tensor (its rows are not whole blocks, e.g. "
                                           "100 values for Q8_0's 32): 'f16' stores it as F16, as llama.cpp's "
                                           "convert_hf_to_gguf.py does; default: stop before writing")
    any_base: bool = opt(False, "export even when an adapter's base_model_name_or_path names another model "
                                "(shapes are still checked)")

    def __post_init__(self):
        from ..models.hub_cache import with_revision

        self.model, self.revision = with_revision(self.model, self.revision), None  # one spec: ORG/NAME@REV
        if self.lora_only:
            check_quant(self.quant, LORA_QUANTS, "--quant with --lora-only")
            if len(self.adapter) != 1:
                raise ValueError(f"--lora-only writes one adapter; pass exactly one --adapter "
                                 f"(got {len(self.adapter)})")
        else:
            check_quant(self.quant)
        if self.quant_fallback not in (None, "f16"):
            raise ValueError(f"--quant-fallback {self.quant_fallback!r}: the one fallback is f16")
        if not self.output.endswith(".gguf"):
            raise ValueError(f"--output {self.output!r} must name a .gguf file")
        refuse_side_networks(self.adapter, "merged or exported to GGUF")


def refuse_side_networks(adapters: list[str], verb: str) -> None:
    """A side network (an adapter of a method with a `wrap` hook: QST) is no change of the base's weights, so
    merge and export refuse it, before any weight is read."""
    from ..methods.registry import spec_for_folder

    for path in adapters:
        spec = spec_for_folder(path) if Path(path).is_dir() else None
        if spec is not None and spec.wrap is not None:
            raise ValueError(f"--adapter {path}: a {spec.name} adapter is a network that runs beside the model, not a "
                             f"change of its weights, so it cannot be {verb}; use it with leantune generate, chat "
                             "or serve --adapter")


def _same_base(recorded: str, given: str) -> bool:
    """Do two names of a base model (a path, a hub id, a .gguf file) name the same model? Equal strings,
    the same file or folder, or the same last name part (`Qwen/Qwen3-0.6B` and `.../Qwen3-0.6B`)."""
    if recorded == given:
        return True
    a, b = Path(recorded), Path(given)
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    stem = lambda p: p.name.lower().removesuffix(".gguf")  # noqa: E731
    return stem(a) == stem(b)


def check_adapters_base(adapters: list[str], model_name: str) -> None:
    """Each adapter's `base_model_name_or_path` (when it records one) names the model given."""
    import json

    for path in adapters:
        cfg_path = Path(path) / "adapter_config.json"
        if not cfg_path.is_file():
            continue  # load_adapter says what is missing
        recorded = json.loads(cfg_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if recorded and not _same_base(str(recorded), model_name):
            raise ValueError(
                f"adapter {path} was trained on {recorded!r}, but --model is {model_name!r}; export it onto its own "
                "base (--model), or pass --any-base if the two are the same weights under other names"
            )


def _quant_sidecar(adapters: list[str]) -> dict | None:
    """The 4-bit base the adapters were trained on (QLoRA): all of them must agree."""
    from .. import methods

    found = {a: methods.read_sidecar(a) for a in adapters}
    kinds = {repr(v) for v in found.values()}
    if len(kinds) > 1:
        raise ValueError(f"the adapters were trained on different bases (4-bit and float, or other 4-bit settings): "
                         f"{found}; export them separately")
    return next(iter(found.values()), None)


def load_merged(model_path: str | None, adapters: list[str]):
    """The float model with every adapter merged in, as `leantune merge` merges (fp32; QLoRA adapters onto
    the dequantized 4-bit base they were trained against)."""
    from .. import methods
    from ..models.loader import load_model
    from ..precision import resolve_precision
    from ..quant import Quant4bitConfig

    quant = _quant_sidecar(adapters)
    model, tok = load_model(model_path, resolve_precision("fp32"), quantize=Quant4bitConfig(**quant) if quant else None)
    names = []
    for i, path in enumerate(adapters):
        methods.load_adapter(model, path, adapter_name=f"adapter{i}")
        if f"adapter{i}" in methods.list_adapters(model):  # a sparse diff is added into the base as it loads
            names.append(f"adapter{i}")
    if names:
        methods.merge_and_unload(model, names)
    _dequantize_rest(model)
    return model, tok


def _dequantize_rest(model) -> None:
    """4-bit layers no adapter touched (or a 4-bit --model) become float linears holding the dequantized
    weights they compute with: a GGUF holds float (then ggml-quantized) weights, never bitsandbytes codes;
    `leantune merge` writes a plain float folder (a 4-bit layer left among merged float ones would make a
    folder transformers' bitsandbytes loader cannot read). MoE: 4-bit expert stacks likewise."""
    from ..methods.base import replace_module
    from ..quant import linear4bit_layers

    for name, layer in linear4bit_layers(model):
        replace_module(model, name, layer.to_float_linear())
    for name, module in list(model.named_modules()):
        if any(getattr(c, "packed_experts", False) for c in module.children()):
            replace_module(model, name, module.to_float())


def _model_name(cfg: ExportConfig) -> str:
    from ..models.loader import default_model_path

    if cfg.model is None:
        return str(default_model_path())
    # a model id with a revision (ORG/NAME@REV) names the same base as ORG/NAME, which an adapter records
    return cfg.model if Path(cfg.model).exists() else cfg.model.partition("@")[0]


def export(cfg: ExportConfig) -> str:
    from ..models import gguf_export as gx

    if not cfg.any_base:
        check_adapters_base(cfg.adapter, _model_name(cfg))
    if cfg.quant == "q4_k_m":
        gx.require_llama_quantize(cfg.quant)  # before minutes of loading, not after
    if cfg.lora_only:
        out = _export_lora(cfg)
    else:
        model, tok = load_merged(cfg.model, cfg.adapter)
        if cfg.quant == "q4_k_m":  # llama-quantize has its own fallbacks for such rows
            out = gx.write_k_quant_gguf(model, tok, cfg.output, cfg.quant, cfg.name, cfg.tokenizer_pre)
        else:
            out = gx.write_model_gguf(model, tok, cfg.output, cfg.quant, cfg.name, cfg.tokenizer_pre,
                                      f16_fallback=cfg.quant_fallback == "f16")
    print(f"GGUF written to {out}", file=sys.stderr)
    return str(out)


def lora_factors(model, adapter_name: str) -> dict:
    """{HF module name: (A (r, in), B (out, r), scaling)} of a plain LoRA adapter loaded into `model`, and for
    LoRA on MoE expert stacks {HF parameter name: (A (E, r, in), B (E, out, r), scaling)}; any other kind of
    adapter layer (DoRA, LoRA bias, AdaLoRA, bottleneck, ...) is refused, llama.cpp's LoRA GGUF holds only
    W + alpha/r * B A."""
    from ..methods import LoraLinear, adapter_layers
    from ..methods.lora_experts import LoraExperts

    out = {}
    for module, layer in adapter_layers(model):
        if not layer.has_adapter(adapter_name):
            continue
        if isinstance(layer, LoraExperts):  # nested wrappers (one per stacked parameter) sit at .base_layer
            a, b, s = layer.factors(adapter_name)
            stem = module.split(".base_layer")[0]
            out[f"{stem}.{layer.parameter_name}"] = (a.detach().float(), b.detach().float(), float(s))
            continue
        if not isinstance(layer, LoraLinear) or adapter_name not in layer.lora_A:
            raise ValueError(f"{module}: {type(layer).__name__} is not a LoRA layer; a llama.cpp LoRA GGUF holds "
                             "plain LoRA only (export the merged model instead: drop --lora-only)")
        if adapter_name in getattr(layer, "lora_magnitude_vector", {}):
            raise ValueError(f"{module}: a DoRA adapter has a magnitude vector llama.cpp's LoRA GGUF cannot hold; "
                             "export the merged model instead (drop --lora-only)")
        if layer.lora_B[adapter_name].bias is not None:
            raise ValueError(f"{module}: a LoRA bias (lora_bias=true) has no place in llama.cpp's LoRA GGUF; "
                             "export the merged model instead (drop --lora-only)")
        out[module] = (layer.lora_A[adapter_name].weight.detach().float(),
                       layer.lora_B[adapter_name].weight.detach().float(), float(layer.scaling[adapter_name]))
    if not out:
        raise ValueError(f"the model has no layer with adapter {adapter_name!r}")
    return out


def _export_lora(cfg: ExportConfig):
    from .. import methods
    from ..models import gguf_export as gx
    from ..models.loader import load_model
    from ..precision import resolve_precision

    model, _ = load_model(cfg.model, resolve_precision("fp32"))  # the float base: only its shapes and names matter
    methods.load_adapter(model, cfg.adapter[0], adapter_name="export")
    if methods.read_sidecar(cfg.adapter[0]):
        print(f"leantune export: {cfg.adapter[0]} was trained on a 4-bit base; llama.cpp adds it to whatever base "
              "GGUF it is given, so its result differs from leantune's by that base's rounding (export the merged "
              "model to keep exactly the merge leantune computes)", file=sys.stderr)
    alpha = methods.adapter_configs(model)["export"].alpha
    return gx.write_lora_gguf(lora_factors(model, "export"), model.config, cfg.output, alpha, cfg.quant, cfg.name,
                              f16_fallback=cfg.quant_fallback == "f16")
