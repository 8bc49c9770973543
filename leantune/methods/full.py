"""Full finetuning (`--method full`): the model's own weights train, no adapter; the baseline that the
parameter-efficient and memory-efficient methods are measured against.

`targets` picks what trains: "all" (every weight: embeddings, norms, every linear and the head), or, as the
other methods take `--targets`, a comma list of module-name suffixes or a regex fully matched against module
names; every parameter inside a chosen module trains (so `layers.11` trains that whole block, `norm` every
norm). Everything else stays frozen.

The result is a plain Hugging Face folder (config.json, model.safetensors, generation_config.json, and the
tokenizer the recipe writes beside every output), which `transformers`, `leantune generate --model OUT` and
`leantune serve --model OUT` load as a model. Trained weights need fp32: `--dtype auto` picks it and a forced
bf16 is refused (`trains_base` below; `precision.resolve_precision`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..fields import opt
from . import base
from .memory import MemoryModel
from .registry import register_method
from .targets import parse_targets, resolve_targets

ALL = "all"


@dataclass
class FullConfig:
    targets: str | list[str] = opt(ALL, "weights to train: all, or a comma list of module-name suffixes or a "
                                        "regex; every parameter inside a matched module trains",
                                   flag="--targets", parse=parse_targets)

    def __post_init__(self):
        self.targets = parse_targets(self.targets)
        if self.targets == [ALL] or (isinstance(self.targets, str) and self.targets.lower() == ALL):
            self.targets = ALL  # parse_targets reads the plain word as a one-name list
        if isinstance(self.targets, str) and self.targets.lower() == "all-linear":
            raise ValueError("FullConfig.targets: 'all-linear' is a LoRA notion; full finetuning takes 'all', "
                             "module-name suffixes (q_proj,v_proj) or a regex")
        if not self.targets:
            raise ValueError("FullConfig.targets must name something to train ('all' for every weight)")


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def trained_parameter_names(model: nn.Module, config: FullConfig) -> list[str]:
    """Names of the parameters `config` trains, in model order (tied weights once, as named_parameters)."""
    if config.targets == ALL:
        return [n for n, _ in model.named_parameters()]
    modules = resolve_targets(model, config.targets, None, _has_params, kind="a module with parameters")
    prefixes = tuple(m + "." for m in modules)
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def apply_full(model: nn.Module, config: FullConfig, adapter_name: str) -> nn.Module:
    if base.list_adapters(model):
        raise ValueError(f"--method full trains the model's own weights; this model already has adapters "
                         f"{base.list_adapters(model)}: merge them first (leantune merge) or start from the base")
    from ..quant import Linear4bit

    if any(isinstance(m, Linear4bit) for m in model.modules()):
        raise ValueError("--method full cannot train a 4-bit base (its weights are codes); load it in float")
    names = set(trained_parameter_names(model, config))
    base.register_adapter(model, adapter_name, config)  # so methods.save finds the method's save hook
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return model


def save_full(model: nn.Module, out_dir, adapter_name: str = "default",  # noqa: ARG001 - the hook's signature
              base_model_name_or_path: str | None = None) -> Path:  # noqa: ARG001
    """The whole model as an HF folder's model files in `out_dir`, each file written to a temp name first."""
    from ..models.loader import write_hf_model_files

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".full-", dir=out))
    try:
        write_hf_model_files(model, tmp)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


register_method("full", FullConfig, apply_full, save=save_full, trains_base=True, memory=MemoryModel(projectable=True),
                help="full finetuning: the model's own weights train (--targets all or a subset); saved as "
                     "a plain HF model folder")
