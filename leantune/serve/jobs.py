"""Fine-tuning jobs inside the serving engine: start or resume, feed the co-trainer, checkpoint, publish.

One job trains at a time (FlexLLM's single fine-tuning slot); the others wait in the store as
`queued`, first come first served. A job's adapter lives in the model tree under its own internal name
(`job_<id>`), separate from every served adapter. When the job succeeds its weights are saved in PEFT's
format under the data dir, loaded as a new served adapter (a copy, so nothing a request is using
changes under it) and the training copy is deleted. Checkpoints (adapter + optimizer state + progress,
`train.checkpoint`) are written every `checkpoint_every` steps and at each epoch's end; after a crash
the engine resumes a `running` job from its latest one. A job's `integrations` (OpenAI's; W&B) get its config
and each step's metrics through the loggers of `train.report`, as `finetune --report-to` does.
"""
from __future__ import annotations

import time
from collections.abc import Callable

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


# OpenAI's `method.type`s a job here can train, and the hyperparameters each takes (in `method.<type>.hyperparameters`
# or, for either, the deprecated top-level `hyperparameters`)
COMMON_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
METHODS = {"supervised": COMMON_HYPERPARAMETERS, "dpo": COMMON_HYPERPARAMETERS + ("beta",)}


def method_type(job: dict) -> str:
    return (job.get("method") or {}).get("type", "supervised")


def hyperparameters(job: dict, defaults: FineTuneDefaults) -> CoTrainConfig:
    """OpenAI's hyperparameters ("auto" or a value) -> CoTrainConfig, "auto" taking the server's `defaults`;
    ValueError names the bad one."""
    kind = method_type(job)
    hp = dict(job.get("hyperparameters") or {})
    hp.update((((job.get("method") or {}).get(kind) or {}).get("hyperparameters")) or {})
    known = METHODS[kind]
    unknown = set(hp) - set(known)
    if unknown:
        raise ValueError(f"unknown hyperparameters {sorted(unknown)} for method.type '{kind}'; supported: "
                         f"{sorted(known)}")

    def pick(key, default):
        v = hp.get(key, "auto")
        return default if v == "auto" or v is None else v

    reals = {}
    for key, default, top in (("learning_rate_multiplier", 1.0, 100), ("beta", defaults.beta, 100)):
        v = reals[key] = pick(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= top:
            raise ValueError(f"hyperparameters.{key} must be a number in (0, {top}] or \"auto\", got {v!r}")
    counts = {}
    for key, top in (("n_epochs", 100), ("batch_size", 256)):
        v = counts[key] = pick(key, getattr(defaults, key))
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            raise ValueError(f"hyperparameters.{key} must be an integer in [1, {top}] or \"auto\", got {v!r}")
    seed = job.get("seed")
    return CoTrainConfig(**counts, learning_rate=defaults.lr * reals["learning_rate_multiplier"],
                         beta=reals["beta"], seed=0 if seed is None else seed)


def _adapter_name(job_id: str) -> str:
    """The training adapter's name inside the model tree (stable across restarts: checkpoints use it)."""
    return f"job_{job_id.replace('-', '_')}"


def job_loggers(job: dict, out) -> Logger:
    """The loggers of a job's `integrations` (validated by the API: W&B only), writing under `out`."""
    wandb = [i["wandb"] for i in job.get("integrations") or [] if i.get("type") == "wandb"]
    if not wandb:
        return open_loggers("none", out, jsonl=False)
    w = wandb[0]
    # a job found "running" resumes after a restart: it continues its W&B run (jsonl is off: nothing to truncate)
    return open_loggers("wandb", out, name=w.get("name") or job["id"], jsonl=False,
                        resume_step=0 if job["status"] == "running" else None,
                        wandb={"project": w["project"], "entity": w.get("entity"), "tags": w.get("tags")})


class ActiveJob:
    def __init__(self, job: dict, owner: str, adapter: str, trainer: CoTrainer, valid: list, loggers: Logger):
        self.job, self.owner, self.adapter, self.trainer, self.valid = job, owner, adapter, trainer, valid
        self.loggers = loggers
        self.id = job["id"]
        self.kv_id = f"ft:{self.id}"


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
        for status in ("running", "queued"):
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
            apply(self.model, "lora", adapter_name=adapter,
                  config=LoraConfig(r=ft.rank, alpha=ft.alpha, targets="all-linear", dropout=0.0))
            trainer = (DPOCoTrainer if dpo else CoTrainer)(self.model, adapter, examples, cfg)
        except BaseException:
            loggers.close(success=False)  # fail_active then fails the job
            raise
        self.active = ActiveJob(job, owner, adapter, trainer, valid, loggers)
        self._resume_or_begin(job)
        loggers.log_config({"model": job["model"], "training_file": job["training_file"],
                            "validation_file": job.get("validation_file"), "seed": trainer.cfg.seed,
                            **self.store.get_job(owner, jid)["hyperparameters"],
                            "adapter": {"r": ft.rank, "alpha": ft.alpha, "targets": "all-linear"},
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
        done = list_checkpoints(store.job_dir(a.id))
        if job["status"] == "running" and done:
            state = load_checkpoint(done[-1], self.model, a.trainer.opt)
            a.trainer.step, a.trainer.trained_tokens = state["step"], state.get("trained_tokens", 0)
            a.trainer._start_batch()
            store.add_event(a.id, f"Resumed from the checkpoint at step {state['step']}")
        else:
            store.add_event(a.id, f"Fine-tuning job started: {len(a.trainer.examples)} examples, "
                                  f"{a.trainer.total_steps} steps")
        # the values "auto" resolved to, where OpenAI reports them: top-level and in the method's block
        cfg, kind = a.trainer.cfg, method_type(job)
        hp = {"n_epochs": cfg.n_epochs, "batch_size": cfg.batch_size,
              "learning_rate_multiplier": cfg.learning_rate / self.cfg.finetune.lr}
        if "beta" in METHODS[kind]:
            hp["beta"] = cfg.beta
        store.update_job(a.id, status="running", hyperparameters=hp,
                         method={"type": kind, kind: {"hyperparameters": hp}})

    def cancel(self, job_id: str) -> None:
        """Engine thread. Stop the job if it is training; mark it cancelled. ValueError when finished."""
        owner = self.store.job_owner(job_id)
        job = self.store.get_job(owner, job_id) if owner is not None else None
        if job is None or job["status"] not in ("validating_files", "queued", "running"):
            raise ValueError(f"job {job_id} is {job['status'] if job else 'unknown'} and cannot be cancelled")
        if self.active is not None and self.active.id == job_id:
            self._teardown(success=False)
        self._finish(job_id, "cancelled")

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
        a.loggers.log_metrics(m["step"], {k: v for k, v in m.items() if k not in ("step", "total_steps")})
        self.store.add_event(a.id, f"Step {m['step']}/{m['total_steps']}: training loss={m['train_loss']:.4f}",
                               data={k: m[k] for k in a.trainer.event_keys}, type="metrics")
        end_of_epoch = m["step"] % a.trainer.steps_per_epoch == 0
        if m["step"] % self.cfg.checkpoint_every == 0 or end_of_epoch:
            self._checkpoint(m)
        if a.trainer.done:
            self._publish()

    def _checkpoint(self, m: dict) -> None:
        a, store = self.active, self.store
        progress = {"trained_tokens": a.trainer.trained_tokens}
        path = save_checkpoint(store.job_dir(a.id), m["step"], self.model, a.trainer.opt, progress, keep=2)
        store.add_checkpoint(a.id, m["step"], {"train_loss": m["train_loss"]}, str(path),
                             f"{self._model_name()}:ckpt-step-{m['step']}")

    def _model_name(self) -> str:
        j = self.active.job
        return f"ft:{self.base_name}:{j.get('user_provided_suffix') or 'leantune'}:{j['id'][-8:]}"

    def _publish(self) -> None:
        a, store, name = self.active, self.store, self._model_name()
        valid_loss = self._valid_loss()
        if valid_loss is not None:
            a.loggers.log_metrics(a.trainer.step, {"valid_loss": valid_loss})
        out = store.adapter_dir(name)
        save_adapter(self.model, out, adapter_name=a.adapter)
        if store.get_adapter(name) is None:
            store.add_adapter(a.owner, name, str(out), self.base_name, f"job:{a.id}")
        self.load_adapter(name, str(out), a.owner, replace=True)
        trained = a.trainer.trained_tokens
        self._teardown()
        if valid_loss is not None:
            store.add_event(a.id, f"Validation loss={valid_loss:.4f}", data={"valid_loss": valid_loss}, type="metrics")
        self._finish(a.id, "succeeded", fine_tuned_model=name, trained_tokens=trained)

    def _valid_loss(self) -> float | None:
        a = self.active
        return a.trainer.valid_loss(a.valid) if a.valid else None
