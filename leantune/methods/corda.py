"""CorDA: context-oriented decomposition adaptation (Yang et al. 2024, arXiv:2406.05223), as peft 0.21.2
builds it (`tuners/lora/corda.py` and `LoraLayer.corda_init`).

CorDA is LoRA whose A and B come from a decomposition of each weight oriented by its inputs' covariance:

1. covariance: calibration data runs through the model with a forward hook on every target linear; per call
   X = the input as (tokens, in), X <- X / |max(X)|, C += XᵀX; at the end C /= number of calls;
2. damped inverse: C~ = C + λ·mean(diag C)·I, with λ = 0.01 doubled until ‖C~ C~⁻¹ − I‖_F < 0.05;
3. U Σ Vhᵀ = svd(W C~) and V = (Vh C~⁻¹)ᵀ, so that U Σ Vᵀ = W;
4. "ipa" (instruction-previewed, PEFT's "ipm") keeps the r largest components: the adapter starts in the
   directions the calibration (task) data excites most. "kpa" (knowledge-preserved, "kpm") keeps the r
   smallest: the directions the calibration (knowledge) data relies on stay frozen in the residual weight;
5. Σ_r <- Σ_r / s, A = diag(√Σ_r) V_rᵀ, B = U_r diag(√Σ_r), and the base weight becomes W_res = W − s·B A,
   so the model's output is unchanged at init.

Applying needs the covariance, so `CordaConfig` says where it comes from, first hit wins: the SVD cache
(`cache_file`), a covariance collected by the caller (`covariance`), the covariance cache
(`covariance_file`), or calibration forwards run by `run_model(model)` (e.g. `run_on(token_lists)`).
The caches are safetensors written atomically, with PEFT's key names (`<module>` for C,
`<module>.eigens.{S,U,V}_WC` for the cropped factors). Each records the calibration id, a fingerprint
of the target weights and (SVD cache) the mode; a file built for something else is rebuilt, never used.

The base weights move, so A and B alone would only fit W_res. Like PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)`, `save_adapter` writes what training
changed, s(B A − B0 A0), as a rank-2r plain LoRA on the ORIGINAL base; the initial A0, B0 are kept on the
model for that (`adapter_io.set_initial_lora`). Apply CorDA to a model without adapters, and before any
other: it rewrites the base weights the other adapters would sit on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..fields import opt
from .adapter_io import set_initial_lora
from .base import list_adapters
from .lora import LoraConfig, LoraLinear, apply_lora, is_lora_target
from .registry import CalibrationContext, register_method
from .targets import resolve_targets

log = logging.getLogger(__name__)

# mode aliases -> canonical name: the paper's KPA/IPA and PEFT's corda_method values
CORDA_MODES = {"ipa": "ipa", "kpa": "kpa", "ipm": "ipa", "kpm": "kpa"}
FLOAT_WEIGHTS = (torch.float32, torch.float16, torch.bfloat16)
META_KEY = "leantune_corda"
CACHE_VERSION = 1
MAX_DOUBLINGS = 64  # λ = 0.01·2^64 dwarfs any covariance: past that the input itself is broken


@dataclass
class CordaConfig(LoraConfig):
    """LoRA options plus where CorDA's covariance comes from (see the module docstring)."""

    corda_mode: str = opt("ipa", "CorDA: ipa (adapt the directions --calibration data uses most; calibrate on the "
                                 "task) or kpa (adapt those it uses least; calibrate on the knowledge to keep); "
                                 "PEFT's ipm / kpm are accepted", flag="--corda-mode")
    # runs the calibration forwards on the model it is given (its outputs are ignored)
    run_model: Callable[[nn.Module], None] | None = field(default=None, repr=False, compare=False)
    covariance: dict | None = field(default=None, repr=False, compare=False)  # module name -> (in, in)
    covariance_file: str | None = opt(None, "safetensors cache of the covariances", cli=False)
    cache_file: str | None = opt(None, "safetensors cache of the cropped decomposition", cli=False)
    # names the calibration data in the caches (e.g. a hash of its tokens)
    calibration_id: str | None = opt(None, "names the calibration data in the caches", cli=False)
    # read by the calibration hook (`calibrate`), which turns them into run_model and the cache files
    calibration: str | None = opt(None, "CorDA: JSONL (any supported format) whose inputs orient the "
                                        "decomposition (default: the training data)", flag="--calibration")
    calibration_samples: int = opt(256, "CorDA: how many --calibration examples to run (a seeded random subset)",
                                   flag="--calibration-samples")
    cache_dir: str | None = opt(None, "CorDA: folder for the covariance and decomposition caches; a later run on "
                                      "the same model and calibration data skips the calibration",
                                flag="--corda-cache")

    def __post_init__(self):
        super().__post_init__()
        mode = CORDA_MODES.get(str(self.corda_mode).lower())
        if mode is None:
            raise ValueError(f"CordaConfig.corda_mode must be 'ipa' or 'kpa' (or PEFT's 'ipm' / 'kpm'), "
                             f"got {self.corda_mode!r}")
        self.corda_mode = mode
        if self.init != "default":
            raise ValueError(f"CordaConfig.init: CorDA sets A and B from the decomposition, so init must stay "
                             f"'default', got {self.init!r}")
        if getattr(self, "use_dora", False):
            raise ValueError("CordaConfig.use_dora: CorDA sets W_res, A and B after DoRA would have measured "
                             "the weight norms, so the two do not combine; set use_dora=False")
        if self.run_model is not None and not callable(self.run_model):
            raise ValueError(f"CordaConfig.run_model must be a callable taking the model, got {self.run_model!r}")
        if self.covariance is not None and not (
                isinstance(self.covariance, dict) and all(torch.is_tensor(v) for v in self.covariance.values())):
            raise ValueError("CordaConfig.covariance must be a dict of module name -> (in, in) tensor")
        if not isinstance(self.calibration_samples, int) or self.calibration_samples < 1:
            raise ValueError(f"CordaConfig.calibration_samples (--calibration-samples) must be an int >= 1, "
                             f"got {self.calibration_samples!r}")
        for name in ("covariance_file", "cache_file", "calibration_id"):
            value = getattr(self, name)
            if value == "" or (value is not None and not isinstance(value, (str, os.PathLike))):
                raise ValueError(f"CordaConfig.{name} must be a non-empty string (or None), got {value!r}")
            setattr(self, name, None if value is None else str(value))


# ---------------------------------------------------------------------------------------------
# numerics: covariance, damped inverse, decomposition, factors


def run_on(samples) -> Callable[[nn.Module], None]:
    """A `run_model` that feeds each token sequence through the model alone (batch 1, no padding), as
    PEFT's examples do: padding would add tokens to C and change the per-call normalization."""
    samples = [torch.as_tensor(s, dtype=torch.long).reshape(1, -1) for s in samples]

    def run(model: nn.Module) -> None:
        device = next(model.parameters()).device
        for ids in samples:
            model(ids.to(device))

    return run


def calibration_id(samples) -> str:
    """A short hash of token sequences, to name calibration data in the caches."""
    h = hashlib.sha1()
    for s in samples:
        h.update(json.dumps([int(t) for t in torch.as_tensor(s).reshape(-1).tolist()]).encode())
        h.update(b";")
    return h.hexdigest()[:16]


@torch.no_grad()
def collect_covariance(model: nn.Module, names: list[str], run_model: Callable) -> dict[str, torch.Tensor]:
    """C per module name, as PEFT's `calib_cov_distribution`: mean over hook calls of XᵀX, X normalized."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach().float()
            x = x.reshape(-1, x.shape[-1])  # (tokens, in); PEFT squeezes a batch of 1 to the same
            x = x / torch.max(x).abs()  # PEFT's scale: the largest entry, not max |x|
            if not torch.isfinite(x).all():
                raise ValueError(f"CorDA calibration: the input of {name!r} is not finite (or all zero); "
                                 "check the calibration data and the model's weights")
            xtx = x.t() @ x  # (in, in)
            sums[name] = sums[name] + xtx if name in sums else xtx
            counts[name] = counts.get(name, 0) + 1
        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    was_training = model.training
    model.eval()  # calibration sees the model as inference does: no dropout
    try:
        run_model(model)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in names if n not in counts]
    if missing:
        raise ValueError(f"CorDA calibration never ran {missing[:3]} ({len(missing)} target modules); "
                         "run_model must run forwards of the model it is given")
    return {n: sums[n] / counts[n] for n in names}


def damped_inverse(cov: torch.Tensor, name: str = "module") -> tuple[torch.Tensor, torch.Tensor]:
    """(C~, C~⁻¹) with PEFT's damping: λ·mean(diag C) on the diagonal, λ = 0.01 doubled until the
    inverse is accurate (‖C~ C~⁻¹ − I‖_F < 0.05). A rank-deficient C (fewer tokens than `in`) needs it."""
    n = cov.shape[0]
    mean_diag = torch.mean(torch.diag(cov))
    if not torch.isfinite(cov).all() or mean_diag <= 0:
        raise ValueError(f"CorDA: the covariance of {name!r} is not finite or is zero; its calibration "
                         "inputs were broken (recollect it: delete the covariance file)")
    eye = torch.eye(n, device=cov.device)
    damp = 0.01
    for _ in range(MAX_DOUBLINGS):
        # the op order is PEFT's (ones * mean * damp), so the damped matrix is bit-identical
        fixed = cov + torch.diag(torch.ones(n, device=cov.device) * mean_diag * damp)
        try:
            inv = torch.linalg.inv(fixed)
        except torch.linalg.LinAlgError:  # exactly singular (C not PSD): PEFT would stop here; damp more
            inv = None
        if inv is not None and torch.dist(fixed @ inv, eye).item() < 0.05:
            return fixed, inv
        damp *= 2
    raise ValueError(f"CorDA: the covariance of {name!r} could not be inverted even with heavy damping")


def decompose(weight: torch.Tensor, cov: torch.Tensor, rank: int, mode: str, name: str = "module"):
    """(S_r, U_r, V_r) of W = U S Vᵀ oriented by C (PEFT's `collect_eigens_for_layer` + crop):
    the r largest components for "ipa", the r smallest for "kpa". U_r: (out, r), V_r: (in, r)."""
    w = weight.detach().float()  # (out, in)
    if rank > min(w.shape):
        raise ValueError(f"CorDA rank {rank} for {name!r} exceeds min(out, in) = {min(w.shape)}; lower r "
                         "(or its rank_pattern entry)")
    fixed, inv = damped_inverse(cov.to(w.device).float(), name)
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    v = (vh @ inv).transpose(0, 1)  # (in, min): U S Vᵀ = W C~ C~⁻¹ = W
    keep = slice(0, rank) if mode == "ipa" else slice(s.numel() - rank, None)
    return s[keep].clone(), u[:, keep].clone(), v[:, keep].clone()


def corda_factors(s: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scaling: float):
    """(A, B) from kept components as PEFT's `corda_init` splits them: s·B A = U_r Σ_r V_rᵀ."""
    s = s / scaling
    a = v.t().mul(s.sqrt().view(-1, 1)).contiguous()  # (r, in)
    b = u.mul(s.sqrt()).contiguous()  # (out, r)
    return a, b


@torch.no_grad()
def init_layer(layer: LoraLinear, adapter: str, eigens) -> tuple[torch.Tensor, torch.Tensor]:
    """Set A, B of `adapter` from the layer's eigens and write W_res = W − s·B A into the base layer;
    returns the initial (A0, B0) as stored, on the CPU."""
    scaling = layer.scaling[adapter]
    weight = layer.base_layer.weight
    s, u, v = (t.to(weight.device) for t in eigens)
    a, b = corda_factors(s, u, v, scaling)
    layer.lora_A[adapter].weight.copy_(a)
    layer.lora_B[adapter].weight.copy_(b)
    delta = scaling * b @ a  # PEFT's order: (s·B) @ A
    weight.copy_((weight.float() - delta).to(weight.dtype))
    return (layer.lora_A[adapter].weight.detach().to("cpu", copy=True),
            layer.lora_B[adapter].weight.detach().to("cpu", copy=True))


# ---------------------------------------------------------------------------------------------
# caches


def weights_fingerprint(model: nn.Module, names: list[str]) -> str:
    """A cheap fingerprint of the target weights (names, shapes, a strided sample of the entries), so a
    cache built on another model of the same shape is not taken for this one's."""
    h = hashlib.sha1()
    for name in names:
        w = model.get_submodule(name).weight.detach()
        step = max(1, w.numel() // 4096)
        h.update(f"{name}{tuple(w.shape)}".encode())
        h.update(w.reshape(-1)[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def read_cache(path: str | None, meta: dict, shapes: dict[str, tuple]) -> tuple[dict | None, str]:
    """(tensors, "") when cache `path` was built for `meta` and holds `shapes`; else (None, why not)."""
    if not path:
        return None, "is not set"
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None, f"{path} does not exist yet"
    try:
        with safe_open(path, "pt") as f:
            found = json.loads((f.metadata() or {}).get(META_KEY) or "{}")
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is just an unusable cache
        return None, f"{path} is not a readable safetensors file ({e})"
    for key, value in meta.items():
        if found.get(key) != value:
            return None, f"{path} was built for {key}={found.get(key)!r}, not {value!r}"
    bad = [k for k, shape in shapes.items() if have.get(k) != shape]
    if bad:
        return None, f"{path} lacks {bad[0]!r} with shape {shapes[bad[0]]} (built for other targets or ranks)"
    return load_file(path), ""


def write_cache(path: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a safetensors cache atomically: a temp file in the same folder, fsynced, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt", META_KEY: json.dumps(meta, sort_keys=True)})
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _layer_dims(model: nn.Module, name: str) -> tuple[int, int]:
    out_dim, in_dim = model.get_submodule(name).weight.shape
    return out_dim, in_dim


def covariance_for(model: nn.Module, names: list[str], cfg: CordaConfig, ident: dict, why_not_svd: str):
    """C per target: the given dict, else the covariance cache, else collected by cfg.run_model (and cached)."""
    shapes = {n: (_layer_dims(model, n)[1],) * 2 for n in names}
    if cfg.covariance is not None:
        bad = [n for n, shape in shapes.items() if n not in cfg.covariance
               or tuple(cfg.covariance[n].shape) != shape]
        if bad:
            raise ValueError(f"CordaConfig.covariance lacks {bad[0]!r} with shape {shapes[bad[0]]}; collect it "
                             "for the same targets (collect_covariance)")
        return cfg.covariance
    meta = {**ident, "kind": "covariance"}
    cov, why_not_cov = read_cache(cfg.covariance_file, meta, shapes)
    if cov is not None:
        return cov
    if cfg.run_model is None:
        raise ValueError(f"CorDA needs calibration: the cache_file {why_not_svd} and the covariance_file "
                         f"{why_not_cov}; pass run_model (e.g. run_on(token_lists)) or covariance")
    log.info("CorDA: collecting covariances (covariance_file %s)", why_not_cov)
    cov = collect_covariance(model, names, cfg.run_model)
    if cfg.covariance_file:
        write_cache(cfg.covariance_file, cov, meta)
    return cov


def corda_eigens(model: nn.Module, names: list[str], cfg: CordaConfig) -> dict[str, tuple]:
    """(S_r, U_r, V_r) per target: from the SVD cache, else decomposed from the covariance (and cached)."""
    ident = {"version": CACHE_VERSION, "calibration_id": cfg.calibration_id or "",
             "weights": weights_fingerprint(model, names)}
    meta = {**ident, "kind": "eigens", "mode": cfg.corda_mode}
    shapes = {}
    for n in names:
        (out_dim, in_dim), r = _layer_dims(model, n), cfg.rank_for(n)
        shapes.update({f"{n}.eigens.S_WC": (r,), f"{n}.eigens.U_WC": (out_dim, r), f"{n}.eigens.V_WC": (in_dim, r)})
    cached, why_not = read_cache(cfg.cache_file, meta, shapes)
    if cached is None:
        cov = covariance_for(model, names, cfg, ident, why_not)
        cached = {}
        for n in names:
            s, u, v = decompose(model.get_submodule(n).weight, cov[n], cfg.rank_for(n), cfg.corda_mode, n)
            cached.update({f"{n}.eigens.S_WC": s, f"{n}.eigens.U_WC": u, f"{n}.eigens.V_WC": v})
        if cfg.cache_file:
            write_cache(cfg.cache_file, cached, meta)
    return {n: tuple(cached[f"{n}.eigens.{k}_WC"] for k in "SUV") for n in names}


# ---------------------------------------------------------------------------------------------
# applying


def _check_corda_targets(model: nn.Module, names: list[str]) -> None:
    for name in names:
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or not torch.is_tensor(weight) or weight.dtype not in FLOAT_WEIGHTS:
            raise ValueError(f"CorDA needs float (fp32/fp16/bf16) nn.Linear targets, but {name!r} is a "
                             f"{type(module).__name__}; apply CorDA before quantizing (quantize W_res after)")


def apply_corda(model: nn.Module, config: CordaConfig, adapter_name: str) -> nn.Module:
    """Decompose every target of `config` (calibrating first when no cache fits), add LoRA adapter
    `adapter_name` initialized from the kept components, and write the residual into the base weights."""
    if list_adapters(model):
        raise ValueError(f"CorDA rewrites the base weights, so it must be the model's first adapter; this "
                         f"model already has {list_adapters(model)}: apply CorDA to a fresh model")
    names = resolve_targets(model, config.targets, config.exclude, is_lora_target)
    _check_corda_targets(model, names)
    eigens = corda_eigens(model, names, config)
    # the stored config drops the calibration inputs: a covariance dict can be as large as the model
    apply_lora(model, dataclasses.replace(config, run_model=None, covariance=None), adapter_name)
    initial = {n: init_layer(model.get_submodule(n), adapter_name, eigens[n]) for n in names}
    set_initial_lora(model, adapter_name, initial)
    return model


def calibrate(config: CordaConfig, ctx: CalibrationContext) -> CordaConfig:
    """The calibration hook: forwards over a seeded subset of `config.calibration` (default: the training
    examples), named by a hash of their tokens so `cache_dir` is reused only for the same data."""
    examples = ctx.load(config.calibration) if config.calibration else ctx.examples
    if len(examples) > config.calibration_samples:
        keep = sorted(random.Random(ctx.seed).sample(range(len(examples)), config.calibration_samples))
        examples = [examples[i] for i in keep]
    samples = [ex.input_ids for ex in examples]
    ctx.log(f"corda: calibration data is {len(samples)} examples of {config.calibration or 'the training data'}")
    updates = {"run_model": run_on(samples), "calibration_id": calibration_id(samples)}
    if config.cache_dir:
        updates.update(covariance_file=str(Path(config.cache_dir) / "covariance.safetensors"),
                       cache_file=str(Path(config.cache_dir) / "eigens.safetensors"))
    return dataclasses.replace(config, **updates)


register_method("corda", CordaConfig, apply_corda, calibrate=calibrate,
                help="CorDA (Yang et al. 2024): LoRA initialized from a decomposition oriented by --calibration "
                     "data; saved as a plain LoRA on the original base")
