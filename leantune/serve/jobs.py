"""Fine-tuning jobs inside the serving engine: start or resume, feed the co-trainer, checkpoint, publish.

One job trains at a time (FlexLLM's single fine-tuning slot); the others wait in the store as
`queued`, first come first served. A job's adapter lives in the model tree under its own internal name
(`job_<id>`), separate from every served adapter. When the job succeeds its weights are saved in PEFT's
format under the data dir, loaded as a new served adapter (a copy, so nothing a request is using
changes under it) and the training copy is deleted. Checkpoints (adapter + optimizer state + progress,
`train.checkpoint`) are written every `checkpoint_every` steps and at each epoch's end; after a crash
the engine resumes a `running` job from its latest one. Each checkpoint's adapter is also kept in PEFT's format,
so its `ft:...:ckpt-step-N` name is a model requests may use (loaded on the first one, `checkpoint_model`).
Pausing checkpoints the last finished step and frees the slot; a resumed job is queued again and continues from
that checkpoint, as after a crash. Each step's metrics (train loss and token accuracy; validation loss and token
accuracy every `eval_every` steps and at the end) go to the job's events, its result CSV (OpenAI's columns, a
`fine-tune-results` file rewritten each step) and its `integrations` (OpenAI's; W&B) through the loggers of
`train.report`, as `finetune --report-to` does.
"""
from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..data import DataError, load_dataset, load_preference_dataset
from ..methods.adapter_io import save_adapter
from ..methods.base import delete_adapter, list_adapters
from ..methods.lora import LoraConfig
from ..methods.registry import apply
from ..train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from ..train.report import Logger, open_loggers
from .cotrain import CoTrainConfig, CoTrainer
from .cotrain_dpo import DPOCoTrainer
from .ft_defaults import FineTuneDefaults
from .runner import Work
from .store import ACTIVE_JOB_STATUSES


# OpenAI's `method.type`s a job here can train, and the hyperparameters each takes (in `method.<type>.hyperparameters`
# or, for either, the deprecated top-level `hyperparameters`). Beside OpenAI's own, leantune's: the job's adapter
# (`adapter_method`, `lora_rank`, `lora_alpha`, `lora_targets`; the server's --ft-rank/--ft-alpha where absent) and
# `eval_every` (steps between validation metrics; --ft-eval-every)
COMMON_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
LEANTUNE_HYPERPARAMETERS = ("adapter_method", "lora_rank", "lora_alpha", "lora_targets", "eval_every")
METHODS = {"supervised": COMMON_HYPERPARAMETERS + LEANTUNE_HYPERPARAMETERS,
           "dpo": COMMON_HYPERPARAMETERS + ("beta",) + LEANTUNE_HYPERPARAMETERS}


def cotrained_methods() -> dict[str, type]:
    """The adapter methods a job can train in the serving loop (the registry's `cotrained` ones: LoRA-shaped
    adapters whose per-slot fused ops the packed forward and the layer-sliced backward run, `serve.cotrain`),
    by name -> config class; the others need their own training loop."""
    from ..methods.registry import method_specs

    return {s.name: s.config_cls for s in method_specs() if s.cotrained}


def method_type(job: dict) -> str:
    return (job.get("method") or {}).get("type", "supervised")


def _given(job: dict) -> dict:
    """The job's hyperparameters as sent (top level and the method's block; the block wins)."""
    kind = method_type(job)
    hp = dict(job.get("hyperparameters") or {})
    hp.update((((job.get("method") or {}).get(kind) or {}).get("hyperparameters")) or {})
    unknown = set(hp) - set(METHODS[kind])
    if unknown:
        raise ValueError(f"unknown hyperparameters {sorted(unknown)} for method.type '{kind}'; supported: "
                         f"{sorted(METHODS[kind])}")
    return {k: v for k, v in hp.items() if v != "auto" and v is not None}


def _count(hp: dict, key: str, default: int, top: int) -> int:
    v = hp.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
        raise ValueError(f"hyperparameters.{key} must be an integer in [1, {top}] or \"auto\", got {v!r}")
    return v


def _real(hp: dict, key: str, default: float, top: float) -> float:
    v = hp.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= top:
        raise ValueError(f"hyperparameters.{key} must be a number in (0, {top}] or \"auto\", got {v!r}")
    return v


def hyperparameters(job: dict, defaults: FineTuneDefaults) -> CoTrainConfig:
    """OpenAI's hyperparameters ("auto" or a value) -> CoTrainConfig, "auto" taking the server's `defaults`;
    ValueError names the bad one (leantune's own are checked too, by `adapter_config` and `eval_every`)."""
    hp = _given(job)
    adapter_config(job, defaults)
    eval_every(job, defaults)
    seed = job.get("seed")
    return CoTrainConfig(n_epochs=_count(hp, "n_epochs", defaults.n_epochs, 100),
                         batch_size=_count(hp, "batch_size", defaults.batch_size, 256),
                         learning_rate=defaults.lr * _real(hp, "learning_rate_multiplier", 1.0, 100),
                         beta=_real(hp, "beta", defaults.beta, 100), seed=0 if seed is None else seed)


def adapter_config(job: dict, defaults: FineTuneDefaults) -> tuple[str, LoraConfig]:
    """(method name, its config) of the job's adapter; ValueError naming the bad hyperparameter."""
    hp = _given(job)
    name = hp.get("adapter_method", "lora")
    cotrained = cotrained_methods()
    if name not in cotrained:
        from ..methods.registry import list_methods

        why = ("it is not a leantune method" if name not in list_methods() else
               "its adapters cannot be co-trained in the serving loop, which trains LoRA-shaped adapters only; "
               "train it with `leantune finetune --method` and serve the result with --adapter")
        raise ValueError(f"hyperparameters.adapter_method {name!r}: {why}; use one of {', '.join(cotrained)}")
    r = _count(hp, "lora_rank", defaults.rank, 1024)
    alpha = _real(hp, "lora_alpha", defaults.alpha, 1e4)
    targets = hp.get("lora_targets", "all-linear")
    if not (targets == "all-linear" or (isinstance(targets, list) and targets
                                        and all(isinstance(t, str) and t for t in targets))):
        raise ValueError(f"hyperparameters.lora_targets must be \"all-linear\" or a non-empty list of module names "
                         f"(e.g. [\"q_proj\", \"v_proj\"]), got {targets!r}")
    return name, cotrained[name](r=r, alpha=alpha, targets=targets, dropout=0.0)


def eval_every(job: dict, defaults: FineTuneDefaults) -> int:
    return _count(_given(job), "eval_every", defaults.eval_every, 1_000_000)


def _adapter_name(job_id: str) -> str:
    """The training adapter's name inside the model tree (stable across restarts: checkpoints use it)."""
    return f"job_{job_id.replace('-', '_')}"


def job_loggers(job: dict, out) -> Logger:
    """The loggers of a job's `integrations` (validated by the API: W&B only), writing under `out`."""
    wandb = [i["wandb"] for i in job.get("integrations") or [] if i.get("type") == "wandb"]
    if not wandb:
        return open_loggers("none", out, jsonl=False)
    w = wandb[0]
    # a job with checkpoints resumes (after a restart or a pause): it continues its W&B run (jsonl is off: nothing
    # to truncate)
    return open_loggers("wandb", out, name=w.get("name") or job["id"], jsonl=False,
                        resume_step=0 if list_checkpoints(out) else None,
                        wandb={"project": w["project"], "entity": w.get("entity"), "tags": w.get("tags")})


# OpenAI's result file: one row per step, these columns, empty where a step has no value
RESULT_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
_RESULT_KEYS = {"train_accuracy": "train_mean_token_accuracy"}  # CSV column -> metric name, where they differ


def results_csv(rows: list[dict]) -> bytes:
    """The result file's bytes: a header, then one row per step of metrics (`rows`: metric name -> value)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(RESULT_COLUMNS)
    for r in rows:
        w.writerow(["" if (v := r.get(_RESULT_KEYS.get(c, c))) is None else v for c in RESULT_COLUMNS])
    return out.getvalue().encode()


def read_results_csv(data: str) -> list[dict]:
    """`results_csv`'s rows back (metric name -> value; missing values left out)."""
    names = {c: _RESULT_KEYS.get(c, c) for c in RESULT_COLUMNS}
    return [{names[c]: (int(v) if c == "step" else float(v)) for c, v in r.items() if v not in ("", None)}
            for r in csv.DictReader(io.StringIO(data))]


class ActiveJob:
    def __init__(self, job: dict, owner: str, adapter: str, trainer: CoTrainer, valid: list, loggers: Logger,
                 eval_every: int):
        self.job, self.owner, self.adapter, self.trainer, self.valid = job, owner, adapter, trainer, valid
        self.loggers, self.eval_every = loggers, eval_every
        self.id = job["id"]
        self.kv_id = f"ft:{self.id}"
        self.rows: list[dict] = []  # the result file's rows so far
        self.results: str | None = None  # its file id


class JobRunner:
    """The fine-tuning side of the engine's loop. Its collaborators: the store (jobs, files, checkpoints), the
    served model and tokenizer, the KV block manager (forward chunks), the engine's stats, `load_adapter` (the
    engine's adapter registry, which publishes a finished job) and the engine's config (`cfg.finetune`: the
    fine-tuning defaults)."""

    def __init__(self, store, model, tokenizer, blocks, stats, load_adapter: Callable, base_name: str, cfg):
        self.store, self.model, self.tk, self.blocks, self.stats = store, model, tokenizer, blocks, stats
        self.load_adapter, self.base_name, self.cfg = load_adapter, base_name, cfg
        self.active: ActiveJob | None = None
        self.starting: str | None = None  # id of the job being set up (so a failure there is pinned on it)
        self.just_forwarded = False  # this iteration finished a training sequence's forward
        self.backward_units = 0  # backward slices run so far (the engine's admission tells its iterations apart)

    # -- lifecycle ---------------------------------------------------------------------------------
    def poll(self) -> None:
        """Start (or resume) the oldest running/queued job when none is active."""
        if self.active is not None:
            return
        for status in ("running", "queued"):  # "running": found so after a restart
            for job in self.store.jobs_with_status(status):
                self._start(job)
                if self.active is not None:
                    return

    def _start(self, job: dict) -> None:
        store, jid = self.store, job["id"]
        self.starting = jid
        owner = store.job_owner(jid)
        try:
            cfg = hyperparameters(job, self.cfg.finetune)
            method, lora = adapter_config(job, self.cfg.finetune)
            dpo = method_type(job) == "dpo"
            examples = self._examples(owner, job["training_file"], "training_file", dpo)
            valid = (self._examples(owner, job["validation_file"], "validation_file", dpo)
                     if job.get("validation_file") else [])
        except (ValueError, FileNotFoundError) as e:
            self.starting = None
            self._finish(jid, "failed", error={"code": "invalid_training_file", "message": str(e), "param": None})
            return
        try:  # before the adapter exists: a logger that cannot start fails the job with nothing to undo
            loggers = job_loggers(job, store.job_dir(jid))
        except (ValueError, OSError) as e:
            self.starting = None
            self._finish(jid, "failed", error={"code": "invalid_integration", "message": str(e),
                                               "param": "integrations"})
            return
        adapter = _adapter_name(jid)
        if adapter in list_adapters(self.model):
            delete_adapter(self.model, adapter)
        ft = self.cfg.finetune
        try:
            if not getattr(self.model, "hosts_finetuning", True):  # e.g. a model wrapped by a side network
                raise ValueError("this server's model runs a side-network adapter beside its base, which a "
                                 "fine-tuning job's LoRA cannot train through; run jobs on a server started "
                                 "without one")
            dev = next(self.model.parameters()).device
            # the adapter's init from the job's seed, so a job's `seed` reproduces it (OpenAI's promise), whatever
            # ran before; the server's own random state is left as it was
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                torch.manual_seed(cfg.seed)
                apply(self.model, method, adapter_name=adapter, config=lora)
            trainer = (DPOCoTrainer if dpo else CoTrainer)(self.model, adapter, examples, cfg)
        except BaseException:
            loggers.close(success=False)  # fail_active then fails the job
            raise
        self.active = ActiveJob(job, owner, adapter, trainer, valid, loggers, eval_every(job, ft))
        self._resume_or_begin(job)
        loggers.log_config({"model": job["model"], "training_file": job["training_file"],
                            "validation_file": job.get("validation_file"), "seed": trainer.cfg.seed,
                            **self.store.get_job(owner, jid)["hyperparameters"],
                            "adapter": {"method": method, "r": lora.r, "alpha": lora.alpha, "targets": lora.targets},
                            "total_steps": trainer.total_steps})
        self.starting = None

    def _examples(self, owner: str, file_id: str, what: str, pairs: bool = False) -> list:
        """The file's training examples; pairs: its preference pairs (a DPO job)."""
        path = self.store.file_path(owner, file_id)
        if path is None:
            raise FileNotFoundError(f"{what} {file_id} no longer exists")
        try:
            if pairs:
                return load_preference_dataset(path, self.tk, self.cfg.finetune.max_length, on_too_long="truncate",
                                               what=what)
            return load_dataset(path, self.tk, self.cfg.finetune.max_length, on_too_long="truncate")
        except DataError as e:
            raise ValueError(str(e).replace(str(path), file_id)) from None

    def _resume_or_begin(self, job: dict) -> None:
        a, store = self.active, self.store
        done = list_checkpoints(store.job_dir(a.id))  # none unless it ran before (a restart, a pause)
        results = job.get("result_files") or []
        if done:
            state = load_checkpoint(done[-1], self.model, a.trainer.opt)
            a.trainer.step, a.trainer.trained_tokens = state["step"], state.get("trained_tokens", 0)
            a.trainer._start_batch()
            store.add_event(a.id, f"Resumed from the checkpoint at step {state['step']}")
        else:
            store.add_event(a.id, f"Fine-tuning job started: {len(a.trainer.examples)} examples, "
                                  f"{a.trainer.total_steps} steps")
        path = store.file_path(a.owner, results[0]) if results else None
        if path is not None:  # the steps before the checkpoint stay; later ones are trained again
            a.rows = [r for r in read_results_csv(path.read_text()) if r["step"] <= a.trainer.step]
            a.results = results[0]
        else:
            a.results = store.add_file(a.owner, "step_metrics.csv", "fine-tune-results", results_csv([]))["id"]
            results = [a.results]
        # the values "auto" resolved to, where OpenAI reports them: top-level and in the method's block
        cfg, kind = a.trainer.cfg, method_type(job)
        hp = {"n_epochs": cfg.n_epochs, "batch_size": cfg.batch_size,
              "learning_rate_multiplier": cfg.learning_rate / self.cfg.finetune.lr}
        if "beta" in METHODS[kind]:
            hp["beta"] = cfg.beta
        method, lora = adapter_config(job, self.cfg.finetune)
        hp.update(adapter_method=method, lora_rank=lora.r, lora_alpha=lora.alpha, lora_targets=lora.targets,
                  eval_every=a.eval_every)
        store.update_job(a.id, status="running", hyperparameters=hp, result_files=results,
                         method={"type": kind, kind: {"hyperparameters": hp}})

    def cancel(self, job_id: str) -> None:
        """Engine thread. Stop the job if it is training; mark it cancelled. ValueError when finished."""
        owner = self.store.job_owner(job_id)
        job = self.store.get_job(owner, job_id) if owner is not None else None
        if job is None or job["status"] not in ACTIVE_JOB_STATUSES:
            raise ValueError(f"job {job_id} is {job['status'] if job else 'unknown'} and cannot be cancelled")
        if self.active is not None and self.active.id == job_id:
            self._teardown(success=False)
        self._finish(job_id, "cancelled")

    def pause(self, job_id: str) -> dict:
        """Engine thread. Stop training job `job_id` at its last optimizer step: a checkpoint of that step (the
        batch under way is dropped; its gradients were not applied), the adapter and its KV blocks freed, status
        "paused". `resume` continues from that checkpoint, so the steps and losses are those of an unpaused run.
        ValueError when the job cannot be paused."""
        job = self.store.get_job(self.store.job_owner(job_id), job_id)
        if job["status"] not in ("validating_files", "queued", "running"):
            raise ValueError(f"the job is {job['status']}; only a queued or running job can be paused")
        step = 0
        if self.active is not None and self.active.id == job_id:
            t = self.active.trainer
            step = t.step
            if step:  # the trainable weights and optimizer of `step`; nothing is left to keep at step 0
                save_checkpoint(self.store.job_dir(job_id), step, self.model, t.opt,
                                {"trained_tokens": t.batch_start_tokens}, keep=2)
            self._teardown()
        self.store.add_event(job_id, f"The job was paused at step {step}")
        return self.store.update_job(job_id, status="paused")

    def resume(self, job_id: str) -> dict:
        """Engine thread. Queue paused job `job_id` again; it continues from its pause checkpoint."""
        job = self.store.get_job(self.store.job_owner(job_id), job_id)
        if job["status"] != "paused":
            raise ValueError(f"the job is {job['status']}; only a paused job can be resumed")
        self.store.add_event(job_id, "The job was resumed")
        return self.store.update_job(job_id, status="queued")

    def checkpoint_model(self, name: str, owner: str | None):
        """Engine thread. Serve a job checkpoint's `fine_tuned_model_checkpoint` name: its adapter is loaded on
        the first request that names it (the engine's `load_adapter`); None when no checkpoint of `owner`'s
        has that name."""
        rec = self.store.checkpoint_by_model(name)
        if rec is None or rec["owner"] != owner or not Path(rec["path"]).is_dir():
            return None
        return self.load_adapter(name, rec["path"], rec["owner"])

    def fail_active(self, message: str) -> None:
        """Stop the active job (or the one being started) and record why it failed."""
        if self.active is None and self.starting is not None:
            if _adapter_name(self.starting) in list_adapters(self.model):
                delete_adapter(self.model, _adapter_name(self.starting))
            self._finish(self.starting, "failed", error={"code": "internal_error", "message": message, "param": None})
            self.starting = None
        if self.active is not None:
            jid = self.active.id
            self._teardown(success=False)
            self._finish(jid, "failed", error={"code": "internal_error", "message": message.splitlines()[-1],
                                               "param": None})

    def _teardown(self, success: bool = True) -> None:
        a, self.active = self.active, None
        self.blocks.free(a.kv_id)
        if a.adapter in list_adapters(self.model):
            delete_adapter(self.model, a.adapter)
        try:
            a.loggers.close(success)
        except Exception as e:  # noqa: BLE001 - the job's own outcome stands; the event says what the logger lost
            self.store.add_event(a.id, f"Could not finish the job's integration run: {e}", level="warn")

    def _finish(self, job_id: str, status: str, **fields) -> None:
        self.store.update_job(job_id, status=status, finished_at=int(time.time()), **fields)
        msg = {"succeeded": "The job has successfully completed", "cancelled": "The job was cancelled",
               "failed": f"The job failed: {(fields.get('error') or {}).get('message', '')}"}[status]
        self.store.add_event(job_id, msg, level="error" if status == "failed" else "info")

    # -- work in the serving loop --------------------------------------------------------------------
    def forward_work(self, leftover: int, inference: bool, cap: int) -> Work | None:
        """The job's forward chunk for this step: at most `cap` tokens, from the budget inference left over; with
        no inference in the step, up to the step's token budget."""
        a = self.active
        if a is None or not a.trainer.fwd_wanted():
            return None
        if not inference and a.trainer.at_sequence_start():
            return None  # nothing else runs: `backward` trains the whole sequence at once (no chunks, no recompute)
        # without inference in this step nothing waits on it: as much of the sequence as the step may hold (a
        # weight pass per chunk is the cost of a short chunk)
        n = min(a.trainer.fwd_wanted(), cap, leftover) if inference else min(a.trainer.fwd_wanted(),
                                                                              self.cfg.max_tokens_per_step)
        if n <= 0:
            return None
        toks, start = a.trainer.fwd_chunk(n)
        if not self.blocks.ensure(a.kv_id, start + n):
            return None  # the KV pool is full of inference requests: they go first
        return Work(toks, start, self.blocks.slots(a.kv_id, 0, start + n), adapter=a.trainer.slot, capture=True)

    def forward_done(self, captures) -> None:
        a = self.active
        self.just_forwarded = a.trainer.fwd_done(captures)
        if self.just_forwarded:
            self.blocks.free(a.kv_id)  # the backward recomputes attention from the kept layer inputs
        self.stats.ft_tokens += captures[0].shape[0]

    def wants_backward(self) -> bool:
        """Has the job work for an iteration with nothing else in it: backward units, or a whole sequence?"""
        t = None if self.active is None else self.active.trainer
        return t is not None and (t.bwd_wanted() or t.fwd_wanted() > 0)

    def backward(self, inference: bool) -> None:
        a = self.active
        if a is None:
            return
        t = a.trainer
        if not inference and t.at_sequence_start():
            # no request in this iteration: the next sequence's forward, loss and backward at once, as a
            # plain training step (activations kept, nothing recomputed): 0.7 s vs 1.0 s for 64 SmolLM2
            # tokens in chunks and layer slices on a CPU
            self.backward_units += 1
            self.stats.ft_tokens += len(t.seq)
            if not t.train_sequence():
                return
        else:
            if not t.bwd_wanted():
                return
            if inference and self.just_forwarded:
                self.just_forwarded = False  # that iteration already carried the sequence's last chunk
                return
            # units of backward: the loss, then layers; all of them (the loss in one) when no request waits
            self.backward_units += 1
            before = t.trained_tokens
            complete = t.backward_layers(self.cfg.ft_bwd_layers if inference else None)
            if t.forwards_in_backward:  # its tokens never went through forward_work (a DPO pair): count them here
                self.stats.ft_tokens += t.trained_tokens - before
            if not complete:
                return
        m = a.trainer.apply_step()
        self.stats.ft_steps += 1
        if a.valid and (m["step"] % a.eval_every == 0 or a.trainer.done):
            # in the engine thread between iterations, no grad: requests wait for it, but see no other change
            m.update(a.trainer.valid_metrics(a.valid))
        a.loggers.log_metrics(m["step"], {k: v for k, v in m.items() if k not in ("step", "total_steps")})
        data = {k: m[k] for k in a.trainer.event_keys + ("valid_loss", "valid_mean_token_accuracy") if k in m}
        valid = f", validation loss={m['valid_loss']:.4f}" if "valid_loss" in m else ""
        self.store.add_event(a.id, f"Step {m['step']}/{m['total_steps']}: training loss={m['train_loss']:.4f}{valid}",
                             data=data, type="metrics")
        a.rows.append(data)
        self.store.replace_file(a.owner, a.results, results_csv(a.rows))  # readable while the job runs
        end_of_epoch = m["step"] % a.trainer.steps_per_epoch == 0
        if m["step"] % self.cfg.checkpoint_every == 0 or end_of_epoch:
            self._checkpoint(m)
        if a.trainer.done:
            self._publish()

    def _checkpoint(self, m: dict) -> None:
        a, store = self.active, self.store
        progress = {"trained_tokens": a.trainer.trained_tokens}
        save_checkpoint(store.job_dir(a.id), m["step"], self.model, a.trainer.opt, progress, keep=2)
        # the adapter of this step in PEFT's format, kept (the training checkpoints above are pruned), so its
        # name is a model requests can use (`checkpoint_model`)
        name = f"{self._model_name()}:ckpt-step-{m['step']}"
        out = store.adapter_dir(name)
        save_adapter(self.model, out, adapter_name=a.adapter)
        metrics = {k: m[k] for k in ("step", "train_loss", "train_mean_token_accuracy", "valid_loss",
                                     "valid_mean_token_accuracy") if k in m}
        store.add_checkpoint(a.id, m["step"], metrics, str(out), name)

    def _model_name(self) -> str:
        j = self.active.job
        return f"ft:{self.base_name}:{j.get('user_provided_suffix') or 'leantune'}:{j['id'][-8:]}"

    def _publish(self) -> None:
        a, store, name = self.active, self.store, self._model_name()
        out = store.adapter_dir(name)
        save_adapter(self.model, out, adapter_name=a.adapter)
        if store.get_adapter(name) is None:
            store.add_adapter(a.owner, name, str(out), self.base_name, f"job:{a.id}")
        self.load_adapter(name, str(out), a.owner, replace=True)
        trained = a.trainer.trained_tokens
        self._teardown()
        self._finish(a.id, "succeeded", fine_tuned_model=name, trained_tokens=trained)
