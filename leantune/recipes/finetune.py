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
from ..train.loop import TrainConfig, Trainer
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
    method: str = opt("lora", "finetuning method: lora, rslora, or qlora (LoRA on a 4-bit NF4 base)")
    rank: int = opt(8, "LoRA rank r")
    alpha: float = opt(16.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with --rslora)")
    dropout: float = opt(0.0, "dropout on the LoRA branch")
    targets: str = opt("all-linear", "modules to adapt: all-linear, a comma list of names, or a regex")
    rslora: bool = opt(False, "rank-stabilized LoRA scaling alpha / sqrt(r)")
    truncate: bool = opt(False, "cut examples longer than --max-length instead of stopping with an error")
    resume: bool = opt(False, "continue from the last complete checkpoint in --output")

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")

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
METHOD_OPTION_FIELDS: dict[str, str] = {}


def parse_targets(targets: str) -> str | list[str]:
    """--targets as the methods take it: "all-linear", a list of module-name suffixes, or a regex."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    # plain (dotted) names are a list of module-name suffixes; anything else is a regex, commas and all
    if targets.lower() != "all-linear" and names and all(re.fullmatch(r"[\w.]+", n) for n in names):
        return names
    return targets


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


def finetune(cfg: FinetuneConfig) -> dict:
    """Run one finetuning job; returns a summary dict (also written to OUTPUT/summary.json)."""
    import torch

    from .. import methods
    from ..models.loader import load

    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    t0 = time.perf_counter()
    # QLoRA quantizes while loading, so the fp32 model is never resident in full.
    model, tok = load(cfg.model, quantize="nf4" if cfg.method == "qlora" else None)
    _log(f"loaded {model.name_or_path} in {time.perf_counter() - t0:.1f}s")
    train, evals = prepare_data(cfg, tok)
    _log(f"data: {len(train)} training examples, {len(evals)} eval examples")
    is_facts = cfg.data == facts_mod.BUILTIN
    before = facts_mod.evaluate_facts(model, tok) if is_facts else None
    try:
        methods.apply(model, cfg.method, **cfg.method_options())
    except ValueError as e:  # name the options that chose the modules, so the user knows what to change
        raise ValueError(f"--method {cfg.method} --targets {cfg.targets!r}: {e}") from None
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _log(f"method {cfg.method}: {n_train:,} trainable parameters")

    def save_artifacts(d: Path) -> None:
        methods.save_adapter(model, d, base_model_name_or_path=model.name_or_path)
        methods.write_sidecar(model, d)  # a 4-bit base: generate/merge rebuild the same one

    trainer = Trainer(model, train, evals, cfg.train_config(), out, save_artifacts)
    if cfg.resume and trainer.resume():
        _log(f"resumed at step {trainer.step}")
    result = trainer.fit()
    save_artifacts(out)
    summary = {**result, "trainable_parameters": n_train, "seconds": round(time.perf_counter() - t0, 1),
               "adapter": str(out)}
    if is_facts:
        after = facts_mod.evaluate_facts(model, tok)
        summary["facts"] = {"before": {k: v["accuracy"] for k, v in before.items()},
                            "after": {k: v["accuracy"] for k, v in after.items()}}
        (out / "facts_eval.json").write_text(json.dumps({"before": before, "after": after}, indent=1))
        print(facts_mod.report(before, after))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nadapter saved to {out}  (train loss {result['first_loss']:.3f} -> {result['train_loss']:.3f})")
    return summary
