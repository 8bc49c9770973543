"""Training in phases: a method whose training is several runs in a row, each with a fresh optimizer and
learning-rate schedule (LT-SFT: a full phase, then a sparse phase from the reset weights), drives them through
a `PhaseRunner` from its `fit` hook (`methods.registry`), in place of the recipe's single `Trainer.fit()`.

Each phase is an ordinary `Trainer` run in its own folder, OUTPUT/phases/NAME (metrics.jsonl, loss.png,
checkpoints/ with the phase's name in every checkpoint), and leaves `phase_done.json` (its result) when it
finishes.

Resume replays: the method's `fit` runs again from the start, and `run` of a phase that finished restores that
phase's final weights and RNG from its last checkpoint instead of training, so whatever the method computes
between phases (LT-SFT's mask, its reset) is computed again from the same weights; the phase that was cut
resumes from its last checkpoint as a single run does, and later phases train as usual. A resumed run thus
computes the same losses as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .loop import TrainConfig, Trainer

DONE_NAME = "phase_done.json"


@dataclass
class PhaseRunner:
    """Runs one named phase at a time on `model` (see the module docstring)."""

    model: object
    train_examples: list
    eval_examples: list
    cfg: TrainConfig  # the run's settings; each phase may set its own length
    out: Path
    save_artifacts: Callable[[Path], None] | None = None
    run_config: dict | None = None
    resume: bool = False
    log: Callable[[str], None] = print
    results: list[dict] = field(default_factory=list)  # {"phase": name, **Trainer.fit()'s result}, in order
    objective: object = None  # the Trainers' objective (`train.objectives`); None: SFT

    def phase_config(self, steps: int = 0, epochs: int = 0) -> TrainConfig:
        """The run's TrainConfig with the phase's length: `steps` optimizer steps, else `epochs` passes,
        else the run's own --max-steps / --epochs."""
        if steps > 0:
            return dataclasses.replace(self.cfg, max_steps=steps)
        if epochs > 0:
            return dataclasses.replace(self.cfg, max_steps=0, epochs=epochs)
        return self.cfg

    def run(self, name: str, *, steps: int = 0, epochs: int = 0, artifacts: bool = True) -> dict:
        """Train phase `name` (a fresh optimizer and schedule) and return its result; with `artifacts`, each
        of its checkpoints also holds the method's saved output (off for a phase whose weights are not a
        result, e.g. LT-SFT's full phase)."""
        folder = Path(self.out) / "phases" / name
        done = folder / DONE_NAME
        if not self.resume and folder.exists():  # a fresh run: an earlier run's phase must not be replayed
            shutil.rmtree(folder)
        trainer = Trainer(self.model, self.train_examples, self.eval_examples, self.phase_config(steps, epochs),
                          folder, self.save_artifacts if artifacts else None,
                          run_config={**(self.run_config or {}), "phase": name}, phase=name,
                          objective=self.objective)
        if self.resume and done.is_file():
            if not trainer.resume():
                raise ValueError(f"{folder}: the phase finished but its checkpoints are gone; start a new --output")
            result = json.loads(done.read_text(encoding="utf-8"))
            self.log(f"phase {name}: finished before, its final weights restored")
        else:
            if self.resume and trainer.resume():
                self.log(f"phase {name}: resumed at step {trainer.step}")
            result = trainer.fit()
            tmp = folder / (DONE_NAME + ".tmp")
            tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
            os.replace(tmp, done)
        self.results.append({"phase": name, **result})
        return result

    def summary(self) -> dict:
        """The last phase's result with every phase's, as the recipe reports them."""
        if not self.results:
            raise ValueError("the method's fit ran no training phase")
        last = {k: v for k, v in self.results[-1].items() if k != "phase"}
        return {**last, "first_loss": self.results[0]["first_loss"], "phases": list(self.results)}
