"""`leantune finetune`: load a model, apply a method, train on JSONL, save a PEFT-format adapter.

The objective is SFT (token cross-entropy), or DPO on preference pairs with `--objective dpo`
(`train.dpo`), optionally after an SFT phase on `--sft-data` in the same run, or S3FT with `--objective s3ft`
(`train.s3ft`: SFT on targets the loaded model and `--judge` choose before training).

With no --data it runs the main job: teach the embedded default model the bundled fictional facts and
print exact-match accuracy before and after, on trained and on never-seen paraphrased questions.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..fields import opt
from ..optim import PROJECTED_OPTIMIZERS
from ..precision import parse_dtype, resolve_device, resolve_precision
from ..train.loop import TrainConfig, Trainer
from ..train.loss import heldout_loss
from ..train.s3ft import PARAPHRASE_PROMPT
from ..train.trainable import save_reinit_blocks
from . import facts as facts_mod

# Settings that teach SmolLM2-135M the 48 fact questions in a few CPU minutes; used for the builtin data
# unless the user sets them. Keys are FinetuneConfig fields or method options (YAML keys: rank, alpha); a
# method option applies to the methods that have it and is ignored by the others.
FACTS_PRESET = dict(lr=1e-3, epochs=6, batch_size=8, max_length=128, rank=16, alpha=32, eval_fraction=0.0,
                    warmup_steps=2)

# what --objective self-train reads (besides the method's options); `_self_train_checks` refuses the others
SELF_TRAIN_OPTIONS = {
    "model", "data", "eval_data", "split", "eval_split", "columns", "output", "lr", "weight_decay", "method",
    "options", "truncate", "seed", "epochs", "max_steps", "batch_size", "max_length", "objective", "unlabeled",
    "self_train_iterations", "self_train_steps", "unlabeled_batch_size", "student_lr", "meta_lr", "meta_warmup",
    "galore_proj_type",  # filled in by TrainConfig from --optimizer, which self-train leaves at its default
}


def _method_help() -> str:
    from ..methods.registry import method_specs

    return "finetuning method: " + "; ".join(f"{s.name}: {s.help}" if s.help else s.name for s in method_specs())


@dataclass
class FinetuneConfig(TrainConfig):
    """A finetuning run. The method's own options live in `options`, an instance of the method's config
    class (`FinetuneConfig(method="adalora", options=AdaLoraConfig(init_r=6, target_r=2))`; None: its
    defaults); on the command line and in YAML they are flags of their own (`--init-r`, `init_r:`)."""

    model: str | None = opt(None, "HF model folder, .gguf file, or model id in the local Hugging Face cache "
                                           "(ORG/NAME[@REVISION]; default: the embedded SmolLM2-135M-Instruct)")
    revision: str | None = opt(None, "branch, tag or commit of a --model id in the Hugging Face cache (default: main)")
    data: str = opt(facts_mod.BUILTIN, "training data: a JSONL, JSON, CSV or Parquet file, a datasets folder "
                                       "(save_to_disk), or a folder or glob of shards; rows in OpenAI chat "
                                       "(messages, tools, weight), ShareGPT, alpaca, prompt/completion or text; "
                                       "with --objective dpo, preference pairs (TRL's prompt/chosen/rejected or "
                                       "OpenAI's input/preferred_output/non_preferred_output); with --objective "
                                       "s3ft, rows with one gold answer: alpaca, prompt/completion, or chat rows "
                                       "ending in the assistant answer (the gold; only that turn trains); with "
                                       "--objective self-train, the labelled classification rows (text, label)")
    sft_data: str | None = opt(None, "with --objective dpo: supervised data (any form --data takes for SFT) to "
                                     "finetune on first, in the same run; the SFT'd model is DPO's reference")
    sft_steps: int = opt(0, "optimizer steps of the --sft-data phase (0: --epochs passes over it)")
    sft_lr: float | None = opt(None, "peak learning rate of the --sft-data phase (default: --lr); SFT usually "
                                     "takes a larger one than DPO, which moves the policy away from its reference")
    eval_data: str | None = opt(None, "held-out data, any form --data takes (default: --eval-fraction of --data)")
    split: str | None = opt(None, "the split of a datasets folder (DatasetDict) given as --data")
    eval_split: str | None = opt(None, "the split of a datasets folder (DatasetDict) given as --eval-data")
    columns: str | None = opt(None, "map the data's column names to leantune's keys, KEY=COLUMN,... "
                                    "(e.g. prompt=question,completion=answer)", metavar="KEY=COLUMN[,...]")
    chat_template: str | None = opt(None, "chat template replacing the tokenizer's: a Jinja file or a built-in "
                                          "name (chatml, llama3, zephyr); saved with the adapter",
                                    metavar="FILE|NAME")
    eval_fraction: float = opt(0.1, "fraction of --data held out for eval loss when no --eval-data")
    output: str = opt("out/finetune", "output folder: adapter, checkpoints/, metrics.jsonl, loss.png")
    # None: the method's proposal (its `train_defaults` hook, e.g. SaRA's lr formula), else TrainConfig's default
    lr: float | None = opt(None, "peak learning rate (default: the method's own where it has one, else 2e-4)")
    weight_decay: float | None = opt(None, "AdamW weight decay (default: the method's own where it has one, else 0)")
    method: str = opt("lora", _method_help)
    options: Any = opt(None, "the method's options: an instance of its config class (None: its defaults)", cli=False)
    truncate: bool = opt(False, "cut examples longer than --max-length instead of stopping with an error")
    resume: bool = opt(False, "continue from the last complete checkpoint in --output")
    dtype: str = opt("auto", "compute precision: auto (bf16 on a CPU with native bf16, i.e. AVX512_BF16 or AMX, "
                             "else fp32), fp32 or bf16; in bf16 the frozen base computes in bf16 while trainable "
                             "parameters, optimizer state and the loss stay fp32")
    device: str = opt("auto", "where training computes: cpu, cuda (or cuda:N), or auto (cuda when torch sees a GPU, "
                              "else cpu); on CUDA --dtype auto is bf16")
    forget_data: str | None = opt(None, "held-out JSONL of what the model should keep knowing: its loss before "
                                        "and after training is reported as forgetting")
    judge: str = opt("exact", "with --objective s3ft: when a response counts as correct against the gold answer: "
                              "exact, normalized (ignoring case, whitespace and punctuation), contains (the "
                              "normalized gold answer appears in the response as whole words), or FILE.py:FUNCTION "
                              "with FUNCTION(prompt, response, gold) -> bool", metavar="NAME|FILE.py:FUNCTION")
    s3ft_paraphrase_prompt: str = opt(PARAPHRASE_PROMPT, "with --objective s3ft: the request that asks the model to "
                                      "restate a gold answer it got wrong, with the fields {question} and {answer}")
    s3ft_max_new_tokens: int = opt(256, "with --objective s3ft: longest response and paraphrase generated (greedy) "
                                        "while building the targets")
    unlabeled: str | None = opt(None, "with --objective self-train: unlabeled rows ({\"text\": ...}) the teacher "
                                      "pseudo-labels for the students")
    self_train_iterations: int = opt(6, "with --objective self-train: teacher -> student sessions (LiST: 6)")
    self_train_steps: int = opt(1000, "with --objective self-train: student steps on unlabeled batches per session "
                                      "(LiST: 1000), before it finetunes on --data for the teacher's steps")
    unlabeled_batch_size: int = opt(16, "with --objective self-train: unlabeled rows per student step (LiST: 16)")
    student_lr: float = opt(1e-4, "with --objective self-train: the students' learning rate (LiST: 1e-4; --lr is "
                                  "the teacher's)")
    meta_lr: float | None = opt(None, "with --objective self-train: the inner SGD step of the meta re-weighting "
                                      "(default: --lr, as LiST uses the teacher's rate, not the students')")
    parallel: str = opt("auto", "under torchrun (torchrun --nproc_per_node N -m leantune finetune ...): ddp "
                                "(every rank holds the model; small models) or fsdp (FSDP2: weights, gradients and "
                                "optimizer state sharded over the ranks); auto: fsdp under torchrun, one process "
                                "otherwise. --batch-size is the GLOBAL micro-batch: each of the N ranks takes "
                                "batch_size/N of its rows (it must divide), so losses and the result match a "
                                "one-process run with the same --batch-size and --grad-accum",
                        metavar="auto|ddp|fsdp")
    nproc: int = opt(1, "processes on this machine: > 1 launches this command under torchrun "
                        "(python -m torch.distributed.run --nproc_per_node N)")
    fsdp_cpu_offload: bool = opt(False, "--parallel fsdp: keep the sharded parameters, gradients and optimizer "
                                        "state in CPU memory (FSDP2's CPUOffloadPolicy)")
    meta_warmup: float = opt(0.6, "with --objective self-train: fraction of each student session with uniform "
                                  "weights before meta re-weighting starts (LiST: 0.6)")

    def __post_init__(self):
        self._fill_method_defaults()
        super().__post_init__()
        from ..methods.registry import get_method, list_methods

        if self.method not in list_methods():  # before any model or data is read
            raise ValueError(f"--method {self.method!r} is not a method; choose one of {list_methods()}")
        cls = get_method(self.method).config_cls
        if self.options is None:
            self.options = cls()
        elif not isinstance(self.options, cls):
            raise TypeError(f"FinetuneConfig(method={self.method!r}) takes options={cls.__name__}(...), "
                            f"got {type(self.options).__name__}")
        from ..models.hub_cache import with_revision

        self.model, self.revision = with_revision(self.model, self.revision), None  # one spec: ORG/NAME@REV
        if self.optimizer in PROJECTED_OPTIMIZERS and not self.spec.trains_base:
            raise ValueError(f"--optimizer {self.optimizer} projects the gradients of whole weight matrices; use "
                             f"it with --method full (a method that trains the model's own weights), not "
                             f"--method {self.method}")
        if self.spec.fit is not None and (self.reinit_top or self.fpf_fraction):
            # they choose what trains once, before training; a method that trains in phases builds a new
            # Trainer per phase, which would re-initialize (or probe) again each time
            raise ValueError(f"--method {self.method} trains in phases; --reinit-top and --fpf-fraction cannot "
                             "be combined with it (drop them)")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        parse_dtype(self.dtype)
        from ..data import parse_columns, read_chat_template

        parse_columns(self.columns)  # an unknown key stops the run before the model is read
        if self.eval_split and not self.eval_data:
            raise ValueError("--eval-split picks a split of --eval-data; give --eval-data DATASETS_FOLDER, or "
                             "drop --eval-split")
        if self.chat_template:
            read_chat_template(self.chat_template)
        self._check_objective()
        self._check_parallel()

    def _check_parallel(self) -> None:
        from ..train.distributed import launched, parallel_checks

        multi = launched() or self.nproc > 1
        checks = parallel_checks(self) + [
            (not (multi and self.spec.fit is not None), f"--method {self.method} trains in phases of its own, "
                                                        "which does not run under torchrun (--parallel) yet; "
                                                        "use one process"),
            (not (multi and self.forget_data), "--forget-data is not measured under torchrun yet; drop it or "
                                               "use one process"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def _check_objective(self) -> None:
        dpo = self.objective == "dpo"
        checks = [
            (not (dpo and self.data == facts_mod.BUILTIN),
             "--objective dpo trains on preference pairs; give --data FILE with prompt/chosen/rejected rows "
             "(TRL) or input/preferred_output/non_preferred_output rows (OpenAI)"),
            (dpo or not self.sft_data, "--sft-data is the SFT phase before DPO: use it with --objective dpo, or give "
                                       "the supervised data as --data"),
            (self.sft_steps >= 0, f"--sft-steps must be >= 0, got {self.sft_steps}"),
            (self.sft_lr is None or self.sft_data, "--sft-lr is the learning rate of the --sft-data phase; give "
                                                   "--sft-data, or drop --sft-lr"),
            (self.sft_lr is None or self.sft_lr > 0, f"--sft-lr must be > 0, got {self.sft_lr}"),
            # such a method's fit hook runs its own phases on the SFT loss
            (not (dpo and self.spec.fit is not None), f"--method {self.method} trains in phases of its own on the "
                                                       "SFT loss; it cannot train with --objective dpo"),
            (dpo or not self.dpo_precompute_ref, "--dpo-precompute-ref is an option of --objective dpo"),
            (self.objective == "s3ft" or self.judge == "exact", "--judge chooses S3FT's targets; use it with "
                                                                 "--objective s3ft"),
            (self.s3ft_max_new_tokens >= 1, f"--s3ft-max-new-tokens must be >= 1, got {self.s3ft_max_new_tokens}"),
        ]
        for ok, msg in checks + self._self_train_checks():
            if not ok:
                raise ValueError(msg)
        if self.objective == "s3ft":  # a judge file that is missing or lacks the function stops the run here
            from ..train.s3ft import check_paraphrase_prompt, parse_judge

            parse_judge(self.judge)
            check_paraphrase_prompt(self.s3ft_paraphrase_prompt)

    def _self_train_checks(self) -> list[tuple[bool, str]]:
        st = self.objective == "self-train"
        # self-training runs a loop of its own (recipes.self_train); an option it does not read must not be
        # silently ignored, so one set away from its default stops the run
        unused = [f.name for f in fields(self) if st and f.name not in SELF_TRAIN_OPTIONS
                  and f.default is not dataclasses.MISSING and getattr(self, f.name) != f.default]
        return [  # the unused-options check last: the data and pool errors say more
            (st or not self.unlabeled, "--unlabeled is self-training's pool; use it with --objective self-train"),
            (not st or bool(self.unlabeled), "--objective self-train needs --unlabeled FILE (rows of text only)"),
            (not (st and self.data == facts_mod.BUILTIN), "--objective self-train needs --data FILE with "
                                                           "classification rows (text, label)"),
            (not (st and self.spec.fit is not None), f"--method {self.method} trains in phases of its own; it "
                                                      "cannot train with --objective self-train"),
            # the encoder is a transformers model; say how to get it before anything is read
            (not st or importlib.util.find_spec("transformers") is not None,
             "--objective self-train loads the encoder through transformers; pip install 'leantune[encoders]'"),
            (not (st and self.resume), "--resume is not supported with --objective self-train; start the run again"),
            (self.self_train_iterations >= 1,
             f"--self-train-iterations must be >= 1, got {self.self_train_iterations}"),
            (self.self_train_steps >= 1, f"--self-train-steps must be >= 1, got {self.self_train_steps}"),
            (self.unlabeled_batch_size >= 1, f"--unlabeled-batch-size must be >= 1, got {self.unlabeled_batch_size}"),
            (self.student_lr > 0, f"--student-lr must be > 0, got {self.student_lr}"),
            (self.meta_lr is None or self.meta_lr > 0, f"--meta-lr must be > 0, got {self.meta_lr}"),
            (0 <= self.meta_warmup <= 1, f"--meta-warmup must be in [0, 1], got {self.meta_warmup}"),
            (not unused, f"--objective self-train does not use {', '.join('--' + n.replace('_', '-') for n in unused)};"
                         " drop them"),
        ]

    def _fill_method_defaults(self) -> None:
        """Training options left None take the method's proposal (`train_defaults` hook), else TrainConfig's
        default; a wrong --method or options are reported by the checks that follow."""
        from ..methods.registry import get_method, list_methods

        spec = get_method(self.method) if self.method in list_methods() else None
        proposed = {}
        if spec is not None and spec.train_defaults is not None:
            options = self.options if isinstance(self.options, spec.config_cls) else None
            proposed = spec.train_defaults(options if options is not None else spec.config_cls())
        defaults = {f.name: f.default for f in fields(TrainConfig)}
        own = {f.name: f.default for f in fields(FinetuneConfig)}
        fillable = {n for n in defaults if own[n] is None and defaults[n] is not None}  # lr, weight_decay
        unknown = sorted(set(proposed) - fillable)
        if unknown:
            raise TypeError(f"method {spec.name!r}: train_defaults proposes {unknown}; a method may propose "
                            f"{sorted(fillable)}")
        for name in fillable:
            if getattr(self, name) is None:
                setattr(self, name, proposed.get(name, defaults[name]))

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})

    @property
    def spec(self):
        from ..methods.registry import get_method

        return get_method(self.method)


def config_from_args(args) -> FinetuneConfig:
    """`leantune finetune`'s config: defaults < FACTS_PRESET (builtin data) < YAML (--config) < flags, the
    method's options (flags and YAML keys of their own) built into its config class."""
    from .options import method_config, method_flags, read_options

    values, _, given = read_options(FinetuneConfig, args, extra=set(method_flags()))
    preset = FACTS_PRESET if values.get("data", facts_mod.BUILTIN) == facts_mod.BUILTIN else {}
    own = {f.name for f in fields(FinetuneConfig)}
    options = method_config(values.get("method", "lora"), given, preset)
    return FinetuneConfig(**{**{k: v for k, v in preset.items() if k in own}, **values, "options": options})


def _main_rank() -> bool:
    """False on ranks other than 0 of a torchrun launch, which neither log nor write files."""
    return os.environ.get("RANK", "0") == "0"


def _log(msg: str) -> None:
    if _main_rank():
        print(msg, file=sys.stderr, flush=True)


def forgetting_set(cfg: FinetuneConfig, tokenizer) -> list:
    """--forget-data's examples (what training should not make the model forget), or []."""
    from ..data import load_dataset

    if not cfg.forget_data:
        return []
    return load_dataset(cfg.forget_data, tokenizer, cfg.max_length, on_too_long="truncate")


def prepare_data(cfg: FinetuneConfig, tokenizer):
    """(train, eval) examples of --data: SFT examples, or preference pairs with --objective dpo."""
    from ..data import load_dataset, load_preference_dataset, parse_columns, split_eval, use_chat_template

    use_chat_template(tokenizer, cfg.chat_template)  # before any row is rendered; saved with the adapter
    data = cfg.data
    if data == facts_mod.BUILTIN:
        data = str(facts_mod.write_train_jsonl(Path(cfg.output) / "data" / "facts_train.jsonl"))
    on_long = "truncate" if cfg.truncate else "error"
    columns = parse_columns(cfg.columns)
    load = load_preference_dataset if cfg.objective == "dpo" else load_dataset
    train = load(data, tokenizer, cfg.max_length, on_too_long=on_long, split=cfg.split, columns=columns)
    if cfg.eval_data:
        return train, load(cfg.eval_data, tokenizer, cfg.max_length, on_too_long=on_long,
                           split=cfg.eval_split, columns=columns, what="--eval-data")
    if cfg.eval_fraction > 0 and len(train) >= 10:
        return split_eval(train, cfg.eval_fraction, cfg.seed)
    return train, []


def s3ft_rows(cfg: FinetuneConfig) -> tuple[str, list]:
    """--objective s3ft: (the data file, its rows as prompt + gold answer), read before the model so that rows of
    the wrong shape stop the run before any weight is read."""
    from ..data import parse_columns
    from ..data.answers import read_answer_rows

    data = cfg.data
    if data == facts_mod.BUILTIN:
        data = str(facts_mod.write_train_jsonl(Path(cfg.output) / "data" / "facts_train.jsonl"))
    return data, read_answer_rows(data, cfg.split, parse_columns(cfg.columns))


def prepare_s3ft(cfg: FinetuneConfig, model, tokenizer, data: str, rows: list) -> tuple[list, list, dict]:
    """--objective s3ft on `rows` of `data` (`s3ft_rows`): (train examples on the targets `train.s3ft` builds with
    `model`, eval examples on the gold answers, the report: targets file and count per source). Held-out rows keep
    their gold answers, so the eval loss measures the task. With --resume the saved targets are reused, so the
    resumed run trains on the same."""
    from ..data import load_dataset, parse_columns, split_eval, use_chat_template
    from ..data.answers import answer_examples
    from ..train import s3ft

    use_chat_template(tokenizer, cfg.chat_template)
    on_long = "truncate" if cfg.truncate else "error"
    evals = []
    if cfg.eval_data:
        evals = load_dataset(cfg.eval_data, tokenizer, cfg.max_length, on_too_long=on_long, split=cfg.eval_split,
                             columns=parse_columns(cfg.columns), what="--eval-data")
    elif cfg.eval_fraction > 0 and len(rows) >= 10:
        rows, held = split_eval(rows, cfg.eval_fraction, cfg.seed)
        evals = answer_examples(held, [r.gold for r in held], tokenizer, cfg.max_length, on_long, data)
    # the gold rows must fit before any generation is spent on them
    answer_examples(rows, [r.gold for r in rows], tokenizer, cfg.max_length, on_long, data)
    targets = s3ft.read_targets(rows, cfg.output) if cfg.resume else None
    if targets is None:
        judge = s3ft.parse_judge(cfg.judge)
        gen = s3ft.model_generator(model, tokenizer, cfg.s3ft_max_new_tokens, cfg.batch_size)
        t0 = time.perf_counter()
        targets = s3ft.build_targets(rows, gen, judge, cfg.s3ft_paraphrase_prompt)
        path = s3ft.write_targets(targets, cfg.output)
        _log(f"s3ft: built {len(targets)} targets in {time.perf_counter() - t0:.1f}s")
    else:
        path = Path(cfg.output) / s3ft.TARGETS_FILE
        _log(f"s3ft: reusing the targets of {path}")
    counts = s3ft.source_counts(targets)
    _log("s3ft targets: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    train = answer_examples(rows, [t.target for t in targets], tokenizer, cfg.max_length, on_long, data)
    return train, evals, {"targets_file": str(path), **counts}


def sft_examples(cfg: FinetuneConfig, tokenizer) -> list:
    """--sft-data's examples (the SFT phase before DPO), or []; --columns maps --data's columns, not these."""
    from ..data import load_dataset

    if not cfg.sft_data:
        return []
    on_long = "truncate" if cfg.truncate else "error"
    return load_dataset(cfg.sft_data, tokenizer, cfg.max_length, on_too_long=on_long, what="--sft-data")


def train_preferences(cfg: FinetuneConfig, model, train: list, evals: list, sft: list, save_artifacts):
    """DPO on the pairs `train`, after an SFT phase on `sft` when there is one (`train.phases`: each phase a
    fresh optimizer, in OUTPUT/phases/NAME); the reference is the model as DPO starts (`train.dpo.build_dpo`).
    (result, train options report, trainable parameters)."""
    from ..train.dpo import build_dpo
    from ..train.phases import PhaseRunner

    tcfg = cfg.train_config()
    if not sft:
        objective = build_dpo(model, tcfg, train, evals, cfg.spec.trains_base, log=_log)
        trainer = Trainer(model, train, evals, tcfg, cfg.output, save_artifacts, run_config=asdict(cfg),
                          objective=objective)
        if cfg.resume and trainer.resume():
            _log(f"resumed at step {trainer.step}")
        return trainer.fit(), trainer.options_report, trainer.params
    sft_cfg = dataclasses.replace(tcfg, objective="sft", lr=tcfg.lr if cfg.sft_lr is None else cfg.sft_lr)
    runner = PhaseRunner(model, sft, [], sft_cfg, Path(cfg.output),
                         save_artifacts, asdict(cfg), resume=cfg.resume, log=_log)
    runner.run("sft", steps=cfg.sft_steps, epochs=0 if cfg.sft_steps else cfg.epochs)
    # on resume the finished SFT phase restored its final weights above, so the same reference is rebuilt
    objective = build_dpo(model, tcfg, train, evals, cfg.spec.trains_base, snapshot=True, log=_log)
    dpo = dataclasses.replace(runner, train_examples=train, eval_examples=evals, cfg=tcfg, objective=objective)
    dpo.run("dpo")
    return dpo.summary(), {}, [p for p in model.parameters() if p.requires_grad]


def calibration_context(cfg: FinetuneConfig, model, tokenizer, train):
    """What a method's calibration hook may use: the training examples and a reader for other data files
    (calibration only reads inputs, so long rows are cut rather than refused)."""
    from ..data import load_dataset
    from ..methods.registry import CalibrationContext

    def load(path: str) -> list:
        return load_dataset(path, tokenizer, cfg.max_length, on_too_long="truncate")

    # a calibration pass reads inputs: a preference pair's chosen sequence is one
    examples = [getattr(e, "chosen", e) for e in train]
    return CalibrationContext(model=model, examples=examples, load=load, seed=cfg.seed, log=_log)


def check_shapes_before_loading(cfg: FinetuneConfig) -> None:
    """Options that depend on the model's shapes (--galore-rank against the projected matrices), checked on the
    model built on the meta device from its config alone, so a bad value stops before any weight is read."""
    import torch

    from .. import methods
    from ..models.llama import LlamaForCausalLM
    from ..train.trainable import check_projection_ranks
    from .estimate import read_model_config

    if cfg.optimizer not in PROJECTED_OPTIMIZERS:
        return
    with torch.device("meta"):
        model = LlamaForCausalLM(read_model_config(cfg.model)[0])
    try:
        methods.apply(model, cfg.method, config=cfg.options)  # what trains decides what is projected
    except (ValueError, NotImplementedError, RuntimeError):
        # the method's own errors come from the real apply below, with the options named; and a method that
        # reads weight values (a threshold on |w|) cannot run on meta tensors: the Trainer makes the same check
        # on the loaded model, so only the early stop is lost
        return
    check_projection_ranks(model, [p for p in model.parameters() if p.requires_grad], cfg.train_config())


def finetune(cfg: FinetuneConfig) -> dict:
    """Run one finetuning job; returns a summary dict (also written to OUTPUT/summary.json)."""
    if cfg.objective == "self-train":  # an encoder classifier through transformers, a loop of its own
        from .self_train import self_train

        return self_train(cfg)

    from .. import methods
    from ..models.loader import load_model, meta_model
    from ..train.distributed import Parallel, launched, run_torchrun

    if cfg.nproc > 1 and not launched():  # this same command on N processes
        return run_torchrun(cfg.nproc, cfg.output)
    par = Parallel.from_env(cfg.parallel, cfg.device, cfg.fsdp_cpu_offload)
    try:
        return _finetune(cfg, par)
    finally:
        if par is not None:
            par.close()


def _finetune(cfg: FinetuneConfig, par) -> dict:
    """`finetune` in this process: alone (par None) or as one rank of a torchrun launch."""
    import torch

    from .. import methods
    from ..models.loader import load_model, meta_model

    check_shapes_before_loading(cfg)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    spec = cfg.spec
    full = "--reinit-top" if cfg.reinit_top else (f"--method {cfg.method}" if spec.trains_base else None)
    precision = resolve_precision(cfg.dtype, resolve_device(cfg.device), full_weights=full)
    if spec.check_model is not None:  # does the method's config fit this model? Read from config.json, before weights
        from .estimate import read_model_config

        spec.check_model(cfg.options, read_model_config(cfg.model)[0])
    _log(precision.describe())
    if spec.preflight is not None:  # options checked against the model's shapes before any weight is read
        spec.preflight(cfg.options, meta_model(cfg.model))
    s3ft_data = s3ft_rows(cfg) if cfg.objective == "s3ft" else None
    # a method may quantize the base while loading (QLoRA), so the fp32 model is never resident in full
    model, tok = load_model(cfg.model, precision, quantize=spec.quantize(cfg.options) if spec.quantize else None)
    _log(f"loaded {model.name_or_path} in {time.perf_counter() - t0:.1f}s")
    out = Path(cfg.output)
    # S3FT chooses its targets with the model as loaded, before any adapter exists: the base model's answers
    if cfg.objective == "s3ft":
        train, evals, s3ft_report = prepare_s3ft(cfg, model, tok, *s3ft_data)
    else:
        (train, evals), s3ft_report = prepare_data(cfg, tok), None
    _log(f"data: {len(train)} training examples, {len(evals)} eval examples")
    sft = sft_examples(cfg, tok)  # read before training starts, so bad rows stop the run before any step
    is_facts = cfg.data == facts_mod.BUILTIN
    before = facts_mod.evaluate_facts(model, tok) if is_facts and _main_rank() else None
    forget = forgetting_set(cfg, tok)
    forget_before = heldout_loss(model, forget, cfg.batch_size, cfg.max_length) if forget else None
    options = cfg.options
    if spec.calibrate is not None:  # e.g. CorDA's init needs the covariance of calibration data
        options = spec.calibrate(options, calibration_context(cfg, model, tok, train))
    try:
        # the model to train is what apply returns: the model itself, or a wrapper (a side network beside it)
        model = methods.apply(model, cfg.method, config=options)
    except ValueError as e:  # name the options that chose the modules, so the user knows what to change
        targets = getattr(options, "targets", None)
        raise ValueError(f"--method {cfg.method}{f' --targets {targets!r}' if targets else ''}: {e}") from None
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _log(f"method {cfg.method}: {n_train:,} trainable parameters")
    if par is not None:
        par.check_trainable(model, cfg.method)
        _log(f"--parallel {par.strategy} on {par.world} processes ({par.device.type}): {cfg.batch_size} rows per "
             f"global micro-batch, {cfg.batch_size // par.world} per process")

    def save_artifacts(d: Path) -> None:
        # the method's format (PEFT's by default) and its extra files (QLoRA: the 4-bit base's settings)
        methods.save(model, d, base_model_name_or_path=model.name_or_path)
        tok.save(d)  # beside every output, as TRL does: a full run's folder is then a complete model folder
        if cfg.reinit_top:  # re-initialized blocks trained in full: the adapter alone does not hold them
            save_reinit_blocks(model, d, cfg.reinit_top)

    if cfg.objective == "dpo":
        result, report, params = train_preferences(cfg, model, train, evals, sft, save_artifacts)
        n_train = sum(p.numel() for p in params)
    elif spec.fit is not None:  # a method that trains in phases, each with a fresh optimizer (train.phases)
        from ..train.phases import PhaseRunner

        runner = PhaseRunner(model, train, evals, cfg.train_config(), out, save_artifacts, asdict(cfg),
                             resume=cfg.resume, log=_log)
        spec.fit(model, options, runner)
        result, report = runner.summary(), {}
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        trainer = Trainer(model, train, evals, cfg.train_config(), out, save_artifacts,
                          run_config=asdict(cfg), parallel=par)
        if cfg.resume and trainer.resume():
            _log(f"resumed at step {trainer.step}")
        result, report = trainer.fit(), trainer.options_report
        # after --freeze-lower / FPF / --reinit-top chose what trains (sharded: the local shards' sizes)
        n_train = sum(p.numel() for p in trainer.params) if par is None else n_train
    if par is not None:  # the model whole on every rank from here: rank 0 alone writes and evaluates
        par.gather_for_good()
        if not par.main:
            par.barrier()
            return result
    save_artifacts(out)
    summary = {**result, "trainable_parameters": n_train, "seconds": round(time.perf_counter() - t0, 1),
               "adapter": str(out)}
    if report:
        summary["train_options"] = report
    if s3ft_report:
        summary["s3ft"] = s3ft_report
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
    if par is not None:
        par.barrier()  # the other ranks wait for rank 0's files
    return summary
