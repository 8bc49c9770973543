"""`leantune finetune`: load a model, apply a method, train on JSONL, save a PEFT-format adapter.

With no --data it runs the main job: teach the embedded default model the bundled fictional facts and
print exact-match accuracy before and after, on trained and on never-seen paraphrased questions.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from ..fields import opt
from ..precision import parse_dtype, resolve_precision
from ..train.loop import TrainConfig, Trainer
from ..train.loss import heldout_loss
from ..train.trainable import save_reinit_blocks
from . import facts as facts_mod

# Settings that teach SmolLM2-135M the 48 fact questions in a few CPU minutes; used for the builtin data
# unless the user sets them.
FACTS_PRESET = dict(lr=1e-3, epochs=6, batch_size=8, max_length=128, rank=16, alpha=32, eval_fraction=0.0,
                    warmup_steps=2)


@dataclass
class FinetuneConfig(TrainConfig):
    model: str | None = opt(None, "HF model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    data: str = opt(facts_mod.BUILTIN, "training JSONL: chat `messages`, alpaca, prompt/completion or text")
    eval_data: str | None = opt(None, "held-out JSONL (default: --eval-fraction of --data)")
    eval_fraction: float = opt(0.1, "fraction of --data held out for eval loss when no --eval-data")
    output: str = opt("out/finetune", "output folder: adapter, checkpoints/, metrics.jsonl, loss.png")
    method: str = opt("lora", "finetuning method: lora, rslora, dora, allora, adalora (see --init-r ...), qlora "
                              "(LoRA on a 4-bit NF4 base), corda (LoRA initialized from a decomposition oriented "
                              "by --calibration data), or bottleneck (Houlsby/Pfeiffer adapters, see "
                              "--bottleneck-*; saved in leantune's own format)")
    rank: int = opt(8, "LoRA rank r")
    alpha: float = opt(16.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with --rslora)")
    dropout: float = opt(0.0, "dropout on the LoRA branch")
    targets: str = opt("all-linear", "modules to adapt: all-linear, a comma list of names, or a regex")
    rslora: bool = opt(False, "rank-stabilized LoRA scaling alpha / sqrt(r)")
    truncate: bool = opt(False, "cut examples longer than --max-length instead of stopping with an error")
    resume: bool = opt(False, "continue from the last complete checkpoint in --output")
    init_r: int = opt(12, "AdaLoRA: initial rank of every adapted module")
    target_r: int = opt(8, "AdaLoRA: average rank per module that pruning ends at")
    tinit: int = opt(0, "AdaLoRA: warmup steps before any pruning")
    tfinal: int = opt(0, "AdaLoRA: final steps that train with the rank allocation frozen")
    delta_t: int = opt(1, "AdaLoRA: prune every N steps while the rank budget falls")
    adalora_beta1: float = opt(0.85, "AdaLoRA: EMA factor of each weight's sensitivity |w * grad|")
    adalora_beta2: float = opt(0.85, "AdaLoRA: EMA factor of the sensitivity's uncertainty")
    orth_reg_weight: float = opt(0.5, "AdaLoRA: weight of the orthogonality regularizer of P and Q")
    adalora_total_step: int | None = opt(None, "AdaLoRA: steps the budget schedule spans (default: the run's)")
    allora_eta: float = opt(1.0, "ALLoRA: eta, the per-row learning-rate multiplier at zero norm (its largest; "
                                 "it falls like 1/||row|| as A's and B's rows grow)")
    allora_granularity: str = opt("row", "ALLoRA: norm per row of A and B, or per whole matrix")
    allora_on: str = opt("update", "ALLoRA: apply the coefficient to the optimizer's update (a per-row "
                                   "learning rate), or to the gradient (nearly cancelled by AdamW)")
    corda_mode: str = opt("ipa", "CorDA: ipa (adapt the directions --calibration data uses most; calibrate on the "
                                 "task) or kpa (adapt those it uses least; calibrate on the knowledge to keep)")
    calibration: str | None = opt(None, "CorDA: JSONL (any supported format) whose inputs orient the "
                                        "decomposition (default: --data)")
    calibration_samples: int = opt(256, "CorDA: how many --calibration examples to run (a seeded random subset)")
    corda_cache: str | None = opt(None, "CorDA: folder for the covariance and decomposition caches; a later run "
                                        "on the same model and calibration data skips the calibration")
    bottleneck_size: int = opt(16, "bottleneck adapters: width b of each adapter")
    bottleneck_placement: str = opt("pfeiffer", "bottleneck adapters: houlsby (after attention and after the MLP) "
                                                "or pfeiffer (after the MLP only)")
    bottleneck_mode: str = opt("parallel", "bottleneck adapters: parallel (y = o + s*f(x)) or sequential "
                                           "(y = o + s*f(o)), o = the sublayer's output")
    bottleneck_nonlinearity: str = opt("gelu", "bottleneck adapters: relu, gelu, silu, tanh or identity")
    bottleneck_scaling: float = opt(1.0, "bottleneck adapters: scale s of the adapter's output")
    dtype: str = opt("auto", "compute precision: auto (bf16 on a CPU with native bf16, i.e. AVX512_BF16 or AMX, "
                             "else fp32), fp32 or bf16; in bf16 the frozen base computes in bf16 while trainable "
                             "parameters, optimizer state and the loss stay fp32")
    forget_data: str | None = opt(None, "held-out JSONL of what the model should keep knowing: its loss before "
                                        "and after training is reported as forgetting")

    def __post_init__(self):
        super().__post_init__()
        from ..methods.registry import list_methods

        if self.method not in list_methods():  # before any model or data is read
            raise ValueError(f"--method {self.method!r} is not a method; choose one of {list_methods()}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        parse_dtype(self.dtype)
        if self.calibration_samples < 1:
            raise ValueError(f"--calibration-samples must be >= 1, got {self.calibration_samples}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})

    def method_options(self) -> dict:
        """The options of --method's config class, taken from this config (others are left out: --rank
        means nothing to a method without a rank)."""
        from ..methods.registry import config_fields, get_method

        valid = set(config_fields(get_method(self.method).config_cls))
        opts = {"r": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "targets": parse_targets(self.targets), "use_rslora": self.rslora}
        opts.update({key: getattr(self, attr) for key, attr in METHOD_OPTION_FIELDS.items()})
        return {k: v for k, v in opts.items() if k in valid}


# method config field -> FinetuneConfig attribute, for options only some methods have
METHOD_OPTION_FIELDS: dict[str, str] = {"size": "bottleneck_size", "placement": "bottleneck_placement",
                                        "mode": "bottleneck_mode", "nonlinearity": "bottleneck_nonlinearity",
                                        "scaling": "bottleneck_scaling", "corda_mode": "corda_mode"}

METHOD_OPTION_FIELDS.update(eta="allora_eta", coef_granularity="allora_granularity", coef_on="allora_on")

METHOD_OPTION_FIELDS.update(init_r="init_r", target_r="target_r", tinit="tinit", tfinal="tfinal",
                            deltaT="delta_t", beta1="adalora_beta1", beta2="adalora_beta2",
                            orth_reg_weight="orth_reg_weight", total_step="adalora_total_step")


def parse_targets(targets: str) -> str | list[str]:
    """--targets as the methods take it: "all-linear", a list of module-name suffixes, or a regex."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    # plain (dotted) names are a list of module-name suffixes; anything else is a regex, commas and all
    if targets.lower() != "all-linear" and names and all(re.fullmatch(r"[\w.]+", n) for n in names):
        return names
    return targets


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def forgetting_set(cfg: FinetuneConfig, tokenizer) -> list:
    """--forget-data's examples (what training should not make the model forget), or []."""
    from ..data import load_dataset

    if not cfg.forget_data:
        return []
    return load_dataset(cfg.forget_data, tokenizer, cfg.max_length, on_too_long="truncate")


def prepare_data(cfg: FinetuneConfig, tokenizer):
    from ..data import load_dataset, split_eval

    data = cfg.data
    if data == facts_mod.BUILTIN:
        data = str(facts_mod.write_train_jsonl(Path(cfg.output) / "data" / "facts_train.jsonl"))
    on_long = "truncate" if cfg.truncate else "error"
    train = load_dataset(data, tokenizer, cfg.max_length, on_too_long=on_long)
    if cfg.eval_data:
        return train, load_dataset(cfg.eval_data, tokenizer, cfg.max_length, on_too_long=on_long)
    if cfg.eval_fraction > 0 and len(train) >= 10:
        return split_eval(train, cfg.eval_fraction, cfg.seed)
    return train, []


def corda_calibration(cfg: FinetuneConfig, tokenizer, train) -> dict:
    """CorDA's calibration options: forwards over a seeded subset of --calibration (default: the training
    examples), named by a hash of their tokens so --corda-cache is reused only for the same data."""
    import random

    from ..data import load_dataset
    from ..methods.corda import calibration_id, run_on

    examples = train
    if cfg.calibration:  # calibration only reads inputs, so long rows are cut rather than refused
        examples = load_dataset(cfg.calibration, tokenizer, cfg.max_length, on_too_long="truncate")
    if len(examples) > cfg.calibration_samples:
        keep = sorted(random.Random(cfg.seed).sample(range(len(examples)), cfg.calibration_samples))
        examples = [examples[i] for i in keep]
    samples = [ex.input_ids for ex in examples]
    _log(f"corda: calibration data is {len(samples)} examples of {cfg.calibration or 'the training data'}")
    opts = {"run_model": run_on(samples), "calibration_id": calibration_id(samples)}
    if cfg.corda_cache:
        opts.update(covariance_file=str(Path(cfg.corda_cache) / "covariance.safetensors"),
                    cache_file=str(Path(cfg.corda_cache) / "eigens.safetensors"))
    return opts


def finetune(cfg: FinetuneConfig) -> dict:
    """Run one finetuning job; returns a summary dict (also written to OUTPUT/summary.json)."""
    import torch

    from .. import methods
    from ..models.loader import load_model

    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    precision = resolve_precision(cfg.dtype, "cpu", full_weights="--reinit-top" if cfg.reinit_top else None)
    _log(precision.describe())
    # QLoRA quantizes while loading, so the fp32 model is never resident in full.
    model, tok = load_model(cfg.model, precision, quantize="nf4" if cfg.method == "qlora" else None)
    _log(f"loaded {model.name_or_path} in {time.perf_counter() - t0:.1f}s")
    out = Path(cfg.output)
    train, evals = prepare_data(cfg, tok)
    _log(f"data: {len(train)} training examples, {len(evals)} eval examples")
    is_facts = cfg.data == facts_mod.BUILTIN
    before = facts_mod.evaluate_facts(model, tok) if is_facts else None
    forget = forgetting_set(cfg, tok)
    forget_before = heldout_loss(model, forget, cfg.batch_size, cfg.max_length) if forget else None
    opts = cfg.method_options()
    if cfg.method == "corda":  # its init needs the covariance of calibration data before it applies
        opts.update(corda_calibration(cfg, tok, train))
    try:
        methods.apply(model, cfg.method, **opts)
    except ValueError as e:  # name the options that chose the modules, so the user knows what to change
        raise ValueError(f"--method {cfg.method} --targets {cfg.targets!r}: {e}") from None
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _log(f"method {cfg.method}: {n_train:,} trainable parameters")

    def save_artifacts(d: Path) -> None:
        if cfg.method == "bottleneck":  # PEFT has no bottleneck adapter type: leantune's own format
            methods.save_bottleneck(model, d, base_model_name_or_path=model.name_or_path)
        else:
            methods.save_adapter(model, d, base_model_name_or_path=model.name_or_path)
            methods.write_sidecar(model, d)  # a 4-bit base: generate/merge rebuild the same one
        if cfg.reinit_top:  # re-initialized blocks trained in full: the adapter alone does not hold them
            save_reinit_blocks(model, d, cfg.reinit_top)

    trainer = Trainer(model, train, evals, cfg.train_config(), out, save_artifacts)
    if cfg.resume and trainer.resume():
        _log(f"resumed at step {trainer.step}")
    result = trainer.fit()
    save_artifacts(out)
    # after --freeze-lower / FPF / --reinit-top chose what trains
    n_train = sum(p.numel() for p in trainer.params)
    summary = {**result, "trainable_parameters": n_train, "seconds": round(time.perf_counter() - t0, 1),
               "adapter": str(out)}
    if trainer.options_report:
        summary["train_options"] = trainer.options_report
    if forget:
        forget_after = heldout_loss(model, forget, cfg.batch_size, cfg.max_length)
        summary["forgetting"] = {"loss_before": forget_before, "loss_after": forget_after,
                                 "increase": forget_after - forget_before}
        _log(f"forgetting: held-out loss {forget_before:.4f} -> {forget_after:.4f}")
    if is_facts:
        after = facts_mod.evaluate_facts(model, tok)
        summary["facts"] = {"before": {k: v["accuracy"] for k, v in before.items()},
                            "after": {k: v["accuracy"] for k, v in after.items()}}
        (out / "facts_eval.json").write_text(json.dumps({"before": before, "after": after}, indent=1))
        print(facts_mod.report(before, after))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nadapter saved to {out}  (train loss {result['first_loss']:.3f} -> {result['train_loss']:.3f})")
    return summary
